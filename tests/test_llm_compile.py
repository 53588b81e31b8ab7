"""torch.compile of the decode step (llm/model.py call_block, llm/runner.py) and its on-disk cache
(serve/environment.py with_compile_cache): the compiled layers equal the eager ones, all layers share
one graph, and a second process with the same cache directory compiles nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve import environment, paths

# One tiny model, one decode batch through the compiled layers; prints what dynamo and inductor did.
PROBE = r"""
import json, sys, tempfile
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from export.random_llm import write_random_checkpoint
from llm import model as M
from llm.kv_cache import KVCache

ckpt = write_random_checkpoint(Path(sys.argv[1]), "tiny")
m, _ = M.load(ckpt, "cpu", torch.float32, 256)
a = m.args
cache = KVCache(a.num_layers, 8, 16, a.num_kv_heads, a.head_dim, torch.float32, torch.device("cpu"))
B = 3
tokens, pos = torch.tensor([5, 6, 7]), torch.tensor([3, 9, 17])
slots = torch.tensor([16 + 3, 2 * 16 + 9, 3 * 16 + 1])
batch = M.Batch(slots=slots, num_decode=B, block_table=torch.tensor([[1, 0], [2, 0], [4, 3]], dtype=torch.int32),
                seq_lens=(pos + 1).to(torch.int32))
with torch.inference_mode():
    eager = m(tokens, pos, cache.layers, batch)
    compiled = m(tokens, pos, cache.layers, batch, block_fn=torch.compile(M.call_block, dynamic=False))
print(json.dumps({"max_abs_diff": (eager - compiled).abs().max().item(), "layers": a.num_layers,
                  "graphs": counters["stats"]["unique_graphs"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"], "hit": counters["inductor"]["fxgraph_cache_hit"]}))
"""


def test_server_env_keeps_compile_caches_across_restarts_and_respects_the_callers():
    env = environment.with_compile_cache({})
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(paths.COMPILE_CACHE / "inductor"),
                   "TRITON_CACHE_DIR": str(paths.COMPILE_CACHE / "triton")}
    assert environment.with_compile_cache({"TORCHINDUCTOR_CACHE_DIR": "/c"})["TORCHINDUCTOR_CACHE_DIR"] == "/c"
    assert environment.server_env()["TRITON_CACHE_DIR"]  # the launcher's environment carries them


def _probe(tmp_path: Path, cache: Path, run: str) -> dict:
    env = environment.with_compile_cache({k: v for k, v in os.environ.items()
                                          if k not in environment.COMPILE_CACHE_ENVS} |
                                         {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
                                          "TRITON_CACHE_DIR": str(cache / "triton"),
                                          "PYTHONPATH": str(paths.REPO_ROOT)})
    p = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / run)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="inductor's CPU backend needs a C++ compiler (Linux CI)")
def test_compiled_layers_equal_eager_share_one_graph_and_a_restart_hits_the_cache(tmp_path):
    cache = tmp_path / "compile-cache"
    cold = _probe(tmp_path, cache, "cold")
    assert cold["max_abs_diff"] < 1e-4, cold
    assert cold["graphs"] == 1 and cold["layers"] == 2, cold  # regional: both layers run one graph
    assert cold["miss"] == 1 and cold["hit"] == 0, cold
    assert any((cache / "inductor").iterdir())
    warm = _probe(tmp_path, cache, "warm")
    assert warm["miss"] == 0 and warm["hit"] == 1, warm  # nothing compiled again
    assert warm["max_abs_diff"] < 1e-4, warm
