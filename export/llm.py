"""Lay out a streaming LLM in the model repository: model_repository/<name>/{config.pbtxt, 1/}.

    1/model.py      the Triton Python model (a copy of llm/triton_model.py)
    1/llm/*.py      the engine package (copied, so the model directory is self-contained)
    1/checkpoint/   HF checkpoint: config.json, *.safetensors, tokenizer (gitignored)

Sources: an HF checkpoint directory or hub id (--checkpoint), or, offline, a random-weight
checkpoint of a real architecture (--random-shape tiny | tinyllama-1.1b | llama-3.1-8b) with a
byte-level BPE tokenizer built in code whose vocabulary matches the model's.

    python -m export.llm                                  # default: tiny random Llama, CPU
    python -m export.llm --random-shape llama-3.1-8b --device cuda --kind gpu --name llama8b
    python -m export.llm --checkpoint /models/Qwen2.5-0.5B-Instruct --name qwen --kind gpu
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from tritonclient.grpc import model_config_pb2 as mc

from export import pbtxt
from export.specs import LLM_IO
from llm.settings import EngineSettings
from serve.paths import MODEL_REPOSITORY, REPO_ROOT
from serve.repository import EXPORT_COMMAND_KEY, REQUIRED_ARTIFACTS_KEY

DEFAULT_NAME = "tiny_llama"
DEFAULT_SHAPE = "tiny"
SEED = 0
ENGINE_PACKAGE = REPO_ROOT / "llm"
ENGINE_MODULES = ("__init__.py", "settings.py", "device.py", "model.py", "kv_cache.py", "runner.py", "sampling.py",
                  "engine.py", "bench.py")

# Llama-architecture shapes (LlamaConfig kwargs). Weight values are random; speed depends on shape only.
SHAPES = {
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0,
                 tie_word_embeddings=False),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                           rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
}

# Engine settings per shape (everything else: EngineSettings defaults).
SHAPE_SETTINGS = {
    "tiny": dict(max_slots=32, max_context=512, default_max_tokens=32, max_tokens_cap=256, cpu_threads=1),
    "tinyllama-1.1b": dict(max_slots=64, max_context=2304),
    "llama-3.1-8b": dict(max_slots=64, max_context=2304),
}

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The tokenizer's training text: a fixed built-in corpus, so the vocabulary is deterministic.
CORPUS = """Triton Inference Server serves models from a model repository over HTTP and gRPC.
A decoupled model may send many responses for one request, which is how tokens are streamed.
Continuous batching lets requests join and leave the running batch at every decode step.
The key value cache holds the attention keys and values of every sequence in its slot.
Hello world! The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { }
What is machine learning? Machine learning is the study of algorithms that improve with data.
Once upon a time, there was a small model that wanted to generate text very quickly.
User: How are you today? Assistant: I am fine, thank you. How can I help you?
def main(): print("hello") return 0  # code, numbers 3.14159 and punctuation: ; , . ! ?
Ünïcödé tëxt, emoji 🙂 and 中文字符 also appear, so byte-level pieces cover every input.
"""


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on CORPUS, extended with synthetic merges to exactly vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    data = json.loads(tok.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    # Pad with merges of two trained pieces (deterministic order; lengths stay bounded) up to vocab_size.
    pieces = sorted((t for t in vocab if t not in specials), key=lambda t: vocab[t])
    pairs = ((a, b) for b in pieces for a in pieces)
    while len(vocab) < vocab_size:
        a, b = next(pairs)  # StopIteration only if vocab_size > len(pieces)**2
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append([a, b])
    assert len(vocab) == vocab_size, f"tokenizer has {len(vocab)} tokens, want {vocab_size}"
    tok = Tokenizer.from_str(json.dumps(data))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, model_max_length=1 << 20)


def random_state_dict(config, device: str, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """HF-named Llama weights. Linear weights ~ N(0, 1/fan_in) and embeddings ~ N(0, 1) so that
    every layer (attention included) changes the logits and greedy choices are far from ties."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, i_, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    sd = {"model.embed_tokens.weight": randn(v, h, std=1.0)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        sd[p + "self_attn.q_proj.weight"] = randn(q, h, std=h**-0.5)
        sd[p + "self_attn.k_proj.weight"] = randn(kv, h, std=h**-0.5)
        sd[p + "self_attn.v_proj.weight"] = randn(kv, h, std=h**-0.5)
        sd[p + "self_attn.o_proj.weight"] = randn(h, q, std=q**-0.5)
        sd[p + "mlp.gate_proj.weight"] = randn(i_, h, std=h**-0.5)
        sd[p + "mlp.up_proj.weight"] = randn(i_, h, std=h**-0.5)
        sd[p + "mlp.down_proj.weight"] = randn(h, i_, std=i_**-0.5)
        sd[p + "input_layernorm.weight"] = torch.ones(h, device=device, dtype=dtype)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h, device=device, dtype=dtype)
    sd["model.norm.weight"] = torch.ones(h, device=device, dtype=dtype)
    sd["lm_head.weight"] = randn(v, h, std=4 * h**-0.5)  # logits with std ~4
    return sd


def write_random_checkpoint(out: Path, shape: str, device: str = "cpu", dtype: str = "auto", seed: int = SEED) -> Path:
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    assert shape in SHAPES, f"unknown shape {shape!r}; known: {sorted(SHAPES)}"
    torch_dtype = (torch.float32 if shape == "tiny" else torch.bfloat16) if dtype == "auto" else getattr(torch, dtype)
    tokenizer = build_tokenizer(SHAPES[shape]["vocab_size"])
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"])
    config.dtype = torch_dtype
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, do_sample=False).save_pretrained(out)
    tokenizer.save_pretrained(out)
    sd = random_state_dict(config, device, torch_dtype, SEED if seed is None else seed)
    # Shards of <= 4 GiB keep host memory bounded when copying from the GPU.
    shards, cur, size = [], {}, 0
    for k, t in sd.items():
        if cur and size + t.nbytes > 4 * 2**30:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = t, size + t.nbytes
    shards.append(cur)
    index = {}
    for n, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in shard.items()}, str(out / fname), metadata={"format": "pt"})
        index.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(t.nbytes for t in sd.values())
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    return out


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
                 export_command: str = "make export") -> mc.ModelConfig:
    cfg = mc.ModelConfig(
        name=name,
        backend="python",
        max_batch_size=LLM_IO.max_batch_size,
        input=[pbtxt.model_input(t) for t in LLM_IO.inputs],
        output=[pbtxt.model_output(t) for t in LLM_IO.outputs],
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        instance_group=[pbtxt.instance_group(instances, gpu)],
        version_policy=pbtxt.latest_version_policy(1),
    )
    for k, v in settings.to_parameters().items():
        cfg.parameters[k].string_value = v
    ckpt = settings.checkpoint if Path(settings.checkpoint).is_absolute() else f"1/{settings.checkpoint}"
    cfg.parameters[REQUIRED_ARTIFACTS_KEY].string_value = ",".join(
        ["1/model.py"] + [f"1/llm/{m}" for m in ENGINE_MODULES] + [f"{ckpt}/config.json"])
    cfg.parameters[EXPORT_COMMAND_KEY].string_value = export_command
    return cfg


def install_engine(version_dir: Path) -> None:
    """Copy the Triton model and the engine package into the version directory."""
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ENGINE_PACKAGE / "triton_model.py", version_dir / "model.py")
    pkg = version_dir / "llm"
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir()
    for m in ENGINE_MODULES:
        shutil.copy2(ENGINE_PACKAGE / m, pkg / m)


def export(name: str = DEFAULT_NAME, checkpoint: str | None = None, random_shape: str = DEFAULT_SHAPE,
           device: str = "cpu", kind: str = "cpu", repository: Path = MODEL_REPOSITORY, instances: int = 1,
           **settings_overrides) -> Path:
    """Write model_repository/<name>/ and return the model directory."""
    assert kind in ("cpu", "gpu"), f"kind must be cpu or gpu, got {kind!r}"
    t0 = time.perf_counter()
    model_dir = Path(repository) / name
    version_dir = model_dir / "1"
    ckpt = version_dir / "checkpoint"
    if checkpoint:
        copy_checkpoint(checkpoint, ckpt)
        base = {}
    else:
        write_random_checkpoint(ckpt, random_shape, device=device)
        base = SHAPE_SETTINGS[random_shape]
    settings = EngineSettings(**{**base, **settings_overrides})
    install_engine(version_dir)
    default = (name, checkpoint, random_shape, kind, instances, settings_overrides) == (
        DEFAULT_NAME, None, DEFAULT_SHAPE, "cpu", 1, {})
    command = "make export" if default else " ".join(
        ["python -m export.llm", f"--name {name}",
         f"--checkpoint {checkpoint}" if checkpoint else f"--random-shape {random_shape} --device {device}",
         f"--kind {kind}", f"--instances {instances}"]
        + [f"--set {k}={v}" for k, v in EngineSettings(**settings_overrides).to_parameters().items() if k in settings_overrides])
    pbtxt.write(model_config(name, settings, kind == "gpu", instances, command), model_dir)
    print(f"exported {model_dir} ({checkpoint or 'random ' + random_shape}) in {time.perf_counter() - t0:.1f} s")
    return model_dir


def is_up_to_date(model_dir: Path, config: mc.ModelConfig) -> bool:
    """The config, the engine copies and the checkpoint files are what an export would write now."""
    version_dir = model_dir / "1"
    copies = [(ENGINE_PACKAGE / "triton_model.py", version_dir / "model.py")]
    copies += [(ENGINE_PACKAGE / m, version_dir / "llm" / m) for m in ENGINE_MODULES]
    ckpt = version_dir / "checkpoint"
    return (
        (model_dir / "config.pbtxt").exists()
        and (model_dir / "config.pbtxt").read_text() == pbtxt.to_text(config)
        and all(dst.exists() and dst.read_bytes() == src.read_bytes() for src, dst in copies)
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
    ap.add_argument("--repository", type=Path, default=MODEL_REPOSITORY)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="engine setting override (llm/settings.py), e.g. --set max_slots=64")
    a = ap.parse_args(argv)
    overrides = dict(kv.split("=", 1) for kv in a.set)
    parsed = EngineSettings.from_parameters(overrides) if overrides else None
    overrides = {k: getattr(parsed, k) for k in overrides} if parsed else {}
    export(a.name, a.checkpoint, a.random_shape, a.device, a.kind, a.repository, a.instances, **overrides)


if __name__ == "__main__":
    main()
