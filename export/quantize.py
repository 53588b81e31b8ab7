"""fp32 ONNX -> fp16 and int8 (ONNX Runtime quantization) variants. I/O dtypes never change.

- fp16: onnxruntime.transformers.float16 with keep_io_types (inputs stay INT64, the output stays
  FP32) and LayerNormalization/Softmax kept in fp32 (Cast nodes around them).
- int8_dynamic: weights int8 per channel, activations quantized at run time (MatMulInteger).
- int8_static: QDQ, weights int8 per channel, activations uint8 with ranges calibrated on generated
  sentences. Only MatMuls with a weight are quantized (the attention score/context MatMuls multiply two
  activations), and the FFN output MatMuls stay fp32: their input is the GELU output, whose outlier
  channels make a per-tensor uint8 range useless (mean pooled cosine vs fp32 drops from 0.99 to ~0.91
  when they are quantized; see docs/export.md).
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx

# Ops that must compute in fp32 to stay accurate: the normalization (variance of 384 values) and the
# softmax (exp range, sums of many small terms). The converter puts Casts around them.
FP16_KEEP_FP32_OPS = ("LayerNormalization", "Softmax")

# Nodes the static quantizer leaves in fp32 (matched against node names of the exported graph).
FFN_OUTPUT_MATMUL = re.compile(r"layer\.\d+/output/dense/MatMul")


def to_fp16(src: Path, dst: Path) -> Path:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP16_KEEP_FP32_OPS))
    onnx.save(half, str(dst))
    return dst


def weight_matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(MatMuls with an initializer operand, MatMuls of two activations)."""
    inits = {i.name for i in model.graph.initializer}
    with_weight, act_act = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul":
            (with_weight if any(i in inits for i in node.input) else act_act).append(node.name)
    return with_weight, act_act


def preprocess(src: Path, dst: Path) -> Path:
    """Shape inference + graph cleanup so the quantizers see every tensor's shape. Symbolic shape
    inference cannot resolve the exporter's mask arithmetic; ONNX's own shape inference can."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def quantize_int8_dynamic(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        pre = preprocess(src, Path(tmp) / "pre.onnx")
        _, act_act = weight_matmuls(onnx.load(str(pre)))
        quantize_dynamic(
            str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=["MatMul"], nodes_to_exclude=act_act,
        )
    return dst


def quantize_int8_static(src: Path, dst: Path, batches: Iterable[dict[str, np.ndarray]]) -> Path:
    """batches: feeds (input name -> int64 [B, S]) covering the range of real inputs."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = preprocess(src, Path(tmp) / "pre.onnx")
        model = onnx.load(str(pre))
        _, act_act = weight_matmuls(model)
        ffn_out = [n.name for n in model.graph.node if n.op_type == "MatMul" and FFN_OUTPUT_MATMUL.search(n.name)]
        quantize_static(
            str(pre), str(dst), Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=act_act + ffn_out,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
        )
    return dst
