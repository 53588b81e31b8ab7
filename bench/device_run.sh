#!/usr/bin/env bash
# One lent-GPU call: unpack the offline bundle, check it, then run the named measurement stages.
# Every stage is bounded by its own timeout and logs to $OUT/log.txt; stage JSON files are packed into
# $OUT/results.tar.gz at the end (the device tool returns at most 8 files).
#
#   bash bench/device_run.sh gputests ours8b ourstiny bench      (from the repo root)
#
# Random-weight models are built on the device (nothing downloaded or carried). Stages:
#   env       GPU, driver, versions            smoke     bundle -> server -> GPU python model over gRPC
#   gputests  pytest -m gpu (attention kernel vs torch, engine on GPU vs transformers; needs .whl pytest)
#   roofline  copy bandwidth                   ours8b/ourstiny  in-process engine: decode sweep, profiles,
#                                              closed loops (128:256, 2048:256, chat), idle TTFT
#   ours8b8k  64 streams of 7680:256 on 8B within a 40 GiB KV budget (preemption, nothing refused)
#   hfnaive   transformers generate, 1 req     hfcb      transformers continuous batching (graphs off/on)
#   hfstatic  transformers generate with a static cache (generate compiles the forward itself)
#   bench     python -m bench.llm (Triton end to end; BENCH_ARGS, BENCH_OUT)
#   encoder   MiniLM torch-fp16 CUDA-graph model through Triton (perf_analyzer)
#   eager8b   the decode sweep with compile=false (eager kernels in the graphs), against ours8b (compiled)
#   ready8b   server start-up of the 8B model (bench.ready_time; READY_ARGS="--cache DIR": a given cache)
#   readyenc  the compiled MiniLM encoder's start-up, empty then warm compile cache
#   hostprof  8B in process, 64 streams of 128:256: the engine thread's host work, then a cProfile of it;
#             host_phases at 1 stream too
#             (first the CPU harness bench.host_work on this host's CPU: the same Python, no GPU)
#   prefillab 8B in process, 64 streams of 128:256: grouped prefill attention vs each chunk alone
#             (fresh prompts, then the same prompts again: prefix-cache hits), alternating, two rounds
#             (PREFILLAB_WORKLOAD=chat: the seeded chat-shaped length mix instead)
#   sampled   8B in process, 1 and 64 streams of 128:256 sampling at temperature 0.7 (unseeded)
#   budget    step_token_budget sweep: 64 streams of 2048:256 in process (BUDGETS="1024 2048 4096")
set -uo pipefail
OUT=${OUT:-/tmp/out}
RES=/tmp/res
mkdir -p "$OUT" "$RES"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
REPO=$(pwd)
IMAGE_PY=$(command -v python3)
t_start=$(date +%s)

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - t_start ))s] $*" | tee -a "$LOG"; }
stage() {  # stage NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  log "== $name (timeout ${t}s): $*"
  timeout -k 10 "$t" "$@" >>"$LOG" 2>&1
  local rc=$?
  log "== $name rc=$rc"
  tar -czf "$OUT/results.tar.gz" -C "$RES" .  # after every stage: a timeout later loses nothing
  return $rc
}

log "device_run: stages $*"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv >>"$LOG" 2>&1
"$IMAGE_PY" - >"$RES/env.json" 2>>"$LOG" <<'PY'
import json, platform, torch, transformers, numpy
print(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "transformers": transformers.__version__, "python": platform.python_version(),
                  "image_numpy": numpy.__version__, "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
                  "gpu_mem_bytes": torch.cuda.get_device_properties(0).total_memory}))
PY
cat "$RES/env.json" | tee -a "$LOG"

# The bundle: unpack and set up its venv (numpy 1.26.4 first, the image's site-packages after).
BUNDLE_TGZ=${BUNDLE_TGZ:-.bundle/bundle.tar.xz}
if [[ -f "$BUNDLE_TGZ" ]]; then
  t0=$(date +%s)
  # This checkout's bundle_serve.sh replaces the packed one (newer while iterating).
  tar -xJf "$BUNDLE_TGZ" -C /tmp && cp serve/bundle_serve.sh /tmp/triton-bundle/ && eval "$(bash /tmp/triton-bundle/bundle_serve.sh --setup-only)" \
    && log "bundle unpacked and set up in $(( $(date +%s) - t0 ))s: python3=$(command -v python3)" \
    || log "bundle setup FAILED"
  # Run the project's code from this checkout (it is newer than the bundle's copy when iterating).
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
VPY=$(command -v python3)
# One torch.compile cache for every stage, where the launcher keeps it (serve/environment.py): the
# in-process stages and later server starts find what the first compile left.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$REPO/build/compile-cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$REPO/build/compile-cache/triton}

for s in "$@"; do
  case $s in
    smoke) stage smoke 180 "$VPY" -m bench.smoke --workdir /tmp/smoke && cp /tmp/smoke/smoke-server.log "$RES/" ;;
    roofline) stage roofline 120 "$VPY" -c "import json; from bench.roofline import copy_bandwidth; print(json.dumps(copy_bandwidth()))" \
                && grep '^{"bytes"' "$LOG" | tail -1 >"$RES/copy_bandwidth.json" ;;
    gputests) stage gputests 300 "$VPY" -m pytest -q -m gpu -p no:cacheprovider tests/test_llm_attention.py tests/test_llm_activation.py tests/test_llm_engine.py ;;
    ours8b) stage ours8b 420 "$VPY" -m bench.engine_inproc --shape llama-3.1-8b --batches 1 8 32 64 --context 256 \
              ${OURS8B_ARGS:---profile 1 64 --workload 128:256 2048:256 chat --concurrency 1 8 64 --idle-ttft 128 2048} \
              --out "$RES/ours_llama-3.1-8b.json" ;;
    ours8b8k) stage ours8b8k 300 "$VPY" -m bench.engine_inproc --shape llama-3.1-8b --batches --set max_context=8448 \
              --set kv_cache_budget_mb=40960 --workload 7680:256 --concurrency 64 --requests 64 \
              --out "$RES/ours_llama-3.1-8b_8k_40GiB.json" ;;
    ourstiny) stage ourstiny 300 "$VPY" -m bench.engine_inproc --shape tinyllama-1.1b --batches 1 8 32 64 --context 256 \
              --profile 1 --workload 128:256 --concurrency 1 64 --idle-ttft 128 ${OURS_ARGS:-} \
              --out "$RES/ours_tinyllama-1.1b.json" ;;
    hfnaive) for sh in tinyllama-1.1b llama-3.1-8b; do
               stage "hfnaive-$sh" 200 "$VPY" -m bench.baseline_hf --shape $sh --naive --out "$RES/hfnaive_$sh.json"
             done ;;
    hfstatic) stage hfstatic-8b 300 "$VPY" -m bench.baseline_hf --shape llama-3.1-8b --static-compiled \
                --out "$RES/hfstatic_llama-3.1-8b.json" ;;
    hfcb) stage hfcb-8b 300 "$VPY" -m bench.baseline_hf --shape llama-3.1-8b --continuous --concurrency 1 64 \
            --cuda-graph both --out "$RES/hfcb_llama-3.1-8b.json"
          stage hfcb-tiny 150 "$VPY" -m bench.baseline_hf --shape tinyllama-1.1b --continuous --concurrency 1 \
            --cuda-graph on --out "$RES/hfcb_tinyllama-1.1b.json" ;;
    bench) stage bench ${BENCH_TIMEOUT:-540} "$VPY" -m bench.llm --out-dir "$OUT/${BENCH_OUT:-bench}" ${BENCH_ARGS:-} ;;
    encoder) stage encoder ${ENC_TIMEOUT:-240} "$VPY" -m bench.encoder_gpu --random-weights ${ENC_ARGS:-} --out "$OUT/encoder/encoder_gpu.json" ;;
    encinproc) stage encinproc 300 "$VPY" -m bench.encoder_gpu --inproc --out "$RES/encoder_inproc.json" ;;
    ready8b) stage ready8b ${READY_TIMEOUT:-300} "$VPY" -m bench.ready_time --llm llama-3.1-8b --starts ${READY_STARTS:-2} \
               ${READY_ARGS:-} --out "$RES/ready_time_8b.json" ;;
    readyenc) stage readyenc ${READY_TIMEOUT:-420} "$VPY" -m bench.ready_time --encoder --starts 2 --out "$RES/ready_time_encoder.json" ;;
    hostprof) stage hostcpu 90 "$VPY" -m bench.host_work --concurrency 1 64 --repeats 3 --out "$RES/host_work_cpu_harness.json"
              stage hostprof 300 "$VPY" -m bench.engine_inproc --shape llama-3.1-8b --batches --workload 128:256 \
                --concurrency 64 --host-profile 64 --host-phases 1 --set stream_interval=8 --out "$RES/host_profile_8b.json" ;;
    prefillab) stage prefillab 300 "$VPY" -m bench.engine_inproc --shape llama-3.1-8b --batches --workload ${PREFILLAB_WORKLOAD:-128:256} \
                 --concurrency 64 --prefill-ab 64 --set stream_interval=8 --out "$RES/prefill_ab_8b.json" ;;
    sampled) stage sampled 300 "$VPY" -m bench.engine_inproc --shape llama-3.1-8b --batches --workload 128:256 \
               --concurrency 1 64 --temperature 0.7 --set stream_interval=8 --out "$RES/ours_8b_sampled.json" ;;
    budget) for b in ${BUDGETS:-1024 2048 4096}; do
              stage "budget-$b" 150 "$VPY" -m bench.engine_inproc --shape llama-3.1-8b --batches --set step_token_budget=$b \
                --workload 2048:256 --concurrency 64 --requests 128 --out "$RES/budget_$b.json"
            done ;;
    eager8b) stage eager8b ${COMPILE_TIMEOUT:-300} "$VPY" -m bench.engine_inproc --shape llama-3.1-8b --batches 1 64 \
                 --context 256 --set compile=false --workload --out "$RES/ours_8b_eager.json" ;;
    *) log "unknown stage $s" ;;
  esac
done
tar -czf "$OUT/results.tar.gz" -C "$RES" . && log "results: $(ls "$RES" | tr '\n' ' ')"
log "device_run: done"
