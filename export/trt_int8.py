"""The ONNX a TensorRT int8 engine is built from: the encoder's fp32 ONNX quantized to symmetric int8
Q/DQ (export/quantize.py quantize_int8_symmetric), checked with ONNX Runtime against the fp32 ONNX.

TensorRT's explicit quantization takes only QuantizeLinear/DequantizeLinear with int8 on both sides
and zero point 0; minilm_int8 (ONNX Runtime's variant, uint8 activations) is refused. The symmetric
model is a build input, not a served model: build/trt_sources/<name>_int8_sym.onnx, with a stamp
(<name>_int8_sym.json) saying which fp32 ONNX and recipe made it, so it is remade only when they change.

Calibration needs the tokenizer (transformers), which the TensorRT build image does not have: make the
file on the host first (`python -m export.trt --make-int8-source`); the container then finds it fresh.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from export.specs import EncoderSpec, Tolerance
from export.trt_manifest import repo_relative, sha256_file
from export.validate import Metrics, session, validate_against

QUANTIZE_CODE = Path(__file__).parent / "quantize.py"
Batches = Iterable[dict[str, np.ndarray]]


def int8_onnx_problems(model) -> list[str]:
    """Why TensorRT cannot build an int8 engine from this ONNX (an onnx.ModelProto); empty when it can.

    TensorRT takes explicit Q/DQ quantization with symmetric int8 (zero point 0), not ONNX Runtime's
    dynamic quantization operators nor asymmetric uint8 activations (ORT's quantize_static default).
    """
    from onnx import numpy_helper

    nodes = model.graph.node
    inits = {i.name: i for i in model.graph.initializer}
    dynamic = sorted({n.op_type for n in nodes} & {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                                                   "QLinearMatMul", "QLinearConv"})
    problems = []
    if dynamic:
        problems.append(f"operators {dynamic} (ONNX Runtime integer/dynamic quantization): TensorRT builds int8 only "
                        f"from QuantizeLinear/DequantizeLinear (Q/DQ) models")
    qdq = [n for n in nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq and not dynamic:
        problems.append("no QuantizeLinear/DequantizeLinear nodes: not a Q/DQ quantized model")
    asymmetric = [n.name or n.output[0] for n in qdq if len(n.input) > 2 and n.input[2] in inits
                  and ((zp := numpy_helper.to_array(inits[n.input[2]])).dtype != np.int8 or zp.any())]
    if asymmetric:
        problems.append(f"{len(asymmetric)} Q/DQ nodes with a uint8 or non-zero zero point (first: {asymmetric[0]}): "
                        f"TensorRT needs symmetric int8; make it with export.quantize.quantize_int8_symmetric "
                        f"(`python -m export.trt --make-int8-source`)")
    return problems


def validate_against_fp32(path: Path, fp32_onnx: Path, spec: EncoderSpec, tolerance: Tolerance,
                          seed: int = 2024) -> list[Metrics]:
    """ONNX Runtime: `path` vs the fp32 ONNX on export/validate.py's random inputs (ids below
    spec.vocab_size) and shapes, worst case per output; raises ValidationError outside `tolerance`."""
    ref_s = session(fp32_onnx)
    names = [o.name for o in ref_s.get_outputs()]
    return validate_against(path, lambda feed: dict(zip(names, ref_s.run(None, feed))), spec, tolerance,
                            f"{path} (symmetric int8) vs {fp32_onnx}", spec.vocab_size, seed)


def stamp_path(dst: Path) -> Path:
    return Path(dst).with_suffix(".json")


def recipe(fp32_onnx: Path, calibration: str) -> dict:
    """What the symmetric model depends on: the fp32 ONNX, the quantization code, the calibration data."""
    return {"source_onnx": repo_relative(Path(fp32_onnx)), "source_onnx_sha256": sha256_file(fp32_onnx),
            "quantize_py_sha256": sha256_file(QUANTIZE_CODE), "calibration": calibration}


def is_fresh(dst: Path, want: dict) -> bool:
    stamp = stamp_path(dst)
    return Path(dst).is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == want


def make_int8_source(fp32_onnx: Path, dst: Path, batches: Batches, spec: EncoderSpec, tolerance: Tolerance,
                     calibration: str) -> list[Metrics]:
    """Quantize, check it is TensorRT-ready and within `tolerance` of the fp32 ONNX, then stamp it.
    A model that fails either check is deleted, so no unchecked file is left to build from."""
    import onnx

    from export.quantize import quantize_int8_symmetric

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    stamp_path(dst).unlink(missing_ok=True)
    quantize_int8_symmetric(Path(fp32_onnx), dst, batches)
    try:
        problems = int8_onnx_problems(onnx.load(str(dst), load_external_data=False))
        assert not problems, f"{dst} is not TensorRT-ready: " + "; ".join(problems)
        metrics = validate_against_fp32(dst, fp32_onnx, spec, tolerance)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    stamp_path(dst).write_text(json.dumps({"recipe": recipe(fp32_onnx, calibration),
                                           "vs_fp32": [asdict(m) for m in metrics]}, indent=2) + "\n")
    return metrics


def tokenizer_calibration(spec: EncoderSpec) -> tuple[str, Callable[[], Batches]]:
    """(description, batches): the calibration data of minilm_int8 (export/encoder.py), so both int8 models
    see the same inputs. The description names the code that makes the data (a change remakes the model)
    and is computed without torch; the batches are made lazily: only a stale model needs the tokenizer."""
    import hashlib

    code = [Path(__file__).parent / f for f in ("encoder.py", "calibration.py")]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in code)).hexdigest()[:16]
    description = f"export.encoder calibration batches (encoder.py + calibration.py sha256 {digest})"

    def batches():
        try:
            from export import calibration, encoder
            from export.onnx_export import resolve_source
        except ImportError as e:
            raise RuntimeError(
                f"making the symmetric int8 ONNX needs transformers and torch for the calibration data ({e}); "
                f"make it on the host first: `python -m export.trt --make-int8-source`") from e
        texts = calibration.sentences(encoder.CALIBRATION_SENTENCES, calibration.CALIBRATION_SEED)
        return list(encoder.tokenizer_batches(resolve_source(spec), spec, texts, encoder.CALIBRATION_BATCH))

    return description, batches


def ensure_int8_source(spec: EncoderSpec, fp32_onnx: Path, dst: Path, tolerance: Tolerance,
                       calibration: tuple[str, Callable[[], Batches]] | None = None) -> Path:
    """dst, (re)made from fp32_onnx unless its stamp says it is up to date. calibration: (description,
    batches factory), default tokenizer_calibration(spec)."""
    assert Path(fp32_onnx).is_file(), f"{fp32_onnx} not found: run `make export` first"
    description, batches = calibration or tokenizer_calibration(spec)
    if is_fresh(dst, recipe(fp32_onnx, description)):
        print(f"{dst}: up to date")
        return Path(dst)
    feeds = batches()  # first: where the tokenizer is missing this fails before anything is touched
    print(f"making {dst} (symmetric int8 Q/DQ of {fp32_onnx}, calibrated on {description})")
    metrics = make_int8_source(fp32_onnx, dst, feeds, spec, tolerance, description)
    print(f"{dst} vs fp32 (ONNX Runtime): " + "; ".join(str(m) for m in metrics))
    return Path(dst)
