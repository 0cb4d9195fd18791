"""Pure-ASGI middleware in front of every route: request id, API keys, body size, CORS.

Order, outermost first: CORS (only when ``--allowed-origins`` is set, so that preflights are
answered before the key check and even a 401 carries the CORS headers) → ``RequestContext``
→ the FastAPI app. ``RequestContext`` does, per HTTP request:

1. request id: ``X-Request-Id`` from the client (1..128 visible ASCII characters, else 400)
   or a fresh uuid4 hex; stored in ``scope["vserve.request_id"]`` (and whether the client
   chose it in ``scope["vserve.client_request_id"]``) and echoed on every response;
2. API keys (only with ``--api-key``/``VSERVE_API_KEY``): ``Authorization: Bearer <key>`` on
   every route that runs the model or the tokenizer (``/v1/...``, ``/tokenize``,
   ``/detokenize``); the health, readiness, version, metrics and docs routes stay open. The
   presented key is compared with every configured key in constant time;
3. body size: a ``Content-Length`` over ``--max-request-body-bytes`` is a 413 before the body
   is read; a body without one (chunked) is counted while it streams in and becomes a 413 as
   soon as it passes the limit.

It is plain ASGI rather than Starlette's BaseHTTPMiddleware: no extra task or body copy on
the hot path, and streaming responses pass through untouched.
"""

from __future__ import annotations

import hmac
import uuid
from typing import Any

import msgspec
from fastapi import FastAPI, HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vserve.api.errors import AUTHENTICATION, error_body
from vserve.config import ServerConfig

REQUEST_ID_KEY = "vserve.request_id"
CLIENT_REQUEST_ID_KEY = "vserve.client_request_id"
_MAX_REQUEST_ID_LEN = 128
_GUARDED_EXACT = frozenset({"/v1", "/tokenize", "/detokenize"})

_encoder = msgspec.json.Encoder()


def is_guarded(path: str) -> bool:
    """Routes that run the model or the tokenizer need the key (unknown /v1 routes too, so
    that probing for routes without a key learns nothing)."""
    return path.startswith("/v1/") or path in _GUARDED_EXACT


def _valid_request_id(raw: bytes) -> bool:
    return 0 < len(raw) <= _MAX_REQUEST_ID_LEN and all(0x21 <= b <= 0x7E for b in raw)


class RequestContext:
    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], max_body_bytes: int) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.max_body_bytes = max_body_bytes

    def _authorized(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        ok = False
        for key in self.keys:  # no early exit: the time does not tell which key matched
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id: bytes | None = None
        auth: bytes | None = None
        length: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value
            elif name == b"authorization":
                auth = value
            elif name == b"content-length":
                length = value
        from_client = request_id is not None
        bad_id = from_client and not _valid_request_id(request_id or b"")
        if request_id is None or bad_id:
            request_id = uuid.uuid4().hex.encode()
        scope[REQUEST_ID_KEY] = request_id.decode("ascii")
        scope[CLIENT_REQUEST_ID_KEY] = from_client and not bad_id
        id_header = (b"x-request-id", request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        if bad_id:
            await _reply(send_with_id, 400, "X-Request-Id must be 1 to 128 visible ASCII "
                         "characters", param="X-Request-Id")
            return
        if self.keys and is_guarded(scope["path"]) and not self._authorized(auth):
            await _reply(send_with_id, 401, "missing or invalid API key: send "
                         "'Authorization: Bearer <key>'", type_=AUTHENTICATION,
                         headers=[(b"www-authenticate", b"Bearer")])
            return
        limit = self.max_body_bytes
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > limit:
                await _reply(send_with_id, 413, f"the request body is {declared} bytes; the "
                             f"limit is {limit} bytes")
                return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI re-raises HTTPExceptions met while reading the body, and the
                    # app's handler renders it as the OpenAI-shaped 413.
                    raise HTTPException(413, f"the request body is over the limit of {limit} "
                                             "bytes")
            return message

        await self.app(scope, receive_limited, send_with_id)


async def _reply(send: Send, status: int, message: str, type_: str | None = None,
                 param: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = _encoder.encode(error_body(status, message, type_, param))
    start: dict[str, Any] = {
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *(headers or ())],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})


def add_middleware(app: FastAPI, config: ServerConfig) -> None:
    """Install the middleware (call once, before serving); see the module docstring."""
    app.add_middleware(RequestContext, api_keys=config.api_keys,
                       max_body_bytes=config.max_request_body_bytes)
    if config.allowed_origins:  # added last = outermost
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=list(config.allowed_methods),
            allow_headers=list(config.allowed_headers),
            allow_credentials=config.allow_credentials,
            expose_headers=["X-Request-Id"],
        )
