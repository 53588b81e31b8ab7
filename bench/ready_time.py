"""Server start-up time with compiled models: the first start on an empty compile cache (cold), then
restarts that find what the first one left there (warm: serve/environment.py keeps torch.compile's
caches in TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR across restarts).

Per model: export once into a scratch repository, then `--starts` server starts through the launcher,
each timed from the launch to every model ready, followed by one request (a first request that waits
for a compile would show here). Models: `--llm SHAPE` (random weights made on the device, engine
setting compile=true) and `--encoder` (MiniLM on backends/torch_encoder with --compile).

    python -m bench.ready_time --llm llama-3.1-8b --encoder --starts 3 --out results/gpu/engine_v2/ready_time.json
    python -m bench.ready_time --llm tiny --device cpu --starts 2          # CPU smoke (nothing compiles)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from unittest import mock

from serve import environment
from serve.doctor import dir_mib
from serve.launcher import ServerOptions, TritonServer
from serve.ports import free_port


def timed_starts(repo: Path, starts: int, cache: Path, probe, log_dir: Path) -> list[dict]:
    """`starts` launches of the server on `repo` with the compile caches under `cache` (empty at first)."""
    caches = {name: str(cache / sub) for name, sub in environment.COMPILE_CACHE_ENVS.items()}
    with mock.patch.dict(os.environ, caches):  # server_env() passes them on; the caller's env is restored after
        return [_start(repo, i + 1, cache, probe, log_dir) for i in range(starts)]


def _start(repo: Path, n: int, cache: Path, probe, log_dir: Path) -> dict:
    opts = ServerOptions(model_repository=repo, http_port=free_port(), grpc_port=free_port(),
                         metrics_port=free_port(), log_file=log_dir / f"tritonserver-{repo.name}-{n}.log",
                         ready_timeout_s=900)
    cache_mib = dir_mib(cache)
    t0 = time.perf_counter()
    with TritonServer(opts) as server:
        ready = time.perf_counter() - t0
        t1 = time.perf_counter()
        detail = probe(server)
        first = time.perf_counter() - t1
    row = {"start": n, "cache": "warm" if cache_mib else "cold", "cache_mib_before": round(cache_mib, 1),
           "ready_s": ready, "first_request_s": first, **detail}
    print(json.dumps(row), flush=True)
    return row


def llm_model(repo: Path, shape: str, device: str) -> tuple[str, callable]:
    from bench.llm_client import drive
    from export import llm as export_llm

    name = shape.replace(".", "_").replace("-", "_")
    export_llm.export(name=name, random_shape=shape, device=device, kind="gpu" if device == "cuda" else "cpu",
                      repository=repo, compile=True)

    def probe(server) -> dict:
        r = drive(server.grpc_url, name, ["Hello, how are you today?"], 16, 1)
        assert r["output_tokens"] == 16, r  # a failed request raises in drive()
        return {"ttft_s": r["ttft_p50_s"]}

    return name, probe


def encoder_model(repo: Path) -> tuple[str, callable]:
    from bench.encoder_gpu import check
    from export import encoder_torch

    encoder_torch.export(repository=repo, random_weights=True, compile=True)
    cfg = json.loads((repo / encoder_torch.DEFAULT_NAME / "1" / "checkpoint" / "config.json").read_text())
    return encoder_torch.DEFAULT_NAME, lambda server: {"check": check(server.grpc_url, cfg["vocab_size"])}


def run(llm: str | None, encoder: bool, starts: int, device: str, work: Path, cache: Path | None = None) -> dict:
    """cache: the compile cache directory (default: a new, empty one per model under work)."""
    out = {"starts": starts, "device": device, "models": {}}
    if device == "cuda":
        import torch

        out["gpu"] = torch.cuda.get_device_name(0)
        out["torch"] = torch.__version__
    models = ([("llm", lambda repo: llm_model(repo, llm, device))] if llm else []) + \
             ([("encoder", encoder_model)] if encoder else [])
    for kind, make in models:
        repo = work / f"repo-{kind}"
        t0 = time.perf_counter()
        name, probe = make(repo)
        export_s = time.perf_counter() - t0
        model_cache = cache or work / f"compile-cache-{kind}"
        rows = timed_starts(repo, starts, model_cache, probe, work)
        out["models"][name] = {"export_s": export_s, "starts": rows, "cache_mib": round(dir_mib(model_cache), 1)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm", default=None, help="random-weight LLM shape (export/random_llm.py SHAPES)")
    ap.add_argument("--encoder", action="store_true", help="MiniLM torch_encoder with --compile (GPU)")
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    ap.add_argument("--cache", default=None, help="compile cache directory (default: an empty one per model)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="ready-time-"))
    out = run(a.llm, a.encoder, a.starts, a.device, work, Path(a.cache) if a.cache else None)
    print(json.dumps(out, indent=1), flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
