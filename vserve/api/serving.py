"""One response path for completions and chat: streaming or not, same rules.

The route handler validates, builds a ``Generation`` and a ``Formatter`` (the JSON shape of
its API) and calls ``respond``. Here:

* streaming: ``data: {chunk}`` events as deltas arrive (choices interleaved, each chunk
  names its index), never an empty non-final text chunk — a delta whose text the
  detokenizer held back (partial UTF-8, a possible stop-string prefix) is merged into the
  choice's next chunk together with its tokens and logprobs —, ``finish_reason`` on each
  choice's last chunk, then the usage chunk (``stream_options.include_usage``) and
  ``data: [DONE]``. A failure after the headers were sent is an ``{"error": ...}`` event
  followed by ``[DONE]``;
* non-streaming: one JSON body when every choice finished; an engine failure is an error
  status (503 / 500).

Both abort the engine requests when the client disconnects (see ``sse.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import Request
from starlette.responses import Response

from vserve.api.errors import APIError, error_body
from vserve.api.generation import Generation, GenerationError
from vserve.api.sse import DONE, SSEResponse, encode_json, run_until_disconnect, sse_event
from vserve.frontend.output_processor import CompletionDelta
from vserve.logging_utils import get_logger
from vserve.outputs import PositionLogprobs

logger = get_logger(__name__)


class Formatter(Protocol):
    def prelude(self) -> list[dict[str, Any]]:
        """Chunks to send before any output (chat: the role of each choice)."""
        ...

    def chunk(self, delta: CompletionDelta, token_ids: list[int], text: str,
              logprobs: list[PositionLogprobs] | None) -> dict[str, Any] | None:
        """One streamed chunk for ``delta.index`` (tokens and text include held-back ones);
        None when there is nothing to send yet (a tool call still being read)."""
        ...

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]: ...

    def response(self) -> dict[str, Any]:
        """The whole non-streaming body, from the finished generation."""
        ...


class _Held:
    """A choice's tokens whose text has not been shown yet."""

    __slots__ = ("token_ids", "logprobs")

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] | None = None


async def _events(gen: Generation, fmt: Formatter, include_usage: bool
                  ) -> AsyncIterator[bytes]:
    held: dict[int, _Held] = {}
    try:
        for chunk in fmt.prelude():
            yield sse_event(chunk)
        async for delta in gen.deltas():
            token_ids, logprobs = delta.token_ids, delta.logprobs
            h = held.get(delta.index)
            if not delta.text and delta.finish_reason is None:
                if h is None:
                    h = held[delta.index] = _Held()
                h.token_ids.extend(token_ids)
                if logprobs is not None:
                    h.logprobs = (h.logprobs or []) + logprobs
                continue
            if h is not None:
                del held[delta.index]
                token_ids = h.token_ids + token_ids
                if h.logprobs is not None or logprobs is not None:
                    logprobs = (h.logprobs or []) + (logprobs or [])
            out = fmt.chunk(delta, token_ids, delta.text, logprobs)
            if out is not None:
                yield sse_event(out)
        if include_usage:
            yield sse_event(fmt.usage_chunk(gen.usage()))
    except GenerationError as e:
        yield sse_event(error_body(e.status, e.message))
    except Exception:  # a bug: still tell the client, never cut the stream silently
        logger.exception("streaming response %s failed", gen.response_id)
        yield sse_event(error_body(500, "internal server error"))
    finally:
        gen.close()
    yield DONE


async def respond(request: Request, gen: Generation, fmt: Formatter, stream: bool,
                  include_usage: bool) -> Response:
    """Start the generation and answer with SSE or one JSON body (see the module doc)."""
    gen.start()
    if stream:
        return SSEResponse(_events(gen, fmt, include_usage), on_close=gen.close)
    try:
        finished = await run_until_disconnect(request.receive, gen.run())
    except GenerationError as e:
        raise APIError(e.status, e.message) from None
    finally:
        gen.close()
    if not finished:
        # The client is gone; nobody reads this (499: nginx's "client closed request").
        return Response(status_code=499)
    return json_response(fmt.response())


def json_response(body: Any, status: int = 200) -> Response:
    return Response(encode_json(body), status_code=status, media_type="application/json")
