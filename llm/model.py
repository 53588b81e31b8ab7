"""A compact Llama-family decoder (Llama, Mistral, Qwen2) in the style of gpt-fast.

Loads Hugging Face safetensors into fused weights (wqkv, w13) and runs against a static, slot-based
KV cache (llm/kv_cache.py), so every decode step has fixed shapes and can be captured in a CUDA
graph per batch bucket. The same code runs eagerly on CPU.

Shapes: B = rows in the batch, T = tokens per row, H = query heads, KVH = key/value heads,
D = head_dim, L = kv length attended (a static bucket <= max_context), V = vocab.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as HF (normalize in fp32, cast back, then scale) to be token-identical.
        # F.rms_norm without a weight is that normalization, in one fused kernel where torch has one.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.wqkv = nn.Linear(a.hidden_size, q + 2 * kv, bias=a.qkv_bias)
        self.wo = nn.Linear(q, a.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, k_cache, v_cache, rows, idx, kv_len):
        # x: [B, T, hidden]; cos/sin: [B, T, 1, D]; mask: [B, 1, n_rep*T, L] additive (0 / -inf), in x's dtype
        # k_cache/v_cache: this layer's [S, KVH, max_context, D]; rows: [B] slot per row or None
        # (None: row b is slot b, the decode layout, so reads are views, not gathers);
        # idx: KV-cache write index (slot, head, pos), each broadcasting to [B, KVH, T].
        # The per-forward pieces (rope tables, mask, idx) are built once in Transformer.forward:
        # fewer kernels per layer (decode is bound by kernel count, prefill by launches).
        a = self.a
        B, T, _ = x.shape
        H, KVH, D = a.num_heads, a.num_kv_heads, a.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * KVH, D)
        # RoPE on q and k together (one set of elementwise kernels for both heads groups).
        qk = qkv[:, :, : H + KVH]
        qk = qk * cos + rotate_half(qk) * sin  # [B, T, H+KVH, D]
        q = qk[:, :, :H].transpose(1, 2)  # [B, H, T, D]
        k = qk[:, :, H:].transpose(1, 2)  # [B, KVH, T, D]
        v = qkv[:, :, H + KVH :].transpose(1, 2)
        # Write the new keys/values at their positions: cache[slot, h, pos] = k[b, h, t].
        k_cache.index_put_(idx, k.to(k_cache.dtype))
        v_cache.index_put_(idx, v.to(v_cache.dtype))
        if rows is None:
            keys, values = k_cache[:B, :, :kv_len], v_cache[:B, :, :kv_len]  # views
        else:
            keys, values = k_cache[rows, :, :kv_len], v_cache[rows, :, :kv_len]  # [B, KVH, L, D]
        # GQA without copying the cache: fold the query heads of one KV head into the query-length
        # axis (HF's repeat_kv maps query head h to kv head h // n_rep).
        n_rep = H // KVH
        q = q.reshape(B, KVH, n_rep * T, D)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, KVH, n_rep*T, D]
        # reshape, not view: CUDA SDPA kernels may return a non-contiguous layout (seen on H100).
        y = y.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.inter = a.intermediate_size
        self.w13 = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)  # gate | up
        self.w2 = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).split([self.inter, self.inter], dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention = Attention(a)
        self.feed_forward = FeedForward(a)
        self.attention_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.ffn_norm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, cos, sin, mask, k_cache, v_cache, rows, idx, kv_len):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, k_cache, v_cache, rows, idx, kv_len)
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

    def set_rope(self, hf_config, dtype: torch.dtype):
        # HF's own rotary module gives inv_freq and scaling for every rope type (llama3, yarn, ...).
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope = LlamaRotaryEmbedding(config=hf_config)
        positions = torch.arange(self.max_context, dtype=torch.float32)[None]  # [1, C]
        dummy = torch.empty(0, dtype=dtype)
        cos, sin = rope(dummy, positions)  # [1, C, D] in dtype, computed like HF
        device = self.output.weight.device
        self.rope_cos, self.rope_sin = cos[0].to(device), sin[0].to(device)

    def forward(self, tokens, pos, caches, rows, kv_len: int, last: torch.Tensor | None = None):
        """tokens, pos: [B, T] int64; caches: list of (k, v) per layer; rows: [B] slots or None.

        Returns logits [B, V] (fp32) of the token at index `last[b]` of each row (T-1 when None).
        kv_len is a Python int (static per CUDA graph): keys beyond it are not read.
        """
        assert tokens.shape == pos.shape and tokens.dim() == 2, f"{tokens.shape} vs {pos.shape}"
        assert kv_len <= self.max_context, f"kv_len {kv_len} > max_context {self.max_context}"
        B, T = tokens.shape
        a = self.args
        n_rep = a.num_heads // a.num_kv_heads
        dev = tokens.device
        x = self.tok_embeddings(tokens)
        cos, sin = self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2)  # [B, T, 1, D]
        ctx = torch.arange(kv_len, device=dev)
        allowed = ctx[None, None, :] <= pos[:, :, None]  # [B, T, L]: causal by position
        # GQA folds the n_rep query heads of a KV head into the query axis (row r*T + t): repeat the
        # mask to match, as an additive mask in x's dtype (what SDPA makes of a bool mask, once).
        allowed = allowed.unsqueeze(1).expand(B, n_rep, T, kv_len).reshape(B, 1, n_rep * T, kv_len)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        slot = torch.arange(B, device=dev) if rows is None else rows
        heads = torch.arange(a.num_kv_heads, device=dev)
        idx = (slot[:, None, None], heads[None, :, None], pos[:, None, :])  # each broadcasts to [B, KVH, T]
        for layer, (kc, vc) in zip(self.layers, caches):
            x = layer(x, cos, sin, mask, kc, vc, rows, idx, kv_len)
        if last is None:
            x = x[:, -1]
        else:
            x = x[torch.arange(B, device=x.device), last]  # [B, hidden]
        return self.output(self.norm(x)).float()


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
