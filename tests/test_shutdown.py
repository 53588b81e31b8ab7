"""SIGTERM at random moments (starting, idle, with streams in flight): every stop of `make serve`
(Triton + the gateway) ends within exit_timeout + 5 s and leaves no tritonserver, stub or gateway
process and no /dev/shm region. The launcher's signal handling takes no lock (serve/stack.py Signals).
While the gateway drains, new requests get 503 (not "connection refused") and the streams in flight
complete or end with a final error event."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve.ports import free_port
from serve.paths import MODEL_REPOSITORY, REPO_ROOT
from tests.embedding_models import link_repo
from tests.server_fixtures import server_options, write_add_one_model

pytestmark = pytest.mark.server
EXIT_TIMEOUT_S = 5
ROUNDS = 30


def launch(repo: Path, env: dict[str, str] | None = None, exit_timeout_s: int = EXIT_TIMEOUT_S, grpc_port: int = 0):
    opts, gateway_port = server_options(repo), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.launcher", "--quiet", "--model-repository", str(repo), "--http-port", str(gateway_port),
         "--triton-http-port", str(opts.http_port), "--grpc-port", str(grpc_port or opts.grpc_port), "--metrics-port",
         str(opts.metrics_port), "--exit-timeout-secs", str(exit_timeout_s)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    return proc, f"http://127.0.0.1:{gateway_port}", f"triton_py_{proc.pid}_{opts.http_port}_"


@contextlib.contextmanager
def launched(repo: Path, env: dict[str, str] | None = None, **launch_args):
    """launch(), and should the test fail before its own stop, the launcher is still stopped (SIGTERM):
    no server outlives a failed test."""
    proc, url, prefix = launch(repo, env, **launch_args)
    try:
        yield proc, url, prefix
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=EXIT_TIMEOUT_S + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def leftovers(proc: subprocess.Popen, prefix: str) -> list[str]:
    left = [str(p) for p in Path("/dev/shm").glob(prefix + "*")]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if prefix.encode() in cmd:  # tritonserver, its stubs and the gateway all carry the prefix
                left.append(cmd[:120].decode(errors="replace"))
    return left


def stop_and_check(proc, prefix: str, when: str, bound_s: float = EXIT_TIMEOUT_S + 5 + 10) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=EXIT_TIMEOUT_S + 5 + 15)  # the bound is asserted below
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"SIGTERM {when}: the launcher hung") from None
    took = time.monotonic() - t0
    assert took <= bound_s, f"SIGTERM {when}: stop took {took:.1f} s\n{out[-2000:]}"
    # 0: clean stop; 1: Triton ran into its exit-timeout (the launcher then cleans up); -SIGTERM: the
    # signal came before the launcher installed its handling, i.e. before it started anything.
    assert proc.returncode in (0, 1, -signal.SIGTERM), out[-2000:]
    assert leftovers(proc, prefix) == [], f"SIGTERM {when}: left behind\n{out[-2000:]}"
    return took


def test_sigterm_at_random_moments_never_hangs_and_leaves_nothing(tmp_path):
    """30 rounds, three at a time (each its own ports and shm prefix) to fit CI's time."""
    write_add_one_model(tmp_path)
    waits = [random.Random(i).uniform(0, 10) for i in range(ROUNDS)]  # start-up takes ~5-8 s: early moments
    # hit start-up, later ones an idle server

    def round_(i: int) -> None:
        proc, url, prefix = launch(tmp_path)
        time.sleep(waits[i])
        stop_and_check(proc, prefix, f"round {i} after {waits[i]:.1f} s")

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(round_, range(ROUNDS)))


def wait_ready(proc, url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)


def test_sigterm_with_a_stream_in_flight(tmp_path):
    repo = link_repo(tmp_path / "repo", [MODEL_REPOSITORY / "tiny_llama"])
    with launched(repo) as (proc, url, prefix):
        wait_ready(proc, url)
        events, errors, started = [], [], threading.Event()

        def stream():
            body = {"model": "tiny_llama", "prompt": "Hello", "max_tokens": 256, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.read()!r}")
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line)
                            started.set()
            except httpx.HTTPError as e:
                errors.append(e)
            finally:
                started.set()

        t = threading.Thread(target=stream)
        t.start()
        # In flight = its first event has arrived (a request that reaches the gateway only after SIGTERM
        # gets the drain's 503 instead: the next test)
        assert started.wait(60) and events, errors
        stop_and_check(proc, prefix, "with a stream in flight")
        t.join(10)
        # the stream either completed (its final event and [DONE]) or got an error: it never hangs
        assert not t.is_alive() and (errors or events[-1] == "data: [DONE]")


def test_stop_right_after_llm_requests_unloads_cleanly(tmp_path):
    """Streams that ended just before the stop, through the gateway and over direct gRPC (the
    benchmark client): Triton unloads the LLM and exits 0, well within its exit timeout. Before the
    clients read each stream to its end (clients/llm_stream.py finish_stream), about one such stop in
    three waited out the whole exit timeout with the model still referenced; three rounds."""
    from bench.llm_client import drive

    repo = link_repo(tmp_path / "repo", [MODEL_REPOSITORY / "tiny_llama"])
    for round_ in range(3):
        grpc_port = free_port()
        with launched(repo, exit_timeout_s=10, grpc_port=grpc_port) as (proc, url, prefix):
            wait_ready(proc, url)
            body = {"model": "tiny_llama", "prompt": "Hello", "max_tokens": 8, "stream": True}
            for _ in range(2):
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                    assert r.status_code == 200 and list(r.iter_lines())[-2] == "data: [DONE]"
            drive(f"127.0.0.1:{grpc_port}", "tiny_llama", ["Hello world " * 8] * 3, 1, 1)
            took = stop_and_check(proc, prefix, f"round {round_} right after requests")
        # 1 = Triton ran into its exit timeout (the model stayed referenced)
        assert proc.returncode == 0 and took < 10, f"round {round_}: exit {proc.returncode} after {took:.1f} s"


def test_sigterm_drains_new_requests_get_503_and_streams_in_flight_end_cleanly(tmp_path):
    """32 streams of 256 tokens in flight at SIGTERM, the gateway's shutdown_timeout_s set to 0.75 s.
    The streams start staggered: at SIGTERM the first are nearly done and the last has about 255 tokens
    to go, and a stream alone runs at about 250 tokens/s on this CPU, so 0.75 s cannot finish it. (With
    1.5 s, once the early streams had finished, the last ones sometimes did too, in a fresh-clone run,
    and the drain's final error went untested.) While the gateway drains, a new request gets 503 +
    Retry-After with code shutting_down, and /health 503, instead of "connection refused"; every stream
    ends with `data: [DONE]`, either complete or after a final error event (shutting_down), never cut
    off; the whole stop stays within exit_timeout + 5 s and leaves nothing."""
    repo = link_repo(tmp_path / "repo", [MODEL_REPOSITORY / "tiny_llama"])
    with launched(repo, env={"GATEWAY_SHUTDOWN_TIMEOUT_S": "0.75", "GATEWAY_DRAIN_S": "0.75"}) as (proc, url, prefix):
        wait_ready(proc, url)
        body = {"model": "tiny_llama", "prompt": "Hello", "max_tokens": 256, "ignore_eos": True, "stream": True}
        started = [threading.Event() for _ in range(32)]
        streams: list[list[str]] = [[] for _ in range(32)]
        errors = []

        def stream(i: int) -> None:
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                    assert r.status_code == 200, r.read()
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            streams[i].append(line)
                            started[i].set()
            except Exception as e:  # noqa: BLE001 - asserted below: no stream may fail this way
                errors.append(repr(e))
            finally:
                started[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for s in started:
            assert s.wait(60)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            stop = pool.submit(stop_and_check, proc, prefix, "with 32 streams in flight", EXIT_TIMEOUT_S + 5)
            deadline = time.monotonic() + 5  # until the launcher has passed SIGTERM on to the gateway
            while (health := httpx.get(f"{url}/health", timeout=10)).status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            # The gateway drains (streams still in flight keep its listener open): a new request now.
            r = httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=10)
            took = stop.result()
        assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
        assert r.json()["error"]["code"] == "shutting_down"
        assert health.status_code == 503 and health.json() == {"status": "shutting down"}
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        assert errors == []
        ended = 0
        for events in streams:
            assert events[-1] == "data: [DONE]", events[-3:]
            last = json.loads(events[-2].removeprefix("data: "))
            if "error" in last:
                assert last["error"]["code"] == "shutting_down", last
                ended += 1
            else:
                assert last["choices"][0]["finish_reason"] == "length", last
        assert ended > 0, "no stream was still running 0.75 s after SIGTERM: the drain's final error is untested"
        print(f"stop took {took:.1f} s; {ended} of 32 streams ended with the final error")


def test_stop_after_a_stub_died_with_a_request_in_it_exits_0_at_once(tmp_path):
    """A request that reaches an LLM instance after its stub died is never released by Triton 2.51, so
    the instance the supervisor replaced stays live: Triton's own stop would wait out its exit timeout
    and exit 1. The launcher stops it once nothing but such instances is left: exit 0, well within
    the timeout, nothing left behind."""
    import numpy as np
    import tritonclient.grpc as grpc

    from gateway.supervisor import scan_stubs

    repo = link_repo(tmp_path / "repo", [MODEL_REPOSITORY / "tiny_llama"])
    grpc_port = free_port()
    with launched(repo, exit_timeout_s=20, grpc_port=grpc_port) as (proc, url, prefix):
        wait_ready(proc, url)
        os.kill(next(iter(scan_stubs(prefix)["tiny_llama"])), signal.SIGKILL)
        client = grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")  # straight to Triton: into the dead stub
        text = grpc.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"Hello"], dtype=object))
        client.start_stream(callback=lambda result, error: None)
        client.async_stream_infer("tiny_llama", [text])
        deadline, down = time.monotonic() + 40, False
        while True:  # the supervisor restarts the model
            ready = httpx.get(f"{url}/v2/models/tiny_llama/ready").status_code == 200
            down = down or not ready
            if down and ready:
                break
            assert time.monotonic() < deadline, "the LLM did not heal"
            time.sleep(0.2)
        client.stop_stream(cancel_requests=True)
        client.close()
        assert httpx.post(f"{url}/v1/completions", json={"model": "tiny_llama", "prompt": "Hi", "max_tokens": 2},
                          timeout=30).status_code == 200
        took = stop_and_check(proc, prefix, "after a healed stub")
    assert proc.returncode == 0 and took < 15, f"exit {proc.returncode} after {took:.1f} s"
