"""The engine's host work per step, on any CPU: the real scheduler, input packing, sampling, text
streams and responses, with the device's work replaced by no-op CUDA-graph replays.

Each decode step takes the runner's CUDA-graph path (`_decode_graph`), whose "graph" only writes the
next token's one-hot logits (a cycle through the tiny tokenizer's vocabulary, so detokenization sees
real text); prefill steps run the tiny model eagerly and are not counted. What is left per decode
step is the Python work the engine thread does around a real GPU step (issue target: <= 0.3 ms at 64
streams). CUDA launch and pinned-copy costs are not in it.

    python -m bench.host_work --concurrency 1 64 --out results/cpu/host_work.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import timeit
from pathlib import Path
from types import SimpleNamespace

from bench.machine import cpu_name

STREAM_INTERVAL = 8  # tokens per streamed response, as the GPU benchmarks run (--set stream_interval=8)


def fake_graphs(engine) -> None:
    """Decode steps through `_decode_graph` with replays that cost nothing on the device."""
    import torch

    r = engine.runner
    r.use_graphs = True
    V = r.vocab_size
    graphs = {}
    tick = [0]

    def graph(B, nb):
        if B not in graphs:
            out = torch.zeros(B, V)

            def replay(out=out):
                tick[0] += 1
                out.zero_()
                out[:, 100 + tick[0] % (V - 200)] = 1.0
            graphs[B] = (SimpleNamespace(replay=replay), out)
        return graphs[B]

    r._graph = graph


def decode_host_ms(engine, concurrency: int, osl: int, requests: int, temperature: float = 0.0) -> float:
    """Host ms per decode-only step over a closed loop (prefill steps excluded)."""
    from bench.engine_inproc import closed_loop

    decode_s, decode_steps = [0.0], [0]
    step = engine.step

    def timed_step():
        prefill = bool(engine.waiting) or any(q.num_known - q.num_computed > 1 for q in engine.running)
        t0 = time.perf_counter()
        step()
        if not prefill:
            decode_s[0] += time.perf_counter() - t0
            decode_steps[0] += 1
    engine.step = timed_step
    closed_loop(engine, (16, osl), concurrency, requests, temperature=temperature)
    engine.step = step
    return 1e3 * decode_s[0] / max(1, decode_steps[0])


def argmax_ms(rows: int, vocab: int, number: int = 100, repeats: int = 7) -> float:
    """The sampler's greedy argmax over [rows, vocab] logits: part of host_ms_per_decode_step here, a
    kernel launch on a GPU (the no-op replays leave the logits on the CPU)."""
    import torch

    logits = torch.zeros(rows, vocab)
    return 1e3 * statistics.median(timeit.repeat(lambda: logits.argmax(dim=-1), number=number, repeat=repeats)) / number


def run(concurrency: list[int], osl: int = 256, repeats: int = 3,
        stream_interval: int = STREAM_INTERVAL, temperature: float = 0.0) -> dict:
    from bench.engine_inproc import random_engine

    out = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
           "osl": osl, "repeats": repeats, "stream_interval": stream_interval, "temperature": temperature,
           "levels": []}
    for c in concurrency:
        engine = random_engine("tiny", "cpu", max_seqs=max(concurrency), max_context=512, cpu_threads=1,
                               stream_interval=stream_interval)
        fake_graphs(engine)
        engine.start()
        try:
            decode_host_ms(engine, c, 32, c, temperature)  # warm-up
            ms = [decode_host_ms(engine, c, osl, 2 * c, temperature) for _ in range(repeats)]
        finally:
            engine.stop()
        level = {"concurrency": c, "host_ms_per_decode_step": statistics.median(ms), "repeats_ms": ms,
                 "argmax_ms": argmax_ms(c, engine.runner.vocab_size)}
        print(json.dumps(level), flush=True)
        out["levels"].append(level)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--osl", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stream-interval", type=int, default=STREAM_INTERVAL, help="tokens per streamed response")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else unseeded sampling")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    out = run(a.concurrency, a.osl, a.repeats, a.stream_interval, a.temperature)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
