"""Text generation over Triton's HTTP generate extension (no tritonclient needed).

    python -m clients.llm_http "Once upon a time"                   # POST .../generate (one JSON reply)
    python -m clients.llm_http --stream "Once upon a time"          # POST .../generate_stream (SSE)
    python -m clients.llm_http -u 127.0.0.1:8000 -m tiny_llama --max-tokens 32 --seed 3 --temperature 0.9 "Hi"

The same with curl (see docs/llm.md):
    curl -s localhost:8000/v2/models/tiny_llama/generate -d '{"text_input": "Hello", "max_tokens": 16}'
    curl -sN localhost:8000/v2/models/tiny_llama/generate_stream -d '{"text_input": "Hello", "max_tokens": 16, "stream": true}'

Library: `generate_http(prompt, url=None, model=..., stream=False, on_chunk=None, **params) -> dict`
(the last JSON event, with "text_output" replaced by the whole text).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

from clients.common import add_common_args, add_sampling_args, url_for

DEFAULT_MODEL = "tiny_llama"


def generate_http(prompt: str, url: str | None = None, model: str = DEFAULT_MODEL, stream: bool = False,
                  on_chunk=None, timeout_s: float = 120.0, **params) -> dict:
    body = {"text_input": prompt, **{k: v for k, v in params.items() if v is not None}}
    if stream:
        body["stream"] = True
    endpoint = "generate_stream" if stream else "generate"
    req = urllib.request.Request(f"http://{url_for(url, 'http')}/v2/models/{model}/{endpoint}",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    text, last = [], {}
    with urllib.request.urlopen(req, timeout=timeout_s) as f:
        if not stream:
            last = json.loads(f.read())
            text.append(last.get("text_output", ""))
        else:
            for line in f:  # Server-Sent Events: "data: {json}\n\n" per response
                if not line.startswith(b"data: "):
                    continue
                last = json.loads(line[len(b"data: "):])
                if "error" in last:
                    raise RuntimeError(last["error"])
                piece = last.get("text_output", "")
                text.append(piece)
                if on_chunk is not None and piece:
                    on_chunk(piece)
    return {**last, "text_output": "".join(text)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("prompt")
    ap.add_argument("-m", "--model", default=DEFAULT_MODEL)
    ap.add_argument("--stream", action="store_true", help="generate_stream (Server-Sent Events)")
    add_sampling_args(ap)
    a = ap.parse_args(argv)
    if a.protocol != "http" and a.url is None:
        a.url = url_for(None, "http")  # this client always speaks HTTP
    t0 = time.perf_counter()
    try:
        out = generate_http(a.prompt, a.url, a.model, a.stream, on_chunk=lambda t: print(t, end="", flush=True),
                            max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            seed=a.seed, stop_words=a.stop)
    except urllib.error.HTTPError as e:
        print(f"error: HTTP {e.code}: {e.read().decode()}", file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        print(f"error: cannot reach the server: {e.reason}", file=sys.stderr)
        return 1
    if not a.stream:
        print(out["text_output"], end="")
    print()
    print(f"[finish={out.get('finish_reason')} in {(time.perf_counter() - t0) * 1e3:.1f} ms]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
