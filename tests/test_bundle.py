"""The offline bundle (serve/bundle.py): built once for Python 3.12 (the GPU image's), then inspected.

The build downloads six wheels into build/wheel-cache/py3.12 the first time (PyPI), then reuses them.
"""
from __future__ import annotations

import json
import subprocess
import tarfile

import pytest

from serve import bundle, paths

pytestmark = pytest.mark.skipif(not (paths.pytriton_root() / "bin" / "tritonserver").exists(),
                                reason="tritonserver not installed: run serve/setup.sh")

TARGET_PYTHON = "3.12"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "bundle.tar.xz"
    manifest = bundle.build(out, TARGET_PYTHON)
    root = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(out) as tf:
        tf.extractall(root, filter="tar")
    return out, manifest, root / bundle.TOP


def test_archive_is_under_the_64_mib_call_limit(built):
    out, manifest, _ = built
    assert out.stat().st_size == manifest["archive_bytes"] < 64 * 2**20


def test_numpy_below_2_for_the_target_python(built):
    _, manifest, top = built
    numpy = [w for w in manifest["wheels"] if w.startswith("numpy-")]
    assert numpy == ["numpy-1.26.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"]
    assert (top / "wheels" / numpy[0]).is_file()
    assert {w.split("-")[0] for w in manifest["wheels"]} == {
        "numpy", "grpcio", "protobuf", "tritonclient", "python_rapidjson", "ml_dtypes"}


def test_only_the_target_stub_and_server_parts(built):
    _, manifest, top = built
    server = top / "site" / "pytriton" / "tritonserver"
    assert manifest["python"] == TARGET_PYTHON
    assert sorted(p.name for p in (server / "python_backend_stubs").iterdir()) == [TARGET_PYTHON]
    for rel in ("bin/tritonserver", "backends/python/libtriton_python.so",
                "backends/python/triton_python_backend_utils.py", "caches/local/libtritoncache_local.so",
                f"python_backend_stubs/{TARGET_PYTHON}/triton_python_backend_stub"):
        assert (server / rel).is_file(), rel
    assert (top / "opt" / "bin" / "perf_analyzer").is_file()


def test_every_needed_library_is_bundled_and_nothing_else(built):
    _, manifest, top = built
    server, libs = top / "site" / "pytriton" / "tritonserver", top / "site" / "nvidia_pytriton.libs"
    present = {p.name for p in libs.iterdir()}
    assert present == set(manifest["libs"])
    assert not any(n.startswith("libpython3-") for n in present)  # the wheel's 32 MB libpython3.13
    # NEEDED closure over the unpacked files: every bundled-lib name they ask for is there.
    wheel_libs = {p.name for p in paths.pytriton_libs().iterdir()}
    todo = [server / "bin" / "tritonserver", server / "backends" / "python" / "libtriton_python.so",
            server / "python_backend_stubs" / TARGET_PYTHON / "triton_python_backend_stub"]
    seen = set()
    while todo:
        for name in bundle.elf_needed(todo.pop()):
            if name in wheel_libs and name not in seen:
                assert name in present, f"{name} is needed but not bundled"
                seen.add(name)
                todo.append(libs / name)
    assert seen == present


def test_stripped_server_still_runs(built):
    _, _, top = built
    binary = top / "site" / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    out = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    assert "Usage: tritonserver" in out.stdout + out.stderr


def test_project_code_without_venv_or_artifacts(built):
    _, _, top = built
    project = top / "project"
    for rel in ("serve/launcher.py", "serve/bundle_serve.sh", "llm/engine.py", "bench/llm.py",
                "backends/torch_encoder/model.py", "export/encoder_torch.py"):
        assert (project / rel).is_file(), rel
    files = [p for p in project.rglob("*") if p.is_file()]
    assert not [p for p in files if ".venv" in p.parts or "__pycache__" in p.parts]
    assert not [p for p in files if p.suffix in (".onnx", ".plan", ".safetensors", ".whl")]


def test_serve_script_and_manifest(built):
    _, manifest, top = built
    script = top / "bundle_serve.sh"
    assert script.stat().st_mode & 0o111
    text = script.read_text()
    assert "venv --without-pip" in text and "serve.launcher" in text and "zz_host_site_packages.pth" in text
    assert json.loads((top / "MANIFEST.json").read_text())["wheels"] == manifest["wheels"]


def test_size_check_refuses_an_oversized_archive(tmp_path):
    f = tmp_path / "big.tar.xz"
    f.write_bytes(b"x" * 2048)
    assert bundle.check_size(f, limit=4096) == 2048
    with pytest.raises(ValueError, match="over the"):
        bundle.check_size(f, limit=1024)


def test_needed_libs_excludes_unused_wheel_libs():
    libs = bundle.needed_libs(paths.pytriton_root(), paths.pytriton_libs(), TARGET_PYTHON)
    assert any(n.startswith("libtritonserver") for n in libs)
    assert any(n.startswith("libdcgm") for n in libs)  # loaded by libtritonserver: must stay
    assert not any(n.startswith("libpython3-") for n in libs)


def test_unknown_python_has_no_stub(tmp_path):
    with pytest.raises(AssertionError, match="no Python backend stub"):
        bundle.stage(tmp_path, "2.7", None)
