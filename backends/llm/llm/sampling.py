"""Per-request sampling on a batch of logits: greedy, temperature, top-k, top-p, seeded.

Filtering (temperature/top-k/top-p) is vectorised over the batch; the random draw of each sampled
row uses that request's own torch.Generator (exponential race: argmax(p / q), q ~ Exp(1)), so a
seeded request gives the same tokens whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.device import to_device


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def validate(p: SamplingParams, max_tokens_cap: int) -> None:
    """Raise ValueError naming the field for any bad parameter (-> INVALID_ARGUMENT)."""
    if not 1 <= p.max_tokens <= max_tokens_cap:
        raise ValueError(f"max_tokens must be in [1, {max_tokens_cap}], got {p.max_tokens}")
    if not p.temperature >= 0.0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0, got {p.temperature}")
    if p.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {p.top_k}")
    if not 0.0 < p.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
    if p.min_tokens < 0 or p.min_tokens > p.max_tokens:
        raise ValueError(f"min_tokens must be in [0, max_tokens={p.max_tokens}], got {p.min_tokens}")
    if p.seed is not None and not 0 <= p.seed < 2**64:
        raise ValueError(f"seed must be in [0, 2^64), got {p.seed}")
    if any(not s for s in p.stop):
        raise ValueError("stop_words must not contain empty strings")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed % 2**63)  # manual_seed takes a signed 64-bit value
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, V] fp32 -> next tokens [B] int64 (on logits.device)."""
    B, V = logits.shape
    assert len(params) == B == len(generators), f"{B} rows, {len(params)} params"
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    dev = logits.device
    idx = to_device(rows, dev)
    x = logits[idx] / to_device([params[i].temperature for i in rows], dev, torch.float32)[:, None]
    top_k = to_device([min(params[i].top_k or V, V) for i in rows], dev)
    top_p = to_device([params[i].top_p for i in rows], dev, torch.float32)
    sorted_x, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=dev)[None]
    probs = sorted_x.softmax(dim=-1)
    # Keep a token if it is within top-k and the mass before it is < top_p (the top token always stays).
    keep = (rank < top_k[:, None]) & ((probs.cumsum(dim=-1) - probs) < top_p[:, None])
    sorted_x = sorted_x.masked_fill(~keep, float("-inf"))
    probs = sorted_x.softmax(dim=-1)  # [R, V] renormalised over kept tokens, in sorted order
    q = torch.empty_like(probs)
    for j, i in enumerate(rows):
        q[j].exponential_(generator=generators[i])
    choice = (probs / q).argmax(dim=-1)  # [R] index into sorted order
    tokens[idx] = order.gather(1, choice[:, None])[:, 0]
    return tokens
