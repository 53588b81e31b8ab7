"""Shared fixtures. `triton`: one real server over the main model repository for the whole session
(started lazily, on the first test that asks). `start_server(repo)`: a private server, as a context
manager, for tests that need their own repository. `embedding_server`: the embedding models only."""
from __future__ import annotations

import pytest

from tests import embedding_models
from tests.server_fixtures import start_server as _start_server


@pytest.fixture(scope="session")
def triton():
    with _start_server() as server:
        yield server


@pytest.fixture
def start_server():
    return _start_server


@pytest.fixture(scope="session")
def embedding_server(tmp_path_factory):
    """Encoders + text pipeline only (symlinked from the main repository): quick to start, isolated
    from the LLM; shared by the embedding tests."""
    with embedding_models.embedding_server(tmp_path_factory.mktemp("embedding")) as server:
        yield server
