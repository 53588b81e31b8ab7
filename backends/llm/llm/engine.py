"""Continuous-batching engine: a loop of scheduler steps over a paged KV cache.

Every step: take new requests, drop cancelled ones, schedule (llm/scheduler.py: every decode token
plus prefill chunks within the step's token budget, admitting and preempting by free KV blocks),
run one forward over the mixed batch (llm/runner.py), sample on the device, then turn the tokens
into text (llm/text_stream.py) and responses. With `overlap`, step N+1 is launched before step N's
tokens are read on the host. Results go out through each request's `emit` callback (from the engine
thread), so the engine knows nothing about Triton.

In-process use (benchmarks, tests):
    engine = Engine(EngineSettings(checkpoint=DIR), device="cuda")
    results = engine.generate(["Hello"] * 64, SamplingParams(max_tokens=256, ignore_eos=True))
"""
from __future__ import annotations

import gc
import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from llm.device import resolve, to_device
from llm.gc_pauses import GcWatch, freeze_startup_heap
from llm.kv_cache import BlockPool
from llm.request import (CANCELLED, ENGINE_ERROR, ERROR, FAULT_ENV, FAULTS, LENGTH, OVERLOADED,  # noqa: F401
                         SLOW_FIRST_TOKEN_S, STOP, Metrics, Output, Request, Stats, parse_fault)
from llm.runner import ModelRunner
from llm.sampling import SamplingParams, make_generator, sample, validate
from llm.scheduler import Chunk, Scheduler, Sequence
from llm.settings import EngineSettings
from llm.text_stream import TextStream

log = logging.getLogger(__name__)


@dataclass
class _Launched:
    """A step whose sampled tokens are (maybe) still being computed."""

    sampled: list[Chunk]
    next_tokens: torch.Tensor  # [S] on the device
    host: torch.Tensor  # its host copy, valid once `ready` has fired
    ready: object  # torch.cuda.Event (timing) after the step's work, or None (CPU)
    started: object = None  # torch.cuda.Event (timing) before the step's first work (llm/runner.py)


class Engine:
    def __init__(self, settings: EngineSettings, base_dir: str | Path | None = None,
                 device: str | torch.device = "cpu", metrics: Metrics | None = None, model=None):
        from transformers import AutoTokenizer, GenerationConfig

        self.settings = settings
        ckpt = Path(settings.checkpoint)
        if not ckpt.is_absolute() and base_dir is not None:
            ckpt = Path(base_dir) / ckpt
        self.checkpoint = ckpt
        self.device = resolve(device)
        self.runner = ModelRunner(settings, ckpt, self.device, model=model)
        self.max_context = self.runner.max_context
        self.pool = BlockPool(self.runner.num_blocks, settings.block_size, settings.prefix_caching)
        self.scheduler = Scheduler(settings, self.pool, self.max_context)
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt)
        eos = set()
        try:
            gen_eos = GenerationConfig.from_pretrained(ckpt).eos_token_id
            eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        except OSError:
            pass
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self.metrics = metrics or Metrics()
        self._incoming: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._steps = 0
        self._pending: _Launched | None = None
        self._last_decode: float | None = None
        self._last_metrics = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._fault = parse_fault(os.environ.get(FAULT_ENV, ""))
        self._host_s = 0.0  # time in step() not spent waiting for the device (benchmarks: host work per step)
        self._wait_s = 0.0
        # The device's idle time between steps: from the previous step's end to this step's first work
        # (CUDA events). What the host costs the critical path, where host_s is all of its work.
        self._idle_s = 0.0
        self._prev_ready = None  # the previous step's `ready` event, while steps follow each other
        self.gc_watch = GcWatch()

    @property
    def waiting(self) -> list[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    # ---- requests -------------------------------------------------------------------------------

    def make_request(self, text: str, params: SamplingParams, emit: Callable[[Output], None], stream: bool = True,
                     echo: bool = False, is_cancelled: Callable[[], bool] | None = None,
                     arrival: float | None = None) -> Request:
        """Tokenize and validate; raises ValueError naming the field (-> INVALID_ARGUMENT).
        arrival: perf_counter() when the request reached the server (default: now)."""
        validate(params, self.settings.max_tokens_cap)
        ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise ValueError("text_input: empty prompt (no tokens)")
        if len(ids) >= self.max_context:
            raise ValueError(f"text_input: prompt has {len(ids)} tokens; the context limit is "
                             f"{self.max_context} (prompt + at least one generated token)")
        req = Request(ids, params, emit, stream=stream, prefix_text=text if echo else "", is_cancelled=is_cancelled)
        if self._fault and self._fault[0] in text:
            req.fault = self._fault[1]
        if arrival is not None:
            req.arrival = arrival
        return req

    def submit(self, req: Request) -> None:
        self._incoming.put(req)

    # ---- background loop ------------------------------------------------------------------------

    def start(self) -> None:
        """Serve from a background thread. The process's start-up heap is frozen first (llm/gc_pauses.py:
        a full collection over a loaded model stops every thread for up to a second)."""
        assert self._thread is None, "engine already started"
        log.info("froze %d start-up objects out of the garbage collector's way", freeze_startup_heap())
        self.gc_watch.install()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.gc_watch.remove()
            gc.unfreeze()  # what the engine leaves behind can be collected again
        self._drain()
        self._pending = None
        for seq in self.running + self.waiting:
            self._finish(seq, ERROR, error="engine stopped")

    def _loop(self) -> None:
        if self.device.type == "cuda":  # a new thread starts on device 0: use the instance's GPU
            torch.cuda.set_device(self.device)
        while not self._stop.is_set():
            if not self.running and not self.waiting and self._pending is None:
                try:  # idle: block instead of spinning
                    self._enqueue(self._incoming.get(timeout=0.1))
                except queue.Empty:
                    self._publish_metrics(force=False)
                    continue
            try:
                self.step()
            except Exception:  # never let the loop die: fail what is in flight, keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                self._pending = None
                for seq in list(self.running):
                    self._finish(seq, ERROR, error=ENGINE_ERROR)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._pending or not self._incoming.empty())

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> None:
        t0 = time.perf_counter()
        wait0 = self._wait_s
        self._step()
        self._host_s += time.perf_counter() - t0 - (self._wait_s - wait0)

    def _step(self) -> None:
        self._drain()
        self._steps += 1
        if self._steps % self.settings.cancel_check_interval == 0:
            for seq in self.waiting + self.running:
                if seq.req.is_cancelled is not None and seq.req.is_cancelled():
                    self._finish(seq, CANCELLED)
        pending, self._pending = self._pending, None
        chunks = self._without_faults(self.scheduler.schedule())
        launched = None
        if chunks:
            try:
                launched = self._launch(chunks, pending)
            except Exception:  # a failing step fails the requests in it; the engine keeps serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                for c in chunks:
                    self._finish(c.seq, ERROR, error=ENGINE_ERROR)
        if pending is not None:
            self._process(pending)
        if launched is None:
            self._last_decode = None  # idle time is not an inter-token latency
            self._prev_ready = None  # nor is it the host's cost
        elif self.settings.overlap:
            self._pending = launched
        else:
            self._process(launched)
        self._publish_metrics(force=False)

    def _without_faults(self, chunks: list[Chunk]) -> list[Chunk]:
        """Injected faults (tests): the request whose prompt holds the marker fails in this step."""
        for c in chunks:
            if c.seq.req.fault and c.start == 0:
                try:
                    raise FAULTS[c.seq.req.fault]()
                except Exception:
                    log.error("request failed in its step:\n%s", traceback.format_exc())
                    self._finish(c.seq, ERROR, error=ENGINE_ERROR)
        return [c for c in chunks if not c.seq.done]

    def _drain(self) -> None:
        while True:
            try:
                self._enqueue(self._incoming.get_nowait())
            except queue.Empty:
                break
        limit = self.settings.max_queue_time_s
        now = time.perf_counter()
        for seq in [q for q in self.waiting if q.req.bounded and not q.preempted and now - q.req.arrival > limit]:
            self._finish(seq, OVERLOADED, error=f"overloaded: waited {limit:g} s to be scheduled "
                                                "(max_queue_time_s); retry later")

    def _enqueue(self, req: Request) -> None:
        """Into the waiting list, or refused at once when it is full (bounded admission)."""
        seq = Sequence(req)
        seq.stream = TextStream(self.tokenizer, req.params.stop, self.settings.stream_interval if req.stream else 1 << 30,
                                req.prefix_text)
        p = req.params
        seq.generator = None if p.greedy or p.seed is None else make_generator(p.seed, self.device)
        if not self.scheduler.add(seq):
            self._finish(seq, OVERLOADED, error=f"overloaded: {self.settings.waiting_limit} requests already wait "
                                                "to be scheduled (max_waiting); retry later")

    @torch.inference_mode()
    def _launch(self, chunks: list[Chunk], pending: _Launched | None) -> _Launched:
        """Run the step's forward and sample on the device; start the copy of the tokens to the host."""
        logits, sampled = self.runner.forward(chunks, None if pending is None else pending.next_tokens)
        next_tokens = self._sample(logits, [c.seq for c in sampled])
        self.scheduler.launched(chunks, sampled)
        if next_tokens.device.type != "cuda":
            return _Launched(sampled, next_tokens, next_tokens, None)
        # Wait later for this event only: a plain .cpu() at processing time would also wait for the
        # step launched after this one.
        host = torch.empty(next_tokens.shape, dtype=next_tokens.dtype, pin_memory=True)
        host.copy_(next_tokens, non_blocking=True)
        ready = torch.cuda.Event(enable_timing=True)
        ready.record()
        return _Launched(sampled, next_tokens, host, ready, self.runner.started)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Next tokens [len(seqs)] on the device."""
        # min_tokens: EOS cannot be chosen before min_tokens tokens (unless EOS is ignored anyway).
        # (The request's own settings first: num_out, a property, only for rows where EOS is held off.)
        early = [i for i, q in enumerate(seqs)
                 if q.params.min_tokens and not q.params.ignore_eos and q.num_out < q.params.min_tokens]
        if early and self.eos_ids:
            dev = logits.device
            logits[to_device(early, dev)[:, None], to_device(self.eos_ids, dev)] = float("-inf")
        return sample(logits, [q.params for q in seqs], [q.generator for q in seqs])

    def _process(self, launched: _Launched) -> None:
        """Host side of a step: append each live sequence's token (finishes, stops, sends)."""
        if launched.ready is not None:
            t = time.perf_counter()
            launched.ready.synchronize()  # releases the GIL while waiting
            self._wait_s += time.perf_counter() - t
            if self._prev_ready is not None and launched.started is not None:
                self._idle_s += self._prev_ready.elapsed_time(launched.started) / 1e3
            self._prev_ready = launched.ready
        ids = launched.host.tolist()
        now = time.perf_counter()
        # Every token is counted (before any final response goes out: Metrics.finished); only a step
        # that follows a step is an inter-token latency.
        live = sum(1 for c in launched.sampled if not c.seq.done)
        self.metrics.step(None if self._last_decode is None else now - self._last_decode, live)
        self._last_decode = now
        for c, tok in zip(launched.sampled, ids):
            seq = c.seq
            seq.in_flight -= 1
            if seq.done:
                continue
            try:
                self._append(seq, tok, now)
            except Exception:
                log.error("request failed:\n%s", traceback.format_exc())
                self._finish(seq, ERROR, error="internal error while producing output (see server log)")

    def _append(self, seq: Sequence, tok: int, now: float) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = now
            ttft = now - seq.req.arrival
            self.metrics.first_token(ttft)
            if ttft > SLOW_FIRST_TOKEN_S:  # where did the time go?
                log.warning("slow first token: %.3f s after arrival = %.3f s until the engine took it, "
                            "%.3f s waiting to be scheduled, %.3f s in prefill (prompt %d tokens, %d running, "
                            "%d waiting)", ttft, seq.queued_at - seq.req.arrival,
                            (seq.admitted_at or now) - seq.queued_at, now - (seq.admitted_at or now),
                            seq.prompt_len, len(self.running), len(self.waiting))
        seq.tokens.append(tok)
        self.scheduler.appended(seq)
        p = seq.params
        n_out = len(seq.tokens) - seq.prompt_len  # not seq.num_out: the next token may be in flight
        if tok in self.eos_ids and not p.ignore_eos:
            return self._finish(seq, STOP)
        if seq.stream.push(tok, check_stops=n_out >= p.min_tokens):
            return self._finish(seq, STOP, flush=False)
        if n_out >= p.max_tokens or len(seq.tokens) >= self.max_context:
            return self._finish(seq, LENGTH)
        if seq.req.stream:
            text = seq.stream.take()
            if text is not None:
                self._emit(seq, text, None)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, flush: bool = True) -> None:
        if seq.done:
            return
        seq.done = True
        self.scheduler.remove(seq)
        text = seq.stream.rest(flush) if error is None and reason != CANCELLED else ""
        self.metrics.finished()
        self._emit(seq, text, reason, error)

    def _emit(self, seq: Sequence, text: str, reason: str | None, error: str | None = None) -> None:
        out = Output(text, reason is not None, reason, seq.prompt_len, len(seq.tokens) - seq.prompt_len, error)
        try:
            seq.req.emit(out)
        except Exception:  # e.g. the client went away: treat as cancelled
            log.warning("emit failed, cancelling the request:\n%s", traceback.format_exc())
            if not seq.done:
                self._finish(seq, CANCELLED)

    # ---- metrics --------------------------------------------------------------------------------

    def stats(self) -> Stats:
        sc = self.scheduler
        return Stats(len(self.running), len(self.waiting) + self._incoming.qsize(), self.pool.num_used,
                     self.pool.usable, sc.preemptions, sc.prefix_queried, sc.prefix_hit, self._steps, self._host_s,
                     self._wait_s, self.gc_watch.total_s, self._idle_s)

    def _publish_metrics(self, force: bool) -> None:
        now = time.perf_counter()
        if not force and now - self._last_metrics < self.settings.metrics_interval_s:
            return
        self._last_metrics = now
        self.metrics.gauges(self.stats())

    # ---- synchronous helper ---------------------------------------------------------------------

    def generate(self, prompts: list[str], params: SamplingParams | list[SamplingParams],
                 stream: bool = False) -> list[dict]:
        """Run prompts to completion and return, per prompt, {"text", "finish_reason",
        "num_input_tokens", "num_output_tokens", "chunks", "ttft_s", "latency_s"}.
        Steps the engine in this thread unless the background loop is running."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        results = [dict(text="", chunks=[], finish_reason=None, error=None) for _ in prompts]
        done = threading.Event()
        remaining = [len(prompts)]
        lock = threading.Lock()

        def emitter(r, t0):
            def emit(o: Output):
                r["chunks"].append(o.text)
                r["text"] += o.text
                r.setdefault("ttft_s", time.perf_counter() - t0)
                if o.finished:
                    r.update(finish_reason=o.finish_reason, error=o.error, latency_s=time.perf_counter() - t0,
                             num_input_tokens=o.num_input_tokens, num_output_tokens=o.num_output_tokens)
                    with lock:
                        remaining[0] -= 1
                        if remaining[0] == 0:
                            done.set()
            return emit

        t0 = time.perf_counter()
        for prompt, p, r in zip(prompts, params, results):
            req = self.make_request(prompt, p, emitter(r, t0), stream=stream)
            req.bounded = False  # a batch job: all of it waits its turn
            self.submit(req)
        if self._thread is None:
            while not done.is_set():
                self.step()
        else:
            done.wait()
        return results
