"""config.pbtxt (+ warmup files) of a TensorRT engine model: the encoder's config from
export/encoder_config.py, as for its ONNX variants, with only the platform, the model files and the
instance kind changed. Inputs, outputs, max_batch_size, dynamic batching, queue policy and warmup are
the same, so the engine model serves the same contract as the ONNX one.
"""
from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export import pbtxt
from export.encoder_config import encoder_config, write_model_dir
from export.placement import gpus_of
from export.specs import EncoderSpec
from export.trt_manifest import PLATFORM, Manifest, read_manifests


def cc_model_filenames(manifests: list[Manifest]) -> dict[str, str]:
    """{compute capability: engine file}; one engine per GPU architecture."""
    files: dict[str, str] = {}
    for m in manifests:
        assert m.compute_capability not in files, f"two engines for compute capability {m.compute_capability}"
        files[m.compute_capability] = m.engine_file
    return files


def trt_config(spec: EncoderSpec, name: str, cc_files: dict[str, str], instances: int = 1,
               gpus: tuple[int, ...] | None = None) -> mc.ModelConfig:
    """The engine model's config: platform tensorrt_plan, one engine file per compute capability, KIND_GPU.

    No default_model_filename: a GPU without its own engine finds no model.plan and fails to load
    instead of deserializing an engine built for another architecture.
    """
    assert cc_files, "no engines: a tensorrt_plan config needs at least one cc_model_filenames entry"
    config = encoder_config(spec, name, backend="", platform=PLATFORM, filename="", gpu=True, instances=instances,
                            gpus=gpus)
    for cc, filename in sorted(cc_files.items()):
        config.cc_model_filenames[cc] = filename
    return config


def write_trt_config(spec: EncoderSpec, model_dir: Path, onnx_model_dir: Path | None = None) -> Path:
    """(Re)write model_dir/config.pbtxt and warmup/ from every engine manifest in model_dir/1/.

    The instance count (per GPU) and the GPUs placed on are the ONNX model's (onnx_model_dir/config.pbtxt)
    when given, else 1 instance on every visible GPU.
    """
    manifests = read_manifests(model_dir / "1")
    for m in manifests:
        assert m.max_batch_size == spec.max_batch_size, (
            f"{m.engine_file}: engine profile max batch {m.max_batch_size} != the spec's max_batch_size "
            f"{spec.max_batch_size}: rebuild it")
    instances, gpus = 1, None
    if onnx_model_dir is not None and (onnx_model_dir / "config.pbtxt").exists():
        groups = pbtxt.read(onnx_model_dir).instance_group
        instances = groups[0].count if groups else 1
        gpus = gpus_of(groups)
    config = trt_config(spec, model_dir.name, cc_model_filenames(manifests), instances, gpus)
    return write_model_dir(config, spec, model_dir)
