"""The FastAPI application of one API server (minimal request path; see docs/design/api.md)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vserve import __version__
from vserve.api.state import ServerState
from vserve.engine.messages import EngineCoreRequest
from vserve.frontend.engine_client import EngineDeadError, EngineUnavailableError
from vserve.frontend.input_processor import check_prompt, child_params
from vserve.frontend.output_processor import RequestState
from vserve.sampling_params import SamplingParams


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param,
                                   "code": status}}, status_code=status)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="vserve", version=__version__)
    app.state.vserve = state

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if state.healthy else 503)

    @app.get("/ready")
    async def ready() -> Response:
        return Response(status_code=200 if state.accepting else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "vserve",
             "max_model_len": state.max_model_len} for name in state.model_names]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        if not state.accepting:
            return error_response(503, "the server is not accepting requests", "unavailable")
        body = await request.json()
        prompt = body.get("prompt")
        ids = prompt if isinstance(prompt, list) else state.tokenizer.encode(str(prompt))
        params = SamplingParams(
            temperature=float(body.get("temperature", 1.0)),
            max_tokens=int(body.get("max_tokens", 16)),
            ignore_eos=bool(body.get("ignore_eos", False)),
            seed=body.get("seed"),
        )
        try:
            check_prompt(ids, params, state.max_model_len, state.vocab_size)
        except ValueError as e:
            return error_response(400, str(e))
        rid = request.headers.get("x-request-id") or f"cmpl-{uuid.uuid4().hex}"
        req = EngineCoreRequest(rid, ids, child_params(params, 0), state.eos_token_ids,
                                time.time(), state.client_index)
        try:
            stream = state.engine_client.add_request(req)
        except (EngineDeadError, EngineUnavailableError) as e:
            return error_response(503, str(e), "unavailable")
        rs = RequestState(rid, 0, ids, params, state.tokenizer)
        created = int(time.time())

        def chunk(text: str, finish: str | None, usage: dict[str, int] | None = None) -> dict:
            out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                                   "model": state.model_name,
                                   "choices": [{"index": 0, "text": text,
                                                "finish_reason": finish, "logprobs": None}]}
            if usage is not None:
                out["usage"] = usage
            return out

        def usage() -> dict[str, int]:
            return {"prompt_tokens": len(ids), "completion_tokens": len(rs.token_ids),
                    "total_tokens": len(ids) + len(rs.token_ids)}

        async def run() -> AsyncIterator[tuple[str, str | None]]:
            try:
                while not rs.finished:
                    delta = rs.apply(await stream.get())
                    if delta is None:
                        continue
                    if delta.needs_abort:
                        state.engine_client.abort([rid])
                    yield delta.text, delta.finish_reason
            finally:
                if not rs.finished:
                    state.engine_client.abort([rid])

        if body.get("stream"):
            async def sse() -> AsyncIterator[str]:
                try:
                    async for text, finish in run():
                        yield f"data: {json.dumps(chunk(text, finish))}\n\n"
                except (EngineDeadError, EngineUnavailableError) as e:
                    err = {"error": {"message": str(e), "type": "server_error", "param": None,
                                     "code": 503}}
                    yield f"data: {json.dumps(err)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        try:
            async for _ in run():
                pass
        except (EngineDeadError, EngineUnavailableError) as e:
            return error_response(503, str(e), "server_error")
        return JSONResponse(chunk(rs.text, rs.finish_reason, usage()))

    return app
