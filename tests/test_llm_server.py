"""The streaming LLM through a real tritonserver (gRPC streaming and HTTP generate endpoints),
exact against transformers. A private repository holds only the tiny random-weight Llama."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from clients.llm_stream import _Stream, generate, generate_many, request_arrays
from export.llm import export
from tests.server_fixtures import start_server

MODEL = "tiny_llama"
MODEL_SI8 = "tiny_llama_si8"  # the same checkpoint, one response every 8 tokens (stream_interval=8)
SLOTS = 8  # fewer than the 16/32 concurrent requests below: requests also wait for slots
MAX_TOKENS = 16
LONG = 400  # max_tokens_cap of the test model; the cancellation test asks for this many
PROMPTS = [  # mixed lengths: 2 to ~130 tokens
    "Hello world",
    "a",
    "Once upon a time, there was a small model that wanted to generate text very quickly.",
    "What is machine learning? " * 15,
    "Ünïcödé 🙂 中文",
    "def main(): print(0)",
    "The key value cache holds the attention keys and values",
    "User: How are you today? Assistant:",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("llm_repo")
    export(repository=repo, max_seqs=SLOTS, max_tokens_cap=LONG)
    export(name=MODEL_SI8, repository=repo, max_seqs=2, max_tokens_cap=LONG, stream_interval=8)
    with start_server(repo) as s:
        yield s


@pytest.fixture(scope="module")
def reference(server):
    """transformers greedy generate on the exported checkpoint: prompt -> (ids, text)."""
    from tests.llm_helpers import hf_greedy

    ckpt = server.options.model_repository / MODEL / "1" / "checkpoint"
    return hf_greedy(ckpt, set(PROMPTS + [f"request {i}: tell me about {i * 7} foxes" for i in range(32)]), MAX_TOKENS)


def run(server, prompt, **params):
    r = generate(prompt, server.grpc_url, MODEL, **params)
    assert r.error is None, r.error
    return r


def test_greedy_matches_transformers_concurrency_1(server, reference):
    for p in PROMPTS:
        r = run(server, p, max_tokens=MAX_TOKENS, return_num_output_tokens=True)
        ids, text = reference[p]
        assert r.text == text, p
        assert r.num_output_tokens == len(ids)
        assert r.finish_reason == ("stop" if len(ids) < MAX_TOKENS else "length")


def test_greedy_matches_transformers_concurrency_16(server, reference):
    prompts = PROMPTS * 2
    results = generate_many(prompts, server.grpc_url, MODEL, max_tokens=MAX_TOKENS, return_num_output_tokens=True)
    for p, r in zip(prompts, results):
        assert r.error is None, r.error
        assert (r.text, r.num_output_tokens) == (reference[p][1], len(reference[p][0])), p


def test_32_concurrent_streams_no_loss_no_crosstalk(server, reference):
    prompts = [f"request {i}: tell me about {i * 7} foxes" for i in range(32)]
    results = generate_many(prompts, server.grpc_url, MODEL, max_tokens=MAX_TOKENS, return_num_output_tokens=True)
    for p, r in zip(prompts, results):
        assert r.error is None, r.error
        assert r.finish_reason in ("stop", "length")
        assert r.text == reference[p][1], p  # each stream got its own tokens, all of them
        assert r.num_output_tokens == len(reference[p][0])
        assert len(r.chunks) >= 2  # streamed: several responses, the last one final


def test_stream_concatenation_equals_non_streaming_text(server):
    for p in PROMPTS[:4]:
        s = run(server, p, stream=True, max_tokens=24, ignore_eos=True)
        n = run(server, p, stream=False, max_tokens=24, ignore_eos=True)
        assert len(n.chunks) == 1 and len(s.chunks) > 2
        assert s.text == n.text


def test_echo_prompt(server, reference):
    p = PROMPTS[0]
    r = run(server, p, max_tokens=MAX_TOKENS, exclude_input_in_output=False)
    assert r.text == p + reference[p][1]


def test_seeded_sampling_reproducible(server):
    params = dict(max_tokens=24, temperature=1.0, top_p=0.95, top_k=40, seed=7, ignore_eos=True)
    a = run(server, "Hello world", **params).text
    b = generate_many(["Hello world", "a", "Hello world"], server.grpc_url, MODEL, **params)
    assert a == b[0].text == b[2].text
    assert run(server, "Hello world", **{**params, "seed": 8}).text != a


def test_stop_words_cut_exactly(server, reference):
    p = PROMPTS[2]
    full = reference[p][1]
    stop = full[len(full) // 3 : len(full) // 3 + 4]  # spans token boundaries
    for stream in (True, False):
        r = run(server, p, stream=stream, max_tokens=MAX_TOKENS, stop_words=[stop, "zzzz-not-there"])
        assert r.finish_reason == "stop"
        assert r.text == full[: full.find(stop)]


def test_max_tokens_honoured(server):
    for n in (1, 5, 33):
        r = run(server, "Hello", max_tokens=n, ignore_eos=True, return_num_output_tokens=True,
                return_num_input_tokens=True)
        assert (r.num_output_tokens, r.finish_reason) == (n, "length")
        assert r.num_input_tokens == 2  # BOS + "Hello"


def _metric(server, name: str, model: str = MODEL) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as f:
        text = f.read().decode()
    m = re.search(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_cancelled_stream_stops_and_frees_its_slot(server):
    generated_before = _metric(server, "llm_generated_tokens_total")
    streams, firsts = [], []
    for i in range(SLOTS):  # occupy every slot with a long generation
        s = _Stream(server.grpc_url)
        got = threading.Event()
        r, _ = s.send(str(i), MODEL, request_arrays("Hello world", True, max_tokens=LONG, ignore_eos=True),
                      on_chunk=lambda t, got=got: got.set())
        streams.append((s, r))
        firsts.append(got)
    for got in firsts:
        assert got.wait(30)
    for s, _ in streams:
        s.close(cancel=True)
    deadline = time.monotonic() + 10
    while _metric(server, "llm_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(server, "llm_requests_running") == 0
    time.sleep(0.2)  # the token counter is flushed every metrics_interval_s
    generated = _metric(server, "llm_generated_tokens_total") - generated_before
    # Cancelled after their first tokens, the streams stopped far short of SLOTS x LONG tokens.
    assert SLOTS <= generated < SLOTS * LONG / 2, generated
    follow = run(server, "Hello", max_tokens=3, ignore_eos=True)
    assert follow.finish_reason == "length"


@pytest.mark.parametrize("params,field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=LONG + 1), "max_tokens"),  # over max_tokens_cap
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_parameters_invalid_argument(server, params, field):
    r = generate("Hello", server.grpc_url, MODEL, **params)
    # gRPC stream errors carry only the message (HTTP's status code is checked below).
    assert r.error is not None and r.error.startswith(f"{field} must be"), r.error
    assert r.chunks == []


def test_prompt_over_context_limit(server):
    r = generate("word " * 600, server.grpc_url, MODEL, max_tokens=4)
    assert r.error is not None and "context limit" in r.error and "text_input" in r.error


def _post(server, path: str, body: dict):
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/{MODEL}/{path}",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=30)


def test_http_generate(server, reference):
    p = PROMPTS[0]
    with _post(server, "generate", {"text_input": p, "max_tokens": MAX_TOKENS}) as f:
        out = json.loads(f.read())
    assert out["text_output"] == reference[p][1]


def test_http_generate_stream_sse(server, reference):
    p = PROMPTS[2]
    with _post(server, "generate_stream", {"text_input": p, "max_tokens": MAX_TOKENS, "stream": True}) as f:
        events = [json.loads(line[len(b"data: "):]) for line in f.read().splitlines() if line.startswith(b"data: ")]
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == reference[p][1]


def test_http_bad_parameter_is_400(server):
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(server, "generate", {"text_input": "Hello", "max_tokens": 0})
    assert e.value.code == 400
    assert "max_tokens" in e.value.read().decode()


def test_metrics_exported(server):
    run(server, "Hello", max_tokens=4)
    time.sleep(0.3)  # gauges/counters are flushed every metrics_interval_s
    assert _metric(server, "llm_generated_tokens_total") >= 4
    assert _metric(server, "llm_time_to_first_token_seconds_count") >= 1
    assert _metric(server, "llm_inter_token_latency_seconds_count") >= 1
    assert _metric(server, "llm_kv_cache_usage_ratio") == 0.0
    assert _metric(server, "llm_requests_waiting") == 0
    # Engine-loop timing: at least one step per generated token, each with some host time.
    assert _metric(server, "llm_engine_steps_total") >= 4
    assert _metric(server, "llm_engine_host_seconds_total") > 0
    assert _metric(server, "llm_engine_device_wait_seconds_total") >= 0
    assert _metric(server, "llm_gc_pause_seconds_total") >= 0
    assert _metric(server, "llm_engine_device_idle_seconds_total") == 0  # CPU: no device events


def test_token_counter_current_at_final_response(server):
    # The counter is flushed before the final response is sent: no waiting for a metrics interval.
    for n in (8, 1, 13):
        before = _metric(server, "llm_generated_tokens_total")
        run(server, "Hello", max_tokens=n, ignore_eos=True)
        assert _metric(server, "llm_generated_tokens_total") - before == n


def test_first_streamed_response_not_coalesced(server):
    # stream_interval=8 coalesces later responses, but the first one carries the first token only.
    per_token = run(server, "Hello world", max_tokens=20, ignore_eos=True)
    coalesced = generate("Hello world", server.grpc_url, MODEL_SI8, max_tokens=20, ignore_eos=True,
                         return_num_output_tokens=True)
    assert coalesced.error is None, coalesced.error
    assert len(per_token.chunks) >= 17 and per_token.chunks[0] != ""
    assert coalesced.chunks[0] == per_token.chunks[0]
    assert len(coalesced.chunks) == 4  # tokens 1 | 2-9 | 10-17 | 18-20 (final)
    assert coalesced.text == per_token.text and coalesced.num_output_tokens == 20


def test_http_client_library(server, reference):
    from clients.llm_http import generate_http

    p = PROMPTS[0]
    chunks = []
    out = generate_http(p, server.http_url, MODEL, stream=True, on_chunk=chunks.append, max_tokens=MAX_TOKENS)
    assert out["text_output"] == "".join(chunks) == reference[p][1]
    assert out["finish_reason"] in ("stop", "length")


def test_stream_client_cli(server, capsys):
    from clients import llm_stream

    with pytest.raises(SystemExit) as e:
        llm_stream.main(["-u", server.grpc_url, "--max-tokens", "5", "--ignore-eos", "Hello"])
    assert e.value.code == 0
    err = capsys.readouterr().err
    assert "finish=length" in err and "output=5 tokens" in err and "TTFT" in err


def test_chat_cli(server, monkeypatch, capsys):
    from clients import chat

    lines = iter(["Hi there", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    ckpt = server.options.model_repository / MODEL / "1" / "checkpoint"
    with pytest.raises(SystemExit) as e:
        chat.main(["-u", server.grpc_url, "--checkpoint", str(ckpt), "--max-tokens", "4"])
    assert e.value.code == 0
    out = capsys.readouterr()
    assert "chat template" in out.err and "assistant> " in out.out
