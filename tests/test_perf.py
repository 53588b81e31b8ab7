"""`make perf`: the perf_analyzer binary from setup runs against a real server with derived shapes."""
from __future__ import annotations

import subprocess
import sys

import pytest

from serve import perf
from serve.paths import REPO_ROOT
from tests.server_fixtures import start_server, write_add_one_model
from export import pbtxt

pytestmark = pytest.mark.server


def test_shapes_derived_from_config(tmp_path):
    config = pbtxt.read(write_add_one_model(tmp_path))
    assert perf.shape_args(config, 16) == ["--shape=x:16"]


def test_default_input_data_is_valid_for_token_ids(tmp_path):
    write_add_one_model(tmp_path)
    cmd = perf.perf_command("add_one", "u", "grpc", tmp_path, [], 16, tmp_path, "t")
    assert "--input-data=zero" in cmd
    mine = perf.perf_command("add_one", "u", "grpc", tmp_path, ["--input-data=random"], 16, tmp_path, "t")
    assert "--input-data=zero" not in mine and mine[-1] == "--input-data=random"


def test_llm_input_data_follows_the_contract():
    from tritonclient.grpc import model_config_pb2 as mc

    config = mc.ModelConfig(input=[mc.ModelInput(name="text_input"), mc.ModelInput(name="max_tokens")])
    assert perf.llm_input_data(config, "hi", 8) == {"data": [{"text_input": ["hi"], "max_tokens": [8]}]}


def test_perf_analyzer_measures_a_model(tmp_path):
    write_add_one_model(tmp_path)
    with start_server(tmp_path) as server:
        out = subprocess.run(
            [sys.executable, "-m", "serve.perf", "-m", "add_one", "--model-repository", str(tmp_path),
             "-u", server.grpc_url, "--concurrency-range", "2", "--measurement-mode", "count_windows",
             "--measurement-request-count", "50", "--stability-percentage", "1000"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Throughput:" in out.stdout and "infer/sec" in out.stdout


def test_unknown_model_is_an_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "serve.perf", "-m", "nope", "--model-repository", str(tmp_path)],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "no model 'nope'" in out.stderr
