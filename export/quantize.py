"""fp32 ONNX -> fp16 and int8 (ONNX Runtime quantization) variants. I/O dtypes never change.

- fp16: onnxruntime.transformers.float16 with keep_io_types (inputs stay INT64, the output stays
  FP32) and LayerNormalization/Softmax kept in fp32 (Cast nodes around them).
- int8_dynamic: weights int8 per channel, activations quantized at run time (MatMulInteger).
- int8_static: QDQ, weights int8 per channel, activations uint8 with ranges calibrated on generated
  sentences. Only MatMuls with a weight are quantized (the attention score/context MatMuls multiply two
  activations), and the FFN output MatMuls stay fp32: their input is the GELU output, whose outlier
  channels make a per-tensor uint8 range useless (mean pooled cosine vs fp32 drops from 0.99 to ~0.91
  when they are quantized; see docs/export.md).
- int8 symmetric: int8_static with int8 activations of zero point 0, the only Q/DQ form TensorRT's
  explicit quantization accepts. Made for TensorRT int8 engines (export/trt_int8.py), not served on CPU.
  Two differences, both measured on 300 generated sentences against fp32 (ONNX Runtime CPU; smallest
  per-sequence token cosine / mean cosine of the pooled embeddings): with int8_static's recipe made
  symmetric it is 0.932 / 0.982, under the spec's 0.95 token cosine. Q/DQ only on the MatMul inputs
  (not their outputs, as TensorRT places them) gives 0.943 / 0.984; also keeping the FFN intermediate
  MatMuls in fp32 (their input, the attention LayerNorm output, has outlier channels that a symmetric
  per-tensor range cannot cover finely) gives 0.988 / 0.996 (int8_static: 0.950 / 0.988). The int8
  MatMuls left are the attention projections (q, k, v, output).
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
FFN_MATMULS = re.compile(FFN_OUTPUT_MATMUL.pattern + r"|layer\.\d+/intermediate/dense/MatMul")


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


def _quantize_static_qdq(src: Path, dst: Path, batches: Iterable[dict[str, np.ndarray]], activation_type: str,
                         keep_fp32: re.Pattern, extra_options: dict | None = None) -> Path:
    """Calibrated QDQ quantization of the weight MatMuls, shared by the ONNX Runtime (uint8 activations)
    and TensorRT (symmetric int8) variants: MinMax calibration on `batches`, weights int8 per channel;
    the activation-activation MatMuls and those whose name matches keep_fp32 stay fp32 (see the module
    docstring). activation_type: a QuantType member name ("QUInt8", "QInt8")."""
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
        kept = [n.name for n in model.graph.node if n.op_type == "MatMul" and keep_fp32.search(n.name)]
        quantize_static(
            str(pre), str(dst), Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType[activation_type],
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=act_act + kept,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
            extra_options=extra_options or {},
        )
    return dst


def quantize_int8_static(src: Path, dst: Path, batches: Iterable[dict[str, np.ndarray]]) -> Path:
    """ONNX Runtime's int8 variant (minilm_int8). batches: feeds (input name -> int64 [B, S]) covering
    the range of real inputs."""
    return _quantize_static_qdq(src, dst, batches, "QUInt8", FFN_OUTPUT_MATMUL)


# TensorRT's explicit quantization takes only symmetric int8 Q/DQ (zero point 0, INT8 on both sides);
# Q/DQ go on the inputs of the quantized MatMuls only (see the module docstring).
SYMMETRIC_INT8_OPTIONS = {"ActivationSymmetric": True, "WeightSymmetric": True,
                          "OpTypesToExcludeOutputQuantization": ["MatMul"]}


def quantize_int8_symmetric(src: Path, dst: Path, batches: Iterable[dict[str, np.ndarray]]) -> Path:
    """The Q/DQ ONNX a TensorRT int8 engine is built from: int8 activations and weights, zero point 0,
    weights per channel, Q/DQ on MatMul inputs only; the whole FFN stays fp32 (module docstring)."""
    return _quantize_static_qdq(src, dst, batches, "QInt8", FFN_MATMULS, SYMMETRIC_INT8_OPTIONS)
