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
from pathlib import Path

from serve import paths

STUB_NAME = "triton_python_backend_stub"
# Set by the offline bundle (serve/bundle.py): an unpacked tritonserver tree instead of site-packages.
SERVER_ROOT_ENV = "TRITONSERVER_ROOT"
SERVER_LIBS_ENV = "TRITONSERVER_LIBS"


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
    return env


def probe_model_python(env: dict[str, str]) -> tuple[str, str]:
    """(Python X.Y, numpy version) as the stub will see them: through the first `python3` on PATH."""
    python3 = shutil.which("python3", path=env["PATH"])
    if python3 is None:
        raise SetupError(f"no python3 on PATH {env['PATH']}")
    code = "import sys, numpy; print('%d.%d' % sys.version_info[:2], numpy.__version__)"
    out = subprocess.run([python3, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SetupError(f"numpy is not importable by {python3}: {out.stderr.strip()[-300:]}; run `make setup`")
    python_version, numpy_version = out.stdout.split()
    return python_version, numpy_version


def check_model_python(env: dict[str, str]) -> str:
    """Refuse numpy >= 2 in the model environment. Returns that environment's Python X.Y."""
    python_version, numpy_version = probe_model_python(env)
    if int(numpy_version.split(".")[0]) >= 2:
        python3 = shutil.which("python3", path=env["PATH"])
        raise SetupError(
            f"numpy {numpy_version} is in the model environment ({python3}); Triton 2.51's Python backend stub "
            "silently reads wrong input data and returns empty outputs with numpy >= 2. "
            "Fix: pip install 'numpy<2' into that environment (make setup pins numpy==1.26.4)."
        )
    return python_version


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
