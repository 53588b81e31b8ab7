#!/usr/bin/env bash
# Regenerate report.md (and the plots) of this run from its JSON files. The main run is the fourth
# round's Triton run with stream_interval=8 (the issue's own measurement setting) and the final code;
# the earlier runs are compared below it.
set -euo pipefail
cd "$(dirname "$0")/../../.."
d=results/gpu/engine_v2
r=$d/round3
r4=$d/round4
.venv/bin/python -m bench.report $r4/triton_8b_si8.json --out-dir $d --notes $d/notes.md \
  --compare "round 4, after the detokenizer fix, before the prefix-prefill change (an earlier device call)=$r4/triton_8b_si8_detok_fix.json" \
  "round 4, before the detokenizer fix (an earlier device call)=$r4/triton_8b_si8_before_detok_fix.json" \
  "round 3, stream_interval=8=$r/triton_8b_si8.json" \
  "round 3, stream_interval=1 (the default)=$r/triton_8b_si1.json" \
  "round 3, diagnosis run (stream_interval=8)=$r/triton_8b_si8_diag.json" \
  "round 3, each stream cancelled after its final response (stream_interval=8)=$r/triton_8b_si8_cancel.json" \
  "first round (stream_interval=1)=$d/llm_bench.json" \
  --experiment \
  "8B server starts with the compile cache of the same call (final code)=$r/ready_time_8b_warm.json" \
  "8B server starts, empty then warm compile cache (compiled decode before coordinate descent)=$d/compile/ready_time_8b_before_cdt.json" \
  "8B in process, round 4: prefill step profile and idle-TTFT trace=$r4/ours_8b_idle_trace.json" \
  "TinyLlama in process, round 4=$r4/ours_tinyllama-1.1b.json" \
  "8B in process, round 4: decode and prefill profiles=$r4/ours_8b_profiles.json" \
  "8B in process, round 4: prefill after a cached prefix (final code)=$r4/ours_8b_prefix_prefill.json" \
  "8B in process (first round)=$d/ours_llama-3.1-8b.json" "TinyLlama in process (first round)=$d/ours_tinyllama-1.1b.json" \
  "8k context, 40 GiB KV budget=$d/ours_llama-3.1-8b_8k_40GiB.json" \
  "step_token_budget=1024, 64 streams of 2048:256 in process=$r/budget_1024.json" \
  "step_token_budget=2048 (the default), 64 streams of 2048:256 in process=$r/budget_2048.json" \
  "step_token_budget=4096, 64 streams of 2048:256 in process=$r/budget_4096.json" \
  "8B in process before the decode fusion=$d/before_fusion/ours_llama-3.1-8b.json" \
  "8B in process after the JIT-stall fix=$d/after_jit_fix/ours_llama-3.1-8b.json" \
  "transformers baseline=$d/after_jit_fix/hfstatic_llama-3.1-8b.json"
