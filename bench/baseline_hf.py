"""transformers baselines on a random-weight model of a benchmark shape, in process:

- `naive`: `model.generate`, eager (no compile, no CUDA graphs), one request at a time: the seed
  articles' way. TTFT = a max_new_tokens=1 call; decode tokens/s from a full ISL/OSL call.
- `continuous`: transformers' own continuous batching (`generate_batch` -> ContinuousBatchingManager,
  paged attention `paged|sdpa`, with and without its CUDA-graph option), all `concurrency` requests
  submitted at once; per-token timestamps give TTFT and inter-token latency.

    python -m bench.baseline_hf --shape tinyllama-1.1b --naive --continuous --concurrency 1 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


SEED = 0


def random_model(shape: str, device: str = "cuda", dtype: str = "bfloat16", attn: str = "sdpa"):
    """LlamaForCausalLM of export/random_llm.py SHAPES[shape] with random (seeded) weights, built on the device."""
    import torch
    from transformers import LlamaForCausalLM

    from export.random_llm import hf_config

    torch.manual_seed(SEED)
    cfg = hf_config(shape, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=getattr(torch, dtype), attn_implementation=attn)
    return model.eval().requires_grad_(False)


def random_prompts(n: int, isl: int, vocab: int, seed: int = SEED) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Skip the low ids (bos/eos/pad of most tokenizers).
    return torch.randint(10, vocab, (n, isl), generator=g).tolist()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def naive(model, isl: int, osl: int, repeats: int = 3) -> dict:
    """One request at a time through `generate` (greedy, min_new_tokens=max_new_tokens: ignore EOS)."""
    import torch

    ids = torch.tensor(random_prompts(1, isl, model.config.vocab_size), device=model.device)
    kw = dict(do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up: kernels, allocator
    ttfts = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize()
        ttfts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=osl, min_new_tokens=osl, **kw)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    n = out.shape[1] - isl
    assert n == osl, f"generated {n} tokens, asked {osl}"
    ttft = statistics.median(ttfts)
    return {"isl": isl, "osl": osl, "ttft_s": ttft, "total_s": total,
            "tokens_per_s": n / total, "decode_tokens_per_s": (n - 1) / max(total - ttft, 1e-9)}


def static_compiled(model, isl: int, osl: int, batch: int = 1, repeats: int = 3) -> dict:
    """transformers' fastest documented single-stream path: a static KV cache, with which `generate`
    torch.compiles the forward itself (generation_config.compile_config: fullgraph, CUDA graphs).
    The first calls compile (timed as compile_s)."""
    import torch

    ids = torch.tensor(random_prompts(batch, isl, model.config.vocab_size), device=model.device)
    kw = dict(do_sample=False, pad_token_id=0, cache_implementation="static", max_new_tokens=osl, min_new_tokens=osl)
    t0 = time.perf_counter()
    model.generate(ids, **kw)  # compile + capture
    model.generate(ids, **kw)
    compile_s = time.perf_counter() - t0
    totals = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize()
        totals.append(time.perf_counter() - t0)
    n = out.shape[1] - isl
    assert n == osl, f"generated {n} tokens, asked {osl}"
    total = statistics.median(totals)
    return {"isl": isl, "osl": osl, "batch": batch, "compile_s": compile_s, "total_s": total,
            "tokens_per_s": batch * n / total}


def continuous(model, isl: int, osl: int, concurrency: int, cuda_graph: bool, memory_fraction: float = 0.5) -> dict:
    """transformers continuous batching: `concurrency` requests submitted at once."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    prompts = random_prompts(concurrency, isl, model.config.vocab_size, seed=SEED + concurrency)
    gen = GenerationConfig(max_new_tokens=osl, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(use_cuda_graph=cuda_graph, max_memory_percent=memory_fraction,
                                  max_requests_per_batch=max(concurrency, 1))
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=cb,
                                   record_timestamps=True)
    wall = time.perf_counter() - t0
    assert len(results) == concurrency, f"{len(results)} results for {concurrency} requests"
    ttft, itl, tokens, first, last = [], [], 0, float("inf"), 0.0
    for r in results.values():
        assert r.error is None, r.error
        ts = r.timestamps or []
        tokens += len(r.generated_tokens)
        if ts:
            ttft.append(ts[0] - r.created_time)
            itl += [b - a for a, b in zip(ts, ts[1:])]
            first, last = min(first, r.created_time), max(last, ts[-1])
    span = last - first
    return {"engine": "transformers-cb", "cuda_graph": cuda_graph, "isl": isl, "osl": osl,
            "concurrency": concurrency, "output_tokens": tokens, "span_s": span, "wall_s_with_warmup": wall,
            "tokens_per_s": tokens / span if span > 0 else float("nan"),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99)}


def main(argv: list[str] | None = None) -> None:
    import dataclasses

    from bench.roofline import shape_args
    from export.random_llm import BENCH_SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=BENCH_SHAPES, default="tinyllama-1.1b")
    ap.add_argument("--static-compiled", action="store_true", help="static cache + torch.compile, batch 1")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=256)
    ap.add_argument("--naive", action="store_true")
    ap.add_argument("--continuous", action="store_true")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--cuda-graph", choices=("on", "off", "both"), default="both")
    ap.add_argument("--out", default=None, help="JSON file")
    args = ap.parse_args(argv)
    shape = args.shape
    args_ = shape_args(shape)
    out = {"shape": {"name": shape, **dataclasses.asdict(args_), "params": args_.num_params()}, "naive": None,
           "continuous": []}
    if args.naive:
        model = random_model(shape)
        out["naive"] = naive(model, args.isl, args.osl)
        print(json.dumps(out["naive"]), flush=True)
        del model
    if args.static_compiled:
        model = random_model(shape)
        out["static_compiled"] = static_compiled(model, args.isl, args.osl)
        print(json.dumps(out["static_compiled"]), flush=True)
        del model
    if args.continuous:
        model = random_model(shape, attn="paged|sdpa")
        graphs = {"on": [True], "off": [False], "both": [False, True]}[args.cuda_graph]
        for g in graphs:
            for c in args.concurrency:
                r = continuous(model, args.isl, args.osl, c, g)
                out["continuous"].append(r)
                print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
