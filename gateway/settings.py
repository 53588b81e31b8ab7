"""Gateway settings: the one place where every front-door knob and its default is defined.

Each field can be set three ways, the later winning: its default here, the environment variable
`GATEWAY_<FIELD>` (upper case), the flag `--<field-with-dashes>`. Lists (api_keys) are comma separated
in the environment and repeatable on the command line (`--api-key K1 --api-key K2`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from serve.paths import MODEL_REPOSITORY

ENV_PREFIX = "GATEWAY_"
MiB = 1024 * 1024


@dataclass(frozen=True)
class GatewaySettings:
    # Where the gateway listens: loopback unless asked. It is the only HTTP surface meant to face
    # clients; Triton's own HTTP port stays internal (Triton 2.51 HTTP has unfixed CVEs).
    host: str = "127.0.0.1"
    port: int = 8000
    # The Triton server behind it: gRPC for the OpenAI routes, HTTP for the KServe v2 pass-through.
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_http_url: str = "127.0.0.1:8003"
    # Local model repository: tokenizers for chat templates and embedding token counts.
    model_repository: Path = MODEL_REPOSITORY
    # Triton's admin token (None: $TRITON_ADMIN_TOKEN or build/admin-token, as the launcher makes it).
    admin_token: str | None = field(default=None, repr=False)
    # Client API keys (`Authorization: Bearer <key>`); empty: no key needed. With keys, every route
    # but /health needs one.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # Request limits: refused before anything is forwarded.
    max_body_bytes: int = 4 * MiB  # -> 413
    max_json_depth: int = 64  # nesting of arrays/objects -> 400
    max_header_bytes: int = 16 * 1024  # request line + headers -> 400 from the HTTP parser
    body_timeout_s: float = 30.0  # the whole body must arrive within this (slow senders) -> 408
    # A generation (or embedding call) longer than this is cancelled -> 504 / a final stream error.
    request_timeout_s: float = 300.0
    # Generations in flight at once; more are refused at once with 429 + Retry-After.
    max_concurrent_generations: int = 128
    retry_after_s: int = 1
    # Most inputs in one /v1/embeddings request (OpenAI's own limit is 2048).
    max_embedding_inputs: int = 2048
    # Embedding texts in flight through the gateway (a request counts its texts; one request alone is
    # always admitted); more are refused at once with 429 + Retry-After. 512: ~1.5 s of work for the
    # 2-core CPU (~350 texts/s), still under the encoder queue's 5 s timeout when the CPU runs at half
    # speed (with 1024, a shared machine's soak saw accepted requests wait ~5 s and some time out there).
    max_embedding_texts_in_flight: int = 512
    # Open connections + in-flight requests the HTTP server accepts before answering 503.
    max_connections: int = 1024
    # TLS: both set -> HTTPS.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    # Shutdown (SIGTERM/SIGINT): for drain_s the listener stays open and answers new requests with 503 +
    # Retry-After (code shutting_down; /health 503) while the requests in flight go on (it stays open
    # longer while any is in flight); those still in flight shutdown_timeout_s after the signal are
    # ended (a stream with a final error event, others 503); then the gateway exits. The launcher caps
    # shutdown_timeout_s at Triton's --exit-timeout-secs, so that a whole stop stays within it + 5 s.
    drain_s: float = 3.0
    shutdown_timeout_s: float = 10.0
    # Access log: one JSON line per request on stderr (never the prompt text unless log_prompts).
    access_log: bool = True
    log_prompts: bool = False
    # How often Triton's readiness is polled (the OpenAI routes answer 503 while it is not ready).
    ready_poll_s: float = 1.0
    # Self-healing (gateway/supervisor.py): restart a model whose Python stub died or hung.
    supervise: bool = True
    stub_shm_prefix: str = ""  # this server's stubs (wired by serve/stack.py); empty: canaries only
    supervise_interval_s: float = 0.5  # stub process scan
    canary_interval_s: float = 2.0  # a 1-token generation / 1-text embedding per model
    hang_timeout_s: float = 3.0  # a canary slower than this is a hang
    max_restarts: int = 5  # within restart_window_s; then the model stays not ready
    restart_window_s: float = 600.0

    def __post_init__(self):
        for name in ("max_body_bytes", "max_json_depth", "max_header_bytes", "max_concurrent_generations",
                     "max_embedding_inputs", "max_embedding_texts_in_flight", "max_connections", "max_restarts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("body_timeout_s", "request_timeout_s", "ready_poll_s", "supervise_interval_s",
                     "canary_interval_s", "hang_timeout_s", "restart_window_s", "shutdown_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.drain_s < 0:
            raise ValueError(f"drain_s must be >= 0, got {self.drain_s}")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile must be set together")
        if any(not k for k in self.api_keys):
            raise ValueError("api_keys must not contain empty keys")

    @property
    def tls(self) -> bool:
        return self.tls_certfile is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def replace(self, **changes) -> "GatewaySettings":
        return dataclasses.replace(self, **changes)


def _convert(f: dataclasses.Field, text: str):
    kind = str(f.type)
    if kind.startswith("tuple"):
        return tuple(k.strip() for k in text.split(",") if k.strip())
    if kind == "bool":
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{f.name}: expected a boolean, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if "Path" in kind:
        return Path(text)
    return text


def from_env(env: dict[str, str] | None = None, **overrides) -> GatewaySettings:
    """Defaults, then GATEWAY_* variables, then keyword overrides."""
    env = os.environ if env is None else env
    values = {}
    for f in fields(GatewaySettings):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is not None and raw != "":
            try:
                values[f.name] = _convert(f, raw)
            except ValueError as e:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}: {e}") from e
    values.update(overrides)
    return GatewaySettings(**values)


def add_arguments(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per settings field (default None: the environment or the field's default applies)."""
    for f in fields(GatewaySettings):
        if f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "api_keys":
            p.add_argument("--api-key", dest="api_keys", action="append", default=None,
                           help="client API key (repeatable; also $GATEWAY_API_KEYS, comma separated)")
        elif str(f.type) == "bool":
            p.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction)
        else:
            p.add_argument(flag, dest=f.name, default=None, type=lambda t, f=f: _convert(f, t),
                           help=f"default {f.default!r}" if f.name != "admin_token" else "default: $TRITON_ADMIN_TOKEN or build/admin-token")


def from_args(a: argparse.Namespace, env: dict[str, str] | None = None) -> GatewaySettings:
    overrides = {f.name: getattr(a, f.name) for f in fields(GatewaySettings) if getattr(a, f.name, None) is not None}
    if "api_keys" in overrides:
        overrides["api_keys"] = tuple(overrides["api_keys"])
    return from_env(env, **overrides)
