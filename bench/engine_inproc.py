"""Our engine in process (no Triton): the one in-process LLM benchmark.

- `random_engine`: an Engine over a random-weight model of a benchmark shape, built on the device
  (no weights written to disk; the tokenizer comes from a weightless checkpoint directory).
- `decode_sweep`: the runner's decode step (CUDA graph per batch bucket) timed at batch sizes 1..64
  with every row at `context`: the engine's ceiling for tokens/s. `profile_decode`: torch.profiler
  tables of a few steps. `prefill_step`: one prompt's prefill step (what idle TTFT is made of), timed
  back to back and after idle gaps (GPU clocks), with a profiler table.
- `closed_loop`: `concurrency` streams kept busy (a finished request is replaced at once) over a
  list of (isl, osl) requests after a warm-up wave; TTFT / ITL p50 and p99, output tokens/s and the
  engine's host time per step. `idle_ttft`: median TTFT of single requests on an idle engine.

    python -m bench.engine_inproc --shape tinyllama-1.1b --batches 1 8 32 64 --workload 128:256 chat
    python -m bench.engine_inproc --shape tiny --device cpu --batches 1 4 --concurrency 4 --workload 32:16
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from bench import host_work
from bench.baseline_hf import percentile
from bench.workloads import lengths, parse_workload, requests_for


def random_engine(shape: str, device: str = "cuda", seed: int = 0, **settings):
    """Engine(settings) over a random-weight model of export/random_llm.py SHAPES[shape]."""
    import torch

    from export.random_llm import random_state_dict, write_random_checkpoint
    from llm import model as llm_model
    from llm.engine import Engine
    from llm.runner import resolve_dtype
    from llm.settings import EngineSettings

    ckpt = write_random_checkpoint(Path(tempfile.mkdtemp(prefix=f"ckpt-{shape}-")), shape, weights=False)
    s = EngineSettings(**{**settings, "checkpoint": str(ckpt)})
    dev = torch.device(device)
    dtype = resolve_dtype(s.dtype, dev)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(ckpt)
    a = llm_model.ModelArgs.from_hf(hf_config)
    with torch.device("meta"):
        m = llm_model.Transformer(a, s.max_context or a.max_position_embeddings)
    sd = llm_model.hf_to_fused(random_state_dict(hf_config, str(dev), dtype, seed), a, dtype)
    missing, unexpected = m.load_state_dict(sd, strict=False, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    m.set_rope(hf_config, dtype)
    return Engine(s, device=device, model=(m.eval().requires_grad_(False), hf_config))


def _fake_decode_batch(engine, B: int, context: int):
    """B sequences whose first `context` tokens are 'computed' and whose next token is known."""
    from llm.engine import Request
    from llm.sampling import SamplingParams
    from llm.scheduler import Chunk, Sequence

    chunks = []
    for _ in range(B):
        seq = Sequence(Request(list(range(10, 11 + context)), SamplingParams(max_tokens=1), lambda o: None))
        seq.blocks = [engine.pool.allocate() for _ in range(-(-(context + 1) // engine.settings.block_size))]
        seq.num_computed = context
        chunks.append(Chunk(seq, context, 1, True))
    return chunks


def _release(engine, chunks) -> None:
    for c in chunks:
        engine.pool.release(c.seq.blocks)


def decode_sweep(engine, batches: list[int], context: int, steps: int = 50) -> list[dict]:
    """Decode-step latency at each batch size (greedy argmax and the host copy included)."""
    import torch

    out = []
    for B in batches:
        chunks = _fake_decode_batch(engine, B, context)
        step = _step_fn(engine, chunks)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        _release(engine, chunks)
        out.append({"batch": B, "context": context, "step_s": dt, "tokens_per_s": B / dt})
    return out


def _step_fn(engine, chunks):
    """One runner step over `chunks` with greedy argmax; .tolist() waits for the device."""
    return lambda: engine.runner.forward(chunks, None)[0].argmax(-1).tolist()


def _profile_tables(step, steps: int, top: int) -> dict:
    """Top CUDA kernels and CPU ops of `steps` calls of step() (as tables)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    ka = prof.key_averages()
    return {"cuda_table": ka.table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=60),
            "cpu_table": ka.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)}


def profile_decode(engine, B: int, context: int, steps: int = 10, top: int = 15) -> dict:
    """Top CUDA kernels and CPU ops of `steps` decode steps (as tables)."""
    chunks = _fake_decode_batch(engine, B, context)
    step = _step_fn(engine, chunks)
    for _ in range(3):
        step()
    tables = _profile_tables(step, steps, top)
    _release(engine, chunks)
    return {"batch": B, "context": context, "steps": steps, **tables}


def prefill_step(engine, n: int, cached: int = 0, steps: int = 10, gap_s: float = 0.2, top: int = 15) -> dict:
    """An n-token prompt's prefill chunk [cached, n) through runner.forward (greedy argmax and the
    host copy included; cached > 0: its first `cached` tokens' keys/values are in the cache, a prefix
    hit): median step time back to back, then each step after `gap_s` of GPU idleness (an idle
    server's single requests), and the profiler tables of `steps` back-to-back steps."""
    from llm.engine import Request
    from llm.sampling import SamplingParams
    from llm.scheduler import Chunk, Sequence

    ids = [10 + i % (engine.runner.vocab_size - 10) for i in range(n)]
    seq = Sequence(Request(ids, SamplingParams(max_tokens=1), lambda o: None))
    seq.blocks = [engine.pool.allocate() for _ in range(-(-n // engine.settings.block_size))]
    step = _step_fn(engine, [Chunk(seq, cached, n - cached, True)])

    def timed() -> float:
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    back_to_back = [timed() for _ in range(steps)]
    after_gap = []
    for _ in range(steps):
        time.sleep(gap_s)
        after_gap.append(timed())
    tables = _profile_tables(step, steps, top)
    engine.pool.release(seq.blocks)
    return {"tokens": n, "cached": cached, "steps": steps, "step_p50_s": percentile(back_to_back, 50),
            "step_min_s": min(back_to_back), "gap_s": gap_s, "after_gap_p50_s": percentile(after_gap, 50),
            "after_gap_min_s": min(after_gap), **tables}


def per_token_gaps(stamps: list[list[float]], cum: list[list[int]]) -> list[float]:
    """Inter-token latencies: a response carrying k new tokens after a gap g counts k gaps of g/k
    (responses are coalesced every stream_interval tokens)."""
    return [(tb - ta) / (cb - ca) for s, c in zip(stamps, cum) for ta, tb, ca, cb in zip(s, s[1:], c, c[1:])
            for _ in range(cb - ca) if cb > ca]


def _run(engine, requests: list[tuple[list[int], int]], concurrency: int, timeout_s: float = 900.0,
         temperature: float = 0.0) -> list[dict]:
    """Closed loop: `concurrency` requests in flight, each finished one replaced at once. The engine's
    background thread must be running. -> per request {t0, stamps, cum, error}."""
    from llm.engine import Request
    from llm.sampling import SamplingParams

    n = len(requests)
    out: list[dict] = [{} for _ in range(n)]
    lock, done, nxt, left = threading.Lock(), threading.Event(), [0], [n]

    def submit(i: int) -> None:
        ids, osl = requests[i]
        r = out[i] = {"t0": time.perf_counter(), "stamps": [], "cum": [], "error": None}

        def emit(o) -> None:  # on the engine thread: never block
            r["stamps"].append(time.perf_counter())
            r["cum"].append(o.num_output_tokens)
            if o.finished:
                r["error"] = o.error
                with lock:
                    j, nxt[0] = nxt[0], nxt[0] + 1
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
                if j < n:
                    submit(j)

        params = SamplingParams(max_tokens=osl, min_tokens=osl, ignore_eos=True, temperature=temperature)
        req = Request(ids, params, emit, arrival=r["t0"])
        req.bounded = False
        engine.submit(req)

    with lock:
        first, nxt[0] = min(concurrency, n), min(concurrency, n)
    for i in range(first):
        submit(i)
    assert done.wait(timeout_s), f"closed loop timed out after {timeout_s} s"
    return out


def closed_loop(engine, workload, concurrency: int, n_requests: int | None = None, seed: int = 0,
                temperature: float = 0.0) -> dict:
    """One level: a warm-up wave of `concurrency` requests, then n_requests (default 4 x concurrency);
    greedy, or unseeded sampling at `temperature`."""
    import torch

    n = n_requests or requests_for(concurrency)
    vocab = engine.runner.vocab_size
    g = torch.Generator().manual_seed(seed + concurrency)
    # Prompts longer than the model's context leave room for their output (only the tiny CPU model).
    reqs = [(torch.randint(10, vocab, (min(isl, engine.max_context - osl - 1),), generator=g).tolist(), osl)
            for isl, osl in lengths(workload, n + concurrency)]
    _run(engine, reqs[:concurrency], concurrency, temperature=temperature)  # warm-up wave (not measured)
    st0 = engine.stats()
    rs = _run(engine, reqs[concurrency:], concurrency, temperature=temperature)
    st1 = engine.stats()
    assert all(r["error"] is None for r in rs), [r["error"] for r in rs if r["error"]][:3]
    start, end = min(r["t0"] for r in rs), max(r["stamps"][-1] for r in rs)
    ttft = [r["stamps"][0] - r["t0"] for r in rs]
    itl = per_token_gaps([r["stamps"] for r in rs], [r["cum"] for r in rs])
    tokens = sum(r["cum"][-1] for r in rs)
    assert tokens == sum(osl for _, osl in reqs[concurrency:]), "a request produced the wrong number of tokens"
    steps = st1.steps - st0.steps
    return {"engine": "ours-inproc", "workload": "chat" if workload == "chat" else f"{workload[0]}:{workload[1]}",
            "concurrency": concurrency, "temperature": temperature, "requests": n, "failed": 0, "output_tokens": tokens,
            "span_s": end - start,
            "tokens_per_s": tokens / (end - start),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "steps": steps, "host_ms_per_step": 1e3 * (st1.host_s - st0.host_s) / max(1, steps),
            "device_idle_ms_per_step": 1e3 * (st1.device_idle_s - st0.device_idle_s) / max(1, steps),
            "preemptions": engine.scheduler.preemptions}


def _idle_prompt(engine, isl: int, seed: int) -> list[int]:
    """Random prompt ids, seeded by length too: prompts of different lengths never share a prefix
    (no prefix-cache hits between idle requests)."""
    import torch

    g = torch.Generator().manual_seed(isl * 1000 + seed)
    return torch.randint(10, engine.runner.vocab_size, (isl,), generator=g).tolist()


def idle_ttft(engine, isl: int, n: int = 20) -> dict:
    """TTFT of single requests on an idle engine (median of n)."""
    rs = []
    for i in range(n):
        r = _run(engine, [(_idle_prompt(engine, isl, i), 1)], 1)[0]
        rs.append(r["stamps"][0] - r["t0"])
    return {"isl": isl, "n": n, "ttft_p50_s": percentile(rs, 50), "ttft_min_s": min(rs)}


def idle_ttft_trace(engine, isl: int, n: int = 5) -> list[dict]:
    """Where an idle request's TTFT goes: per request, each runner.forward and engine._process call
    on the host (ms after submission) and each forward's span on the GPU (CUDA events, ms after an
    event recorded at submission; on CUDA only)."""
    import torch

    runner_forward, engine_process, calls = engine.runner.forward, engine._process, []
    cuda = engine.device.type == "cuda"
    event = lambda: torch.cuda.Event(enable_timing=True) if cuda else None  # noqa: E731

    def forward(chunks, prev_tokens):
        t, ev = time.perf_counter(), (event(), event())
        if cuda:
            ev[0].record()
        out = runner_forward(chunks, prev_tokens)
        if cuda:
            ev[1].record()
        calls.append({"call": "forward", "tokens": sum(c.n for c in chunks), "t": t, "end": time.perf_counter(), "ev": ev})
        return out

    def process(launched):
        t = time.perf_counter()
        engine_process(launched)
        calls.append({"call": "process", "t": t, "end": time.perf_counter()})

    engine.runner.forward, engine._process = forward, process
    traces = []
    try:
        for i in range(n):
            ids = _idle_prompt(engine, isl, 500 + i)  # not idle_ttft's prompts
            calls.clear()
            ev0 = event()
            if cuda:
                ev0.record()
            r = _run(engine, [(ids, 1)], 1)[0]
            if cuda:
                torch.cuda.synchronize()
            t0, ms = r["t0"], lambda t: round(1e3 * (t - r["t0"]), 3)  # noqa: E731
            rows = [{"call": c["call"], **({"tokens": c["tokens"]} if "tokens" in c else {}), "host_ms": [ms(c["t"]), ms(c["end"])],
                     **({"gpu_ms": [round(ev0.elapsed_time(c["ev"][0]), 3), round(ev0.elapsed_time(c["ev"][1]), 3)]}
                        if cuda and "ev" in c else {})} for c in calls if c["t"] >= t0]
            traces.append({"isl": isl, "ttft_ms": ms(r["stamps"][0]), "calls": rows})
    finally:
        del engine.runner.forward, engine._process  # the class's methods again
    return traces


def main(argv: list[str] | None = None) -> None:
    from export.random_llm import SHAPES
    from llm.settings import parse_overrides

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32, 64], help="decode sweep batch sizes")
    ap.add_argument("--context", type=int, default=256, help="decode sweep position")
    ap.add_argument("--profile", type=int, nargs="*", default=[], help="batch sizes to profile")
    ap.add_argument("--profile-prefill", nargs="*", default=[], metavar="N[:CACHED]",
                    help="prompt lengths to time and profile (N:CACHED: the first CACHED tokens are a prefix hit)")
    ap.add_argument("--trace-idle-ttft", type=int, nargs="*", default=[], help="prompt lengths to trace (idle_ttft_trace)")
    ap.add_argument("--workload", nargs="*", default=[], help="closed-loop workloads: ISL:OSL or chat")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default: 4 x concurrency)")
    ap.add_argument("--temperature", type=float, default=0.0, help="closed loops: 0 greedy, else unseeded sampling")
    ap.add_argument("--idle-ttft", type=int, nargs="*", default=[], help="prompt lengths for idle TTFT")
    ap.add_argument("--host-profile", type=int, default=0, metavar="C",
                    help="also time the engine thread's step phases, then cProfile it, over closed loops of the first "
                         "workload at C streams (bench/host_work.py)")
    ap.add_argument("--host-phases", type=int, nargs="*", default=[], metavar="C",
                    help="host_phases alone (no cProfile) at these stream counts too, over the first workload")
    ap.add_argument("--prefill-ab", type=int, default=0, metavar="C",
                    help="at C streams of the first workload: grouped prefill attention vs each chunk alone (host_work.prefill_ab)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine setting (llm/settings.py)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from export.llm import SHAPE_SETTINGS

    settings = {**SHAPE_SETTINGS.get(args.shape, {}), **parse_overrides(args.set)}
    t0 = time.perf_counter()
    engine = random_engine(args.shape, args.device, **settings)
    out = {"shape": args.shape, "settings": engine.settings.to_parameters(), "build_s": time.perf_counter() - t0,
           "attention": engine.runner.attention_impl, "kv_blocks": engine.pool.usable}
    print(json.dumps(out), flush=True)
    if args.device.startswith("cuda"):
        out["decode"] = decode_sweep(engine, [b for b in args.batches if b <= engine.settings.max_seqs], args.context)
        for r in out["decode"]:
            print(json.dumps(r), flush=True)
        out["profiles"] = [profile_decode(engine, B, args.context) for B in args.profile]
        out["prefill_steps"] = [prefill_step(engine, *map(int, spec.split(":"))) for spec in args.profile_prefill]
        for p in out["profiles"] + out["prefill_steps"]:
            print(json.dumps({k: v for k, v in p.items() if not k.endswith("_table")}), flush=True)
            print(p["cuda_table"], p["cpu_table"], sep="\n", flush=True)
    engine.start()
    try:
        out["levels"] = []
        for w in map(parse_workload, args.workload):
            for c in args.concurrency:
                r = closed_loop(engine, w, c, args.requests, temperature=args.temperature)
                print(json.dumps(r), flush=True)
                out["levels"].append(r)
        # The host-work diagnostics (bench/host_work.py) run over the first workload.
        first = parse_workload(args.workload[0]) if args.workload else None
        if first and args.host_profile:
            out["host_phases"] = host_work.host_phases(engine, first, args.host_profile)
            print(json.dumps(out["host_phases"]), flush=True)
            out["host_profile"] = host_work.host_profile(engine, first, args.host_profile)
            print(out["host_profile"]["table"], flush=True)
        if first and args.host_phases:
            out["host_phases_at"] = [host_work.host_phases(engine, first, c) for c in args.host_phases]
            for r in out["host_phases_at"]:
                print(json.dumps(r), flush=True)
        if first and args.prefill_ab:
            out["prefill_ab"] = host_work.prefill_ab(engine, first, args.prefill_ab)
        out["idle_ttft"] = [idle_ttft(engine, isl) for isl in args.idle_ttft]
        for r in out["idle_ttft"]:
            print(json.dumps(r), flush=True)
        out["idle_ttft_traces"] = [t for isl in args.trace_idle_ttft for t in idle_ttft_trace(engine, isl)]
        for t in out["idle_ttft_traces"]:
            print(json.dumps(t), flush=True)
    finally:
        engine.stop()
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
