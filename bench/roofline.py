"""Roofline for batch-1 decode: measured device copy bandwidth / bytes read per generated token.

Batch-1 decode reads every weight once per token (the input embedding only one row) plus the KV cache
written so far, so tokens/s <= bandwidth / bytes_per_token. The bandwidth is measured, not the datasheet:
a large device-to-device copy timed with CUDA events, counting bytes read + bytes written.

    python -m bench.roofline --shape llama-3.1-8b
"""
from __future__ import annotations

import argparse
import json
import statistics

from export.random_llm import BENCH_SHAPES, hf_config
from llm.model import ModelArgs

COPY_BYTES = 2 * 2**30  # 2 GiB source: far past the 50 MB L2
COPY_REPEATS = 20


def copy_bandwidth(nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS, device: str = "cuda") -> dict:
    """Median device-to-device copy bandwidth in bytes/s (read + written)."""
    import torch

    assert torch.cuda.is_available(), "copy bandwidth needs a CUDA device"
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    assert torch.equal(dst[:4096], src[:4096]), "copy did not copy"
    med = statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": nbytes, "median_s": med, "bandwidth_Bps": 2 * nbytes / med}


def shape_args(shape: str) -> ModelArgs:
    """The engine's view of an export/random_llm.py SHAPES entry (the one table of their numbers)."""
    return ModelArgs.from_hf(hf_config(shape))


def bytes_per_token(args: ModelArgs, context: int = 0, dtype_bytes: int = 2) -> int:
    """Bytes read from device memory per decoded token at batch 1 with `context` cached tokens."""
    weights = args.num_params() - args.vocab_size * args.hidden_size * (0 if args.tie_word_embeddings else 1)
    kv = 2 * args.num_layers * args.num_kv_heads * args.head_dim * context
    return (weights + kv) * dtype_bytes


def roofline(shape: str, bandwidth_Bps: float, context: int = 0) -> dict:
    """shape: a name in export/random_llm.py SHAPES."""
    args = shape_args(shape)
    b = bytes_per_token(args, context)
    return {"shape": shape, "params": args.num_params(), "bytes_per_token": b, "context": context,
            "bandwidth_Bps": bandwidth_Bps, "tokens_per_s": bandwidth_Bps / b}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=BENCH_SHAPES, action="append")
    ap.add_argument("--context", type=int, default=128 + 128, help="mean cached tokens (ISL + OSL/2)")
    args = ap.parse_args(argv)
    bw = copy_bandwidth()
    out = {"copy": bw, "roofline": [roofline(s, bw["bandwidth_Bps"], args.context)
                                    for s in (args.shape or BENCH_SHAPES)]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
