"""Server-sent events and client-disconnect handling for the generation routes.

Both response modes watch the ASGI ``http.disconnect`` message concurrently with the work:

* ``SSEResponse`` pumps an async iterator of ready-made event frames; when the client goes
  away the pump is cancelled and the iterator closed, and ``on_close`` (which aborts the
  engine requests) runs at once, even while the request is still queued and nothing has
  been sent for a while;
* ``run_until_disconnect`` does the same for a non-streaming request: the generation task is
  cancelled the moment the client disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
_encoder = msgspec.json.Encoder()
encode_json = _encoder.encode  # msgspec: fast, and non-finite floats become null, not 'NaN'


def sse_event(obj: Any) -> bytes:
    """One ``data: {json}`` event."""
    return b"data: " + _encoder.encode(obj) + b"\n\n"


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone (call after the request body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _finish(*tasks: asyncio.Future[Any]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


async def run_until_disconnect(receive: Receive, work: Coroutine[Any, Any, None]) -> bool:
    """Run ``work``; False if the client disconnected first (``work`` is then cancelled).

    Exceptions of ``work`` propagate.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            await _finish(task, watcher)
        else:
            await _finish(watcher)
    if task.cancelled():
        return False
    task.result()
    return True


class SSEResponse(Response):
    """``text/event-stream`` from an async iterator of complete event frames."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes],
                 on_close: Callable[[], None] | None = None) -> None:
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        # no-cache and no proxy buffering: every event must reach the client as it is made.
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def _pump(self, send: Send) -> None:
        async for frame in self.events:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            watcher = asyncio.ensure_future(wait_disconnect(receive))
            try:
                await asyncio.wait((pump, watcher), return_when=asyncio.FIRST_COMPLETED)
            finally:
                await _finish(pump, watcher)
        finally:
            # The iterator's cleanup runs whatever happened above; ``on_close`` too, for an
            # iterator that never started (the client left before the first byte).
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                self.on_close()
