"""Parity and I/O checks of built engines (export/validate.py) and the symmetric int8 Q/DQ ONNX that int8
engines are built from (export/trt_int8.py): TensorRT-ready, within tolerance or not made, remade
only when stale."""
from __future__ import annotations

import json

import numpy as np
import pytest

from export import quantize, trt_int8
from export import trt as trt_export
from export.specs import MINILM, Tolerance
from export.trt_manifest import sha256_file
from export.validate import ValidationError
from tests.trt_helpers import (
    FFN_IN, FFN_OUT, QUERY, TINY_SPEC, calibration_batches, qdq_model, tiny_encoder_onnx_model,
    tiny_matmul_encoder_model,
)


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
