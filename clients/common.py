"""What every client shares: -u/--url, -i/--protocol, -v/--verbose, one infer call for both protocols,
and the CLI error convention (the server's message on stderr, exit status 1)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

PROTOCOLS = ("grpc", "http")
DEFAULT_PROTOCOL = "grpc"
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}


def module(protocol: str):
    assert protocol in PROTOCOLS, f"protocol must be one of {PROTOCOLS}, got {protocol!r}"
    if protocol == "grpc":
        return grpcclient
    # Imported on first use: the offline bundle's client is gRPC only (tritonclient's HTTP client
    # needs gevent), and the gRPC clients and benchmarks must import without it.
    import tritonclient.http as httpclient

    return httpclient


def url_for(url: str | None, protocol: str) -> str:
    return url or DEFAULT_URLS[protocol]


def make_client(url: str | None = None, protocol: str = DEFAULT_PROTOCOL, verbose: bool = False, **kw):
    return module(protocol).InferenceServerClient(url=url_for(url, protocol), verbose=verbose, **kw)


def make_inputs(protocol: str, arrays: dict[str, np.ndarray]) -> list:
    """numpy arrays -> InferInput list; object arrays are sent as BYTES."""
    mod, inputs = module(protocol), []
    for name, a in arrays.items():
        dtype = "BYTES" if a.dtype == np.object_ else np_to_triton_dtype(a.dtype)
        i = mod.InferInput(name, list(a.shape), dtype)
        i.set_data_from_numpy(a)
        inputs.append(i)
    return inputs


def make_outputs(protocol: str, names: list[str]) -> list:
    return [module(protocol).InferRequestedOutput(n) for n in names]


def infer(client, protocol: str, model: str, arrays: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """One request; raises InferenceServerException with the server's message on error."""
    result = client.infer(model, make_inputs(protocol, arrays), outputs=make_outputs(protocol, outputs))
    return {n: result.as_numpy(n) for n in outputs}


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-u", "--url", default=None,
                   help=f"server address (default {DEFAULT_URLS['grpc']} for grpc, {DEFAULT_URLS['http']} for http)")
    p.add_argument("-i", "--protocol", choices=PROTOCOLS, default=DEFAULT_PROTOCOL)
    p.add_argument("-v", "--verbose", action="store_true", help="print requests and responses (tritonclient verbose)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The LLM contract's per-request generation parameters (export/specs.py LLM_IO); unset ones are
    not sent, so the model's defaults apply."""
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop word (repeatable)")


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a CLI body; a server or connection error prints its message and exits 1."""
    try:
        code = main()
    except InferenceServerException as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except ConnectionError as e:
        print(f"error: cannot reach the server: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
