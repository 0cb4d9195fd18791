"""Limits on what a client may make an API server hold before any route runs.

uvicorn's httptools protocol bounds neither the size of a request's head nor the time a
client takes to send it: a 300 MB header was read in full at 99% CPU, and connections that
sent half a header, or nothing, stayed open for as long as the client liked (enough of them
exhaust the process's file descriptors). ``guarded_protocol`` wraps that protocol class:

- the request line plus headers is bounded in bytes and the headers in number: 431 above;
- a request's head must arrive within ``http_header_timeout`` of the connection (or of the
  request's first byte, on a kept-alive connection); a silent new connection is closed, a
  partial head gets 408;
- a request body may not stall for ``http_body_timeout`` while the server waits to read it
  (a pause the server imposes through flow control does not count): 408.

Between requests uvicorn's own keep-alive timeout closes idle connections. A rejection is
written as an OpenAI-style JSON error with ``connection: close``, unless a response has
already started, in which case the connection is only closed. The protocol also tells the
acceptor whether it is *idle* (no request in progress), so that at the connection cap the
oldest idle connection can make room for a new one.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    max_header_count: int
    header_timeout: float
    body_timeout: float


class ConnectionHooks:
    """What the acceptor learns from each connection (all called on the event loop)."""

    def closed(self, protocol: Any) -> None:
        raise NotImplementedError

    def idle(self, protocol: Any, idle: bool) -> None:
        raise NotImplementedError


def _error_response(status: int, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": status}}).encode()
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n", body])


def guarded_protocol(base: type, limits: HttpLimits, hooks: ConnectionHooks) -> type:
    """A subclass of uvicorn's httptools protocol ``base`` enforcing ``limits``."""

    class GuardedHttpProtocol(base):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._g_rejected = False
            self._g_in_head = True  # the bytes arriving belong to a request's head
            self._g_raw_head = 0  # bytes received while in a head (an over-estimate)
            self._g_head = 0  # the head's parsed size: request line plus headers
            self._g_headers = 0
            self._g_in_body = False
            self._g_last_data = self.loop.time()
            self._g_timer: asyncio.TimerHandle | None = self.loop.call_later(
                limits.header_timeout, self._g_head_expired)
            self._g_busy = False
            hooks.idle(self, True)

        def connection_lost(self, exc: Exception | None) -> None:
            self._g_cancel_timer()
            super().connection_lost(exc)
            hooks.closed(self)

        def data_received(self, data: bytes) -> None:
            if self._g_rejected:
                return
            self._g_last_data = self.loop.time()
            if self._g_in_head:
                self._g_raw_head += len(data)
            super().data_received(data)
            # A head still incomplete after this many bytes cannot fit any more.
            if (self._g_in_head and not self._g_rejected
                    and self._g_raw_head > limits.max_header_bytes):
                self._g_reject(431, f"the request's headers exceed "
                                    f"{limits.max_header_bytes} bytes")

        # ---- parser callbacks ------------------------------------------------------------
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._g_set_busy(True)
            self._g_head = self._g_headers = 0
            if self._g_timer is None:  # a kept-alive connection's next request
                self._g_timer = self.loop.call_later(limits.header_timeout,
                                                     self._g_head_expired)

        def on_url(self, url: bytes) -> None:
            self._g_head += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._g_rejected:
                return
            self._g_head += len(name) + len(value) + 4
            self._g_headers += 1
            if self._g_headers > limits.max_header_count:
                self._g_reject(431, f"the request has more than {limits.max_header_count} "
                                    "header fields")
            elif self._g_head > limits.max_header_bytes:
                self._g_reject(431, f"the request's headers exceed "
                                    f"{limits.max_header_bytes} bytes")
            else:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._g_rejected:
                return
            self._g_cancel_timer()
            self._g_in_head = False
            self._g_raw_head = 0
            self._g_in_body = True
            self._g_timer = self.loop.call_later(limits.body_timeout, self._g_body_check)
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._g_rejected:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._g_rejected:
                return
            self._g_cancel_timer()
            self._g_in_body = False
            self._g_in_head = True  # what comes next is the next request's head
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self._g_in_body:
                self._g_set_busy(False)

        # ---- timers and rejection --------------------------------------------------------
        def _g_head_expired(self) -> None:
            self._g_timer = None
            if self._g_rejected or self.transport.is_closing():
                return
            if self._g_busy:  # a head started and did not finish
                self._g_reject(408, f"the request's headers did not arrive within "
                                    f"{limits.header_timeout:g}s")
            else:  # a connection that never sent a byte
                self._g_rejected = True
                self.transport.close()

        def _g_body_check(self) -> None:
            self._g_timer = None
            if self._g_rejected or not self._g_in_body or self.transport.is_closing():
                return
            stalled = self.loop.time() - self._g_last_data
            if self.flow.read_paused or stalled < limits.body_timeout:
                # The server paused reading (the route has not consumed the body yet), or
                # data came since: look again when the client's time would be up.
                wait = limits.body_timeout - (0 if self.flow.read_paused else stalled)
                self._g_timer = self.loop.call_later(wait, self._g_body_check)
                return
            self._g_reject(408, f"the request body stalled for {limits.body_timeout:g}s")

        def _g_cancel_timer(self) -> None:
            if self._g_timer is not None:
                self._g_timer.cancel()
                self._g_timer = None

        def _g_set_busy(self, busy: bool) -> None:
            if busy != self._g_busy:
                self._g_busy = busy
                hooks.idle(self, not busy)

        def _g_reject(self, status: int, message: str) -> None:
            self._g_rejected = True
            self._g_cancel_timer()
            cycle = self.cycle
            started = (cycle is not None and self._g_in_body
                       and getattr(cycle, "response_started", False))
            if not started and not self.transport.is_closing():
                self.transport.write(_error_response(status, message))
            self.transport.close()

        def close_if_idle(self) -> bool:
            """For the acceptor at its connection cap: close this connection if no request
            is in progress on it; True if closed."""
            if self._g_busy or self.transport.is_closing():
                return False
            self._g_rejected = True
            self.transport.close()
            return True

    return GuardedHttpProtocol

