"""config.pbtxt (and warmup data) of an encoder model, from the spec. Shared by the ONNX variants and
the TensorRT plans: they differ only in backend/platform and default_model_filename.

Warmup: Triton runs the `model_warmup` requests at load. Random INT64 data would be out of vocabulary
(the Gather fails) and all-zero masks are not a real input, so the ids and the mask come from small
raw files under <model>/warmup/ (committed with the config): ids in [0, vocab), mask all ones.
Triton repeats the one-request data for each row of a warmup batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from export import pbtxt
from export.placement import instance_groups
from export.specs import EncoderSpec

WARMUP_DIR = "warmup"
WARMUP_SEED = 0


def warmup_data(spec: EncoderSpec) -> dict[str, np.ndarray]:
    """One request's worth of data ([opt sequence] per input) for the inputs that need real values."""
    seq = spec.axes["sequence"].opt
    rng = np.random.default_rng(WARMUP_SEED)
    data = {
        "input_ids": rng.integers(0, spec.vocab_size, seq, dtype=np.int64),
        "attention_mask": np.ones(seq, dtype=np.int64),
    }
    return {t.name: data[t.name] for t in spec.inputs if t.name in data}


def warmup(spec: EncoderSpec) -> list[mc.ModelWarmup]:
    """Batch 1 and batch opt, both at the opt sequence length."""
    seq = spec.axes["sequence"].opt
    files = warmup_data(spec)
    samples = []
    for batch in sorted({1, spec.axes["batch"].opt}):
        sample = mc.ModelWarmup(name=f"batch{batch}_seq{seq}", batch_size=batch, count=1)
        for t in spec.inputs:
            dims = pbtxt.tensor_dims(t, {"sequence": seq})
            inp = mc.ModelWarmup.Input(data_type=pbtxt.data_type(t.dtype), dims=dims)
            if t.name in files:
                inp.input_data_file = t.name
            else:
                inp.zero_data = True  # token_type_ids: a single segment
            sample.inputs[t.name].CopyFrom(inp)
        samples.append(sample)
    return samples


def encoder_config(spec: EncoderSpec, name: str, *, backend: str = "onnxruntime", platform: str = "",
                   filename: str = "model.onnx", gpu: bool = False, instances: int | None = None,
                   gpus: tuple[int, ...] | None = None) -> mc.ModelConfig:
    """The full ModelConfig of one encoder variant. TensorRT: backend="tensorrt", filename="model.plan".

    gpus: KIND_GPU instances on these device ids, `instances` per GPU (default 1); otherwise one group
    of `instances` (default spec.cpu_instances), KIND_GPU on every visible GPU when `gpu`."""
    assert name, "model name required"
    count = instances if instances is not None else (1 if gpus else spec.cpu_instances)
    assert count >= 1, f"instances must be >= 1, got {count}"
    config = mc.ModelConfig(
        name=name,
        backend=backend,
        platform=platform,
        max_batch_size=spec.max_batch_size,
        default_model_filename=filename,
        version_policy=pbtxt.latest_version_policy(1),
        input=[pbtxt.model_input(t) for t in spec.inputs],
        output=[pbtxt.model_output(t) for t in spec.outputs],
        dynamic_batching=pbtxt.dynamic_batching(spec.batching),
        instance_group=instance_groups(gpus, count, gpu),
        model_warmup=warmup(spec),
    )
    return config


def write_model_dir(config: mc.ModelConfig, spec: EncoderSpec, model_dir: Path) -> Path:
    """config.pbtxt + warmup/<input> raw files. Returns the config path."""
    path = pbtxt.write(config, model_dir)
    warm = model_dir / WARMUP_DIR
    warm.mkdir(exist_ok=True)
    for name, data in warmup_data(spec).items():
        (warm / name).write_bytes(data.tobytes())  # raw little-endian int64, row-major
    return path


def up_to_date(config: mc.ModelConfig, spec: EncoderSpec, model_dir: Path) -> bool:
    """True when the committed config and warmup files equal what write_model_dir would write."""
    cfg = model_dir / "config.pbtxt"
    if not cfg.is_file() or cfg.read_text() != pbtxt.to_text(config):
        return False
    return all((model_dir / WARMUP_DIR / n).is_file() and (model_dir / WARMUP_DIR / n).read_bytes() == d.tobytes()
               for n, d in warmup_data(spec).items())
