"""Export an encoder (default: MiniLM-L6 from the pip package) to ONNX variants in the model repository.

    python -m export.encoder                                 # default CPU variants (what `make export` runs)
    python -m export.encoder --precision fp16 --gpu          # opt-in fp16 for a GPU host
    python -m export.encoder --gpus 0,1                      # one instance on each of GPUs 0 and 1
    python -m export.encoder --source ./my_hf_dir --force    # other weights; rebuild even if up to date

Each variant: <repo>/<name>/1/model.onnx + config.pbtxt (+ warmup/), validated against PyTorch on
fresh inputs (raises with the numbers), and a golden file tests/golden/<name>.npz for the server tests.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from export import calibration, golden, quantize
from export.encoder_config import encoder_config, up_to_date, write_model_dir
from export.onnx_export import export_fp32, load_encoder, resolve_source, vocab_limit
from export.placement import add_gpus_argument
from export.specs import MINILM, VARIANT_SUFFIX, EncoderSpec
from export.validate import Metrics, random_feed, session, torch_outputs, validate_onnx
from serve.paths import BUILD_DIR, MODEL_REPOSITORY, REPO_ROOT

PRECISIONS = tuple(VARIANT_SUFFIX)  # fp32, fp16, int8_dynamic, int8_static
# `make export` builds and validates every variant. fp16 is meant for GPUs (`--gpu` configs); ONNX
# Runtime CPU runs it too, no faster than fp32 (31.6 vs 29.3 ms for a 16x16 batch on 2 cores), so on a
# CPU host it is served only so that every variant is checked end to end.
DEFAULT_PRECISIONS = PRECISIONS
VERSION = "1"
ONNX_FILE = "model.onnx"
CALIBRATION_SENTENCES = 256
CALIBRATION_BATCH = 16
REPORT_SENTENCES = 300
ACCURACY_REPORT = REPO_ROOT / "results" / "int8_accuracy.md"
STAMP_DIR = BUILD_DIR / "export"
# Code whose change invalidates an export (the up-to-date check hashes it with the source weights).
_CODE = ("specs.py", "onnx_export.py", "quantize.py", "validate.py", "golden.py", "encoder_config.py",
         "calibration.py", "encoder.py", "placement.py")

console = Console(stderr=True, highlight=False, markup=False)


@dataclass
class VariantResult:
    name: str
    precision: str
    model_dir: Path
    golden: Path
    metrics: list[Metrics] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False


def _fingerprint(source: str, spec: EncoderSpec, precision: str, gpu: bool, instances: int | None,
                 out_repo: Path, gpus: tuple[int, ...] | None = None) -> str:
    h = hashlib.sha256(repr((spec, precision, gpu, instances, gpus and tuple(gpus), str(out_repo.resolve()))).encode())
    src = Path(source)
    files = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else []
    for p in files:  # weights: size + mtime (hashing 90 MB on every `make export` is not worth it)
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if not files:
        h.update(source.encode())
    for name in _CODE:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def _stamp_path(name: str) -> Path:
    return STAMP_DIR / f"{name}.json"


def _is_fresh(spec: EncoderSpec, name: str, fingerprint: str, model_dir: Path, golden_path: Path, config) -> bool:
    stamp = _stamp_path(name)
    return (stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint
            and (model_dir / VERSION / ONNX_FILE).is_file() and golden_path.is_file()
            and up_to_date(config, spec, model_dir))


def tokenizer_batches(source: str, spec: EncoderSpec, texts: list[str], batch: int):
    """Tokenized feeds, shortest texts first (padding to the longest of each batch, truncation at
    spec.max_seq_len)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - re-raised with the reason the tokenizer is needed
        raise RuntimeError(f"{source}: no tokenizer; int8_static calibration and the accuracy report need one") from e
    names = [t.name for t in spec.inputs]
    # Batches of similar length: little padding, so less compute and calibration ranges that come
    # from real tokens rather than from padded positions.
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=spec.max_seq_len)["input_ids"]]
    ordered = [texts[i] for i in np.argsort(lengths, kind="stable")]
    for i in range(0, len(ordered), batch):
        enc = tok(ordered[i:i + batch], padding="longest", truncation=True, max_length=spec.max_seq_len,
                  return_tensors="np")
        yield {n: enc[n].astype(np.int64) for n in names}


def _make_variant(precision: str, fp32_onnx: Path, dst: Path, source: str, spec: EncoderSpec) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if precision == "fp32":
        if fp32_onnx != dst:
            shutil.copyfile(fp32_onnx, dst)
    elif precision == "fp16":
        quantize.to_fp16(fp32_onnx, dst)
    elif precision == "int8_dynamic":
        quantize.quantize_int8_dynamic(fp32_onnx, dst)
    elif precision == "int8_static":
        texts = calibration.sentences(CALIBRATION_SENTENCES, calibration.CALIBRATION_SEED)
        feeds = list(tokenizer_batches(source, spec, texts, CALIBRATION_BATCH))
        console.log(f"  calibrating on {len(texts)} generated sentences ({len(feeds)} batches)")
        quantize.quantize_int8_static(fp32_onnx, dst, feeds)
    else:
        raise ValueError(f"unknown precision {precision!r}; known: {PRECISIONS}")
    return dst


def _write_golden(name: str, precision: str, onnx_path: Path, model, spec: EncoderSpec, vocab: int,
                  golden_dir: Path) -> Path:
    feed = random_feed(spec, *golden.GOLDEN_SHAPE, vocab, golden.GOLDEN_SEED)
    ref = torch_outputs(model, spec, feed)
    sess = session(onnx_path)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    g = golden.Golden(model=name, precision=precision, inputs=feed, reference=ref,
                      onnxruntime={k: got[k] for k in ref}, tolerance=spec.tolerances[precision])
    g.check(g.onnxruntime)  # the golden must hold for the model it was written from
    return golden.save(g, golden_dir)


def export_encoder(spec: EncoderSpec = MINILM, precisions=DEFAULT_PRECISIONS, source: str | Path | None = None,
                   out_repo: Path = MODEL_REPOSITORY, gpu: bool = False, instances: int | None = None,
                   golden_dir: Path = golden.GOLDEN_DIR, force: bool = False,
                   gpus: tuple[int, ...] | None = None) -> list[VariantResult]:
    """Export, validate, configure and write goldens for each precision. Returns one result per variant.

    gpus: KIND_GPU instances on these device ids (`instances` per GPU; export/placement.py)."""
    precisions = list(dict.fromkeys(precisions))
    assert precisions and all(p in PRECISIONS for p in precisions), f"precisions {precisions}; known {PRECISIONS}"
    source = resolve_source(spec, source)
    out_repo = Path(out_repo)
    plan = []
    for p in precisions:
        name = spec.variant_name(p)
        config = encoder_config(spec, name, gpu=gpu, instances=instances, filename=ONNX_FILE, gpus=gpus)
        fp = _fingerprint(source, spec, p, gpu, instances, out_repo, gpus)
        fresh = not force and _is_fresh(spec, name, fp, out_repo / name, golden.path_for(name, golden_dir), config)
        plan.append((p, name, config, fp, fresh))
    results = [VariantResult(n, p, out_repo / n, golden.path_for(n, golden_dir), skipped=True)
               for p, n, _, _, fresh in plan if fresh]
    for r in results:
        console.log(f"[{r.name}] up to date (use --force to rebuild)")
    todo = [x for x in plan if not x[4]]
    if not todo:
        return results

    t0 = time.perf_counter()
    console.log(f"loading {source}")
    model = load_encoder(spec, source)
    vocab = vocab_limit(spec, model)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_onnx = Path(tmp) / "fp32.onnx"
        with console.status("exporting fp32 ONNX (TorchScript exporter)"):
            export_fp32(model, spec, fp32_onnx)
        console.log(f"fp32 ONNX exported in {time.perf_counter() - t0:.1f}s")
        for precision, name, config, fp, _ in todo:
            t = time.perf_counter()
            model_dir = out_repo / name
            onnx_path = model_dir / VERSION / ONNX_FILE
            with console.status(f"[{name}] building {precision}"):
                tmp_variant = Path(tmp) / f"{name}.onnx"
                _make_variant(precision, fp32_onnx, tmp_variant, source, spec)
            with console.status(f"[{name}] validating against PyTorch"):
                metrics = validate_onnx(tmp_variant, model, spec, precision, vocab)
            # Only a validated model reaches the repository.
            onnx_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tmp_variant), onnx_path)
            gpath = _write_golden(name, precision, onnx_path, model, spec, vocab, golden_dir)
            write_model_dir(config, spec, model_dir)
            STAMP_DIR.mkdir(parents=True, exist_ok=True)
            _stamp_path(name).write_text(json.dumps({"fingerprint": fp, "source": source, "precision": precision}))
            r = VariantResult(name, precision, model_dir, gpath, metrics, time.perf_counter() - t)
            console.log(f"[{name}] {precision} ok in {r.seconds:.1f}s, "
                        f"{onnx_path.stat().st_size / 1e6:.1f} MB; " + "; ".join(str(m) for m in metrics))
            results.append(r)
    order = {p: i for i, p in enumerate(precisions)}
    return sorted(results, key=lambda r: order[r.precision])


# ---------------------------------------------------------------- int8 accuracy report


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean pooling over valid tokens + L2 normalization: [B, S, H], [B, S] -> [B, H]."""
    m = mask[..., None].astype(np.float64)
    p = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)


def accuracy_report(spec: EncoderSpec = MINILM, precisions=("int8_dynamic", "int8_static"),
                    source: str | Path | None = None, out_repo: Path = MODEL_REPOSITORY,
                    n: int = REPORT_SENTENCES, path: Path | None = ACCURACY_REPORT) -> dict[str, dict[str, float]]:
    """Cosine of mean-pooled normalized embeddings, each variant vs the PyTorch fp32 model, on n generated
    sentences not used for calibration. Prints a table; writes markdown to `path` when given."""
    import torch

    source = resolve_source(spec, source)
    model = load_encoder(spec, source)
    texts = calibration.sentences(n, calibration.REPORT_SEED)
    feeds = list(tokenizer_batches(source, spec, texts, 32))
    out_name = spec.outputs[0].name
    with torch.no_grad():
        ref = np.concatenate([pooled(torch_outputs(model, spec, f)[out_name], f["attention_mask"]) for f in feeds])
    stats = {}
    for p in precisions:
        name = spec.variant_name(p)
        onnx_path = Path(out_repo) / name / VERSION / ONNX_FILE
        assert onnx_path.is_file(), f"{onnx_path} missing: export {p} first"
        sess = session(onnx_path)
        got = np.concatenate([pooled(sess.run([out_name], f)[0], f["attention_mask"]) for f in feeds])
        cos = (got * ref).sum(1)  # both normalized: [n]
        stats[name] = {"precision": p, "mean": float(cos.mean()), "p01": float(np.percentile(cos, 1)),
                       "min": float(cos.min()), "share_ge_0.99": float((cos >= 0.99).mean())}
    lengths = [int(f["attention_mask"].sum(1).max()) for f in feeds]
    lines = [
        f"# int8 accuracy of `{spec.name}` (generated by `python -m export.encoder --report`)", "",
        f"Cosine similarity between the mean-pooled, L2-normalized embeddings of each variant (ONNX Runtime CPU) "
        f"and of the PyTorch fp32 model, over {n} generated sentences (`export/calibration.py`, seed "
        f"{calibration.REPORT_SEED}; calibration uses seed {calibration.CALIBRATION_SEED}): statements, "
        f"questions, fragments, non-ASCII, and long texts truncated at {spec.max_seq_len} tokens "
        f"(longest batch: {max(lengths)} tokens). Sentences run in batches of 32 of similar length; "
        f"int8_dynamic computes its activation scales per batch, so its numbers move slightly with the "
        f"batch composition (int8_static's do not).", "",
        "| model | precision | mean cosine | 1st percentile | min | share >= 0.99 |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        lines.append(f"| `{name}` | {s['precision']} | {s['mean']:.4f} | {s['p01']:.4f} | {s['min']:.4f} "
                     f"| {s['share_ge_0.99']:.1%} |")
    text = "\n".join(lines) + "\n"
    console.print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return stats


def export_default(force: bool = False, gpus: tuple[int, ...] | None = None) -> list[VariantResult]:
    """What `make export` runs: the CPU repository's variants (fp32, fp16, int8 dynamic, int8 static);
    with `gpus` (`python -m export --gpus 0,1`), one KIND_GPU instance of each on each of those GPUs."""
    t = time.perf_counter()
    results = export_encoder(MINILM, DEFAULT_PRECISIONS, force=force, gpus=gpus)
    int8 = [r.precision for r in results if r.precision.startswith("int8")]
    if int8 and (any(not r.skipped for r in results) or not ACCURACY_REPORT.is_file()):
        accuracy_report(MINILM, int8)
    console.log(f"encoder export done in {time.perf_counter() - t:.1f}s")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.encoder", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="local Hugging Face dir or hub id (default: the pip package's model/)")
    ap.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(DEFAULT_PRECISIONS))
    ap.add_argument("--gpu", action="store_true", help="KIND_GPU instance groups (default KIND_CPU)")
    ap.add_argument("--instances", type=int, help=f"instances per model (default {MINILM.cpu_instances}; with --gpus: per GPU, default 1)")
    add_gpus_argument(ap, per_gpu_default=1)
    ap.add_argument("--repository", type=Path, default=MODEL_REPOSITORY)
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    ap.add_argument("--report", action="store_true", help="write the int8 accuracy report after exporting")
    args = ap.parse_args(argv)
    results = export_encoder(MINILM, args.precision, args.source, args.repository, args.gpu, args.instances,
                             force=args.force, gpus=args.gpus)
    int8 = [p for p in args.precision if p.startswith("int8")]
    if args.report and int8:
        accuracy_report(MINILM, int8, args.source, args.repository)
    for r in results:
        print(f"{r.name}\t{r.precision}\t{'up-to-date' if r.skipped else f'{r.seconds:.1f}s'}\t{r.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
