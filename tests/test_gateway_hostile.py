"""Hostile input through the gateway: no request body takes the server down. After every case the
server is live and a canary chat and embedding answer with their golden outputs.

Triton 2.51's own HTTP server dies (SIGSEGV) on one ~8 MiB form-urlencoded body; the gateway refuses
bodies over max_body_bytes before forwarding and forwards only JSON it has parsed."""
from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.test_gateway import EMB, LLM, MESSAGES

pytestmark = pytest.mark.server
MiB = 1024 * 1024
CONTENT_TYPES = [None, "application/x-www-form-urlencoded", "application/json", "text/plain"]
PATHS = ["/v2/models/minilm_text/infer", "/v2/models/tiny_llama/generate", "/v1/chat/completions", "/v2/models/nope/infer"]


def raw_request(host: str, port: int, head: bytes, body_parts=(), pause_s: float = 0.0, timeout: float = 30) -> bytes:
    """Send a raw HTTP/1.1 request (the body may be refused midway); return what the server answered."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(head)
            for part in body_parts:
                s.sendall(part)
                if pause_s:
                    time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the whole body was sent: the answer is already there
        out = b""
        try:
            while not _complete(out):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return out


def _complete(response: bytes) -> bool:
    """Headers and as many body bytes as Content-Length says have arrived."""
    if b"\r\n\r\n" not in response:
        return False
    head, body = response.split(b"\r\n\r\n", 1)
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def canary(triton):
    """Golden outputs taken before any hostile request; check() asserts the server still gives them."""
    base = triton.base_url

    def chat():
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": LLM, "messages": MESSAGES, "temperature": 0,
                                                             "max_tokens": 6}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    def emb():
        r = httpx.post(f"{base}/v1/embeddings", json={"model": EMB, "input": "canary"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["embedding"]

    golden = (chat(), emb())

    def check():
        assert triton.server.process.poll() is None, "tritonserver died"
        assert triton.gateway.process.poll() is None, "the gateway died"
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"http://{triton.triton_http_url}/v2/health/live").status_code == 200
        assert (chat(), emb()) == golden
    return check


def head(triton, path: str, length: int | None, content_type: str | None, extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {triton.http_url}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + extra + "\r\n\r\n").encode()


@pytest.mark.parametrize("size_mib", [8, 64])
@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_large_bodies_are_413_and_harmless(triton, canary, size_mib, content_type):
    host, port = triton.http_url.split(":")
    body = b"a=" + b"x" * (size_mib * MiB)
    for path in PATHS:
        r = raw_request(host, int(port), head(triton, path, len(body), content_type), [body[i:i + MiB] for i in range(0, len(body), MiB)])
        assert status_of(r) == 413, (path, r[:300])
        assert b"max_body_bytes" in r
    canary()


def test_chunked_body_is_counted_against_the_limit(triton, canary):
    host, port = triton.http_url.split(":")
    chunk = b"x" * MiB
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 8 + [b"0\r\n\r\n"]
    for path in PATHS:
        r = raw_request(host, int(port), head(triton, path, None, "application/x-www-form-urlencoded"), parts)
        assert status_of(r) == 413, (path, r[:300])
    canary()


def test_deep_json_is_400(triton, canary):
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in PATHS[:3]:
        r = httpx.post(f"{triton.base_url}{path}", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested deeper" in r.text, r.text
    nested = b'{"model": "tiny_llama", "messages": ' + b"[" * 100 + b"]" * 100 + b"}"
    r = httpx.post(f"{triton.base_url}/v1/chat/completions", content=nested)
    assert r.status_code == 400 and "nested deeper than 64" in r.text
    canary()


def test_invalid_utf8_and_garbage_are_400(triton, canary):
    for path in PATHS[:3]:
        for body in (b'{"model": "\xff\xfe", "input": "\xc3\x28"}', b"\x00\x01\x02garbage", b"",
                     b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\xed\xa0\x80"]}]}'):
            r = httpx.post(f"{triton.base_url}{path}", content=body)
            assert r.status_code == 400, (path, body, r.text)
    canary()


def test_wrong_types_are_400_naming_the_field(triton, canary):
    cases = [("/v1/chat/completions", {"model": LLM, "messages": "hi"}, "messages"),
             ("/v1/chat/completions", {"model": LLM, "messages": MESSAGES, "stream": "yes"}, "stream"),
             ("/v1/chat/completions", {"model": 7, "messages": MESSAGES}, "model"),
             ("/v1/completions", {"model": LLM, "prompt": "x", "seed": -1}, "seed"),
             ("/v1/embeddings", {"model": EMB, "input": {"a": 1}}, "input"),
             ("/v2/models/tiny_llama/generate", {"text_input": 5}, None),
             ("/v2/models/tiny_llama/generate", {"text_input": "x", "temperature": "hot"}, None),
             ("/v2/models/tiny_llama/generate", {"text_input": "x", "stream": 1}, None)]
    for path, body, param in cases:
        r = httpx.post(f"{triton.base_url}{path}", json=body)
        assert r.status_code == 400, (path, body, r.text)
        err = r.json()["error"]
        if param:
            assert err["param"] == param, err
        else:
            assert next(iter(k for k in body if k in err)) in err, err
    canary()


def test_oversized_headers_are_refused(triton, canary):
    host, port = triton.http_url.split(":")
    big = "\r\nX-Big: " + "y" * (64 * 1024)
    r = raw_request(host, int(port), head(triton, "/v1/embeddings", 2, "application/json", big), [b"{}"])
    assert r == b"" or status_of(r) in (400, 431)
    canary()


def test_slow_loris_body_times_out(triton, canary, strict):
    """A body that trickles in is cut off after body_timeout_s (1 s on the strict gateway) with 408."""
    host, port = strict.settings.host, strict.settings.port
    t0 = time.monotonic()
    r = raw_request(host, port, head(triton, "/v1/embeddings", 1000, "application/json",
                                     "\r\nAuthorization: Bearer key-one"), [b"{"] * 20, pause_s=0.2)
    assert status_of(r) == 408 and time.monotonic() - t0 < 10
    canary()

