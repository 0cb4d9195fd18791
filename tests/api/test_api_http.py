"""The HTTP surface below what the ``openai`` client shows: SSE framing, malformed bodies,
headers, auth on each route, body limits, CORS, request ids, and a schemathesis run of the
server's own OpenAPI document that must find no 5xx."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from helpers.serve import ServeProcess, serve

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "http://app.example"
BODY_LIMIT = 4096
WINDOW = 64


@pytest.fixture(scope="module")
def srv() -> Iterator[ServeProcess]:
    with serve("demo", "--api-server-count", "2", "--api-key", KEY, "--allowed-origins", ORIGIN,
               "--max-request-body-bytes", str(BODY_LIMIT), "--max-model-len", str(WINDOW)) as s:
        yield s


@pytest.fixture(scope="module")
def http(srv: ServeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:
        yield c


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


def sse_events(r: httpx.Response) -> list[str]:
    """The ``data:`` payloads of a complete SSE body, checking the framing on the way."""
    assert r.headers["content-type"].startswith("text/event-stream")
    text = r.text
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, event
    return [e[len("data: "):] for e in events]


# ---- routes and keys ------------------------------------------------------------------------

def test_open_and_guarded_routes(http: httpx.Client) -> None:
    for path in ("/health", "/ready", "/version", "/openapi.json", "/docs"):
        assert http.get(path).status_code == 200, path
    assert http.get("/version").json()["version"]
    guarded = [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "hi"}),
               ("POST", "/v1/chat/completions", {"messages": []}),
               ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1]}),
               ("GET", "/v1/no-such-route", None)]
    for method, path, body in guarded:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": KEY}):
            r = http.request(method, path, json=body, headers=headers)
            assert_error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
    assert http.get("/v1/models", headers=AUTH).status_code == 200
    assert http.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert_error(http.get("/v1/no-such-route", headers=AUTH), 404)
    assert_error(http.get("/no-such-route"), 404)
    assert_error(http.delete("/v1/models", headers=AUTH), 405)


def test_request_id_header(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=AUTH)
    generated = r.headers["x-request-id"]
    assert len(generated) == 32 and r.json()["id"] == f"cmpl-{generated}"
    r = http.post("/v1/chat/completions", headers={**AUTH, "X-Request-Id": "trace-42"},
                  json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "chatcmpl-trace-42"
    # Echoed on errors too, whoever produced them.
    assert http.get("/nope", headers={"X-Request-Id": "e1"}).headers["x-request-id"] == "e1"
    assert http.get("/v1/models", headers={"X-Request-Id": "e2"}).headers["x-request-id"] == "e2"
    for bad in ("has space", "x" * 129):
        r = http.get("/health", headers={"X-Request-Id": bad})
        assert_error(r, 400, "X-Request-Id")
        assert r.headers["x-request-id"] != bad


def test_same_request_id_in_flight_twice(http: httpx.Client) -> None:
    """Equal client ids at once (on both API servers) must not collide in the engine."""
    body = {"prompt": "hi", "max_tokens": 40, "ignore_eos": True, "n": 2}

    def one(_: int) -> httpx.Response:
        return http.post("/v1/completions", json=body,
                         headers={**AUTH, "X-Request-Id": "same-id"})

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(one, range(6)))
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == "same-id" and r.json()["id"] == "cmpl-same-id"
        assert r.json()["usage"]["completion_tokens"] == 80


# ---- bodies ---------------------------------------------------------------------------------

def test_malformed_and_invalid_bodies_are_400(http: httpx.Client) -> None:
    post = "/v1/completions"
    cases: list[tuple[Any, str | None]] = [
        (b'{"prompt": "hi",', None), (b"[1, 2]", None), (b"", None), (b"null", None),
        (b'{"prompt": "hi", "max_tokens": "many"}', "max_tokens"),
        (b'{"prompt": "hi", "temperature": NaN}', "temperature"),
        (b'{"prompt": "hi", "n": 1e999}', "n"),
        (b'{"prompt": [], "max_tokens": 1}', "prompt"), (b'{"max_tokens": 1}', "prompt"),
        (b'{"prompt": [1, "a"]}', "prompt"), (b'{"prompt": [[]]}', "prompt"),
        (b'{"prompt": [100000]}', "prompt"), (b'{"prompt": [-1]}', "prompt"),
        (b'{"prompt": "hi", "stream_options": {"include_usage": true}}', "stream_options"),
        (b'{"prompt": "hi", "stream": true, "prompt_logprobs": 1}', "prompt_logprobs"),
        (b'{"prompt": "hi", "priority": 1}', "priority"),
        (b'{"prompt": "hi", "seed": 99999999999999999999999}', "seed"),
        (b'{"prompt": "hi", "seed": 9223372036854775807, "n": 2}', "seed"),
        (b'{"prompt": "hi", "tools": []}', "tools"),
        (b'{"prompt": "\\ud800"}', None),
    ]
    for raw, param in cases:
        r = http.post(post, content=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert_error(r, 400, param)
    r = http.post(post, content=b'{"prompt": "hi"}', headers={**AUTH, "Content-Type": "text/plain"})
    assert_error(r, 400)
    r = http.post("/v1/chat/completions", headers=AUTH,
                  json={"messages": [{"role": "user", "content": "hi", "tool_calls": []}]})
    assert_error(r, 400, "messages[0]")


def test_body_size_limit(http: httpx.Client, srv: ServeProcess) -> None:
    big = json.dumps({"prompt": "a" * BODY_LIMIT}).encode()
    r = http.post("/v1/completions", content=big,
                  headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
        for i in range(0, len(big), 512):
            yield big[i:i + 512]

    r = http.post("/v1/completions", content=chunks(),
                  headers={**AUTH, "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413)
    small = json.dumps({"prompt": "a" * 40, "max_tokens": 1}).encode()
    r = http.post("/v1/completions", content=iter([small]),
                  headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    # A lying Content-Length is refused before any body is read.
    with socket.create_connection((srv.base_url.split("//")[1].split(":")[0],
                                   int(srv.base_url.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 99999999\r\n\r\n")
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head


# ---- streaming framing ----------------------------------------------------------------------

def test_sse_framing_completions(http: httpx.Client) -> None:
    body = {"prompt": "hello", "max_tokens": 30, "stream": True, "ignore_eos": True,
            "n": 2, "logprobs": 1, "stream_options": {"include_usage": True}}
    r = http.post("/v1/completions", json=body, headers=AUTH)
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk = chunks.pop()
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 60
    tokens = {0: 0, 1: 0}
    last: dict[int, Any] = {}
    for chunk in chunks:
        assert "usage" not in chunk and chunk["object"] == "text_completion"
        (choice,) = chunk["choices"]
        i = choice["index"]
        assert i not in last or last[i]["finish_reason"] is None  # nothing after the finish
        assert choice["text"] or choice["finish_reason"]  # no empty non-final chunk
        tokens[i] += len(choice["logprobs"]["tokens"])
        last[i] = choice
    assert tokens == {0: 30, 1: 30}  # held-back tokens' logprobs are not lost
    assert last[0]["finish_reason"] == last[1]["finish_reason"] == "length"


def test_sse_framing_chat(http: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    events = sse_events(http.post("/v1/chat/completions", json=body, headers=AUTH))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stream_errors_before_headers_are_plain_errors(http: httpx.Client) -> None:
    r = http.post("/v1/completions", headers=AUTH,
                  json={"prompt": "hi", "stream": True, "max_tokens": 10 * WINDOW})
    assert_error(r, 400, "max_tokens")


# ---- CORS -----------------------------------------------------------------------------------

def test_cors(http: httpx.Client) -> None:
    pre = http.options("/v1/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200  # a preflight carries no key
    assert pre.headers["access-control-allow-origin"] == ORIGIN
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                  headers={**AUTH, "Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = http.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    r = http.get("/v1/models", headers={**AUTH, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


# ---- tokenizer routes -----------------------------------------------------------------------

def test_tokenize_and_detokenize(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"prompt": "hello", "return_token_strs": True}, headers=AUTH)
    out = r.json()
    assert out["count"] == len(out["tokens"]) == len(out["token_strs"])
    assert out["max_model_len"] == WINDOW
    bare = http.post("/tokenize", json={"prompt": "hello", "add_special_tokens": False},
                     headers=AUTH).json()["tokens"]
    assert out["tokens"][1:] == bare  # the BOS
    text = http.post("/detokenize", json={"tokens": bare}, headers=AUTH).json()["prompt"]
    assert text == "hello"
    msgs = [{"role": "user", "content": "hi"}]
    chat = http.post("/tokenize", json={"messages": msgs}, headers=AUTH).json()
    r = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}, headers=AUTH)
    assert r.json()["usage"]["prompt_tokens"] == chat["count"]
    assert_error(http.post("/tokenize", json={}, headers=AUTH), 400)
    assert_error(http.post("/tokenize", json={"prompt": "a", "messages": msgs}, headers=AUTH), 400)
    assert_error(http.post("/tokenize", json={"prompt": "a", "model": "x"}, headers=AUTH), 404)
    assert_error(http.post("/detokenize", json={"tokens": [1, 10**6]}, headers=AUTH), 400,
                 "tokens[1]")
    assert_error(http.post("/detokenize", json={"tokens": [-1]}, headers=AUTH), 400, "tokens[0]")


# ---- fuzzing --------------------------------------------------------------------------------

def test_schemathesis_finds_no_server_errors(srv: ServeProcess) -> None:
    """Valid and invalid requests generated from /openapi.json: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(srv.base_url + "/openapi.json")
    seen: dict[str, set[int]] = {}
    for mode, examples in ((schemathesis.GenerationMode.POSITIVE, 40),
                           (schemathesis.GenerationMode.NEGATIVE, 100)):
        @given(case=schema.as_strategy(generation_mode=mode))
        # Valid cases are derandomized so that coverage (some reach the model) is stable;
        # invalid ones are fresh each run.
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate],
                  derandomize=mode == schemathesis.GenerationMode.POSITIVE)
        def check(case: Any) -> None:
            r = case.call(base_url=srv.base_url, headers=AUTH, timeout=60)
            seen.setdefault(case.operation.label, set()).add(r.status_code)
            assert r.status_code < 500, (case.operation.label, case.body, r.text)

        check()
    # The run reached the model, not only the validators.
    assert 200 in seen.get("POST /v1/completions", set()) | seen.get(
        "POST /v1/chat/completions", set()), seen
    # And nothing it sent broke the server.
    r = httpx.post(srv.base_url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "demo", "prompt": "still fine", "max_tokens": 2})
    assert r.status_code == 200, r.text
