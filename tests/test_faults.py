"""The fault suite: a real Triton + gateway, stubs killed and stopped, overload, injected faults. After
every case the invariants hold: live, every model ready, a canary embedding and a canary generation
give their golden outputs, the LLM's running/waiting gauges are back to 0, /dev/shm holds as many
regions as at the start. Bounded: each case waits at most 40 s; loopback only."""
from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from export.llm import export
from gateway.settings import GatewaySettings
from gateway.supervisor import scan_stubs
from serve.paths import MODEL_REPOSITORY
from tests.embedding_models import link_repo
from tests.server_fixtures import start_stack

pytestmark = pytest.mark.server
LLM, EMB = "tiny_llama", "minilm_text"
MARKER = "__inject_fault__"
DETECT_S, HEAL_S = 5, 30  # the bounds: detected within 5 s, healed within 30 s


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    repo = link_repo(tmp_path_factory.mktemp("faults") / "repo",
                     [MODEL_REPOSITORY / m for m in ("minilm", EMB, f"{EMB}_tokenize", f"{EMB}_pool")])
    # 2 KV slots and at most 2 waiting: overload is reachable with a handful of requests.
    export(repository=repo, max_seqs=2, max_waiting=2, max_tokens_cap=256)
    os.environ["LLM_FAULT_INJECTION"] = f"{MARKER}=error"  # inherited by the stubs (tests only)
    try:
        settings = GatewaySettings(access_log=False, canary_interval_s=1.0, hang_timeout_s=2.0, max_restarts=20)
        with start_stack(repo, gateway=settings) as s:
            yield s
    finally:
        os.environ.pop("LLM_FAULT_INJECTION", None)


def chat(stack, timeout=30):
    return httpx.post(f"{stack.base_url}/v1/completions", json={"model": LLM, "prompt": "Hello there", "max_tokens": 5,
                                                                "temperature": 0, "ignore_eos": True}, timeout=timeout)


def embedding(stack, timeout=30):
    return httpx.post(f"{stack.base_url}/v1/embeddings", json={"model": EMB, "input": "canary"}, timeout=timeout)


def gauge(stack, name: str) -> float:
    with urllib.request.urlopen(stack.metrics_url, timeout=5) as f:
        return float(re.search(rf'^{name}{{[^}}]*model="{LLM}"[^}}]*}} (\S+)$', f.read().decode(), re.M).group(1))


@pytest.fixture(scope="module")
def golden(stack):
    return chat(stack).json()["choices"][0]["text"], embedding(stack).json()["data"][0]["embedding"], \
        stack.shm_regions()


@pytest.fixture
def invariants(stack, golden):
    yield
    text, vector, regions = golden
    deadline = time.monotonic() + HEAL_S
    while httpx.get(f"{stack.base_url}/health").status_code != 200:
        assert time.monotonic() < deadline, httpx.get(f"{stack.base_url}/health").text
        time.sleep(0.2)
    assert stack.server.process.poll() is None and stack.gateway.process.poll() is None
    assert httpx.get(f"{stack.base_url}/v2/health/live").status_code == 200
    assert chat(stack).json()["choices"][0]["text"] == text
    assert embedding(stack).json()["data"][0]["embedding"] == vector
    deadline = time.monotonic() + 5
    while (gauge(stack, "llm_requests_running"), gauge(stack, "llm_requests_waiting")) != (0, 0):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Triton 2.51 leaks the regions of the stubs of a restarted model (at most 2 instances here; removed
    # when the server stops): nothing else may grow.
    restarted = sum(restarts(stack, m) for m in (LLM, EMB, f"{EMB}_tokenize", f"{EMB}_pool", "minilm"))
    assert len(regions) <= len(stack.shm_regions()) <= len(regions) + 2 * restarted


def stubs_of(stack, model: str) -> list[int]:
    return sorted(scan_stubs(stack.shm_prefix).get(model, {}))


def restarts(stack, model: str) -> float:
    text = httpx.get(f"{stack.base_url}/metrics").text
    return sum(float(v) for v in re.findall(rf'^gateway_model_restarts_total{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M))


def watch_recovery(stack, model: str, other) -> tuple[float, float, int]:
    """Poll the model's readiness at the gateway until it was 503 and is 200 again; call `other`
    meanwhile. Returns (seconds to 503, seconds to healed, failures of `other`)."""
    t0, down_at, failures = time.monotonic(), None, 0
    while time.monotonic() - t0 < HEAL_S + 10:
        status = httpx.get(f"{stack.base_url}/v2/models/{model}/ready").status_code
        if status == 503 and down_at is None:
            down_at = time.monotonic() - t0
            assert httpx.get(f"{stack.base_url}/v2/health/ready").status_code == 503
            assert httpx.get(f"{stack.base_url}/health").status_code == 503
        if down_at is not None and status == 200:
            return down_at, time.monotonic() - t0, failures
        failures += other(stack).status_code != 200
        time.sleep(0.1)
    raise AssertionError(f"{model}: not healed within {HEAL_S + 10} s (503 after {down_at})")


def test_llm_stub_killed_while_idle_heals_and_embeddings_keep_serving(stack, invariants):
    before = restarts(stack, LLM)
    os.kill(stubs_of(stack, LLM)[0], signal.SIGKILL)
    down, healed, failures = watch_recovery(stack, LLM, embedding)
    assert down <= DETECT_S and healed <= HEAL_S and failures == 0
    r = chat(stack)
    assert r.status_code == 200
    assert restarts(stack, LLM) == before + 1


def test_llm_stub_killed_mid_stream_fails_the_stream_with_a_clear_error(stack, invariants):
    events, streaming, done = [], threading.Event(), threading.Event()

    def stream():
        body = {"model": LLM, "prompt": "Hello", "max_tokens": 256, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{stack.base_url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    streaming.set()
        done.set()

    threading.Thread(target=stream, daemon=True).start()
    # Kill at the first streamed token: the tiny model writes all 256 in about 0.3 s on a fast host, so
    # a fixed delay could let the stream finish before the kill.
    assert streaming.wait(30), "the stream never started"
    t0 = time.monotonic()
    os.kill(stubs_of(stack, LLM)[0], signal.SIGKILL)
    assert done.wait(DETECT_S + 2), "the in-flight stream hung"
    assert time.monotonic() - t0 <= DETECT_S
    assert "restarting" in events[-2] and '"model_restarting"' in events[-2] and events[-1] == "data: [DONE]"
    # a request arriving while it restarts is refused fast, retryable
    r = chat(stack, timeout=5)
    assert r.status_code in (200, 503) and (r.status_code == 200 or r.headers["retry-after"])


def test_one_tokenizer_stub_killed_heals_the_pipeline_and_the_llm_keeps_serving(stack, invariants):
    os.kill(stubs_of(stack, f"{EMB}_tokenize")[0], signal.SIGKILL)
    down, healed, failures = watch_recovery(stack, EMB, chat)
    assert down <= DETECT_S and healed <= HEAL_S and failures == 0


def test_stopped_stub_is_a_hang_and_heals(stack, invariants):
    os.kill(stubs_of(stack, LLM)[0], signal.SIGSTOP)
    down, healed, failures = watch_recovery(stack, LLM, embedding)
    assert down <= DETECT_S and healed <= HEAL_S and failures == 0


def test_overload_is_refused_fast_and_every_request_is_accounted_for(stack, invariants):
    # 2 slots + 2 waiting: most are refused. 128 tokens keep each accepted request in the engine long
    # enough that the 16 arrivals overlap even on a loaded 2-core host (48 did not always).
    tokens = 128
    body = {"model": LLM, "prompt": "Hello", "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
    n = 16
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: httpx.post(f"{stack.base_url}/v1/completions", json=body, timeout=60), range(n)))
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 503]
    assert len(ok) + len(refused) == n and len(ok) >= 2 and refused
    assert all(r.json()["usage"]["completion_tokens"] == tokens for r in ok)
    texts = {r.json()["choices"][0]["text"] for r in ok}
    assert len(texts) == 1  # the same greedy text for every accepted request
    for r in refused:
        assert r.json()["error"]["code"] == "overloaded" and "max_waiting" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"


def test_injected_engine_fault_fails_that_request_only(stack, invariants):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        bad = pool.submit(httpx.post, f"{stack.base_url}/v1/completions",
                          json={"model": LLM, "prompt": f"x {MARKER} y", "max_tokens": 4}, timeout=30)
        good = pool.submit(chat, stack)
    assert bad.result().status_code == 500 and "internal engine error" in bad.result().json()["error"]["message"]
    assert good.result().status_code == 200


def test_tritonserver_killed_is_restarted_on_its_ports_and_every_model_serves_again(stack, invariants):
    """Triton 2.51's Python backend can abort the whole server (boost::interprocess::lock_exception when
    a stub dies holding a shared-memory lock: seen in this suite): the stack restarts it, the gateway
    answers 503 + Retry-After meanwhile; then the invariants (golden outputs, gauges, /dev/shm)."""
    models = (LLM, EMB, f"{EMB}_tokenize", f"{EMB}_pool", "minilm")
    old, before, reloads = stack.server.process.pid, stack.server_restarts, sum(restarts(stack, m) for m in models)
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    statuses, refused = [], None
    while time.monotonic() - t0 < HEAL_S:
        statuses.append(httpx.get(f"{stack.base_url}/health").status_code)
        if statuses[-1] == 503 and refused is None:
            refused = chat(stack, timeout=5)
        if refused is not None and statuses[-1] == 200:
            break
        time.sleep(0.2)
    assert refused is not None and refused.status_code == 503 and refused.headers["retry-after"], statuses
    assert statuses[-1] == 200, f"not serving {HEAL_S} s after tritonserver was killed"
    assert stack.server.process.pid != old and stack.server_restarts == before + 1
    assert stack.server.process.poll() is None and not stack.server_down
    time.sleep(2)  # the supervisor starts over on the new stubs: no model is reloaded for the old ones
    assert sum(restarts(stack, m) for m in models) == reloads
