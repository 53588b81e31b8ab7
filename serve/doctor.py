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

from export import pbtxt
from serve import environment, paths
from serve.launcher import ServerOptions, port_is_free
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


def gpus() -> list[tuple[str, str]]:
    """[(name, compute capability)] from nvidia-smi; [] without a GPU or driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True, text=True
    )
    if out.returncode != 0:
        return []
    return [tuple(x.strip() for x in line.split(",", 1)) for line in out.stdout.strip().splitlines() if "," in line]


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


def check_gpu(repo: Path) -> Check:
    found = gpus()
    need = gpu_models(repo)
    detail = ", ".join(f"{n} (sm {cc})" for n, cc in found) or "none"
    if need and not found:
        return Check("GPU", False, f"no GPU, but {need} ask for KIND_GPU", "re-export with CPU instances (drop --gpu) or run on a GPU host")
    return Check("GPU", True, detail, info_only=not need)


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


def run_checks(opts: ServerOptions, gateway_port: int | None = None) -> list[Check]:
    env = environment.server_env(opts.model_env)
    repo = Path(opts.model_repository)
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
        check_gpu(repo),
        check_tensorrt(repo),
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
