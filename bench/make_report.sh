#!/usr/bin/env bash
# Regenerates results/gpu/report.md + PNGs from the committed JSON files (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
R=results/gpu
E=$R/experiments
${PYTHON:-.venv/bin/python} -m bench.report $R/llm_bench.json \
  --hf-cb $E/hfcb_llama-3.1-8b.json $E/hfcb_tinyllama-1.1b.json \
  --encoder $R/encoder_gpu.json --encoder-compare "Without torch.compile, 2 instances=$E/encoder_gpu_2instances_eager.json" "Without torch.compile, 1 instance=$E/encoder_gpu_1instance.json" \
  --compare "previous engine, stream_interval=8 (before the sender thread and the kernel reductions)=$E/llm_bench_before.json" \
            "previous engine, stream_interval=1 (one response per token)=$R/llm_bench_stream_interval1.json" \
  --experiment "8B decode, compiled=$E/ours_8b_compiled.json" "TinyLlama decode, compiled=$E/ours_tiny_compiled.json" \
               "8B prefill (eager)=$E/ours_8b_prefill.json" \
  --notes $R/notes.md --out-dir $R
