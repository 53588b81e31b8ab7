"""Errors in OpenAI's JSON shape, with the status that says whose fault it is.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Every refusal in the gateway raises APIError; one handler renders it for every route (the KServe
pass-through included, whose clients read `error.message`; Triton's own errors pass unchanged).
"""
from __future__ import annotations

import orjson
from starlette.responses import Response

# status -> OpenAI error type
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(orjson.dumps(self.body()), status_code=self.status, headers=self.headers,
                        media_type="application/json")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def retryable(status: int, message: str, retry_after_s: int, code: str | None = None) -> APIError:
    """A refusal the client should retry after Retry-After seconds (overload, not ready, restarting)."""
    return APIError(status, message, code=code, headers={"Retry-After": str(retry_after_s)})


def overloaded(message: str, retry_after_s: int, status: int = 429) -> APIError:
    return retryable(status, message, retry_after_s, code="overloaded")
