"""The text -> embedding pipeline through the real server, against sentence-transformers itself."""
from __future__ import annotations

import numpy as np
import pytest

from tritonclient.utils import InferenceServerException

from clients.common import infer, make_client
from clients.embed import embed, text_array
from export import pbtxt
from export.pipeline import export_pipeline, hf_dir
from export.specs import MINILM_TEXT
from serve.paths import MODEL_REPOSITORY

SPEC = MINILM_TEXT
MODEL = SPEC.name
MIN_COSINE_FP32 = 0.9999  # issue 3: the pipeline matches sentence-transformers' encode in fp32
TEXTS = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Größere Änderungen kosten Zeit — naïve café, façade, smörgåsbord.",
    "東京は日本の首都です。",
    "Привет, как дела?",
    "emoji 🙂 and symbols ∑ ≤ ∞",
    "x",
]


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(hf_dir(SPEC)), device="cpu")


def url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_configs_are_generated_from_the_spec(tmp_path):
    """The committed configs equal a fresh generation (names, dims, parameters all from the spec)."""
    written = export_pipeline(tmp_path)
    assert {d.name for d in written} == {MODEL, f"{MODEL}_tokenize", f"{MODEL}_pool"}
    for d in written:
        assert pbtxt.read(d) == pbtxt.read(MODEL_REPOSITORY / d.name), d.name
    config = pbtxt.read(MODEL_REPOSITORY / MODEL)
    assert [i.name for i in config.input] == [SPEC.text.name] and list(config.input[0].dims) == [-1]
    assert [o.name for o in config.output] == [SPEC.embedding.name]
    assert list(config.output[0].dims) == [-1, SPEC.encoder.hidden_size]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_matches_sentence_transformers(embedding_server, sentence_transformer, protocol):
    out = embed(TEXTS, url(embedding_server, protocol), protocol)
    ref = sentence_transformer.encode(TEXTS)
    assert out.shape == (len(TEXTS), SPEC.encoder.hidden_size) and out.dtype == np.float32
    assert cosine(out, ref).min() >= MIN_COSINE_FP32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_empty_string(embedding_server, sentence_transformer):
    out = embed(["", "not empty"], embedding_server.grpc_url)
    assert cosine(out[0], sentence_transformer.encode([""])[0]) >= MIN_COSINE_FP32
    assert np.isclose(np.linalg.norm(out[0]), 1.0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 7, SPEC.max_texts])
def test_batch_sizes_are_independent(embedding_server, n):
    """Each row depends only on its own text: a batch of n equals the rows embedded alone."""
    texts = [TEXTS[i % len(TEXTS)] + f" #{i}" for i in range(n)]
    out = embed(texts, embedding_server.grpc_url)
    assert out.shape == (n, SPEC.encoder.hidden_size)
    for i in sorted({0, n // 2, n - 1}):
        alone = embed([texts[i]], embedding_server.grpc_url)[0]
        np.testing.assert_allclose(out[i], alone, atol=1e-5, rtol=0)


def test_long_text_is_truncated_to_max_seq_len(embedding_server):
    """A text over max_seq_len tokens embeds like its first max_seq_len - 2 tokens ([CLS] ... [SEP])."""
    words = ["apple", "river", "music", "green", "table", "house"]  # one WordPiece token each
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dir(SPEC) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    assert all(len(tok.encode(w, add_special_tokens=False).ids) == 1 for w in words)
    keep = SPEC.encoder.max_seq_len - 2
    long = " ".join(words[i % len(words)] for i in range(3 * SPEC.encoder.max_seq_len))
    cut = " ".join(words[i % len(words)] for i in range(keep))
    shorter = " ".join(words[i % len(words)] for i in range(keep - 1))
    out = embed([long, cut, shorter], embedding_server.grpc_url)
    np.testing.assert_allclose(out[0], out[1], atol=1e-5, rtol=0)
    assert np.abs(out[0] - out[2]).max() > 1e-4  # one token less does change it: truncation is exact


BAD_REQUESTS = {
    # name: (inputs as {name: array}, text in the error message)
    "wrong dtype": ({SPEC.text.name: np.array([1.0, 2.0], np.float32)}, "data-type is 'FP32', but model"),
    "wrong shape": ({SPEC.text.name: text_array(["a", "b"]).reshape(2, 1)}, "unexpected shape for input 'text'"),
    "batch over max": ({SPEC.text.name: text_array(["a"] * (SPEC.max_texts + 1))},
                       f"holds {SPEC.max_texts + 1} strings; 1..{SPEC.max_texts} per request"),
    "unknown input": ({SPEC.text.name: text_array(["a"]), "prompt": text_array(["b"])}, "Got input(s) ['prompt','text']"),
    "no strings": ({SPEC.text.name: text_array([])}, "holds 0 strings"),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_invalid_argument_and_server_keeps_serving(embedding_server, protocol, case):
    arrays, message = BAD_REQUESTS[case]
    client = make_client(url(embedding_server, protocol), protocol)
    with pytest.raises(InferenceServerException) as e:
        infer(client, protocol, MODEL, arrays, [SPEC.embedding.name])
    assert message in e.value.message()
    assert e.value.status() == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400")
    ok = infer(client, protocol, MODEL, {SPEC.text.name: text_array(["still serving"])}, [SPEC.embedding.name])
    assert ok[SPEC.embedding.name].shape == (1, SPEC.encoder.hidden_size)


def test_bls_variant_equals_the_ensemble(tmp_path, embedding_server):
    """The single-model (BLS) shape of the pipeline, kept for the benchmark, computes the same embeddings."""
    from tests.embedding_models import link_repo
    from tests.server_fixtures import start_server

    repo = link_repo(tmp_path / "repo", [MODEL_REPOSITORY / SPEC.encoder.variant_name(SPEC.encoder_precision)])
    (bls_dir,) = export_pipeline(repo, kind="bls", name="text_bls")
    assert pbtxt.read(bls_dir).backend == "python"
    with start_server(repo) as server:
        out = embed(TEXTS, server.grpc_url, model="text_bls")
    np.testing.assert_allclose(out, embed(TEXTS, embedding_server.grpc_url), atol=1e-5, rtol=0)
