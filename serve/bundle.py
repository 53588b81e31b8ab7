"""Offline bundle: one archive holding what a GPU host without package-registry access needs to serve
this repository (tritonserver + Python backend from the pytriton wheel, the stub for the host's Python,
only the shared libraries they load, numpy<2 and gRPC client wheels for that Python, perf_analyzer, the
project code) plus `bundle_serve.sh`, which unpacks it into a venv layered over the host's own
site-packages (torch/transformers come from the host image) and starts the launcher.

Layout inside the archive (all under `triton-bundle/`):
    bundle_serve.sh               unpack-and-serve script (serve/bundle_serve.sh)
    MANIFEST.json                 versions, sizes, the host Python the stub was picked for
    site/pytriton/tritonserver/   bin/tritonserver, backends/python, caches, python_backend_stubs/<X.Y>
    site/nvidia_pytriton.libs/    the NEEDED closure of the three ELF entry points, nothing else
    wheels/*.whl                  numpy<2, grpcio, protobuf, tritonclient for the host Python
    opt/bin/perf_analyzer         from the tritonclient 2.51 wheel (serve/setup.sh put it in .venv/opt)
    project/                      serve/ export/ llm/ backends/ clients/ bench/ model_repository/ ... (git-visible files)

`site/` is copied into the venv's own site-packages by bundle_serve.sh, so `serve.paths.pytriton_root()`
(site-packages/pytriton/tritonserver of the running interpreter) finds the server unchanged.

    python -m serve.bundle --python 3.12 --out .bundle/bundle.tar.xz
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from serve import paths

LIMIT_BYTES = 64 * 1024 * 1024  # the lent GPU machine accepts at most 64 MiB per call
DEFAULT_OUT = paths.REPO_ROOT / ".bundle" / "bundle.tar.xz"
DEFAULT_PYTHON = "3.12"  # the GPU image's Python
TOP = "triton-bundle"
SERVE_SCRIPT = Path(__file__).with_name("bundle_serve.sh")

# Wheels for the model/client environment on the host. numpy < 2: the 2.51 stub silently returns garbage
# with numpy >= 2. tritonclient[grpc] 2.73 and what it imports: grpcio/protobuf at the versions its
# generated stubs require (the host's may be older), python-rapidjson, ml-dtypes (built for numpy 1.x
# too). Pinned like requirements.txt.
WHEELS = ("numpy==1.26.4", "grpcio==1.85.1", "protobuf==6.33.6", "tritonclient==2.73.0", "python-rapidjson==1.25",
          "ml-dtypes==0.5.4")
WHEEL_PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
                   "manylinux_2_28_x86_64", "any")
PROJECT_DIRS = ("serve", "export", "llm", "backends", "clients", "bench", "model_repository", "docs", "tests")
PROJECT_FILES = ("Makefile", "requirements.txt", "README.md", "pyproject.toml")
# ELF files the server loads at start; their NEEDED closure decides which bundled libs are kept.
ELF_ENTRY_POINTS = ("bin/tritonserver", "backends/python/libtriton_python.so", "caches/local/libtritoncache_local.so")
STRIP = ("bin/tritonserver", "backends/python/libtriton_python.so")  # unstripped in the wheel (-15 MB)


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of an ELF file (readelf from binutils)."""
    out = subprocess.run(["readelf", "-d", str(path)], check=True, capture_output=True, text=True).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


def needed_libs(server_root: Path, libs_dir: Path, python: str) -> list[str]:
    """Names in `libs_dir` reachable through NEEDED from the server, the Python backend and the stub."""
    entries = [server_root / p for p in ELF_ENTRY_POINTS]
    entries.append(server_root / "python_backend_stubs" / python / "triton_python_backend_stub")
    available = {p.name for p in libs_dir.iterdir()}
    keep: set[str] = set()
    todo = [e for e in entries]
    while todo:
        for name in elf_needed(todo.pop()):
            if name in available and name not in keep:
                keep.add(name)
                todo.append(libs_dir / name)
    return sorted(keep)


def _wheel_prefix(requirement: str) -> str:
    name, version = requirement.split("==")
    return f"{name.replace('-', '_').lower()}-{version}-"


def download_wheels(python: str, dest: Path) -> list[Path]:
    """The WHEELS for cpX.Y into dest (kept there: a second build with the same dest is offline)."""
    dest.mkdir(parents=True, exist_ok=True)
    tag = "cp" + python.replace(".", "")

    def cached(req):
        return [w for w in dest.glob("*.whl") if w.name.lower().startswith(_wheel_prefix(req))
                and (tag in w.name or "-py3-none-any" in w.name or "-abi3-" in w.name)]

    if all(cached(r) for r in WHEELS):
        return sorted(w for r in WHEELS for w in cached(r)[:1])
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", python, "--implementation", "cp", "-d", str(dest)]
    for plat in WHEEL_PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + list(WHEELS), check=True)
    missing = [r for r in WHEELS if not cached(r)]
    assert not missing, f"pip download did not produce {missing} for Python {python}"
    wheels = sorted(w for r in WHEELS for w in cached(r)[:1])
    numpy = [w for w in wheels if w.name.startswith("numpy-")]
    assert numpy and numpy[0].name.startswith("numpy-1.") and tag in numpy[0].name, f"bad numpy wheel {numpy}"
    return wheels


def project_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files: generated weights/engines and .venv stay out."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "--", *PROJECT_DIRS, *PROJECT_FILES],
                         cwd=root, check=True, capture_output=True, text=True).stdout
    files = [f for f in out.splitlines() if f and ((root / f).is_file() or (root / f).is_symlink())]
    files = [f for f in files if "__pycache__" not in f and not f.endswith(".pyc") and f != "docs/HELPERS_BRIEF.md"]
    assert any(f.startswith("serve/") for f in files), "project listing lacks serve/: not a checkout?"
    return sorted(files)


def stage(stage_dir: Path, python: str, wheel_cache: Path | None) -> dict:
    """Lay out the bundle under stage_dir/TOP; returns the manifest."""
    top = stage_dir / TOP
    server_src, libs_src = paths.pytriton_root(), paths.pytriton_libs()
    assert (server_src / "bin" / "tritonserver").is_file(), f"no tritonserver under {server_src}: run serve/setup.sh"
    stub = server_src / "python_backend_stubs" / python / "triton_python_backend_stub"
    assert stub.is_file(), f"no Python backend stub for Python {python} in {stub.parent.parent}"

    server_dst = top / "site" / "pytriton" / "tritonserver"
    for sub in ("bin", "backends", "caches"):
        shutil.copytree(server_src / sub, server_dst / sub, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(stub.parent, server_dst / "python_backend_stubs" / python)
    for rel in STRIP:
        if shutil.which("strip"):
            subprocess.run(["strip", "--strip-unneeded", str(server_dst / rel)], check=True)
    libs = needed_libs(server_src, libs_src, python)
    (top / "site" / "nvidia_pytriton.libs").mkdir(parents=True)
    for name in libs:
        shutil.copy2(libs_src / name, top / "site" / "nvidia_pytriton.libs" / name)
    # libtritonserver is unstripped in the wheel: 31 -> 21 MB.
    for name in libs:
        if name.startswith("libtritonserver") and shutil.which("strip"):
            subprocess.run(["strip", "--strip-unneeded", str(top / "site" / "nvidia_pytriton.libs" / name)], check=True)

    wheels = download_wheels(python, wheel_cache or (stage_dir / "wheel-download"))
    (top / "wheels").mkdir()
    for w in wheels:
        shutil.copy2(w, top / "wheels" / w.name)

    pa = paths.perf_analyzer_bin()
    if pa.is_file():
        (top / "opt" / "bin").mkdir(parents=True)
        shutil.copy2(pa, top / "opt" / "bin" / "perf_analyzer")

    files = project_files(paths.REPO_ROOT)
    for rel in files:
        dst = top / "project" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(paths.REPO_ROOT / rel, dst, follow_symlinks=False)  # `llm` is a link into backends/llm
    shutil.copy2(SERVE_SCRIPT, top / "bundle_serve.sh")
    os.chmod(top / "bundle_serve.sh", 0o755)

    manifest = {
        "python": python,
        "stub": f"site/pytriton/tritonserver/python_backend_stubs/{python}/triton_python_backend_stub",
        "libs": libs,
        "wheels": [w.name for w in wheels],
        "perf_analyzer": pa.is_file(),
        "project_files": len(files),
    }
    (top / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def write_archive(stage_dir: Path, out: Path) -> None:
    """tar + xz (multi-threaded xz when the binary is there; tarfile's lzma otherwise)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    if shutil.which("xz"):
        with open(tmp, "wb") as f:
            tar = subprocess.Popen(["tar", "-C", str(stage_dir), "-cf", "-", TOP], stdout=subprocess.PIPE)
            xz = subprocess.run(["xz", "-T0", "-9", "-c"], stdin=tar.stdout, stdout=f)
            assert tar.wait() == 0 and xz.returncode == 0, "tar | xz failed"
    else:
        with tarfile.open(tmp, "w:xz", preset=9) as tf:
            tf.add(stage_dir / TOP, arcname=TOP)
    tmp.replace(out)


def check_size(path: Path, limit: int = LIMIT_BYTES) -> int:
    size = path.stat().st_size
    if size >= limit:
        raise ValueError(f"{path} is {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit")
    return size


def build(out: Path = DEFAULT_OUT, python: str = DEFAULT_PYTHON, wheel_cache: Path | None = None,
          limit: int = LIMIT_BYTES) -> dict:
    wheel_cache = wheel_cache or paths.BUILD_DIR / "wheel-cache" / f"py{python}"
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        manifest = stage(Path(tmp), python, wheel_cache)
        write_archive(Path(tmp), out)
    manifest["archive_bytes"] = check_size(out, limit)
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=DEFAULT_PYTHON, help="the GPU host's Python X.Y (stub + wheels)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--wheel-cache", type=Path, default=None,
                    help="wheel download dir, reused when complete (default build/wheel-cache/pyX.Y)")
    args = ap.parse_args(argv)
    manifest = build(args.out, args.python, args.wheel_cache)
    print(json.dumps({k: v for k, v in manifest.items() if k != "libs"}, indent=1))
    print(f"bundle: {args.out} ({manifest['archive_bytes'] / 2**20:.1f} MiB, {len(manifest['libs'])} libs)")


if __name__ == "__main__":
    main()
