"""The scheduler: which tokens of which sequences one engine step computes, over a paged KV pool.

A sequence's known tokens are its prompt plus what it generated; `num_computed` of them have their
keys/values in the cache. Each step takes, within `step_token_budget` tokens:
  1. one token of every running sequence that is decoding (its last token, whose logits are sampled),
  2. the next prefill chunk of running sequences still prefilling,
  3. new sequences from the waiting list (FIFO), first looking up their prompt in the prefix cache,
so chunked prefill rides in the same forward as the decode tokens. Blocks are allocated as tokens
arrive. When the pool runs dry, the newest running sequence is preempted (its blocks freed, and it
is recomputed from its tokens later; its full blocks usually survive in the prefix cache) — a
request is never failed for lack of KV.

With the engine's overlap, a sampled token may still be on the device ("in flight") when the next
step is scheduled: it is the next decode input (read on the device), and counts as known.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from llm.kv_cache import BlockPool
from llm.settings import EngineSettings


class Sequence:
    """A request's live state on the engine side."""

    def __init__(self, req):
        self.req = req
        self.params = req.params
        self.tokens: list[int] = list(req.prompt_ids)  # known on the host: prompt + generated
        self.prompt_len = len(req.prompt_ids)
        self.num_computed = 0  # tokens whose KV is in the cache
        self.blocks: list[int] = []  # block table
        self.num_registered = 0  # leading full blocks registered in the prefix cache
        self.last_cid = 0  # content id of the last registered block (the next one's parent)
        # Sampled tokens not appended yet (on the device): at most 1 when a step is scheduled, 2 while
        # step N+1 runs and step N is processed. flight_row: the newest one's row in its step.
        self.in_flight = 0
        self.flight_row = -1
        self.stream = None  # llm.text_stream.TextStream, set by the engine
        self.generator = None  # torch.Generator of a sampled (non-greedy) request
        self.preempted = False  # was preempted: never refused by the admission limits again
        self.done = False
        self.queued_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None

    @property
    def num_known(self) -> int:
        return len(self.tokens) + self.in_flight

    @property
    def num_out(self) -> int:  # generated tokens, the in-flight one included
        return len(self.tokens) - self.prompt_len + self.in_flight


@dataclass
class Chunk:
    """Tokens [start, start + n) of seq computed in this step; `sample`: the last one's logits are
    sampled (it is the last known token)."""

    seq: Sequence
    start: int
    n: int
    sample: bool


class Scheduler:
    def __init__(self, settings: EngineSettings, pool: BlockPool, max_context: int):
        self.s = settings
        self.pool = pool
        self.bs = pool.block_size
        self.max_context = max_context
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._evicted: set[int] = set()  # ids of sequences preempted during the current schedule()
        self.prefix_queried = self.prefix_hit = 0  # prompt tokens looked up / found in the prefix cache
        need = -(-max_context // self.bs)
        if pool.usable < need:
            raise ValueError(f"KV pool of {pool.usable} blocks x {self.bs} tokens cannot hold one sequence of "
                             f"max_context={max_context} tokens: raise kv_cache_budget_mb or lower max_context")

    # ---- admission ------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> bool:
        """Into the waiting list; False (refused) when max_waiting requests already wait."""
        free_seats = max(0, self.s.max_seqs - len(self.running))
        bounded_waiting = sum(1 for q in self.waiting if q.req.bounded and not q.preempted)
        if seq.req.bounded and bounded_waiting - free_seats >= self.s.waiting_limit:
            return False
        self.waiting.append(seq)
        return True

    def remove(self, seq: Sequence) -> None:
        """Forget a finished sequence: its blocks go back to the pool (full ones stay cached)."""
        if seq.blocks:
            self.pool.release(seq.blocks)
            seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)

    # ---- one step -------------------------------------------------------------------------------

    def schedule(self) -> list[Chunk]:
        budget = self.s.step_token_budget
        chunks: list[Chunk] = []
        scheduled: set[int] = set()
        # Decoding sequences first (one token each), then those still prefilling, each in running
        # order. This loop runs for every sequence in every step: num_known and num_out are inlined.
        decoding, prefilling = [], []
        for q in self.running:
            (decoding if len(q.tokens) + q.in_flight - q.num_computed == 1 else prefilling).append(q)
        self._evicted = set()
        bs = self.bs
        for seq in decoding + prefilling:
            if budget <= 0:
                break
            if id(seq) in self._evicted:
                continue
            known, start = len(seq.tokens) + seq.in_flight, seq.num_computed
            if seq.in_flight and (known - seq.prompt_len >= seq.params.max_tokens or known >= self.max_context):
                continue  # it finishes when its in-flight token is processed
            n = min(known - start, budget)
            # Most steps need no new block: the sequence's last block has room for its n tokens.
            if n > 0 and (start + n <= len(seq.blocks) * bs or self._reserve(seq, start + n, scheduled)):
                chunks.append(Chunk(seq, start, n, start + n == known))
                scheduled.add(id(seq))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.s.max_seqs:
            seq = self.waiting[0]
            if seq.in_flight:  # preempted with a token still on the device: next step
                break
            if not seq.blocks:  # the longest cached prefix (at least one token is left to compute)
                seq.blocks, seq.last_cid = self.pool.lookup(seq.tokens, seq.num_known - 1)
                seq.num_registered = len(seq.blocks)
                seq.num_computed = len(seq.blocks) * self.bs
            n = min(seq.num_known - seq.num_computed, budget)
            need = -(-(seq.num_computed + n) // self.bs) - len(seq.blocks)
            # Keep a block per running sequence for its growth (a watermark against thrashing).
            if need + len(self.running) > self.pool.num_free:  # not now; do not hoard the cached prefix
                self._reset(seq)
                break
            seq.blocks += [self.pool.allocate() for _ in range(need)]
            self.waiting.pop(0)
            self.running.append(seq)
            seq.admitted_at = seq.admitted_at or time.perf_counter()
            self.prefix_queried += seq.num_known - 1
            self.prefix_hit += seq.num_registered * self.bs
            chunks.append(Chunk(seq, seq.num_computed, n, seq.num_computed + n == seq.num_known))
            scheduled.add(id(seq))
            budget -= n
        return chunks

    def _reserve(self, seq: Sequence, upto: int, scheduled: set[int]) -> bool:
        """Blocks for seq's first `upto` tokens, preempting the newest unscheduled running sequences
        when the pool is dry. False if seq itself had to be preempted."""
        need = -(-upto // self.bs) - len(seq.blocks)
        if need <= 0:  # the common decode step: its block has room
            return True
        while need > self.pool.num_free:
            victim = next(q for q in reversed(self.running) if id(q) not in scheduled)
            self._preempt(victim)
            if victim is seq:
                return False
        seq.blocks += [self.pool.allocate() for _ in range(need)]
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._evicted.add(id(seq))
        self.running.remove(seq)
        self._reset(seq)
        seq.preempted = True
        self.waiting.insert(0, seq)
        self.preemptions += 1

    def _reset(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_registered, seq.last_cid = [], 0, 0, 0

    # ---- after a step is launched / processed ---------------------------------------------------

    def launched(self, chunks: list[Chunk], sampled: list[Chunk]) -> None:
        """The chunks' tokens are computed (in stream order); sampled[i]'s next token is in flight,
        row i of the step's sampled tokens."""
        for c in chunks:
            c.seq.num_computed = c.start + c.n
            # One more computed token fills a block only at a block boundary (per token: cheap test first).
            if c.n > 1 or c.seq.num_computed % self.bs == 0:
                self.register_full_blocks(c.seq)
        for row, c in enumerate(sampled):
            c.seq.in_flight += 1
            c.seq.flight_row = row

    def appended(self, seq: Sequence) -> None:
        """The engine appended one sampled token to seq.tokens."""
        if len(seq.tokens) % self.bs == 0:  # one more known token fills a block only at a block boundary
            self.register_full_blocks(seq)

    def register_full_blocks(self, seq: Sequence) -> None:
        """Register every full, computed block whose tokens are known on the host. Called whenever
        min(num_computed, len(tokens)) may have crossed a block boundary, so nothing registrable waits."""
        if seq.done:
            return
        limit = min(seq.num_computed, len(seq.tokens)) // self.bs
        while seq.num_registered < limit:
            i = seq.num_registered
            seq.last_cid = self.pool.register(seq.blocks[i], seq.last_cid, seq.tokens[i * self.bs : (i + 1) * self.bs])
            seq.num_registered += 1
