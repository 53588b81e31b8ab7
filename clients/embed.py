"""Sentence embeddings from the served text pipeline (gRPC or HTTP).

    python -m clients.embed "first text" "second text"            # shapes + first values
    python -m clients.embed -i http -u 127.0.0.1:8000 "hello"
    python -m clients.embed --concurrency 16 --requests 512       # throughput, async requests

Library: `embed(texts, url=None, protocol="grpc", model="minilm_text") -> np.ndarray [N, 384]`.
"""
from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from clients.common import add_common_args, infer, make_client, make_inputs, make_outputs, run_cli, url_for
from export.specs import MINILM_TEXT, TextPipelineSpec

SPEC: TextPipelineSpec = MINILM_TEXT
DEFAULT_MODEL = SPEC.name
BENCH_TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank."  # ~16 tokens


def text_array(texts: list[str]) -> np.ndarray:
    """[N] object array of UTF-8 bytes: the pipeline's BYTES input."""
    return np.array([t.encode("utf-8") for t in texts], dtype=np.object_)


def embed(texts: list[str], url: str | None = None, protocol: str = "grpc", model: str = DEFAULT_MODEL,
          verbose: bool = False, spec: TextPipelineSpec = SPEC) -> np.ndarray:
    """texts -> [N, hidden] float32 unit vectors; lists longer than one request allows are split."""
    assert isinstance(texts, (list, tuple)) and texts, "texts must be a non-empty list of strings"
    client = make_client(url, protocol, verbose)
    try:
        parts = [infer(client, protocol, model, {spec.text.name: text_array(list(texts[i:i + spec.max_texts]))},
                       [spec.embedding.name])[spec.embedding.name]
                 for i in range(0, len(texts), spec.max_texts)]
    finally:
        client.close()
    out = np.concatenate(parts)
    assert out.shape == (len(texts), spec.encoder.hidden_size), f"unexpected response shape {out.shape}"
    return out


async def _concurrent(texts: list[str], requests: int, concurrency: int, url: str | None, protocol: str,
                      model: str, spec: TextPipelineSpec) -> float:
    """Send `requests` requests (each holding `texts`) with at most `concurrency` in flight; returns seconds."""
    if protocol == "grpc":
        import tritonclient.grpc.aio as aio
    else:
        import tritonclient.http.aio as aio
    client = aio.InferenceServerClient(url=url_for(url, protocol))
    arrays = {spec.text.name: text_array(texts)}
    sem = asyncio.Semaphore(concurrency)

    async def one():
        async with sem:
            r = await client.infer(model, make_inputs(protocol, arrays), outputs=make_outputs(protocol, [spec.embedding.name]))
            assert r.as_numpy(spec.embedding.name).shape == (len(texts), spec.encoder.hidden_size)

    try:
        await one()  # warm the connection outside the timed part
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        return time.perf_counter() - t0
    finally:
        await client.close()


def throughput(texts: list[str], requests: int, concurrency: int, url: str | None = None, protocol: str = "grpc",
               model: str = DEFAULT_MODEL, spec: TextPipelineSpec = SPEC) -> dict:
    """Concurrent load; returns requests/s and sentences/s."""
    assert requests >= 1 and concurrency >= 1
    seconds = asyncio.run(_concurrent(texts, requests, concurrency, url, protocol, model, spec))
    return {"requests": requests, "concurrency": concurrency, "seconds": seconds,
            "requests_per_s": requests / seconds, "sentences_per_s": requests * len(texts) / seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("-m", "--model", default=DEFAULT_MODEL)
    p.add_argument("texts", nargs="*", help="texts to embed (default: one ~16-token sentence)")
    p.add_argument("--concurrency", type=int, default=0, help="throughput mode: requests in flight")
    p.add_argument("--requests", type=int, default=256, help="throughput mode: number of requests")
    a = p.parse_args(argv)
    texts = a.texts or [BENCH_TEXT]
    if a.concurrency:
        r = throughput(texts, a.requests, a.concurrency, a.url, a.protocol, a.model)
        print(f"{r['requests']} requests x {len(texts)} texts, concurrency {r['concurrency']}, {a.protocol}: "
              f"{r['seconds']:.2f} s, {r['requests_per_s']:.1f} requests/s, {r['sentences_per_s']:.1f} sentences/s")
        return 0
    emb = embed(texts, a.url, a.protocol, a.model, a.verbose)
    print(f"embedding {emb.shape} {emb.dtype}")
    for t, e in zip(texts, emb):
        print(f"  {t[:40]!r:44} norm={np.linalg.norm(e):.4f} first={np.array2string(e[:4], precision=4)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
