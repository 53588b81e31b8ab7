"""The gateway's parts without a server: settings, body limits, validation, routing, error mapping,
deadlines and admission (with a fake backend), the shutdown drain, and the lock-free signal wait of
`make serve`."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from collections import deque

import httpx
import pytest

from gateway import settings as settings_mod
from gateway.app import Drain, create_app
from gateway.body import depth_of, parse_json
from gateway.errors import APIError
from gateway.kserve import COMPILED, check_generate_inputs, fits
from gateway.openai_schema import ChatRequest, CompletionRequest, validate
from gateway.settings import GatewaySettings
from gateway.openai_routes import Admission
from gateway.triton import Chunk, LLMModel, grpc_error, model_error
from llm.settings import EngineSettings
from serve.stack import Signals, gateway_argv

S = GatewaySettings()


def test_settings_from_env_and_flags():
    s = settings_mod.from_env({"GATEWAY_MAX_BODY_BYTES": "100", "GATEWAY_API_KEYS": "a, b", "GATEWAY_ACCESS_LOG": "false"})
    assert (s.max_body_bytes, s.api_keys, s.access_log) == (100, ("a", "b"), False)
    p = argparse.ArgumentParser()
    settings_mod.add_arguments(p)
    s = settings_mod.from_args(p.parse_args(["--port", "9", "--api-key", "k", "--no-access-log"]), env={})
    assert (s.port, s.api_keys, s.access_log) == (9, ("k",), False)
    with pytest.raises(ValueError, match="GATEWAY_MAX_JSON_DEPTH"):
        settings_mod.from_env({"GATEWAY_MAX_JSON_DEPTH": "deep"})
    with pytest.raises(ValueError, match="max_body_bytes must be >= 1"):
        GatewaySettings(max_body_bytes=0)
    with pytest.raises(ValueError, match="together"):
        GatewaySettings(tls_certfile="cert.pem")


def test_launcher_argv_reproduces_the_settings_but_never_the_secrets():
    s = GatewaySettings(port=9100, max_concurrent_generations=3, access_log=False, api_keys=("secret",), admin_token="t")
    argv = gateway_argv(s)
    assert "secret" not in argv and "t" not in argv
    p = argparse.ArgumentParser()
    settings_mod.add_arguments(p)
    assert settings_mod.from_args(p.parse_args(argv), env={}) == s.replace(api_keys=(), admin_token=None)


def test_json_parsing_refuses_what_is_malformed():
    assert depth_of({"a": [1, {"b": []}]}) == 4 and depth_of({}) == 1 and depth_of(5) == 0
    assert parse_json(b'{"a": 1}', S) == {"a": 1}
    for body, words in [(b"", "empty"), (b"{", "not valid JSON"), (b"[1]", "must be a JSON object, got an array"),
                        (b'"x"', "got a string"), (b'{"a": "\xff"}', "UTF-8"),
                        (b'{"a":' + b"[" * 70 + b"]" * 70 + b"}", "nested deeper than 64"),
                        (b"[" * 5000 + b"]" * 5000, "nested deeper")]:
        with pytest.raises(APIError, match=words) as e:
            parse_json(body, S)
        assert e.value.status == 400


@pytest.mark.parametrize("body,param,words", [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}, "n", "only n=1"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop", "at most 4"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 2}}, "logit_bias", "not supported"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream", "boolean"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model", "field required"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "Input should be"),
])
def test_chat_validation_names_the_field(body, param, words):
    with pytest.raises(APIError, match=words) as e:
        validate(ChatRequest, body)
    assert (e.value.status, e.value.param) == (400, param)


def test_requests_map_to_the_llm_contract():
    chat = validate(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 7,
                                  "temperature": 0, "stop": "END", "seed": 3, "top_k": 5})
    assert chat.engine_params() == dict(temperature=0, top_p=1.0, return_num_input_tokens=True, return_num_output_tokens=True,
                                        max_tokens=7, seed=3, top_k=5, stop_words=["END"])
    completion = validate(CompletionRequest, {"model": "m", "prompt": ["p"], "echo": True})
    assert completion.prompt_text == "p" and completion.engine_params()["exclude_input_in_output"] is False


def test_generate_inputs_are_type_checked_against_the_config():
    inputs = {"text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "temperature": "FP32", "seed": "UINT64"}
    check_generate_inputs({"text_input": "x", "max_tokens": 3, "stream": True, "temperature": 1, "seed": 2 ** 64 - 1,
                           "other_parameter": {"any": "thing"}}, inputs)
    for body, field in [({"max_tokens": "abc"}, "max_tokens"), ({"max_tokens": 2 ** 31}, "max_tokens"),
                        ({"stream": 1}, "stream"), ({"temperature": True}, "temperature"), ({"seed": -1}, "seed"),
                        ({"text_input": ["ok", 5]}, "text_input")]:
        with pytest.raises(APIError) as e:
            check_generate_inputs(body, inputs)
        assert e.value.param == field and e.value.status == 400
    assert fits(1.5, "FP64") and not fits(1.5, "INT8") and not fits(128, "INT8") and fits(-128, "INT8")


@pytest.mark.parametrize("path,admin", [
    ("/v2/models/stats", True), ("/v2/models/m/stats", True), ("/v2/models/m/versions/1/stats", True),
    ("/v2/models/m/infer", False), ("/v2/models/m/versions/2/generate_stream", False), ("/v2/health/ready", False),
    ("/v2/systemsharedmemory/region/r/register", True), ("/v2/repository/index", True),
])
def test_routes_forwarded(path, admin):
    match = next((a for p, _, a in COMPILED if p.fullmatch(path)), None)
    assert match is admin


@pytest.mark.parametrize("path", ["/v2/models/../x", "/v2/models/a%2Fb/infer", "/v2/models/m/versions/x/infer",
                                  "/v2/models/" + "m" * 200, "/v2/anything"])
def test_routes_refused(path):
    assert not any(p.fullmatch(path) for p, _, _ in COMPILED)


def test_model_errors_become_statuses():
    e = model_error("max_tokens must be in [1, 256], got 0")
    assert (e.status, e.param) == (400, "max_tokens")
    e = model_error("text_input: prompt has 900 tokens; the context limit is 512")
    assert (e.status, e.param, e.message) == (400, "prompt", "prompt has 900 tokens; the context limit is 512")
    assert model_error("Stub process 'tiny_llama_0_0' is not healthy.").status == 503
    assert model_error("CUDA out of memory").status == 500


def test_queue_refusals_are_retryable_overload():
    """Triton's queue policy (the encoder's max_queue_size / timeout, reached through the pipeline) and
    the engine's admission refuse with UNAVAILABLE: 503 + Retry-After, code overloaded."""
    from tritonclient.utils import InferenceServerException

    for message in ("in ensemble 'minilm_text', Request timeout expired", "Exceeds maximum queue size"):
        e = grpc_error(InferenceServerException(message, status="StatusCode.UNAVAILABLE"), retry_after_s=2)
        assert (e.status, e.code, e.headers) == (503, "overloaded", {"Retry-After": "2"}), message
    e = grpc_error(InferenceServerException("Stub process 'm_0_0' is not healthy.", status="StatusCode.UNAVAILABLE"))
    assert e.status == 503 and "is not healthy" in e.message and e.code is None  # the supervisor's cue
    assert grpc_error(InferenceServerException("bad", status="StatusCode.INVALID_ARGUMENT")).status == 400


def test_embedding_admission_counts_texts_and_always_admits_one_request():
    a = Admission(100, 1, "embedding texts in flight")
    big = a.acquire(500)  # alone: admitted whatever its size
    with pytest.raises(APIError) as e:
        a.acquire(1)
    assert e.value.status == 429 and e.value.code == "overloaded" and "embedding texts" in e.value.message
    big()
    big()  # idempotent
    small = [a.acquire(50), a.acquire(50)]
    with pytest.raises(APIError):
        a.acquire(1)
    small[0]()
    a.acquire(50)
    assert a.active == 100


class FakeTriton:
    """Just enough of gateway.triton.Triton: one LLM whose generations take `step_s` per chunk."""

    def __init__(self, chunks: int, step_s: float):
        self.chunks, self.step_s, self.ready, self.discovered = chunks, step_s, True, True
        self.llms, self.embedders, self.closed = {"fake": LLMModel("fake", frozenset(), EngineSettings())}, {}, 0

    def require_ready(self):
        pass

    def llm(self, name):
        return self.llms[name]

    async def generate(self, model, prompt, params, stream, timeout_s=None):
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            for i in range(self.chunks):
                await asyncio.sleep(self.step_s)
                if asyncio.get_running_loop().time() > deadline:  # what the gRPC deadline does in Triton.generate
                    raise APIError(504, "generation did not finish within (request_timeout_s)")
                last = i == self.chunks - 1
                yield Chunk(f"t{i} ", "length" if last else None, 1 if last else None, self.chunks if last else None)
        finally:
            self.closed += 1


def call(app, body: dict) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            return await c.post("/v1/completions", json=body)
    return asyncio.run(go())


def test_deadline_504_and_stream_error_event_and_admission_given_back():
    """A deadline before the first chunk is a 504; one while streaming is a final error event; either way
    the generation is closed and its admission given back."""
    fake = FakeTriton(chunks=50, step_s=0.02)
    app = create_app(S.replace(request_timeout_s=0.2, max_concurrent_generations=1, access_log=False), fake)
    routes = app.app.state.openai
    r = call(app, {"model": "fake", "prompt": "x"})
    assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"]
    assert routes.admission.active == 0 and fake.closed == 1
    r = call(app, {"model": "fake", "prompt": "x", "stream": True})
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert r.status_code == 200 and '"timeout_error"' in events[-2] and events[-1] == "data: [DONE]"
    assert routes.admission.active == 0 and fake.closed == 2
    fast = create_app(S.replace(access_log=False), FakeTriton(chunks=3, step_s=0))
    r = call(fast, {"model": "fake", "prompt": "x"})
    assert r.json()["choices"][0]["text"] == "t0 t1 t2 " and r.json()["usage"]["completion_tokens"] == 3


def test_signal_wait_needs_no_lock():
    signals = Signals()
    try:
        assert not signals.wait(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.wait(1.0) and signals.received == signal.SIGTERM
    finally:
        signals.close()


class ReloadingTriton:
    """What the supervisor needs of gateway.triton.Triton; reload fails `fail` times."""

    def __init__(self, fail: int):
        self.fail, self.down, self.dependents, self.reloads = fail, {}, {"step": {"pipeline"}}, 0
        self.steps, self.outages, self.gone = {"pipeline": ["step"]}, 0, False
        self.discovered, self.stale_ready, self.llms, self.embedders = True, False, {}, {}

    @property
    def ready(self):  # the gateway's view lags Triton's by up to a poll (stale_ready)
        return not self.gone or self.stale_ready

    async def reachable(self):
        return not self.gone

    def mark_down(self, model, reason):
        self.down[model] = reason
        for m in self.dependents.get(model, ()):
            self.down[m] = reason

    def mark_up(self, model):
        self.down.pop(model, None)
        self.down.pop("pipeline", None)

    async def reload(self, model):
        self.reloads += 1
        if self.reloads <= self.fail:
            raise RuntimeError("load failed")

    async def canary(self, model):
        pass


def heal(fail: int, max_restarts: int) -> tuple:
    from gateway.supervisor import Supervisor

    async def go():
        t = ReloadingTriton(fail)
        sup = Supervisor(S.replace(max_restarts=max_restarts, supervise_interval_s=0.01), t)
        sup._heal_soon("step", "stub process exited")
        assert t.down == {"step": "model 'step' is restarting (stub process exited)",
                          "pipeline": "model 'step' is restarting (stub process exited)"}
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not sup.healing:
                break
        return t, sup
    return asyncio.run(go())


def test_supervisor_heals_and_then_serves_again():
    t, sup = heal(fail=1, max_restarts=3)
    assert t.reloads == 2 and t.down == {} and not sup.gave_up


def test_supervisor_gives_up_after_max_restarts_and_stays_down():
    t, sup = heal(fail=100, max_restarts=3)
    assert t.reloads == 3 and sup.gave_up == {"step"}
    assert "failed 3 times" in t.down["step"] and "not restarted again" in t.down["pipeline"]


async def until_healed(sup) -> None:
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not sup.healing:
            return


def test_supervisor_waits_out_a_triton_outage_without_counting_it():
    """A reload that fails because tritonserver itself is gone (the launcher restarts it) is not the
    model's failure: not counted toward max_restarts; the heal waits for Triton, then succeeds."""
    from gateway.supervisor import Supervisor

    async def go():
        t = ReloadingTriton(fail=1)
        t.gone = True
        sup = Supervisor(S.replace(max_restarts=1, supervise_interval_s=0.01), t)
        sup._heal_soon("step", "stub process exited")
        await asyncio.sleep(0.2)
        assert sup.healing == {"step"} and t.reloads == 1 and not sup.gave_up  # waiting for Triton
        t.gone = False
        await until_healed(sup)
        return t, sup
    t, sup = asyncio.run(go())
    assert t.reloads == 2 and t.down == {} and not sup.gave_up


def test_supervisor_starts_over_on_a_new_triton():
    """After an outage Triton is a new process: stub baselines and restart history go, and a model it
    had given up on is reloaded and serves again (the ensemble using it too)."""
    from gateway.supervisor import Supervisor

    async def go():
        t = ReloadingTriton(fail=0)
        sup = Supervisor(S.replace(max_restarts=1, supervise_interval_s=0.01), t)
        sup.baseline, sup.gave_up, sup.restarts = {"step": {123}}, {"step"}, {"step": deque([time.monotonic()])}
        t.mark_down("step", "model 'step' failed 1 times within 600 s and is not restarted again")
        t.outages = 1
        sup._start_over()
        assert sup.outages == 1 and sup.baseline == {} and not sup.gave_up
        await until_healed(sup)
        return t, sup
    t, sup = asyncio.run(go())
    assert t.reloads == 1 and t.down == {}


def test_supervisor_leaves_stubs_that_died_with_triton_to_the_launcher(monkeypatch):
    """Stubs die with tritonserver: while Triton is unreachable (even before the gateway's next poll
    notices) that is no model's crash, and nothing is reloaded; a stub dying under a live Triton is."""
    from gateway import supervisor
    from gateway.supervisor import Supervisor

    monkeypatch.setattr(supervisor, "scan_stubs", lambda prefix: {})  # every stub gone

    async def go():
        t = ReloadingTriton(fail=0)
        t.gone, t.stale_ready = True, True
        sup = Supervisor(S.replace(supervise_interval_s=0.01, stub_shm_prefix="p_"), t)
        sup.baseline = {"step": {123}}
        sup.start()
        await asyncio.sleep(0.2)
        assert t.reloads == 0 and not sup.healing and t.down == {}
        t.gone = False  # a live Triton, still without the stub: a crash
        await asyncio.sleep(0.2)
        await until_healed(sup)
        await sup.close()
        return t
    assert asyncio.run(go()).reloads == 1


def test_drain_answers_503_then_ends_what_is_still_in_flight():
    """While draining: every route but /metrics answers 503 + Retry-After (code shutting_down; /health
    {"status": "shutting down"}; KServe routes in KServe's shape). The drain is over after drain_s when
    nothing is in flight; else at shutdown_timeout_s the requests in flight are ended, then it is over."""
    ended = []
    app = create_app(S.replace(access_log=False, drain_s=1, shutdown_timeout_s=5), FakeTriton(chunks=1, step_s=0))
    app.drain.end_in_flight = lambda reason, code: ended.append((reason, code)) or 3
    app.drain.since = 100.0

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            return [await c.post("/v1/completions", json={"model": "fake", "prompt": "x"}), await c.get("/health"),
                    await c.get("/v2/health/ready"), await c.get("/metrics")]
    completion, health, ready, metrics = asyncio.run(go())
    assert completion.status_code == 503 and completion.headers["retry-after"] == "1"
    assert completion.json()["error"]["code"] == "shutting_down"
    assert health.status_code == 503 and health.json() == {"status": "shutting down"}
    assert ready.status_code == 503 and "shutting down" in ready.json()["error"]
    assert metrics.status_code == 200
    d = app.drain
    assert not d.done(100.5) and d.done(101.0)  # idle: over after drain_s
    d.active = 2
    assert not d.done(104.9) and ended == []
    assert not d.done(105.0) and ended == [("the gateway is shutting down", "shutting_down")]
    assert not d.done(105.1) and d.done(105.0 + 0.5)  # their final errors get END_FLUSH_S to go out
    d2 = Drain(S.replace(drain_s=30, shutdown_timeout_s=2))
    assert d2.drain_s == 2  # never longer than the shutdown budget
