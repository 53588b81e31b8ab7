"""Start a real tritonserver over a model repository, safely, and stop it cleanly.

Library: `TritonServer(ServerOptions(...))` (a context manager) used by the tests, the benchmarks and
serve/stack.py, which runs it with the gateway in front (`make serve`). CLI: `python -m serve.launcher --help`.

Refuses to start (SetupError, with a fix) when numpy >= 2 is in the model environment, a port is
taken, or a model's artifacts are missing. Admin APIs are restricted behind a header token on HTTP
and gRPC (Triton 2.51 has published CVEs in those surfaces).
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serve import environment, paths
from serve.environment import SetupError
from serve.ports import port_is_free, refuse_equal_ports
from serve.repository import check_repository

# APIs only operators need; inference, health, metadata and model-config stay open.
ADMIN_APIS = ("shared-memory", "model-repository", "logging", "trace", "statistics")
ADMIN_HEADER = "admin-token"  # lower case: gRPC metadata keys must be
# Triton 2.51 expects the gRPC metadata key with this prefix (HTTP uses the bare key).
ADMIN_GRPC_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
ADMIN_TOKEN_ENV = "TRITON_ADMIN_TOKEN"
ADMIN_TOKEN_FILE = paths.BUILD_DIR / "admin-token"
# Triton's stop, in its log: the drain is over and models unload; then, once a second, what is left.
STOPPED_LINE = "All models are stopped, unloading models"
LIVE_MODELS = re.compile(r"Found [1-9][0-9]* live models and 0 in-flight non-inference requests")
# How long Triton may go on waiting on live models without any stub process left before it is stopped.
DEAD_INSTANCE_GRACE_S = 1.5
# ServerOptions.max_server_restarts counts the restarts of tritonserver within this window.
SERVER_RESTART_WINDOW_S = 600.0


def default_admin_token() -> str:
    """TRITON_ADMIN_TOKEN, else a random token kept (mode 600) in build/admin-token."""
    if os.environ.get(ADMIN_TOKEN_ENV):
        return os.environ[ADMIN_TOKEN_ENV]
    if not ADMIN_TOKEN_FILE.exists():
        ADMIN_TOKEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(ADMIN_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return ADMIN_TOKEN_FILE.read_text().strip()


@dataclass
class ServerOptions:
    model_repository: Path = paths.MODEL_REPOSITORY
    host: str = "127.0.0.1"  # loopback unless asked: the admin surfaces must not face a network
    # Triton's own HTTP port: internal, for the gateway (serve/stack.py) and tests; clients use the
    # gateway's port (8000). Triton 2.51's HTTP server must not face untrusted clients.
    http_port: int = 8003
    grpc_port: int = 8001
    metrics_port: int = 8002
    admin_token: str | None = None  # None: default_admin_token()
    exit_timeout_secs: int = 10  # in-flight requests get this long at shutdown
    ready_timeout_s: float = 300.0  # model loads (ONNX sessions, LLM weights) on 2 cores take a while
    strict_readiness: bool = True  # ready only when every model is
    shm_default_byte_size: int = 16 * 1024 * 1024  # per Python-backend instance, in /dev/shm
    shm_growth_byte_size: int = 16 * 1024 * 1024
    log_verbose: int = 0
    log_file: Path | None = None  # None: build/logs/tritonserver-<http_port>.log
    model_env: Path | None = None  # venv whose python3 the stub embeds; None: the launcher's own
    # tritonserver exiting on its own is restarted (serve/stack.py) up to this many times within
    # SERVER_RESTART_WINDOW_S, then the stack stops; 0: never restarted.
    max_server_restarts: int = 5
    extra_args: list[str] = field(default_factory=list)


def server_args(o: ServerOptions, backends: Path, token: str, shm_prefix: str) -> list[str]:
    restricted = ",".join(ADMIN_APIS) + f":{ADMIN_HEADER}={token}"
    return [
        str(environment.tritonserver_bin()),
        f"--model-repository={o.model_repository}",
        f"--backend-directory={backends}",
        # explicit + load everything: what "none" does, plus reloading one model (the gateway's
        # supervisor heals a crashed stub that way). The model-repository API is admin-restricted.
        "--model-control-mode=explicit",
        "--load-model=*",
        "--disable-auto-complete-config",  # our configs are complete, generated from the spec
        f"--strict-readiness={str(o.strict_readiness).lower()}",
        f"--exit-timeout-secs={o.exit_timeout_secs}",
        f"--http-address={o.host}",
        f"--http-port={o.http_port}",
        f"--grpc-address={o.host}",
        f"--grpc-port={o.grpc_port}",
        f"--metrics-address={o.host}",
        f"--metrics-port={o.metrics_port}",
        "--allow-metrics=true",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
        f"--backend-config=python,shm-default-byte-size={o.shm_default_byte_size}",
        f"--backend-config=python,shm-growth-byte-size={o.shm_growth_byte_size}",
        # A per-server prefix lets shutdown find (and tests assert on) this server's regions only.
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        f"--log-verbose={o.log_verbose}",
        *o.extra_args,
    ]


def log_tail(path: Path, lines: int) -> str:
    """The last lines of a process's log (what a failed start or a crash shows)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class Started:
    """`with X(...) as x:` for things with start(), wait_ready() and stop(): started and ready inside,
    stopped after (also when starting fails)."""

    def __enter__(self):
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class TritonServer(Started):
    """One tritonserver process. `with TritonServer(opts) as s:` starts it and waits until ready."""

    def __init__(self, options: ServerOptions | None = None):
        self.options = options or ServerOptions()
        self.admin_token = self.options.admin_token or default_admin_token()
        self.shm_prefix = f"triton_py_{os.getpid()}_{self.options.http_port}_"
        self.log_path = Path(
            self.options.log_file or paths.BUILD_DIR / "logs" / f"tritonserver-{self.options.http_port}.log"
        )
        self.process: subprocess.Popen | None = None
        self.stopped_dead_instances = False  # the last stop() ended Triton's wait on dead stubs' instances

    # ---- endpoints
    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that unlock the admin APIs."""
        return {ADMIN_HEADER: self.admin_token}

    @property
    def admin_grpc_headers(self) -> dict[str, str]:
        """gRPC metadata that unlocks the admin protocols."""
        return {ADMIN_GRPC_HEADER: self.admin_token}

    # ---- lifecycle
    def preflight(self) -> tuple[dict[str, str], str]:
        """Every refusal happens here, before a process exists. Returns (server env, model Python X.Y)."""
        o = self.options
        env = environment.server_env(o.model_env)
        model_python = environment.check_model_python(env)
        env = environment.with_libpython(env, model_python)
        refuse_equal_ports({"--triton-http-port": o.http_port, "--grpc-port": o.grpc_port, "--metrics-port": o.metrics_port})
        taken = [p for p in (o.http_port, o.grpc_port, o.metrics_port) if not port_is_free(o.host, p)]
        if taken:
            raise SetupError(
                f"port(s) {taken} on {o.host} already in use; stop what holds them "
                f"(`ss -ltnp | grep -E ':({'|'.join(map(str, taken))})\\b'`) or choose others with "
                "--http-port/--grpc-port/--metrics-port"
            )
        problems = check_repository(Path(o.model_repository))
        if problems:
            raise SetupError("model repository is not ready:\n  " + "\n  ".join(map(str, problems)))
        return env, model_python.version

    def start(self, append_log: bool = False) -> "TritonServer":
        env, python_version = self.preflight()
        backends = environment.assemble_backends(python_version)
        args = server_args(self.options, backends, self.admin_token, self.shm_prefix)
        self.stopped_dead_instances = False
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab" if append_log else "wb")
        # Own process group: Ctrl-C in a terminal reaches the launcher only, which then stops the
        # server and (via the group) every stub process in order.
        self.process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return self

    def restart(self, sleep=time.sleep) -> "TritonServer":
        """After tritonserver exited on its own: remove what it left (stubs, /dev/shm regions), start it
        again with the same options and ports (the log goes on in the same file), wait until ready."""
        self.stop()
        self.start(append_log=True)
        return self.wait_ready(sleep=sleep)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float | None = None, sleep=time.sleep) -> "TritonServer":
        """Poll readiness; `sleep(t)` may raise to abort the wait (serve/stack.py: on a signal)."""
        deadline = time.monotonic() + (timeout_s or self.options.ready_timeout_s)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SetupError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return self
            sleep(0.25)
        self.stop()
        raise SetupError(f"tritonserver not ready after {timeout_s or self.options.ready_timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def stub_pids(self) -> list[int]:
        """Stub processes of this server (their command line holds this server's shm prefix)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if environment.STUB_NAME.encode() in cmdline and self.shm_prefix.encode() in cmdline:
                pids.append(int(proc.name))
        return pids

    def shm_regions(self) -> list[Path]:
        return sorted(Path("/dev/shm").glob(self.shm_prefix + "*"))

    def stop(self) -> int | None:
        """SIGINT (graceful: in-flight requests finish within exit-timeout), then kill what is left.

        Returns tritonserver's exit code, or 0 when the only thing it still waited for was model
        instances whose stub had died (`waits_on_dead_stubs`): they can never unload, so it is
        stopped at once instead of running out its exit timeout and exiting 1."""
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            since = self.log_path.stat().st_size if self.log_path.exists() else 0
            p.send_signal(signal.SIGINT)
            deadline = time.monotonic() + self.options.exit_timeout_secs + 20
            stuck_since = None
            while p.poll() is None and time.monotonic() < deadline:
                stuck = self.waits_on_dead_stubs(since)
                stuck_since = (stuck_since or time.monotonic()) if stuck else None
                if stuck_since and time.monotonic() - stuck_since >= DEAD_INSTANCE_GRACE_S:
                    self.stopped_dead_instances = True
                    break
                time.sleep(0.2)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # Stubs normally exit with the server; anything left in its group goes now.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.stub_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for region in self.shm_regions():
            region.unlink(missing_ok=True)
        return 0 if self.stopped_dead_instances else p.returncode

    def waits_on_dead_stubs(self, since: int = 0) -> bool:
        """While stopping: Triton's drain is over and models unload ("All models are stopped" in the log
        after byte `since`), models are still live, and no stub process of this server is left. In
        Triton 2.51 a request that reached a Python model instance after its stub died is never
        released: that instance (replaced by the gateway's supervisor) stays live for good. Nothing is
        lost by stopping now: no request is in flight and no stub is left to finalize."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return False
        return STOPPED_LINE in text and LIVE_MODELS.search("\n".join(text.splitlines()[-3:])) is not None \
            and not self.stub_pids()



def add_server_args(p: argparse.ArgumentParser) -> None:
    """Triton's flags and the gateway's (serve/stack.py runs both): `--http-port` is the gateway's port,
    the one clients use; `--triton-http-port` is Triton's internal HTTP port."""
    from gateway import settings as gateway_settings
    from serve.stack import WIRED

    d = ServerOptions()
    p.add_argument("--model-repository", type=Path, default=d.model_repository)
    p.add_argument("--host", default=d.host, help="address to bind (default loopback)")
    p.add_argument("--http-port", type=int, default=None, dest="port",
                   help=f"the gateway's port (OpenAI + KServe v2 HTTP; default {gateway_settings.GatewaySettings.port})")
    p.add_argument("--triton-http-port", type=int, default=d.http_port, dest="http_port",
                   help="Triton's own HTTP port, internal: only the gateway and tests use it")
    p.add_argument("--grpc-port", type=int, default=d.grpc_port)
    p.add_argument("--metrics-port", type=int, default=d.metrics_port)
    p.add_argument("--exit-timeout-secs", type=int, default=d.exit_timeout_secs)
    p.add_argument("--ready-timeout", type=float, default=d.ready_timeout_s, dest="ready_timeout_s")
    p.add_argument("--shm-default-byte-size", type=int, default=d.shm_default_byte_size)
    p.add_argument("--log-verbose", type=int, default=d.log_verbose)
    p.add_argument("--model-env", type=Path, default=d.model_env, help="venv the Python models run in (default: this one)")
    p.add_argument("--max-server-restarts", type=int, default=d.max_server_restarts,
                   help="restart tritonserver when it exits on its own, at most this many times within "
                        f"{SERVER_RESTART_WINDOW_S / 60:.0f} minutes (0: never; the launcher then stops)")
    gateway_settings.add_arguments(p.add_argument_group("gateway (also GATEWAY_* environment variables)"),
                                   exclude=WIRED + ("port",))


def options_from_args(a: argparse.Namespace, extra: list[str]) -> ServerOptions:
    return ServerOptions(
        model_repository=a.model_repository.resolve(),
        host=a.host,
        http_port=a.http_port,
        grpc_port=a.grpc_port,
        metrics_port=a.metrics_port,
        exit_timeout_secs=a.exit_timeout_secs,
        ready_timeout_s=a.ready_timeout_s,
        shm_default_byte_size=a.shm_default_byte_size,
        log_verbose=a.log_verbose,
        model_env=a.model_env,
        max_server_restarts=a.max_server_restarts,
        extra_args=extra,
    )


def gateway_from_args(a: argparse.Namespace):
    from gateway import settings as gateway_settings

    return gateway_settings.from_args(a)


def main(argv: list[str] | None = None) -> int:
    from serve.stack import serve_forever

    p = argparse.ArgumentParser(
        description="Run tritonserver over the model repository and the gateway in front of it (loopback, "
        "admin APIs behind a token). Arguments after `--` go to tritonserver unchanged."
    )
    add_server_args(p)
    p.add_argument("--quiet", action="store_true", help="do not follow the server log on stdout")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        gateway = gateway_from_args(a)
    except ValueError as e:
        p.error(str(e))
    return serve_forever(options_from_args(a, extra), gateway, quiet=a.quiet)


if __name__ == "__main__":
    sys.exit(main())
