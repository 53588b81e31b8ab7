"""What `make serve` runs: tritonserver and the gateway in front of it, started, watched and stopped
together.

Library: `with ServingStack(ServerOptions(...), GatewaySettings(...)) as stack:` (tests, benchmarks).
`serve_forever()` is the CLI body of `python -m serve.launcher`.

Ports (defaults): the gateway on 8000 is the only HTTP surface (OpenAI + KServe v2); Triton's gRPC on
8001 and metrics on 8002 stay for in-host clients; Triton's own HTTP moves to 8003, internal (the
gateway forwards to it; Triton 2.51's HTTP server must never face untrusted clients).
"""
from __future__ import annotations

import os
import select
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import fields
from pathlib import Path

from gateway import settings as gateway_settings
from gateway.settings import GatewaySettings
from serve import paths
from serve.environment import SetupError
from serve.launcher import ADMIN_TOKEN_ENV, SERVER_RESTART_WINDOW_S, ServerOptions, Started, TritonServer, log_tail
from serve.ports import port_is_free, refuse_equal_ports

# tritonserver exiting on its own (Triton 2.51's Python backend can abort the whole server, e.g.
# boost::interprocess::lock_exception when a stub dies holding a shared-memory lock) is restarted by
# the stack: checked this often, at most ServerOptions.max_server_restarts times within the window.
SERVER_WATCH_INTERVAL_S = 0.5
# Gateway settings the stack wires from the server's options (never taken from flags here).
WIRED = ("host", "triton_grpc_url", "triton_http_url", "model_repository", "admin_token", "stub_shm_prefix")
SECRET_ENV = {"api_keys": "GATEWAY_API_KEYS"}  # passed by environment, never on a command line


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while starting."""


class Signals:
    """SIGINT/SIGTERM without locks in a handler: the Python handler does nothing; the interpreter's
    C-level handler writes the signal number to a pipe (set_wakeup_fd) that the main thread reads.
    (A handler that sets a threading.Event takes its lock and can deadlock the thread it interrupted
    inside Event.wait().)"""

    WATCHED = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old = {s: signal.signal(s, lambda *_: None) for s in self.WATCHED}
        self.received: int | None = None

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to timeout_s; True once SIGINT/SIGTERM has arrived."""
        if self.received is None and select.select([self._r], [], [], timeout_s)[0]:
            for b in os.read(self._r, 256):
                if b in self.WATCHED:
                    self.received = b
        return self.received is not None

    def sleep_or_raise(self, timeout_s: float) -> None:
        if self.wait(timeout_s):
            raise Interrupted(signal.Signals(self.received).name)

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        for s, h in self._old.items():
            signal.signal(s, h)
        os.close(self._r)
        os.close(self._w)


def gateway_argv(s: GatewaySettings) -> list[str]:
    """Flags for `python -m gateway` that reproduce `s` (secrets excluded: see gateway_env)."""
    argv, default = [], GatewaySettings()
    for f in fields(GatewaySettings):
        value = getattr(s, f.name)
        if f.name in SECRET_ENV or f.name == "admin_token" or value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


class GatewayProcess:
    """`python -m gateway` as a child process in its own session."""

    def __init__(self, settings: GatewaySettings, log_path: Path):
        self.settings, self.log_path = settings, log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> "GatewayProcess":
        env = dict(os.environ)
        env[ADMIN_TOKEN_ENV] = self.settings.admin_token or ""
        for name, var in SECRET_ENV.items():
            env[var] = ",".join(getattr(self.settings, name))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gateway", *gateway_argv(self.settings)],
                                            cwd=paths.REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def wait_ready(self, timeout_s: float = 60.0, sleep=time.sleep) -> "GatewayProcess":
        """Until /health answers 200; SetupError with the log tail if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SetupError(f"the gateway did not start (log {self.log_path}):\n{self.log_tail()}")
            sleep(0.1)
        return self

    def is_ready(self) -> bool:
        ctx = ssl._create_unverified_context() if self.settings.tls else None  # our own cert, on loopback
        try:
            with urllib.request.urlopen(f"{self.settings.url}/health", timeout=2, context=ctx) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> int | None:
        """SIGTERM: the gateway drains (new requests 503, in-flight ones go on for up to
        shutdown_timeout_s, then end with an error) and exits; SIGKILL if it has not 5 s later."""
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=self.settings.shutdown_timeout_s + 5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode


class ServingStack(Started):
    """tritonserver + the gateway. `with ServingStack(opts) as stack:` starts both and waits for both."""

    def __init__(self, options: ServerOptions | None = None, gateway: GatewaySettings | None = None):
        self.server = TritonServer(options)
        o = self.server.options
        gateway = gateway or gateway_settings.from_env()
        self.gateway = GatewayProcess(gateway.replace(
            host=o.host, triton_grpc_url=self.server.grpc_url, triton_http_url=self.server.http_url,
            model_repository=Path(o.model_repository), admin_token=self.server.admin_token,
            stub_shm_prefix=self.server.shm_prefix,
            # The gateway stops first and ends what is still in flight by then, so Triton's own stop
            # has nothing left to wait for: the whole stop stays within exit_timeout_secs + 5 s.
            shutdown_timeout_s=min(gateway.shutdown_timeout_s, max(o.exit_timeout_secs, 1))),
            Path(self.server.log_path).with_name(f"gateway-{gateway.port}.log"))
        self.server_restarts = 0  # by the watcher, since start
        self.server_gave_up: str | None = None  # why the watcher stopped restarting tritonserver
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    # ---- endpoints: HTTP is the gateway's; the rest is Triton's
    @property
    def http_url(self) -> str:
        return f"{self.gateway.settings.host}:{self.gateway.settings.port}"

    @property
    def base_url(self) -> str:
        """The gateway's URL, scheme included (OpenAI SDK base_url = base_url + '/v1')."""
        return self.gateway.settings.url

    @property
    def triton_http_url(self) -> str:
        """Triton's own (internal) HTTP endpoint."""
        return self.server.http_url

    def __getattr__(self, name):  # grpc_url, metrics_url, admin_headers, stub_pids, ...: the server's
        return getattr(self.server, name)

    # ---- lifecycle
    def start(self) -> "ServingStack":
        o = self.server.options
        refuse_equal_ports({"--http-port": self.gateway.settings.port, "--triton-http-port": o.http_port,
                            "--grpc-port": o.grpc_port, "--metrics-port": o.metrics_port})
        if not port_is_free(self.gateway.settings.host, self.gateway.settings.port):
            raise SetupError(f"port {self.gateway.settings.port} on {self.gateway.settings.host} (the gateway) is already in "
                             "use; stop what holds it or choose another with --http-port")
        self.server.start()
        return self

    def wait_ready(self, sleep=time.sleep) -> "ServingStack":
        """Triton ready, then the gateway started and ready, then Triton watched (restarted when it exits
        on its own). `sleep(t)` may raise to abort (signals)."""
        self.server.wait_ready(sleep=sleep)
        self.gateway.start().wait_ready(sleep=sleep)
        if self.server.options.max_server_restarts > 0:
            self._watcher = threading.Thread(target=self._watch_server, name="tritonserver-watch", daemon=True)
            self._watcher.start()
        return self

    @property
    def server_down(self) -> bool:
        """tritonserver has exited and is not restarted (the stack should stop)."""
        return self.server_gave_up is not None or (self._watcher is None and self.server.process.poll() is not None)

    def _watch_server(self) -> None:
        """Restart tritonserver when it exits on its own, on the same ports. Meanwhile the gateway answers
        503 + Retry-After (Triton unreachable), then serves again once Triton is ready; its supervisor
        starts afresh on the new stubs. Bounded: past max_server_restarts within the window it gives up."""
        history: list[float] = []
        limit = self.server.options.max_server_restarts

        def sleep(t: float) -> None:
            if self._stopping.wait(t):
                raise Interrupted("stopping")

        while not self._stopping.wait(SERVER_WATCH_INTERVAL_S):
            code = self.server.process.poll()
            if code is None:
                continue
            now = time.monotonic()
            history = [t for t in history if now - t < SERVER_RESTART_WINDOW_S]
            if len(history) >= limit:
                self.server_gave_up = (f"tritonserver exited (code {code}) after {len(history)} restarts within "
                                       f"{SERVER_RESTART_WINDOW_S:.0f} s; not restarted again")
                print(f"error: {self.server_gave_up}", file=sys.stderr, flush=True)
                return
            history.append(now)
            self.server_restarts += 1
            print(f"tritonserver exited (code {code}): restarting it on the same ports ({len(history)} of {limit} "
                  f"within {SERVER_RESTART_WINDOW_S:.0f} s; the gateway answers 503 meanwhile). Its log ended:\n"
                  f"{self.server.log_tail(15)}", file=sys.stderr, flush=True)
            try:
                self.server.restart(sleep=sleep)
                print(f"tritonserver serves again after {time.monotonic() - now:.1f} s", file=sys.stderr, flush=True)
            except Interrupted:
                return
            except SetupError as e:  # it died again or never got ready: the next round counts another restart
                print(f"tritonserver restart failed: {e}", file=sys.stderr, flush=True)

    def stop_watching(self) -> None:
        """No restart of tritonserver from now on (before anything stops it on purpose)."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()

    def stop(self) -> int | None:
        """The watcher first, then the gateway (it drains: in-flight requests finish while Triton still
        serves), then Triton."""
        self.stop_watching()
        self.gateway.stop()
        return self.server.stop()


def _follow(paths_: list[Path], stop: threading.Event) -> None:
    """Print the server and gateway logs as they grow (the foreground `make serve` experience)."""
    files = []
    for p in paths_:
        f = open(p, "rb")
        f.seek(0, os.SEEK_END)
        files.append(f)
    while not stop.is_set():
        idle = True
        for f in files:
            line = f.readline()
            if line:
                idle = False
                sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()
        if idle:
            time.sleep(0.2)


def banner(stack: ServingStack) -> str:
    s, o = stack.gateway.settings, stack.server.options
    token_at = f"${ADMIN_TOKEN_ENV}" if os.environ.get(ADMIN_TOKEN_ENV) else str(paths.BUILD_DIR / "admin-token")
    key = ' -H "Authorization: Bearer $KEY"' if s.api_keys else ""
    return (
        f"\nReady.\n"
        f"  gateway  {s.url}   OpenAI: {s.url}/v1   KServe v2: {s.url}/v2   (the only HTTP surface)\n"
        f"  gRPC     {stack.server.grpc_url}   metrics {stack.server.metrics_url}   "
        f"Triton HTTP {stack.server.http_url} (internal)\n"
        f"  API keys: {'required' if s.api_keys else 'none (set GATEWAY_API_KEYS or --api-key)'}; admin APIs need "
        f"header 'admin-token' (token in {token_at})\n"
        f"Try:\n"
        f"  curl -s {s.url}/v1/chat/completions{key} -H 'Content-Type: application/json' \\\n"
        f"    -d '{{\"model\":\"tiny_llama\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":16}}'\n"
        f"  curl -s {s.url}/v1/embeddings{key} -H 'Content-Type: application/json' "
        f"-d '{{\"model\":\"minilm_text\",\"input\":\"hello world\"}}'\n"
        f"Ctrl-C stops both.\n"
    )


def serve_forever(options: ServerOptions, gateway: GatewaySettings, quiet: bool = False) -> int:
    """CLI body: start both, print endpoints, follow the logs until SIGINT/SIGTERM or a child dies."""
    signals = Signals()
    stack = ServingStack(options, gateway)
    stop_following = threading.Event()
    try:
        try:
            stack.start()
            print(f"tritonserver starting (log: {stack.server.log_path}) ...", flush=True)
            stack.wait_ready(sleep=signals.sleep_or_raise)
        except SetupError as e:
            stack.stop()
            print(f"error: {e}", file=sys.stderr)
            return 1
        except Interrupted as e:
            print(f"\n{e} while starting: stopping ...", flush=True)
            stack.stop()
            return 0
        print(banner(stack), flush=True)
        if not quiet:
            threading.Thread(target=_follow, args=([stack.server.log_path, stack.gateway.log_path], stop_following),
                             daemon=True).start()
        died = None
        while not signals.wait(0.5):
            if stack.gateway.process.poll() is not None:
                died = "gateway"
            elif stack.server_down:  # exited and not restarted (max_server_restarts)
                died = "tritonserver"
            if died:
                break
        stop_following.set()
        print(f"\nstopping{f' ({died} exited)' if died else ''} ...", flush=True)
        stack.stop_watching()
        gateway_code = stack.gateway.stop()
        code = stack.server.stop()
        left = stack.server.stub_pids() + stack.server.shm_regions()
        gateway_code = 0 if gateway_code == -signal.SIGTERM else gateway_code  # uvicorn re-raises SIGTERM after a clean stop
        print(f"gateway exited ({gateway_code}); tritonserver exited ({code}); leftover stubs/shm regions: "
              f"{left or 'none'}", flush=True)
        if stack.server.stopped_dead_instances:
            print("(tritonserver was stopped while it waited on model instances whose stub had died and was "
                  "restarted: Triton 2.51 never releases them; nothing was in flight)", flush=True)
        if died:
            print(stack.server.log_tail() if died == "tritonserver" else stack.gateway.log_tail(), file=sys.stderr)
            return 1
        return 0
    finally:
        stop_following.set()
        signals.close()
