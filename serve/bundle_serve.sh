#!/usr/bin/env bash
# Unpack-and-serve for the offline bundle (built by `python -m serve.bundle`), on a GPU host with no
# package-registry access whose image already holds torch/transformers for its python3.
#
#   bash bundle_serve.sh [--setup-only] [launcher args...]     # run from the unpacked triton-bundle/ dir
#   or: tar -xJf bundle.tar.xz && triton-bundle/bundle_serve.sh --model-repository ... --grpc-port 8001
#
# What it does (idempotent; BUNDLE_VENV defaults to <bundle>/venv):
#   1. `python3 -m venv --without-pip` from the host's python3 (its version must match the bundled stub);
#   2. installs the bundled wheels (numpy 1.26.4: the 2.51 stub needs numpy < 2; grpcio, protobuf,
#      tritonclient) into the venv's site-packages by unzipping them;
#   3. copies site/ (tritonserver, Python backend, stub, libs) into that site-packages, where
#      serve.paths.pytriton_root() looks;
#   4. adds a .pth naming the host image's site-packages, AFTER the venv's own, so torch/transformers
#      come from the image while numpy 1.26.4 wins, and hides the image's numpy-2-only scipy and
#      scikit-learn (transformers would import them and crash);
#   5. puts the venv's bin first on PATH (the stub embeds the first python3 on PATH), adds the host
#      Python's LIBDIR (libpython3.X.so for the stub) to LD_LIBRARY_PATH, and starts
#      `python -m serve.launcher "$@"` from project/ (unless --setup-only; then it prints the env to source).
set -euo pipefail
BUNDLE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${BUNDLE_VENV:-$BUNDLE/venv}
HOST_PYTHON=${HOST_PYTHON:-python3}
want=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["python"])' "$BUNDLE/MANIFEST.json")
have=$("$HOST_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[[ "$want" == "$have" ]] || { echo "bundle_serve: bundle is for Python $want, host python3 is $have" >&2; exit 1; }
host_site=$("$HOST_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
host_libdir=$("$HOST_PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')

if [[ ! -f "$VENV/.bundle-ready" ]]; then
  "$HOST_PYTHON" -m venv --without-pip "$VENV"
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for whl in "$BUNDLE"/wheels/*.whl; do
    "$VENV/bin/python" -m zipfile -e "$whl" "$site"
  done
  cp -a "$BUNDLE/site/." "$site/"
  # Host packages after ours: a .pth line is appended to sys.path after the venv's site-packages.
  echo "$host_site" > "$site/zz_host_site_packages.pth"
  # The image's scipy/scikit-learn are built for numpy 2 and crash on import under numpy 1.26;
  # transformers imports sklearn whenever it is findable (generation/candidate_generator.py).
  # A None entry in sys.modules makes importlib.util.find_spec() report them absent.
  echo 'import sys; [sys.modules.setdefault(m, None) for m in ("sklearn", "scipy")]' > "$site/zz_hide_numpy2_only.pth"
  if [[ -x "$BUNDLE/opt/bin/perf_analyzer" ]]; then
    mkdir -p "$VENV/opt/bin" "$VENV/opt/lib"
    cp "$BUNDLE/opt/bin/perf_analyzer" "$VENV/opt/bin/"
    # perf_analyzer wants libb64.so.0d and libcudart.so.12: both ship in the pytriton libs.
    ln -sf "$(ls "$site"/nvidia_pytriton.libs/libb64-*.so.0d | head -1)" "$VENV/opt/lib/libb64.so.0d"
    ln -sf "$(ls "$site"/nvidia_pytriton.libs/libcudart-*.so.12* | head -1)" "$VENV/opt/lib/libcudart.so.12"
  fi
  "$VENV/bin/python" -c 'import numpy, sys; assert numpy.__version__.startswith("1."), numpy.__version__'
  touch "$VENV/.bundle-ready"
fi

export VENV
export PATH="$VENV/bin:$PATH"
export LD_LIBRARY_PATH="${host_libdir:+$host_libdir:}${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$BUNDLE/project${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--setup-only" ]]; then
  echo "export VENV='$VENV' PATH='$PATH' LD_LIBRARY_PATH='$LD_LIBRARY_PATH' PYTHONPATH='$PYTHONPATH'"
  exit 0
fi
cd "$BUNDLE/project"
exec "$VENV/bin/python" -m serve.launcher "$@"
