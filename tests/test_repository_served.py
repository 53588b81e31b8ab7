"""The default server (what `make serve` starts) loads and serves every model of model_repository/."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient

from serve.repository import model_dirs
from serve.paths import MODEL_REPOSITORY

pytestmark = pytest.mark.server


def test_every_model_in_the_repository_is_ready(triton):
    names = [d.name for d in model_dirs(MODEL_REPOSITORY)]
    assert {"minilm", "minilm_text", "tiny_llama"} <= set(names)
    with urllib.request.urlopen(f"http://{triton.http_url}/v2/health/ready") as r:
        assert r.status == 200
    client = httpclient.InferenceServerClient(triton.http_url)
    assert [n for n in names if not client.is_model_ready(n)] == []


def test_text_pipeline_and_llm_answer_on_the_default_server(triton):
    client = httpclient.InferenceServerClient(triton.http_url)
    text = httpclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"hello world", b"bonjour"], dtype=object))
    emb = client.infer("minilm_text", [text]).as_numpy("embedding")
    assert emb.shape == (2, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    body = {"text_input": "Once upon a time", "max_tokens": 8, "ignore_eos": True}
    req = urllib.request.Request(f"http://{triton.http_url}/v2/models/tiny_llama/generate", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    assert out["text_output"] and out["finish_reason"] == "length"
