"""TensorRT build options and model configs (export/trt_options.py, export/trt_config.py): profile
shapes, precision flags per TensorRT version, engine names, and the TensorRT config derived from the
ONNX one."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from export import pbtxt, trt_options
from export.pbtxt import mc
from export.specs import MINILM, Axis, Tensor
from export.trt_config import cc_model_filenames, trt_config, write_trt_config
from export.trt_manifest import write_manifest
from export.trt_options import BuildOptions, build_options, engine_filename, engine_model_name, profile_shapes
from serve.paths import REPO_ROOT
from tests.trt_helpers import H100, L4, make_manifest, onnx_config


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
