"""Runs the model over one scheduled step: builds the flat batch, sizes the paged KV pool, and
replays a CUDA graph when the step only decodes, or only prefills one new prompt of <= 512 tokens.

Flat batch order: decode rows (one token each) first, then prefill chunks. A decode-only step is
padded to a batch bucket (powers of two up to max_seqs) and replayed from the graph captured for
that bucket; padding rows compute token 0 at position 0 into the reserved block 0 and are ignored.
With torch attention the graphs are also keyed by a block-count bucket (the gather is static);
the Triton kernel reads lengths on the device, so one graph per batch bucket serves every length.
"""
from __future__ import annotations

import logging

import torch

from llm import attention
from llm import model as llm_model
from llm.device import host_tensor, resolve, to_device
from llm.kv_cache import NULL_BLOCK, KVCache, bytes_per_block
from llm.scheduler import Chunk
from llm.settings import EngineSettings

log = logging.getLogger(__name__)
# GPU memory kept free beyond the measured peak of a full step (CUDA graphs, allocator slack).
GPU_RESERVE_BYTES = 1 << 30
# Compiled decode buckets up to this batch size use coordinate-descent tuning (_compiled_step).
TUNED_BATCH = 8
# Prefill graphs (settings.prefill_graphs): token buckets up to this. Longer prompts keep the GPU busy
# long enough for eager launches to run ahead of it.
PREFILL_GRAPH_MAX_TOKENS = 512
# mixed_prefill_graphs: at most this many prompt chunks per step go through their prefill graphs;
# each replay reads every weight once, while an eager step reads them once for all of its tokens.
MAX_MIXED_PREFILL_REPLAYS = 2


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def powers_of_two_upto(lo: int, hi: int) -> list[int]:
    """[lo, 2lo, 4lo, ...] capped, always ending with hi itself."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


def _padded_table(chunks: list[Chunk]) -> torch.Tensor:
    """The block tables of the chunks' sequences as one int32 [rows, longest] tensor (padded with 0)."""
    nb = max(len(c.seq.blocks) for c in chunks)
    return torch.tensor([c.seq.blocks + [NULL_BLOCK] * (nb - len(c.seq.blocks)) for c in chunks], dtype=torch.int32)


def bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise AssertionError(f"{n} exceeds the largest bucket {buckets[-1]}")


class ModelRunner:
    def __init__(self, settings: EngineSettings, checkpoint, device: str | torch.device, model=None):
        """model: an already built (Transformer, hf_config) pair (benchmarks), else loaded from checkpoint."""
        self.s = settings
        self.device = resolve(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # graphs, streams and pools of this instance's GPU
        if self.device.type == "cpu" and settings.cpu_threads > 0:
            torch.set_num_threads(settings.cpu_threads)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        if model is None:
            model = llm_model.load(checkpoint, self.device, self.dtype, settings.max_context)
        self.model, self.hf_config = model
        a = self.model.args
        self.args = a
        self.max_context = self.model.max_context
        self.vocab_size = a.vocab_size
        self.block_size = settings.block_size
        self.max_blocks = -(-self.max_context // self.block_size)  # per sequence
        self.attention_impl = self._pick_attention(settings.attention)
        self.model.decode_attention = self._decode_attention
        self.model.use_triton_kernels(self.attention_impl == "triton")
        self.sm_count = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 0
        per_block = bytes_per_block(a.num_layers, a.num_kv_heads, a.head_dim, self.block_size, self.dtype)
        num_blocks = self._num_blocks(per_block)
        self.cache = KVCache(a.num_layers, num_blocks, self.block_size, a.num_kv_heads, a.head_dim, self.dtype, self.device)
        self.batch_buckets = powers_of_two_upto(1, settings.max_seqs)
        self.block_buckets = powers_of_two_upto(min(16, self.max_blocks), self.max_blocks)
        self.use_graphs = settings.cuda_graphs and self.device.type == "cuda"
        self.step_fn = self.model.forward
        if settings.compile:
            self.step_fn = self._compiled_step()
        # Static decode inputs shared by all graphs (the graph of bucket B reads the first B rows).
        n = settings.max_seqs
        dev = self.device
        self.tokens_buf = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos_buf = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots_buf = torch.zeros(n, dtype=torch.long, device=dev)
        self.table_buf = torch.full((n, self.max_blocks), NULL_BLOCK, dtype=torch.int32, device=dev)
        self.lens_buf = torch.ones(n, dtype=torch.int32, device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        # Prefill graphs: static inputs of one prompt padded to a token bucket (positions 0..P-1).
        P = min(PREFILL_GRAPH_MAX_TOKENS, self.max_context, settings.step_token_budget)
        self.prefill_buckets = powers_of_two_upto(16, P) if settings.prefill_graphs and self.use_graphs and P >= 16 else []
        if self.prefill_buckets:
            self.p_tokens = torch.zeros(P, dtype=torch.long, device=dev)
            self.p_slots = torch.zeros(P, dtype=torch.long, device=dev)
            self.p_pos = torch.arange(P, device=dev)
            self.p_row = torch.zeros(1, dtype=torch.long, device=dev)  # the logits row: prompt length - 1
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_graph_replays = 0
        self.started: torch.cuda.Event | None = None  # when the device reached this step's first work (CUDA)
        log.info("model %s on %s %s: KV pool %d blocks x %d tokens (%.1f MiB, %.0f max-context sequences), "
                 "attention %s", a.architecture, self.device, self.dtype, num_blocks, self.block_size,
                 self.cache.nbytes / 2**20, (num_blocks - 1) / self.max_blocks, self.attention_impl)
        if self.use_graphs and settings.warmup:
            for B in self.batch_buckets:
                for nb in self._graph_block_buckets():
                    self._graph(B, nb)
            for n in self.prefill_buckets:
                self._prefill_graph(n)

    # ---- set-up ---------------------------------------------------------------------------------

    def _pick_attention(self, name: str) -> str:
        if name == "auto":
            return "triton" if self.device.type == "cuda" and attention.triton is not None else "torch"
        if name == "triton" and (self.device.type != "cuda" or attention.triton is None):
            raise ValueError("engine setting attention='triton' needs a CUDA device and the triton package")
        return name

    def _num_blocks(self, per_block: int) -> int:
        s = self.s
        if s.kv_cache_budget_mb > 0:
            blocks = int(s.kv_cache_budget_mb * 2**20 // per_block) + 1
        elif self.device.type == "cuda":
            peak = self._profile_step_memory(per_block)
            free, total = torch.cuda.mem_get_info(self.device)
            budget = s.kv_cache_memory_fraction * total - (total - free) - peak - GPU_RESERVE_BYTES
            blocks = int(budget // per_block) + 1
            log.info("KV budget: %.1f GiB (%.0f%% of %.1f GiB, minus weights, %.2f GiB peak step, reserve)",
                     budget / 2**30, 100 * s.kv_cache_memory_fraction, total / 2**30, peak / 2**30)
        else:
            blocks = s.max_seqs * self.max_blocks + 1
        if blocks - 1 < self.max_blocks:
            raise ValueError(f"KV pool of {blocks - 1} blocks ({per_block / 2**20:.2f} MiB each) cannot hold one "
                             f"sequence of max_context={self.max_context}: raise kv_cache_budget_mb / "
                             "kv_cache_memory_fraction or lower max_context")
        return blocks

    def _profile_step_memory(self, per_block: int) -> int:
        """Peak activation memory of a full step (step_token_budget prompt tokens), measured."""
        n = min(self.s.step_token_budget, self.max_context)
        a = self.args
        scratch = KVCache(a.num_layers, -(-n // self.block_size) + 1, self.block_size, a.num_kv_heads, a.head_dim,
                          self.dtype, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device)
        row = torch.arange(1, scratch.num_blocks, device=self.device)
        batch = llm_model.Batch(slots=pos + self.block_size, num_decode=0, block_table=None, seq_lens=None,
                                chunks=[(0, n, 0, row)])
        with torch.inference_mode():
            self.model(tokens, pos, scratch.layers, batch, torch.tensor([n - 1], device=self.device))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del scratch
        torch.cuda.empty_cache()
        return peak

    def _compiled_step(self):
        """The decode step with its layers torch.compile'd (regional: one graph per batch bucket serves
        all layers; the OpenAI-Triton attention kernels run between the compiled parts). Only CUDA-graph decode
        steps use it: mixed steps have a new shape every time and stay eager. Inductor's on-disk cache
        (TORCHINDUCTOR_CACHE_DIR, set by the launcher: serve/environment.py) makes a restart warm."""
        if not self.use_graphs:  # CPU (or graphs off): every step runs eagerly
            return self.model.forward
        import torch._dynamo

        # One compile per graph bucket (static shapes), all kept.
        limit = max(8, 2 * len(self.batch_buckets) * len(self._graph_block_buckets()))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        # Small batches, where the norms and activations are a large share of the step, get inductor's
        # coordinate-descent tuning of those kernels (8B on the H200: batch 1 4.99 -> 4.51 ms per step);
        # at batch 64 it measured slower (6.01 -> 6.25 ms), so larger buckets keep inductor's defaults.
        tuned = torch.compile(llm_model.call_block, dynamic=False, options={"coordinate_descent_tuning": True})
        plain = torch.compile(llm_model.call_block, dynamic=False)

        def step(tokens, *args):
            return self.model.forward(tokens, *args, block_fn=tuned if tokens.shape[0] <= TUNED_BATCH else plain)

        return step

    def _decode_attention(self, q, k_cache, v_cache, block_table, seq_lens, scale):
        if self.attention_impl == "triton":
            splits = attention.num_splits(q.shape[0], k_cache.shape[2], self.sm_count)
            return attention.decode_triton(q, k_cache, v_cache, block_table, seq_lens, scale, splits)
        return attention.decode_torch(q, k_cache, v_cache, block_table, seq_lens, scale)

    def _graph_block_buckets(self) -> list[int]:
        return [self.max_blocks] if self.attention_impl == "triton" else self.block_buckets

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    # ---- one step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], prev_tokens: torch.Tensor | None) -> tuple[torch.Tensor, list[Chunk]]:
        """Compute the chunks' tokens. -> (logits [S, V] fp32, the S chunks with sample=True in the
        logits' row order). prev_tokens: the previous step's sampled tokens on the device; a chunk
        of an in-flight sequence takes its input token from prev_tokens[seq.flight_row]."""
        self.started = None
        decode = [c for c in chunks if c.n == 1]
        prefill = [c for c in chunks if c.n > 1]
        sampled = [c for c in decode + prefill if c.sample]
        if not prefill and self.use_graphs:
            return self._decode_graph(decode, prev_tokens), sampled
        if not decode and len(prefill) == 1 and self._fits_prefill_graph(prefill[0]):
            return self._prefill_replay(prefill[0]), sampled
        if self.s.mixed_prefill_graphs and 0 < len(prefill) <= MAX_MIXED_PREFILL_REPLAYS \
                and all(self._fits_prefill_graph(c) for c in prefill):
            return self._replays(decode, prefill, prev_tokens), sampled
        return self._eager(decode, prefill, prev_tokens), sampled

    def _mark_started(self) -> None:
        """Record `started` before the step's first device work (once per step): the engine measures
        the device's idle time between steps from it (the host's share of the critical path)."""
        if self.device.type == "cuda" and self.started is None:
            self.started = torch.cuda.Event(enable_timing=True)
            self.started.record()

    def _replays(self, decode: list[Chunk], prefill: list[Chunk], prev_tokens) -> torch.Tensor:
        """A mixed step as graph replays: the decode rows' graph, then each fresh prompt chunk's
        prefill graph (each replay reads the weights once: worth it for few chunks). Every output is
        copied out before the next replay: the graphs share one memory pool, so a replay may reuse
        the memory of another graph's output. -> logits in `sampled` order (decode rows, then chunks)."""
        outs = [self._decode_graph(decode, prev_tokens).clone()] if decode else []
        outs += [self._prefill_replay(c).clone() for c in prefill]
        return torch.cat(outs)

    def _inputs(self, c: Chunk, tokens: list, pos: list, slots: list, flights: list, offset: int) -> None:
        seq, bs = c.seq, self.block_size
        for i, p in enumerate(range(c.start, c.start + c.n)):
            if p < len(seq.tokens):
                tokens.append(seq.tokens[p])
            else:  # the in-flight token (last position)
                tokens.append(0)
                flights.append((offset + i, seq.flight_row))
            pos.append(p)
            slots.append(seq.blocks[p // bs] * bs + p % bs)

    def _eager(self, decode: list[Chunk], prefill: list[Chunk], prev_tokens) -> torch.Tensor:
        tokens, pos, slots, flights = [], [], [], []
        for c in decode:
            self._inputs(c, tokens, pos, slots, flights, len(tokens))
        offsets = []
        for c in prefill:
            offsets.append(len(tokens))
            self._inputs(c, tokens, pos, slots, flights, len(tokens))
        dev = self.device
        table = lens = None
        self._mark_started()
        if decode:
            table = to_device(_padded_table(decode), dev)
            lens = to_device([c.start + 1 for c in decode], dev, torch.int32)
        specs = [(off, c.n, c.start, c.seq.blocks) for off, c in zip(offsets, prefill)]
        groups, chunks = attention.plan_prefill(specs, self.block_size, self.args.num_heads // self.args.num_kv_heads, dev)
        batch = llm_model.Batch(to_device(slots, dev), len(decode), table, lens, chunks, groups)
        tok = to_device(tokens, dev)
        if flights:
            dst, src = zip(*flights)
            tok[to_device(list(dst), dev)] = prev_tokens[to_device(list(src), dev)]
        order = decode + prefill
        rows = [i if c.n == 1 else offsets[i - len(decode)] + c.n - 1 for i, c in enumerate(order) if c.sample]
        return self.model(tok, to_device(pos, dev), self.cache.layers, batch, to_device(rows, dev))

    def _decode_graph(self, decode: list[Chunk], prev_tokens) -> torch.Tensor:
        """The decode rows padded to their batch bucket Bb, through that bucket's graph. The inputs
        travel in two host->device copies (int64 [4, Bb]: token, position, KV slot, in-flight row;
        int32 [Bb, 1 + blocks]: length and block table), and none waits for the device
        (llm/device.py): the previous step may still be running. Padding rows compute token 0 at
        position 0 into the reserved block 0."""
        B = len(decode)
        Bb = bucket(B, self.batch_buckets)
        nb_live = max(len(c.seq.blocks) for c in decode)
        nb = bucket(nb_live, self._graph_block_buckets())
        dev, pad = self.device, Bb - B
        tokens, pos, slots, flights = [], [], [], []
        for c in decode:
            self._inputs(c, tokens, pos, slots, flights, len(tokens))
        src = [-1] * Bb  # per row: its token's row in prev_tokens when it is still in flight
        for row, flight_row in flights:
            src[row] = flight_row
        zeros = [0] * pad
        rows = []
        for c in decode:
            rows.append(c.start + 1)
            rows += c.seq.blocks
            rows += [NULL_BLOCK] * (nb_live - len(c.seq.blocks))
        rows += ([1] + [NULL_BLOCK] * nb_live) * pad
        # Flat lists (llm/device.py host_tensor: one fast conversion each).
        hx = host_tensor(tokens + zeros + pos + zeros + slots + zeros + src).view(4, Bb)
        hy = host_tensor(rows, torch.int32).view(Bb, 1 + nb_live)
        self._mark_started()
        x, y = to_device(hx, dev), to_device(hy, dev)
        tok = x[0]
        if len(flights) == B:  # every token in flight (overlap's steady state): one gather; padding rows
            tok = prev_tokens[x[3]]  # (index -1) take the last row's token, any token serves them
        elif flights:
            tok = torch.where(x[3] >= 0, prev_tokens[x[3].clamp(min=0)], tok)
        graph, out = self._graph(Bb, nb)
        self.tokens_buf[:Bb].copy_(tok)
        self.pos_buf[:Bb].copy_(x[1])
        self.slots_buf[:Bb].copy_(x[2])
        self.lens_buf[:Bb].copy_(y[:, 0])
        self.table_buf[:Bb, :nb_live].copy_(y[:, 1:])
        graph.replay()
        rows = [i for i, c in enumerate(decode) if c.sample]
        return out[:B] if len(rows) == B else out[to_device(rows, dev)]

    def _fits_prefill_graph(self, c: Chunk) -> bool:
        """A prompt's first chunk, all of its tokens known on the host, within the largest bucket."""
        return bool(self.prefill_buckets) and c.start == 0 and c.n <= self.prefill_buckets[-1] \
            and c.n <= len(c.seq.tokens)

    def _prefill_replay(self, c: Chunk) -> torch.Tensor:
        """One prompt's chunk [0, n) through the graph of its token bucket. Padding tokens (id 0,
        positions n..) come after the prompt, so causal attention keeps them out of its rows; their
        k/v go to slot 0 of the reserved block 0."""
        tokens, pos, slots, flights = [], [], [], []
        self._inputs(c, tokens, pos, slots, flights, 0)
        n, dev = c.n, self.device
        nb = bucket(n, self.prefill_buckets)
        graph, out = self._prefill_graph(nb)  # first: a capture (warmup=False) overwrites the inputs
        pad = [0] * (nb - n)
        self._mark_started()
        self.p_tokens[:nb].copy_(to_device(tokens + pad, dev), non_blocking=True)
        self.p_slots[:nb].copy_(to_device(slots + pad, dev), non_blocking=True)
        self.p_row.copy_(to_device([n - 1], dev), non_blocking=True)
        graph.replay()
        self.prefill_graph_replays += 1
        return out if c.sample else out[:0]

    def _prefill_graph(self, n: int):
        if n not in self.prefill_graphs:
            self.p_tokens.zero_()
            self.p_slots.zero_()
            self.p_row.fill_(n - 1)
            batch = llm_model.Batch(self.p_slots[:n], 0, None, None, chunks=[(0, n, 0, self.p_slots[:1])])
            args = (self.p_tokens[:n], self.p_pos[:n], self.cache.layers, batch, self.p_row)
            self.prefill_graphs[n] = self._capture(self.model.forward, args)
        return self.prefill_graphs[n]

    def _capture(self, fn, args) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """fn(*args) warmed up on a side stream, then captured into a graph sharing self.pool."""
        with torch.inference_mode():
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn(*args)
            torch.cuda.current_stream(self.device).wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn(*args)
            self.pool = graph.pool()
        return graph, out

    def _pad(self, B: int, Bb: int) -> None:
        """Rows B..Bb-1 of the static inputs: token 0 at position 0 into the reserved block 0."""
        if Bb > B:
            self.tokens_buf[B:Bb].zero_()
            self.pos_buf[B:Bb].zero_()
            self.slots_buf[B:Bb].zero_()
            self.table_buf[B:Bb].fill_(NULL_BLOCK)
            self.lens_buf[B:Bb].fill_(1)

    def _graph(self, B: int, nb: int):
        key = (B, nb)
        if key not in self.graphs:
            saved = [t.clone() for t in (self.tokens_buf, self.pos_buf, self.slots_buf, self.table_buf, self.lens_buf)]
            self._pad(0, B)  # capture with harmless inputs
            batch = llm_model.Batch(self.slots_buf[:B], B, self.table_buf[:B, :nb], self.lens_buf[:B])
            args = (self.tokens_buf[:B], self.pos_buf[:B], self.cache.layers, batch, None)
            graph, out = self._capture(self.step_fn, args)
            for buf, old in zip((self.tokens_buf, self.pos_buf, self.slots_buf, self.table_buf, self.lens_buf), saved):
                buf.copy_(old)
            self.graphs[key] = (graph, out)
        return self.graphs[key]
