"""KServe v2 HTTP, passed through to Triton's internal HTTP port under the gateway's limits.

Only the routes of the KServe v2 protocol and Triton's extensions are forwarded (anything else is a
404 here, never reaching Triton); model names are plain identifiers (no path tricks). Bodies are read
within the limits and their JSON is parsed here first, so malformed input gets a 400 from the gateway
instead of a 500 or a crash in Triton 2.51; the generate endpoints' inputs are type-checked against
the model's config. The body is forwarded as application/json (or application/octet-stream with the
binary-tensor extension) whatever the client declared: Triton 2.51 crashes on large form-urlencoded
bodies. Admin APIs need the admin token here as well as in Triton. Errors use KServe's shape,
{"error": "message"}.
"""
from __future__ import annotations

import hmac
import re

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.body import parse_json, read_body
from gateway.errors import APIError, bad_request, retryable
from gateway.settings import GatewaySettings
from gateway.streaming import SSEResponse
from gateway.triton import Triton
from serve.launcher import ADMIN_HEADER, default_admin_token

BINARY_HEADER = "inference-header-content-length"  # KServe binary tensor extension
NAME = r"[A-Za-z0-9_.\-]{1,128}"
MODEL = rf"/v2/models/(?P<model>{NAME})(?:/versions/(?P<version>[0-9]{{1,9}}))?"
# (pattern, methods, admin?)
ROUTES = [  # first match wins: the fixed admin paths come before the model patterns
    (r"/v2/models/stats", {"GET"}, True),
    (rf"{MODEL}/stats", {"GET"}, True),
    (rf"{MODEL}/trace/setting", {"GET", "POST"}, True),
    (r"/v2/trace/setting", {"GET", "POST"}, True),
    (r"/v2/logging", {"GET", "POST"}, True),
    (r"/v2/repository/index", {"POST"}, True),
    (rf"/v2/repository/models/{NAME}/(?:load|unload)", {"POST"}, True),
    (rf"/v2/(?:system|cuda)sharedmemory(?:/region/{NAME})?/(?:status|register|unregister)", {"GET", "POST"}, True),
    (r"/v2", {"GET"}, False),
    (r"/v2/health/(?:live|ready)", {"GET"}, False),
    (rf"{MODEL}(?:/ready|/config)?", {"GET"}, False),
    (rf"{MODEL}/(?P<infer>infer)", {"POST"}, False),
    (rf"{MODEL}/(?P<generate>generate|generate_stream)", {"POST"}, False),
]
COMPILED = [(re.compile(p), m, a) for p, m, a in ROUTES]
# Response headers worth relaying from Triton.
RELAY = ("content-type", BINARY_HEADER, "content-encoding")
INT_RANGE = {f"INT{b}": (-(2 ** (b - 1)), 2 ** (b - 1) - 1) for b in (8, 16, 32, 64)}
INT_RANGE |= {f"UINT{b}": (0, 2 ** b - 1) for b in (8, 16, 32, 64)}
WANT = {"BOOL": "a boolean", "BYTES": "a string"}


def fits(v, dtype: str) -> bool:
    """Whether JSON value v can be a tensor element of Triton datatype `dtype`."""
    if dtype in INT_RANGE:
        lo, hi = INT_RANGE[dtype]
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
    if dtype == "BOOL":
        return isinstance(v, bool)
    if dtype == "BYTES":
        return isinstance(v, str)
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # FP16/BF16/FP32/FP64


def kserve_error(e: APIError) -> Response:
    return Response(orjson.dumps({"error": e.message}), status_code=e.status, headers=e.headers,
                    media_type="application/json")


def check_generate_inputs(body: dict, inputs: dict[str, str]) -> None:
    """Values of the model's inputs in a generate request must match their datatypes (a 400 naming
    the field, not Triton 2.51's 500). `inputs`: name -> datatype (config's TYPE_ prefix removed)."""
    for name, value in body.items():
        dtype = inputs.get(name)
        if dtype is None:
            continue  # not an input: Triton passes it to the model as a request parameter
        for v in value if isinstance(value, list) else [value]:
            if not fits(v, dtype):
                lo_hi = INT_RANGE.get(dtype)
                want = f"an integer in [{lo_hi[0]}, {lo_hi[1]}]" if lo_hi else WANT.get(dtype, "a number")
                raise bad_request(f"{name}: expected {want} ({dtype}), got {v!r:.80}", name)


class KServeProxy:
    def __init__(self, s: GatewaySettings, triton: Triton):
        self.s, self.triton = s, triton
        self.admin_token = s.admin_token or default_admin_token()
        self.http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self.http = httpx.AsyncClient(
            base_url=f"http://{self.s.triton_http_url}", timeout=httpx.Timeout(self.s.request_timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=self.s.max_connections, max_keepalive_connections=64))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()

    def routes(self) -> list[Route]:
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
        return [Route("/v2", self.handle, methods=methods), Route("/v2/{rest:path}", self.handle, methods=methods)]

    async def handle(self, request: Request) -> Response:
        try:
            return await self._handle(request)
        except APIError as e:
            return kserve_error(e)

    def _match(self, request: Request) -> tuple[re.Match, bool]:
        path = request.url.path.rstrip("/") or "/"
        for pattern, methods, admin in COMPILED:
            m = pattern.fullmatch(path)
            if m:
                if request.method not in methods:
                    raise APIError(405, f"{request.method} is not allowed on {path}", headers={"Allow": ", ".join(sorted(methods))})
                return m, admin
        raise APIError(404, f"no such endpoint: {path}")

    async def _handle(self, request: Request) -> Response:
        m, admin = self._match(request)
        headers = {}
        if admin:
            token = request.headers.get(ADMIN_HEADER, "")
            if not hmac.compare_digest(token.encode(), self.admin_token.encode()):
                raise APIError(403, f"this API is restricted: send the admin token in the '{ADMIN_HEADER}' header")
            headers[ADMIN_HEADER] = token
        model = m.groupdict().get("model")
        if model:
            request.state.model = model
        self._check_health(request, m, model)
        body = b""
        if request.method == "POST":
            body = await read_body(request, self.s)
            if request.headers.get("content-encoding", "identity").lower() != "identity":
                raise APIError(415, "compressed request bodies are not accepted (Content-Encoding); send them uncompressed")
            headers["content-type"] = self._check_body(request, body, m)
        for h in ("accept-encoding", BINARY_HEADER):
            if h in request.headers:
                headers[h] = request.headers[h]
        url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            upstream = self.http.build_request(request.method, url, content=body or None, headers=headers)
            response = await self.http.send(upstream, stream=True)
        except httpx.TransportError as e:
            raise APIError(503, f"the inference server is unavailable ({type(e).__name__})") from None
        relay = {k: v for k, v in response.headers.items() if k.lower() in RELAY}
        if response.status_code == 503:  # Triton's UNAVAILABLE (e.g. the LLM's bounded admission): retryable
            relay["Retry-After"] = str(self.s.retry_after_s)
        if m.groupdict().get("generate") == "generate_stream" and response.status_code == 200:
            return SSEResponse(response.aiter_raw(), on_close=response.aclose)
        try:  # raw: a compressed body is relayed as it is, with its Content-Encoding
            content = b"".join([part async for part in response.aiter_raw()])
        finally:
            await response.aclose()
        return Response(content, status_code=response.status_code, headers=relay)

    def _check_health(self, request: Request, m: re.Match, model: str | None) -> None:
        """What Triton 2.51 gets wrong while a stub is dead (it says ready and hangs requests): answered
        here from the supervisor's view. A restarting model is 503 on readiness, inference and generate."""
        down = self.triton.down
        if request.url.path.rstrip("/") == "/v2/health/ready" and down:
            raise retryable(503, "not ready: " + "; ".join(sorted(set(down.values()))), self.s.retry_after_s)
        groups = m.groupdict()
        serving = request.url.path.rstrip("/").endswith("/ready") or groups.get("infer") or groups.get("generate")
        if model in down and serving:
            raise retryable(503, down[model], self.s.retry_after_s)

    def _check_body(self, request: Request, body: bytes, m: re.Match) -> str:
        """Parse the JSON part of the body (400 if malformed); the content type to forward."""
        binary = request.headers.get(BINARY_HEADER)
        if binary is not None:
            if not binary.isdigit() or int(binary) > len(body):
                raise bad_request(f"{BINARY_HEADER} must be a number <= the body size ({len(body)})", BINARY_HEADER)
            parse_json(body[: int(binary)], self.s, "inference header")
            return "application/octet-stream"
        groups = m.groupdict()
        if not body and not (groups.get("infer") or groups.get("generate")):
            return "application/json"  # admin POSTs may have no body
        obj = parse_json(body, self.s)
        if groups.get("generate"):
            model = m.group("model")
            inputs = self.triton.input_types.get(model)
            if inputs:
                check_generate_inputs(obj, inputs)
        return "application/json"
