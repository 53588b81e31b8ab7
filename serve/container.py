"""The container's entrypoint (docker/Dockerfile): tritonserver with the launcher's hardening and the
gateway in front of it, as one unit. Ready when both are; SIGTERM stops the gateway first (in-flight
requests finish), then Triton; when either process dies the other is stopped and the container exits 1,
for Docker or Kubernetes to restart.

    python -m serve.container                  # Triton + gateway (docker run, compose, the k8s Deployment)
    python -m serve.container --triton-only    # Triton alone, on all interfaces (KServe; see below)
    python -m serve.container -- --log-verbose=1   # arguments after `--` go to tritonserver

The tritonserver flags are the launcher's own (`serve.launcher.server_args`: explicit model control
with every model loaded at start, strict readiness, admin APIs behind the admin token on HTTP and gRPC,
no auto-completed configs, Python-backend shm sizes and a region prefix the gateway's supervisor scans),
with the backends of the image (`$TRITONSERVER_ROOT/backends`, where docker/Dockerfile copies ours).
What differs from `make serve`, and why:
- the gateway binds 0.0.0.0 inside the container (publish it on the host's loopback: `-p 127.0.0.1:8000:8000`);
- Triton's metrics bind 0.0.0.0 (Prometheus scrapes port 8002); its HTTP (8003) and gRPC (8001) stay on
  the container's loopback unless `--grpc-address` is given: clients go through the gateway;
- no numpy < 2 refusal: that protects Triton 2.51's stub (pip host); the container's Triton is newer
  (docker/README.md);
- the admin token is $TRITON_ADMIN_TOKEN, else a random one for this start, never written to disk (the
  root filesystem may be read-only); only the gateway's supervisor then holds it.

KServe: its Triton runtime runs the container with `tritonserver --model-store=/mnt/models
--http-port=8080 --grpc-port=9000 ...` as arguments; with `--triton-only` a leading `tritonserver` is
dropped and the rest is passed on after our flags (the later port flags win), so the hardening stays.

Environment: TRITON_ADMIN_TOKEN, MODEL_REPOSITORY (default /models), TRITONSERVER_ROOT (default
/opt/tritonserver), GATEWAY_* (every gateway setting, e.g. GATEWAY_API_KEYS, GATEWAY_PORT).
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serve import environment
from serve.launcher import ADMIN_TOKEN_ENV, ServerOptions, server_args

ANY = "0.0.0.0"
LOOPBACK = "127.0.0.1"
DEFAULT_REPOSITORY = "/models"
DEFAULT_SERVER_ROOT = "/opt/tritonserver"
GATEWAY_STOP_S = 15  # the gateway's graceful shutdown (10 s) + margin
POLL_S = 0.5


@dataclass
class ContainerConfig:
    model_repository: Path = Path(os.environ.get("MODEL_REPOSITORY") or DEFAULT_REPOSITORY)
    triton_only: bool = False
    http_port: int = 8003  # Triton's own HTTP: internal (the gateway and the liveness probe use it)
    grpc_port: int = 8001
    metrics_port: int = 8002
    grpc_address: str = LOOPBACK
    metrics_address: str = ANY
    exit_timeout_secs: int = 10
    admin_token: str = ""  # "" -> $TRITON_ADMIN_TOKEN or a random one
    backend_directory: Path | None = None  # None -> $TRITONSERVER_ROOT/backends
    extra_args: list[str] = field(default_factory=list)  # to tritonserver, last (they win)

    def token(self) -> str:
        if not self.admin_token:
            self.admin_token = os.environ.get(ADMIN_TOKEN_ENV) or secrets.token_urlsafe(24)
        return self.admin_token


def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `--flag=value` replacing every `--flag=...` (appended when absent)."""
    out = [a for a in argv if not a.startswith(flag + "=")]
    return out + [f"{flag}={value}"]


def passthrough(args: list[str]) -> list[str]:
    """Arguments for tritonserver: a leading `tritonserver` (KServe's runtime passes its command line) is dropped."""
    return args[1:] if args and Path(args[0]).name == "tritonserver" else list(args)


def triton_argv(c: ContainerConfig, shm_prefix: str) -> list[str]:
    """The launcher's tritonserver command line, with the container's addresses and backends."""
    os.environ.setdefault(environment.SERVER_ROOT_ENV, DEFAULT_SERVER_ROOT)
    backends = c.backend_directory or environment.server_root() / "backends"
    options = ServerOptions(model_repository=c.model_repository, host=LOOPBACK, http_port=c.http_port,
                            grpc_port=c.grpc_port, metrics_port=c.metrics_port, exit_timeout_secs=c.exit_timeout_secs)
    argv = server_args(options, backends, c.token(), shm_prefix)
    # --log-file is not used: Triton logs to stdout, where the container runtime collects it.
    http, grpc = (ANY, ANY) if c.triton_only else (LOOPBACK, c.grpc_address)
    for flag, value in (("--http-address", http), ("--grpc-address", grpc), ("--metrics-address", c.metrics_address)):
        argv = set_flag(argv, flag, value)
    return argv + passthrough(c.extra_args)


def gateway_argv(c: ContainerConfig, shm_prefix: str, host: str = ANY) -> list[str]:
    """`python -m gateway` wired to this Triton (as serve/stack.py wires it); every other setting comes
    from GATEWAY_* in the environment, read by the gateway itself."""
    return [sys.executable, "-m", "gateway", "--host", host,
            "--triton-grpc-url", f"{LOOPBACK}:{c.grpc_port}", "--triton-http-url", f"{LOOPBACK}:{c.http_port}",
            "--model-repository", str(c.model_repository), "--stub-shm-prefix", shm_prefix]


def answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class Stopping(Exception):
    pass


class Container:
    """Triton, then the gateway; `run()` returns the container's exit code."""

    def __init__(self, c: ContainerConfig, env: dict[str, str] | None = None, gateway_host: str = ANY):
        self.c = c
        self.env = dict(os.environ if env is None else env)
        self.env[ADMIN_TOKEN_ENV] = c.token()  # the gateway reads it from its environment, never argv
        self.shm_prefix = f"triton_py_{os.getpid()}_"
        self.gateway_host = gateway_host
        self.triton: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None
        self.signal: int | None = None
        self.app_dir = Path(__file__).resolve().parents[1]

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum  # a plain assignment: no lock taken in the handler

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)
        if self.signal is not None:
            raise Stopping(signal.Signals(self.signal).name)

    def start(self) -> None:
        argv = triton_argv(self.c, self.shm_prefix)
        print("serve.container: " + " ".join(argv).replace(self.c.token(), "<admin token>"), flush=True)
        # Own sessions: a terminal's Ctrl-C reaches this process only, which then stops them in order.
        self.triton = subprocess.Popen(argv, env=self.env, start_new_session=True)
        ready = f"http://{LOOPBACK}:{self.c.http_port}/v2/health/ready"
        if self.c.triton_only:
            return
        while not answers(ready):
            if self.triton.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.triton.returncode} while loading models")
            self._sleep(POLL_S)
        print("serve.container: tritonserver ready; starting the gateway", flush=True)
        self.gateway = subprocess.Popen(gateway_argv(self.c, self.shm_prefix, self.gateway_host), env=self.env,
                                        cwd=self.app_dir, start_new_session=True)

    def watch(self) -> str | None:
        """Until a signal (None) or a child exits (its name)."""
        while True:
            for name, p in (("tritonserver", self.triton), ("gateway", self.gateway)):
                if p is not None and p.poll() is not None:
                    return name
            self._sleep(POLL_S)

    def stop(self) -> None:
        """The gateway first (SIGTERM: it stops accepting and lets requests finish), then Triton (SIGINT:
        in-flight requests get exit_timeout_secs), then whatever is left of either."""
        for p, sig, grace in ((self.gateway, signal.SIGTERM, GATEWAY_STOP_S),
                              (self.triton, signal.SIGINT, self.c.exit_timeout_secs + 20)):
            if p is None or p.poll() is not None:
                continue
            p.send_signal(sig)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def run(self) -> int:
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        died = None
        try:
            try:
                self.start()
                died = self.watch()
            except Stopping as e:
                print(f"serve.container: {e}: stopping", flush=True)
            except RuntimeError as e:
                print(f"serve.container: {e}", file=sys.stderr, flush=True)
                return 1
            finally:
                self.stop()
            if died:
                print(f"serve.container: {died} exited; stopped the rest", file=sys.stderr, flush=True)
                return 1
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    d = ContainerConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--triton-only", action="store_true", help="Triton alone on all interfaces (KServe)")
    p.add_argument("--model-repository", type=Path, default=d.model_repository)
    p.add_argument("--triton-http-port", type=int, default=d.http_port, help="Triton's own HTTP port (internal)")
    p.add_argument("--grpc-port", type=int, default=d.grpc_port)
    p.add_argument("--metrics-port", type=int, default=d.metrics_port)
    p.add_argument("--grpc-address", default=d.grpc_address, help="Triton gRPC bind address (default loopback)")
    p.add_argument("--metrics-address", default=d.metrics_address)
    p.add_argument("--gateway-host", default=ANY, help="the gateway's bind address (its port: GATEWAY_PORT, default 8000)")
    p.add_argument("--backend-directory", type=Path, default=None, help="default $TRITONSERVER_ROOT/backends")
    a, rest = p.parse_known_args(argv)
    # KServe's runtime appends `tritonserver --model-store=... --http-port=...`: those go to tritonserver.
    if rest and not a.triton_only:
        p.error(f"unrecognized arguments: {' '.join(rest)} (tritonserver arguments go after `--`)")
    c = ContainerConfig(model_repository=a.model_repository, triton_only=a.triton_only, http_port=a.triton_http_port,
                        grpc_port=a.grpc_port, metrics_port=a.metrics_port, grpc_address=a.grpc_address,
                        metrics_address=a.metrics_address, backend_directory=a.backend_directory,
                        extra_args=rest + extra)
    return Container(c, gateway_host=a.gateway_host).run()


if __name__ == "__main__":
    sys.exit(main())
