"""Our engine (llm/), in process, no Triton:

- `decode_sweep`: the ModelRunner's decode step (CUDA graphs per batch bucket) timed at batch sizes
  1..64 with a random-weight model of a benchmark shape: the engine's ceiling for tokens/s.
- `profile_decode`: torch.profiler over a few decode steps -> top CUDA kernels and CPU ops tables.
- `engine_run`: a full continuous-batching Engine (scheduler, sampling, detokenization; built from a
  checkpoint by bench.llm) with `concurrency` requests of ISL/OSL submitted at once, per-response
  timestamps -> TTFT/ITL/tokens/s. Compared with the same load through Triton + gRPC this gives the
  serving overhead.

    python -m bench.engine_inproc --shape tinyllama-1.1b --batches 1 8 32 64
"""
from __future__ import annotations

import argparse
import json
import time

from bench.baseline_hf import percentile, random_model, random_prompts
from bench.shapes import SHAPES, LlamaShape


def runner_from_hf(hf_model, settings, device: str = "cuda:0"):
    """A ModelRunner over the weights of an in-memory HF model (random-weight benchmarks: no
    checkpoint written to disk). Same code path as a loaded checkpoint after `llm.model.load`."""
    import torch

    from llm import model as llm_model
    from llm import runner as llm_runner

    a = llm_model.ModelArgs.from_hf(hf_model.config)
    with torch.device("meta"):
        m = llm_model.Transformer(a, settings.max_context)
    sd = llm_model.hf_to_fused(hf_model.state_dict(), a, hf_model.dtype)
    missing, unexpected = m.load_state_dict(sd, strict=False, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    m.set_rope(hf_model.config, hf_model.dtype)
    m = m.eval().requires_grad_(False)
    original = llm_model.load
    llm_model.load = lambda *args, **kw: (m, hf_model.config)
    try:
        return llm_runner.ModelRunner(settings, "<in-memory>", device)
    finally:
        llm_model.load = original


def build_runner(shape: LlamaShape, max_slots: int, max_context: int, cuda_graphs: bool = True,
                 compile: bool = False, kv_len_min: int = 256):
    import torch

    from llm.settings import EngineSettings

    settings = EngineSettings(max_slots=max_slots, max_context=max_context, cuda_graphs=cuda_graphs,
                              kv_len_min=kv_len_min, dtype="bfloat16", compile=compile)
    hf = random_model(shape)
    runner = runner_from_hf(hf, settings)
    del hf
    torch.cuda.empty_cache()
    return runner


def decode_sweep(runner, batches: list[int], context: int, steps: int = 50) -> list[dict]:
    """Decode-step latency at each batch size with every row at position `context` (greedy argmax and
    the host copy of the next tokens included, as the engine does per step)."""
    import torch

    out = []
    for B in batches:
        assert B <= runner.num_slots, f"batch {B} > {runner.num_slots} slots"
        tokens = torch.randint(10, runner.vocab_size, (B,))
        pos = torch.full((B,), context, dtype=torch.long)
        for _ in range(5):
            runner.decode(tokens, pos, context).argmax(-1).tolist()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = runner.decode(tokens, pos, context).argmax(-1).tolist()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        assert len(nxt) == B
        out.append({"batch": B, "context": context, "step_s": dt, "tokens_per_s": B / dt})
    return out


def profile_decode(runner, B: int, context: int, steps: int = 10, top: int = 15) -> dict:
    """Top CUDA kernels and CPU ops of `steps` decode steps (as tables)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.randint(10, runner.vocab_size, (B,))
    pos = torch.full((B,), context, dtype=torch.long)
    for _ in range(3):
        runner.decode(tokens, pos, context).argmax(-1).tolist()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.decode(tokens, pos, context).argmax(-1).tolist()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    return {
        "batch": B, "context": context, "steps": steps,
        "cuda_table": ka.table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60),
        "cpu_table": ka.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60),
    }


def profile_prefill(runner, isl: int, chunk: int, repeats: int = 5, top: int = 15) -> dict:
    """One prompt of `isl` tokens prefilled in chunks of `chunk` (as the engine's prefill_chunk does):
    wall time per prompt (median of repeats) and the profiler tables of one prefill."""
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(10, runner.vocab_size, (1, isl))
    rows = torch.tensor([0])

    def once():
        for start in range(0, isl, chunk):
            n = min(chunk, isl - start)
            pos = torch.arange(start, start + n)[None]
            logits = runner.prefill(ids[:, start:start + n], pos, rows, torch.tensor([n - 1]))
        return logits.argmax(-1).tolist()

    once()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        once()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    return {"isl": isl, "chunk": chunk, "prefill_s": statistics.median(times),
            "cuda_table": ka.table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60),
            "cpu_table": ka.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)}


def engine_run(engine, isl: int, osl: int, concurrency: int, seed: int = 0) -> dict:
    """`concurrency` streaming requests of isl random token ids, ignore_eos, exactly osl tokens."""
    from llm.bench import per_token_gaps, run_streams
    from llm.sampling import SamplingParams

    prompts = random_prompts(concurrency, isl, engine.runner.vocab_size, seed=seed + concurrency)
    params = SamplingParams(max_tokens=osl, ignore_eos=True, min_tokens=osl)
    t0, stamps, cum = run_streams(engine, prompts, params)
    span = time.perf_counter() - t0
    ttft = [s[0] - t0 for s in stamps if s]
    itl = per_token_gaps(stamps, cum)
    tokens = sum(c[-1] for c in cum)
    assert tokens == osl * concurrency, f"{tokens} tokens, expected {osl * concurrency}"
    return {"engine": "ours-inproc", "isl": isl, "osl": osl, "concurrency": concurrency, "output_tokens": tokens,
            "span_s": span, "tokens_per_s": tokens / span,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--max-context", type=int, default=2048 + 256 + 64)
    ap.add_argument("--profile", type=int, nargs="*", default=[])
    ap.add_argument("--prefill", type=int, nargs="*", default=[], help="prompt lengths to time/profile prefill at")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--compile", action="store_true", help="EngineSettings.compile: torch.compile the decode step")
    ap.add_argument("--kv-len-min", type=int, default=256, help="smallest KV-length bucket (fewer buckets: fewer compiles)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    runner = build_runner(SHAPES[args.shape], max(args.batches), args.max_context, compile=args.compile,
                          kv_len_min=args.kv_len_min)
    print(json.dumps({"build_s": time.perf_counter() - t0, "compile": args.compile}), flush=True)
    out = {"shape": args.shape, "compile": args.compile, "build_s": time.perf_counter() - t0,
           "decode": decode_sweep(runner, args.batches, args.context)}
    for r in out["decode"]:
        print(json.dumps(r), flush=True)
    out["profiles"] = [profile_decode(runner, B, args.context) for B in args.profile]
    out["prefill"] = [profile_prefill(runner, n, args.prefill_chunk) for n in args.prefill]
    for p in out["prefill"]:
        print(json.dumps({k: p[k] for k in ("isl", "chunk", "prefill_s")}), flush=True)
        print(p["cuda_table"])
        print(p["cpu_table"])
    for p in out["profiles"]:
        print(p["cuda_table"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
