"""Per-request sampling on a batch of logits: greedy, temperature, top-k, top-p, seeded.

Filtering (temperature/top-k/top-p) is vectorised over the batch, and only rows with top-k or top-p
are sorted. The random draw is an exponential race (argmax(p / q), q ~ Exp(1)): a seeded request
draws q from its own torch.Generator, so it gives the same tokens whatever else is in the batch;
unseeded rows share one draw from torch's default generator (one op per step, not one per row).
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


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """The random stream of a seeded request (unseeded ones share torch's default generator)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed % 2**63)  # manual_seed takes a signed 64-bit value
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits: [B, V] fp32 -> next tokens [B] int64 (on logits.device). generators[i]: row i's own
    generator (a seeded request) or None (drawn from torch's default generator)."""
    B, V = logits.shape
    assert len(params) == B == len(generators), f"{B} rows, {len(params)} params"
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    dev = logits.device
    idx = to_device(rows, dev)
    x = logits[idx] / to_device([params[i].temperature for i in rows], dev, torch.float32)[:, None]
    # Exp(1) noise per sampled row: one draw for all unseeded rows, one per seeded row (its own
    # stream, so a seeded request gives the same tokens whatever else is in the batch).
    q = torch.empty_like(x).exponential_()
    for j, i in enumerate(rows):
        if generators[i] is not None:
            q[j].exponential_(generator=generators[i])
    # Exponential race: argmax(p / q) is a draw from p. Rows with top-k or top-p race over their
    # kept tokens in sorted order; the others over the whole vocabulary, without a sort.
    choice = (x.softmax(dim=-1) / q).argmax(dim=-1)  # [R] token ids
    cut = [j for j, i in enumerate(rows) if 0 < params[i].top_k < V or params[i].top_p < 1.0]
    if cut:
        ci = to_device(cut, dev)
        top_k = to_device([params[rows[j]].top_k or V for j in cut], dev)
        top_p = to_device([params[rows[j]].top_p for j in cut], dev, torch.float32)
        sorted_x, order = x[ci].sort(dim=-1, descending=True)
        rank = torch.arange(V, device=dev)[None]
        probs = sorted_x.softmax(dim=-1)
        # Keep a token if it is within top-k and the mass before it is < top_p (the top token always stays).
        keep = (rank < top_k[:, None]) & ((probs.cumsum(dim=-1) - probs) < top_p[:, None])
        probs = sorted_x.masked_fill(~keep, float("-inf")).softmax(dim=-1)  # renormalised, sorted order
        choice[ci] = order.gather(1, (probs / q[ci]).argmax(dim=-1)[:, None])[:, 0]
    tokens[idx] = choice
    return tokens
