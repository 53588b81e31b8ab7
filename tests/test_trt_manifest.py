"""Engine manifests and the host check (export/trt_manifest.py): the manifest's format, and every
reason an engine does not fit this host (compute capability, TensorRT version, stale ONNX, replaced
engine, config out of step)."""
from __future__ import annotations

import json

import pytest

from export import pbtxt
from export.trt_manifest import (
    HostInfo, check_engine_compat, manifest_path, parse_nvidia_smi, read_manifest, same_trt_version, trt_version_from_lib_names, write_manifest,
)
from tests.trt_helpers import H100, L4, make_engine_model, make_manifest


def test_manifest_roundtrip_and_format(tmp_path):
    m = make_manifest(H100)
    path = write_manifest(m, tmp_path / "model_sm90.manifest.json")
    assert read_manifest(path) == m
    assert manifest_path(tmp_path / "model_sm90.plan") == path
    data = json.loads(path.read_text())
    data["format"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(AssertionError, match="manifest format 99"):
        read_manifest(path)


def test_compat_ok(tmp_path):
    model_dir = make_engine_model(tmp_path, gpus=(H100, L4))
    assert check_engine_compat(model_dir, HostInfo("10.5.0.18", (H100, L4, H100))) == []
    assert dict(pbtxt.read(model_dir).cc_model_filenames) == {"9.0": "model_sm90.plan", "8.9": "model_sm89.plan"}


def test_compat_other_compute_capability(tmp_path):
    model_dir = make_engine_model(tmp_path)
    problems = check_engine_compat(model_dir, HostInfo("10.5.0", (L4,)))
    assert problems == [
        "GPU 0 (NVIDIA L4, compute capability 8.9) has no engine; engines exist for "
        "9.0 (NVIDIA H100 80GB HBM3); build one on this GPU with `make export-trt-docker`"]


def test_compat_other_tensorrt_version(tmp_path):
    model_dir = make_engine_model(tmp_path)
    [problem] = check_engine_compat(model_dir, HostInfo("10.6.0", (H100,)))
    assert "built with TensorRT 10.5.0, this host has TensorRT 10.6.0" in problem
    [problem] = check_engine_compat(model_dir, HostInfo(None, (H100,)))
    assert "needs TensorRT 10.5.0, and this host has no TensorRT" in problem


def test_compat_stale_onnx_and_replaced_engine(tmp_path):
    model_dir = make_engine_model(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"re-exported onnx")
    [problem] = check_engine_compat(model_dir, HostInfo("10.5.0", (H100,)))
    assert "model_sm90.plan is stale" in problem and "changed since the engine was built" in problem
    (tmp_path / "model.onnx").write_bytes(b"onnx bytes")
    (model_dir / "1" / "model_sm90.plan").write_bytes(b"truncated")
    [problem] = check_engine_compat(model_dir, HostInfo("10.5.0", (H100,)))
    assert "does not match its manifest" in problem
    (model_dir / "1" / "model_sm90.plan").unlink()
    [problem] = check_engine_compat(model_dir, HostInfo("10.5.0", (H100,)))
    assert "is missing" in problem


def test_compat_config_out_of_step(tmp_path):
    model_dir = make_engine_model(tmp_path)
    config = pbtxt.read(model_dir)
    config.cc_model_filenames["9.0"] = "model.plan"
    config.max_batch_size = 32
    pbtxt.write(config, model_dir)
    problems = check_engine_compat(model_dir, HostInfo("10.5.0", (H100,)))
    assert len(problems) == 2
    assert "cc_model_filenames has 'model.plan' for compute capability 9.0" in problems[0]
    assert "config max_batch_size 32 != the engine profile's max batch 64" in problems[1]


def test_compat_no_gpu_no_manifest_and_other_platforms(tmp_path):
    model_dir = make_engine_model(tmp_path)
    [problem] = check_engine_compat(model_dir, HostInfo("10.5.0", ()))
    assert "no NVIDIA GPU visible" in problem
    manifest_path(model_dir / "1" / "model_sm90.plan").unlink()
    [problem] = check_engine_compat(model_dir, HostInfo("10.5.0", (H100,)))
    assert "no build manifest" in problem
    assert check_engine_compat(tmp_path / "minilm", HostInfo(None, ())) == []  # an ONNX model: nothing to check


def test_host_parsing():
    assert parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0\nNVIDIA L4, 8.9\n") == (H100, L4)
    with pytest.raises(AssertionError):
        parse_nvidia_smi("NVIDIA H100, [N/A]")
    libs = ["/usr/lib/x86_64-linux-gnu/libnvinfer.so.10", "/usr/lib/x86_64-linux-gnu/libnvinfer.so.10.5.0",
            "/opt/x/libnvinfer.so.8.6.1", "/usr/lib/libnvinfer_plugin.so.10.5.0"]
    assert trt_version_from_lib_names(libs) == "10.5.0"
    assert trt_version_from_lib_names(["/usr/lib/libnvinfer.so.10"]) is None
    assert same_trt_version("10.5.0", "10.5.0.18") and not same_trt_version("10.5.0", "10.6.0")
