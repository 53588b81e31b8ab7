"""Build manifests for TensorRT engines and the host check that reads them.

An engine only deserializes on the TensorRT version and the GPU architecture it was built for; when
either differs, TensorRT fails with a serialization assertion deep in the server log. Each engine
therefore gets a JSON manifest next to it (model_sm90.plan -> model_sm90.manifest.json), and
`check_engine_compat(model_dir)` compares the manifests with this host before a server loads them,
returning readable problems. No TensorRT import here: the check runs on any host.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from export import pbtxt
from serve.paths import REPO_ROOT

MANIFEST_FORMAT = 1
MANIFEST_SUFFIX = ".manifest.json"
PLATFORM = "tensorrt_plan"
REBUILD_HINT = "rebuild it on this host with `make export-trt-docker`"
# Where libnvinfer.so.X.Y.Z lives when the tensorrt Python package is absent (the tritonserver image
# has the libraries for its TensorRT backend but no Python bindings).
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/local/tensorrt/lib", "/opt/tensorrt/lib")


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class HostInfo:
    tensorrt_version: str | None  # None: no TensorRT found
    gpus: tuple[Gpu, ...]


@dataclass
class Manifest:
    model: str
    engine_file: str
    engine_sha256: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    build_options: dict
    profiles: dict  # input name -> [min, opt, max] shapes
    max_batch_size: int
    source_onnx: str  # relative to the repository root when inside it
    source_onnx_sha256: str
    workspace_bytes: int
    built_at: str  # ISO 8601 UTC
    build_seconds: float
    format: int = MANIFEST_FORMAT
    extra: dict = field(default_factory=dict)


def manifest_path(engine_path: Path) -> Path:
    """model_sm90.plan -> model_sm90.manifest.json"""
    return engine_path.with_name(engine_path.stem + MANIFEST_SUFFIX)


def write_manifest(m: Manifest, path: Path) -> Path:
    path.write_text(json.dumps(asdict(m), indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(path: Path) -> Manifest:
    data = json.loads(path.read_text())
    assert data.get("format") == MANIFEST_FORMAT, f"{path}: manifest format {data.get('format')} != {MANIFEST_FORMAT}"
    return Manifest(**data)


def read_manifests(version_dir: Path) -> list[Manifest]:
    return [read_manifest(p) for p in sorted(version_dir.glob("*" + MANIFEST_SUFFIX))]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def repo_relative(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def same_trt_version(a: str, b: str) -> bool:
    """Engines need the same major.minor.patch ('10.5.0' == '10.5.0.18'; the build number may be absent)."""
    return a.split(".")[:3] == b.split(".")[:3]


# ---- host detection


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """Lines of `nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`."""
    gpus = []
    for line in text.strip().splitlines():
        name, _, cc = line.rpartition(",")
        assert name and cc.strip().replace(".", "").isdigit(), f"unexpected nvidia-smi line {line!r}"
        gpus.append(Gpu(name.strip(), cc.strip()))
    return tuple(gpus)


def detect_gpus() -> tuple[Gpu, ...]:
    """GPUs of this host: nvidia-smi first (no CUDA context needed), torch.cuda as a fallback."""
    if shutil.which("nvidia-smi"):
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
        if r.returncode == 0 and r.stdout.strip():
            try:
                return parse_nvidia_smi(r.stdout)
            except AssertionError:  # drivers too old for compute_cap print "[N/A]": ask torch
                pass
    try:
        import torch
    except ImportError:
        return ()
    if not torch.cuda.is_available():
        return ()
    return tuple(
        Gpu(torch.cuda.get_device_name(i), "%d.%d" % torch.cuda.get_device_capability(i))
        for i in range(torch.cuda.device_count())
    )


def trt_version_from_lib_names(names: list[str]) -> str | None:
    """['.../libnvinfer.so.10.5.0'] -> '10.5.0' (the highest when several are present)."""
    versions = []
    for n in names:
        suffix = Path(n).name.partition("libnvinfer.so.")[2]
        parts = suffix.split(".")
        if len(parts) >= 3 and all(p.isdigit() for p in parts):
            versions.append(tuple(int(p) for p in parts))
    return ".".join(map(str, max(versions))) if versions else None


def detect_tensorrt_version() -> str | None:
    """The tensorrt Python package if importable, else the libnvinfer.so.X.Y.Z on the library path."""
    try:
        import tensorrt
        return tensorrt.__version__
    except ImportError:
        pass
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d] + list(LIB_DIRS)
    return trt_version_from_lib_names([n for d in dirs for n in glob.glob(os.path.join(d, "libnvinfer.so.*"))])


def detect_host() -> HostInfo:
    return HostInfo(detect_tensorrt_version(), detect_gpus())


# ---- the check


def latest_version_dir(model_dir: Path) -> Path | None:
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name)) if versions else None


def check_engine_compat(model_dir: Path, host: HostInfo | None = None) -> list[str]:
    """Problems that would stop this tensorrt_plan model from loading here; empty when it is fine.

    Checks, for the latest version directory: a manifest per engine, the engine file and its hash,
    config.pbtxt's cc_model_filenames and max_batch_size against the manifests, this host's TensorRT
    version, an engine for every GPU's compute capability, and the source ONNX hash (a stale engine)
    when the ONNX is present. `host` defaults to detect_host(). Models whose config is not
    tensorrt_plan have nothing to check.
    """
    model_dir = Path(model_dir)
    config = pbtxt.read(model_dir)
    if config.platform != PLATFORM and config.backend != "tensorrt":
        return []
    version_dir = latest_version_dir(model_dir)
    if version_dir is None:
        return [f"no version directory in {model_dir}; build the engine with `make export-trt-docker`"]
    manifests = read_manifests(version_dir)
    if not manifests:
        return [f"no build manifest (*{MANIFEST_SUFFIX}) in {version_dir}: an engine without a manifest "
                f"cannot be checked against this host; {REBUILD_HINT}"]
    host = host or detect_host()
    problems = []
    by_cc = {m.compute_capability: m for m in manifests}
    built_for = ", ".join(f"{m.compute_capability} ({m.gpu_name})" for m in manifests)

    config_files = dict(config.cc_model_filenames)
    for m in manifests:
        if config_files.get(m.compute_capability) != m.engine_file:
            problems.append(f"config.pbtxt cc_model_filenames has {config_files.get(m.compute_capability)!r} "
                            f"for compute capability {m.compute_capability}, the manifest says {m.engine_file!r}; "
                            f"regenerate the config with `make export-trt-docker`")
        engine = version_dir / m.engine_file
        if not engine.exists():
            problems.append(f"engine {engine} is missing (its manifest exists); {REBUILD_HINT}")
        elif sha256_file(engine) != m.engine_sha256:
            problems.append(f"engine {engine} does not match its manifest (sha256 differs: replaced or "
                            f"truncated); {REBUILD_HINT}")
        if m.max_batch_size != config.max_batch_size:
            problems.append(f"config max_batch_size {config.max_batch_size} != the engine profile's max batch "
                            f"{m.max_batch_size} ({m.engine_file}); regenerate both with `make export-trt-docker`")
        if host.tensorrt_version is None:
            problems.append(f"{m.engine_file} needs TensorRT {m.tensorrt_version}, and this host has no "
                            f"TensorRT (no tensorrt Python package, no libnvinfer.so.X.Y.Z); serve it in the NGC "
                            f"container it was built for")
        elif not same_trt_version(m.tensorrt_version, host.tensorrt_version):
            problems.append(f"{m.engine_file} was built with TensorRT {m.tensorrt_version}, this host has "
                            f"TensorRT {host.tensorrt_version}; engines only load on the TensorRT version that built "
                            f"them: {REBUILD_HINT}")
        source = Path(m.source_onnx) if Path(m.source_onnx).is_absolute() else REPO_ROOT / m.source_onnx
        if source.exists() and sha256_file(source) != m.source_onnx_sha256:
            problems.append(f"{m.engine_file} is stale: {m.source_onnx} changed since the engine was built "
                            f"(sha256 {m.source_onnx_sha256[:12]} -> {sha256_file(source)[:12]}); {REBUILD_HINT}")
    if not host.gpus:
        problems.append(f"no NVIDIA GPU visible on this host; the engine was built for compute capability "
                        f"{built_for}")
    for i, gpu in enumerate(host.gpus):
        if gpu.compute_capability not in by_cc:
            problems.append(f"GPU {i} ({gpu.name}, compute capability {gpu.compute_capability}) has no engine; "
                            f"engines exist for {built_for}; build one on this GPU with `make export-trt-docker`")
    return problems


def check_repository(repo: Path, host: HostInfo | None = None) -> dict[str, list[str]]:
    """check_engine_compat for every tensorrt_plan model of a repository: {model: problems}."""
    host = host or detect_host()
    return {d.name: check_engine_compat(d, host) for d in sorted(Path(repo).iterdir()) if (d / "config.pbtxt").exists()}
