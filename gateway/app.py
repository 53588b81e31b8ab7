"""The gateway's ASGI app: OpenAI routes, the KServe v2 pass-through, /health, and around them the
API-key check and the access log.

    app = create_app(GatewaySettings(...))   # served by gateway/__main__.py (uvicorn)
"""
from __future__ import annotations

import contextlib
import hmac
import logging
import sys
import time

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import APIError, retryable
from gateway.kserve import KServeProxy, kserve_error
from gateway.openai_routes import OpenAIRoutes, json_response
from gateway.settings import GatewaySettings
from gateway.streaming import ClientGone
from gateway.supervisor import Supervisor
from gateway.triton import Triton

log = logging.getLogger("gateway")
access = logging.getLogger("gateway.access")
OPEN_PATHS = ("/health",)  # answered without an API key (probes)
CLIENT_CLOSED = 499  # logged when the client went away first (nginx's convention; never sent)


def render(path: str, e: APIError) -> Response:
    """KServe routes answer in KServe's error shape, everything else in OpenAI's."""
    return kserve_error(e) if path == "/v2" or path.startswith("/v2/") else e.response()


class Drain:
    """The gateway's shutdown, shared by Guard (which answers 503 while draining and counts the requests
    being answered) and the server (gateway/__main__.py: the signal starts it, its ticks end it).
    `since` is only ever set by the signal handler (a plain store: no lock in a handler)."""

    def __init__(self, s: GatewaySettings, end_in_flight=None):
        self.drain_s, self.timeout_s = min(s.drain_s, s.shutdown_timeout_s), s.shutdown_timeout_s
        self.retry_after_s = s.retry_after_s
        self.since: float | None = None  # time.monotonic() of the signal
        self.active = 0  # requests being answered (the drain's own 503s not counted)
        self.ended_at: float | None = None  # when the requests still in flight were ended
        self.end_in_flight = end_in_flight or (lambda reason, code: 0)  # -> how many were ended

    @property
    def draining(self) -> bool:
        return self.since is not None

    def refusal(self, path: str) -> Response:
        e = retryable(503, "the gateway is shutting down; retry on another instance or after the restart",
                      self.retry_after_s, code="shutting_down")
        if path == "/health":
            return json_response({"status": "shutting down"}, 503, e.headers)
        return render(path, e)

    def done(self, now: float) -> bool:
        """Called every tick while draining: True once the gateway may close its listener and exit."""
        elapsed = now - self.since
        if self.active == 0 and elapsed >= self.drain_s:
            return True
        if elapsed < self.timeout_s:
            return False
        if self.ended_at is None:  # shutdown_timeout_s is over: end what is still in flight
            self.ended_at = now
            n = self.end_in_flight("the gateway is shutting down", "shutting_down")
            log.warning("shutdown: %d request(s) still in flight after %.0f s were ended with an error",
                        n, self.timeout_s)
            return False
        return self.active == 0 or now - self.ended_at >= END_FLUSH_S


END_FLUSH_S = 0.5  # after ending the requests in flight: time for their final error events to go out


class Guard:
    """API keys (when configured), the shutdown drain, and one access-log line per request; outermost, so
    refusals are logged too."""

    def __init__(self, app: ASGIApp, s: GatewaySettings, drain: Drain | None = None):
        self.app, self.s = app, s
        self.drain = drain or Drain(s)
        self.keys = [k.encode() for k in s.api_keys]

    def authorized(self, scope: Scope) -> bool:
        if not self.keys or scope["path"] in OPEN_PATHS:
            return True
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, key = auth.partition(b" ")
        # Compare against every key (no early exit): the time taken does not tell which matched.
        ok = [hmac.compare_digest(key.strip(), k) for k in self.keys]
        return scheme.lower() == b"bearer" and any(ok)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [CLIENT_CLOSED]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.drain.draining and scope["path"] != "/metrics":
                await self.drain.refusal(scope["path"])(scope, receive, sending)
            elif self.authorized(scope):
                self.drain.active += 1
                try:
                    await self.app(scope, receive, sending)
                finally:
                    self.drain.active -= 1
            else:
                e = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                             headers={"WWW-Authenticate": "Bearer"})
                await render(scope["path"], e)(scope, receive, sending)
        finally:
            if self.s.access_log:
                state = scope.get("state", {})
                line = {"ts": round(time.time(), 3), "method": scope["method"], "path": scope["path"],
                        "status": status[0], "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
                        "model": state.get("model"), "client": scope["client"][0] if scope.get("client") else None}
                if "prompt" in state:  # only with log_prompts
                    line["prompt"] = state["prompt"]
                access.info(orjson.dumps(line).decode())


def create_app(s: GatewaySettings, triton: Triton | None = None) -> ASGIApp:
    """triton: the backend (tests pass a fake one); default: the Triton server of the settings."""
    triton = triton or Triton(s)
    openai = OpenAIRoutes(s, triton)
    kserve = KServeProxy(s, triton)

    supervisor = Supervisor(s, triton) if s.supervise else None

    async def health(request: Request) -> Response:
        """Gateway up, Triton ready and every model serving (200), else 503: the probe to route by."""
        if triton.all_ready:
            return json_response({"status": "ready"})
        return json_response({"status": "not ready", "down": triton.down}, 503)

    async def metrics(request: Request) -> Response:
        """The gateway's own Prometheus metrics (restarts, model readiness); Triton's are on its metrics port."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await triton.start()
        await kserve.start()
        if supervisor:
            supervisor.start()
        try:
            yield
        finally:
            if supervisor:
                await supervisor.close()
            await kserve.close()
            await triton.close()

    async def api_error(request: Request, e: APIError) -> Response:
        return render(request.url.path, e)

    async def http_error(request: Request, e: HTTPException) -> Response:  # unknown route, wrong method
        return render(request.url.path, APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    async def client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    async def internal(request: Request, e: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return render(request.url.path, APIError(500, f"internal error ({type(e).__name__}); see the gateway log"))

    app = Starlette(
        routes=[Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
                *openai.routes(), *kserve.routes()],
        exception_handlers={APIError: api_error, HTTPException: http_error, ClientGone: client_gone, Exception: internal},
        lifespan=lifespan,
    )
    app.state.triton, app.state.openai, app.state.supervisor = triton, openai, supervisor
    end = getattr(triton, "fail_in_flight", None)  # test doubles may not have it
    return Guard(app, s, Drain(s, end))


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded request otherwise
