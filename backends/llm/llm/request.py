"""What crosses the engine's boundary: a request, its responses, the fault-injection hook, and the
observability hooks (Metrics, Stats) that the Triton backend implements with pb_utils metrics."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llm.sampling import SamplingParams

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
OVERLOADED = "overloaded"  # refused at admission (waiting list full, or waited too long): retryable
# Fault injection, for tests only: "MARKER=error" or "MARKER=oom" makes the step that first computes
# a prompt containing MARKER raise for that request (RuntimeError / torch.OutOfMemoryError).
FAULT_ENV = "LLM_FAULT_INJECTION"
FAULTS = {"error": lambda: RuntimeError("injected fault"), "oom": lambda: torch.OutOfMemoryError("injected out of memory")}
# A first token later than this after arrival is logged with where the time went (queue, admission, prefill).
SLOW_FIRST_TOKEN_S = 1.0
ENGINE_ERROR = "internal engine error (see server log)"


@dataclass(slots=True)
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
    fault: str | None = None  # an injected fault (FAULT_ENV)
    bounded: bool = True  # subject to max_waiting / max_queue_time_s (not: batch jobs of generate())


@dataclass
class Stats:
    running: int
    waiting: int
    blocks_used: int
    blocks_total: int
    preemptions: int  # cumulative
    prefix_queried_tokens: int  # cumulative
    prefix_hit_tokens: int  # cumulative
    # Cumulative engine-loop timing (diagnoses host- vs device-bound steps, also through Triton):
    steps: int = 0
    host_s: float = 0.0  # in steps, not waiting for the device (Python work, and waits for the GIL)
    wait_s: float = 0.0  # waiting for the device's sampled tokens
    gc_pause_s: float = 0.0  # garbage-collector pauses since the engine started (every thread stops)
    device_idle_s: float = 0.0  # the device idle between consecutive steps, waiting for the host (CUDA)


class Metrics:
    """Engine observability hooks; the Triton model overrides them with pb_utils metrics."""

    def first_token(self, seconds: float) -> None: ...
    def step(self, seconds: float | None, tokens: int) -> None: ...  # time since the previous decode step (None: not an inter-token gap), new tokens
    def gauges(self, stats: Stats) -> None: ...
    # A request finished (called before its final response is emitted): flush counters now, so
    # that a client that has received the final response reads totals that include its tokens.
    def finished(self) -> None: ...


def parse_fault(spec: str) -> tuple[str, str] | None:
    if not spec:
        return None
    marker, _, kind = spec.rpartition("=")
    if not marker or kind not in FAULTS:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected MARKER=KIND with KIND in {sorted(FAULTS)}")
    return marker, kind
