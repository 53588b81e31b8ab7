#!/usr/bin/env bash
# Build TensorRT engines inside the image whose TensorRT matches the serving container
# (docker/Dockerfile.trt: nvcr.io/nvidia/tensorrt:26.07-py3, whose TensorRT it checks against
# nvcr.io/nvidia/tritonserver:26.07-py3's at build time), on one GPU of this host. `make export-trt-docker`.
#
#   bash docker/build_engines.sh                          # fp16 engine of minilm on GPU 0
#   GPU=1 bash docker/build_engines.sh --precision int8   # any `python -m export.trt` argument
#   bash docker/build_engines.sh --check                  # manifests vs this GPU / TensorRT
#   RUN=pytest bash docker/build_engines.sh -m tensorrt tests/test_trt.py   # the TensorRT tests
#
# Needs docker with the NVIDIA container toolkit, and the ONNX models from `make export` (run on the
# host; the repository is mounted at /workspace). Engines go to model_repository_trt/.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${TRT_BUILD_IMAGE:-triton-encoder-trt-build:26.07}
GPU=${GPU:-0}
RUN=${RUN:-export}

command -v docker >/dev/null || { echo "build_engines.sh: docker not found (needs docker + NVIDIA container toolkit)" >&2; exit 2; }
docker build -f docker/Dockerfile.trt -t "$IMAGE" docker/

# One GPU per build: an engine is built for the architecture of the GPU it is built on.
args=(--rm --gpus "device=$GPU" -u "$(id -u):$(id -g)" -e HOME=/tmp -e PYTHONDONTWRITEBYTECODE=1
      -v "$PWD:/workspace" -w /workspace)
case "$RUN" in
  export) exec docker run "${args[@]}" "$IMAGE" "$@" ;;
  pytest) exec docker run "${args[@]}" --entrypoint python3 "$IMAGE" -m pytest "$@" ;;
  *) echo "build_engines.sh: RUN must be export or pytest, not '$RUN'" >&2; exit 2 ;;
esac
