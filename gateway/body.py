"""Reading a request body within the limits, and parsing it as JSON safely.

Every route reads its body through read_body(): the declared Content-Length and the bytes actually
received (chunked bodies included) are held to max_body_bytes, and the whole body must arrive within
body_timeout_s. parse_json() turns every malformed body into a 400 that says what is wrong: invalid
UTF-8, invalid JSON, nesting deeper than max_json_depth, a top level that is not an object.
"""
from __future__ import annotations

import asyncio
import time

import orjson
from starlette.requests import Request

from gateway.errors import APIError, bad_request
from gateway.settings import GatewaySettings


async def read_body(request: Request, s: GatewaySettings) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Content-Length is not a number", "content-length")
        if int(declared) > s.max_body_bytes:
            raise _too_large(f"{int(declared)} bytes (Content-Length)", s)
    chunks, size = [], 0
    deadline = time.monotonic() + s.body_timeout_s
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise APIError(408, f"request body not received within {s.body_timeout_s:g} s") from None
        size += len(chunk)
        if size > s.max_body_bytes:
            raise _too_large(f"more than {s.max_body_bytes} bytes", s)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: str, s: GatewaySettings) -> APIError:
    return APIError(413, f"request body of {size} is over the limit of {s.max_body_bytes} bytes (max_body_bytes)",
                    code="body_too_large")


def depth_of(value) -> int:
    """Nesting depth of arrays/objects (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if items is None:
            continue
        deepest = max(deepest, d)
        stack.extend((x, d + 1) for x in items if isinstance(x, (dict, list)))
    return deepest


def parse_json(body: bytes, s: GatewaySettings, what: str = "request body") -> dict:
    """A JSON object, or a 400 naming what is wrong."""
    if not body:
        raise bad_request(f"{what} is empty; a JSON object is required")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        msg = str(e)
        if "recursion" in msg or "depth limit" in msg:
            raise bad_request(f"{what}: JSON nested deeper than {s.max_json_depth} levels") from None
        if "utf-8" in msg.lower() or "surrogate" in msg.lower():
            raise bad_request(f"{what} is not valid UTF-8: {msg}") from None
        raise bad_request(f"{what} is not valid JSON: {msg}") from None
    if not isinstance(value, dict):
        kind = {"list": "an array", "str": "a string", "int": "a number", "float": "a number", "bool": "a boolean"}
        raise bad_request(f"{what} must be a JSON object, got {kind.get(type(value).__name__, 'null')}")
    if depth_of(value) > s.max_json_depth:
        raise bad_request(f"{what}: JSON nested deeper than {s.max_json_depth} levels")
    return value
