"""In-process engine benchmark (no Triton): output tokens/s, TTFT and inter-token latency.

    python -m llm.bench --checkpoint model_repository/tiny_llama/1/checkpoint
    python -m llm.bench --checkpoint model_repository/llama8b/1/checkpoint --device cuda \
        --concurrency 1 8 32 64 --isl 128 --osl 256 --set max_slots=64 --set max_context=2304 --json out.json

Each run submits `concurrency` requests of exactly `isl` random prompt tokens at once (greedy,
ignore_eos, max_tokens=osl) and waits for all; the background engine thread serves them, as in
Triton. Library: `bench(engine, concurrency, isl, osl) -> dict`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from llm.engine import Engine, Output, Request
from llm.sampling import SamplingParams
from llm.settings import EngineSettings


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_streams(engine: Engine, prompts: list[list[int]], params: SamplingParams, timeout_s: float = 600.0):
    """Submit one streaming request per prompt at once and wait for all (stepping the engine here when
    its thread is not running). Returns (t0, response timestamps, cumulative output tokens at each
    response) per request. The engine, the in-process benchmarks and bench/engine_inproc.py share it."""
    n = len(prompts)
    done, left, lock = threading.Event(), [n], threading.Lock()
    stamps: list[list[float]] = [[] for _ in range(n)]
    cum: list[list[int]] = [[] for _ in range(n)]

    def emitter(i):
        def emit(o: Output):
            stamps[i].append(time.perf_counter())
            cum[i].append(o.num_output_tokens)
            assert o.error is None, o.error
            if o.finished:  # never block here: this runs on the engine thread
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
        return emit

    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.submit(Request(ids, params, emitter(i), stream=True, arrival=t0))
    if engine._thread is None:
        while not done.is_set():
            engine.step()
    else:
        assert done.wait(timeout_s), f"in-process run timed out after {timeout_s} s"
    return t0, stamps, cum


def per_token_gaps(stamps: list[list[float]], cum: list[list[int]]) -> list[float]:
    """Inter-token latencies: a response carrying k new tokens after a gap g counts k gaps of g/k
    (responses are coalesced every stream_interval tokens)."""
    return [(tb - ta) / (cb - ca) for s, c in zip(stamps, cum) for ta, tb, ca, cb in zip(s, s[1:], c, c[1:])
            for _ in range(cb - ca) if cb > ca]


def bench(engine: Engine, concurrency: int, isl: int, osl: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.runner.vocab_size
    prompts = [torch.randint(0, vocab, (isl,), generator=g).tolist() for _ in range(concurrency)]
    t0, stamps, cum = run_streams(engine, prompts, SamplingParams(max_tokens=osl, ignore_eos=True))
    wall = max(s[-1] for s in stamps) - t0
    ttft = [s[0] - t0 for s in stamps]
    itl = per_token_gaps(stamps, cum)
    total = sum(c[-1] for c in cum)
    return dict(concurrency=concurrency, isl=isl, osl=osl, wall_s=wall, output_tokens=total,
                output_tokens_per_s=total / wall, per_stream_tokens_per_s=total / wall / concurrency,
                ttft_p50_ms=_pct(ttft, 0.5) * 1e3, ttft_p99_ms=_pct(ttft, 0.99) * 1e3,
                itl_p50_ms=_pct(itl, 0.5) * 1e3, itl_p99_ms=_pct(itl, 0.99) * 1e3,
                itl_mean_ms=(statistics.fmean(itl) * 1e3 if itl else float("nan")))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs at the first concurrency")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine setting (llm/settings.py)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    settings = EngineSettings.from_parameters(dict(kv.split("=", 1) for kv in a.set), checkpoint=a.checkpoint)
    t = time.perf_counter()
    engine = Engine(settings, device=a.device)
    print(f"engine ready in {time.perf_counter() - t:.1f} s: {engine.runner.num_slots} slots x {engine.max_context}, "
          f"{engine.runner.dtype} on {engine.device}, graphs={engine.runner.use_graphs}")
    engine.start()
    try:
        for _ in range(a.warmup):
            bench(engine, a.concurrency[0], a.isl, min(a.osl, 16))
        results = []
        for c in a.concurrency:
            r = bench(engine, c, a.isl, a.osl)
            results.append(r)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
    finally:
        engine.stop()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(settings=settings.to_parameters(), device=str(engine.device), results=results), f, indent=2)


if __name__ == "__main__":
    main()
