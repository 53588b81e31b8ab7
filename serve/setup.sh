#!/usr/bin/env bash
# Sets up the project environment in .venv (or $VENV): pinned Python packages, the tritonserver 2.51
# binary + Python backend from the nvidia-pytriton wheel, and perf_analyzer from the tritonclient
# 2.51.0 wheel. Idempotent: a stamp holding the hash of the inputs makes a re-run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
PYTRITON_VERSION=0.7.0
PERF_ANALYZER_CLIENT_VERSION=2.51.0
stamp="$VENV/.setup-stamp"
want=$(cat requirements.txt serve/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: $VENV is up to date"; exit 0
fi

# libb64-0d: the system package perf_analyzer links against (a private symlink below covers hosts
# where apt is not usable, e.g. without root).
if ! ldconfig -p 2>/dev/null | grep -q 'libb64.so.0d'; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install libb64-0d"
    (apt-get install -y -qq libb64-0d >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq libb64-0d >/dev/null; }) \
      || echo "setup: warning: could not apt-get install libb64-0d; using the copy from the pytriton wheel"
  else
    echo "setup: libb64-0d not installed (needs root); using the copy from the pytriton wheel"
  fi
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -r requirements.txt
# The pytriton wheel only for its tritonserver build: its Python dependencies are not needed.
"${pip[@]}" install --no-deps "nvidia-pytriton==$PYTRITON_VERSION"

# perf_analyzer: the binary inside the tritonclient 2.51.0 manylinux wheel. Not its Python part,
# whose protobuf<5 pin clashes with onnx.
opt="$VENV/opt"
mkdir -p "$opt/bin" "$opt/lib" "$opt/wheels"
if [[ ! -x "$opt/bin/perf_analyzer" ]]; then
  "${pip[@]}" download --no-deps --only-binary=:all: -d "$opt/wheels" "tritonclient==$PERF_ANALYZER_CLIENT_VERSION"
  "$VENV/bin/python" - "$opt" <<'PY'
import glob, os, sys, zipfile
opt = sys.argv[1]
wheel = glob.glob(os.path.join(opt, "wheels", "tritonclient-*.whl"))[0]
with zipfile.ZipFile(wheel) as zf:
    member = next(n for n in zf.namelist() if n.endswith("/bin/perf_analyzer"))
    dst = os.path.join(opt, "bin", "perf_analyzer")
    with zf.open(member) as src, open(dst, "wb") as out:
        out.write(src.read())
    os.chmod(dst, 0o755)
PY
  rm -rf "$opt/wheels"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
b64=$(ls "$site"/nvidia_pytriton.libs/libb64-*.so.0d | head -1)
cudart=$(ls "$site"/nvidia/cuda_runtime/lib/libcudart.so.12 2>/dev/null || ls "$site"/nvidia_pytriton.libs/libcudart-*.so.12* | head -1)
ln -sf "$b64" "$opt/lib/libb64.so.0d"
ln -sf "$cudart" "$opt/lib/libcudart.so.12"
LD_LIBRARY_PATH="$opt/lib" "$opt/bin/perf_analyzer" --version >/dev/null 2>&1 || LD_LIBRARY_PATH="$opt/lib" "$opt/bin/perf_analyzer" --help >/dev/null 2>&1 || {
  echo "setup: perf_analyzer does not run:"; LD_LIBRARY_PATH="$opt/lib" ldd "$opt/bin/perf_analyzer" | grep 'not found'; exit 1; }

echo "$want" > "$stamp"
echo "setup: done ($VENV)"
