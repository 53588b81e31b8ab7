"""Lay out the GPU sentence encoder served by backends/torch_encoder (torch fp16 + CUDA graphs):
model_repository/<name>/{config.pbtxt, 1/checkpoint/}.

Inputs are the tokenizer outputs of the MINILM spec (export/specs.py); the output is the pooled,
normalised sentence embedding. Weights: the HF directory of the pip package named by MINILM.source
when it is installed, else (GPU hosts without it) random weights of the same architecture: speed does
not depend on weight values.

    python -m export.encoder_torch --repository model_repository            # real weights if installed
    python -m export.encoder_torch --random-weights --repository /tmp/repo  # benchmark on a bare GPU host
    python -m export.encoder_torch --gpus 0,1                               # 2 instances on each of GPUs 0 and 1
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export import pbtxt
from export.placement import add_gpus_argument, instance_groups
from export.specs import MINILM, Batching, Tensor
from serve.paths import MODEL_REPOSITORY

DEFAULT_NAME = "minilm_gpu"
MAX_BATCH = 256  # sentences per execute(): large batches keep the H100 busy
SEQ_BUCKETS = (32, 64, 128)
BATCHING = Batching(max_queue_delay_us=200, preferred_batch_sizes=(64, 128, 256))
OUTPUT = Tensor("embedding", "FP32", (MINILM.hidden_size,))
# all-MiniLM-L6-v2's architecture (its config.json), for hosts without the weights package.
MINILM_ARCH = dict(architectures=["BertModel"], model_type="bert", vocab_size=30522, hidden_size=384,
                   num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, hidden_act="gelu",
                   max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                   hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02,
                   pad_token_id=0)


def source_dir() -> Path | None:
    spec = importlib.util.find_spec(MINILM.source)
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "config.json").exists() else None


GPU_INSTANCES = 2  # two instances on one GPU: one prepares/copies a batch while the other's graph runs


def model_config(name: str, random_weights: bool, gpu: bool = True, instances: int = GPU_INSTANCES,
                 compile: bool = False, gpus: tuple[int, ...] | None = None) -> mc.ModelConfig:
    """gpus: `instances` on each of these GPUs (export/placement.py); else one group of `instances`."""
    cfg = mc.ModelConfig(name=name, backend="torch_encoder", max_batch_size=MAX_BATCH,
                         input=[pbtxt.model_input(t) for t in MINILM.inputs], output=[pbtxt.model_output(OUTPUT)],
                         dynamic_batching=pbtxt.dynamic_batching(BATCHING),
                         instance_group=instance_groups(gpus, instances, gpu))
    params = {"checkpoint": "checkpoint", "random_weights": str(random_weights).lower(),
              "seq_buckets": ",".join(map(str, SEQ_BUCKETS)), "cuda_graphs": "true", "compile": str(compile).lower()}
    for k, v in params.items():
        cfg.parameters[k].string_value = v
    return cfg


def export(name: str = DEFAULT_NAME, repository: Path = MODEL_REPOSITORY, random_weights: bool = False,
           gpu: bool = True, instances: int | None = None, compile: bool = False,
           gpus: tuple[int, ...] | None = None) -> Path:
    model_dir = Path(repository) / name
    ckpt = model_dir / "1" / "checkpoint"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    src = None if random_weights else source_dir()
    if src is None:
        random_weights = True
        (ckpt / "config.json").write_text(json.dumps(MINILM_ARCH, indent=1))
    else:
        for f in ("config.json", "model.safetensors"):
            shutil.copy2(src / f, ckpt / f)
    if gpus and not gpu:
        raise ValueError("--gpus places KIND_GPU instances; it cannot be combined with --cpu")
    instances = instances or (GPU_INSTANCES if gpu else 1)
    pbtxt.write(model_config(name, random_weights, gpu, instances, compile, gpus), model_dir)
    print(f"exported {model_dir} ({'random weights' if random_weights else src})")
    return model_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default=DEFAULT_NAME)
    ap.add_argument("--repository", type=Path, default=MODEL_REPOSITORY)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="KIND_CPU instance (tests)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the full-batch buckets (slow start, +13%%)")
    ap.add_argument("--instances", type=int, default=None, help=f"default {GPU_INSTANCES} on GPU (per GPU with --gpus), 1 on CPU")
    add_gpus_argument(ap, per_gpu_default=GPU_INSTANCES)
    a = ap.parse_args(argv)
    if a.gpus and a.cpu:
        ap.error("--gpus and --cpu exclude each other")
    export(a.name, a.repository, a.random_weights, not a.cpu, a.instances, a.compile, a.gpus)


if __name__ == "__main__":
    main()
