"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes), behind the API key.

``/tokenize`` takes a ``prompt`` (special tokens added by default, as for a completion) or
chat ``messages`` (rendered with the chat template, no special tokens added, as for a chat
completion), so its ``count`` is exactly the ``prompt_tokens`` the same input would use.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.responses import Response

from vserve.api.errors import APIError
from vserve.api.generation import check_accepting, resolve_model
from vserve.api.protocol import DetokenizeRequest, TokenizeRequest
from vserve.api.responses import ERROR_RESPONSES, DetokenizeResponse, TokenizeResponse
from vserve.api.serving import json_response
from vserve.api.state import ServerState


def add_routes(app: FastAPI, state: ServerState) -> None:
    tokenizer = state.tokenizer

    @app.post("/tokenize", response_model=None, tags=["tokenizer"],
              responses={200: {"model": TokenizeResponse}, **ERROR_RESPONSES})
    async def tokenize(body: TokenizeRequest) -> Response:
        """Token ids of a prompt or of chat messages rendered with the chat template."""
        resolve_model(state, body.model)
        check_accepting(state)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt,
                                   add_special_tokens=body.add_special_tokens is not False)
        else:
            try:
                text = tokenizer.apply_chat_template(
                    [m.as_template_input() for m in body.messages or ()],
                    add_generation_prompt=body.add_generation_prompt is not False)
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
            ids = tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
        out: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len,
                               "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return json_response(out)

    @app.post("/detokenize", response_model=None, tags=["tokenizer"],
              responses={200: {"model": DetokenizeResponse}, **ERROR_RESPONSES})
    async def detokenize(body: DetokenizeRequest) -> Response:
        """The text of token ids (special tokens kept, as ``tokenize`` would produce them)."""
        resolve_model(state, body.model)
        check_accepting(state)
        vocab = state.vocab_size
        for i, tok in enumerate(body.tokens):
            if not 0 <= tok < vocab:
                raise APIError(400, f"token id {tok} is outside the vocabulary "
                               f"(0..{vocab - 1})", f"tokens[{i}]")
        text = tokenizer.decode(body.tokens, skip_special_tokens=False)
        return json_response({"prompt": text})
