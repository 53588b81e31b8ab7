"""Starting real tritonservers for tests: free loopback ports, readiness with the log on failure,
terminate-then-kill on teardown (TritonServer.stop)."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export import pbtxt
from export.specs import Tensor
from gateway.settings import GatewaySettings
from serve.launcher import ServerOptions, TritonServer
from serve.ports import free_port
from serve.paths import MODEL_REPOSITORY
from serve.stack import GatewayProcess, ServingStack


def server_options(repo: Path, **overrides) -> ServerOptions:
    return ServerOptions(
        model_repository=Path(repo),
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        exit_timeout_secs=5,
        **overrides,
    )


@contextlib.contextmanager
def start_server(repo: Path = MODEL_REPOSITORY, **overrides):
    """A started, ready server over `repo`; on startup failure the exception holds the log tail."""
    with TritonServer(server_options(repo, **overrides)) as server:
        yield server


@contextlib.contextmanager
def start_stack(repo: Path = MODEL_REPOSITORY, gateway: GatewaySettings | None = None, **overrides):
    """Triton + the gateway (what `make serve` runs) over `repo`, every port free."""
    gateway = (gateway or GatewaySettings()).replace(port=free_port())
    with ServingStack(server_options(repo, **overrides), gateway) as stack:
        yield stack


@contextlib.contextmanager
def start_gateway(stack: ServingStack, tmp: Path, **settings):
    """Another gateway process in front of `stack`'s Triton, with other settings; yields it once ready."""
    s = stack.gateway.settings.replace(port=free_port(), **settings)
    g = GatewayProcess(s, Path(tmp) / "gateway.log").start()
    try:
        yield g.wait_ready()
    finally:
        g.stop()


ADD_ONE_PY = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """y = x + 1: the smallest model that runs a Python backend stub."""

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", (x + 1).astype(np.float32))]))
        return responses
'''


def write_add_one_model(repo: Path, name: str = "add_one") -> Path:
    """A tiny Python-backend model (config from the schema) for launcher/harness tests."""
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.py").write_text(ADD_ONE_PY)
    config = mc.ModelConfig(
        name=name,
        backend="python",
        max_batch_size=8,
        input=[pbtxt.model_input(Tensor("x", "FP32", (-1,)))],
        output=[pbtxt.model_output(Tensor("y", "FP32", (-1,)))],
        instance_group=[pbtxt.instance_group(1, gpu=False)],
    )
    pbtxt.write(config, model_dir)
    return model_dir


def copy_model(name: str, repo: Path, source: Path = MODEL_REPOSITORY) -> Path:
    """Copy one model of the main repository into a private test repository."""
    dst = repo / name
    shutil.copytree(source / name, dst, symlinks=True)
    return dst
