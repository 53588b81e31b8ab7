"""Shared by the TensorRT export tests (tests/test_trt*.py): GPUs, manifests and engine model
directories, tiny ONNX encoders with MiniLM's I/O, and the int8 test models."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from export import pbtxt
from export.encoder_config import encoder_config
from export.pbtxt import mc
from export.specs import MINILM
from export.trt_config import write_trt_config
from export.trt_manifest import Gpu, Manifest, manifest_path, sha256_file, write_manifest
from export.trt_options import engine_filename


HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


needs_tensorrt = pytest.mark.skipif(not HAVE_TENSORRT, reason="TensorRT Python package not installed")


H100 = Gpu("NVIDIA H100 80GB HBM3", "9.0")


L4 = Gpu("NVIDIA L4", "8.9")


def onnx_config(name="minilm") -> mc.ModelConfig:
    """The ONNX model's config as export/encoder.py writes it (CPU instances, onnxruntime backend)."""
    return encoder_config(MINILM, name, instances=2)


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
