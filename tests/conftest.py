"""Shared fixtures. `triton`: what `make serve` runs — tritonserver over the main model repository with
the gateway in front (serve/stack.py), on free ports, for the whole session (started lazily, on the
first test that asks); its `http_url` is the gateway's, `triton_http_url` Triton's own. `start_server(repo)`: a private server, as a context
manager, for tests that need their own repository. `embedding_server`: the embedding models only.
`checkpoint`: the tiny random-weight Llama, and `reference`: transformers' greedy output for
tests/llm_helpers.PROMPTS, once per session for the in-process LLM tests (tests/test_llm_server.py has
its own `reference`, of the served model)."""
from __future__ import annotations

import pytest

from tests import embedding_models
from tests.server_fixtures import start_server as _start_server
from tests.server_fixtures import start_gateway, start_stack


@pytest.fixture(scope="session")
def triton():
    with start_stack() as stack:
        yield stack


@pytest.fixture
def start_server():
    return _start_server


@pytest.fixture(scope="session")
def embedding_server(tmp_path_factory):
    """Encoders + text pipeline only (symlinked from the main repository): quick to start, isolated
    from the LLM; shared by the embedding tests."""
    with embedding_models.embedding_server(tmp_path_factory.mktemp("embedding")) as server:
        yield server


@pytest.fixture(scope="session")
def strict(triton, tmp_path_factory):
    """A second gateway in front of the session's Triton: API keys, one generation at a time, a 1 s
    body timeout."""
    with start_gateway(triton, tmp_path_factory.mktemp("strict"), api_keys=("key-one", "key-two"),
                       max_concurrent_generations=1, body_timeout_s=1.0) as g:
        yield g


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    from export.random_llm import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("llm") / "checkpoint", "tiny")


@pytest.fixture(scope="session")
def reference(checkpoint):
    """transformers greedy generate: generated ids and decoded text per prompt."""
    from tests.llm_helpers import MAX_TOKENS, PROMPTS, hf_greedy

    return hf_greedy(checkpoint, PROMPTS, MAX_TOKENS)
