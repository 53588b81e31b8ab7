"""TensorRT export: everything that does not need TensorRT, plus build/parity tests marked `tensorrt`
that run only where TensorRT and a GPU are present (inside docker/Dockerfile.trt).

The build code is exercised against a fake `tensorrt` module that records the API calls, so the
profile, flags, workspace, timing cache, parser-error and manifest paths are checked here too.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from export import pbtxt, quantize, trt_int8, trt_options
from export import trt as trt_export
from export.pbtxt import mc
from export.specs import MINILM, Axis, Tensor, Tolerance
from export.encoder_config import encoder_config, write_model_dir
from export.trt_config import cc_model_filenames, trt_config, write_trt_config
from export.trt_manifest import (
    Gpu, HostInfo, Manifest, check_engine_compat, manifest_path, parse_nvidia_smi, read_manifest, same_trt_version,
    sha256_file, trt_version_from_lib_names, write_manifest,
)
from export.trt_options import (
    INT8_SYMMETRIC, BuildOptions, build_options, engine_filename, engine_model_name, profile_shapes,
)
from export.validate import ValidationError
from serve.paths import REPO_ROOT

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAVE_TENSORRT, reason="TensorRT Python package not installed")
H100 = Gpu("NVIDIA H100 80GB HBM3", "9.0")
L4 = Gpu("NVIDIA L4", "8.9")


# ---- profiles and build options


def test_profile_shapes_minilm():
    shapes = profile_shapes(MINILM)
    expected = ((1, 1), (16, 32), (64, 128))
    assert shapes == {"input_ids": expected, "attention_mask": expected, "token_type_ids": expected}
    assert shapes["input_ids"][2][0] == MINILM.max_batch_size == 64


def test_profile_shapes_fixed_dims_and_unknown_axis():
    spec = replace(MINILM, inputs=(Tensor("x", "FP32", ("sequence", 7)),), axes={"batch": Axis(2, 4, 8),
                                                                                 "sequence": Axis(3, 5, 9)})
    assert profile_shapes(spec) == {"x": ((2, 3, 7), (4, 5, 7), (8, 9, 7))}
    bad = replace(MINILM, inputs=(Tensor("x", "FP32", ("tokens",)),))
    with pytest.raises(AssertionError, match="axis 'tokens' not in spec.axes"):
        profile_shapes(bad)


def test_build_options_tensorrt_10():
    assert build_options("10.5.0", "fp32") == BuildOptions("fp32", False, clear_flags=("TF32",))
    assert build_options("10.5.0.18", "fp16") == BuildOptions("fp32", False, set_flags=("FP16",))
    assert build_options("10.13.3", "int8") == BuildOptions("int8_symmetric", False, set_flags=("INT8", "FP16"))


def test_build_options_tensorrt_11_has_no_precision_flags():
    assert build_options("11.0.0", "fp32") == BuildOptions("fp32", True, clear_flags=("TF32",))
    assert build_options("11.4.1", "fp16") == BuildOptions("fp16", True)  # the fp16 ONNX, strongly typed
    assert build_options("11.4.1", "int8") == BuildOptions("int8_symmetric", True)  # the symmetric Q/DQ ONNX
    for p in ("fp32", "fp16", "int8"):
        o = build_options("11.0", p)
        assert not {"FP16", "INT8", "BF16"} & set(o.set_flags) and o.network_flags == ()


def test_build_options_rejects_old_tensorrt_and_unknown_precision():
    with pytest.raises(ValueError, match="too old"):
        build_options("8.6.1", "fp16")
    with pytest.raises(AssertionError, match="bf16"):
        build_options("10.5.0", "bf16")


def test_names():
    assert engine_filename("9.0") == "model_sm90.plan"
    assert engine_filename("12.0") == "model_sm120.plan"
    assert engine_model_name(MINILM, "fp16") == "minilm_fp16_trt"
    assert engine_model_name(MINILM, "fp32") == "minilm_trt"
    assert engine_model_name(MINILM, "int8") == "minilm_int8_trt"
    for version in ("10.5.0", "11.0.0"):  # int8 engines: the symmetric build input, not the served minilm_int8
        src = trt_options.source_onnx(MINILM, build_options(version, "int8").onnx_precision)
        assert src.relative_to(REPO_ROOT) == Path("build/trt_sources/minilm_int8_sym.onnx")
    src = trt_options.source_onnx(MINILM, build_options("10.5.0", "fp16").onnx_precision)
    assert src.relative_to(REPO_ROOT) == Path("model_repository/minilm/1/model.onnx")
    assert trt_options.DEFAULT_OUT_REPO != trt_options.MODEL_REPOSITORY


# ---- config


def onnx_config(name="minilm") -> mc.ModelConfig:
    """The ONNX model's config as export/encoder.py writes it (CPU instances, onnxruntime backend)."""
    return encoder_config(MINILM, name, instances=2)


def test_trt_config_changes_only_platform_files_and_kind():
    base = onnx_config()
    c = trt_config(MINILM, "minilm_fp16_trt", {"9.0": "model_sm90.plan", "8.9": "model_sm89.plan"}, instances=2)
    c = pbtxt.parse(pbtxt.to_text(c))  # what Triton reads
    assert c.name == "minilm_fp16_trt" and c.platform == "tensorrt_plan"
    assert c.backend == "" and c.default_model_filename == ""
    assert dict(c.cc_model_filenames) == {"9.0": "model_sm90.plan", "8.9": "model_sm89.plan"}
    assert c.max_batch_size == 64 == profile_shapes(MINILM)["input_ids"][2][0]
    assert [(g.count, g.kind) for g in c.instance_group] == [(2, mc.ModelInstanceGroup.KIND_GPU)]
    assert base.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and base.backend == "onnxruntime"
    for f in ("name", "platform", "backend", "default_model_filename", "cc_model_filenames", "instance_group"):
        c.ClearField(f)
        base.ClearField(f)
    assert c == base  # inputs, outputs, batching, queue policy, warmup, version policy: the ONNX model's
    with pytest.raises(AssertionError, match="no engines"):
        trt_config(MINILM, "m", {})


def test_write_trt_config_refuses_engine_with_other_max_batch(tmp_path):
    model_dir = tmp_path / "minilm_fp16_trt"
    (model_dir / "1").mkdir(parents=True)
    write_manifest(make_manifest(H100, max_batch=32), model_dir / "1" / "model_sm90.manifest.json")
    with pytest.raises(AssertionError, match="engine profile max batch 32 != the spec's max_batch_size 64"):
        write_trt_config(MINILM, model_dir)


def test_cc_model_filenames_one_engine_per_cc():
    ms = [make_manifest(H100), make_manifest(L4)]
    assert cc_model_filenames(ms) == {"9.0": "model_sm90.plan", "8.9": "model_sm89.plan"}
    with pytest.raises(AssertionError, match="two engines for compute capability 9.0"):
        cc_model_filenames([make_manifest(H100), make_manifest(H100)])


# ---- manifests and the host check


def make_manifest(gpu: Gpu, trt_version="10.5.0", engine_sha="0" * 64, source="/nonexistent/model.onnx",
                  source_sha="1" * 64, max_batch=64) -> Manifest:
    return Manifest(
        model="minilm_fp16_trt", engine_file=engine_filename(gpu.compute_capability), engine_sha256=engine_sha,
        gpu_name=gpu.name, compute_capability=gpu.compute_capability, tensorrt_version=trt_version, precision="fp16",
        build_options={}, profiles={}, max_batch_size=max_batch, source_onnx=source, source_onnx_sha256=source_sha,
        workspace_bytes=1 << 30, built_at="2026-11-22T00:00:00+00:00", build_seconds=1.0)


def make_engine_model(root: Path, gpus=(H100,), trt_version="10.5.0", max_batch=64) -> Path:
    """A model dir as export_trt leaves it: engines (fake bytes), manifests, config; source ONNX in root."""
    model_dir = root / "minilm_fp16_trt"
    (model_dir / "1").mkdir(parents=True)
    onnx = root / "model.onnx"
    onnx.write_bytes(b"onnx bytes")
    for gpu in gpus:
        engine = model_dir / "1" / engine_filename(gpu.compute_capability)
        engine.write_bytes(b"engine for " + gpu.compute_capability.encode())
        write_manifest(make_manifest(gpu, trt_version, sha256_file(engine), str(onnx), sha256_file(onnx), max_batch),
                       manifest_path(engine))
    onnx_dir = root / "minilm"
    pbtxt.write(onnx_config(), onnx_dir)
    write_trt_config(MINILM, model_dir, onnx_dir)
    return model_dir


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


# ---- parity and I/O checks


def test_parity_problems():
    rng = np.random.default_rng(0)
    ref = {"last_hidden_state": rng.standard_normal((2, 5, 384)).astype(np.float32)}
    tol = Tolerance(max_abs=2e-2, min_cosine=0.999)
    close = {"last_hidden_state": (ref["last_hidden_state"] + 1e-3).astype(np.float16)}
    assert trt_export.parity_problems(ref, close, tol) == []
    far = {"last_hidden_state": ref["last_hidden_state"].copy()}
    far["last_hidden_state"][1, 3, 7] += 0.5
    [p] = trt_export.parity_problems(ref, far, tol)
    assert p.startswith("last_hidden_state: max abs diff 0.5 (limit 0.02)")
    nan = {"last_hidden_state": ref["last_hidden_state"].copy()}
    nan["last_hidden_state"][0, 0, 0] = np.nan
    assert len(trt_export.parity_problems(ref, nan, tol)) == 1
    assert "missing" in trt_export.parity_problems(ref, {}, tol)[0]
    mask = np.ones((2, 5), np.int64)
    mask[1, 3:] = 0  # the 0.5 error sits on a padded position: not compared
    assert trt_export.parity_problems(ref, far, tol, mask) == []
    assert len(trt_export.parity_problems(ref, far, tol, np.ones((2, 5), np.int64))) == 1
    assert "shape (2, 4, 384)" in trt_export.parity_problems(ref, {"last_hidden_state": np.zeros((2, 4, 384))}, tol)[0]


def test_io_mismatches():
    config_io = {"input_ids": "INT64", "attention_mask": "INT64", "last_hidden_state": "FP32"}
    inputs = {"input_ids": "INT64", "attention_mask": "INT64"}
    assert trt_export.io_mismatches(inputs, {"last_hidden_state": "FP32", "pooler": "FP32"}, config_io) == []
    assert trt_export.io_mismatches(inputs, {"last_hidden_state": "FP16"}, config_io) == [
        "last_hidden_state: network dtype FP16 != config FP32"]
    assert trt_export.io_mismatches(inputs | {"position_ids": "INT64"}, {"last_hidden_state": "FP32"}, config_io) == [
        "network input position_ids (INT64) is not in the config"]


def qdq_model(zero_point: np.ndarray | None, extra_op: str | None = None):
    """x -> QuantizeLinear -> DequantizeLinear -> y (optionally plus an ORT integer-quantization node)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1])]
    q_in, dq_in = ["x", "scale"], ["q", "scale"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(zero_point, "zp"))
        q_in, dq_in = q_in + ["zp"], dq_in + ["zp"]
    nodes = [helper.make_node("QuantizeLinear", q_in, ["q"], name="q0"),
             helper.make_node("DequantizeLinear", dq_in, ["y"], name="dq0")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["x"], ["a", "b", "c"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])]
    graph = helper.make_graph(nodes, "qdq", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int8_onnx_problems():
    assert trt_export.int8_onnx_problems(qdq_model(np.array(0, np.int8))) == []
    [p] = trt_export.int8_onnx_problems(qdq_model(np.array(128, np.uint8)))  # ORT's asymmetric uint8 default
    assert p.startswith("2 Q/DQ nodes with a uint8 or non-zero zero point (first: q0)")
    [p] = trt_export.int8_onnx_problems(qdq_model(np.array(3, np.int8)))
    assert "symmetric int8" in p
    problems = trt_export.int8_onnx_problems(qdq_model(np.array(0, np.int8), extra_op="DynamicQuantizeLinear"))
    assert problems == ["operators ['DynamicQuantizeLinear'] (ONNX Runtime integer/dynamic quantization): TensorRT "
                        "builds int8 only from QuantizeLinear/DequantizeLinear (Q/DQ) models"]
    assert "not a Q/DQ quantized model" in trt_export.int8_onnx_problems(tiny_encoder_onnx_model())[0]


# ---- the symmetric int8 Q/DQ ONNX of int8 engines

TINY_VOCAB = 1000
TINY_SPEC = replace(MINILM, vocab_size=TINY_VOCAB)  # MiniLM's I/O; validation ids fit the small embedding
QUERY = "/encoder/layer.0/attention/self/query/MatMul"
FFN_IN = "/encoder/layer.0/intermediate/dense/MatMul"  # fp32 in the symmetric model only
FFN_OUT = "/encoder/layer.0/output/dense/MatMul"  # fp32 in both int8 models


def tiny_matmul_encoder_model(seed: int = 0):
    """A stand-in encoder with MiniLM's I/O and weight MatMuls named as in the exported MiniLM:
    embeddings -> query MatMul(W1) -> Relu -> FFN intermediate MatMul(W2) -> FFN output MatMul(W3)
    -> * mask -> last_hidden_state."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    h = MINILM.hidden_size
    inputs = [helper.make_tensor_value_info(t.name, TensorProto.INT64, ["batch", "sequence"]) for t in MINILM.inputs]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", h])
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("word", rng.normal(0, 1, (TINY_VOCAB, h))), ("type", rng.normal(0, 1, (2, h))),
        ("w1", rng.normal(0, h ** -0.5, (h, h))), ("w2", rng.normal(0, h ** -0.5, (h, h))),
        ("w3", rng.normal(0, h ** -0.5, (h, h))))]
    inits.append(helper.make_tensor("axes", TensorProto.INT64, [1], [-1]))
    nodes = [helper.make_node("Gather", ["word", "input_ids"], ["we"]),
             helper.make_node("Gather", ["type", "token_type_ids"], ["te"]),
             helper.make_node("Add", ["we", "te"], ["x"]),
             helper.make_node("MatMul", ["x", "w1"], ["h1"], name=QUERY),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["f1"], name=FFN_IN),
             helper.make_node("MatMul", ["f1", "w3"], ["h2"], name=FFN_OUT),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "axes"], ["m3"]),
             helper.make_node("Mul", ["h2", "m3"], ["last_hidden_state"])]
    model = helper.make_model(helper.make_graph(nodes, "tiny_mm", inputs, [out], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def calibration_batches():
    from export.validate import random_feed

    return [random_feed(TINY_SPEC, 4, 16, TINY_VOCAB, seed) for seed in range(4)]


def int8_weight_matmuls(model) -> set[str]:
    """Names of the MatMuls whose weight comes from a DequantizeLinear of an int8 initializer."""
    inits = {i.name for i in model.graph.initializer}
    dq_weights = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return {n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in dq_weights}


@pytest.fixture
def fp32_tiny(tmp_path):
    import onnx

    path = tmp_path / "repo" / "minilm" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(tiny_matmul_encoder_model(), path)
    return path


INT8_TOL = MINILM.tolerances["int8_static"]


def test_symmetric_int8_onnx_is_tensorrt_ready(fp32_tiny, tmp_path):
    import onnx
    from onnx import numpy_helper

    dst = tmp_path / "trt_sources" / "minilm_int8_sym.onnx"
    metrics = trt_int8.make_int8_source(fp32_tiny, dst, calibration_batches(), TINY_SPEC, INT8_TOL, "4 random batches")
    model = onnx.load(str(dst))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    # only the query MatMul is quantized: Q/DQ on its input x (not on its output), DQ of its int8 weight
    assert sorted(n.op_type + ":" + n.input[0] for n in qdq) == [
        "DequantizeLinear:w1_quantized", "DequantizeLinear:x_QuantizeLinear_Output", "QuantizeLinear:x"]
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), (n.name, zp)
    quantized = {n.output[0] for n in qdq if n.op_type == "DequantizeLinear"}
    matmuls = {n.name: n for n in model.graph.node if n.op_type == "MatMul"}
    assert set(matmuls[QUERY].input) <= quantized and int8_weight_matmuls(model) == {QUERY}
    assert not {*matmuls[FFN_IN].input, *matmuls[FFN_OUT].input} & quantized  # the FFN stays fp32
    weight_dq = next(n for n in qdq if inits.get(n.input[0]) is not None)
    assert inits[weight_dq.input[0]].dtype == np.int8 and inits[weight_dq.input[1]].shape == (MINILM.hidden_size,)
    assert trt_export.int8_onnx_problems(model) == []
    [m] = metrics
    assert m.output == "last_hidden_state" and m.ok(INT8_TOL) and 0 < m.max_abs and m.min_cosine < 1
    stamp = json.loads(trt_int8.stamp_path(dst).read_text())
    assert stamp["recipe"]["source_onnx_sha256"] == sha256_file(fp32_tiny)
    assert stamp["recipe"]["calibration"] == "4 random batches" and stamp["vs_fp32"][0]["max_abs"] == m.max_abs
    # ONNX Runtime's own int8 variant from the same data (uint8, also the FFN input MatMul) is refused
    asym = onnx.load(str(quantize.quantize_int8_static(fp32_tiny, tmp_path / "asym.onnx", calibration_batches())))
    [p] = trt_export.int8_onnx_problems(asym)
    assert p.startswith("8 Q/DQ nodes with a uint8 or non-zero zero point (first: x_QuantizeLinear)")
    assert int8_weight_matmuls(asym) == {QUERY, FFN_IN}


def test_symmetric_int8_outside_tolerance_leaves_no_model(fp32_tiny, tmp_path):
    dst = tmp_path / "minilm_int8_sym.onnx"
    with pytest.raises(ValidationError, match="symmetric int8.*outside tolerance"):
        trt_int8.make_int8_source(fp32_tiny, dst, calibration_batches(), TINY_SPEC, Tolerance(1e-6, 0.999999), "x")
    assert not dst.exists() and not trt_int8.stamp_path(dst).exists()


def test_ensure_int8_source_remakes_only_when_stale(fp32_tiny, tmp_path, capsys):
    import onnx

    made = []
    calib = ("4 random batches", lambda: made.append(1) or calibration_batches())
    dst = tmp_path / "s" / "minilm_int8_sym.onnx"
    assert trt_int8.ensure_int8_source(TINY_SPEC, fp32_tiny, dst, INT8_TOL, calib) == dst and len(made) == 1
    trt_int8.ensure_int8_source(TINY_SPEC, fp32_tiny, dst, INT8_TOL, calib)
    assert len(made) == 1 and f"{dst}: up to date" in capsys.readouterr().out
    onnx.save(tiny_matmul_encoder_model(seed=1), fp32_tiny)  # a new fp32 export
    trt_int8.ensure_int8_source(TINY_SPEC, fp32_tiny, dst, INT8_TOL, calib)
    assert len(made) == 2
    trt_int8.ensure_int8_source(TINY_SPEC, fp32_tiny, dst, INT8_TOL, ("other calibration", calib[1]))
    assert len(made) == 3


# ---- the build code against a fake tensorrt module


class FakeTensorRT(types.ModuleType):
    """The slice of the TensorRT Python API that build_engine uses; records every call in .calls.
    TensorRT 11 has no FP16/INT8 builder flags: using one raises AttributeError, as it would there."""

    def __init__(self, version="10.5.0", parse_ok=True, errors=(), plan=b"PLAN", cache_accepted=True,
                 outputs_dtype="FLOAT"):
        super().__init__("tensorrt")
        self.__version__ = version
        calls = self.calls = []
        flags = {"TF32": "TF32"} | ({"FP16": "FP16", "INT8": "INT8"} if version.startswith("10.") else {})
        self.BuilderFlag = types.SimpleNamespace(**flags)
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

        class Logger:
            WARNING = "WARNING"

            def __init__(self, level):
                calls.append(("Logger", level))

        class Tensor:
            def __init__(self, name, dtype):
                self.name, self.dtype = name, types.SimpleNamespace(name=dtype)

        class Network:
            inputs = [Tensor(t.name, "INT64") for t in MINILM.inputs]
            outputs = [Tensor("last_hidden_state", outputs_dtype)]
            num_inputs, num_outputs = len(inputs), len(outputs)

            def get_input(self, i):
                return self.inputs[i]

            def get_output(self, i):
                return self.outputs[i]

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return b"CACHE[" + self.data + b"]+new"

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                calls.append(("set_shape", name, lo, opt, hi))

        class Config:
            def set_memory_pool_limit(self, pool, n):
                calls.append(("set_memory_pool_limit", pool, n))

            def set_flag(self, f):
                calls.append(("set_flag", f))

            def clear_flag(self, f):
                calls.append(("clear_flag", f))

            def add_optimization_profile(self, p):
                calls.append(("add_optimization_profile",))

            def create_timing_cache(self, data):
                calls.append(("create_timing_cache", bytes(data)))
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                self.cache = cache
                return cache_accepted or cache.data == b""

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls.append(("create_network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls.append(("build_serialized_network",))
                return plan

        class OnnxParser:
            num_errors = len(errors)

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                calls.append(("parse_from_file", path))
                return parse_ok

            def get_error(self, i):
                return errors[i]

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def fake_trt(monkeypatch):
    def install(**kw):
        fake = FakeTensorRT(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        return fake
    return install


def test_build_engine_tensorrt_10_fp16(tmp_path, fake_trt, capsys):
    fake = fake_trt(version="10.5.0")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    cache = tmp_path / "cache" / "t.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"old")
    out = tmp_path / "repo" / "minilm_fp16_trt" / "1"
    engine = trt_export.build_engine(onnx, MINILM, "fp16", out, 3 << 30, cache, gpu=H100,
                                     io_dtypes={"input_ids": "INT64", "last_hidden_state": "FP32",
                                                "attention_mask": "INT64", "token_type_ids": "INT64"})
    assert engine == out / "model_sm90.plan" and engine.read_bytes() == b"PLAN"
    c = fake.calls
    assert ("create_network", 0) in c  # weakly typed on TensorRT 10
    assert ("parse_from_file", str(onnx)) in c
    assert ("set_memory_pool_limit", "WORKSPACE", 3 << 30) in c
    assert [x for x in c if x[0] in ("set_flag", "clear_flag")] == [("set_flag", "FP16")]
    assert [x[1:] for x in c if x[0] == "set_shape"] == [(t.name, (1, 1), (16, 32), (64, 128)) for t in MINILM.inputs]
    assert ("create_timing_cache", b"old") in c and ("set_timing_cache", b"old", False) in c
    assert cache.read_bytes() == b"CACHE[old]+new"  # saved after the build
    assert fake.names().index("add_optimization_profile") < fake.names().index("build_serialized_network")
    m = read_manifest(manifest_path(engine))
    assert (m.model, m.compute_capability, m.gpu_name, m.tensorrt_version, m.precision) == (
        "minilm_fp16_trt", "9.0", H100.name, "10.5.0", "fp16")
    assert m.engine_sha256 == sha256_file(engine) and m.source_onnx_sha256 == sha256_file(onnx)
    assert m.profiles["input_ids"] == [[1, 1], [16, 32], [64, 128]] and m.max_batch_size == 64
    assert m.build_options["set_flags"] == ["FP16"] and m.build_options["onnx_precision"] == "fp32"


def test_build_engine_tensorrt_11_uses_no_precision_flags(tmp_path, fake_trt):
    fake = fake_trt(version="11.0.0")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    trt_export.build_engine(onnx, MINILM, "fp16", tmp_path / "m" / "1", 1 << 30, tmp_path / "c.cache", gpu=H100)
    assert ("create_network", 0) in fake.calls  # strongly typed is implicit; the deprecated flag is not set
    assert not [x for x in fake.calls if x[0] in ("set_flag", "clear_flag")]
    assert ("create_timing_cache", b"") in fake.calls and (tmp_path / "c.cache").read_bytes() == b"CACHE[]+new"
    fake = fake_trt(version="11.0.0")
    trt_export.build_engine(onnx, MINILM, "fp32", tmp_path / "m" / "1", 1 << 30, tmp_path / "c.cache", gpu=H100)
    assert [x for x in fake.calls if x[0] in ("set_flag", "clear_flag")] == [("clear_flag", "TF32")]


def test_build_engine_prints_every_parser_error_and_raises(tmp_path, fake_trt, capsys):
    fake_trt(parse_ok=False, errors=("node Attention_3: unsupported op", "node Gelu_9: bad attribute"))
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    with pytest.raises(RuntimeError, match="2 parser error"):
        trt_export.build_engine(onnx, MINILM, "fp16", tmp_path / "m" / "1", 1 << 30, tmp_path / "c", gpu=H100)
    err = capsys.readouterr().err
    assert "unsupported op" in err and "bad attribute" in err
    assert not (tmp_path / "m").exists()


def test_build_engine_failures(tmp_path, fake_trt):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    fake_trt(plan=None)
    with pytest.raises(RuntimeError, match="failed to build"):
        trt_export.build_engine(onnx, MINILM, "fp16", tmp_path / "m" / "1", 1 << 30, tmp_path / "c", gpu=H100)
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()
    fake_trt(outputs_dtype="HALF")
    config_io = {t.name: "INT64" for t in MINILM.inputs} | {"last_hidden_state": "FP32"}
    with pytest.raises(RuntimeError, match="last_hidden_state: network dtype FP16 != config FP32"):
        trt_export.build_engine(onnx, MINILM, "fp16", tmp_path / "m" / "1", 1 << 30, tmp_path / "c", gpu=H100,
                                io_dtypes=config_io)
    fake = fake_trt(cache_accepted=False)
    (tmp_path / "c").write_bytes(b"from another gpu")
    trt_export.build_engine(onnx, MINILM, "fp16", tmp_path / "m" / "1", 1 << 30, tmp_path / "c", gpu=H100)
    assert ("set_timing_cache", b"", False) in fake.calls  # refused cache replaced by a fresh one


def tiny_encoder_onnx(path: Path) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_encoder_onnx_model(), path)
    return path


def tiny_encoder_onnx_model():
    """A stand-in encoder with MiniLM's I/O: last_hidden_state[b, s, :] = input_ids + 2*mask + 3*type."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(t.name, TensorProto.INT64, ["batch", "sequence"]) for t in MINILM.inputs]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", 384])
    nodes = [helper.make_node("Cast", [t.name], [f"{t.name}_f"], to=TensorProto.FLOAT) for t in MINILM.inputs]
    nodes += [helper.make_node("Mul", ["attention_mask_f", "two"], ["m2"]),
              helper.make_node("Mul", ["token_type_ids_f", "three"], ["t3"]),
              helper.make_node("Sum", ["input_ids_f", "m2", "t3"], ["s"]),
              helper.make_node("Unsqueeze", ["s", "axes"], ["s3"]),
              helper.make_node("Mul", ["s3", "ones"], ["last_hidden_state"])]
    inits = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("three", TensorProto.FLOAT, [], [3.0]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
             helper.make_tensor("ones", TensorProto.FLOAT, [384], np.linspace(0.5, 1.5, 384).tolist())]
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, [out], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def export_setup(tmp_path, fake_trt, monkeypatch):
    """Source ONNX + ONNX config + golden inputs in tmp_path; engine outputs = ONNX Runtime's (+ `offset`)."""
    src_repo = tmp_path / "model_repository"
    onnx = tiny_encoder_onnx(src_repo / "minilm" / "1" / "model.onnx")
    write_model_dir(onnx_config(), MINILM, src_repo / "minilm")
    rng = np.random.default_rng(1)
    golden = tmp_path / "minilm.npz"
    np.savez(golden, **{"input.input_ids": rng.integers(0, 1000, (3, 7)).astype(np.int32),  # cast to INT64
                        "input.attention_mask": np.ones((3, 7), np.int64),
                        "input.token_type_ids": np.zeros((3, 7), np.int64),
                        "reference.last_hidden_state": np.zeros((3, 7, 384), np.float32)})
    monkeypatch.setattr(trt_export, "source_onnx",
                        lambda spec, p: trt_options.source_onnx(spec, p, src_repo, tmp_path / "trt_sources"))
    monkeypatch.setattr(trt_export, "detect_gpus", lambda: (H100,))
    offset = {"value": 0.0}

    def run_engine(engine_path, feeds):
        assert Path(engine_path).read_bytes() == b"PLAN"
        return {k: v + offset["value"] for k, v in trt_export.run_onnxruntime(onnx, feeds).items()}

    monkeypatch.setattr(trt_export, "run_engine", run_engine)
    fake_trt(version="10.5.0")
    return types.SimpleNamespace(out_repo=tmp_path / "model_repository_trt", golden=golden, onnx=onnx,
                                 cache=tmp_path / "c.cache", offset=offset, sources=tmp_path / "trt_sources")


def test_export_trt_writes_engine_manifest_and_config(export_setup, capsys):
    s = export_setup
    model_dir = trt_export.export_trt(MINILM, "fp16", s.out_repo, 1 << 30, s.cache, s.golden)
    assert model_dir == s.out_repo / "minilm_fp16_trt"
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model_sm90.manifest.json", "model_sm90.plan"]
    config = pbtxt.read(model_dir)
    assert config.platform == "tensorrt_plan" and dict(config.cc_model_filenames) == {"9.0": "model_sm90.plan"}
    assert config.max_batch_size == 64 and config.model_warmup
    assert (model_dir / "warmup" / "input_ids").read_bytes() == (s.onnx.parents[2] / "minilm" / "warmup" /
                                                                 "input_ids").read_bytes()
    assert "parity vs ONNX Runtime: last_hidden_state: max abs diff 0" in capsys.readouterr().out
    assert check_engine_compat(model_dir, HostInfo("10.5.0.18", (H100,))) == []


def test_export_trt_parity_failure_leaves_no_engine(export_setup):
    s = export_setup
    s.offset["value"] = 0.1  # > the fp16 tolerance 2e-2
    with pytest.raises(trt_export.ParityError, match=r"max abs diff 0.1 \(limit 0.02\)"):
        trt_export.export_trt(MINILM, "fp16", s.out_repo, 1 << 30, s.cache, s.golden)
    assert list((s.out_repo / "minilm_fp16_trt" / "1").iterdir()) == []
    assert not (s.out_repo / "minilm_fp16_trt" / "config.pbtxt").exists()


def test_export_trt_int8_builds_from_the_symmetric_onnx(export_setup, monkeypatch, capsys):
    import onnx

    s = export_setup
    onnx.save(tiny_matmul_encoder_model(), s.onnx)  # the fp32 ONNX the symmetric one is made from
    monkeypatch.setattr(trt_int8, "tokenizer_calibration", lambda spec: ("4 random batches", calibration_batches))
    model_dir = trt_export.export_trt(TINY_SPEC, "int8", s.out_repo, 1 << 30, s.cache, s.golden)
    sym = s.sources / "minilm_int8_sym.onnx"
    assert model_dir == s.out_repo / "minilm_int8_trt" and trt_int8.stamp_path(sym).is_file()
    fake = sys.modules["tensorrt"]
    assert ("parse_from_file", str(sym)) in fake.calls
    assert [x for x in fake.calls if x[0] == "set_flag"] == [("set_flag", "INT8"), ("set_flag", "FP16")]
    m = read_manifest(manifest_path(model_dir / "1" / "model_sm90.plan"))
    assert m.source_onnx_sha256 == sha256_file(sym) and m.build_options["onnx_precision"] == INT8_SYMMETRIC
    assert pbtxt.read(model_dir).instance_group[0].count == pbtxt.read(s.onnx.parents[1]).instance_group[0].count
    out = capsys.readouterr().out
    assert f"making {sym}" in out and "parity vs ONNX Runtime: last_hidden_state: max abs diff" in out
    # the engine (here: fp32 outputs) against the symmetric ONNX, with int8_static's tolerance
    s.offset["value"] = 2.5  # > its max_abs 2.0
    with pytest.raises(trt_export.ParityError, match=r"\(limit 2.0\)"):
        trt_export.export_trt(TINY_SPEC, "int8", s.out_repo, 1 << 30, s.cache, s.golden)
    assert f"{sym}: up to date" in capsys.readouterr().out


def test_export_trt_int8_refuses_asymmetric_onnx_before_building(export_setup, monkeypatch):
    import onnx

    def ensure(spec, fp32_onnx, dst, tolerance):  # as if a uint8 Q/DQ model had been put there
        dst.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(qdq_model(np.array(128, np.uint8)), dst)

    monkeypatch.setattr(trt_export, "ensure_int8_source", ensure)
    with pytest.raises(RuntimeError, match="minilm_int8_sym.onnx cannot become a TensorRT int8 engine"):
        trt_export.export_trt(MINILM, "int8", export_setup.out_repo, 1 << 30, export_setup.cache, export_setup.golden)
    assert "parse_from_file" not in sys.modules["tensorrt"].names()


# ---- the command without TensorRT


def test_cli_without_tensorrt_stops_with_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert trt_export.main(["--out-repo", str(tmp_path / "out")]) == trt_export.EXIT_NO_TENSORRT == 2
    err = capsys.readouterr().err
    assert "TensorRT's Python package is not importable" in err
    assert "make export-trt-docker" in err and "nvcr.io/nvidia/tensorrt:26.07-py3" in err
    assert "No engine was written" in err
    assert not (tmp_path / "out").exists()


def test_cli_int8_without_tensorrt_stops_before_making_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(trt_export, "ensure_int8_source", lambda *a: pytest.fail("made the int8 ONNX without TensorRT"))
    assert trt_export.main(["--precision", "int8", "--out-repo", str(tmp_path / "out")]) == 2
    assert "TensorRT's Python package is not importable" in capsys.readouterr().err


def test_cli_make_int8_source_needs_no_tensorrt(tmp_path, monkeypatch, capsys):
    import onnx

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    fp32 = tmp_path / "repo" / "minilm" / "1" / "model.onnx"
    fp32.parent.mkdir(parents=True)
    onnx.save(tiny_matmul_encoder_model(), fp32)
    monkeypatch.setattr(trt_export, "source_onnx",
                        lambda spec, p: trt_options.source_onnx(spec, p, tmp_path / "repo", tmp_path / "src"))
    monkeypatch.setattr(trt_int8, "tokenizer_calibration", lambda spec: ("4 random batches", calibration_batches))
    monkeypatch.setitem(trt_export.ENCODERS, "minilm", TINY_SPEC)
    assert trt_export.main(["--make-int8-source"]) == 0
    assert trt_export.int8_onnx_problems(onnx.load(str(tmp_path / "src" / "minilm_int8_sym.onnx"))) == []
    assert "last_hidden_state: max_abs=" in capsys.readouterr().out


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")
def test_cli_module_exit_code_without_tensorrt(tmp_path):
    r = subprocess.run([sys.executable, "-m", "export.trt", "--out-repo", str(tmp_path / "out")], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "make export-trt-docker" in r.stderr and not (tmp_path / "out").exists()


def test_cli_check(tmp_path, monkeypatch, capsys):
    model_dir = make_engine_model(tmp_path / "repo")
    monkeypatch.setattr("export.trt_manifest.detect_host", lambda: HostInfo("10.5.0", (L4,)))
    assert trt_export.main(["--check", "--out-repo", str(model_dir.parent)]) == 1
    out = capsys.readouterr().out
    assert "minilm: ok" in out and "GPU 0 (NVIDIA L4, compute capability 8.9) has no engine" in out
    monkeypatch.setattr("export.trt_manifest.detect_host", lambda: HostInfo("10.5.0", (H100,)))
    assert trt_export.main(["--check", "--out-repo", str(model_dir.parent)]) == 0
    assert trt_export.main(["--check", "--out-repo", str(tmp_path / "none")]) == 1


# ---- real TensorRT (inside docker/Dockerfile.trt on a GPU)


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_real_build_and_parity(tmp_path, precision):
    import tensorrt

    src = trt_options.source_onnx(MINILM, build_options(tensorrt.__version__, precision).onnx_precision)
    if not src.exists() and precision != "int8":
        pytest.skip(f"{src} not exported (run `make export`)")
    if precision == "int8":  # the build image has no tokenizer: the symmetric ONNX is made on the host
        fp32 = trt_options.source_onnx(MINILM, "fp32")
        want = trt_int8.recipe(fp32, trt_int8.tokenizer_calibration(MINILM)[0]) if fp32.exists() else None
        if want is None or not trt_int8.is_fresh(src, want):
            pytest.skip(f"{src} missing or stale: run `python -m export.trt --make-int8-source` on the host")
    model_dir = trt_export.export_trt(MINILM, precision, tmp_path / "repo", 2 << 30, tmp_path / "t.cache")
    assert (tmp_path / "t.cache").stat().st_size > 0
    assert check_engine_compat(model_dir) == []
