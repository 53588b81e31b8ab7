"""The gateway (what `make serve` puts on port 8000) with the official `openai` package and
tritonclient.http, against the real server: exact against direct gRPC, every error status."""
from __future__ import annotations

import base64
import json
import re
import time
import urllib.request

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as httpclient
from transformers import AutoTokenizer

from clients.llm_stream import generate
from export.pipeline import hf_dir
from export.specs import MINILM_TEXT
from gateway.settings import GatewaySettings
from serve.stack import GatewayProcess
from tests.test_pipeline import MIN_COSINE_FP32, TEXTS, cosine

pytestmark = pytest.mark.server
LLM, EMB = "tiny_llama", MINILM_TEXT.name
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Tell me about Triton."}]
GREEDY = dict(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def client(triton):
    return openai.OpenAI(base_url=f"{triton.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat_prompt(triton):
    tok = AutoTokenizer.from_pretrained(triton.options.model_repository / LLM / "1" / "checkpoint")
    return tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def direct(triton, prompt: str, **params):
    """The same generation straight over Triton's gRPC (the reference the gateway must equal)."""
    r = generate(prompt, triton.grpc_url, LLM, stream=False, return_num_input_tokens=True,
                 return_num_output_tokens=True, **params)
    assert r.error is None, r.error
    return r


def metric(triton, name: str) -> float:
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as f:
        m = re.search(rf'^{name}{{[^}}]*model="{LLM}"[^}}]*}} (\S+)$', f.read().decode(), re.M)
    return float(m.group(1))


def test_every_port_listens_on_loopback_only(triton):
    from tests.test_launcher import listening_addresses

    o = triton.options
    for port in (triton.gateway.settings.port, o.http_port, o.grpc_port, o.metrics_port):
        assert listening_addresses(port) and listening_addresses(port) <= {"0100007F", "0000000000000000FFFF00000100007F"}


def test_models_lists_the_llm_and_the_embedding_model(client):
    assert {m.id for m in client.models.list()} == {LLM, EMB}
    assert client.models.retrieve(LLM).id == LLM


def test_chat_equals_direct_grpc_with_the_chat_template(triton, client, chat_prompt):
    ref = direct(triton, chat_prompt, max_tokens=12, temperature=0.0)
    r = client.chat.completions.create(model=LLM, messages=MESSAGES, **GREEDY)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ref.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.num_input_tokens, 12)
    assert r.usage.total_tokens == ref.num_input_tokens + 12 and r.id.startswith("chatcmpl-")


def test_chat_stream_concatenates_to_the_same_text_and_reports_usage(client):
    whole = client.chat.completions.create(model=LLM, messages=MESSAGES, **GREEDY)
    chunks = list(client.chat.completions.create(model=LLM, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_max_completion_tokens_and_stop(triton, client, chat_prompt):
    r = client.chat.completions.create(model=LLM, messages=MESSAGES, temperature=0, max_completion_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    ref = direct(triton, chat_prompt, max_tokens=12, temperature=0.0).text
    stop = ref.strip()[3:6]  # a piece of the greedy text: generation ends right before it
    r = client.chat.completions.create(model=LLM, messages=MESSAGES, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == ref[: ref.index(stop)]


def test_seeded_sampling_is_reproducible(client):
    a, b = (client.completions.create(model=LLM, prompt="Once upon a time", max_tokens=10, temperature=0.9,
                                      seed=7).choices[0].text for _ in range(2))
    assert a == b


def test_completions_exact_and_streamed_and_echo(triton, client):
    ref = direct(triton, "Once upon a time", max_tokens=10, temperature=0.0)
    r = client.completions.create(model=LLM, prompt="Once upon a time", temperature=0, max_tokens=10)
    assert r.choices[0].text == ref.text and r.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=LLM, prompt="Once upon a time", temperature=0, max_tokens=10, stream=True))
    assert streamed == ref.text
    echo = client.completions.create(model=LLM, prompt=["Once upon a time"], temperature=0, max_tokens=10, echo=True)
    assert echo.choices[0].text == "Once upon a time" + ref.text


def test_embeddings_match_sentence_transformers(client):
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(hf_dir(MINILM_TEXT)), device="cpu").encode(TEXTS)
    r = client.embeddings.create(model=EMB, input=TEXTS)
    out = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    assert cosine(out, ref).min() >= MIN_COSINE_FP32
    assert r.usage.prompt_tokens == r.usage.total_tokens > len(TEXTS)


def test_embeddings_split_over_requests_keep_order_and_base64(client):
    texts = [f"sentence number {i}" for i in range(MINILM_TEXT.max_texts * 2 + 5)]  # 3 Triton requests
    many = np.array([d.embedding for d in client.embeddings.create(model=EMB, input=texts).data], dtype=np.float32)
    for i in (0, 64, 132):
        one = np.array(client.embeddings.create(model=EMB, input=texts[i]).data[0].embedding, dtype=np.float32)
        assert cosine(many[i], one) > 0.99999
    raw = httpx.post(f"{client.base_url}embeddings", json={"model": EMB, "input": texts[:2], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][1]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, many[1])


@pytest.mark.parametrize("call,status,param", [
    (lambda c: c.chat.completions.create(model=LLM, messages=MESSAGES, n=2), 400, "n"),
    (lambda c: c.chat.completions.create(model=LLM, messages=[], max_tokens=1), 400, "messages"),
    (lambda c: c.chat.completions.create(model=LLM, messages=MESSAGES, max_tokens=0), 400, "max_tokens"),
    (lambda c: c.chat.completions.create(model=LLM, messages=MESSAGES, max_tokens=100_000), 400, "max_tokens"),
    (lambda c: c.chat.completions.create(model=LLM, messages=MESSAGES, temperature=5), 400, "temperature"),
    (lambda c: c.chat.completions.create(model=LLM, messages=MESSAGES, logprobs=True), 400, "logprobs"),
    (lambda c: c.chat.completions.create(model=LLM, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "messages.0.content"),
    (lambda c: c.completions.create(model=LLM, prompt="word " * 600, max_tokens=2), 400, "prompt"),
    (lambda c: c.completions.create(model=LLM, prompt=["a", "b"]), 400, "prompt"),
    (lambda c: c.embeddings.create(model=EMB, input=[[1, 2, 3]]), 400, "input"),
    (lambda c: c.embeddings.create(model=EMB, input="x", dimensions=10), 400, "dimensions"),
    (lambda c: c.chat.completions.create(model="nope", messages=MESSAGES), 404, "model"),
    (lambda c: c.embeddings.create(model=LLM, input="x"), 404, "model"),
])
def test_errors_in_openai_shape(client, call, status, param):
    with pytest.raises(openai.APIStatusError) as e:
        call(client)
    assert e.value.status_code == status, e.value.body
    assert e.value.body["param"] == param and e.value.body["message"]
    assert e.value.body["type"] == {400: "invalid_request_error", 404: "not_found_error"}[status]


def test_malformed_json_and_wrong_types_are_400_naming_the_field(triton):
    url = f"{triton.base_url}/v1/chat/completions"
    r = httpx.post(url, content=b'{"model": "tiny_llama", "messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": LLM, "messages": MESSAGES, "max_tokens": "abc"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(url, json=[1, 2])
    assert r.status_code == 400 and "must be a JSON object" in r.json()["error"]["message"]


def test_client_disconnect_cancels_the_generation(triton):
    body = {"model": LLM, "prompt": "Hello", "max_tokens": 256, "ignore_eos": True, "stream": True}
    generated = metric(triton, "llm_generated_tokens_total")
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{triton.base_url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 2  # gauges are published every metrics_interval_s
        while metric(triton, "llm_requests_running") != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert metric(triton, "llm_requests_running") == 1
    deadline = time.monotonic() + 5
    while metric(triton, "llm_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(triton, "llm_requests_running") == 0
    time.sleep(0.2)  # counters are flushed every metrics_interval_s
    assert metric(triton, "llm_generated_tokens_total") - generated < 200  # stopped far short of 256


def test_kserve_pass_through_with_tritonclient_http(triton):
    c = httpclient.InferenceServerClient(triton.http_url)  # the gateway's port
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(EMB)
    assert c.get_model_metadata(EMB)["inputs"][0]["name"] == MINILM_TEXT.text.name
    assert c.get_model_config(LLM)["model_transaction_policy"]["decoupled"]
    text = httpclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"hello", b"world"], dtype=object))
    for binary in (True, False):
        out = c.infer(EMB, [text], outputs=[httpclient.InferRequestedOutput("embedding", binary_data=binary)])
        assert out.as_numpy("embedding").shape == (2, MINILM_TEXT.encoder.hidden_size)


def test_kserve_generate_endpoints_and_their_errors(triton):
    base = f"{triton.base_url}/v2/models/{LLM}"
    ref = direct(triton, "Once upon a time", max_tokens=8, temperature=0.0).text
    r = httpx.post(f"{base}/generate", json={"text_input": "Once upon a time", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["text_output"] == ref
    r = httpx.post(f"{base}/generate_stream", json={"text_input": "Once upon a time", "max_tokens": 8, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == ref and events[-1]["finish_reason"] == "length"
    r = httpx.post(f"{base}/generate", json={"text_input": "hi", "max_tokens": "abc"})
    assert r.status_code == 400 and r.json() == {"error": "max_tokens: expected an integer in [-2147483648, 2147483647] (INT32), got 'abc'"}
    r = httpx.post(f"{base}/generate", content=b"{not json")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_admin_apis_need_the_token_through_the_gateway(triton):
    url = f"{triton.base_url}/v2/models/stats"
    assert httpx.get(url).status_code == 403
    assert httpx.get(url, headers={"admin-token": "wrong"}).status_code == 403
    assert httpx.get(url, headers=triton.admin_headers).status_code == 200
    assert httpx.post(f"{triton.base_url}/v2/repository/index", headers=triton.admin_headers).status_code == 200
    assert httpx.get(f"{triton.base_url}/v2/../v2/models/stats").status_code in (403, 404)
    assert httpx.get(f"{triton.base_url}/v2/anything/else").status_code == 404


def test_api_keys(strict):
    url = f"{strict.settings.url}/v1/models"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer nope"}).json()["error"]["type"] == "authentication_error"
    assert httpx.get(url, headers={"Authorization": "Basic key-one"}).status_code == 401
    for key in ("key-one", "key-two"):
        assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(f"{strict.settings.url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{strict.settings.url}/v2/health/ready").status_code == 401
    c = openai.OpenAI(base_url=f"{strict.settings.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_too_many_generations_are_429_with_retry_after(strict):
    c = openai.OpenAI(base_url=f"{strict.settings.url}/v1", api_key="key-one", max_retries=0)
    with c.completions.create(model=LLM, prompt="Hello", max_tokens=256, stream=True,
                              extra_body={"ignore_eos": True}) as held:
        next(iter(held))
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=LLM, prompt="Hello", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "overloaded"
    # the held stream was closed: its admission came back and the next request is served
    deadline = time.monotonic() + 5
    while True:
        try:
            assert c.completions.create(model=LLM, prompt="Hello", max_tokens=2).usage.completion_tokens == 2
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_not_ready_is_503(tmp_path):
    """A gateway whose Triton is not there answers 503 on its probe and its routes."""
    from serve.ports import free_port

    s = GatewaySettings(port=free_port(), triton_grpc_url=f"127.0.0.1:{free_port()}",
                        triton_http_url=f"127.0.0.1:{free_port()}", admin_token="x")
    g = GatewayProcess(s, tmp_path / "gateway.log").start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"{s.url}/health")
                break
            except httpx.TransportError:
                assert g.process.poll() is None and time.monotonic() < deadline, g.log_path.read_text()
                time.sleep(0.1)
        assert r.status_code == 503
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"model": LLM, "messages": MESSAGES})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        r = httpx.post(f"{s.url}/v2/models/{LLM}/generate", json={"text_input": "x"})
        assert r.status_code == 503 and "unavailable" in r.json()["error"]
    finally:
        g.stop()
