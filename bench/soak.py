"""`make soak`: twice the measured capacity, open loop, for minutes, through the gateway — on the
embeddings and on the streaming LLM. Not part of `make test`.

    python -m bench.soak [--minutes 3] [--out results/soak]

Per workload: capacity = completed requests/s of a 15 s closed loop (concurrency 8); then requests
arrive at 2x that rate (open loop, evenly spaced) for --minutes. Checked and reported: every request
accounted for (succeeded + refused with an overload status 429/503 = sent, nothing else), idle latency
before and 10 s after the load (median of 10 sequential requests), and the RSS of tritonserver, its
stubs and the gateway, and the /dev/shm bytes, at the start and the end of the load (flat = within 5%).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from serve.paths import MODEL_REPOSITORY, REPO_ROOT
from tests.embedding_models import link_repo
from tests.server_fixtures import start_stack

LLM, EMB = "tiny_llama", "minilm_text"
WORKLOADS = {
    "embeddings": ("/v1/embeddings", {"model": EMB, "input": [f"soak sentence {i} about the weather" for i in range(16)]}),
    "llm": ("/v1/completions", {"model": LLM, "prompt": "Once upon a time", "max_tokens": 32, "ignore_eos": True,
                                "temperature": 0, "stream": True}),
}


def rss_mb(prefix: str, gateway_pid: int) -> float:
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if prefix.encode() in (d / "cmdline").read_bytes() or int(d.name) == gateway_pid:
                total += int((d / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total / 2**20


def shm_mb(prefix: str) -> float:
    return sum(p.stat().st_size for p in Path("/dev/shm").glob(prefix + "*")) / 2**20


async def one(client: httpx.AsyncClient, path: str, body: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as r:
                async for _ in r.aiter_raw():
                    pass
                return r.status_code, time.perf_counter() - t0
        r = await client.post(path, json=body)
        return r.status_code, time.perf_counter() - t0
    except httpx.HTTPError:
        return -1, time.perf_counter() - t0


async def idle_latency(client, path, body) -> float:
    return statistics.median([(await one(client, path, body))[1] for _ in range(10)]) * 1e3


async def soak(stack, name: str, minutes: float) -> dict:
    path, body = WORKLOADS[name]
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=120,
                                 limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200)) as c:
        before_ms = await idle_latency(c, path, body)
        done, t0 = [0], time.perf_counter()

        async def closed():
            while time.perf_counter() - t0 < 15:
                done[0] += (await one(c, path, body))[0] == 200
        await asyncio.gather(*(closed() for _ in range(8)))
        capacity = done[0] / (time.perf_counter() - t0)
        rate = 2 * capacity
        mem0, shm0 = rss_mb(stack.shm_prefix, stack.gateway.process.pid), shm_mb(stack.shm_prefix)
        tasks, start = [], time.perf_counter()
        n = int(rate * minutes * 60)
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(c, path, body)))
        results = await asyncio.gather(*tasks)
        mem1, shm1 = rss_mb(stack.shm_prefix, stack.gateway.process.pid), shm_mb(stack.shm_prefix)
        await asyncio.sleep(10)
        after_ms = await idle_latency(c, path, body)
    statuses = {}
    for status, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    ok, refused = statuses.get(200, 0), statuses.get(429, 0) + statuses.get(503, 0)
    lat = sorted(t for s, t in results if s == 200)
    return {"workload": name, "capacity_rps": capacity, "offered_rps": rate, "sent": n, "succeeded": ok,
            "refused_overload": refused, "other": n - ok - refused, "statuses": statuses,
            "latency_p50_ms": lat[len(lat) // 2] * 1e3 if lat else None,
            "latency_p99_ms": lat[int(len(lat) * 0.99)] * 1e3 if lat else None,
            "idle_latency_before_ms": before_ms, "idle_latency_10s_after_ms": after_ms,
            "rss_mb_start": mem0, "rss_mb_end": mem1, "shm_mb_start": shm0, "shm_mb_end": shm1}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "soak")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = link_repo(Path(tmp) / "repo", [MODEL_REPOSITORY / m for m in ("minilm", EMB, f"{EMB}_tokenize", f"{EMB}_pool", LLM)])
        with start_stack(repo) as stack:
            for name in WORKLOADS:
                r = asyncio.run(soak(stack, name, a.minutes))
                rows.append(r)
                print(json.dumps(r), flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    lines = [f"# Soak through the gateway ({cpu}, {os.cpu_count()} cores, CPU only)", "",
             f"`python -m bench.soak --minutes {a.minutes:g}`, {time.strftime('%Y-%m-%d')}: 2x the measured capacity, "
             "open loop. Accounted = succeeded + refused with 429/503 (overload) = sent.", "",
             "| workload | capacity req/s | offered req/s | sent | succeeded | refused (overload) | other | p50 / p99 ms | "
             "idle latency before / 10 s after ms | RSS MiB start / end | /dev/shm MiB start / end |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['capacity_rps']:.1f} | {r['offered_rps']:.1f} | {r['sent']} | {r['succeeded']} | "
                     f"{r['refused_overload']} | {r['other']} | {r['latency_p50_ms'] or 0:.0f} / {r['latency_p99_ms'] or 0:.0f} | "
                     f"{r['idle_latency_before_ms']:.1f} / {r['idle_latency_10s_after_ms']:.1f} | "
                     f"{r['rss_mb_start']:.0f} / {r['rss_mb_end']:.0f} | {r['shm_mb_start']:.0f} / {r['shm_mb_end']:.0f} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "soak_cpu.json").write_text(json.dumps(rows, indent=1))
    (a.out / "soak_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["other"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
