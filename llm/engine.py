"""Continuous-batching engine: a scheduler loop over slots of a preallocated KV cache.

Every step: take new requests, drop cancelled ones, admit waiting requests into free slots,
prefill (batched, chunked to `prefill_chunk` tokens per step), then decode one token for every
running sequence. Requests join and leave the batch at every step. Results go out through each
request's `emit` callback (from the engine thread), so the engine knows nothing about Triton.

In-process use (benchmarks, tests):
    engine = Engine(EngineSettings(checkpoint=DIR), device="cuda")
    results = engine.generate(["Hello"] * 64, SamplingParams(max_tokens=256, ignore_eos=True))
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from llm.device import resolve, to_device
from llm.runner import ModelRunner
from llm.sampling import SamplingParams, make_generator, sample, validate
from llm.settings import EngineSettings

log = logging.getLogger(__name__)

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
OVERLOADED = "overloaded"  # refused at admission (waiting list full, or waited too long): retryable
# Fault injection, for tests only: "MARKER=error" or "MARKER=oom" makes every prefill batch holding a
# prompt that contains MARKER raise (RuntimeError / torch.OutOfMemoryError). Unset: no effect.
FAULT_ENV = "LLM_FAULT_INJECTION"
FAULTS = {"error": lambda: RuntimeError("injected fault"), "oom": lambda: torch.OutOfMemoryError("injected out of memory")}
# A first token later than this after arrival is logged with where the time went (queue, slot, prefill).
SLOW_FIRST_TOKEN_S = 1.0


@dataclass
class Output:
    """One response. Streaming: `text` is the new text since the previous response; otherwise the
    whole text in a single final response. Token counts are cumulative."""

    text: str
    finished: bool
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Output], None]
    stream: bool = True
    prefix_text: str = ""  # echoed prompt (exclude_input_in_output=false): starts the first response
    is_cancelled: Callable[[], bool] | None = None
    arrival: float = field(default_factory=time.perf_counter)  # TTFT counts from here
    fault: str | None = None  # an injected fault (FAULT_ENV), raised when its batch runs
    bounded: bool = True  # subject to max_waiting / max_queue_time_s (not: batch jobs of generate())


class Metrics:
    """Engine observability hooks; the Triton model overrides them with pb_utils metrics."""

    def first_token(self, seconds: float) -> None: ...
    def step(self, seconds: float | None, tokens: int) -> None: ...  # time since the previous decode step (None: a prefill or the first decode after idle), new tokens
    def gauges(self, running: int, waiting: int, kv_usage: float) -> None: ...
    # A request finished (called before its final response is emitted): flush counters now, so
    # that a client that has received the final response reads totals that include its tokens.
    def finished(self) -> None: ...


def _parse_fault(spec: str) -> tuple[str, str] | None:
    if not spec:
        return None
    marker, _, kind = spec.rpartition("=")
    if not marker or kind not in FAULTS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected MARKER=KIND with KIND in {sorted(FAULTS)}")
    return marker, kind


class _Seq:
    """A request's live state."""

    def __init__(self, req: Request, engine: "Engine"):
        self.req = req
        self.p = req.params
        self.slot: int | None = None
        self.num_prefilled = 0
        self.out_ids: list[int] = []
        self.text = ""  # detokenized output so far
        self.sent = 0  # chars of self.text already emitted
        self.prefix = req.prefix_text
        self.unsent_tokens = 0
        self.streamed = False  # a streaming response was sent: the first one goes out at once
        self.queued_at = time.perf_counter()  # taken from the engine's incoming queue
        self.admitted_at: float | None = None  # got a KV slot
        self.detok = engine._decode_stream()
        self.generator = None if self.p.greedy else make_generator(self.p.seed, engine.device)
        self.first_token_at: float | None = None
        self.done = False

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def num_tokens(self) -> int:  # tokens whose position is assigned (prompt + generated)
        return self.prompt_len + len(self.out_ids)


class Engine:
    def __init__(self, settings: EngineSettings, base_dir: str | Path | None = None,
                 device: str | torch.device = "cpu", metrics: Metrics | None = None):
        from transformers import AutoTokenizer, GenerationConfig

        self.settings = settings
        ckpt = Path(settings.checkpoint)
        if not ckpt.is_absolute() and base_dir is not None:
            ckpt = Path(base_dir) / ckpt
        self.checkpoint = ckpt
        self.device = resolve(device)
        self.runner = ModelRunner(settings, ckpt, self.device)
        self.max_context = self.runner.max_context
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
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []  # hold a slot: prefilling or decoding
        self._steps = 0
        self._pending = None  # (seqs, device tokens, host copy, ready event) of an unprocessed decode
        self._last_decode: float | None = None
        self._last_metrics = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._fault = _parse_fault(os.environ.get(FAULT_ENV, ""))

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
        assert self._thread is None, "engine already started"
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._drain()
        self._pending = None
        for seq in self.running + self.waiting:
            self._finish(seq, ERROR, error="engine stopped")
        self.running, self.waiting = [], []

    def _loop(self) -> None:
        if self.device.type == "cuda":  # a new thread starts on device 0: use the instance's GPU
            torch.cuda.set_device(self.device)
        while not self._stop.is_set():
            if not self.running and not self.waiting:
                try:  # idle: block instead of spinning
                    self._enqueue(_Seq(self._incoming.get(timeout=0.1), self))
                except queue.Empty:
                    self._publish_metrics(force=False)
                    continue
            try:
                self.step()
            except Exception:  # never let the loop die: fail what is in flight, keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                for seq in list(self.running):
                    self._finish(seq, ERROR, error="internal engine error (see server log)")

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or not self._incoming.empty())

    # ---- one scheduler step ---------------------------------------------------------------------

    def step(self) -> None:
        self._drain()
        self._steps += 1
        if self._steps % self.settings.cancel_check_interval == 0:
            for seq in self.waiting + self.running:
                if seq.req.is_cancelled is not None and seq.req.is_cancelled():
                    self._finish(seq, CANCELLED)
        self._admit()
        prefilling = [s for s in self.running if s.num_prefilled < s.prompt_len]
        if prefilling:
            self._run_batch(self._prefill, prefilling)
        self._decode_step()
        self._publish_metrics(force=False)

    def _drain(self) -> None:
        while True:
            try:
                self._enqueue(_Seq(self._incoming.get_nowait(), self))
            except queue.Empty:
                break
        limit = self.settings.max_queue_time_s
        now = time.perf_counter()
        for seq in [s for s in self.waiting if s.req.bounded and now - s.req.arrival > limit]:
            self._finish(seq, OVERLOADED, error=f"overloaded: waited {limit:g} s for a free KV-cache slot "
                                                "(max_queue_time_s); retry later")

    def _enqueue(self, seq: _Seq) -> None:
        """Into the waiting list, or refused at once when it is full (bounded admission)."""
        limit = self.settings.waiting_limit
        if seq.req.bounded and len(self.waiting) - self.runner.cache.num_free >= limit:  # free slots admit now
            self._finish(seq, OVERLOADED, error=f"overloaded: {limit} requests already wait for a KV-cache slot "
                                                "(max_waiting); retry later")
        else:
            self.waiting.append(seq)

    def _admit(self) -> None:
        while self.waiting and self.runner.cache.num_free:
            seq = self.waiting.pop(0)
            seq.slot = self.runner.cache.allocate()
            seq.admitted_at = time.perf_counter()
            self.running.append(seq)

    def _run_batch(self, fn, seqs: list[_Seq]) -> None:
        try:
            fn(seqs)
        except Exception:  # a failing batch fails its own requests only
            log.error("batch failed:\n%s", traceback.format_exc())
            for seq in seqs:
                if not seq.done:
                    self._finish(seq, ERROR, error="internal engine error (see server log)")

    def _prefill(self, seqs: list[_Seq]) -> None:
        for seq in seqs:
            if seq.req.fault:
                raise FAULTS[seq.req.fault]()
        s = self.settings
        budget = s.prefill_chunk
        chunks = []  # (seq, start, length)
        for seq in seqs[: s.max_prefill_batch]:
            n = min(seq.prompt_len - seq.num_prefilled, budget)
            if n <= 0:
                break
            chunks.append((seq, seq.num_prefilled, n))
            budget -= n
        T = max(n for _, _, n in chunks)
        pad = self.max_context - 1
        tokens = torch.zeros(len(chunks), T, dtype=torch.long)
        pos = torch.full((len(chunks), T), pad, dtype=torch.long)
        for b, (seq, start, n) in enumerate(chunks):
            tokens[b, :n] = torch.tensor(seq.req.prompt_ids[start : start + n])
            pos[b, :n] = torch.arange(start, start + n)
        rows = torch.tensor([seq.slot for seq, _, _ in chunks])
        last = torch.tensor([n - 1 for _, _, n in chunks])
        logits = self.runner.prefill(tokens, pos, rows, last)
        done = []
        for b, (seq, start, n) in enumerate(chunks):
            seq.num_prefilled = start + n
            if seq.num_prefilled == seq.prompt_len:
                done.append(b)
        if done:
            self.metrics.step(None, len(done))  # first tokens: counted (before a finish flushes), not an ITL
            self._sample_and_append(logits[to_device(done, logits.device)], [chunks[b][0] for b in done])

    def _decode_step(self) -> None:
        """Launch the next decode, then read and process the previous one's tokens.

        With `overlap`, decode N+1 is launched before the tokens of decode N are copied to the host:
        rows that continue take their input token straight from N's device tensor, so the GPU runs
        step N+1 while Python detokenizes, checks stops and sends step N's responses. Rows that
        turn out to have finished at N just waste their N+1 row. Without `overlap`, each decode is
        launched and processed in the same step."""
        pending, self._pending = self._pending, None
        launched = None
        in_flight = {}  # seq -> row of `pending` for sequences whose last token is still on the device
        if pending is not None:
            in_flight = {seq: i for i, seq in enumerate(pending[0]) if not seq.done}
        launch = []
        for seq in self.running:
            if seq.done or seq.num_prefilled < seq.prompt_len or not (seq.out_ids or seq in in_flight):
                continue
            extra = 1 if seq in in_flight else 0  # the in-flight token is not in out_ids yet
            if len(seq.out_ids) + extra < seq.p.max_tokens and seq.num_tokens + extra < self.max_context:
                launch.append(seq)  # else it finishes when its in-flight token is processed
        if launch:
            try:
                launched = (launch, *self._launch_decode(launch, in_flight, pending))
            except Exception:  # a failing batch fails its own requests only
                log.error("decode failed:\n%s", traceback.format_exc())
                for seq in launch:
                    self._finish(seq, ERROR, error="internal engine error (see server log)")
        if pending is not None:
            self._process(*pending)
        if launched is None:
            self._last_decode = None  # idle time is not an inter-token latency
        elif self.settings.overlap:
            self._pending = launched
        else:
            self._process(*launched)

    def _launch_decode(self, seqs: list[_Seq], in_flight: dict, pending) -> tuple:
        """Run one decode step for seqs and sample on the device. Returns (next tokens [len(seqs)]
        on the device, their host copy (being filled), the CUDA event that marks it ready or None)."""
        B = max(seq.slot for seq in seqs) + 1
        tokens, pos = [0] * B, [self.max_context - 1] * B  # idle rows: a harmless padding position
        dev_rows, dev_src, counts = [], [], []
        for seq in seqs:
            if seq in in_flight:  # its input token is on the device, at position num_tokens
                dev_rows.append(seq.slot)
                dev_src.append(in_flight[seq])
                pos[seq.slot] = seq.num_tokens
                counts.append(len(seq.out_ids) + 1)
            else:
                tokens[seq.slot] = seq.out_ids[-1]
                pos[seq.slot] = seq.num_tokens - 1
                counts.append(len(seq.out_ids))
        # Every host->device copy is queued before the step runs (llm/device.py): nothing below
        # may wait for the device, or the overlap with the previous step's host work is lost.
        dev = self.device
        device_tokens = None
        if dev_rows:
            device_tokens = (to_device(dev_rows, dev), pending[1][to_device(dev_src, dev)])
        rows = to_device([seq.slot for seq in seqs], dev)
        logits = self.runner.decode(torch.tensor(tokens), torch.tensor(pos), max(pos[s.slot] for s in seqs), device_tokens)
        next_tokens = self._sample(logits[rows], seqs, counts)
        if next_tokens.device.type != "cuda":
            return next_tokens, next_tokens, None
        # Start the copy to the host now, and wait later for this event only: a plain .cpu() at
        # processing time would also wait for the decode launched after this one.
        host = torch.empty(next_tokens.shape, dtype=next_tokens.dtype, pin_memory=True)
        host.copy_(next_tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return next_tokens, host, ready

    def _process(self, seqs: list[_Seq], next_tokens: torch.Tensor, host: torch.Tensor, ready) -> None:
        """Host side of a decode step: append each live sequence's token (finishes, stops, sends)."""
        if ready is not None:
            ready.synchronize()  # releases the GIL while waiting
        ids = host.tolist()
        now = time.perf_counter()
        live = [(seq, tok) for seq, tok in zip(seqs, ids) if not seq.done]
        # Every token is counted; only steps that follow a decode step are an inter-token latency.
        self.metrics.step(None if self._last_decode is None else now - self._last_decode, len(live))
        self._last_decode = now
        for seq, tok in live:
            self._append_safely(seq, tok, now)

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq], counts: list[int]) -> torch.Tensor:
        """Next tokens [len(seqs)] on the device; counts[i] = tokens seqs[i] has generated so far."""
        # min_tokens: EOS cannot be chosen before min_tokens tokens (unless EOS is ignored anyway).
        early = [i for i, (seq, n) in enumerate(zip(seqs, counts)) if n < seq.p.min_tokens and not seq.p.ignore_eos]
        if early and self.eos_ids:
            dev = logits.device
            logits[to_device(early, dev)[:, None], to_device(self.eos_ids, dev)] = float("-inf")
        return sample(logits, [seq.p for seq in seqs], [seq.generator for seq in seqs])

    def _sample_and_append(self, logits: torch.Tensor, seqs: list[_Seq]) -> None:
        next_ids = _to_host(self._sample(logits, seqs, [len(seq.out_ids) for seq in seqs]))
        now = time.perf_counter()
        for seq, tok in zip(seqs, next_ids):
            self._append_safely(seq, tok, now)

    def _append_safely(self, seq: _Seq, tok: int, now: float) -> None:
        try:
            self._append(seq, tok, now)
        except Exception:
            log.error("request failed:\n%s", traceback.format_exc())
            self._finish(seq, ERROR, error="internal error while producing output (see server log)")

    def _append(self, seq: _Seq, tok: int, now: float) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = now
            ttft = now - seq.req.arrival
            self.metrics.first_token(ttft)
            if ttft > SLOW_FIRST_TOKEN_S:  # where did the time go?
                log.warning("slow first token: %.3f s after arrival = %.3f s until the engine took it, "
                            "%.3f s waiting for a KV slot, %.3f s in prefill (prompt %d tokens, %d running, "
                            "%d waiting)", ttft, seq.queued_at - seq.req.arrival,
                            (seq.admitted_at or now) - seq.queued_at, now - (seq.admitted_at or now),
                            seq.prompt_len, len(self.running), len(self.waiting))
        seq.out_ids.append(tok)
        seq.unsent_tokens += 1
        p = seq.p
        n_out = len(seq.out_ids)
        if tok in self.eos_ids and not p.ignore_eos:
            return self._finish(seq, STOP)
        piece = seq.detok(tok)
        if piece:
            seq.text += piece
        if p.stop and n_out >= p.min_tokens:
            # A stop word may span tokens: search the text not yet sent plus a margin.
            longest = max(len(w) for w in p.stop)
            lo = max(0, seq.sent - longest)
            hits = [i for i in (seq.text.find(w, lo) for w in p.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                return self._finish(seq, STOP, flush=False)
        if n_out >= p.max_tokens or seq.num_tokens >= self.max_context:
            return self._finish(seq, LENGTH)
        # The first streamed response goes out as soon as there is text (TTFT), later ones
        # every `stream_interval` tokens.
        if seq.req.stream and (seq.unsent_tokens >= self.settings.stream_interval or not seq.streamed):
            end = len(seq.text) - _held_back(seq.text, p.stop)
            if end > seq.sent or seq.prefix:
                self._emit(seq, seq.prefix + seq.text[seq.sent : end], None)
                seq.prefix, seq.sent, seq.unsent_tokens, seq.streamed = "", end, 0, True

    def _finish(self, seq: _Seq, reason: str, error: str | None = None, flush: bool = True) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.slot is not None:
            self.runner.cache.free(seq.slot)
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        if error is None and reason != CANCELLED:
            if flush:  # incomplete characters held back by the detokenizer
                seq.text += seq.detok.flush()
            text = seq.prefix + seq.text[seq.sent :]
        else:
            text = ""
        self.metrics.finished()
        self._emit(seq, text, reason, error)

    def _emit(self, seq: _Seq, text: str, reason: str | None, error: str | None = None) -> None:
        out = Output(text, reason is not None, reason, seq.prompt_len, len(seq.out_ids), error)
        try:
            seq.req.emit(out)
        except Exception:  # e.g. the client went away: treat as cancelled
            log.warning("emit failed, cancelling the request:\n%s", traceback.format_exc())
            if not seq.done:
                self._finish(seq, CANCELLED)

    def _decode_stream(self):
        return _Detokenizer(self.tokenizer)

    # ---- metrics --------------------------------------------------------------------------------

    def _publish_metrics(self, force: bool) -> None:
        now = time.perf_counter()
        if not force and now - self._last_metrics < self.settings.metrics_interval_s:
            return
        self._last_metrics = now
        used = sum(seq.num_tokens for seq in self.running)
        capacity = self.runner.num_slots * self.max_context
        self.metrics.gauges(len(self.running), len(self.waiting) + self._incoming.qsize(), used / capacity)

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


def _to_host(t: torch.Tensor) -> list:
    """A small device tensor as a list. On CUDA, wait on an event (which releases the GIL, so other
    threads, e.g. Triton's execute() handing in new requests, run meanwhile), then copy."""
    if t.device.type != "cuda":
        return t.tolist()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    ready.synchronize()
    return host.tolist()


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop word (not sent yet)."""
    best = 0
    for w in stops:
        for k in range(min(len(w) - 1, len(text)), best, -1):
            if text.endswith(w[:k]):
                best = k
                break
    return best


class _Detokenizer:
    """Incremental detokenization: the new text of each token, holding back incomplete characters,
    so that the pieces plus flush() equal tokenizer.decode(all ids, skip_special_tokens=True).
    Uses tokenizers' DecodeStream (one Rust call per token) when the tokenizer is a fast one."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # chars returned so far
        self.stream = None
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is not None:
            try:
                from tokenizers.decoders import DecodeStream

                self.stream, self.backend = DecodeStream(skip_special_tokens=True), backend
            except ImportError:
                pass
        self.prefix = 0  # fallback: ids[prefix:read] decode to text already returned
        self.read = 0

    def __call__(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.stream is not None:
            piece = self.stream.step(self.backend, token_id) or ""
        else:
            before = self.tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
            after = self.tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
            piece = ""
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.prefix, self.read = self.read, len(self.ids)
                piece = after[len(before) :]
        self.emitted += len(piece)
        return piece

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end), once, at the finish."""
        rest = self.tok.decode(self.ids, skip_special_tokens=True)[self.emitted :]
        self.emitted += len(rest)
        return rest
