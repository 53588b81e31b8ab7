"""Python-based backend `llm` (decoupled): validates and enqueues requests; the engine thread streams.

The engine lives once, here: backends/llm/model.py and its package backends/llm/llm/ (the stub puts
this directory on sys.path). Triton finds it as the backend named in a model's config
(`backend: "llm"`): `make serve` links it into its --backend-directory; the NGC container copies it
to /opt/tritonserver/backends/llm/. A model directory holds only config.pbtxt and 1/checkpoint/.
Engine settings come from the config's `parameters` (llm/settings.py). I/O contract: export/specs.py
LLM_IO, docs/llm.md.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import queue
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from llm.engine import OVERLOADED, Engine, Metrics, Output, Stats
from llm.sampling import SamplingParams
from llm.settings import EngineSettings

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Histogram buckets (seconds): TTFT spans ms..s; inter-token latency sub-ms..100s of ms.
TTFT_BUCKETS = [0.005, 0.01, 0.015, 0.02, 0.05, 0.08, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
ITL_BUCKETS = [0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
# How often the sender thread polls request.is_cancelled() of the live requests (one IPC each).
CANCEL_POLL_S = 0.05

log = logging.getLogger(__name__)


CLOSE_TIMEOUT_S = 5.0
# A Sender call (response send, metric update, cancellation poll) queued and run for longer than this
# is logged: the responses queued behind it reach their clients that much later.
SLOW_SEND_S = 0.25
FINALIZE_DUMP_S = 4.0


class _Optional:
    """A posted call that may be dropped at shutdown (a metric update)."""

    def __init__(self, fn):
        self.fn = fn


class Sender:
    """The one thread that talks to the server process: every pb_utils call that is an IPC round
    trip (response sends, metric updates, cancellation polls) runs here, in submission order, so
    the engine thread never waits on IPC. One FIFO queue keeps each request's responses in order,
    and a counter flush posted before a final response reaches the server before that response."""

    def __init__(self):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._closing = False
        self._live: dict[int, tuple] = {}  # key -> (triton request, state list); touched on this thread only
        self._thread = threading.Thread(target=self._loop, name="llm-sender", daemon=True)
        self._thread.start()

    def post(self, fn, essential: bool = True) -> None:
        """essential=False (metric updates): dropped once close() has begun."""
        self._q.put((time.perf_counter(), fn if essential else _Optional(fn)))

    def track(self, key: int, request, state: list) -> None:
        """Poll request.is_cancelled() here every CANCEL_POLL_S until untrack(key); state[0] = the flag."""
        self.post(lambda: self._live.__setitem__(key, (request, state)))

    def untrack(self, key: int) -> None:
        """On the Sender thread only (in the call that sends the final response)."""
        self._live.pop(key, None)

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._closing = True
        self._q.put((time.perf_counter(), None))
        # Bounded: an IPC call the server no longer answers while it unloads the model must not keep
        # finalize() (and so the server's shutdown) waiting; the thread is a daemon.
        self._thread.join(timeout=CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.error("sender: still in an IPC call %.0f s after close; leaving it", CLOSE_TIMEOUT_S)

    def _loop(self) -> None:
        next_poll = time.monotonic() + CANCEL_POLL_S
        while True:
            try:
                posted, fn = self._q.get(timeout=max(0.0, next_poll - time.monotonic()))
            except queue.Empty:
                posted, fn = None, False
            if fn is None:
                return
            if isinstance(fn, _Optional):
                fn = False if self._closing else fn.fn
            if fn:
                t0 = time.perf_counter()
                try:
                    fn()
                except Exception:  # noqa: BLE001 - one failed call must not stop the others
                    log.error("sender: %s", traceback.format_exc())
                self._check_lag("call", posted, t0)
            fn = None  # hold no response (and so no request) while waiting for the next call
            if time.monotonic() >= next_poll and not self._closing:
                t0 = time.perf_counter()
                for request, state in list(self._live.values()):
                    try:
                        state[0] = state[0] or request.is_cancelled()
                    except Exception:  # noqa: BLE001 - the request is gone: cancel it
                        state[0] = True
                self._check_lag("cancellation poll", t0, t0)
                next_poll = time.monotonic() + CANCEL_POLL_S

    def _check_lag(self, what: str, posted: float, started: float) -> None:
        """Log a call that waited or ran long: every response behind it was delayed as long."""
        now = time.perf_counter()
        if now - posted > SLOW_SEND_S:
            log.warning("sender: a %s waited %.3f s in the queue and ran %.3f s (%d calls queued behind it)",
                        what, started - posted, now - started, self._q.qsize())


class TritonMetrics(Metrics):
    """Engine metrics as Triton custom metrics (served on the metrics port with Triton's own). Every
    metric call is an IPC, so they are posted to the Sender thread."""

    def __init__(self, labels: dict[str, str], sender: Sender):
        self.post = lambda fn: sender.post(fn, essential=False)
        F = pb_utils.MetricFamily
        self.families = [
            F("llm_time_to_first_token_seconds", "Time from request arrival to its first generated token", F.HISTOGRAM),
            F("llm_inter_token_latency_seconds", "Time between consecutive decode steps (each running request gets one token per step)", F.HISTOGRAM),
            F("llm_generated_tokens_total", "Generated tokens", F.COUNTER),
            F("llm_requests_running", "Requests being computed (holding KV blocks)", F.GAUGE),
            F("llm_requests_waiting", "Requests waiting to be scheduled", F.GAUGE),
            F("llm_kv_cache_usage_ratio", "KV-cache blocks in use / blocks in the pool", F.GAUGE),
            F("llm_kv_blocks_used", "KV-cache blocks in use", F.GAUGE),
            F("llm_kv_blocks_free", "KV-cache blocks free (cached prefix blocks included)", F.GAUGE),
            F("llm_preemptions_total", "Sequences preempted for lack of KV blocks (recomputed later)", F.COUNTER),
            F("llm_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache", F.COUNTER),
            F("llm_prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix cache (not recomputed)", F.COUNTER),
            F("llm_engine_steps_total", "Engine steps (one forward over the scheduled batch each)", F.COUNTER),
            F("llm_engine_host_seconds_total", "Engine-thread time in steps not spent waiting for the device (Python work and GIL waits)", F.COUNTER),
            F("llm_engine_device_wait_seconds_total", "Engine-thread time spent waiting for the device's sampled tokens", F.COUNTER),
            F("llm_gc_pause_seconds_total", "Garbage-collector pauses in the model process (every thread stops)", F.COUNTER),
            F("llm_engine_device_idle_seconds_total", "GPU time idle between consecutive engine steps, waiting for the "
              "host to launch the next one (the host's share of the critical path)", F.COUNTER),
        ]
        ttft, itl, tokens, *gauges, preempt, queried, hit, steps, host, wait, gc_pause, idle = self.families
        self.ttft = ttft.Metric(labels=labels, buckets=TTFT_BUCKETS)
        self.itl = itl.Metric(labels=labels, buckets=ITL_BUCKETS)
        self.tokens = tokens.Metric(labels=labels)
        self.gauge_metrics = [f.Metric(labels=labels) for f in gauges]  # running, waiting, usage, used, free
        self.counters = [f.Metric(labels=labels) for f in (preempt, queried, hit, steps, host, wait, gc_pause, idle)]
        self._pending_tokens = 0
        self._last: tuple | None = None
        self._counted = (0,) * len(self.counters)

    def close(self) -> None:
        # Metric objects must be released before their families (pb_utils requirement).
        del self.ttft, self.itl, self.tokens
        self.gauge_metrics.clear()
        self.counters.clear()
        self.families.clear()

    def first_token(self, seconds: float) -> None:
        self.post(lambda: self.ttft.observe(seconds))

    def step(self, seconds: float | None, tokens: int) -> None:
        if tokens and seconds is not None:
            self.post(lambda: self.itl.observe(seconds))
        self._pending_tokens += tokens

    def finished(self) -> None:
        self._flush_tokens()

    def _flush_tokens(self) -> None:
        if self._pending_tokens:
            n, self._pending_tokens = self._pending_tokens, 0
            self.post(lambda: self.tokens.increment(n))

    def gauges(self, st: Stats) -> None:
        # Called at most every metrics_interval_s (and when idle).
        self._flush_tokens()
        values = (st.running, st.waiting, round(st.blocks_used / st.blocks_total, 4), st.blocks_used,
                  st.blocks_total - st.blocks_used)
        if values != self._last:
            self._last = values
            self.post(lambda: [m.set(v) for m, v in zip(self.gauge_metrics, values)])
        counted = (st.preemptions, st.prefix_queried_tokens, st.prefix_hit_tokens, st.steps, st.host_s, st.wait_s,
                   st.gc_pause_s, st.device_idle_s)
        deltas = [now - before for now, before in zip(counted, self._counted)]
        if any(deltas):
            self._counted = counted
            self.post(lambda: [m.increment(d) for m, d in zip(self.counters, deltas) if d])


def _scalar(request, name: str, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return default
    a = t.as_numpy().reshape(-1)
    if a.size != 1:
        raise ValueError(f"{name}: expected one value, got {a.size}")
    return a[0].item()


def _strings(request, name: str) -> list[str]:
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in t.as_numpy().reshape(-1)]


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        cfg = json.loads(args["model_config"])
        assert cfg.get("model_transaction_policy", {}).get("decoupled"), "this model must be decoupled"
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        settings = EngineSettings.from_parameters(params)
        gpu = args["model_instance_kind"] == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        base_dir = Path(args["model_repository"]) / args["model_version"]
        self.batched = cfg.get("max_batch_size", 0) > 0  # outputs then carry a leading batch dim of 1
        self.input_names = {i["name"] for i in cfg["input"]}
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.sender = Sender()
        self.metrics = TritonMetrics(labels, self.sender)
        logging.basicConfig(level=logging.INFO)
        try:
            self.engine = Engine(settings, base_dir, device, self.metrics)
        except ImportError as e:
            if "undefined symbol" not in str(e):
                raise
            # The stub embedded a libpython other than the one the model environment's modules
            # were built for (e.g. the system's instead of the venv interpreter's).
            raise pb_utils.TritonModelException(
                f"{e}: the Python stub loaded a different libpython than `python3` on PATH; put that "
                "interpreter's sysconfig LIBDIR first on LD_LIBRARY_PATH when starting tritonserver") from e
        self.engine.start()
        self.logger.log_info(f"{args['model_name']}: engine on {device}, KV pool {self.engine.pool.usable} blocks x "
                             f"{settings.block_size} tokens, max_context {self.engine.max_context}, settings {settings}")

    def execute(self, requests):
        arrival = time.perf_counter()
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.engine.submit(self._make_request(request, sender, arrival))
            except ValueError as e:
                err = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=err), flags=FINAL)
            except Exception as e:  # noqa: BLE001 - this request fails, the model keeps serving
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(repr(e))), flags=FINAL)
        return None

    def _make_request(self, request, sender, arrival: float):
        texts = _strings(request, "text_input")
        if len(texts) != 1:
            raise ValueError(f"text_input: expected one string, got {len(texts)}")
        s = self.engine.settings
        seed = _scalar(request, "seed", None)
        if seed is None and "random_seed" in self.input_names:
            seed = _scalar(request, "random_seed", None)  # the name TRT-LLM and the OpenAI frontend use
        params = SamplingParams(
            max_tokens=int(_scalar(request, "max_tokens", s.default_max_tokens)),
            temperature=float(_scalar(request, "temperature", 0.0)),
            top_k=int(_scalar(request, "top_k", 0)),
            top_p=float(_scalar(request, "top_p", 1.0)),
            seed=None if seed is None else int(seed),
            stop=tuple(w for w in _strings(request, "stop_words") if w),
            ignore_eos=bool(_scalar(request, "ignore_eos", False)),
            min_tokens=int(_scalar(request, "min_tokens", 0)),
        )
        stream = bool(_scalar(request, "stream", False))
        echo = not bool(_scalar(request, "exclude_input_in_output", True))
        want_in = bool(_scalar(request, "return_num_input_tokens", False))
        want_out = bool(_scalar(request, "return_num_output_tokens", False))
        # Cancellation: the Sender thread polls request.is_cancelled() (an IPC) and sets the flag;
        # the engine reads only the flag. A failed send also sets it (the client went away).
        state = [False, False]  # [cancelled, a send failed]
        emit = self._emitter(sender, want_in, want_out, state)
        req = self.engine.make_request(texts[0], params, emit, stream=stream, echo=echo,
                                       is_cancelled=lambda: state[0], arrival=arrival)
        self.sender.track(id(state), request, state)  # same key as the emitter's
        return req

    def _emitter(self, sender, want_in: bool, want_out: bool, state: list):
        shape = (1, 1) if self.batched else (1,)
        post, untrack = self.sender.post, self.sender.untrack
        key = id(state)

        def tensor(name, values, dtype):
            return pb_utils.Tensor(name, np.array(values, dtype=dtype).reshape(shape))

        def send(o: Output) -> None:  # on the Sender thread
            if o.error is not None:
                # Overload is retryable: UNAVAILABLE (HTTP 503), not the default INTERNAL.
                code = pb_utils.TritonError.UNAVAILABLE if o.finish_reason == OVERLOADED else pb_utils.TritonError.INTERNAL
                response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(o.error, code))
            else:
                outs = [tensor("text_output", [o.text.encode("utf-8")], np.object_)]
                if o.finished:
                    outs.append(tensor("finish_reason", [o.finish_reason.encode()], np.object_))
                if want_in:
                    outs.append(tensor("num_input_tokens", [o.num_input_tokens], np.int32))
                if want_out:
                    outs.append(tensor("num_output_tokens", [o.num_output_tokens], np.int32))
                response = pb_utils.InferenceResponse(output_tensors=outs)
            if o.finished:
                untrack(key)  # before the send: no cancellation poll of a completed request
            if not o.finished and (state[0] or state[1]):
                return  # the client is gone, or cancelled: only the final response is still sent
            try:
                # The final response is sent even after a failed send: until it is, Triton holds the
                # request, and a model holding one never unloads (a stop then runs into exit-timeout).
                sender.send(response, flags=FINAL if o.finished else 0)
            except Exception:  # the client went away: the engine cancels the request at its next check
                state[0] = state[1] = True
                if not o.finished:
                    raise

        def emit(o: Output) -> None:  # on the engine thread: queue it, never wait
            post(lambda: send(o))

        return emit

    def finalize(self):
        # A finalize slower than this writes every thread's stack to the server log (shutdown hangs).
        faulthandler.dump_traceback_later(FINALIZE_DUMP_S, exit=False)
        t0 = time.perf_counter()
        log.info("finalize: stopping the engine")
        self.engine.stop()  # joins the engine thread (final responses of what was in flight are queued)
        t1 = time.perf_counter()
        self.sender.close()  # sends them; nothing uses the metrics after this
        self.metrics.close()
        faulthandler.cancel_dump_traceback_later()
        log.info("finalize: engine stopped in %.2f s, responses sent in %.2f s", t1 - t0, time.perf_counter() - t1)
