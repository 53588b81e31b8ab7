"""`make doctor`: check this host against what the server and the model repository need.

Every check returns a Check; a failed one carries the fix. Exit code 1 when any check failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from export import pbtxt, placement
from serve import environment, paths
from serve.launcher import ServerOptions
from serve.ports import port_is_free
from serve.repository import check_repository, model_dirs


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    info_only: bool = False  # reported, never fails the run (e.g. no GPU on a CPU host)


def check_numpy(model: environment.ModelPython) -> Check:
    try:
        environment.require_numpy_below_2(model)
        return Check("numpy < 2 in model env", True, f"numpy {model.numpy}")
    except environment.SetupError as e:
        return Check("numpy < 2 in model env", False, str(e), "make setup (pins numpy==1.26.4)")


def check_stub(env: dict[str, str], model: environment.ModelPython) -> Check:
    name = "stub matches model Python"
    version = model.version
    stub = environment.stub_for(version)
    if not stub.exists():
        return Check(name, False, f"no stub for Python {version} ({stub})", "use Python 3.8-3.13 for the model env")
    ldd = _ldd(stub, environment.with_libpython(env, model))
    missing = _missing_libs(ldd)
    if missing:
        return Check(name, False, f"stub {version} cannot load {missing}", f"install the shared libpython{version} (e.g. apt-get install libpython{version})")
    loaded = _resolved_libpython(ldd)
    if model.shared_libpython and loaded and Path(loaded).resolve() != model.shared_libpython.resolve():
        return Check(name, False, f"stub loads {loaded}, the model interpreter is {model.shared_libpython}",
                     "put the interpreter's LIBDIR first on LD_LIBRARY_PATH")
    if model.shared_libpython is None:
        return Check(name, True, f"Python {version}; stub loads {loaded} (interpreter is a static build: "
                     "its stdlib extension modules must match that libpython)")
    return Check(name, True, f"Python {version}, stub {stub}, libpython {loaded}")


def _ldd(binary: Path, env: dict[str, str]) -> str:
    return subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True).stdout


def _missing_libs(ldd: str) -> list[str]:
    return [line.split()[0] for line in ldd.splitlines() if "not found" in line]


def _resolved_libpython(ldd: str) -> str | None:
    for line in ldd.splitlines():
        if "libpython" in line and "=>" in line:
            return line.split("=>")[1].split("(")[0].strip()
    return None


def check_server_binary(env: dict[str, str]) -> Check:
    try:
        binary = environment.tritonserver_bin()
    except environment.SetupError as e:
        return Check("tritonserver binary", False, str(e), "make setup")
    missing = _missing_libs(_ldd(binary, env))
    if missing:
        return Check("tritonserver binary", False, f"missing libraries {missing}", "make setup")
    return Check("tritonserver binary", True, str(binary))


def python_instances(repo: Path) -> int:
    """Stub processes the repository will start: each Python-backend instance gets its own shm region.
    Python-based backends (ours, e.g. `onnxruntime` on pip hosts) run on the Python backend too."""
    count = 0
    for d in model_dirs(repo):
        try:
            c = pbtxt.read(d)
        except Exception:
            continue  # check_models reports it
        if c.backend and (c.backend == "python" or not _cxx_backend_available(c.backend)):
            count += sum(max(g.count, 1) for g in c.instance_group) or 1
    return count


def _cxx_backend_available(name: str) -> bool:
    return (environment.server_root() / "backends" / name / f"libtriton_{name}.so").exists()


def check_shm(repo: Path, opts: ServerOptions) -> Check:
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    need = python_instances(repo) * opts.shm_default_byte_size
    detail = f"/dev/shm free {free / 2**20:.0f} MiB, Python-backend instances need >= {need / 2**20:.0f} MiB at start"
    ok = free >= need
    fix = "" if ok else "enlarge /dev/shm (docker run --shm-size=1g) or lower --shm-default-byte-size"
    return Check("/dev/shm size", ok, detail, fix)


def check_ports(opts: ServerOptions, gateway_port: int | None = None) -> Check:
    ports = tuple(p for p in (gateway_port, opts.http_port, opts.grpc_port, opts.metrics_port) if p is not None)
    taken = [p for p in ports if not port_is_free(opts.host, p)]
    if taken:
        return Check("ports free", False, f"in use on {opts.host}: {taken}",
                     "stop what holds them or pass --http-port/--triton-http-port/--grpc-port/--metrics-port")
    return Check("ports free", True, f"{opts.host}: {list(ports)}")


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    compute_cap: str
    total_mib: int
    used_mib: int

    @property
    def free_mib(self) -> int:
        return self.total_mib - self.used_mib


SMI_QUERY = "index,name,compute_cap,memory.total,memory.used"


def gpu_info() -> list[Gpu]:
    """The GPUs this host's server would see, with their memory: from nvidia-smi, else from torch when a
    driver device exists; [] without a GPU or driver."""
    if shutil.which("nvidia-smi") is not None:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        if out.returncode == 0:
            return parse_smi(out.stdout)
    if Path("/dev/nvidia0").exists():  # a driver without nvidia-smi (some containers): ask torch
        try:
            import torch

            return [Gpu(i, torch.cuda.get_device_name(i), "%d.%d" % torch.cuda.get_device_capability(i),
                        (total := torch.cuda.mem_get_info(i)[1]) // 2**20,
                        (total - torch.cuda.mem_get_info(i)[0]) // 2**20)
                    for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001 - no usable CUDA: the same as no GPU here
            return []
    return []


def parse_smi(text: str) -> list[Gpu]:
    """nvidia-smi --query-gpu=index,name,compute_cap,memory.total,memory.used --format=csv,noheader,nounits"""
    found = []
    for line in text.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) != 5:
            continue
        index, name, cc, total, used = parts
        to_int = lambda v: int(float(v)) if v.replace(".", "", 1).isdigit() else 0  # noqa: E731 - "[N/A]" -> 0
        found.append(Gpu(int(index), name, cc, to_int(total), to_int(used)))
    return found


def gpus() -> list[tuple[str, str]]:
    """[(name, compute capability)]; [] without a GPU or driver."""
    return [(g.name, g.compute_cap) for g in gpu_info()]


def gpu_models(repo: Path) -> list[str]:
    names = []
    for d in model_dirs(repo):
        try:
            c = pbtxt.read(d)
        except Exception:
            continue
        if any(g.kind == g.KIND_GPU for g in c.instance_group):
            names.append(d.name)
    return names


def check_gpu(repo: Path, found: list[Gpu] | None = None) -> Check:
    found = gpu_info() if found is None else found
    need = gpu_models(repo)
    detail = "; ".join(f"GPU {g.index} {g.name} (sm {g.compute_cap}): {g.total_mib} MiB, {g.used_mib} MiB in use, "
                       f"{g.free_mib} MiB free" for g in found) or "no GPU (nvidia-smi / CUDA driver not found)"
    if need and not found:
        return Check("GPU", False, f"no GPU, but {need} ask for KIND_GPU", "re-export with CPU instances (drop --gpu/--gpus) or run on a GPU host")
    return Check("GPU", True, detail, info_only=not need)


# ---- what each instance will hold


WEIGHT_SUFFIXES = (".onnx", ".data", ".plan", ".safetensors", ".bin", ".pt")


def weight_bytes(model_dir: Path, config) -> int:
    """Bytes of weights one instance loads: the weight files of the newest version (one engine of a
    TensorRT model with several, one per compute capability). An estimate: dtype casts at load (e.g. the
    torch encoder's fp32 checkpoint run in fp16) change it."""
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        return 0
    version = versions[-1]
    if config.cc_model_filenames:
        return max(((version / f).stat().st_size for f in config.cc_model_filenames.values() if (version / f).is_file()),
                   default=0)
    return sum(f.stat().st_size for f in version.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def _param(config, key: str) -> float:
    p = config.parameters.get(key)
    try:
        return float(p.string_value) if p is not None and p.string_value else 0.0
    except ValueError:
        return 0.0


def kv_cache_hold(config, gpu: Gpu | None) -> tuple[str, float]:
    """An LLM instance's KV cache, from its engine settings (export/llm.py writes them as parameters):
    (what, MiB it reserves; 0 when unknown)."""
    budget = _param(config, "kv_cache_budget_mb")
    if budget > 0:
        return f"KV cache {budget:.0f} MiB", budget
    fraction = _param(config, "kv_cache_memory_fraction")
    if fraction > 0 and gpu is not None:
        return f"KV cache up to {fraction:.0%} of GPU {gpu.index} less weights", fraction * gpu.total_mib
    return "", 0.0


def check_placement(repo: Path, found: list[Gpu]) -> Check:
    """Every instance Triton will create (export/placement.py), on which device, holding what; fails when
    a group names a GPU this host does not have, or when a GPU's instances need more than it has."""
    lines: dict[str, dict[tuple[str, str], int]] = {}  # device -> (model, what one holds) -> instances
    need_mib: dict[int, float] = {}
    problems = []
    by_index = {g.index: g for g in found}
    for d in model_dirs(repo):
        try:
            config = pbtxt.read(d)
        except Exception:
            continue  # check_models reports it
        if config.platform == "ensemble" or config.backend == "ensemble":
            continue  # no instances of its own
        try:
            placed = placement.instances(config, len(found))
        except ValueError as e:
            if found:  # without any GPU, check_gpu already says so
                problems.append(str(e))
            continue
        weights_mib = weight_bytes(d, config) / 2**20
        for inst in placed:
            gpu = by_index.get(inst.device_id) if inst.kind == "GPU" else None
            kv, kv_mib = kv_cache_hold(config, gpu)
            hold = " + ".join(x for x in (f"weights {weights_mib:.0f} MiB" if weights_mib >= 0.5 else "", kv) if x)
            where = f"GPU {inst.device_id}" if inst.kind == "GPU" else "CPU"
            key = (inst.model, hold)
            lines.setdefault(where, {})[key] = lines.get(where, {}).get(key, 0) + 1
            if gpu is not None:
                need_mib[gpu.index] = need_mib.get(gpu.index, 0.0) + max(weights_mib, kv_mib)
    for index, mib in sorted(need_mib.items()):
        g = by_index[index]
        if mib > g.total_mib:
            problems.append(f"GPU {index}: its instances need about {mib:.0f} MiB, it has {g.total_mib} MiB")
    report = "\n".join(
        f"{where}: " + ", ".join(f"{model} x{n}" + (f" ({hold} each)" if hold else "") for (model, hold), n in items.items())
        for where, items in sorted(lines.items())) or "no instances"
    if problems:
        return Check("instance placement", False, "\n".join(problems) + "\n" + report,
                     "re-export with --gpus naming GPUs this host has (python -m export --gpus N), fewer instances "
                     "per GPU, or a smaller kv_cache_budget_mb")
    return Check("instance placement", True, report, info_only=not need_mib)


def tensorrt_version() -> str | None:
    try:
        import tensorrt  # noqa: F401  (only present in TensorRT containers)
    except ImportError:
        return None
    return getattr(tensorrt, "__version__", "unknown")


def check_tensorrt(repo: Path) -> Check:
    version = tensorrt_version()
    engines = [d.name for d in model_dirs(repo) if _is_engine(d)]
    detail = f"TensorRT {version}" if version else "not installed"
    if engines and not _cxx_backend_available("tensorrt"):
        return Check("TensorRT", False, f"{engines} are TensorRT engines; this server has no tensorrt backend",
                     "serve them in the NGC container (docker/README.md)")
    return Check("TensorRT", True, detail, info_only=not engines)


def _is_engine(model_dir: Path) -> bool:
    try:
        return pbtxt.read(model_dir).platform == "tensorrt_plan"
    except Exception:
        return False


def check_models(repo: Path) -> Check:
    problems = check_repository(repo)
    if problems:
        fixes = sorted({p.fix for p in problems})
        return Check("model artifacts", False, "\n".join(map(str, problems)), "; ".join(fixes))
    return Check("model artifacts", True, f"{len(model_dirs(repo))} models ready in {repo}")


def check_perf_analyzer() -> Check:
    binary = paths.perf_analyzer_bin()
    if not binary.exists():
        return Check("perf_analyzer", False, f"not found at {binary}", "make setup")
    env = dict(os.environ, LD_LIBRARY_PATH=str(paths.perf_analyzer_libs()))
    missing = _missing_libs(_ldd(binary, env))
    if missing:
        return Check("perf_analyzer", False, f"missing libraries {missing}", "make setup")
    return Check("perf_analyzer", True, str(binary))


def dir_mib(path: Path) -> float:
    """MiB of the files under path (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def check_compile_cache(env: dict[str, str]) -> Check:
    """torch.compile's caches (serve/environment.py): writable, and how much they hold (0 = the next
    compiled model start is cold)."""
    parts, bad = [], []
    for name in environment.COMPILE_CACHE_ENVS:
        path = Path(env[name])
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".doctor-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            bad.append(f"{name}={path}: {e.strerror or e}")
            continue
        parts.append(f"{name}={path} ({dir_mib(path):.0f} MiB)")
    if bad:
        return Check("compile cache", False, "; ".join(bad),
                     f"point {' / '.join(environment.COMPILE_CACHE_ENVS)} at a writable directory (a volume in a container)")
    return Check("compile cache", True, ", ".join(parts), info_only=True)


def run_checks(opts: ServerOptions, gateway_port: int | None = None) -> list[Check]:
    env = environment.server_env(opts.model_env)
    repo = Path(opts.model_repository)
    found = gpu_info()  # once: the GPU and placement checks read it
    try:
        model = environment.probe_model_python(env)  # once: both checks below read it
        python_checks = [check_numpy(model), check_stub(env, model)]
    except environment.SetupError as e:
        python_checks = [Check("model Python environment", False, str(e), "make setup")]
    return [
        *python_checks,
        check_server_binary(env),
        check_shm(repo, opts),
        check_ports(opts, gateway_port),
        check_gpu(repo, found),
        check_placement(repo, found),
        check_tensorrt(repo),
        check_compile_cache(env),
        check_models(repo),
        check_perf_analyzer(),
    ]


def report(checks: list[Check]) -> int:
    failed = [c for c in checks if not c.ok]
    for c in checks:
        mark = "ok  " if c.ok else "FAIL"
        if c.ok and c.info_only:
            mark = "info"
        print(f"[{mark}] {c.name}: {c.detail}")
        if not c.ok:
            print(f"       fix: {c.fix}")
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed" + (f"; {len(failed)} failed" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from serve.launcher import add_server_args, gateway_from_args, options_from_args

    p = argparse.ArgumentParser(description="Check this host for serving the model repository.")
    add_server_args(p)
    a = p.parse_args(argv)
    return report(run_checks(options_from_args(a, []), gateway_from_args(a).port))


if __name__ == "__main__":
    sys.exit(main())
