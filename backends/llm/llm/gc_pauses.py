"""Garbage-collector pauses: the start-up heap frozen, and every collection timed.

A full collection walks every object the collector tracks, and every thread of the process stops
meanwhile (the engine's decode loop, the Triton stub's `execute` and the Sender thread). With a model
loaded (torch, transformers, inductor's compiled graphs) that is hundreds of thousands of objects:
0.44 M objects and 0.29 s per full collection for the tiny CPU model on this project's 2-core EPYC.
Nearly all of them live until the process ends, so `freeze()` moves what is alive when serving
starts into the permanent generation (vLLM does the same after its start-up): later collections
walk only what was made while serving. `GcWatch` times every collection and logs the long ones.
"""
from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)
# A collection longer than this is logged: it shows up as a stall in every stream's latency.
LONG_PAUSE_S = 0.05


class GcWatch:
    """gc.callbacks hook: total pause time, and a warning for each collection over `threshold_s`."""

    def __init__(self, threshold_s: float = LONG_PAUSE_S):
        self.threshold_s = threshold_s
        self.total_s = 0.0
        self.longest_s = 0.0
        self.collections = 0
        self._t0: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        if self._t0 is None:
            return
        dt, self._t0 = time.perf_counter() - self._t0, None
        self.collections += 1
        self.total_s += dt
        self.longest_s = max(self.longest_s, dt)
        if dt >= self.threshold_s:
            log.warning("garbage collection stopped every thread for %.3f s (generation %d, %d objects "
                        "collected, %d frozen)", dt, info.get("generation", -1), info.get("collected", 0),
                        gc.get_freeze_count())

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


def freeze_startup_heap() -> int:
    """Collect once, then move every surviving object to the permanent generation. -> objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
