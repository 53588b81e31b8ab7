"""Runs the model against the KV cache: eager prefill, and decode through CUDA graphs on GPU.

Decode rows are KV slots 0..B-1 (B = the batch bucket covering the highest live slot), so a
decode step reads the cache through views and has one static shape per (batch bucket, KV-length
bucket): one CUDA graph each. Rows of free or prefilling slots are computed and ignored; they
write only to position max_context-1 of their own slot, which is always rewritten before it is read.
"""
from __future__ import annotations

import logging

import torch

from llm import model as llm_model
from llm.device import resolve, to_device
from llm.kv_cache import KVCache, bytes_per_slot, slots_within_budget
from llm.settings import EngineSettings

log = logging.getLogger(__name__)


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


def bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise AssertionError(f"{n} exceeds the largest bucket {buckets[-1]}")


class ModelRunner:
    def __init__(self, settings: EngineSettings, checkpoint, device: str | torch.device):
        self.device = resolve(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # graphs, streams and pools of this instance's GPU
        if self.device.type == "cpu" and settings.cpu_threads > 0:
            torch.set_num_threads(settings.cpu_threads)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.model, self.hf_config = llm_model.load(checkpoint, self.device, self.dtype, settings.max_context)
        a = self.model.args
        self.max_context = self.model.max_context
        per_slot = bytes_per_slot(a.num_layers, a.num_kv_heads, a.head_dim, self.max_context, self.dtype)
        slots = slots_within_budget(settings.max_slots, settings.kv_cache_budget_mb, per_slot)
        self.cache = KVCache(a.num_layers, slots, a.num_kv_heads, self.max_context, a.head_dim, self.dtype, self.device)
        self.vocab_size = a.vocab_size
        self.batch_buckets = powers_of_two_upto(1, slots)
        self.kv_buckets = powers_of_two_upto(min(settings.kv_len_min, self.max_context), self.max_context)
        self.use_graphs = settings.cuda_graphs and self.device.type == "cuda"
        self.decode_fn = self.model.forward
        if settings.compile:
            self.decode_fn = torch.compile(self.model.forward, mode="max-autotune-no-cudagraphs", dynamic=False)
        # Static decode inputs shared by all graphs (graph (B, L) reads the first B rows).
        self.tokens_buf = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.pos_buf = torch.full((slots, 1), self.max_context - 1, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        log.info("model %s on %s %s: %d slots x %d positions, KV cache %.1f MiB",
                 a.architecture, self.device, self.dtype, slots, self.max_context, self.cache.nbytes / 2**20)
        if self.use_graphs and settings.warmup:
            for B in self.batch_buckets:
                for L in self.kv_buckets:
                    self._graph(B, L)

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """tokens/pos [B, T] (padding at pos max_context-1), rows [B] slots, last [B] -> logits [B, V]."""
        kv_len = int(pos.masked_fill(pos == self.max_context - 1, 0).max()) + 1
        kv_len = min(self.max_context, -(-kv_len // 16) * 16)  # round up: aligned attention kernels
        # Pinned, non-blocking copies: a pageable copy would wait for the decode step in flight.
        d = self.device
        return self.model(to_device(tokens, d), to_device(pos, d), self.cache.layers, to_device(rows, d), kv_len,
                          to_device(last, d))

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, max_pos: int,
               device_tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """tokens/pos [B] (CPU) for slots 0..B-1 (B <= slots; idle rows at pos max_context-1);
        max_pos: the highest position of a live row; device_tokens: (rows, tokens) already on the
        device (sampled by the previous step, not yet seen by the host) overriding `tokens` there.
        -> logits [B, V] fp32."""
        B = tokens.shape[0]
        Bb = bucket(B, self.batch_buckets)
        L = bucket(max_pos + 1, self.kv_buckets)
        self.tokens_buf[:B, 0].copy_(to_device(tokens, self.device), non_blocking=True)
        if device_tokens is not None:
            self.tokens_buf[device_tokens[0], 0] = device_tokens[1]
        self.pos_buf[:B, 0].copy_(to_device(pos, self.device), non_blocking=True)
        self.pos_buf[B:Bb].fill_(self.max_context - 1)
        if not self.use_graphs:
            return self.decode_fn(self.tokens_buf[:Bb], self.pos_buf[:Bb], self.cache.layers, None, L)[:B]
        graph, out = self._graph(Bb, L)
        graph.replay()
        return out[:B]

    def _graph(self, B: int, L: int):
        key = (B, L)
        if key not in self.graphs:
            # Capture with harmless inputs: padding positions of rows >= the live ones.
            saved_t, saved_p = self.tokens_buf[:B].clone(), self.pos_buf[:B].clone()
            self.pos_buf[:B].fill_(self.max_context - 1)
            args = (self.tokens_buf[:B], self.pos_buf[:B], self.cache.layers, None, L)
            with torch.inference_mode():
                s = torch.cuda.Stream(self.device)
                s.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(s):
                    for _ in range(2):
                        self.decode_fn(*args)
                torch.cuda.current_stream(self.device).wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.decode_fn(*args)
                self.pool = graph.pool()
            self.tokens_buf[:B].copy_(saved_t)
            self.pos_buf[:B].copy_(saved_p)
            self.graphs[key] = (graph, out)
        return self.graphs[key]
