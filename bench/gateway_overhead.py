"""What the gateway costs: the same closed-loop load straight to Triton's gRPC and through the gateway,
in one run, on this machine.

    python -m bench.gateway_overhead [--repeats 3] [--out results/gateway]

LLM (tiny_llama, streaming, 64 tokens per request, ignore_eos) at 16 and 64 concurrent streams: direct
= tritonclient's asyncio gRPC stream, gateway = POST /v1/completions with stream=true (SSE) over httpx.
Embeddings (minilm_text, 64 texts per request) at 4 and 16 concurrent requests: direct = gRPC infer,
gateway = POST /v1/embeddings. Per level: a warm-up wave, then 4x concurrency requests (at least 64) in
a closed loop; the paths alternate within each repeat; medians over repeats of p50/p99 latency,
first-token time and throughput. The load generator runs on the same CPUs as the server (a 2-core
machine here): its own cost is in both paths alike.
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
import numpy as np
import tritonclient.grpc.aio as grpcaio

from bench.machine import cpu_name
from clients.common import make_inputs, make_outputs
from clients.llm_stream import first_value, request_arrays
from export.specs import MINILM_TEXT
from serve.paths import MODEL_REPOSITORY, REPO_ROOT
from tests.embedding_models import embedding_model_dirs, link_repo
from tests.server_fixtures import start_stack

LLM = "tiny_llama"
MAX_TOKENS = 64
PROMPT = "Once upon a time, there was a small model"
TEXTS = [f"sentence {i}: the quick brown fox jumps over the lazy dog" for i in range(MINILM_TEXT.max_texts)]
LLM_LEVELS, EMB_LEVELS = (1, 16, 64), (4, 16)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def closed_loop(one, concurrency: int, total: int) -> dict:
    """`total` calls of one() from `concurrency` workers; one() returns (latency_s, ttft_s, tokens)."""
    results, left = [], [total]

    async def worker():
        while left[0] > 0:
            left[0] -= 1
            results.append(await one())

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat, ttft, tokens = zip(*results)
    ttft = [t for t in ttft if t is not None]
    return {"requests": total, "wall_s": wall, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "throughput": sum(tokens) / wall}


class SSEConnections:
    """A minimal keep-alive HTTP/1.1 client for streamed POSTs: it only finds the first event and the
    end of the chunked body, so the load generator costs about as little CPU as the gRPC client's path
    (httpx's line-by-line SSE parsing costs more than the gateway's own work, on the same 2 cores)."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.idle = host, port, []

    async def post_stream(self, path: str, body: dict) -> tuple[float, float | None]:
        data = json.dumps(body).encode()
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n").encode() + data
        t0 = time.perf_counter()
        if self.idle:  # a kept-alive connection, unless the server has closed it meanwhile
            reader, writer = self.idle.pop()
            writer.write(request)
            first = await reader.read(65536)
            if not first:
                writer.close()
                return await self.post_stream(path, body)
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(request)
            first = await reader.read(65536)
        ttft, buf = None, first
        while True:
            if ttft is None and b'"text":"' in buf and b'"text":""' not in buf.split(b'"text":', 1)[1][:3]:
                ttft = time.perf_counter() - t0
            if buf.endswith(b"\r\n0\r\n\r\n"):
                break
            chunk = await reader.read(65536)
            assert chunk, "connection closed mid-response"
            buf = (buf if ttft is None else buf[-16:]) + chunk
        self.idle.append((reader, writer))
        return time.perf_counter() - t0, ttft

    def close(self):
        for _, w in self.idle:
            w.close()


class Paths:
    def __init__(self, stack):
        self.grpc = grpcaio.InferenceServerClient(stack.grpc_url)
        self.http = httpx.AsyncClient(base_url=stack.base_url, timeout=120,
                                      limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
        host, port = stack.base_url.removeprefix("http://").split(":")
        self.sse = SSEConnections(host, int(port))

    async def close(self):
        await self.grpc.close()
        await self.http.aclose()
        self.sse.close()

    async def llm_direct(self):
        inputs = make_inputs("grpc", request_arrays(PROMPT, stream=True, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                    temperature=0.0))

        async def one():
            yield {"model_name": LLM, "inputs": inputs}

        t0, ttft, text = time.perf_counter(), None, ""
        responses = self.grpc.stream_infer(one())
        async for result, error in responses:
            assert error is None, error
            piece = first_value(result, "text_output") or ""
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += piece
            if first_value(result, "finish_reason") is not None:
                break
        responses.cancel()
        return time.perf_counter() - t0, ttft, MAX_TOKENS

    async def llm_gateway(self):
        body = {"model": LLM, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
                "stream": True}
        latency, ttft = await self.sse.post_stream("/v1/completions", body)
        return latency, ttft, MAX_TOKENS

    async def emb_direct(self):
        arrays = {MINILM_TEXT.text.name: np.array([t.encode() for t in TEXTS], dtype=np.object_)}
        t0 = time.perf_counter()
        r = await self.grpc.infer(MINILM_TEXT.name, make_inputs("grpc", arrays),
                                  outputs=make_outputs("grpc", [MINILM_TEXT.embedding.name]))
        assert r.as_numpy(MINILM_TEXT.embedding.name).shape[0] == len(TEXTS)
        return time.perf_counter() - t0, None, len(TEXTS)

    async def emb_gateway(self, encoding: str = "float"):
        """The body is read, not decoded: decoding 24,576 floats of JSON is the client's cost, not the
        gateway's (check_embeddings() verifies the content once)."""
        t0 = time.perf_counter()
        r = await self.http.post("/v1/embeddings", json={"model": MINILM_TEXT.name, "input": TEXTS,
                                                         "encoding_format": encoding})
        assert r.status_code == 200 and r.content.endswith(b"}}"), r.text[:200]
        return time.perf_counter() - t0, None, len(TEXTS)

    async def emb_gateway_base64(self):  # what the openai SDK asks for by default
        return await self.emb_gateway("base64")

    async def check_embeddings(self):
        for encoding in ("float", "base64"):
            r = await self.http.post("/v1/embeddings", json={"model": MINILM_TEXT.name, "input": TEXTS,
                                                             "encoding_format": encoding})
            assert r.status_code == 200 and len(r.json()["data"]) == len(TEXTS), r.text[:200]


async def measure(stack, repeats: int) -> dict:
    p = Paths(stack)
    await p.check_embeddings()
    plan = [("llm", c, p.llm_direct, p.llm_gateway) for c in LLM_LEVELS]
    plan += [("embeddings", c, p.emb_direct, p.emb_gateway) for c in EMB_LEVELS]
    plan += [("embeddings-base64", c, p.emb_direct, p.emb_gateway_base64) for c in EMB_LEVELS]
    gateway_pid = stack.gateway.process.pid
    out = {}
    try:
        for what, c, direct, gateway in plan:
            total = max(4 * c, 64)
            for one in (direct, gateway):  # warm-up wave per path
                await closed_loop(one, c, c)
            runs = {"direct": [], "gateway": []}
            for r in range(repeats):
                order = (("direct", direct), ("gateway", gateway)) if r % 2 == 0 else (("gateway", gateway), ("direct", direct))
                for name, one in order:
                    cpu0 = cpu_seconds(gateway_pid)
                    run = await closed_loop(one, c, total)
                    run["gateway_cpu_ms_per_request"] = (cpu_seconds(gateway_pid) - cpu0) * 1e3 / total
                    runs[name].append(run)
            med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
            med["added_p50_ms"] = med["gateway"]["p50_ms"] - med["direct"]["p50_ms"]
            med["throughput_ratio"] = med["gateway"]["throughput"] / med["direct"]["throughput"]
            med["runs"] = runs
            out[f"{what}@{c}"] = med
            print(f"{what:>17} c={c:<3} gateway CPU {med['gateway']['gateway_cpu_ms_per_request']:.2f} ms/request  direct p50 {med['direct']['p50_ms']:8.2f} ms  gateway p50 "
                  f"{med['gateway']['p50_ms']:8.2f} ms  (+{med['added_p50_ms']:.2f} ms)  throughput "
                  f"{med['direct']['throughput']:8.1f} vs {med['gateway']['throughput']:8.1f} "
                  f"({(med['throughput_ratio'] - 1) * 100:+.1f}%)", flush=True)
    finally:
        await p.close()
    return out


def report(data: dict) -> str:
    m = data["machine"]
    lines = [f"# Gateway overhead ({m['cpu']}, {m['cores']} cores, CPU only)", "",
             f"`python -m bench.gateway_overhead --repeats {data['repeats']}`; {data['date']}. Medians of "
             f"{data['repeats']} repeats; each repeat is a closed loop of max(4 x concurrency, 64) requests after a "
             "warm-up wave. LLM: tiny_llama, 64 streamed tokens per request (throughput in tokens/s). Embeddings: "
             "minilm_text, 64 texts per request (throughput in texts/s), answered as JSON floats or base64 (the "
             "`openai` SDK's default). Latency is per request, end to end. Gateway CPU: CPU time of the gateway "
             "process per request (/proc), during the gateway runs.", "",
             "| workload | concurrency | direct p50 / p99 ms | gateway p50 / p99 ms | added p50 ms | direct throughput | "
             "gateway throughput | change | TTFT p50 direct / gateway ms | gateway CPU ms/request |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, v in data["levels"].items():
        what, c = key.split("@")
        d, g = v["direct"], v["gateway"]
        ttft = f"{d['ttft_p50_ms']:.1f} / {g['ttft_p50_ms']:.1f}" if what == "llm" else "-"
        cpu = g["gateway_cpu_ms_per_request"]
        lines.append(f"| {what} | {c} | {d['p50_ms']:.1f} / {d['p99_ms']:.1f} | {g['p50_ms']:.1f} / {g['p99_ms']:.1f} | "
                     f"{v['added_p50_ms']:+.2f} | {d['throughput']:.0f} | {g['throughput']:.0f} | "
                     f"{(v['throughput_ratio'] - 1) * 100:+.1f}% | {ttft} | {cpu:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "gateway")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = link_repo(Path(tmp) / "repo", embedding_model_dirs() + [MODEL_REPOSITORY / LLM])
        with start_stack(repo) as stack:
            levels = asyncio.run(measure(stack, a.repeats))
    data = {"date": time.strftime("%Y-%m-%d"), "repeats": a.repeats, "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
            "levels": levels}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "overhead_cpu.json").write_text(json.dumps(data, indent=1))
    (a.out / "overhead_cpu.md").write_text(report(data))
    print(report(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
