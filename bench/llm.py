"""LLM benchmark harness: our engine end to end through Triton (gRPC streaming), against the naive
transformers baseline and the roofline, in one run.

For each benchmark shape: export a random-weight model (export/llm.py, weights made on the device),
start tritonserver through the launcher, drive it with `concurrency` concurrent gRPC streams
(tritonclient.grpc.aio, one stream per request, ignore_eos + min_tokens so every request produces
exactly OSL tokens) for each ISL/OSL workload, record TTFT, inter-token latency (p50/p99; per token,
from the cumulative `num_output_tokens` of each response), output tokens/s and peak GPU memory
(nvidia-smi, polled). Then, with the server stopped: the same engine in process at the highest
concurrency (Triton + Python backend + gRPC overhead), a torch.profiler summary of its decode steps,
transformers `generate` one request at a time, and the roofline (measured copy bandwidth / bytes
read per token). Writes <out-dir>/llm_bench.json; `python -m bench.report` turns it into markdown + PNGs.

    python -m bench.llm --shape tinyllama-1.1b --out-dir results/gpu            # GPU host
    python -m bench.llm --shape tiny --device cpu --concurrency 1 4 --workload 16:16 --out-dir /tmp/b   # CPU smoke
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.baseline_hf import percentile
from bench.llm_client import drive, engine_counters, engine_split
from bench.workloads import lengths, parse_workload, requests_for

DEFAULT_CONCURRENCY = (1, 8, 32, 64)
DEFAULT_WORKLOADS = ("128:256", "2048:256", "chat")
IDLE_TTFT_ISL = (128, 2048)
IDLE_TTFT_SAMPLES = 20
PROMPT_UNIT = " The quick brown fox jumps over the lazy dog."
_PROMPT_IDS = itertools.count()


# ---------------------------------------------------------------------------------------------- prompts

def make_prompts(tokenizer, n: int, isl: int) -> list[str]:
    """n prompts of exactly `isl` tokens (with the tokenizer's special tokens), checked. Every prompt
    of a run starts differently (a run-wide counter), so the prefix cache never serves one from
    another: a benchmark measures prefill, not cache hits."""
    special = len(tokenizer("x")["input_ids"]) - len(tokenizer("x", add_special_tokens=False)["input_ids"])
    body = isl - special
    assert body >= 4, f"isl {isl} too small"
    prompts = []
    for i in range(n):
        text = f"{next(_PROMPT_IDS)}:" + PROMPT_UNIT * (body // 4 + 8)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:body]
        t = tokenizer.decode(ids)
        # A decode/encode round trip can merge across the cut: trim until the count is exact.
        k = body
        while len(tokenizer(t)["input_ids"]) > isl and k > 0:
            k -= 1
            t = tokenizer.decode(ids[:k])
        prompts.append(t)
    got = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert all(abs(g - isl) <= 2 for g in got), f"prompt lengths {sorted(set(got))} for isl {isl}"
    return prompts


# ---------------------------------------------------------------------------------------------- GPU memory

class GpuMemoryPoller:
    """Peak device memory in use (nvidia-smi, all processes) while the context is open."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak_mib, self._stop = interval_s, 0, threading.Event()
        self.available = subprocess.run(["which", "nvidia-smi"], capture_output=True).returncode == 0

    def read(self) -> int:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return max(int(x) for x in out) if out else 0

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.peak_mib = max(self.peak_mib, self.read())
            except Exception:
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self.available:
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


# ---------------------------------------------------------------------------------------------- run

def versions() -> dict:
    import torch
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "numpy": np.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        v |= {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "gpu_mem_bytes": p.total_memory,
              "sm_count": p.multi_processor_count}
        try:
            v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            pass
    v["tritonserver"] = "2.51 (nvidia-pytriton 0.7.0 wheel)"
    return v


def level_prompts(tok, workload, n: int, settings) -> tuple[list[str], list[int]]:
    """n prompts and output lengths of a workload (chat lengths clipped to the model's limits)."""
    prompts, osls = [], []
    for isl, osl in lengths(workload, n):
        osl = min(osl, settings.max_tokens_cap)
        isl = min(isl, settings.max_context - osl - 8)
        prompts.append(make_prompts(tok, 1, isl)[0])
        osls.append(osl)
    return prompts, osls


def serve_and_measure(shape: str, repo: Path, device: str, workloads, concurrency, overrides: dict,
                      log_dir: Path) -> dict:
    """Export the model, start the server, run every workload x concurrency level through gRPC:
    per level a warm-up wave of `concurrency` requests, then a closed loop of requests_for(c)."""
    from transformers import AutoTokenizer

    from export import llm as export_llm
    from llm.settings import EngineSettings
    from serve.launcher import ServerOptions, TritonServer
    from serve.ports import free_port

    name = shape.replace(".", "_").replace("-", "_")
    t0 = time.perf_counter()
    model_dir = export_llm.export(name=name, random_shape=shape, device=device, kind="gpu" if device == "cuda" else "cpu",
                                  repository=repo, **overrides)
    export_s = time.perf_counter() - t0
    settings = EngineSettings.from_config(model_dir)
    ckpt = Path(settings.checkpoint)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ctx = settings.max_context
    opts = ServerOptions(model_repository=repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                         log_file=log_dir / f"tritonserver-{name}.log", ready_timeout_s=600)
    out = {"shape": shape, "model": name, "export_s": export_s, "settings": settings.to_parameters(), "levels": []}
    from llm.gc_pauses import freeze_startup_heap

    freeze_startup_heap()  # the client's start-up heap (torch, transformers, grpc) out of its collector's way
    with GpuMemoryPoller() as mem:
        t0 = time.perf_counter()
        with TritonServer(opts) as server:
            out["server_ready_s"] = time.perf_counter() - t0
            idle = mem.read() if mem.available else None
            drive(server.grpc_url, name, make_prompts(tok, 2, 16), 8, 2)  # warm-up: first-request paths
            for w in workloads:
                label = w if w == "chat" else f"{w[0]}:{w[1]}"
                for c in concurrency:
                    warm, warm_osl = level_prompts(tok, w, c, settings)
                    drive(server.grpc_url, name, warm, warm_osl, c)  # warm-up wave, not measured
                    prompts, osls = level_prompts(tok, w, requests_for(c), settings)
                    before = engine_counters(server.metrics_url, name)
                    r = drive(server.grpc_url, name, prompts, osls, c) | {"workload": label}
                    r |= engine_split(before, engine_counters(server.metrics_url, name))
                    if w != "chat":
                        r |= {"isl": w[0], "osl": w[1]}
                    print(json.dumps({"shape": shape, **r}), flush=True)
                    out["levels"].append(r)
            # TTFT on an idle server: single requests one after another, median of IDLE_TTFT_SAMPLES.
            out["ttft_idle"] = []
            for isl in IDLE_TTFT_ISL:
                ps = make_prompts(tok, IDLE_TTFT_SAMPLES, min(isl, ctx - 8))
                ttfts = [drive(server.grpc_url, name, [p], 1, 1)["ttft_p50_s"] for p in ps]
                out["ttft_idle"].append({"isl": isl, "n": len(ttfts), "ttft_p50_s": float(np.median(ttfts)),
                                         "ttft_p99_s": percentile(ttfts, 99)})
                print(json.dumps({"shape": shape, "ttft_idle": out["ttft_idle"][-1]}), flush=True)
            try:
                import urllib.request

                with urllib.request.urlopen(server.metrics_url, timeout=5) as f:
                    out["metrics_sample"] = [l for l in f.read().decode().splitlines() if l.startswith("llm_")][:60]
            except Exception as e:
                out["metrics_sample"] = [repr(e)]
    out["gpu_mem_idle_mib"] = idle
    out["gpu_mem_peak_mib"] = mem.peak_mib if mem.available else None
    out["model_dir"] = str(model_dir)
    return out


def inproc_engine(model_dir: Path, device: str, workload, concurrency: int, profile_batches=(1, 64)) -> dict:
    """The same engine and model without Triton, same load (the serving overhead), plus its decode
    step sweep and profiles."""
    import torch

    from bench import engine_inproc
    from llm.engine import Engine
    from llm.settings import EngineSettings

    engine = Engine(EngineSettings.from_config(model_dir), device="cuda:0" if device == "cuda" else device)
    out = {}
    if device == "cuda":
        ctx = 256
        batches = [b for b in (1, 8, 32, 64) if b <= engine.settings.max_seqs]
        out["decode_steps"] = engine_inproc.decode_sweep(engine, batches, ctx)
        out["profiles"] = [engine_inproc.profile_decode(engine, b, ctx) for b in profile_batches if b in batches]
    engine.start()
    try:
        out["levels"] = [engine_inproc.closed_loop(engine, workload, c) for c in sorted({1, concurrency})]
    finally:
        engine.stop()
    del engine
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def run(shapes, device: str, workloads, concurrency, out_dir: Path, baseline: bool = True,
        roofline_: bool = True, inproc: bool = True, overrides: dict | None = None) -> dict:
    from bench import baseline_hf, roofline
    from export.random_llm import BENCH_SHAPES

    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    result = {"versions": versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "workloads": [w if w == "chat" else f"{w[0]}:{w[1]}" for w in workloads], "concurrency": list(concurrency),
              "engine_overrides": {k: v for k, v in overrides.items()}, "shapes": {}}
    path = out_dir / "llm_bench.json"

    def save():
        path.write_text(json.dumps(result, indent=1, default=str))

    if roofline_ and device == "cuda":
        result["copy_bandwidth"] = roofline.copy_bandwidth()
        save()
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        for shape in shapes:
            r = result["shapes"].setdefault(shape, {})
            try:
                r["triton"] = serve_and_measure(shape, Path(tmp) / "repo", device, workloads, concurrency,
                                                overrides, out_dir)
            except Exception as e:
                r["triton_error"] = repr(e)
                print(f"triton run failed for {shape}: {e!r}", flush=True)
            save()
            if inproc and "triton" in r:
                try:
                    r["inproc"] = inproc_engine(Path(r["triton"]["model_dir"]), device, workloads[0], max(concurrency))
                except Exception as e:
                    r["inproc_error"] = repr(e)
                    print(f"in-process run failed for {shape}: {e!r}", flush=True)
                save()
            if baseline and device == "cuda" and shape in BENCH_SHAPES:
                try:
                    import torch

                    model = baseline_hf.random_model(shape)
                    r["hf_naive"] = baseline_hf.naive(model, *workloads[0])
                    r["hf_static_compiled"] = baseline_hf.static_compiled(model, *workloads[0])
                    del model
                    torch.cuda.empty_cache()
                except Exception as e:
                    r["hf_naive_error"] = repr(e)
                save()
            if roofline_ and device == "cuda" and shape in BENCH_SHAPES:
                isl, osl = workloads[0]
                r["roofline"] = roofline.roofline(shape, result["copy_bandwidth"]["bandwidth_Bps"],
                                                  context=isl + osl // 2)
                save()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save()
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", action="append", help="random-weight shape(s) from export/llm.py SHAPES")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=list(DEFAULT_CONCURRENCY))
    ap.add_argument("--workload", nargs="+", default=list(DEFAULT_WORKLOADS), help="ISL:OSL pairs, or chat (bench/workloads.py)")
    ap.add_argument("--out-dir", type=Path, default=Path("results/gpu"))
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument("--no-inproc", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine setting override")
    a = ap.parse_args(argv)
    from llm.settings import parse_overrides

    overrides = parse_overrides(a.set)
    shapes = a.shape or (["tinyllama-1.1b", "llama-3.1-8b"] if a.device == "cuda" else ["tiny"])
    res = run(shapes, a.device, [parse_workload(w) for w in a.workload], a.concurrency, a.out_dir,
              not a.no_baseline, not a.no_roofline, not a.no_inproc, overrides)
    print(f"wrote {a.out_dir / 'llm_bench.json'}")
    for shape, r in res["shapes"].items():
        for lv in r.get("triton", {}).get("levels", []):
            print(f"{shape:16s} {lv['workload']:>9s} c={lv['concurrency']:<3d} {lv['tokens_per_s']:9.1f} tok/s "
                  f"TTFT p50 {lv['ttft_p50_s'] * 1e3:7.1f} ms  ITL p50 {lv['itl_p50_s'] * 1e3:6.2f} p99 {lv['itl_p99_s'] * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
