"""Lay out a streaming LLM in the model repository: model_repository/<name>/{config.pbtxt, 1/checkpoint/}.

The engine is not copied: it is the Python-based backend `llm` (backends/llm/), named by the
config's `backend` field. The config carries the engine settings as `parameters`
(llm/settings.py, EngineSettings.to_parameters) and the instance placement.

Sources: an HF checkpoint directory or hub id (--checkpoint), or, offline, a random-weight
checkpoint of a real architecture (--random-shape tiny | tinyllama-1.1b | llama-3.1-8b, from
export/random_llm.py).

    python -m export.llm                                  # default: tiny random Llama, CPU
    python -m export.llm --random-shape llama-3.1-8b --device cuda --kind gpu --name llama8b
    python -m export.llm --checkpoint /models/Qwen2.5-0.5B-Instruct --name qwen --kind gpu --gpus 0,1
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export import pbtxt
from export.placement import add_gpus_argument, instance_groups, llm_instance_groups
from export.random_llm import SHAPES, write_random_checkpoint
from export.specs import LLM_IO
from llm.settings import EngineSettings, parse_overrides
from serve.paths import MODEL_REPOSITORY
from serve.repository import EXPORT_COMMAND_KEY, REQUIRED_ARTIFACTS_KEY

DEFAULT_NAME = "tiny_llama"
DEFAULT_SHAPE = "tiny"
BACKEND = "llm"  # backends/llm/

# Engine settings per shape (everything else: EngineSettings defaults).
SHAPE_SETTINGS = {
    "tiny": dict(max_seqs=32, max_context=512, step_token_budget=512, default_max_tokens=32, max_tokens_cap=256,
                 cpu_threads=1),
    "tinyllama-1.1b": dict(max_seqs=64, max_context=2304),
    "llama-3.1-8b": dict(max_seqs=64, max_context=2304),
}


def copy_checkpoint(source: str, out: Path) -> Path:
    """A local HF directory (hard-linked when possible, else copied), or a hub id (downloaded)."""
    if out.exists():
        shutil.rmtree(out)
    src = Path(source)
    if not src.is_dir():
        from huggingface_hub import snapshot_download

        src = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".model", ".txt", ".jinja")):
            try:
                (out / f.name).hardlink_to(f.resolve())
            except OSError:
                shutil.copy2(f, out / f.name)
    assert (out / "config.json").exists(), f"{source}: no config.json"
    return out


def model_config(name: str, settings: EngineSettings, gpu: bool, instances: int = 1,
                 export_command: str = "make export", gpus: list[int] | None = None) -> mc.ModelConfig:
    """gpus: GPU ids for one engine instance each (None: `instances` on whatever GPU Triton picks)."""
    cfg = mc.ModelConfig(
        name=name,
        backend=BACKEND,
        max_batch_size=LLM_IO.max_batch_size,
        input=[pbtxt.model_input(t) for t in LLM_IO.inputs],
        output=[pbtxt.model_output(t) for t in LLM_IO.outputs],
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        instance_group=llm_instance_groups(gpus) if gpus else instance_groups(None, instances, gpu),
        version_policy=pbtxt.latest_version_policy(1),
    )
    for k, v in settings.to_parameters().items():
        cfg.parameters[k].string_value = v
    ckpt = settings.checkpoint if Path(settings.checkpoint).is_absolute() else f"1/{settings.checkpoint}"
    cfg.parameters[REQUIRED_ARTIFACTS_KEY].string_value = f"{ckpt}/config.json"
    cfg.parameters[EXPORT_COMMAND_KEY].string_value = export_command
    return cfg


def export(name: str = DEFAULT_NAME, checkpoint: str | None = None, random_shape: str = DEFAULT_SHAPE,
           device: str = "cpu", kind: str = "cpu", repository: Path = MODEL_REPOSITORY, instances: int = 1,
           gpus: list[int] | None = None, **settings_overrides) -> Path:
    """Write model_repository/<name>/ and return the model directory."""
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"kind must be cpu or gpu, got {kind!r}")
    t0 = time.perf_counter()
    model_dir = Path(repository) / name
    version_dir = model_dir / "1"
    ckpt = version_dir / "checkpoint"
    for stale in ("model.py", "llm"):  # the engine copies of earlier exports: the backend serves now
        p = version_dir / stale
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if checkpoint:
        copy_checkpoint(checkpoint, ckpt)
        base = {}
    else:
        write_random_checkpoint(ckpt, random_shape, device=device)
        base = SHAPE_SETTINGS[random_shape]
    settings = EngineSettings(**{**base, **settings_overrides})
    default = (name, checkpoint, random_shape, kind, instances, gpus, settings_overrides) == (
        DEFAULT_NAME, None, DEFAULT_SHAPE, "cpu", 1, None, {})
    command = "make export" if default else " ".join(
        ["python -m export.llm", f"--name {name}",
         f"--checkpoint {checkpoint}" if checkpoint else f"--random-shape {random_shape} --device {device}",
         f"--kind {kind}", f"--instances {instances}"] + ([f"--gpus {','.join(map(str, gpus))}"] if gpus else [])
        + [f"--set {k}={v}" for k, v in settings.to_parameters().items() if k in settings_overrides])
    pbtxt.write(model_config(name, settings, kind == "gpu", instances, command, gpus), model_dir)
    print(f"exported {model_dir} ({checkpoint or 'random ' + random_shape}) in {time.perf_counter() - t0:.1f} s")
    return model_dir


def is_up_to_date(model_dir: Path, config: mc.ModelConfig) -> bool:
    """The config and the checkpoint files are what an export would write now."""
    ckpt = model_dir / "1" / "checkpoint"
    return (
        (model_dir / "config.pbtxt").exists()
        and (model_dir / "config.pbtxt").read_text() == pbtxt.to_text(config)
        and not (model_dir / "1" / "llm").exists()
        and all((ckpt / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json"))
    )


def export_default(repository: Path = MODEL_REPOSITORY, force: bool = False) -> Path:
    """What `make export` runs: the tiny random-weight Llama served on CPU (skipped when up to date)."""
    model_dir = Path(repository) / DEFAULT_NAME
    config = model_config(DEFAULT_NAME, EngineSettings(**SHAPE_SETTINGS[DEFAULT_SHAPE]), False, 1, "make export")
    if not force and is_up_to_date(model_dir, config):
        print(f"{model_dir} is up to date")
        return model_dir
    return export(repository=repository)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="HF checkpoint directory or hub id (default: a random-weight model)")
    ap.add_argument("--random-shape", default=DEFAULT_SHAPE, choices=sorted(SHAPES))
    ap.add_argument("--name", default=DEFAULT_NAME, help="model name in the repository")
    ap.add_argument("--device", default="cpu", help="device that generates random weights (cpu|cuda)")
    ap.add_argument("--kind", default="cpu", choices=("cpu", "gpu"), help="instance_group kind")
    ap.add_argument("--instances", type=int, default=1)
    add_gpus_argument(ap, 1, "engines (one per GPU)")
    ap.add_argument("--repository", type=Path, default=MODEL_REPOSITORY)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="engine setting override (llm/settings.py), e.g. --set max_seqs=64")
    a = ap.parse_args(argv)
    try:
        overrides = parse_overrides(a.set)
    except ValueError as e:
        ap.error(str(e))
    gpus = list(a.gpus) if a.gpus else None
    export(a.name, a.checkpoint, a.random_shape, a.device, "gpu" if gpus else a.kind, a.repository, a.instances,
           gpus, **overrides)


if __name__ == "__main__":
    main()
