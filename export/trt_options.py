"""What a TensorRT build needs that can be decided without TensorRT: optimization profiles from the
spec, the version-dependent precision recipe, and where sources and engines live. Pure functions, so
they are unit-tested on hosts without TensorRT; export/trt.py applies them to the real builder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from export.specs import Axis, EncoderSpec
from serve.paths import BUILD_DIR, MODEL_REPOSITORY, REPO_ROOT

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_PRECISION = "fp16"
DEFAULT_WORKSPACE_GB = 4
# Engines live in their own repository: a CPU host serving model_repository/ must never see a
# tensorrt_plan model (no engine can exist there, and the pip tritonserver has no TensorRT backend).
DEFAULT_OUT_REPO = REPO_ROOT / "model_repository_trt"
TIMING_CACHE_DIR = BUILD_DIR / "trt_timing_cache"
# Build inputs that are not served models: the symmetric int8 Q/DQ ONNX of int8 engines.
TRT_SOURCES_DIR = BUILD_DIR / "trt_sources"
# BuildOptions.onnx_precision of int8 engines: TensorRT's explicit quantization takes only symmetric
# int8 Q/DQ, so the engine is not built from minilm_int8 (uint8 activations, for ONNX Runtime) but from
# a symmetric twin made by export/trt_int8.py into TRT_SOURCES_DIR.
INT8_SYMMETRIC = "int8_symmetric"
GOLDEN_DIR = REPO_ROOT / "tests" / "golden"  # = export.golden.GOLDEN_DIR (not imported: it pulls in torch)
# The build image must carry the TensorRT of the serving image (engines are not portable across
# TensorRT versions): the tritonserver and tensorrt images of one NGC release ship the same TensorRT
# (docker/Dockerfile.trt checks it when the build image is built). Change the release with TRITON_IMAGE /
# TRT_IMAGE in docker/Dockerfile and docker/Dockerfile.trt.
NGC_RELEASE = "26.07"
SERVING_IMAGE = f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE}-py3"
BUILD_IMAGE = f"nvcr.io/nvidia/tensorrt:{NGC_RELEASE}-py3"
# Engine precision -> the spec's precision variant (export/specs.py VARIANT_SUFFIX): its model name
# and its tolerance. An int8 engine (from the symmetric Q/DQ ONNX) takes int8_static's.
SPEC_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8": "int8_static"}

Shape = tuple[int, ...]


def profile_shapes(spec: EncoderSpec) -> dict[str, tuple[Shape, Shape, Shape]]:
    """{input name: (min, opt, max)} full shapes (batch axis first) from the spec's named axes.

    The profile's max batch is spec.axes["batch"].max, which is also the config's max_batch_size,
    so Triton never forms a batch the engine cannot take.
    """
    assert "batch" in spec.axes, f"{spec.name}: spec.axes needs a 'batch' axis"
    shapes = {}
    for t in spec.inputs:
        for d in t.dims:
            assert isinstance(d, int) or d in spec.axes, f"{spec.name}.{t.name}: axis {d!r} not in spec.axes"
        dims: list[Axis | int] = [spec.axes["batch"], *(spec.axes[d] if isinstance(d, str) else d for d in t.dims)]
        shapes[t.name] = tuple(
            tuple(d if isinstance(d, int) else getattr(d, which) for d in dims) for which in ("min", "opt", "max")
        )
    return shapes


@dataclass(frozen=True)
class BuildOptions:
    """The precision recipe for one TensorRT major version.

    onnx_precision: which ONNX is parsed (source_onnx): a spec precision variant
    (model_repository/<spec.variant_name(onnx_precision)>/1/model.onnx) or INT8_SYMMETRIC.
    network_flags / set_flags / clear_flags: NetworkDefinitionCreationFlag and BuilderFlag member names.
    """

    onnx_precision: str
    strongly_typed: bool
    network_flags: tuple[str, ...] = ()
    set_flags: tuple[str, ...] = ()
    clear_flags: tuple[str, ...] = ()


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def build_options(trt_version: str, precision: str) -> BuildOptions:
    """TensorRT 10: weakly typed network, precision from builder flags (fp16 from the fp32 ONNX, int8
    from the symmetric Q/DQ ONNX with INT8 + FP16 so the unquantized layers may run in fp16).
    TensorRT >= 11: the precision flags are gone and every network is strongly typed (the
    STRONGLY_TYPED creation flag is deprecated and ignored, so it is not set): the precision comes
    from the ONNX itself, so fp16 parses the fp16 ONNX and int8 the symmetric Q/DQ ONNX.
    fp32 clears TF32 on both: TF32 matmuls (on by default) would miss the fp32 parity tolerance.
    """
    assert precision in PRECISIONS, f"precision {precision!r} not in {PRECISIONS}"
    major = trt_major(trt_version)
    if major < 10:
        raise ValueError(f"TensorRT {trt_version} is too old: need 10 or newer (INT64 inputs, the v3 I/O API)")
    if major == 10:
        return {
            "fp32": BuildOptions("fp32", strongly_typed=False, clear_flags=("TF32",)),
            "fp16": BuildOptions("fp32", strongly_typed=False, set_flags=("FP16",)),
            "int8": BuildOptions(INT8_SYMMETRIC, strongly_typed=False, set_flags=("INT8", "FP16")),
        }[precision]
    return {
        "fp32": BuildOptions("fp32", strongly_typed=True, clear_flags=("TF32",)),
        "fp16": BuildOptions("fp16", strongly_typed=True),
        "int8": BuildOptions(INT8_SYMMETRIC, strongly_typed=True),
    }[precision]


def source_onnx(spec: EncoderSpec, onnx_precision: str, repo: Path = MODEL_REPOSITORY,
                sources_dir: Path = TRT_SOURCES_DIR) -> Path:
    """The ONNX an engine is parsed from (BuildOptions.onnx_precision): the one written by
    export/encoder.py for a spec precision variant, or for INT8_SYMMETRIC the build input
    sources_dir/<name>_int8_sym.onnx (export/trt_int8.py, made from the fp32 ONNX)."""
    if onnx_precision == INT8_SYMMETRIC:
        return sources_dir / f"{spec.name}_int8_sym.onnx"
    return repo / spec.variant_name(onnx_precision) / "1" / "model.onnx"


def engine_model_name(spec: EncoderSpec, precision: str) -> str:
    """fp16 -> minilm_fp16_trt, int8 -> minilm_int8_trt: the TensorRT twin of the ONNX variant's name."""
    return f"{spec.variant_name(SPEC_PRECISION[precision])}_trt"


def engine_filename(compute_capability: str) -> str:
    """'9.0' -> 'model_sm90.plan': one engine per compute capability, listed in cc_model_filenames."""
    major, minor = compute_capability.split(".")
    return f"model_sm{int(major)}{int(minor)}.plan"


def timing_cache_path(trt_version: str, compute_capability: str) -> Path:
    """One cache per (TensorRT version, GPU arch): a cache from another device or version is rejected."""
    return TIMING_CACHE_DIR / f"trt{trt_version}_sm{compute_capability.replace('.', '')}.cache"
