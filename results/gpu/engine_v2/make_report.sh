#!/usr/bin/env bash
# Regenerate report.md (and the plots) of this run from its JSON files.
set -euo pipefail
cd "$(dirname "$0")/../../.."
d=results/gpu/engine_v2
.venv/bin/python -m bench.report $d/llm_bench.json --out-dir $d --notes $d/notes.md --experiment \
  "8B in process=$d/ours_llama-3.1-8b.json" "TinyLlama in process=$d/ours_tinyllama-1.1b.json" \
  "8k context, 40 GiB KV budget=$d/ours_llama-3.1-8b_8k_40GiB.json" \
  "8B in process before the decode fusion=$d/before_fusion/ours_llama-3.1-8b.json" \
  "8B in process after the JIT-stall fix=$d/after_jit_fix/ours_llama-3.1-8b.json" \
  "transformers baseline=$d/after_jit_fix/hfstatic_llama-3.1-8b.json" \
  "8B server starts, empty then warm compile cache (compiled decode before coordinate descent)=$d/compile/ready_time_8b_before_cdt.json"
