"""A canned OpenAI-compatible server, to measure the load generator and test its metrics.

``python -m vserve.bench.stub [--port 0] [--ttft S] [--itl S]`` prints
``stub serving on http://HOST:PORT`` and answers:

* ``POST /v1/completions`` and ``/v1/chat/completions``: ``max_tokens`` tokens (``"tok "``
  each); non-streaming, or SSE with one content event per token (a chat stream starts with a
  role-only event) and a usage event when ``stream_options.include_usage`` is set. Streams
  wait ``ttft`` seconds before the first content event and ``itl`` seconds between content
  events (the request body's ``stub_ttft`` / ``stub_itl`` override them). ``usage``:
  ``prompt_tokens`` = the number of whitespace-separated words of the prompt (or of every
  message's content), ``completion_tokens`` = ``max_tokens``.
* ``GET /v1/models``: one model, ``stub``.

It is a raw asyncio protocol on httptools' parser (keep-alive, no framework), so that a core
of it serves far more requests than one client process can send: what a benchmark against it
measures is the client.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, cast

import httptools
import msgspec


class _Msg(msgspec.Struct):
    content: Any = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class _Req(msgspec.Struct):
    prompt: Any = None
    messages: list[_Msg] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stub_ttft: float | None = None
    stub_itl: float | None = None


_decode_req = msgspec.json.Decoder(_Req).decode
_enc = msgspec.json.encode
_MODELS = _enc({"object": "list", "data": [{"id": "stub", "object": "model",
                                            "owned_by": "stub"}]})


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return _words(value.get("text"))
    return 0


def _head(status: str, ctype: bytes, length: int | None, keep_alive: bool) -> bytes:
    parts = [b"HTTP/1.1 ", status.encode(), b"\r\ncontent-type: ", ctype, b"\r\n"]
    if length is None:
        parts.append(b"transfer-encoding: chunked\r\n")
    else:
        parts.append(b"content-length: %d\r\n" % length)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class StubProtocol(asyncio.Protocol):
    def __init__(self, server: StubServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.streaming: asyncio.Task[None] | None = None

    # -- asyncio --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (asyncio and uvloop both set TCP_NODELAY on TCP transports)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._reply("400 Bad Request", b"text/plain", b"bad request", False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        method = self.parser.get_method()
        path = self.url.split(b"?", 1)[0]
        if method == b"GET" and path == b"/v1/models":
            self._reply("200 OK", b"application/json", _MODELS, keep)
            return
        if method != b"POST" or path not in (b"/v1/completions", b"/v1/chat/completions"):
            self._reply("404 Not Found", b"application/json",
                        b'{"error":{"message":"not found","type":"not_found"}}', keep)
            return
        try:
            req = _decode_req(b"".join(self.body))
        except msgspec.DecodeError as e:
            self._reply("400 Bad Request", b"application/json",
                        _enc({"error": {"message": str(e), "type": "invalid_request"}}), keep)
            return
        chat = path == b"/v1/chat/completions"
        n = req.max_tokens if req.max_tokens is not None else (req.max_completion_tokens or 16)
        prompt = _words([m.content for m in req.messages or []]) if chat else _words(req.prompt)
        usage = {"prompt_tokens": prompt, "completion_tokens": n,
                 "total_tokens": prompt + n}
        if not req.stream:
            if chat:
                body = {"id": "chatcmpl-stub", "object": "chat.completion", "created": 0,
                        "model": "stub",
                        "choices": [{"index": 0, "finish_reason": "length",
                                     "message": {"role": "assistant", "content": "tok " * n}}],
                        "usage": usage}
            else:
                body = {"id": "cmpl-stub", "object": "text_completion", "created": 0,
                        "model": "stub",
                        "choices": [{"index": 0, "text": "tok " * n, "finish_reason": "length"}],
                        "usage": usage}
            self._reply("200 OK", b"application/json", _enc(body), keep)
            return
        ttft = self.server.ttft if req.stub_ttft is None else req.stub_ttft
        itl = self.server.itl if req.stub_itl is None else req.stub_itl
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _events(chat, n, usage if with_usage else None)
        assert self.transport is not None
        self.transport.write(_head("200 OK", b"text/event-stream", None, keep))
        if ttft <= 0 and itl <= 0:
            self.transport.write(b"".join(_chunk(e) for _, e in events) + b"0\r\n\r\n")
            if not keep:
                self.transport.close()
            return
        self.streaming = asyncio.ensure_future(self._stream(events, ttft, itl, keep))

    # -- responses --
    def _reply(self, status: str, ctype: bytes, body: bytes, keep: bool) -> None:
        assert self.transport is not None
        self.transport.write(_head(status, ctype, len(body), keep) + body)
        if not keep:
            self.transport.close()

    async def _stream(self, events: list[tuple[bool, bytes]], ttft: float, itl: float,
                      keep: bool) -> None:
        assert self.transport is not None
        seen = 0
        for content, event in events:
            if content:
                delay = ttft if seen == 0 else itl
                if delay > 0:
                    await asyncio.sleep(delay)
                seen += 1
            self.transport.write(_chunk(event))
        self.transport.write(b"0\r\n\r\n")
        if not keep:
            self.transport.close()
        self.streaming = None


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _events(chat: bool, n: int, usage: dict[str, int] | None) -> list[tuple[bool, bytes]]:
    """(carries content, SSE frame) in order."""
    out: list[tuple[bool, bytes]] = []
    if chat:
        head = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0,
                "model": "stub"}
        out.append((False, _sse({**head, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""},
             "finish_reason": None}]})))
        for i in range(n):
            out.append((True, _sse({**head, "choices": [
                {"index": 0, "delta": {"content": "tok "},
                 "finish_reason": "length" if i == n - 1 else None}]})))
    else:
        head = {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": "stub"}
        for i in range(n):
            out.append((True, _sse({**head, "choices": [
                {"index": 0, "text": "tok ", "finish_reason": "length" if i == n - 1 else None}
            ]})))
    if usage is not None:
        out.append((False, _sse({**head, "choices": [], "usage": usage})))
    out.append((False, b"data: [DONE]\n\n"))
    return out


def _sse(obj: Any) -> bytes:
    return b"data: " + _enc(obj) + b"\n\n"


class StubServer:
    def __init__(self, ttft: float = 0.0, itl: float = 0.0) -> None:
        self.ttft = ttft
        self.itl = itl

    async def start(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: StubProtocol(self), host, port, backlog=4096,
                                        reuse_address=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vserve.bench.stub", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    p.add_argument("--itl", type=float, default=0.0, help="seconds between tokens")
    args = p.parse_args(argv)

    async def serve() -> None:
        server = await StubServer(args.ttft, args.itl).start(args.host, args.port)
        host, port = server.sockets[0].getsockname()[:2]
        print(f"stub serving on http://{host}:{port}", flush=True)
        await server.serve_forever()

    from vserve.bench.client import run_async

    try:
        run_async(serve())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
