"""Benchmark model shapes: random-weight Llama-family models shaped like public checkpoints.

Speed does not depend on weight values, so benchmarks build these with random weights on the device
(nothing downloaded, nothing carried). The numbers live once, in export/random_llm.py (SHAPES).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LlamaShape:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_scaling: dict | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * self.num_heads * d + 2 * h * self.num_kv_heads * d + self.num_heads * d * h
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    def hf_config(self, **overrides):
        """A transformers LlamaConfig of this shape."""
        from transformers import LlamaConfig

        kw = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, tie_word_embeddings=self.tie_word_embeddings,
            rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, architectures=["LlamaForCausalLM"],
            bos_token_id=1, eos_token_id=2,
        )
        if self.rope_scaling:
            kw["rope_scaling"] = dict(self.rope_scaling)
        kw.update(overrides)
        return LlamaConfig(**kw)

    def as_dict(self) -> dict:
        return asdict(self) | {"params": self.num_params()}


def from_export(name: str) -> LlamaShape:
    """The benchmark shape as export/random_llm.py defines it (its SHAPES table is the one definition)."""
    from export.random_llm import SHAPES as HF_KWARGS

    kw = HF_KWARGS[name]
    return LlamaShape(
        name=name, vocab_size=kw["vocab_size"], hidden_size=kw["hidden_size"],
        intermediate_size=kw["intermediate_size"], num_layers=kw["num_hidden_layers"],
        num_heads=kw["num_attention_heads"], num_kv_heads=kw["num_key_value_heads"],
        tie_word_embeddings=kw.get("tie_word_embeddings", False), rope_theta=kw.get("rope_theta", 10000.0),
        rms_norm_eps=kw.get("rms_norm_eps", 1e-5), max_position_embeddings=kw["max_position_embeddings"],
        rope_scaling=kw.get("rope_scaling"),
    )


BENCH_SHAPES = ("tinyllama-1.1b", "llama-3.1-8b")


SHAPES = {n: from_export(n) for n in BENCH_SHAPES}
