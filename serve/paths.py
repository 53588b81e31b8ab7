"""Where things live. Each location is defined once here; everything else imports it."""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
PROJECT_BACKENDS = REPO_ROOT / "backends"  # our Python-based backends (backends/<name>/model.py)
BUILD_DIR = REPO_ROOT / "build"
COMPILE_CACHE = BUILD_DIR / "compile-cache"  # torch.compile's caches on a plain host (serve/environment.py)
VENV = Path(os.environ.get("VENV", REPO_ROOT / ".venv")).resolve()


def site_packages() -> Path:
    """site-packages of the running interpreter (the project venv when run through it)."""
    return Path(sysconfig.get_paths()["purelib"])


def pytriton_root() -> Path:
    """The tritonserver build shipped inside the nvidia-pytriton wheel."""
    return site_packages() / "pytriton" / "tritonserver"


def pytriton_libs() -> Path:
    return site_packages() / "nvidia_pytriton.libs"


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def perf_analyzer_bin() -> Path:
    return VENV / "opt" / "bin" / "perf_analyzer"


def perf_analyzer_libs() -> Path:
    return VENV / "opt" / "lib"
