"""The container's entrypoint (serve/container.py, docker/Dockerfile's ENTRYPOINT): the launcher's own
hardening flags with the container's addresses; KServe's runtime arguments; and, on this host with the
pip tritonserver in place of the image's, the real process unit: Triton then the gateway, inference and
the admin restriction through it, SIGTERM stops both, a dead Triton takes the container down."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serve import container, environment
from serve.container import ANY, LOOPBACK, ContainerConfig, passthrough, triton_argv
from serve.launcher import ADMIN_HEADER, ServerOptions, server_args
from serve.ports import free_port
from serve.paths import REPO_ROOT
from tests.server_fixtures import write_add_one_model

TOKEN = "test-admin-token"


@pytest.fixture
def image_root(tmp_path, monkeypatch):
    """A stand-in for the image's /opt/tritonserver (bin/tritonserver must exist for server_args)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tritonserver").write_text("")
    monkeypatch.setenv(environment.SERVER_ROOT_ENV, str(tmp_path))
    return tmp_path


def flags(argv: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in argv[1:]:
        name, _, value = a.partition("=")
        out.setdefault(name, []).append(value)
    return out


def test_the_launchers_hardening_with_the_containers_addresses(image_root):
    c = ContainerConfig(model_repository=Path("/models"), admin_token=TOKEN)
    argv = triton_argv(c, "triton_py_1_")
    assert argv[0] == str(image_root / "bin" / "tritonserver")
    got = flags(argv)
    launcher = flags(server_args(ServerOptions(model_repository=Path("/models")), image_root / "backends", TOKEN,
                                 "triton_py_1_"))
    addresses = {"--http-address", "--grpc-address", "--metrics-address"}
    for name, values in launcher.items():  # every launcher flag, same value, except where it binds
        if name not in addresses:
            assert got[name] == values, name
    assert got["--model-control-mode"] == ["explicit"] and got["--strict-readiness"] == ["true"]
    assert got["--http-restricted-api"] == got["--grpc-restricted-protocol"] == [
        f"shared-memory,model-repository,logging,trace,statistics:{ADMIN_HEADER}={TOKEN}"]
    assert got["--backend-directory"] == [str(image_root / "backends")]
    # One value per address: Triton's HTTP and gRPC on the container's loopback, metrics for Prometheus.
    assert (got["--http-address"], got["--grpc-address"], got["--metrics-address"]) == ([LOOPBACK], [LOOPBACK], [ANY])
    assert "--allow-client-shm=true" not in argv  # client shared memory stays off (26.07's default)


TRITON_2_71 = json.loads((REPO_ROOT / "deploy" / "schemas" / "tritonserver-2.71.0.json").read_text())


def test_every_flag_exists_in_the_images_tritonserver(image_root):
    """The container's command line (and KServe's runtime flags after it) against tritonserver 2.71.0's own
    option table, restricted-API categories and Python backend settings (vendored from its source)."""
    kserve = ["tritonserver", "--model-store=/mnt/models", "--grpc-port=9000", "--http-port=8080",
              "--allow-grpc=true", "--allow-http=true"]
    for c in (ContainerConfig(admin_token=TOKEN), ContainerConfig(triton_only=True, admin_token=TOKEN, extra_args=kserve)):
        got = flags(triton_argv(c, "p_"))
        assert set(n.removeprefix("--") for n in got) <= set(TRITON_2_71["options"])
        apis = got["--http-restricted-api"][0].split(":")[0].split(",") + got["--grpc-restricted-protocol"][0].split(":")[0].split(",")
        assert set(apis) <= set(TRITON_2_71["restricted_categories"])
        python = [v.split(",", 1)[1].split("=")[0] for v in got["--backend-config"] if v.startswith("python,")]
        assert python and set(python) <= set(TRITON_2_71["python_backend_config"])
    assert "not-an-option" not in TRITON_2_71["options"] and "model-repository" in TRITON_2_71["options"]


def test_kserve_runtime_arguments_follow_ours(image_root):
    kserve = ["tritonserver", "--model-store=/mnt/models", "--grpc-port=9000", "--http-port=8080",
              "--allow-grpc=true", "--allow-http=true"]
    assert passthrough(kserve) == kserve[1:] and passthrough(["--log-verbose=1"]) == ["--log-verbose=1"]
    argv = triton_argv(ContainerConfig(triton_only=True, admin_token=TOKEN, extra_args=kserve), "p_")
    assert "tritonserver" not in argv[1:]
    assert argv[-5:] == kserve[1:]  # after ours: Triton takes the last --http-port (8080)
    got = flags(argv)
    assert got["--http-address"] == got["--grpc-address"] == [ANY]  # KServe routes to the pod's address
    assert got["--http-restricted-api"][0].endswith(f"{ADMIN_HEADER}={TOKEN}")  # admin APIs stay restricted


def test_cli_refuses_stray_arguments_outside_triton_only():
    r = subprocess.run([sys.executable, "-m", "serve.container", "--http-port=8080"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "after `--`" in r.stderr


def test_token_comes_from_the_environment_or_is_random(monkeypatch):
    monkeypatch.setenv("TRITON_ADMIN_TOKEN", "from-env")
    assert ContainerConfig().token() == "from-env"
    monkeypatch.delenv("TRITON_ADMIN_TOKEN")
    a, b = ContainerConfig().token(), ContainerConfig().token()
    assert a != b and len(a) >= 32


# ---- the real unit on this host (pip tritonserver 2.51 standing in for the image's)


def http(url: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return 0, str(e).encode()


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc: field 4 of stat is the parent)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


class Unit:
    """`python -m serve.container` over a tiny repository, on free loopback ports."""

    def __init__(self, tmp: Path):
        tmp.mkdir(parents=True, exist_ok=True)
        repo = tmp / "repo"
        write_add_one_model(repo)
        env = environment.server_env()
        model = environment.check_model_python(env)
        env = environment.with_libpython(env, model)
        self.backends = environment.assemble_backends(model.version)
        self.port, self.triton_http = free_port(), free_port()
        env.update({environment.SERVER_ROOT_ENV: str(environment.server_root()), "TRITON_ADMIN_TOKEN": TOKEN,
                    "GATEWAY_PORT": str(self.port), "GATEWAY_ACCESS_LOG": "false"})
        self.log = open(tmp / "container.log", "wb")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "serve.container", "--model-repository", str(repo), "--gateway-host", LOOPBACK,
             "--triton-http-port", str(self.triton_http), "--grpc-port", str(free_port()),
             "--metrics-port", str(free_port()), "--metrics-address", LOOPBACK, "--backend-directory", str(self.backends)],
            cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.logfile = tmp / "container.log"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while http(f"http://{LOOPBACK}:{self.port}/health")[0] != 200:
            assert self.p.poll() is None, self.logfile.read_text()[-3000:]
            assert time.monotonic() < deadline, self.logfile.read_text()[-3000:]
            time.sleep(0.25)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.log.close()


def kill_unit(u: Unit) -> None:
    for pid in children(u.p.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    u.close()


@pytest.fixture
def unit(tmp_path):
    """A started, ready unit. Free ports are picked before the processes bind them, so another process
    on this shared host can take one in between: only then (the log says a port is in use) it is
    started again on other ports."""
    for attempt in range(3):
        u = Unit(tmp_path / f"try{attempt}")
        try:
            u.wait_ready()
            break
        except AssertionError:
            kill_unit(u)
            if "in use" not in u.logfile.read_text() or attempt == 2:
                raise
    try:
        yield u
    finally:
        kill_unit(u)


@pytest.mark.server
def test_container_serves_through_the_gateway_and_stops_on_sigterm(unit):
    base = f"http://{LOOPBACK}:{unit.port}"
    status, body = http(f"{base}/v2/models/add_one/infer",
                        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]})
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [2.0, 3.0, 4.0], body
    # Admin APIs: refused without the token at the gateway and at Triton itself; the token unlocks them.
    assert http(f"{base}/v2/models/stats")[0] == 403
    assert http(f"http://{LOOPBACK}:{unit.triton_http}/v2/models/stats")[0] == 403
    assert http(f"{base}/v2/models/stats", headers={ADMIN_HEADER: TOKEN})[0] == 200
    kids = children(unit.p.pid)
    assert len(kids) == 2  # tritonserver and the gateway
    t0 = time.monotonic()
    unit.p.send_signal(signal.SIGTERM)
    assert unit.p.wait(timeout=60) == 0, unit.logfile.read_text()[-3000:]
    assert time.monotonic() - t0 < 30
    assert not [pid for pid in kids if alive(pid)]
    assert http(f"{base}/health")[0] == 0  # nothing listens any more


@pytest.mark.server
def test_container_exits_when_triton_dies(unit):
    kids = children(unit.p.pid)
    triton = next(pid for pid in kids if "tritonserver" in Path(f"/proc/{pid}/cmdline").read_text())
    os.kill(triton, signal.SIGKILL)
    assert unit.p.wait(timeout=60) == 1
    assert "tritonserver exited; stopped the rest" in unit.logfile.read_text()
    gateway = [pid for pid in kids if pid != triton]
    assert len(gateway) == 1 and not alive(gateway[0])  # the gateway was stopped, not left behind
