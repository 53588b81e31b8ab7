"""Compare an exported model with its reference: per output max abs diff and cosine, against the
spec's tolerance for the precision (see export.specs.Tolerance for the exact definition).

The same `compare`/`check` functions are used at export time (ONNX Runtime vs PyTorch on fresh random
inputs) and by the server tests (Triton vs the golden file's reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from export.specs import EncoderSpec, Tolerance


class ValidationError(AssertionError):
    pass


@dataclass(frozen=True)
class Metrics:
    output: str
    max_abs: float
    min_cosine: float  # smallest per-sequence cosine
    mean_cosine: float

    def ok(self, tol: Tolerance) -> bool:
        return self.max_abs <= tol.max_abs and self.min_cosine >= tol.min_cosine

    def __str__(self) -> str:
        return f"{self.output}: max_abs={self.max_abs:.3g} min_cos={self.min_cosine:.6f} mean_cos={self.mean_cosine:.6f}"


def compare(name: str, got: np.ndarray, ref: np.ndarray, mask: np.ndarray | None) -> Metrics:
    """got/ref: [B, S, ...] (or [B, ...] when mask is None); mask: [B, S] of 0/1 (valid tokens)."""
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values in the output"
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    if mask is not None:
        assert mask.shape == got.shape[:2], f"{name}: mask {mask.shape} vs output {got.shape}"
        valid = mask.astype(bool)[(...,) + (None,) * (got.ndim - 2)]  # [B, S, 1...]
        got, ref = got * valid, ref * valid  # padded positions compare as 0 == 0
    flat_g, flat_r = got.reshape(len(got), -1), ref.reshape(len(ref), -1)  # [B, S*H]
    norms = np.linalg.norm(flat_g, axis=1) * np.linalg.norm(flat_r, axis=1)
    cos = (flat_g * flat_r).sum(1) / np.maximum(norms, 1e-30)
    return Metrics(name, float(np.abs(got - ref).max()), float(cos.min()), float(cos.mean()))


def check(metrics: list[Metrics], tol: Tolerance, what: str) -> None:
    bad = [m for m in metrics if not m.ok(tol)]
    if bad:
        raise ValidationError(
            f"{what}: outside tolerance (max_abs <= {tol.max_abs}, min_cos >= {tol.min_cosine}): "
            + "; ".join(str(m) for m in bad))


def random_feed(spec: EncoderSpec, batch: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random valid inputs: ids in [0, vocab), ragged lengths (row 0 full, others padded), type ids 0/1."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([[seq], rng.integers(1, seq + 1, batch - 1)])  # [B]
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)  # [B, S]
    ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64) * mask  # padding id 0
    segment = rng.integers(1, seq + 1, batch)[:, None]  # second segment from a random position
    types = ((np.arange(seq)[None, :] >= segment) & (mask == 1)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {t.name: feed[t.name] for t in spec.inputs}


def validation_shapes(spec: EncoderSpec) -> list[tuple[int, int]]:
    """(batch, sequence) cases: the axes' extremes and odd sizes in between."""
    b, s = spec.axes["batch"], spec.axes["sequence"]
    return [(b.min, s.min), (1, 7), (3, 19), (b.opt, s.opt), (5, s.max)]


def torch_outputs(model, spec: EncoderSpec, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch  # lazily: export.golden (and so this module) is used where torch is absent

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feed.items()}, return_dict=True)
    return {t.name: out[t.name].float().numpy() for t in spec.outputs}


def session(path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def output_mask(spec: EncoderSpec, name: str, feed: dict[str, np.ndarray]) -> np.ndarray | None:
    t = next(t for t in spec.outputs if t.name == name)
    return feed["attention_mask"] if t.dims and t.dims[0] == "sequence" else None


def validate_against(path, reference: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                     spec: EncoderSpec, tol: Tolerance, what: str, vocab: int, seed: int = 2024) -> list[Metrics]:
    """ONNX Runtime (CPU) run of `path` vs `reference(feed)` over validation_shapes(spec), on fresh
    random inputs (ids below `vocab`); worst case per output; raises ValidationError outside `tol`."""
    sess = session(path)
    worst: dict[str, list[Metrics]] = {t.name: [] for t in spec.outputs}
    for i, (batch, seq) in enumerate(validation_shapes(spec)):
        feed = random_feed(spec, batch, seq, vocab, seed + i)
        ref = reference(feed)
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        for name in worst:
            worst[name].append(compare(name, got[name], ref[name], output_mask(spec, name, feed)))
    metrics = [Metrics(n, max(m.max_abs for m in ms), min(m.min_cosine for m in ms),
                       float(np.mean([m.mean_cosine for m in ms]))) for n, ms in worst.items()]
    check(metrics, tol, what)
    return metrics


def validate_onnx(path, model, spec: EncoderSpec, precision: str, vocab: int,
                  seed: int = 2024) -> list[Metrics]:
    """ONNX Runtime (CPU) vs PyTorch on fresh inputs; raises ValidationError with the numbers."""
    return validate_against(path, lambda feed: torch_outputs(model, spec, feed), spec, spec.tolerances[precision],
                            f"{path} ({precision}) vs PyTorch", vocab, seed)
