"""The launcher's refusals, its admin-API restriction and its clean shutdown, against real servers."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from serve import environment
from gateway.settings import GatewaySettings
from serve.launcher import ADMIN_HEADER, ServerOptions, SetupError, TritonServer
from serve.ports import free_port
from serve.stack import ServingStack
from serve.paths import REPO_ROOT
from serve.repository import check_repository
from tests.server_fixtures import server_options, write_add_one_model

pytestmark = pytest.mark.server


def http(url: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def add_one_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_add_one_model(repo)
    with TritonServer(server_options(repo)) as server:
        yield server


def run_launcher(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serve.launcher", "--quiet", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, **kw,
    )


def test_infer_through_python_backend(add_one_server):
    status, body = http(
        f"http://{add_one_server.http_url}/v2/models/add_one/infer",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]},
    )
    assert status == 200, body
    assert json.loads(body)["outputs"][0]["data"] == [2.0, 3.0, 4.0]


@pytest.mark.parametrize("path", ["/v2/models/stats", "/v2/repository/index", "/v2/logging", "/v2/trace/setting"])
def test_admin_http_api_needs_token(add_one_server, path):
    url = f"http://{add_one_server.http_url}{path}"
    data = {} if path == "/v2/repository/index" else None
    assert http(url, data)[0] == 403
    assert http(url, data, {ADMIN_HEADER: "wrong"})[0] == 403
    assert http(url, data, add_one_server.admin_headers)[0] == 200


def test_admin_grpc_api_needs_token(add_one_server):
    client = grpcclient.InferenceServerClient(add_one_server.grpc_url)
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("add_one")
    assert "This protocol is restricted" in str(e.value)
    for wrong in ({}, add_one_server.admin_headers, {"triton-grpc-protocol-admin-token": "wrong"}):
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_repository_index(headers=wrong)
    assert client.get_model_repository_index(headers=add_one_server.admin_grpc_headers).models[0].name == "add_one"
    stats = client.get_inference_statistics("add_one", headers=add_one_server.admin_grpc_headers)
    assert stats.model_stats[0].name == "add_one"
    # Inference and health stay open.
    assert client.is_server_ready() and client.is_model_ready("add_one")


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on `port`, read from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(addr)
    return found


def test_server_listens_on_loopback_only(add_one_server):
    o = add_one_server.options
    for port in (o.http_port, o.grpc_port, o.metrics_port):
        # 127.0.0.1 as little-endian hex, plain or IPv4-mapped (::ffff:127.0.0.1, how gRPC binds it).
        assert listening_addresses(port) <= {"0100007F", "0000000000000000FFFF00000100007F"}, port
        assert listening_addresses(port), port


def test_refuses_numpy_2_in_model_env(tmp_path):
    """A venv whose numpy reports 2.x: the launcher must refuse before starting anything."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    site = next((tmp_path / "env" / "lib").glob("python3.*/site-packages"))
    (site / "numpy").mkdir()
    (site / "numpy" / "__init__.py").write_text("__version__ = '2.1.3'\n")
    out = run_launcher("--model-env", str(tmp_path / "env"), "--http-port", "0")
    assert out.returncode == 1
    assert "numpy 2.1.3 is in the model environment" in out.stderr and "numpy<2" in out.stderr
    assert "tritonserver starting" not in out.stdout


def test_refuses_busy_port(tmp_path):
    write_add_one_model(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        opts = server_options(tmp_path)
        opts.grpc_port = port
        with pytest.raises(SetupError, match=rf"port\(s\) \[{port}\] on 127.0.0.1 already in use"):
            TritonServer(opts).start()


def test_refuses_equal_ports_naming_the_flags(tmp_path):
    write_add_one_model(tmp_path)
    port = free_port()
    opts = ServerOptions(model_repository=tmp_path, http_port=port, grpc_port=free_port(), metrics_port=port)
    with pytest.raises(SetupError, match=rf"each port must differ: --triton-http-port and --metrics-port are both {port}$"):
        TritonServer(opts).start()
    opts = server_options(tmp_path)
    stack = ServingStack(opts, GatewaySettings(port=opts.grpc_port))  # the gateway on Triton's gRPC port
    with pytest.raises(SetupError, match=rf"each port must differ: --http-port and --grpc-port are both {opts.grpc_port}$"):
        stack.start()
    assert stack.server.process is None  # refused before anything started


def test_refuses_missing_artifacts_and_names_the_export_command(tmp_path):
    model = write_add_one_model(tmp_path, "encoder")
    (model / "config.pbtxt").write_text((model / "config.pbtxt").read_text().replace('backend: "python"', 'backend: "onnxruntime"'))
    problems = check_repository(tmp_path)
    assert [str(p) for p in problems] == [f"model 'encoder': missing {model / '1' / 'model.onnx'} (fix: make export)"]
    opts = server_options(tmp_path)  # free ports: a `make serve` running beside the tests must not matter
    out = run_launcher("--model-repository", str(tmp_path), *port_args(opts))
    assert out.returncode == 1
    assert "missing" in out.stderr and "model.onnx" in out.stderr and "make export" in out.stderr


def test_startup_failure_shows_log_tail(tmp_path):
    model = write_add_one_model(tmp_path)
    (model / "1" / "model.py").write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(SetupError) as e:
        with TritonServer(server_options(tmp_path, ready_timeout_s=60)):
            pass
    assert "boom at import" in str(e.value)


def port_args(opts, gateway_port: int | None = None) -> list[str]:
    return ["--http-port", str(gateway_port or free_port()), "--triton-http-port", str(opts.http_port),
            "--grpc-port", str(opts.grpc_port), "--metrics-port", str(opts.metrics_port)]


def test_sigterm_stops_cleanly_leaving_no_stub_or_shm(tmp_path):
    """`make serve` (Triton + the gateway) stops both on SIGTERM and leaves nothing behind."""
    write_add_one_model(tmp_path)
    opts, gateway_port = server_options(tmp_path), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.launcher", "--quiet", "--model-repository", str(tmp_path),
         *port_args(opts, gateway_port)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    prefix = f"triton_py_{proc.pid}_{opts.http_port}_"
    probe = TritonServer(opts)
    probe.shm_prefix = prefix  # look for that server's stubs and regions
    deadline = time.monotonic() + 120
    while not (_listening(gateway_port) and http(f"http://127.0.0.1:{gateway_port}/health")[0] == 200):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.25)
    assert probe.is_ready()
    status, body = http(f"http://127.0.0.1:{gateway_port}/v2/models/add_one/infer",
                        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [1]}]})
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [2.0]  # through the gateway
    assert probe.stub_pids(), "a running Python model has a stub process"
    assert probe.shm_regions(), "and a /dev/shm region"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "gateway exited (0); tritonserver exited (0); leftover stubs/shm regions: none" in out
    assert probe.stub_pids() == [] and probe.shm_regions() == []
    assert not probe.is_ready() and not _listening(gateway_port)


def _listening(port: int) -> bool:
    return bool(listening_addresses(port))


def test_backend_dir_has_matching_stub_and_project_backends():
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    backends = environment.assemble_backends(version)
    assert (backends / "python" / environment.STUB_NAME).exists()
    assert (backends / "python" / "libtriton_python.so").exists()
    for model_py in (REPO_ROOT / "backends").glob("*/model.py"):
        assert (backends / model_py.parent.name / "model.py").exists()


def test_server_env_puts_model_venv_first(tmp_path):
    env = environment.server_env(tmp_path)
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0].endswith("nvidia_pytriton.libs")
    assert "PYTHONPATH" not in env


def test_stub_gets_the_model_interpreters_libpython(tmp_path):
    """A shared build's LIBDIR goes first on LD_LIBRARY_PATH, so the stub embeds the libpython whose
    stdlib the venv uses (not another build of the same X.Y found by the loader)."""
    (tmp_path / "libpython3.11.so.1.0").write_bytes(b"")
    model = environment.ModelPython("python3", "3.11", "1.26.4", str(tmp_path), "libpython3.11.so.1.0")
    env = environment.with_libpython({"LD_LIBRARY_PATH": "/server/libs"}, model)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [str(tmp_path), "/server/libs"]
    static = environment.ModelPython("python3", "3.11", "1.26.4", str(tmp_path), "")
    assert environment.with_libpython({"LD_LIBRARY_PATH": "/x"}, static)["LD_LIBRARY_PATH"] == "/x"


def test_model_env_probe_reports_this_venv():
    model = environment.check_model_python(environment.server_env())
    assert model.version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert model.numpy.startswith("1.")


class DyingServer:
    """What the stack's watcher needs of TritonServer: a process that has exited; each restart fails
    (it died again) until `fail` restarts were tried, then it stays up."""

    def __init__(self, fail: int, limit: int):
        self.options, self.fail, self.restarts, self.up = ServerOptions(max_server_restarts=limit), fail, 0, False
        self.process = self

    def poll(self):
        return None if self.up else -6

    def log_tail(self, lines):
        return "terminate called after throwing an instance of 'boost::interprocess::lock_exception'"

    def restart(self, sleep):
        self.restarts += 1
        if self.restarts <= self.fail:
            raise SetupError("tritonserver exited with code -6")
        self.up = True


@pytest.mark.parametrize("fail, limit, restarts, gave_up", [(1, 3, 2, False), (5, 3, 3, True)])
def test_the_stack_restarts_a_dead_tritonserver_until_its_limit(monkeypatch, capsys, fail, limit, restarts, gave_up):
    import serve.stack

    monkeypatch.setattr(serve.stack, "SERVER_WATCH_INTERVAL_S", 0.01)
    stack = ServingStack(server_options(Path("/nonexistent")), GatewaySettings(port=free_port()))
    stack.server = DyingServer(fail, limit)
    watcher = threading.Thread(target=stack._watch_server, daemon=True)
    watcher.start()
    time.sleep(0.3)
    stack._stopping.set()
    watcher.join(5)
    assert stack.server.restarts == stack.server_restarts == restarts
    assert (stack.server_gave_up is not None) == gave_up == stack.server_down
    err = capsys.readouterr().err
    assert "lock_exception" in err and ("not restarted again" in err) == gave_up
