#!/usr/bin/env bash
# The same server options as serve/launcher.py, for the container: admin APIs behind a token.
# The container binds 0.0.0.0 inside; publish ports on loopback (`-p 127.0.0.1:8000:8000`) unless
# you mean to expose them.
set -euo pipefail
: "${TRITON_ADMIN_TOKEN:?set TRITON_ADMIN_TOKEN (header admin-token / gRPC triton-grpc-protocol-admin-token)}"
apis="shared-memory,model-repository,logging,trace,statistics:admin-token=${TRITON_ADMIN_TOKEN}"
exec tritonserver \
  --model-repository="${MODEL_REPOSITORY:-/models}" \
  --model-control-mode=none \
  --disable-auto-complete-config \
  --strict-readiness=true \
  --exit-timeout-secs=10 \
  --http-restricted-api="$apis" \
  --grpc-restricted-protocol="$apis" \
  --backend-config=python,shm-default-byte-size=16777216 \
  "$@"
