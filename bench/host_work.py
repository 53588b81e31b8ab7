"""The engine's host work per step, on any CPU: the real scheduler, input packing, sampling, text
streams and responses, with the device's work replaced by no-op CUDA-graph replays.

Each decode step takes the runner's CUDA-graph path (`_decode_graph`), whose "graph" only writes the
next token's one-hot logits (a cycle through the tiny tokenizer's vocabulary, so detokenization sees
real text); prefill steps run the tiny model eagerly and are not counted. What is left per decode
step is the Python work the engine thread does around a real GPU step (issue target: <= 0.3 ms at 64
streams). CUDA launch and pinned-copy costs are not in it.

Two diagnostics of any engine (here, and on a GPU through `bench.engine_inproc --host-profile C`):
`host_phases` times the parts of every step (schedule, forward, sample, the rest of the launch,
processing) per kind of step (decode only, or with a prompt chunk) without a profiler, and
`host_profile` runs cProfile around every step (shares, not sums: it inflates Python ~2x).

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


# The parts of an engine step that host_phases times (engine.py: _step): the scheduler; _launch,
# made of the runner's forward, the sampler and the rest (scheduler bookkeeping, the copy of the
# tokens to the host); _process, the previous step's tokens into text streams and responses.
PARTS = ("schedule", "forward", "sample", "launch", "process")


def host_phases(engine, workload, concurrency: int, temperature: float = 0.0, seed: int = 0) -> dict:
    """Where the engine thread's host time goes, without a profiler's inflation: one closed loop with
    timers around the parts of every step, per kind of step launched (`decode`: decode rows only,
    the CUDA-graph path on a GPU; `mixed`: with a prompt chunk; `none`: nothing launched). Times
    exclude the waits for the device, as the engine's host_s does. -> ms per step of each kind."""
    from bench.engine_inproc import closed_loop

    runner, sched = engine.runner, engine.scheduler
    cur, kind, kinds, wrapped = dict.fromkeys(PARTS, 0.0), ["none"], {}, []

    def timed(obj, name: str, part: str, classify: bool = False) -> None:
        fn = getattr(obj, name)

        def wrapper(*args):
            if classify:  # runner.forward(chunks, prev_tokens)
                kind[0] = "decode" if all(c.n == 1 for c in args[0]) else "mixed"
            t0, w0 = time.perf_counter(), engine._wait_s
            try:
                return fn(*args)
            finally:
                cur[part] += time.perf_counter() - t0 - (engine._wait_s - w0)
        setattr(obj, name, wrapper)  # called as self.<name>(...): the instance attribute wins
        wrapped.append((obj, name))

    step = engine.step

    def timed_step():
        kind[0] = "none"
        cur.update(dict.fromkeys(PARTS, 0.0))
        t0, w0 = time.perf_counter(), engine._wait_s
        step()
        b = kinds.setdefault(kind[0], dict.fromkeys(("steps", "total", *PARTS), 0.0))
        b["steps"] += 1
        b["total"] += time.perf_counter() - t0 - (engine._wait_s - w0)
        for p in PARTS:
            b[p] += cur[p]

    timed(sched, "schedule", "schedule")
    timed(runner, "forward", "forward", classify=True)
    timed(engine, "_sample", "sample")
    timed(engine, "_launch", "launch")
    timed(engine, "_process", "process")
    engine.step = timed_step
    wrapped.append((engine, "step"))
    try:
        r = closed_loop(engine, workload, concurrency, seed=seed, temperature=temperature)
    finally:
        for obj, name in wrapped:
            delattr(obj, name)

    def per_step(b: dict) -> dict:
        n, ms = int(b["steps"]), lambda s: 1e3 * s / max(1, b["steps"])  # noqa: E731
        return {"steps": n, "host_ms": ms(b["total"]), "schedule_ms": ms(b["schedule"]),
                "forward_ms": ms(b["forward"]), "sample_ms": ms(b["sample"]),
                "launch_other_ms": ms(b["launch"] - b["forward"] - b["sample"]), "process_ms": ms(b["process"]),
                "step_other_ms": ms(b["total"] - b["schedule"] - b["launch"] - b["process"])}

    total = {k: sum(b[k] for b in kinds.values()) for k in ("steps", "total", *PARTS)}
    return {"concurrency": concurrency, "workload": r["workload"], "seed": seed,
            "loop": {k: r[k] for k in LOOP_KEYS}, "all": per_step(total),
            "kinds": {k: per_step(b) for k, b in sorted(kinds.items())}}


LOOP_KEYS = ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "device_idle_ms_per_step")


def prefill_ab(engine, workload, concurrency: int, repeats: int = 2, seed: int = 1000) -> list[dict]:
    """Grouped prefill attention (llm/attention.py group_prefill) against every chunk attending alone, on
    one engine, alternating, `repeats` rounds. Each variant runs `host_phases` twice on one fresh seed:
    `fresh` (distinct prompts) and then `cached` (the same prompts again: each hits the prefix cache
    for all its full blocks, so a wave's chunks are short and come in one step)."""
    from llm import attention

    grouped = attention.group_prefill
    out = []
    for rep in range(repeats):
        for variant in ("alone", "grouped"):
            if variant == "alone":
                attention.group_prefill = lambda specs, bs: ([], list(range(len(specs))))  # noqa: E731
            try:
                s = seed + 10 * len(out)
                for prompts in ("fresh", "cached"):
                    r = host_phases(engine, workload, concurrency, seed=s)
                    out.append({"variant": variant, "round": rep, "prompts": prompts, **r})
                    mixed = r["kinds"].get("mixed", {})
                    print(json.dumps({k: out[-1][k] for k in ("variant", "round", "prompts", "loop")}
                                     | {"mixed_steps": mixed.get("steps"), "mixed_host_ms": mixed.get("host_ms")}), flush=True)
            finally:
                attention.group_prefill = grouped
    return out


def host_profile(engine, workload, concurrency: int, top: int = 30) -> dict:
    """Where the engine thread's host time goes: one closed loop with cProfile around every step
    (on the engine thread). The profiler inflates Python time ~2x: read the shares, not the sums."""
    import cProfile
    import io
    import pstats

    from bench.engine_inproc import closed_loop

    prof, step = cProfile.Profile(), engine.step

    def profiled_step():
        prof.enable()
        try:
            step()
        finally:
            prof.disable()
    engine.step = profiled_step  # the loop calls self.step(): the instance attribute wins
    try:
        r = closed_loop(engine, workload, concurrency)
    finally:
        del engine.step
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return {"concurrency": concurrency, "workload": r["workload"], "steps": r["steps"],
            "profiled_host_ms_per_step": r["host_ms_per_step"], "table": text.getvalue()}


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
            phases = host_phases(engine, (16, osl), c, temperature)
        finally:
            engine.stop()
        level = {"concurrency": c, "host_ms_per_decode_step": statistics.median(ms), "repeats_ms": ms,
                 "argmax_ms": argmax_ms(c, engine.runner.vocab_size), "phases": phases["kinds"]}
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
