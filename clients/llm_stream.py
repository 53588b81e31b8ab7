"""Streaming text generation over gRPC: prints tokens as they arrive, then TTFT and tokens/s.

    python -m clients.llm_stream "Once upon a time"
    python -m clients.llm_stream -u 127.0.0.1:8001 -m tiny_llama --max-tokens 64 --temperature 0.8 --seed 1 "Hi"
    python -m clients.llm_stream --no-stream "Hello"             # one response with the whole text

Library (also used by the tests and benchmarks):
    generate(prompt, url=None, model=DEFAULT_MODEL, stream=True, on_chunk=None, **params) -> Result
    generate_many(prompts_or_param_dicts, url=None, ...) -> list[Result]  # concurrent, one gRPC stream each
Parameters are the optional inputs of the contract (export/specs.py LLM_IO): max_tokens, temperature,
top_p, top_k, seed, stop_words, exclude_input_in_output, ignore_eos, min_tokens, ...
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from tritonclient.utils import InferenceServerException

from clients.common import add_common_args, add_sampling_args, make_client, make_inputs, run_cli
from export.specs import LLM_IO

DEFAULT_MODEL = "tiny_llama"
# How long finish_stream() waits for the server to close a stream after its final response.
FINISH_TIMEOUT_S = 2.0
DTYPES = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64, "BOOL": np.bool_, "BYTES": np.object_}
SPEC_INPUTS = {t.name: t for t in LLM_IO.inputs}


async def finish_stream(responses, timeout_s: float = FINISH_TIMEOUT_S) -> None:
    """Read a tritonclient.grpc.aio `stream_infer` iterator to its end, once its final response is in.

    Triton then completes the call itself (in 0.3 to 0.6 ms). A call the client cancels or abandons
    instead left something in Triton 2.51 holding the model: a server stop shortly after waited out
    its whole exit timeout in 4 of 12 stops on the CPU box, against 0 of 12 with this (README,
    "slow stop"). After `timeout_s`, or on an error, the call is cancelled."""
    import asyncio

    async def rest():
        async for _ in responses:
            pass

    try:
        await asyncio.wait_for(rest(), timeout_s)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the final response is in; the call only has to end
        responses.cancel()


@dataclass
class Result:
    chunks: list[str] = field(default_factory=list)  # text of each response, in arrival order
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    ttft_s: float | None = None  # first response carrying text
    latency_s: float | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def request_arrays(prompt: str, stream: bool = True, **params) -> dict[str, np.ndarray]:
    """Contract inputs as numpy arrays shaped for the spec (a leading batch dim when the model batches)."""
    values = {"text_input": [prompt.encode("utf-8")], "stream": [stream]}
    for k, v in params.items():
        assert k in SPEC_INPUTS, f"unknown input {k!r}; the contract has {sorted(SPEC_INPUTS)}"
        if v is None:
            continue
        if k == "stop_words":
            v = [w.encode("utf-8") for w in ([v] if isinstance(v, str) else v)]
        values[k] = v if isinstance(v, list) else [v]
    arrays = {}
    for k, v in values.items():
        a = np.array(v, dtype=DTYPES[SPEC_INPUTS[k].dtype])
        arrays[k] = a[None] if LLM_IO.max_batch_size > 0 else a
    return arrays


def first_value(result, name: str):
    """The first element of output `name` (str or int), or None when the response lacks it."""
    a = result.as_numpy(name)
    if a is None:
        return None
    v = a.reshape(-1)[0]
    return v.decode("utf-8") if isinstance(v, bytes) else int(v)


class _Stream:
    """One gRPC stream on its own client; results of its requests are routed by request id."""

    def __init__(self, url, verbose=False):
        self.client = make_client(url, "grpc", verbose)
        self.results: dict[str, tuple[Result, float, threading.Event, object]] = {}
        self.client.start_stream(callback=self._callback)

    def send(self, rid: str, model: str, arrays: dict, on_chunk=None) -> tuple[Result, threading.Event]:
        r, done = Result(), threading.Event()
        self.results[rid] = (r, time.perf_counter(), done, on_chunk)
        self.client.async_stream_infer(model, make_inputs("grpc", arrays), request_id=rid,
                                       enable_empty_final_response=True)
        return r, done

    def _callback(self, result, error):
        if error is not None:
            # Stream errors carry no request id; generate/generate_many send one request per stream.
            for r, t0, done, _ in self.results.values():
                if not done.is_set():
                    r.error, r.latency_s = str(error), time.perf_counter() - t0
                    done.set()
            return
        resp = result.get_response()
        r, t0, done, on_chunk = self.results[resp.id]
        now = time.perf_counter() - t0
        text = first_value(result, "text_output")
        if text is not None:
            r.chunks.append(text)
            if text and r.ttft_s is None:
                r.ttft_s = now
            if on_chunk is not None and text:
                on_chunk(text)
        for name in ("finish_reason", "num_input_tokens", "num_output_tokens"):
            v = first_value(result, name)
            if v is not None:
                setattr(r, name, v)
        if resp.parameters["triton_final_response"].bool_param:
            r.latency_s = now
            done.set()

    def close(self, cancel: bool = False):
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def generate(prompt: str, url: str | None = None, model: str = DEFAULT_MODEL, stream: bool = True,
             on_chunk=None, timeout_s: float = 120.0, verbose: bool = False, **params) -> Result:
    """One request on its own gRPC stream; returns when the final response arrived."""
    s = _Stream(url, verbose)
    try:
        r, done = s.send("0", model, request_arrays(prompt, stream, **params), on_chunk)
        assert done.wait(timeout_s), f"no final response within {timeout_s} s"
        return r
    finally:
        s.close()


def generate_many(requests: list[str | dict], url: str | None = None, model: str = DEFAULT_MODEL,
                  stream: bool = True, timeout_s: float = 120.0, **params) -> list[Result]:
    """Concurrent requests, each on its own gRPC stream (a client each). A request is a prompt or a
    dict of contract inputs with "prompt" (overriding `params`)."""
    streams, pending = [], []
    try:
        for i, req in enumerate(requests):
            req = {"prompt": req} if isinstance(req, str) else dict(req)
            p = {**params, **req}
            prompt, st = p.pop("prompt"), p.pop("stream", stream)
            s = _Stream(url)
            streams.append(s)
            pending.append(s.send(str(i), model, request_arrays(prompt, st, **p)))
        deadline = time.monotonic() + timeout_s
        for r, done in pending:
            assert done.wait(max(0.0, deadline - time.monotonic())), f"no final response within {timeout_s} s"
        return [r for r, _ in pending]
    finally:
        for s in streams:
            s.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("prompt")
    ap.add_argument("-m", "--model", default=DEFAULT_MODEL)
    add_sampling_args(ap)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--echo", action="store_true", help="include the prompt in the output")
    ap.add_argument("--no-stream", action="store_true", help="one response with the whole text")
    a = ap.parse_args(argv)
    assert a.protocol == "grpc", "streaming needs gRPC; for HTTP see clients/llm_http.py"

    def body():
        r = generate(a.prompt, a.url, a.model, stream=not a.no_stream, verbose=a.verbose,
                     on_chunk=lambda t: print(t, end="", flush=True),
                     max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                     seed=a.seed, stop_words=a.stop, ignore_eos=a.ignore_eos or None,
                     exclude_input_in_output=not a.echo, return_num_input_tokens=True, return_num_output_tokens=True)
        print()
        if r.error:
            raise InferenceServerException(r.error)
        n = r.num_output_tokens or 0
        decode_s = (r.latency_s or 0) - (r.ttft_s or 0)
        tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan")
        ttft = f"{r.ttft_s * 1e3:.1f} ms" if r.ttft_s is not None else "n/a"
        print(f"[finish={r.finish_reason} prompt={r.num_input_tokens} tokens, output={n} tokens, "
              f"TTFT {ttft}, {tps:.1f} tokens/s after the first, total {r.latency_s * 1e3:.1f} ms]", file=sys.stderr)

    run_cli(body)
    return 0


if __name__ == "__main__":
    main()
