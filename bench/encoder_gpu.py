"""Encoder on the GPU through Triton: sentences/s of the MiniLM torch-fp16 CUDA-graph model
(backends/torch_encoder) measured with perf_analyzer over gRPC, at sequence length 128 and ~24.

    python -m bench.encoder_gpu --out results/gpu/encoder_gpu.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from export import encoder_torch
from export.specs import MINILM
from serve import paths

# (sequence length, sentences per request, concurrent requests)
DEFAULT_LEVELS = ((128, 128, 4), (128, 256, 4), (128, 256, 8), (128, 256, 16), (24, 256, 4), (24, 256, 8))


def input_data(path: Path, seq_len: int, vocab: int = 30522, seed: int = 0) -> Path:
    """perf_analyzer --input-data JSON: one sample of realistic ids (CLS ... SEP, full mask)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, seq_len)
    ids[0], ids[-1] = 101, 102
    sample = {"input_ids": {"content": ids.tolist(), "shape": [seq_len]},
              "attention_mask": {"content": [1] * seq_len, "shape": [seq_len]},
              "token_type_ids": {"content": [0] * seq_len, "shape": [seq_len]}}
    path.write_text(json.dumps({"data": [sample]}))
    return path


def perf_analyzer(url: str, model: str, seq_len: int, batch: int, concurrency: int, work: Path,
                  admin_header: str, requests_per_window: int = 150) -> dict:
    """admin_header: 'key:token' gRPC metadata; perf_analyzer reads server statistics, an admin API."""
    pa = paths.perf_analyzer_bin()
    assert pa.is_file(), f"perf_analyzer not found at {pa}"
    data = input_data(work / f"data-{seq_len}.json", seq_len)
    out_csv = work / f"pa-{seq_len}-{batch}-{concurrency}.csv"
    cmd = [str(pa), "-m", model, "-u", url, "-i", "grpc", "-b", str(batch), "--concurrency-range", str(concurrency),
           "--input-data", str(data), "--measurement-mode", "count_windows",
           "--measurement-request-count", str(requests_per_window), "--stability-percentage", "100",
           "--max-trials", "4", "-f", str(out_csv), "-H", admin_header]
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join([str(paths.perf_analyzer_libs()), os.environ.get("LD_LIBRARY_PATH", "")]))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    if p.returncode != 0 or not out_csv.exists():
        raise RuntimeError(f"perf_analyzer failed ({p.returncode}): {p.stdout[-1500:]} {p.stderr[-1500:]}")
    row = next(csv.DictReader(out_csv.open()))
    return {"seq_len": seq_len, "batch": batch, "concurrency": concurrency,
            "sentences_per_s": float(row["Inferences/Second"]),
            "p50_s": float(row["p50 latency"]) / 1e6, "p99_s": float(row["p99 latency"]) / 1e6,
            "server_compute_infer_us": float(row.get("Server Compute Infer", "nan") or "nan")}


def client_load(url: str, model: str, seq_len: int, batch: int, concurrency: int, seconds: float = 5.0,
                vocab: int = 30522) -> dict:
    """Fallback load generator (when perf_analyzer cannot stabilise): `concurrency` threads, each with
    its own gRPC client, sending batches of `batch` sentences back to back for `seconds`."""
    import threading

    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, vocab, (batch, seq_len)).astype(np.int64)
    arrays = (("input_ids", ids), ("attention_mask", np.ones_like(ids)), ("token_type_ids", np.zeros_like(ids)))
    lat, lock, stop = [], threading.Lock(), time.perf_counter() + seconds

    def worker():
        client = grpcclient.InferenceServerClient(url)
        inputs = []
        for name, a in arrays:
            x = grpcclient.InferInput(name, list(a.shape), "INT64")
            x.set_data_from_numpy(a)
            inputs.append(x)
        client.infer(model, inputs)  # warm-up
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            client.infer(model, inputs)
            with lock:
                lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"seq_len": seq_len, "batch": batch, "concurrency": concurrency, "client": "python-grpc-threads",
            "sentences_per_s": len(lat) * batch / wall, "p50_s": lat[len(lat) // 2], "p99_s": lat[int(len(lat) * 0.99)]}


def run(levels=DEFAULT_LEVELS, random_weights: bool = False, log_dir: Path | None = None, compile: bool = False) -> dict:
    import torch

    from serve.launcher import ADMIN_GRPC_HEADER, ServerOptions, TritonServer
    from serve.ports import free_port

    out = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "levels": [],
           "model": "MiniLM-L6 (all-MiniLM-L6-v2 architecture), torch fp16 + CUDA graphs, Python-based backend"}
    with tempfile.TemporaryDirectory(prefix="bench-enc-") as tmp:
        tmp = Path(tmp)
        encoder_torch.export(repository=tmp / "repo", random_weights=random_weights, compile=compile)
        out["compile"] = compile
        cfg = json.loads((tmp / "repo" / encoder_torch.DEFAULT_NAME / "1" / "checkpoint" / "config.json").read_text())
        out["weights"] = "random (same architecture; speed does not depend on values)" if random_weights or not encoder_torch.source_dir() else "real"
        opts = ServerOptions(model_repository=tmp / "repo", http_port=free_port(), grpc_port=free_port(),
                             metrics_port=free_port(), log_file=(log_dir or tmp) / "tritonserver-encoder.log",
                             ready_timeout_s=600)
        t0 = time.perf_counter()
        with TritonServer(opts) as server:
            out["server_ready_s"] = time.perf_counter() - t0
            out["correctness"] = check(server.grpc_url, cfg["vocab_size"])
            for seq, b, c in levels:
                try:
                    r = perf_analyzer(server.grpc_url, encoder_torch.DEFAULT_NAME, seq, b, c, tmp,
                                      f"{ADMIN_GRPC_HEADER}:{server.admin_token}")
                except Exception as e:
                    r = client_load(server.grpc_url, encoder_torch.DEFAULT_NAME, seq, b, c)
                    r["perf_analyzer_error"] = repr(e)[-300:]
                print(json.dumps(r), flush=True)
                out["levels"].append(r)
    best = [l for l in out["levels"] if l.get("seq_len") == 128 and "sentences_per_s" in l]
    out["best_128"] = max((l["sentences_per_s"] for l in best), default=None)
    out["note"] = (f"Best at 128 tokens: {out['best_128']:,.0f} sentences/s ({'met' if out['best_128'] >= 50000 else 'missed'})."
                   if out["best_128"] else "No measurement at 128 tokens.")
    return out


def check(url: str, vocab: int) -> dict:
    """One request over gRPC: shape, unit norm, padding invariance (same sentence alone and padded)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, vocab, (2, 24))
    mask = np.ones_like(ids)
    mask[1, 12:] = 0  # row 1: a 12-token sentence padded to 24

    def infer(i, m):
        inputs = []
        for name, a in (("input_ids", i), ("attention_mask", m), ("token_type_ids", np.zeros_like(i))):
            x = grpcclient.InferInput(name, list(a.shape), "INT64")
            x.set_data_from_numpy(a.astype(np.int64))
            inputs.append(x)
        return client.infer(encoder_torch.DEFAULT_NAME, inputs).as_numpy("embedding")

    e = infer(ids, mask)
    alone = infer(ids[1:, :12], mask[1:, :12])
    assert e.shape == (2, MINILM.hidden_size), e.shape
    norms = np.linalg.norm(e, axis=1)
    assert np.allclose(norms, 1, atol=1e-3), norms
    cos = float(np.dot(e[1], alone[0]))
    assert cos > 0.999, f"padding changed the embedding: cosine {cos}"
    return {"shape": list(e.shape), "norms": norms.tolist(), "padding_cosine": cos}


def inproc_variants(batch: int = 256, seq_len: int = 128, iters: int = 50) -> dict:
    """The encoder alone on the GPU (no Triton), one CUDA graph per variant, ms per batch: with the
    padding mask (what is served), without a mask (SDPA may pick flash attention), and with
    torch.compile (inductor fusions) before capture. Plus the profile of the served variant."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModel, BertConfig

    torch.manual_seed(0)
    bert = AutoModel.from_config(BertConfig(**encoder_torch.MINILM_ARCH), attn_implementation="sdpa",
                                 add_pooling_layer=False).to("cuda", torch.float16).eval()
    ids = torch.randint(1000, 30522, (batch, seq_len), device="cuda")
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)

    def encoder(m):
        def f():
            h = bert(input_ids=ids, attention_mask=m, token_type_ids=types).last_hidden_state
            return torch.nn.functional.normalize(h.mean(1).float(), dim=-1)
        return f

    def graph_ms(fn):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(iters):
            g.replay()
        t1.record()
        t1.synchronize()
        return t0.elapsed_time(t1) / iters, g

    out = {"batch": batch, "seq_len": seq_len, "variants": {}}
    ms, g = graph_ms(encoder(mask))
    out["variants"]["padding mask (served)"] = ms
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            g.replay()
        torch.cuda.synchronize()
    out["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
    out["variants"]["no mask"] = graph_ms(encoder(None))[0]
    try:
        t = time.perf_counter()
        bert_eager = bert.forward
        bert.forward = torch.compile(bert_eager, mode="max-autotune-no-cudagraphs", dynamic=False)
        out["variants"]["torch.compile + padding mask"] = graph_ms(encoder(mask))[0]
        out["compile_s"] = time.perf_counter() - t
        bert.forward = bert_eager
    except Exception as e:
        out["compile_error"] = repr(e)[-500:]
    for k, v in out["variants"].items():
        out.setdefault("sentences_per_s", {})[k] = batch / v * 1e3
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/gpu/encoder_gpu.json"))
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--inproc", action="store_true", help="only the in-process variants (no server)")
    ap.add_argument("--compile", action="store_true", help="serve with torch.compile on the full-batch buckets")
    a = ap.parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if a.inproc:
        res = inproc_variants()
        a.out.write_text(json.dumps(res, indent=1))
        print(json.dumps(res["sentences_per_s"]))
        print(res["profile"])
        return
    res = run(random_weights=a.random_weights, log_dir=a.out.parent, compile=a.compile)
    a.out.write_text(json.dumps(res, indent=1))
    print(res["note"])


if __name__ == "__main__":
    main()
