"""The text -> embedding pipeline in the model repository: config.pbtxt from the spec + tokenizer files.

Two shapes of the same pipeline, both built from the one committed source
model_repository/minilm_text/pipeline_model.py (copied to <model>/1/model.py, switched by `role`):
  ensemble  <name>_tokenize (python) -> encoder -> <name>_pool (python), wired by an ensemble <name>
            (the default: faster on CPU, docs/embeddings.md has the measurements)
  bls       one Python model: tokenize, BLS call to the encoder, mean-pool + normalize

    python -m export.pipeline [--out-repo DIR] [--kind bls|ensemble] [--encoder-precision fp32|int8_static|...] [--instances N]
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export import pbtxt
from export.specs import MINILM_TEXT, PIPELINES, VARIANT_SUFFIX, Tensor, TextPipelineSpec
from serve.paths import MODEL_REPOSITORY

VERSION = "1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
KINDS = ("ensemble", "bls")
DEFAULT_KIND = "ensemble"


def hf_dir(spec: TextPipelineSpec = MINILM_TEXT, source: str | None = None) -> Path:
    """The local HF directory holding the tokenizer (the encoder export's resolution of --source)."""
    from export.onnx_export import resolve_source  # imports torch: only when exporting

    d = Path(resolve_source(spec.encoder, source))
    assert (d / "tokenizer.json").is_file(), f"{d}: no tokenizer.json (a local Hugging Face directory is needed)"
    return d


def model_source(spec: TextPipelineSpec = MINILM_TEXT) -> Path:
    """The one pipeline model source (committed next to the pipeline's config; Triton ignores it there)."""
    return MODEL_REPOSITORY / spec.name / "pipeline_model.py"


def _params(config: mc.ModelConfig, **kv) -> None:
    for k, v in kv.items():
        config.parameters[k].string_value = str(v)


def _python_model(name: str, inputs: list[Tensor], outputs: list[Tensor], instances: int, **params) -> mc.ModelConfig:
    c = mc.ModelConfig(
        name=name, backend="python", max_batch_size=0,  # requests are [N] (not [N, 1]); the encoder batches
        input=[pbtxt.model_input(t) for t in inputs], output=[pbtxt.model_output(t) for t in outputs],
        instance_group=[pbtxt.instance_group(instances, gpu=False)],
        version_policy=pbtxt.latest_version_policy(1))
    _params(c, **params)
    return c


def encoder_io(spec: TextPipelineSpec) -> tuple[list[Tensor], Tensor, Tensor]:
    """The encoder's inputs and output as full-shape [N, S(, H)] tensors (max_batch_size 0 models)."""
    ins = [Tensor(t.name, t.dtype, ("batch",) + t.dims) for t in spec.encoder.inputs]
    (hidden,) = spec.encoder.outputs
    mask = next(t for t in ins if t.name == "attention_mask")
    return ins, mask, Tensor(hidden.name, hidden.dtype, ("batch",) + hidden.dims)


def step_names(name: str) -> tuple[str, str]:
    """The ensemble's tokenize and pool step models of pipeline `name`."""
    return f"{name}_tokenize", f"{name}_pool"


def tokenizer_dir(repo: Path, spec: TextPipelineSpec = MINILM_TEXT) -> Path | None:
    """Where an exported pipeline keeps its tokenizer files (either shape), or None if not exported."""
    for model in (step_names(spec.name)[0], spec.name):
        d = Path(repo) / model / VERSION / "tokenizer"
        if (d / "tokenizer.json").is_file():
            return d
    return None


def _copy_model(dst_dir: Path, spec: TextPipelineSpec, tokenizer_from: Path | None) -> None:
    """<model>/1/model.py from the one source, plus the tokenizer files where the model tokenizes."""
    version = dst_dir / VERSION
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_source(spec), version / "model.py")
    if tokenizer_from is None:
        return
    (version / "tokenizer").mkdir(exist_ok=True)
    for f in TOKENIZER_FILES:
        if (tokenizer_from / f).is_file():
            shutil.copy2(tokenizer_from / f, version / "tokenizer" / f)


def export_pipeline(out_repo: Path = MODEL_REPOSITORY, spec: TextPipelineSpec = MINILM_TEXT, kind: str = DEFAULT_KIND,
                    encoder_precision: str | None = None, instances: int | None = None, source: str | None = None,
                    name: str | None = None) -> list[Path]:
    """Write the pipeline model(s) into out_repo; returns the model directories written."""
    assert kind in KINDS, f"kind must be one of {KINDS}"
    out_repo, name = Path(out_repo), name or spec.name
    encoder = spec.encoder.variant_name(encoder_precision or spec.encoder_precision)
    instances = instances or spec.instances
    src_hf = hf_dir(spec, source)
    ins, mask, hidden = encoder_io(spec)
    common = dict(max_seq_len=spec.encoder.max_seq_len, max_texts=spec.max_texts,
                  seq_buckets=",".join(map(str, spec.seq_buckets)),
                  encoder_inputs=",".join(t.name for t in spec.encoder.inputs))  # order: ids, mask, type ids
    if kind == "bls":
        c = _python_model(name, [spec.text], [spec.embedding], instances, role="bls", encoder_model=encoder,
                          encoder_output=hidden.name, **common)
        pbtxt.write(c, out_repo / name)
        _copy_model(out_repo / name, spec, src_hf)
        return [out_repo / name]

    tok, pool = step_names(name)
    pbtxt.write(_python_model(tok, [spec.text], ins, instances, role="tokenize", **common), out_repo / tok)
    pbtxt.write(_python_model(pool, [hidden, mask], [spec.embedding], instances, role="pool"), out_repo / pool)
    _copy_model(out_repo / tok, spec, src_hf)
    _copy_model(out_repo / pool, spec, None)
    steps = [
        mc.ModelEnsembling.Step(model_name=tok, model_version=-1, input_map={spec.text.name: spec.text.name},
                                output_map={t.name: t.name for t in ins}),
        mc.ModelEnsembling.Step(model_name=encoder, model_version=-1, input_map={t.name: t.name for t in ins},
                                output_map={hidden.name: hidden.name}),
        mc.ModelEnsembling.Step(model_name=pool, model_version=-1,
                                input_map={hidden.name: hidden.name, mask.name: mask.name},
                                output_map={spec.embedding.name: spec.embedding.name}),
    ]
    ens = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=0,
                         input=[pbtxt.model_input(spec.text)], output=[pbtxt.model_output(spec.embedding)],
                         ensemble_scheduling=mc.ModelEnsembling(step=steps))
    pbtxt.write(ens, out_repo / name)
    (out_repo / name / VERSION).mkdir(exist_ok=True)  # an ensemble needs an (empty) version directory
    return [out_repo / tok, out_repo / pool, out_repo / name]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-repo", type=Path, default=MODEL_REPOSITORY)
    ap.add_argument("--pipeline", default=MINILM_TEXT.name, choices=sorted(PIPELINES))
    ap.add_argument("--kind", default=DEFAULT_KIND, choices=KINDS)
    ap.add_argument("--encoder-precision", default=None, choices=sorted(VARIANT_SUFFIX),
                    help="encoder variant to call (default: the spec's)")
    ap.add_argument("--instances", type=int, default=None, help="pipeline model instances (default: the spec's)")
    ap.add_argument("--source", default=None, help="HF directory or pip package holding the tokenizer")
    a = ap.parse_args(argv)
    for d in export_pipeline(a.out_repo, PIPELINES[a.pipeline], a.kind, a.encoder_precision, a.instances, a.source):
        print(f"wrote {d}")


if __name__ == "__main__":
    main()
