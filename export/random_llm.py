"""Random-weight Llama checkpoints: the shapes of public models, built offline in seconds.

`SHAPES` is the one definition of every benchmark/test Llama shape (transformers LlamaConfig
kwargs); `write_random_checkpoint(dir, shape)` writes an HF checkpoint directory (config, weights,
generation config and a byte-level BPE tokenizer built in code whose vocabulary matches the model),
so exports, tests and GPU benchmarks need no download. Speed depends on the shape only.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

SEED = 0

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

# The shapes the GPU benchmarks run (public counterparts: TinyLlama-1.1B, Llama-3.1-8B).
BENCH_SHAPES = ("tinyllama-1.1b", "llama-3.1-8b")

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


def write_random_checkpoint(out: Path, shape: str, device: str = "cpu", dtype: str = "auto", seed: int = SEED,
                            weights: bool = True) -> Path:
    """weights=False: config, generation config and tokenizer only (benchmarks build the weights in memory)."""
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
    if not weights:
        return out
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


def hf_config(shape: str, **overrides):
    """A transformers LlamaConfig of a SHAPES entry."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**SHAPES[shape], "architectures": ["LlamaForCausalLM"], **overrides})
