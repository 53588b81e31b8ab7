"""Paged KV cache: one pool of fixed-size blocks, a block table per sequence, prefix sharing.

Tensors (`KVCache`): per layer k, v = [num_blocks, block_size, KVH, D]. A token at position p of a
sequence lives in block `table[p // block_size]`, row `p % block_size`; its flat slot is
block * block_size + row. Block 0 is never handed out: padding tokens of a CUDA-graph batch write
there and padded rows read it, so they touch no sequence's data.

Bookkeeping (`BlockPool`): free blocks, a reference count per block, and the prefix cache. A full
block is registered under the key (content id of its parent block, its tokens): the parent chain
makes the key stand for the whole prefix, and the tokens are compared exactly (no hash collision can
share the wrong block). A registered block whose last user finishes stays cached, evictable in LRU
order, until the pool needs it; each registration takes a new content id, so keys built on an
evicted parent can never match again.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

NULL_BLOCK = 0


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * block_size * torch.empty(0, dtype=dtype).element_size()


class KVCache:
    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        # One allocation: [layers, k|v, blocks, block_size, KVH, D].
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.nbytes = self.data.nbytes


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        assert num_blocks >= 2, f"a KV pool needs at least 2 blocks (one is reserved), got {num_blocks}"
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low ids first
        self.ref = [0] * num_blocks
        self._key_of: dict[int, tuple] = {}  # registered block -> its key
        self._cid_of: dict[int, int] = {}  # registered block -> content id
        self._cached: dict[tuple, int] = {}  # key -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, registered; oldest first
        self._next_cid = 1

    # ---- capacity -------------------------------------------------------------------------------

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that allocate() can hand out now (free, or cached but unused)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.usable - self.num_free

    # ---- allocation -----------------------------------------------------------------------------

    def allocate(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)  # least recently used
            self._unregister(block)
        else:
            raise RuntimeError("KV block pool exhausted (the scheduler checks num_free first)")
        assert self.ref[block] == 0, f"block {block} handed out while in use"
        self.ref[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unused registered blocks stay cached (evictable)."""
        for block in reversed(blocks):  # a sequence's tail first: it is evicted before its prefix
            assert self.ref[block] > 0, f"double release of block {block}"
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ---- prefix cache ---------------------------------------------------------------------------

    def lookup(self, tokens: list[int], max_tokens: int) -> tuple[list[int], int]:
        """The longest cached run of full blocks that prefixes `tokens`, covering at most
        max_tokens tokens. Takes a reference on each block found. -> (blocks, content id of the
        last one, 0 if none)."""
        bs = self.block_size
        blocks, parent = [], 0
        if self.prefix_caching:
            for start in range(0, max_tokens - bs + 1, bs):
                block = self._cached.get((parent, tuple(tokens[start : start + bs])))
                if block is None:
                    break
                blocks.append(block)
                parent = self._cid_of[block]
            for block in blocks:
                if self.ref[block] == 0:
                    del self._evictable[block]
                self.ref[block] += 1
        return blocks, parent

    def register(self, block: int, parent_cid: int, tokens: list[int]) -> int:
        """Register a just-filled block under (parent, tokens). -> its content id for the next
        block's key (the cached block's id when the same content is already cached elsewhere)."""
        assert len(tokens) == self.block_size, f"register needs a full block, got {len(tokens)} tokens"
        if not self.prefix_caching:
            return 0
        key = (parent_cid, tuple(tokens))
        other = self._cached.get(key)
        if other is not None:
            return self._cid_of[other]
        if block in self._key_of:  # already registered (a shared block)
            return self._cid_of[block]
        self._cached[key] = block
        self._key_of[block] = key
        self._cid_of[block] = self._next_cid
        self._next_cid += 1
        return self._cid_of[block]

    def _unregister(self, block: int) -> None:
        key = self._key_of.pop(block)
        del self._cached[key]
        del self._cid_of[block]
