"""Slot-based KV cache: one fixed region of max_context positions per concurrent sequence.

Preallocated once at start (never grows), so decode steps have static shapes and addresses
(CUDA-graph friendly). Layout per layer: k, v = [slots, kv_heads, max_context, head_dim].
Positions beyond a sequence's current length may hold stale or padding values; they are never
read because attention masks by position (and each position is written before it is read).
"""
from __future__ import annotations

import torch


def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, max_context: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * max_context * torch.empty(0, dtype=dtype).element_size()


def slots_within_budget(max_slots: int, budget_mb: float, per_slot: int) -> int:
    """The number of slots to allocate: max_slots, reduced to fit the budget (0 = no budget)."""
    if budget_mb <= 0:
        return max_slots
    fit = int(budget_mb * 2**20 // per_slot)
    assert fit >= 1, f"KV-cache budget {budget_mb} MiB holds no slot of {per_slot / 2**20:.1f} MiB"
    return min(max_slots, fit)


class KVCache:
    def __init__(self, num_layers, num_slots, num_kv_heads, max_context, head_dim, dtype, device):
        shape = (num_slots, num_kv_heads, max_context, head_dim)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self.num_slots = num_slots
        self.max_context = max_context
        self._free = list(range(num_slots))  # kept sorted: lowest slots first keeps decode batches dense
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in self.layers)

    def allocate(self) -> int | None:
        return self._free.pop(0) if self._free else None

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self._free, f"double free of slot {slot}"
        self._free.append(slot)
        self._free.sort()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)
