"""Golden files: a few inputs, the PyTorch fp32 reference outputs and the variant's tolerance, written
by every export to tests/golden/<model>.npz and replayed by the server tests.

npz keys (all numpy arrays):
  input.<name>        int64 [B, S]      e.g. input.input_ids, input.attention_mask, input.token_type_ids
  reference.<name>    fp32  [B, S, H]   PyTorch fp32 output (the truth every precision is held to)
  onnxruntime.<name>  fp32  [B, S, H]   what ONNX Runtime CPU returned for this variant at export time
  max_abs, min_cosine float64 []        spec.tolerances[precision]
  model, precision    str []            e.g. "minilm_int8", "int8_static"
Check a server's outputs with `load(path).check({"last_hidden_state": array})`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.specs import Tolerance
from export.validate import Metrics, check, compare

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"
GOLDEN_SHAPE = (3, 24)  # (batch, sequence): small file, ragged rows
GOLDEN_SEED = 7


@dataclass(frozen=True)
class Golden:
    model: str
    precision: str
    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    onnxruntime: dict[str, np.ndarray]
    tolerance: Tolerance

    def check(self, outputs: dict[str, np.ndarray]) -> list[Metrics]:
        """Raise ValidationError unless every reference output is matched within the tolerance.
        Outputs with a sequence axis ([B, S, ...]) are compared at valid tokens only."""
        mask = self.inputs["attention_mask"]
        metrics = []
        for name, ref in self.reference.items():
            assert name in outputs, f"output {name!r} missing; got {list(outputs)}"
            got = np.asarray(outputs[name])
            metrics.append(compare(name, got, ref, mask if ref.ndim >= 3 else None))
        check(metrics, self.tolerance, f"golden {self.model}")
        return metrics


def path_for(model: str, golden_dir: Path = GOLDEN_DIR) -> Path:
    return golden_dir / f"{model}.npz"


def save(g: Golden, golden_dir: Path = GOLDEN_DIR) -> Path:
    golden_dir.mkdir(parents=True, exist_ok=True)
    arrays = {f"input.{k}": v for k, v in g.inputs.items()}
    arrays |= {f"reference.{k}": v.astype(np.float32) for k, v in g.reference.items()}
    arrays |= {f"onnxruntime.{k}": v.astype(np.float32) for k, v in g.onnxruntime.items()}
    path = path_for(g.model, golden_dir)
    np.savez_compressed(path, **arrays, max_abs=np.float64(g.tolerance.max_abs),
                        min_cosine=np.float64(g.tolerance.min_cosine), model=np.str_(g.model),
                        precision=np.str_(g.precision))
    return path


def load(path: Path) -> Golden:
    with np.load(path, allow_pickle=False) as z:
        def group(prefix):
            return {k[len(prefix):]: z[k] for k in z.files if k.startswith(prefix)}

        return Golden(model=str(z["model"]), precision=str(z["precision"]), inputs=group("input."),
                      reference=group("reference."), onnxruntime=group("onnxruntime."),
                      tolerance=Tolerance(float(z["max_abs"]), float(z["min_cosine"])))
