"""`make soak`: twice the measured capacity, open loop, for minutes, through the gateway — on the
embeddings and on the streaming LLM. Not part of `make test`.

    python -m bench.soak [--minutes 3] [--probe-seconds 10] [--workloads embeddings,llm] [--out results/soak]

Per workload:
1. idle latency: the median of 20 sequential requests;
2. capacity: a warm-up, then closed loops at a few concurrencies (`--probe-seconds` each); capacity =
   the best rate of correct answers. Each worker counts its own answers: the first version of this
   script did `done[0] += (await one(...)) == 200` from 8 coroutines, and Python reads `done[0]`
   before the await, so concurrent workers overwrote each other's counts and the probe saw about an
   eighth of what was answered;
3. load: requests arrive at 2x that rate (open loop, evenly spaced) for --minutes;
4. 10 s after the last request was sent: the idle latency again (median of 20 sequential requests).

Every answer is classified: `ok` (200 and a complete, correct-looking answer: a stream ending in
`[DONE]` with finish_reason `length` and no error event; all embeddings), `overload` (429 or 503 with
`Retry-After` and `code: overloaded`), or `other` (anything else, a transport error included).
Requirements checked (issue 10): ok + overload = sent (other = 0); the sender kept the offered rate
(>= 1.9x capacity); there was overload (refused > 0); idle latency 10 s after the load within 25 % of
the idle latency before; RSS of tritonserver, its stubs and the gateway, and the /dev/shm bytes of this
server, within 5 % from the start of the load to its end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.machine import cpu_name
from serve.paths import MODEL_REPOSITORY, REPO_ROOT
from tests.embedding_models import link_repo
from tests.server_fixtures import start_stack

LLM, EMB = "tiny_llama", "minilm_text"
EMB_TEXTS, LLM_TOKENS = 16, 32
# name -> (path, body, probe concurrencies). The LLM's throughput grows with its batch (max_slots 32);
# the encoder's peaks at a few requests in flight on 2 cores.
WORKLOADS = {
    "embeddings": ("/v1/embeddings", {"model": EMB, "input": [f"soak sentence {i} about the weather" for i in range(EMB_TEXTS)],
                                      "encoding_format": "base64"}, (4, 8, 16)),  # base64: the openai SDK's default
    "llm": ("/v1/completions", {"model": LLM, "prompt": "Once upon a time", "max_tokens": LLM_TOKENS, "ignore_eos": True,
                                "temperature": 0, "stream": True}, (8, 16, 32)),
}
LATENCY_RECOVERED = 1.25  # idle latency 10 s after the load <= this x before
FLAT = 0.05  # RSS and /dev/shm within +-5 %
KEPT_RATE = 0.95  # the sender offered at least 95 % of 2x capacity
IDLE_REQUESTS = 20  # sequential requests whose median is the idle latency


@dataclass
class Outcome:
    kind: str  # ok | overload | other
    status: int  # HTTP status, -1: transport error
    seconds: float
    detail: str = ""  # for `other`: what it was


class HTTP:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams, for the load. httpx costs ~7 ms of CPU per
    streamed 32-token request (0.4 cores at the LLM's 53 req/s); at 2x that rate, one httpx process on
    these 2 shared cores fell 4 s behind its schedule and its own backlog made 429s look 11 s slow."""

    def __init__(self, base_url: str, timeout_s: float = 120):
        host, port = base_url.removeprefix("http://").split(":")
        self.host, self.port, self.timeout_s, self.idle = host, int(port), timeout_s, []

    async def post(self, path: str, body: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        return await asyncio.wait_for(self._post(path, body), self.timeout_s)

    async def _post(self, path: str, body: bytes):
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        while True:
            reused = bool(self.idle)
            reader, writer = self.idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                if reused:  # the server closed this idle connection (keep-alive timeout): a new one
                    continue
                raise
            try:
                lines = head.split(b"\r\n")
                status = int(lines[0].split(b" ", 2)[1])
                headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:] if b":" in line)}
                if b"content-length" in headers:
                    data = await reader.readexactly(int(headers[b"content-length"]))
                else:  # chunked (the SSE streams): raw, framing included, until the last chunk
                    data = b""
                    while not (data.endswith(b"\r\n0\r\n\r\n") or data == b"0\r\n\r\n"):
                        chunk = await reader.read(65536)
                        if not chunk:
                            raise ConnectionError("connection closed mid-response")
                        data += chunk
            except BaseException:
                writer.close()
                raise
            if headers.get(b"connection") == b"close":
                writer.close()
            else:
                self.idle.append((reader, writer))
            return status, headers, data

    def close(self) -> None:
        for _, w in self.idle:
            w.close()


def refusal(status: int, headers: dict[bytes, bytes], body: bytes) -> tuple[str, str]:
    """(kind, detail) of a non-200 answer: an overload refusal has 429/503, Retry-After and code overloaded."""
    try:
        code = orjson.loads(body)["error"]["code"]
    except Exception:  # noqa: BLE001 - not an OpenAI error body
        code = None
    if status in (429, 503) and b"retry-after" in headers and code == "overloaded":
        return "overload", ""
    return "other", f"{status} {code}: {body[:200].decode(errors='replace')}"


async def one(client: HTTP, path: str, body: dict, raw: bytes) -> Outcome:
    t0 = time.perf_counter()
    try:
        status, headers, data = await client.post(path, raw)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        return Outcome("other", -1, time.perf_counter() - t0, f"transport: {type(e).__name__}: {e}")
    dt = time.perf_counter() - t0
    if status != 200:
        kind, detail = refusal(status, headers, data)
        return Outcome(kind, status, dt, detail)
    if body.get("stream"):
        good = b"data: [DONE]\n\n" in data and b'"finish_reason":"length"' in data and b'"error"' not in data
    else:
        good = data.count(b'"object":"embedding"') == len(body["input"])
    return Outcome("ok", 200, dt) if good else Outcome("other", 200, dt, f"incomplete or error: {data[-300:]!r}")


async def idle_latency_ms(request, prefix: str, gateway_pid: int) -> tuple[float, float]:
    """(median latency of IDLE_REQUESTS sequential requests, CPU cores other processes on the machine
    used meanwhile: on a shared machine they move this number)."""
    t0, split0 = time.perf_counter(), cpu_split(prefix, gateway_pid)
    outcomes = [await request() for _ in range(IDLE_REQUESTS)]
    split1, wall = cpu_split(prefix, gateway_pid), time.perf_counter() - t0
    assert all(o.kind == "ok" for o in outcomes), [o.detail for o in outcomes if o.kind != "ok"]
    return statistics.median(o.seconds for o in outcomes) * 1e3, others_cores(split0, split1, wall)


async def closed_loop(request, concurrency: int, seconds: float) -> tuple[float, list[Outcome]]:
    """Rate of ok answers of `concurrency` workers for `seconds`; each worker keeps its own list."""
    t0 = time.perf_counter()

    async def worker() -> list[Outcome]:
        mine = []
        while time.perf_counter() - t0 < seconds:
            mine.append(await request())
        return mine
    lists = await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    outcomes = [o for mine in lists for o in mine]
    return sum(o.kind == "ok" for o in outcomes) / wall, outcomes


def rss_mb(prefix: str, gateway_pid: int) -> float:
    """RSS of tritonserver and its stubs (their command lines hold this server's shm prefix) and the gateway."""
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


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_split(prefix: str, gateway_pid: int) -> tuple[float, float]:
    """(CPU seconds used so far by the whole machine, by this soak: tritonserver, its stubs, the gateway and
    this process). Their difference over the load is what other processes on the machine took."""
    tck = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    machine = (sum(fields[:8]) - fields[3] - fields[4]) / tck  # all but idle and iowait
    ours = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int(d.name) in (gateway_pid, os.getpid()) or prefix.encode() in (d / "cmdline").read_bytes():
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                ours += int(stat[11]) + int(stat[12])
        except OSError:
            continue
    return machine, ours / tck


def others_cores(split0: tuple[float, float], split1: tuple[float, float], seconds: float) -> float:
    """CPU cores the rest of the machine used between two cpu_split() readings `seconds` apart."""
    return ((split1[0] - split0[0]) - (split1[1] - split0[1])) / seconds


def pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] * 1e3 if values else None


async def soak(stack, name: str, minutes: float, probe_s: float) -> dict:
    path, body, levels = WORKLOADS[name]
    prefix, gw = stack.shm_prefix, stack.gateway.process.pid
    c, raw = HTTP(stack.base_url), orjson.dumps(body)

    def request():
        return one(c, path, body, raw)
    try:
        before_ms, before_others = await idle_latency_ms(request, prefix, gw)
        await closed_loop(request, levels[1], 5)  # warm-up: every instance, the batcher, connections
        probes = {}
        for conc in levels:
            c0 = cpu_s()
            rps, outcomes = await closed_loop(request, conc, probe_s)
            probes[conc] = {"ok_rps": round(rps, 2), "not_ok": sum(o.kind != "ok" for o in outcomes),
                            "p50_ms": pct([o.seconds for o in outcomes if o.kind == "ok"], 0.5),
                            "client_cpu_per_s": round((cpu_s() - c0) / probe_s, 2)}
            print(f"{name} probe concurrency {conc}: {probes[conc]}", flush=True)
        capacity = max(p["ok_rps"] for p in probes.values())
        rate = 2 * capacity

        samples = []  # (t, rss, shm) every 5 s during the load
        async def sample():
            while True:
                samples.append((time.perf_counter(), rss_mb(prefix, gw), shm_mb(prefix)))
                await asyncio.sleep(5)
        sampler = asyncio.create_task(sample())
        await asyncio.sleep(0)
        mem0, shm0 = samples[0][1], samples[0][2]
        tasks, n, lag = [], int(rate * minutes * 60), 0.0
        start, c0, split0 = time.perf_counter(), cpu_s(), cpu_split(prefix, gw)
        for i in range(n):
            due = start + i / rate
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                lag = max(lag, now - due)
            tasks.append(asyncio.create_task(request()))
        last_sent = time.perf_counter()
        client_cpu = (cpu_s() - c0) / (last_sent - start)
        split1 = cpu_split(prefix, gw)
        others_cpu = others_cores(split0, split1, last_sent - start)
        sampler.cancel()
        mem1, shm1 = rss_mb(prefix, gw), shm_mb(prefix)
        mem_max = max([s[1] for s in samples] + [mem1])
        await asyncio.sleep(max(0.0, last_sent + 10 - time.perf_counter()))
        in_flight_at_10s = sum(not t.done() for t in tasks)
        after_ms, after_others = await idle_latency_ms(request, prefix, gw)
        results = await asyncio.gather(*tasks)
        drained = time.perf_counter() - last_sent
        mem2, shm2 = rss_mb(prefix, gw), shm_mb(prefix)
    finally:
        c.close()

    kinds = {k: sum(o.kind == k for o in results) for k in ("ok", "overload", "other")}
    statuses: dict[str, int] = {}
    for o in results:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    others = sorted({o.detail for o in results if o.kind == "other"})[:5]
    offered = n / (last_sent - start)
    r = {"workload": name, "minutes": minutes, "probes": probes, "capacity_rps": capacity, "target_rps": rate,
         "offered_rps": offered, "served_rps": kinds["ok"] / (last_sent - start), "sender_max_lag_s": lag,
         "client_cpu_cores": client_cpu, "other_processes_cpu_cores": others_cpu, "loadavg_1min_end": os.getloadavg()[0],
         "sent": n, "succeeded": kinds["ok"], "refused_overload": kinds["overload"], "other": kinds["other"],
         "other_examples": others, "statuses": statuses,
         "ok_p50_ms": pct([o.seconds for o in results if o.kind == "ok"], 0.5),
         "ok_p99_ms": pct([o.seconds for o in results if o.kind == "ok"], 0.99),
         "refused_p50_ms": pct([o.seconds for o in results if o.kind == "overload"], 0.5),
         "refused_p99_ms": pct([o.seconds for o in results if o.kind == "overload"], 0.99),
         "idle_latency_before_ms": before_ms, "idle_latency_10s_after_ms": after_ms,
         "other_processes_cpu_cores_idle_before": before_others, "other_processes_cpu_cores_idle_after": after_others,
         "in_flight_10s_after": in_flight_at_10s, "all_answered_after_s": drained,
         "rss_mb_start": mem0, "rss_mb_end": mem1, "rss_mb_max": mem_max, "rss_mb_after": mem2,
         "shm_mb_start": shm0, "shm_mb_end": shm1, "shm_mb_after": shm2}
    r["checks"] = {
        "accounted (ok + overload = sent)": kinds["other"] == 0,
        "offered >= 1.9x capacity": offered >= KEPT_RATE * rate,
        "overload refused (> 0)": kinds["overload"] > 0,
        f"idle latency 10 s after <= {LATENCY_RECOVERED:g}x before": after_ms <= LATENCY_RECOVERED * before_ms,
        "RSS flat (+-5 %)": abs(mem1 - mem0) <= FLAT * mem0,
        "/dev/shm flat (+-5 %)": abs(shm1 - shm0) <= FLAT * max(shm0, 1e-9),
    }
    r["valid"] = all(r["checks"].values())
    return r


def report(rows: list[dict], minutes: float, cpu: str) -> str:
    f = lambda v, d=0: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"# Soak through the gateway ({cpu}, {os.cpu_count()} cores, CPU only)", "",
             f"`python -m bench.soak --minutes {minutes:g}`, {time.strftime('%Y-%m-%d')}. Capacity: the best rate of "
             "correct answers of closed loops at a few concurrencies; then 2x that rate, open loop, evenly spaced, "
             f"for {minutes:g} minutes per workload, through the gateway. Load generator (one Python process, a minimal asyncio HTTP/1.1 client) "
             "on the same 2 cores as Triton and the gateway. "
             "Other processes' CPU: what the rest of this shared machine used during the load (/proc/stat minus "
             "this soak's processes).", "",
             "| workload | capacity req/s (probe: concurrency -> req/s) | offered req/s | sent | succeeded (req/s) | "
             "refused (overload) | other | ok p50 / p99 ms | refused p50 / p99 ms | idle latency before / 10 s after ms | "
             "RSS MiB start / end (max) | /dev/shm MiB start / end | other processes' CPU, cores |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        probe = ", ".join(f"{k}: {p['ok_rps']:.1f}" for k, p in r["probes"].items())
        lines.append(f"| {r['workload']} | {r['capacity_rps']:.1f} ({probe}) | {r['offered_rps']:.1f} | {r['sent']} | "
                     f"{r['succeeded']} ({r['served_rps']:.1f}) | {r['refused_overload']} | {r['other']} | "
                     f"{f(r['ok_p50_ms'])} / {f(r['ok_p99_ms'])} | "
                     f"{f(r['refused_p50_ms'])} / {f(r['refused_p99_ms'])} | {r['idle_latency_before_ms']:.1f} / "
                     f"{r['idle_latency_10s_after_ms']:.1f} | {r['rss_mb_start']:.0f} / {r['rss_mb_end']:.0f} "
                     f"({r['rss_mb_max']:.0f}) | {r['shm_mb_start']:.0f} / {r['shm_mb_end']:.0f} | "
                     f"{r['other_processes_cpu_cores']:.2f} |")
    lines += ["", "Requirements (issue 10):", ""]
    for r in rows:
        checks = "; ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in r["checks"].items())
        lines.append(f"- **{r['workload']}: {'valid' if r['valid'] else 'NOT valid'}** ({checks}). Status codes: "
                     f"{r['statuses']}; sender's largest lag {r['sender_max_lag_s'] * 1e3:.0f} ms, its CPU "
                     f"{r['client_cpu_cores']:.2f} cores; other processes' CPU while the idle latency was measured "
                     f"before / after: {r['other_processes_cpu_cores_idle_before']:.2f} / "
                     f"{r['other_processes_cpu_cores_idle_after']:.2f} cores; requests in flight 10 s after the last was sent: "
                     f"{r['in_flight_10s_after']}; all answered {r['all_answered_after_s']:.1f} s after it."
                     + (f" Other answers, e.g.: {r['other_examples']}" if r["other_examples"] else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--probe-seconds", type=float, default=10.0)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "soak")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = link_repo(Path(tmp) / "repo", [MODEL_REPOSITORY / m for m in ("minilm", EMB, f"{EMB}_tokenize", f"{EMB}_pool", LLM)])
        with start_stack(repo) as stack:
            for name in a.workloads.split(","):
                r = asyncio.run(soak(stack, name, a.minutes, a.probe_seconds))
                rows.append(r)
                print(json.dumps(r), flush=True)
    text = report(rows, a.minutes, cpu_name())
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "soak_cpu.json").write_text(json.dumps(rows, indent=1))
    (a.out / "soak_cpu.md").write_text(text)
    print(text)
    return 0 if all(r["valid"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
