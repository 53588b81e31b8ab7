"""Hugging Face encoder -> fp32 ONNX with named dynamic axes, names and shapes from the spec.

Exporter choice (torch 2.13): the TorchScript exporter (`dynamo=False`). It needs no extra
dependency (the dynamo exporter needs onnxscript + onnx-ir), exports MiniLM in ~2 s, writes opset 17
with native LayerNormalization, and its graph runs in ONNX Runtime at the same speed or faster than
the dynamo one (measured: 16x16 batch 29 ms vs 33 ms on 2 cores) with max abs diff ~4e-6 vs PyTorch.
The model is loaded with eager attention: a plain MatMul/Softmax graph that ONNX Runtime fuses and
TensorRT parses, without the SDPA path's extra IsNaN/Where masking nodes.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import onnx
import torch
from transformers import AutoModel, PreTrainedModel

from export.specs import EncoderSpec


def resolve_source(spec: EncoderSpec, source: str | Path | None = None) -> str:
    """A local HF directory or hub id. Default: the `model/` dir inside the pip package spec.source."""
    if source is not None:
        path = Path(source)
        return str(path.resolve()) if path.exists() else str(source)
    found = importlib.util.find_spec(spec.source)
    assert found is not None and found.origin, f"pip package {spec.source!r} is not installed (requirements.txt)"
    model_dir = Path(found.origin).parent / "model"
    assert (model_dir / "config.json").is_file(), f"{model_dir} holds no Hugging Face model"
    return str(model_dir)


def load_encoder(spec: EncoderSpec, source: str) -> PreTrainedModel:
    model = AutoModel.from_pretrained(source, attn_implementation="eager")
    model.eval()
    cfg = model.config
    assert cfg.hidden_size == spec.hidden_size, f"{source}: hidden_size {cfg.hidden_size} != spec {spec.hidden_size}"
    assert cfg.max_position_embeddings >= spec.max_seq_len, (
        f"{source}: max_position_embeddings {cfg.max_position_embeddings} < spec max_seq_len {spec.max_seq_len}")
    return model


class Encoder(torch.nn.Module):
    """Positional inputs in spec order -> the spec's outputs (last_hidden_state: [B, S, H])."""

    def __init__(self, model: PreTrainedModel, spec: EncoderSpec):
        super().__init__()
        self.model = model
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.input_names, inputs)), return_dict=True)
        return tuple(out[name] for name in self.output_names)


def dynamic_axes(spec: EncoderSpec) -> dict[str, dict[int, str]]:
    """{'input_ids': {0: 'batch', 1: 'sequence'}, ..., 'last_hidden_state': {0: 'batch', 1: 'sequence'}}."""
    axes = {}
    for t in spec.inputs + spec.outputs:
        named = {0: "batch"} | {i + 1: d for i, d in enumerate(t.dims) if isinstance(d, str)}
        assert all(name in spec.axes for name in named.values()), f"{t.name}: axis not in spec.axes {named}"
        axes[t.name] = named
    return axes


def vocab_limit(spec: EncoderSpec, model: PreTrainedModel | None = None) -> int:
    """Upper bound (exclusive) for generated input_ids: valid for both the spec and the model."""
    return min(spec.vocab_size, model.config.vocab_size) if model is not None else spec.vocab_size


def trace_inputs(spec: EncoderSpec, vocab: int) -> tuple[torch.Tensor, ...]:
    """Export example: batch 2 x opt sequence, one row padded. Validation uses other shapes and seeds."""
    gen = torch.Generator().manual_seed(1234)
    batch, seq = 2, spec.axes["sequence"].opt
    tensors = {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=gen),
        "attention_mask": torch.ones(batch, seq, dtype=torch.int64),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.int64),
    }
    tensors["attention_mask"][1, seq // 2:] = 0
    assert set(tensors) >= {t.name for t in spec.inputs}, f"no example data for {[t.name for t in spec.inputs]}"
    return tuple(tensors[t.name] for t in spec.inputs)


def export_fp32(model: PreTrainedModel, spec: EncoderSpec, path: Path) -> Path:
    """Write the fp32 ONNX graph (weights embedded; MiniLM is ~90 MB, under protobuf's 2 GB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = Encoder(model, spec).eval()  # a new Module starts in training mode: export would restore it
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript deprecation and tracer warnings: validation decides
        torch.onnx.export(
            wrapper,
            trace_inputs(spec, vocab_limit(spec, model)),
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=dynamic_axes(spec),
            opset_version=spec.opset,
            do_constant_folding=True,
            dynamo=False,
        )
    check_io(onnx.load(str(path)), spec)
    return path


def check_io(graph_model: onnx.ModelProto, spec: EncoderSpec) -> None:
    """The ONNX graph's I/O names, dtypes and named axes equal the spec's (what Triton's config says)."""
    def describe(values):
        out = {}
        for v in values:
            tt = v.type.tensor_type
            dims = tuple(d.dim_param or d.dim_value for d in tt.shape.dim)
            out[v.name] = (onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, dims)
        return out

    np_name = {"INT64": "int64", "FP32": "float32", "FP16": "float16", "INT32": "int32"}
    want = {t.name: (np_name[t.dtype], ("batch", *t.dims)) for t in spec.inputs + spec.outputs}
    got = describe(graph_model.graph.input) | describe(graph_model.graph.output)
    assert got == want, f"ONNX I/O {got} != spec {want}"
