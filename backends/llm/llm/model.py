"""A compact Llama-family decoder (Llama, Mistral, Qwen2) in the style of gpt-fast.

Loads Hugging Face safetensors into fused weights (wqkv, w13). One forward takes a flat batch of
N tokens from many sequences (decode tokens and prefill chunks together, so the matmuls are large)
against the paged KV cache (llm/kv_cache.py, llm/attention.py). A decode-only batch has static
shapes per batch bucket and is captured in a CUDA graph (llm/runner.py). The same code runs on CPU.

Shapes: N = tokens in the step, H = query heads, KVH = key/value heads, D = head_dim, V = vocab.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llm import activation, attention

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 has q/k/v biases
    sliding_window: int | None  # attention window, when the config enables one

    @classmethod
    def from_hf(cls, cfg) -> "ModelArgs":
        arch = (cfg.architectures or ["LlamaForCausalLM"])[0]
        assert arch in SUPPORTED, f"architecture {arch} not supported; supported: {SUPPORTED}"
        window = getattr(cfg, "sliding_window", None)
        use_window = getattr(cfg, "use_sliding_window", arch == "MistralForCausalLM")
        heads = cfg.num_attention_heads
        return cls(
            architecture=arch,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(cfg, "attention_bias", False)),
            sliding_window=window if use_window and window else None,
        )

    def num_params(self) -> int:
        """Parameters of the checkpoint (the untied output head counted once more)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # HF's exact op order (token-identical on CPU tests)
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        # Half precision: one fused kernel (fp32 inside, weight applied before the single cast back;
        # HF casts before scaling, a last-bit difference).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class Batch:
    """What one forward needs besides the tokens, all on the model's device. The N flat tokens are
    `num_decode` single-token rows (decode; attention by `block_table`/`seq_lens`) followed by the
    prefill chunks, which run eagerly: in `groups` (short chunks, one attention call per group) or in
    `chunks` (flat offset, length, first position, block-table row; one call each)."""

    slots: torch.Tensor  # [N] int64: the flat cache slot each token's k/v is written to
    num_decode: int
    block_table: torch.Tensor | None  # [num_decode, nb] int32
    seq_lens: torch.Tensor | None  # [num_decode] int32: tokens in the cache after this step
    chunks: list = field(default_factory=list)  # [(offset, n, start, block_row [nb] int64)]: each attends alone
    groups: list = field(default_factory=list)  # [attention.PrefillGroup]: chunks attending in one call


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.wqkv = nn.Linear(a.hidden_size, q + 2 * kv, bias=a.qkv_bias)
        self.wo = nn.Linear(q, a.hidden_size, bias=False)
        self.scale = a.head_dim**-0.5

    def forward(self, x, rope, k_cache, v_cache, batch: Batch, decode_attention):
        # x: [N, hidden]; rope: (cos, sin) [N, 1, D], or with fused kernels (cos table, sin table, pos);
        # k_cache/v_cache: this layer's [blocks, block_size, KVH, D]
        a = self.a
        N = x.shape[0]
        H, KVH, D = a.num_heads, a.num_kv_heads, a.head_dim
        qkv = self.wqkv(x).view(N, H + 2 * KVH, D)
        # This step's keys/values are written first: attention then reads everything from the cache.
        if len(rope) == 3:  # one Triton kernel: RoPE on q and k, k and v into their cache slots
            q = attention.rope_and_write(qkv, *rope, batch.slots, k_cache, v_cache, H, KVH)
            k = v = None
        else:  # RoPE on q and k together (one set of elementwise kernels for both head groups)
            cos, sin = rope
            qk = qkv[:, : H + KVH]
            qk = qk * cos + rotate_half(qk) * sin  # [N, H+KVH, D]
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + KVH :]
            k_cache.view(-1, KVH, D).index_copy_(0, batch.slots, k.to(k_cache.dtype))
            v_cache.view(-1, KVH, D).index_copy_(0, batch.slots, v.to(v_cache.dtype))
        nd = batch.num_decode
        if not batch.chunks and not batch.groups:  # decode only (the CUDA-graph case)
            y = decode_attention(q, k_cache, v_cache, batch.block_table, batch.seq_lens, self.scale)
        else:
            y = q.new_empty(N, H, D)
            if nd:
                y[:nd] = decode_attention(q[:nd], k_cache, v_cache, batch.block_table, batch.seq_lens, self.scale)
            for g in batch.groups:  # keys and values from the cache, where this step's are written above
                y[g.dest] = attention.prefill_grouped(q, k_cache, v_cache, g, self.scale)
            for off, n, start, row in batch.chunks:
                sl = slice(off, off + n)
                if k is not None:
                    kk, vv = k[sl], v[sl]
                elif start == 0:  # fused path: this chunk's k/v are in the cache already
                    kk, vv = k_cache.view(-1, KVH, D)[batch.slots[sl]], v_cache.view(-1, KVH, D)[batch.slots[sl]]
                else:  # after a cached prefix, prefill reads every key from the cache itself
                    kk = vv = None
                y[sl] = attention.prefill(q[sl], kk, vv, k_cache, v_cache, row, start, self.scale)
        return self.wo(y.reshape(N, H * D))


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w13 = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)  # gate | up
        self.w2 = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.fused_act = False  # the runner turns on the Triton SiLU*up kernel on CUDA

    def forward(self, x):
        gate_up = self.w13(x)  # [N, 2 * inter]
        # torch.compile'd layers (decode graphs) fuse the activation into their own kernels.
        if self.fused_act and not torch.compiler.is_compiling():
            return self.w2(activation.silu_mul_triton(gate_up))
        return self.w2(activation.silu_mul_torch(gate_up))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention = Attention(a)
        self.feed_forward = FeedForward(a)
        self.attention_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.ffn_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, rope, k_cache, v_cache, batch, decode_attention):
        h = x + self.attention(self.attention_norm(x), rope, k_cache, v_cache, batch, decode_attention)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs, max_context: int):
        super().__init__()
        self.args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.output = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.max_context = max_context
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)  # [max_context, D]
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.decode_attention = attention.decode_torch  # the runner picks the implementation
        self.fused_rope = False  # the Triton RoPE + cache-write kernel (use_triton_kernels)

    def use_triton_kernels(self, on: bool) -> None:
        """The OpenAI-Triton kernels for RoPE + cache write and SiLU*up (CUDA: the runner turns them on)."""
        self.fused_rope = on
        for layer in self.layers:
            layer.feed_forward.fused_act = on

    def set_rope(self, hf_config, dtype: torch.dtype):
        # HF's own rotary module gives inv_freq and scaling for every rope type (llama3, yarn, ...).
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope = LlamaRotaryEmbedding(config=hf_config)
        positions = torch.arange(self.max_context, dtype=torch.float32)[None]  # [1, C]
        dummy = torch.empty(0, dtype=dtype)
        cos, sin = rope(dummy, positions)  # [1, C, D] in dtype, computed like HF
        device = self.output.weight.device
        self.rope_cos, self.rope_sin = cos[0].to(device), sin[0].to(device)

    def forward(self, tokens, pos, caches, batch: Batch, logits_rows: torch.Tensor | None = None, block_fn=None):
        """tokens, pos: [N] int64 (flat over the batch); caches: (k, v) per layer; logits_rows:
        which of the N tokens get logits (None: all); block_fn: runs one layer (call_block, or its
        torch.compile'd form: one compiled graph serves every layer). -> logits [len(logits_rows), V] fp32."""
        block_fn = block_fn or call_block
        assert tokens.shape == pos.shape and tokens.dim() == 1, f"{tokens.shape} vs {pos.shape}"
        x = self.tok_embeddings(tokens)  # [N, hidden]
        if self.fused_rope:
            rope = (self.rope_cos, self.rope_sin, pos)
        else:
            rope = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))  # [N, 1, D] each
        for layer, (kc, vc) in zip(self.layers, caches):
            x = block_fn(layer, x, rope, kc, vc, batch, self.decode_attention)
        if logits_rows is not None:
            x = x[logits_rows]
        return self.output(self.norm(x)).float()


def call_block(layer: Block, x, rope, k_cache, v_cache, batch: Batch, decode_attention):
    """One layer as a plain function: what the runner hands to torch.compile (regional compilation:
    the layers share one graph per shape, so compiling 32 layers costs about as much as one)."""
    return layer(x, rope, k_cache, v_cache, batch, decode_attention)


def hf_to_fused(sd: dict[str, torch.Tensor], a: ModelArgs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF parameter names -> ours (q/k/v fused into wqkv, gate/up into w13), cast to dtype.
    Consumes `sd` as it goes, so peak memory is the weights plus one layer, not twice the weights."""
    take = lambda k: sd.pop(k).to(dtype)  # noqa: E731
    out = {"norm.weight": take("model.norm.weight")}
    if a.tie_word_embeddings:
        out["tok_embeddings.weight"] = out["output.weight"] = take("model.embed_tokens.weight")
    else:
        out["tok_embeddings.weight"] = take("model.embed_tokens.weight")
        out["output.weight"] = take("lm_head.weight")
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        o = f"layers.{i}."
        out[o + "attention.wqkv.weight"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if a.qkv_bias:
            out[o + "attention.wqkv.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        out[o + "attention.wo.weight"] = take(p + "self_attn.o_proj.weight")
        out[o + "feed_forward.w13.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        out[o + "feed_forward.w2.weight"] = take(p + "mlp.down_proj.weight")
        out[o + "attention_norm.weight"] = take(p + "input_layernorm.weight")
        out[o + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
    return out


def load_state_dict(checkpoint: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    assert files, f"no *.safetensors in {checkpoint}"
    sd = {}
    for f in files:
        sd.update(load_file(str(f), device=device))
    return sd


def load(checkpoint: str | Path, device: str | torch.device, dtype: torch.dtype, max_context: int):
    """Build the model from an HF checkpoint directory. Returns (Transformer, hf_config)."""
    from transformers import AutoConfig

    checkpoint = Path(checkpoint)
    hf_config = AutoConfig.from_pretrained(checkpoint)
    a = ModelArgs.from_hf(hf_config)
    max_context = max_context or a.max_position_embeddings
    # A window at least as long as the context never slides: plain causal attention is exact.
    assert a.sliding_window is None or max_context <= a.sliding_window, (
        f"sliding-window attention is not implemented: set max_context <= {a.sliding_window} (the window)")
    with torch.device("meta"):
        model = Transformer(a, max_context)
    sd = hf_to_fused(load_state_dict(checkpoint, str(device)), a, dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    assert not unexpected and not missing, f"missing {missing} unexpected {unexpected}"
    model.set_rope(hf_config, dtype)
    return model.eval().requires_grad_(False), hf_config


def config_json(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "config.json").read_text())
