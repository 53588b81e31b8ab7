"""llm/sampling.py: the sampler's distributions (temperature, top-k, top-p) against their definitions,
seeded rows independent of the batch, and one random draw per step for all unseeded rows."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llm.sampling import SamplingParams, make_generator, sample

P = [0.5, 0.3, 0.2]  # the distribution the logits encode
N = 40_000  # rows per draw: the frequencies' standard error is <= 0.0025


def frequencies(params: SamplingParams, n: int = N) -> list[float]:
    torch.manual_seed(0)
    logits = torch.tensor([math.log(p) for p in P])[None].repeat(n, 1)
    tokens = sample(logits, [params] * n, [None] * n)
    return (torch.bincount(tokens, minlength=len(P)).float() / n).tolist()


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(1, temperature=1.0), P),
    (SamplingParams(1, temperature=0.5), [p * p / sum(q * q for q in P) for p in P]),  # p^(1/T), renormalised
    (SamplingParams(1, temperature=1.0, top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0.0]),
    (SamplingParams(1, temperature=1.0, top_k=3), P),  # top_k >= vocabulary: no cut
    (SamplingParams(1, temperature=1.0, top_p=0.75), [0.5 / 0.8, 0.3 / 0.8, 0.0]),  # 0.8 before the third
    (SamplingParams(1, temperature=1.0, top_p=0.85), P),
    (SamplingParams(1, temperature=1.0, top_k=1), [1.0, 0.0, 0.0]),  # greedy
])
def test_frequencies_match_the_definition(params, expected):
    assert frequencies(params) == pytest.approx(expected, abs=0.012)


def test_rows_with_and_without_a_cut_in_one_batch():
    torch.manual_seed(1)
    logits = torch.tensor([math.log(p) for p in P])[None].repeat(2 * N, 1)
    params = [SamplingParams(1, temperature=1.0), SamplingParams(1, temperature=1.0, top_k=2)] * N
    tokens = sample(logits, params, [None] * (2 * N)).view(N, 2)
    plain = torch.bincount(tokens[:, 0], minlength=3).float() / N
    cut = torch.bincount(tokens[:, 1], minlength=3).float() / N
    assert plain.tolist() == pytest.approx(P, abs=0.012)
    assert cut.tolist() == pytest.approx([0.625, 0.375, 0.0], abs=0.012)


@pytest.mark.parametrize("seeded", [SamplingParams(1, temperature=1.0, seed=7),
                                    SamplingParams(1, temperature=0.8, top_p=0.9, top_k=50, seed=7)])
def test_seeded_row_draws_the_same_tokens_whatever_else_is_in_the_batch(seeded):
    V = 1000
    logits = torch.randn(20, V, generator=torch.Generator().manual_seed(0))

    def draws(batch_before: list[SamplingParams]) -> list[int]:
        g, out = make_generator(7, torch.device("cpu")), []
        for step in range(20):
            n = len(batch_before)
            rows = torch.cat([torch.randn(n, V), logits[step : step + 1]])
            out.append(sample(rows, batch_before + [seeded], [None] * n + [g])[-1].item())
        return out

    alone = draws([])
    assert draws([SamplingParams(1), SamplingParams(1, temperature=1.0)]) == alone
    assert draws([SamplingParams(1, temperature=1.0, top_k=5), SamplingParams(1, temperature=2.0, top_p=0.5)]) == alone
    assert len(set(alone)) > 5  # it does sample


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("params", [SamplingParams(1, temperature=0.7), SamplingParams(1, temperature=0.7, top_p=0.9)])
def test_unseeded_rows_cost_the_same_ops_at_any_batch_size(params):
    """The sampler's device ops (kernel launches on a GPU) do not grow with the number of unseeded
    sampled rows: one random draw for all of them, not one per row."""
    def ops(B: int) -> list[str]:
        logits = torch.randn(B, 100)
        with OpCount() as c:
            sample(logits, [params] * B, [None] * B)
        return c.ops

    assert ops(64) == ops(8)
    assert sum("exponential" in op for op in ops(64)) == 1


@pytest.mark.parametrize("params", [SamplingParams(1, temperature=1.0), SamplingParams(1, temperature=1.0, top_p=0.99),
                                    SamplingParams(1, temperature=100.0, top_k=3)])
def test_a_masked_token_is_never_drawn(params):
    """min_tokens masks EOS with -inf before sampling: such a token must never come out, cut or not."""
    torch.manual_seed(2)
    logits = torch.zeros(N, 4)
    logits[:, 1] = float("-inf")
    tokens = sample(logits, [params] * N, [None] * N)
    assert 1 not in tokens.tolist() and len(set(tokens.tolist())) == 3
