"""doctor: each check passes on a good setup and fails, with a fix, on the matching bad one."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from serve import doctor, environment

from serve.paths import REPO_ROOT
from tests.server_fixtures import server_options, write_add_one_model


@pytest.fixture
def repo(tmp_path):
    write_add_one_model(tmp_path / "repo")
    return tmp_path / "repo"


def by_name(checks):
    return {c.name: c for c in checks}


def test_all_checks_pass_on_a_good_repository(repo):
    checks = doctor.run_checks(server_options(repo))
    assert [c.name for c in checks if not c.ok] == []
    assert doctor.report(checks) == 0


def test_cli_exit_code(repo, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "serve.doctor", "--model-repository", str(repo), "--http-port", "0",
                         "--grpc-port", "0", "--metrics-port", "0"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    bad = subprocess.run([sys.executable, "-m", "serve.doctor", "--model-repository", str(tmp_path / "nowhere")],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "[FAIL] model artifacts" in bad.stdout and "fix: make export" in bad.stdout


def test_busy_port_fails(repo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        opts = server_options(repo)
        opts.metrics_port = s.getsockname()[1]
        c = by_name(doctor.run_checks(opts))["ports free"]
    assert not c.ok and str(opts.metrics_port) in c.detail and c.fix


def test_missing_artifact_fails(repo):
    (repo / "add_one" / "1" / "model.py").unlink()
    c = doctor.check_models(repo)
    assert not c.ok and "model.py" in c.detail and c.fix == "make export"


def test_shm_too_small_fails(repo):
    opts = server_options(repo, shm_default_byte_size=1 << 50)
    c = doctor.check_shm(repo, opts)
    assert not c.ok and "/dev/shm" in c.detail and "shm-size" in c.fix


def test_numpy_2_fails(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    site = next((tmp_path / "env" / "lib").glob("python3.*/site-packages"))
    (site / "numpy").mkdir()
    (site / "numpy" / "__init__.py").write_text("__version__ = '2.0.0'\n")
    c = doctor.check_numpy(environment.probe_model_python(environment.server_env(tmp_path / "env")))
    assert not c.ok and "numpy 2.0.0" in c.detail and "numpy" in c.fix


def test_gpu_model_without_gpu_fails(repo):
    if doctor.gpus():
        pytest.skip("this host has a GPU")
    cfg = repo / "add_one" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("KIND_CPU", "KIND_GPU"))
    c = doctor.check_gpu(repo)
    assert not c.ok and "add_one" in c.detail


def test_python_instances_counts_python_based_backends(repo):
    assert doctor.python_instances(repo) == 1
    cfg = repo / "add_one" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("count: 1", "count: 3"))
    assert doctor.python_instances(repo) == 3


def test_compile_cache_is_reported_and_an_unwritable_one_fails(tmp_path):
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c" / "inductor"), "TRITON_CACHE_DIR": str(tmp_path / "c" / "triton")}
    (tmp_path / "c" / "inductor").mkdir(parents=True)
    (tmp_path / "c" / "inductor" / "graph").write_bytes(b"x" * 3 * 2**20)
    ok = doctor.check_compile_cache(env)
    assert ok.ok and ok.info_only and "inductor (3 MiB)" in ok.detail and "triton (0 MiB)" in ok.detail
    (tmp_path / "file").write_text("")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "file" / "triton")  # under a file: cannot be created
    bad = doctor.check_compile_cache(env)
    assert not bad.ok and "TRITON_CACHE_DIR" in bad.detail and "writable" in bad.fix
