"""Benchmark workloads: fixed ISL/OSL pairs and a seeded, chat-shaped length mix.

`chat_lengths(n)` draws (prompt, output) token lengths from log-normal distributions shaped like chat
traffic (most prompts a few hundred tokens with a long tail to 2k; most answers ~100-200 tokens),
seeded, so every run and every engine sees the same sequence of requests.
"""
from __future__ import annotations

import numpy as np

CHAT_SEED = 2026
CHAT_ISL = dict(median=256, sigma=0.9, lo=16, hi=2048)
CHAT_OSL = dict(median=128, sigma=0.7, lo=8, hi=512)


def _lognormal(rng, n: int, median: float, sigma: float, lo: int, hi: int) -> list[int]:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int).tolist()


def chat_lengths(n: int, seed: int = CHAT_SEED) -> list[tuple[int, int]]:
    """n (isl, osl) pairs, the same for the same n and seed."""
    rng = np.random.default_rng(seed)
    return list(zip(_lognormal(rng, n, **CHAT_ISL), _lognormal(rng, n, **CHAT_OSL)))


def parse_workload(s: str) -> str | tuple[int, int]:
    """'128:256' -> (128, 256); 'chat' -> the chat mix."""
    if s == "chat":
        return s
    isl, osl = s.split(":")
    return int(isl), int(osl)


def lengths(workload, n: int) -> list[tuple[int, int]]:
    """The (isl, osl) of n requests of a workload."""
    return chat_lengths(n) if workload == "chat" else [tuple(workload)] * n


def requests_for(concurrency: int) -> int:
    """Closed-loop requests per level: at least 4x the concurrency (256 at 64 streams)."""
    return max(4 * concurrency, 16)
