"""The FastAPI application of one API server (see docs/design/api.md).

Routes: ``POST /v1/completions`` (completions.py), ``POST /v1/chat/completions`` (chat.py),
``GET /v1/models[/{model}]``, ``POST /tokenize`` and ``/detokenize`` (tokenize.py),
``GET /health`` (liveness: 503 once an engine died), ``GET /ready`` (readiness: 503 until
serving and while draining), ``GET /version``, and FastAPI's ``/openapi.json`` and ``/docs``.
Middleware (request id, API keys, body size, CORS) is in middleware.py, the error format in
errors.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.responses import Response

from vserve import __version__
from vserve.api import chat, completions, tokenize
from vserve.api.errors import add_exception_handlers
from vserve.api.generation import resolve_model
from vserve.api.middleware import add_middleware
from vserve.api.responses import (
    ERROR_RESPONSES,
    HealthResponse,
    ModelCard,
    ModelList,
    ReadyResponse,
    VersionResponse,
)
from vserve.api.serving import json_response
from vserve.api.state import ServerState

_DESCRIPTION = """An OpenAI-compatible API. Unknown fields and unsupported OpenAI features are
rejected with 400 naming the field; errors are `{"error": {"message", "type", "param",
"code"}}`. See docs/design/api.md."""


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="vserve", version=__version__, description=_DESCRIPTION)
    app.state.vserve = state
    add_exception_handlers(app)
    add_middleware(app, state.server_config)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "vserve",
                "root": state.engine_config.model.model, "max_model_len": state.max_model_len}

    @app.get("/health", tags=["operations"], response_model=HealthResponse,
             responses={503: {"description": "An engine died", "model": HealthResponse}})
    async def health() -> Response:
        """Liveness: 200 while some engine serves or a dead one is being replaced; the body
        lists the ranks that are down."""
        down = sorted(state.engine_client.core.dead_engines)
        healthy = state.healthy
        return json_response({"status": "healthy" if healthy else "unhealthy",
                              "engines_down": down}, status=200 if healthy else 503)

    @app.get("/ready", tags=["operations"], response_model=ReadyResponse,
             responses={503: {"description": "Starting, draining or unhealthy",
                              "model": ReadyResponse}})
    async def ready() -> Response:
        """Readiness: 200 while the server takes new requests (some engine serves)."""
        status = ("ready" if state.accepting else "draining" if state.draining
                  else "starting" if not state.ready else "unhealthy")
        return json_response({"status": status}, status=200 if state.accepting else 503)

    @app.get("/version", tags=["operations"], response_model=VersionResponse)
    async def version() -> Response:
        return json_response({"version": __version__})

    @app.get("/v1/models", tags=["models"], response_model=ModelList,
             responses={401: ERROR_RESPONSES[401]})
    async def list_models() -> Response:
        """The served model names (``--served-model-name``; any of them is a valid model)."""
        return json_response({"object": "list",
                              "data": [model_card(name) for name in state.model_names]})

    @app.get("/v1/models/{model:path}", tags=["models"], response_model=ModelCard,
             responses={401: ERROR_RESPONSES[401], 404: ERROR_RESPONSES[404]})
    async def retrieve_model(model: str) -> Response:
        return json_response(model_card(resolve_model(state, model)))

    completions.add_routes(app, state)
    chat.add_routes(app, state)
    tokenize.add_routes(app, state)
    return app
