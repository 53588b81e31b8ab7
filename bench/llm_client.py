"""The closed-loop gRPC streaming client of the LLM benchmark (bench/llm.py), and the engine's
loop counters read from the server's metrics port.

`drive(url, model, prompts, osl, concurrency)` is one level: `concurrency` workers, each sending its
next request as soon as the previous one finished (tritonclient.grpc.aio, one stream per request,
ignore_eos + min_tokens so that every request produces exactly OSL tokens). Per level: TTFT, inter-token
latency per token (from the cumulative `num_output_tokens` of each response), TPOT, output tokens/s,
each request's start and TTFT, and the client's own event-loop stalls and GC pauses.
"""
from __future__ import annotations

import asyncio
import time

import numpy as np

from bench.baseline_hf import percentile
from bench.engine_inproc import per_token_gaps
from clients.llm_stream import finish_stream


def _inputs(grpcclient, prompt: str, osl: int, batch_dim: bool):
    """batch_dim: the model's max_batch_size > 0, so every input carries a leading batch axis of 1."""
    def t(name, dtype, value):
        a = np.array([value], dtype=np.object_ if dtype == "BYTES" else None)
        a = a.reshape(1, 1) if batch_dim else a
        x = grpcclient.InferInput(name, list(a.shape), dtype)
        x.set_data_from_numpy(a)
        return x

    return [
        t("text_input", "BYTES", prompt.encode()),
        t("max_tokens", "INT32", np.int32(osl)),
        t("min_tokens", "INT32", np.int32(osl)),
        t("ignore_eos", "BOOL", True),
        t("stream", "BOOL", True),
        t("exclude_input_in_output", "BOOL", True),
        t("return_num_input_tokens", "BOOL", True),
        t("return_num_output_tokens", "BOOL", True),
    ]


async def _one_request(client, model: str, prompt: str, osl: int, rid: str, batch_dim: bool) -> dict:
    import tritonclient.grpc.aio as grpcclient

    inputs = _inputs(grpcclient, prompt, osl, batch_dim)

    async def requests():
        yield {"model_name": model, "inputs": inputs, "request_id": rid, "enable_empty_final_response": True}

    t0 = time.perf_counter()
    stamps, counts, n_in, final = [], [], None, False
    responses = client.stream_infer(inputs_iterator=requests(), stream_timeout=600)
    try:
        async for result, error in responses:
            now = time.perf_counter()
            if error is not None:
                raise RuntimeError(f"request {rid}: {error}")
            resp = result.get_response()
            n_out = result.as_numpy("num_output_tokens")
            if n_out is not None:
                stamps.append(now)
                counts.append(int(n_out.reshape(-1)[0]))
                n = result.as_numpy("num_input_tokens")
                n_in = int(n.reshape(-1)[0]) if n is not None else n_in
            if resp.parameters["triton_final_response"].bool_param:
                final = True
                await finish_stream(responses)  # as the gateway does: Triton completes the call
                break
    finally:
        responses.cancel()  # a no-op once the call is complete
    assert final, f"request {rid}: stream ended without the final flag"
    assert counts and counts[-1] == osl, f"request {rid}: {counts[-1:]} tokens, expected {osl}"
    itl = per_token_gaps([stamps], [counts])  # a response carrying k new tokens after a gap g: k gaps of g/k
    # TPOT: time per output token after the first, per request (robust to coalesced responses).
    tpot = (stamps[-1] - stamps[0]) / (counts[-1] - counts[0]) if counts[-1] > counts[0] else float("nan")
    return {"t0": t0, "ttft": stamps[0] - t0, "first_tokens": counts[0], "end": stamps[-1], "tokens": counts[-1],
            "itl": itl, "tpot": tpot, "input_tokens": n_in}


async def _level(url: str, model: str, prompts: list[str], osl: int | list[int], concurrency: int) -> dict:
    """Closed loop: `concurrency` workers, each sending the next of `prompts` as soon as its previous
    request has finished. osl: per request (a list) or for all."""
    import tritonclient.grpc.aio as grpcclient

    clients = [grpcclient.InferenceServerClient(url) for _ in range(min(concurrency, 16))]
    config = await clients[0].get_model_config(model, as_json=True)
    batch_dim = int(config["config"].get("max_batch_size", 0)) > 0
    osls = osl if isinstance(osl, list) else [osl] * len(prompts)
    queue = list(enumerate(zip(prompts, osls)))
    results = []

    async def worker(w):
        client = clients[w % len(clients)]
        while queue:
            i, (p, o) = queue.pop(0)
            results.append(await _one_request(client, model, p, o, f"w{w}-{i}", batch_dim))

    stall = [0.0]  # the client's longest event-loop stall: responses waiting on the client, not the server

    async def watchdog():
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            stall[0] = max(stall[0], time.perf_counter() - t - 0.01)

    wd = asyncio.create_task(watchdog())
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    wd.cancel()
    for c in clients:
        await c.close()
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "itl_mean_s": float(np.mean(itl)) if itl else float("nan"), "client_loop_stall_max_s": stall[0],
            "tpot_p50_s": percentile([r["tpot"] for r in results], 50),
            # Each request's (start after the level's start, TTFT, tokens in its first response), in
            # start order: whether a slow first token is the level's first request, or random, and
            # whether it came late with many tokens (text held back) or alone (delivery).
            "ttft_each_s": [[round(r["t0"] - t0, 4), round(r["ttft"], 4), r["first_tokens"]]
                            for r in sorted(results, key=lambda r: r["t0"])],
            "input_tokens_mean": float(np.mean([r["input_tokens"] or 0 for r in results]))}


def drive(url: str, model: str, prompts: list[str], osl: int | list[int], concurrency: int) -> dict:
    """One closed-loop level. The client's own garbage-collector pauses are timed (a pause stalls
    every stream's delivery, which the client would record as the server's latency) and reported."""
    import gc

    from llm.gc_pauses import GcWatch

    gc.collect()  # start every level with an empty young heap
    watch = GcWatch(threshold_s=float("inf"))
    watch.install()
    try:
        r = asyncio.run(_level(url, model, prompts, osl, concurrency))
    finally:
        watch.remove()
    return r | {"client_gc_pause_s": watch.total_s, "client_gc_longest_s": watch.longest_s}


ENGINE_COUNTERS = ("llm_engine_steps_total", "llm_engine_host_seconds_total", "llm_engine_device_wait_seconds_total",
                   "llm_gc_pause_seconds_total", "llm_engine_device_idle_seconds_total")


def engine_counters(metrics_url: str, model: str) -> dict[str, float]:
    """The engine-loop counters of `model` from the server's metrics port (backends/llm/model.py)."""
    import re
    import urllib.request

    time.sleep(0.2)  # the engine publishes its counters every metrics_interval_s
    with urllib.request.urlopen(metrics_url, timeout=5) as f:
        text = f.read().decode()
    out = {}
    for name in ENGINE_COUNTERS:
        m = re.search(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


def engine_split(before: dict, after: dict) -> dict:
    """Per level, from the engine's counters: steps, host, device-wait and device-idle ms per step, GC pauses."""
    d = {k: after[k] - before[k] for k in ENGINE_COUNTERS}
    steps = max(1.0, d["llm_engine_steps_total"])
    return {"engine_steps": int(d["llm_engine_steps_total"]),
            "engine_host_ms_per_step": 1e3 * d["llm_engine_host_seconds_total"] / steps,
            "engine_wait_ms_per_step": 1e3 * d["llm_engine_device_wait_seconds_total"] / steps,
            "engine_idle_ms_per_step": 1e3 * d["llm_engine_device_idle_seconds_total"] / steps,
            "gc_pause_s": d["llm_gc_pause_seconds_total"]}
