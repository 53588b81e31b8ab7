"""Self-healing: watches every Python-backend stub of the Triton server behind the gateway and restarts
the model whose stub died or hung, while the other models keep serving.

Triton 2.51 never restarts a dead stub and keeps reporting the model ready, so this runs beside the
gateway (in its event loop) and:
- detects, every `supervise_interval_s`, a stub process that is gone, a zombie or stopped (/proc, the
  stubs of this server are those whose shm region starts with `stub_shm_prefix`), and, every
  `canary_interval_s`, a model whose canary request (a 1-token generation, a 1-text embedding) fails
  with "is not healthy" or misses `hang_timeout_s`;
- marks that model, and the ensembles that use it, not ready at once: the gateway answers 503 with
  Retry-After on them, on /v2/health/ready and on /health, and fails their requests in flight with a
  clear error instead of letting them hang (Triton never answers them);
- heals it: SIGKILL of its remaining stubs, then unload + load of just that model over Triton's
  model-control API (explicit mode, restricted to the admin token), then a canary before it is ready
  again (the dead stub's /dev/shm region is left to the launcher's stop: see _heal);
- counts restarts (`gateway_model_restarts_total{model,cause}`), logs each with its cause, and gives up
  after `max_restarts` within `restart_window_s`: the model then stays not ready rather than flapping.

When tritonserver itself goes away (the launcher restarts it: serve/stack.py), a heal that fails
meanwhile is not counted and waits for Triton; once Triton serves again (a new process, every model
loaded afresh) the supervisor starts over: new stub baselines, no restart history, and the models it
had marked down are reloaded and checked by their canaries.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from pathlib import Path

from prometheus_client import Counter, Gauge

from gateway.errors import APIError
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway.supervisor")
RESTARTS = Counter("gateway_model_restarts", "Model restarts by the supervisor", ["model", "cause"])
READY = Gauge("gateway_model_ready", "1 when the model serves, 0 while it restarts or after giving up", ["model"])
UNHEALTHY = "is not healthy"  # Triton's error for a request to a dead or stopped stub


def scan_stubs(prefix: str) -> dict[str, dict[int, tuple[str, str]]]:
    """{model: {pid: (state, shm region)}} of the stub processes whose shm region starts with `prefix`
    (state: the one-letter process state of /proc/<pid>/stat: R, S, T (stopped), Z (zombie), ...)."""
    found: dict[str, dict[int, tuple[str, str]]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if len(args) < 3 or not args[0].endswith(b"triton_python_backend_stub") or not args[2].startswith(prefix.encode()):
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        model = Path(args[1].decode(errors="replace")).parts[-3]  # <repo>/<model>/<version>/<file>
        found.setdefault(model, {})[int(proc.name)] = (state, args[2].decode())
    return found


class Supervisor:
    def __init__(self, s: GatewaySettings, triton):
        self.s, self.triton = s, triton
        self.baseline: dict[str, set[int]] = {}  # model -> stub pids seen while it was healthy
        self.restarts: dict[str, deque] = {}
        self.healing: set[str] = set()
        self.gave_up: set[str] = set()
        self.outages = 0  # Triton outages seen (Triton.outages): a new one means a new server process
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()

    async def _run(self) -> None:
        next_canary = 0.0
        while True:
            await asyncio.sleep(self.s.supervise_interval_s)
            if not (self.triton.ready and self.triton.discovered):
                continue
            if self.triton.outages != self.outages:
                self._start_over()
            try:
                found = await self._check_processes()
                if time.monotonic() >= next_canary:
                    next_canary = time.monotonic() + self.s.canary_interval_s
                    found += await self._check_canaries()
                if found and not await self.triton.reachable():
                    # tritonserver itself is gone (its stubs die with it): the launcher restarts it, and
                    # once the gateway sees it ready again the supervisor starts over.
                    log.warning("supervisor: triton unreachable; not restarting %s", sorted({m for m, _ in found}))
                    continue
                for model, cause in found:
                    self._heal_soon(model, cause)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception("supervisor check failed")

    def _start_over(self) -> None:
        """Triton serves again after an outage: a new process whose stubs are all new."""
        self.outages = self.triton.outages
        self.baseline.clear()
        self.restarts.clear()
        down = [m for m in self.triton.down if m not in self.healing and m not in self.triton.steps]
        self.gave_up.clear()
        log.warning("supervisor: triton serves again (outage %d): starting over; reloading %s",
                    self.outages, sorted(down) or "nothing")
        for model in down:
            self._heal_soon(model, "tritonserver restarted")

    # ---- detection -----------------------------------------------------------------------------

    async def _check_processes(self) -> list[tuple[str, str]]:
        """-> [(model, cause)] of the models whose stubs exited or stopped."""
        if not self.s.stub_shm_prefix:
            return []
        stubs = await asyncio.to_thread(scan_stubs, self.s.stub_shm_prefix)
        found = []
        for model, pids in stubs.items():
            if model in self.healing or model in self.gave_up:
                continue
            alive = {pid for pid, (state, _) in pids.items() if state not in ("Z", "X")}
            stopped = [pid for pid, (state, _) in pids.items() if state == "T"]
            known = self.baseline.setdefault(model, alive)
            if known - alive:
                found.append((model, "stub process exited"))
            elif stopped:
                found.append((model, "stub process stopped"))
            else:
                self.baseline[model] = known | alive
        for model in set(self.baseline) - set(stubs) - self.healing - self.gave_up:
            found.append((model, "stub process exited"))  # every stub of the model is gone
        return found

    async def _check_canaries(self) -> list[tuple[str, str]]:
        """-> [(model, cause)] of the models whose canary failed or hung (the stub's owner for a pipeline)."""
        found = []
        models = [m for m in (*self.triton.llms, *self.triton.embedders) if not self.triton.down.get(m)]
        results = await asyncio.gather(*(self._canary(m) for m in models), return_exceptions=True)
        for model, error in zip(models, results):
            if error is None:
                continue
            if isinstance(error, asyncio.TimeoutError):
                # A busy model's canary can wait in its queue: answers to other requests prove it alive.
                if time.monotonic() - self.triton.progress.get(model, 0.0) < self.s.hang_timeout_s:
                    continue
                cause = "hung (canary timed out)"
            else:
                cause = f"canary failed: {error}"
            if isinstance(error, APIError) and error.status == 503 and UNHEALTHY not in error.message:
                continue  # overloaded or restarting: not a crash
            found += [(owner, cause) for owner in self.owners(model, str(error))]
        return found

    async def _canary(self, model: str) -> None:
        await asyncio.wait_for(self.triton.canary(model), timeout=self.s.hang_timeout_s)

    def owners(self, model: str, message: str) -> list[str]:
        """The models to restart when `model`'s canary fails: the one named by Triton's message
        ("Stub process 'minilm_text_tokenize_0_0' is not healthy"), else the model and, for an
        ensemble, its steps that run Python stubs."""
        if UNHEALTHY in message and "'" in message:
            instance = message.split("'")[1]
            for name in self.triton.steps.get(model, [model]):
                if instance.startswith(name + "_"):
                    return [name]
        steps = self.triton.steps.get(model)
        return [m for m in steps if m in self.baseline] if steps else [model]

    # ---- healing -------------------------------------------------------------------------------

    def _heal_soon(self, model: str, cause: str) -> None:
        if model in self.healing or model in self.gave_up:
            return
        self.healing.add(model)
        self.triton.mark_down(model, f"model {model!r} is restarting ({cause})")
        READY.labels(model).set(0)
        asyncio.create_task(self._heal(model, cause))

    async def _heal(self, model: str, cause: str) -> None:
        history = self.restarts.setdefault(model, deque())
        now = time.monotonic()
        while history and now - history[0] > self.s.restart_window_s:
            history.popleft()
        if len(history) >= self.s.max_restarts:
            self.gave_up.add(model)
            self.healing.discard(model)
            self.triton.mark_down(model, f"model {model!r} failed {len(history)} times within "
                                         f"{self.s.restart_window_s:g} s and is not restarted again ({cause})")
            log.error("supervisor: %s: %s; gave up after %d restarts", model, cause, len(history))
            return
        history.append(now)
        RESTARTS.labels(model, cause.split(" (")[0].split(":")[0]).inc()
        log.warning("supervisor: restarting %s: %s", model, cause)
        t0 = time.monotonic()
        try:
            self._kill_stubs(model)
            await self.triton.reload(model)
            # The dead stub's /dev/shm region stays (Triton 2.51 leaks it) until the server stops and the
            # launcher removes this server's regions: unlinking it while Triton runs made Triton abort
            # (boost::interprocess::lock_exception) in our fault suite.
            for m in (model, *self.triton.dependents.get(model, ())):  # the model, then the ensembles using it
                await asyncio.wait_for(self.triton.canary(m), timeout=self.s.hang_timeout_s * 4)
        except Exception as e:  # noqa: BLE001 - try again (counted: a model that never heals is given up)
            log.error("supervisor: restarting %s failed: %s", model, e)
            await asyncio.sleep(self.s.supervise_interval_s)
            if not await self.triton.reachable():  # Triton itself is gone: not this model's failure
                history.pop()
                while not (await self.triton.reachable() and self.triton.ready):  # a new Triton serves
                    await asyncio.sleep(self.s.supervise_interval_s)
            self.healing.discard(model)
            self.baseline.pop(model, None)
            self._heal_soon(model, f"restart failed: {e}")
            return
        self.baseline.pop(model, None)  # the new stubs become the baseline at the next scan
        self.healing.discard(model)
        self.triton.mark_up(model)
        READY.labels(model).set(1)
        log.warning("supervisor: %s serves again after %.1f s", model, time.monotonic() - t0)

    def _kill_stubs(self, model: str) -> None:
        if not self.s.stub_shm_prefix:
            return
        for pid in scan_stubs(self.s.stub_shm_prefix).get(model, {}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
