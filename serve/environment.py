"""What the tritonserver process and its Python backend stubs need around them.

- a backends directory: the Python backend from the pytriton wheel, the stub built for *this*
  interpreter's Python version, and our own Python-based backends (backends/<name>/model.py);
- an environment: the model venv's bin/ first on PATH (the stub embeds the `python3` it finds
  there; PYTHONPATH does not reach it) and the wheel's libraries on LD_LIBRARY_PATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from serve import paths

STUB_NAME = "triton_python_backend_stub"
# Set by the offline bundle (serve/bundle.py): an unpacked tritonserver tree instead of site-packages.
SERVER_ROOT_ENV = "TRITONSERVER_ROOT"
SERVER_LIBS_ENV = "TRITONSERVER_LIBS"
# torch.compile's on-disk caches: inductor's compiled graphs and autotuning results, and OpenAI Triton's
# kernel binaries. Kept across restarts so a server with compiled models (llm `compile`, torch_encoder
# `compile`) starts warm; an environment that sets them (the container) keeps its own.
COMPILE_CACHE_ENVS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


class SetupError(RuntimeError):
    """The host is not ready to run the server; the message says how to fix it."""


def server_root() -> Path:
    return Path(os.environ.get(SERVER_ROOT_ENV) or paths.pytriton_root())


def server_libs() -> Path:
    return Path(os.environ.get(SERVER_LIBS_ENV) or paths.pytriton_libs())


def tritonserver_bin() -> Path:
    binary = server_root() / "bin" / "tritonserver"
    if not binary.exists():
        raise SetupError(f"tritonserver not found at {binary}; run `make setup` (installs nvidia-pytriton==0.7.0)")
    return binary


def stub_for(version: str) -> Path:
    return server_root() / "python_backend_stubs" / version / STUB_NAME


def model_python_bin(model_env: Path | None = None) -> Path:
    """The bin/ of the environment models run in: `model_env` (a venv), else this interpreter's."""
    return Path(model_env) / "bin" if model_env else Path(sys.executable).parent


def server_env(model_env: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(model_python_bin(model_env)), env.get("PATH", "/usr/bin:/bin")])
    libs = [str(server_libs())] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    env.pop("PYTHONPATH", None)  # it does not reach the stub anyway; keep the two sides alike
    return with_compile_cache(env)


def with_compile_cache(env: dict[str, str]) -> dict[str, str]:
    """env with the compile caches set (under build/compile-cache/ unless env names them)."""
    for name, sub in COMPILE_CACHE_ENVS.items():
        env.setdefault(name, str(paths.COMPILE_CACHE / sub))
    return env


@dataclass(frozen=True)
class ModelPython:
    """The interpreter the stub will embed: the first `python3` on the server's PATH."""

    executable: str
    version: str  # X.Y: picks the stub
    numpy: str
    libdir: str  # sysconfig LIBDIR: where a shared build keeps its libpython
    soname: str  # e.g. libpython3.11.so.1.0 ('' for a static build)

    @property
    def shared_libpython(self) -> Path | None:
        path = Path(self.libdir) / self.soname if self.soname else None
        return path if path and path.exists() else None


PROBE = (
    "import sys, sysconfig, numpy; v = sysconfig.get_config_var; "
    "print(sys.executable, '%d.%d' % sys.version_info[:2], numpy.__version__, v('LIBDIR') or '-', v('INSTSONAME') or '-')"
)


def probe_model_python(env: dict[str, str]) -> ModelPython:
    python3 = shutil.which("python3", path=env["PATH"])
    if python3 is None:
        raise SetupError(f"no python3 on PATH {env['PATH']}")
    out = subprocess.run([python3, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SetupError(f"numpy is not importable by {python3}: {out.stderr.strip()[-300:]}; run `make setup`")
    executable, version, numpy_version, libdir, soname = out.stdout.split()
    return ModelPython(python3, version, numpy_version, libdir.strip("-"), soname.strip("-"))


def check_model_python(env: dict[str, str]) -> ModelPython:
    """Probe the model environment and refuse numpy >= 2 in it."""
    return require_numpy_below_2(probe_model_python(env))


def require_numpy_below_2(model: ModelPython) -> ModelPython:
    if int(model.numpy.split(".")[0]) >= 2:
        raise SetupError(
            f"numpy {model.numpy} is in the model environment ({model.executable}); Triton 2.51's Python backend "
            "stub silently reads wrong input data and returns empty outputs with numpy >= 2. "
            "Fix: pip install 'numpy<2' into that environment (make setup pins numpy==1.26.4)."
        )
    return model


def with_libpython(env: dict[str, str], model: ModelPython) -> dict[str, str]:
    """Make the stub load the model interpreter's own libpython.

    The stub links `libpython3.X.so.1.0` by name; left alone the loader may find another build of the
    same minor version (here Debian's 3.11.2 beside pyenv's 3.11.7), whose ABI does not match the
    venv's stdlib extension modules (`_ssl`: undefined symbol). A shared build's LIBDIR goes first.
    """
    if model.shared_libpython is None:
        return env
    env = dict(env)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([model.libdir, env["LD_LIBRARY_PATH"]])
    return env


def assemble_backends(python_version: str, dest: Path | None = None) -> Path:
    """Build (or reuse) the backends directory passed as --backend-directory. Returns it.

    The stub must be the one built for the model environment's Python X.Y (it embeds libpython).
    """
    dest = dest or paths.BUILD_DIR / f"backends-py{python_version}"
    python_src = server_root() / "backends" / "python"
    stub = stub_for(python_version)
    if not stub.exists():
        raise SetupError(
            f"no Python backend stub for Python {python_version} at {stub}; "
            f"available: {sorted(p.name for p in stub.parent.parent.glob('*'))}"
        )
    python_dst = dest / "python"
    if not (python_dst / STUB_NAME).exists():
        # Build in a temp dir and rename: several servers (tests, helpers) may start at once.
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".python-"))
        for f in python_src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        shutil.copy2(stub, tmp / STUB_NAME)
        try:
            tmp.rename(python_dst)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    for backend in sorted(paths.PROJECT_BACKENDS.glob("*/model.py")):
        link = dest / backend.parent.name
        if not link.exists():
            try:
                link.symlink_to(backend.parent.resolve(), target_is_directory=True)
            except FileExistsError:
                pass
    return dest
