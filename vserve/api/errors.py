"""OpenAI-shaped errors: one body format for every failure the API reports.

Every error response is ``{"error": {"message", "type", "param", "code"}}`` with ``code`` the
HTTP status (as vLLM does) and ``type`` one of the strings below. Invariants:

* what a client sends is answered with a 4xx (400 for schema violations and malformed JSON,
  never FastAPI's 422), never a 500: a 500 means a bug in vserve and is logged with its
  traceback;
* ``param`` names the offending field when there is one (``messages[0].content``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from vserve.logging_utils import get_logger
from vserve.protocol.sampling import SamplingParams

logger = get_logger(__name__)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVICE_UNAVAILABLE = "service_unavailable_error"
SERVER_ERROR = "server_error"

_TYPE_OF_STATUS = {400: INVALID_REQUEST, 401: AUTHENTICATION, 404: NOT_FOUND,
                   405: INVALID_REQUEST, 413: INVALID_REQUEST, 503: SERVICE_UNAVAILABLE}

# OpenAI request fields vserve knows of and deliberately does not implement: rejected with a
# message that says so (any other unknown field is rejected as unrecognized).
UNSUPPORTED_FIELDS = frozenset({
    "functions", "function_call", "audio",
    "prediction", "reasoning_effort", "service_tier", "web_search_options", "verbosity",
    "moderation", "prompt_cache_options", "prompt_cache_retention", "include_obfuscation",
    "continuous_usage_stats", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "chat_template", "chat_template_kwargs",
    "continue_final_message", "documents", "echo",
    "reasoning_content", "truncate_prompt_tokens", "return_tokens_as_token_ids",
    "modalities", "store", "best_of", "suffix",
})

_encoder = msgspec.json.Encoder()


class APIError(Exception):
    """Raised anywhere in a handler; rendered as the OpenAI error body by ``build_app``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or _TYPE_OF_STATUS.get(status, SERVER_ERROR if status >= 500
                                                 else INVALID_REQUEST)
        self.headers = dict(headers or {})


def error_body(status: int, message: str, type_: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message,
                      "type": type_ or _TYPE_OF_STATUS.get(status, SERVER_ERROR),
                      "param": param, "code": status}}


def error_response(status: int, message: str, type_: str | None = None,
                   param: str | None = None,
                   headers: Mapping[str, str] | None = None) -> Response:
    body = error_body(status, message, type_, param)
    try:
        content = _encoder.encode(body)
    except UnicodeEncodeError:  # a message quoting invalid text: escape it rather than fail
        content = json.dumps(body).encode()
    return Response(content, status_code=status, media_type="application/json",
                    headers=headers)


_FIELD_NAMES = frozenset(SamplingParams.__struct_fields__) | {"stream_options", "top_logprobs"}


def bad_value(error: ValueError, rename: Mapping[str, str] | None = None) -> APIError:
    """A ValueError from SamplingParams or a request model ("<field> must be ...") as a 400
    whose param is that field (``rename`` maps internal names to the ones the client used)."""
    message = str(error)
    first, _, rest = message.partition(" ")
    if first not in _FIELD_NAMES:
        return APIError(400, message)
    if rename and first in rename:
        first = rename[first]
        message = f"{first} {rest}"
    return APIError(400, message, first)


def format_loc(loc: Sequence[int | str]) -> str | None:
    """("body", "messages", 0, "content") → "messages[0].content"; None for the body itself."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or None


def validation_message(err: Mapping[str, Any]) -> tuple[str, str | None]:
    """(message, param) for one pydantic error, phrased for an API user."""
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    param = format_loc(loc)
    if kind == "json_invalid":
        detail = err.get("ctx", {}).get("error", "invalid JSON")
        return f"the request body is not valid JSON: {detail}", None
    if kind == "extra_forbidden":
        name = str(loc[-1]) if loc else "?"
        if name in UNSUPPORTED_FIELDS:
            return f"'{param}' is not supported by vserve", param
        return f"'{param}' is not a recognized parameter", param
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, ValueError) and isinstance(getattr(cause, "param", None), str):
        return str(cause), cause.param  # type: ignore[attr-defined]
    if param is None and kind in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object (Content-Type: application/json)", None
    if param is None and kind == "missing":
        return "the request needs a JSON body", None
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if param is None or msg.startswith(param.split("[", 1)[0].split(".", 1)[0] + " "):
        return msg, param  # the message names the field already
    return f"{param}: {msg}", param


def add_exception_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        message, param = validation_message(errors[0]) if errors else ("invalid request", None)
        return error_response(400, message, INVALID_REQUEST, param)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=exc.headers)

    async def on_bad_text(request: Request, exc: Exception) -> Response:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"), which Python decodes into a
        # str that cannot be encoded again: the client's text is at fault, not vserve.
        if isinstance(exc, UnicodeEncodeError) and exc.reason == "surrogates not allowed":
            return error_response(400, "the request contains a string that is not valid "
                                  "Unicode (an unpaired UTF-16 surrogate escape such as "
                                  "\\ud800)", INVALID_REQUEST)
        return await on_unexpected(request, exc)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("internal error on %s %s", request.method, request.url.path,
                         exc_info=exc)
        return error_response(500, "internal server error", SERVER_ERROR)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    # Registered for its own class, so its response keeps the connection alive (a handler
    # of Exception runs in the outermost middleware, after the connection is condemned).
    app.add_exception_handler(UnicodeEncodeError, on_bad_text)
    app.add_exception_handler(Exception, on_unexpected)
