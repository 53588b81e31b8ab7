"""clients/: importable functions and CLIs against the real server (exit codes, server messages)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


from clients.embed import embed, throughput
from clients.search_demo import CORPUS, search
from export.specs import MINILM_TEXT
from serve.paths import REPO_ROOT




def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_grpc_and_http_agree(embedding_server):
    texts = ["first text", "zweiter Text"]
    g = embed(texts, embedding_server.grpc_url, "grpc")
    h = embed(texts, embedding_server.http_url, "http")
    assert g.shape == (2, MINILM_TEXT.encoder.hidden_size)
    np.testing.assert_allclose(g, h, atol=1e-6, rtol=0)


def test_embed_splits_long_lists(embedding_server):
    texts = [f"sentence number {i}" for i in range(MINILM_TEXT.max_texts + 3)]
    out = embed(texts, embedding_server.grpc_url)
    assert out.shape == (len(texts), MINILM_TEXT.encoder.hidden_size)
    np.testing.assert_allclose(out[-1], embed([texts[-1]], embedding_server.grpc_url)[0], atol=1e-5, rtol=0)


def test_search_ranks_the_related_sentence_first(embedding_server):
    (best_score, best), *rest = search("a pet that purrs", CORPUS, k=3, url=embedding_server.grpc_url)
    assert best == "The cat curled up on the sofa and purred all afternoon."
    assert best_score > rest[0][0] + 0.1


def test_throughput_mode(embedding_server):
    r = throughput(["short sentence"], requests=16, concurrency=4, url=embedding_server.grpc_url)
    assert r["requests"] == 16 and r["sentences_per_s"] > 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_prints_shape(embedding_server, protocol):
    url = embedding_server.grpc_url if protocol == "grpc" else embedding_server.http_url
    p = cli("clients.embed", "-i", protocol, "-u", url, "hello", "world")
    assert p.returncode == 0, p.stderr
    assert f"embedding (2, {MINILM_TEXT.encoder.hidden_size}) float32" in p.stdout


def test_cli_exits_nonzero_with_server_message(embedding_server):
    p = cli("clients.embed", "-u", embedding_server.grpc_url, "-m", "no_such_model", "hello")
    assert p.returncode == 1
    assert "error:" in p.stderr and "no_such_model" in p.stderr


def test_cli_exits_nonzero_when_server_unreachable():
    from serve.ports import free_port

    p = cli("clients.embed", "-i", "http", "-u", f"127.0.0.1:{free_port()}", "hello")
    assert p.returncode == 1 and "error:" in p.stderr


def test_search_cli(embedding_server):
    p = cli("clients.search_demo", "-u", embedding_server.grpc_url, "-k", "2", "how do I cook pasta?")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[1].strip().endswith("Boil the spaghetti in salted water for nine minutes, then drain it.")


def test_finish_stream_reads_to_the_end_and_cancels_only_a_stuck_or_failing_stream():
    import asyncio

    from clients.llm_stream import finish_stream

    class Stream:  # the parts of a tritonclient.grpc.aio stream_infer iterator that finish_stream uses
        def __init__(self, items=(), hang=False, fail=False):
            self.items, self.hang, self.fail, self.read, self.cancelled = list(items), hang, fail, 0, False

        def __aiter__(self):
            return self

        async def __anext__(self):
            if self.items:
                self.read += 1
                return self.items.pop(0)
            if self.hang:
                await asyncio.sleep(10)
            if self.fail:
                raise RuntimeError("stream broke")
            raise StopAsyncIteration

        def cancel(self):
            self.cancelled = True

    ends = Stream(["trailing response"])
    asyncio.run(finish_stream(ends))
    assert ends.read == 1 and not ends.cancelled  # read to its end: the server completes the call
    stuck = Stream(hang=True)
    asyncio.run(finish_stream(stuck, timeout_s=0.05))
    assert stuck.cancelled
    broken = Stream(fail=True)
    asyncio.run(finish_stream(broken))
    assert broken.cancelled


def test_grpc_clients_and_the_llm_benchmark_import_without_the_http_client():
    """The offline bundle ships tritonclient for gRPC only (no gevent, which tritonclient.http needs):
    bench.llm failed at import on the H200 when clients/common.py imported the HTTP client eagerly."""
    code = ("import sys; sys.modules['gevent'] = None\n"  # None in sys.modules: `import gevent` fails
            "import bench.llm, bench.llm_client, clients.llm_stream, clients.common\n"
            "assert clients.common.module('grpc').__name__ == 'tritonclient.grpc'\n"
            "assert 'tritonclient.http' not in sys.modules\n"
            "try:\n    clients.common.module('http')\nexcept RuntimeError as e:\n    print('http:', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("http: The installation does not include http support"), p.stdout
