"""Responses that end when the client goes away: a Server-Sent-Events response whose event source is
closed (cancelling the generation behind it) as soon as the client disconnects, and the same guard
for a plain awaitable.

Both watch the ASGI `http.disconnect` message directly: the request body has been read in full before
either is used, so the next receive() returns only when the connection is gone.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it unwind: its finally blocks cancel what it started
    if task.cancelled():
        raise ClientGone()
    return task.result()


class SSEResponse:
    """200 text/event-stream from an async iterator of ready-made `data: ...\\n\\n` events."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str] | None = None, on_close=None):
        self.events, self.on_close = events, on_close  # on_close: awaited at the end, whatever happened
        self.headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no")]
        self.headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(receive, self._stream(send))
        except (ClientGone, OSError):
            pass  # the events' aclose() in _stream has cancelled the generation
        finally:
            await self.events.aclose()
            if self.on_close is not None:
                await self.on_close()

    async def _stream(self, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.events.aclose()
