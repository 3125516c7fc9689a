"""Every error is the OpenAI envelope {"error": {message, type, param, code}} with the right status
(issue #10): unknown model, wrong task, bad JSON, schema violations, unknown routes, and a too-long
prompt answered 400 before any byte of a stream. None of them reaches the engine."""

from __future__ import annotations

import pytest

from tests.unit.fake_engine import CHAT, EMBED, ScriptedEngine, assert_envelope, build_app, metric, run, user
from tests.unit.rag_fakes import TokenizerEmbedder

CHAT_PATH, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"


@pytest.fixture
def engine(chat_tokenizer):
    return ScriptedEngine(chat_tokenizer, "fine.", max_model_len=64)


@pytest.fixture
def app(tmp_path, engine, chat_tokenizer):
    return build_app(tmp_path, engine, TokenizerEmbedder(chat_tokenizer))


def call(method, path, **kw):
    async def scenario(client):
        return await client.request(method, path, **kw)

    return scenario


@pytest.mark.parametrize("path, body", [
    (CHAT_PATH, {"model": "nope", "messages": user("x")}),
    (COMPLETIONS, {"model": "nope", "prompt": "x"}),
    (EMBEDDINGS, {"model": "nope", "input": "x"}),
    (CHAT_PATH, {"model": "nope", "messages": user("x"), "stream": True}),
])
def test_unknown_model_is_404(app, engine, path, body):
    r = run(app, call("POST", path, json=body))
    assert r.status_code == 404, r.text
    err = assert_envelope(r.json(), "not_found_error", "model_not_found", "model")  # as GET /v1/models/{id}
    assert "nope" in err["message"]
    assert engine.requests == []


def test_unknown_model_card_is_404(app):
    r = run(app, call("GET", "/v1/models/nope"))
    assert r.status_code == 404
    assert_envelope(r.json(), "not_found_error", "model_not_found", "model")


@pytest.mark.parametrize("path, body", [
    (EMBEDDINGS, {"model": CHAT, "input": "x"}),
    (CHAT_PATH, {"model": EMBED, "messages": user("x")}),
    (COMPLETIONS, {"model": EMBED, "prompt": "x"}),
])
def test_wrong_task_is_400(app, path, body):
    r = run(app, call("POST", path, json=body))
    assert r.status_code == 400, r.text
    assert_envelope(r.json(), "invalid_request_error", "wrong_model_task", "model")


@pytest.mark.parametrize("path", [CHAT_PATH, COMPLETIONS, EMBEDDINGS, "/v1/rag/collections"])
def test_malformed_json_is_400(app, path):
    r = run(app, call("POST", path, content=b'{"messages": [', headers={"content-type": "application/json"}))
    assert r.status_code == 400, r.text
    err = assert_envelope(r.json(), "invalid_request_error")
    assert "malformed JSON" in err["message"]


@pytest.mark.parametrize("path, body, param", [
    (CHAT_PATH, {"model": CHAT}, "messages"),
    (CHAT_PATH, {"messages": "hello"}, "messages"),
    (CHAT_PATH, {"messages": user("x"), "temperature": 9}, "temperature"),
    (CHAT_PATH, {"messages": user("x"), "n": 0}, "n"),
    (CHAT_PATH, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    (CHAT_PATH, {"messages": user("x"), "top_logprobs": 2}, None),  # needs logprobs: a model-level check
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    (EMBEDDINGS, {}, "input"),
    ("/v1/rag/collections", {"name": "bad name!"}, "name"),
])
def test_schema_violations_are_400_naming_the_field(app, path, body, param):
    r = run(app, call("POST", path, json=body))
    assert r.status_code == 400, r.text  # FastAPI's 422 is mapped to OpenAI's 400
    assert_envelope(r.json(), "invalid_request_error", param=param)


@pytest.mark.parametrize("path, body, param, code", [
    # tools and schemas that cannot be honoured: a 400 naming the field, never silently ignored
    (CHAT_PATH, {"messages": user("x"), "tools": [{"type": "function"}]}, "tools.0", None),
    (CHAT_PATH, {"messages": user("x"), "tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools.0.function.name", None),
    (CHAT_PATH, {"messages": user("x"), "tool_choice": "required"}, "tool_choice", None),
    (CHAT_PATH, {"messages": user("x"), "tools": [{"type": "function", "function": {"name": "f"}}],
                 "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", None),
    (CHAT_PATH, {"messages": user("x"), "response_format": {"type": "xml"}}, "response_format.type", None),
    (CHAT_PATH, {"messages": user("x"), "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "not": {"required": ["a"]}}}}},
     "response_format.json_schema.schema", "unsupported_schema"),
    (COMPLETIONS, {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"$ref": "#/missing"}}}}, "response_format.json_schema.schema", None),
    (CHAT_PATH, {"messages": user("x"), "functions": [{"name": "f"}]}, "functions", "unsupported"),
    (CHAT_PATH, {"messages": user("x"), "function_call": {"name": "f"}}, "function_call", "unsupported"),
    (CHAT_PATH, {"messages": [*user("x"), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "messages", None),
    (CHAT_PATH, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}, "messages",
     "images_not_supported"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens", None),
    (COMPLETIONS, {"prompt": [1, 10**6]}, "prompt", None),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [10**6]}, "stop_token_ids", None),
])
def test_request_checks_are_400(app, engine, path, body, param, code):
    r = run(app, call("POST", path, json=body))
    assert r.status_code == 400, r.text
    assert_envelope(r.json(), "invalid_request_error", code, param)
    assert engine.requests == []


def test_too_many_sequences_names_the_limit(tmp_path, engine):
    app = build_app(tmp_path, engine, max_sequences_per_request=4)
    r = run(app, call("POST", COMPLETIONS, json={"prompt": ["a", "b", "c"], "n": 2}))
    assert r.status_code == 400
    err = assert_envelope(r.json(), "invalid_request_error", "too_many_sequences", "n")
    assert "max_sequences_per_request" in err["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, body, param", [
    (CHAT_PATH, {"messages": user("word " * 80)}, "messages"),
    (COMPLETIONS, {"prompt": "word " * 80}, "prompt"),
    (COMPLETIONS, {"prompt": ["short", "word " * 80]}, "prompt"),  # one prompt of several: none is served
])
def test_too_long_prompt_is_400_before_any_byte(app, engine, stream, path, body, param):
    async def scenario(client):
        r = await client.post(path, json={**body, "stream": stream})
        return r, (await client.get("/metrics")).text

    r, metrics = run(app, scenario)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/json"  # a real response, not 200 + an SSE error event
    err = assert_envelope(r.json(), "invalid_request_error", "context_length_exceeded", param)
    assert "64" in err["message"]
    assert engine.requests == []
    assert metric(metrics, "frontier_requests_total", route=path, status="400") == 1


@pytest.mark.parametrize("path, body", [
    (CHAT_PATH, {"messages": user("x"), "max_tokens": 60}),
    (COMPLETIONS, {"prompt": "x y z", "max_tokens": 62}),
])
def test_prompt_plus_max_tokens_over_the_context_is_400(app, path, body):
    r = run(app, call("POST", path, json=body))
    assert r.status_code == 400, r.text
    assert_envelope(r.json(), "invalid_request_error", "context_length_exceeded", "max_tokens")


def test_unknown_route_and_method_are_envelopes(app):
    async def scenario(client):
        return await client.get("/v1/nothing"), await client.get(CHAT_PATH)

    missing, wrong_method = run(app, scenario)
    assert missing.status_code == 404
    assert_envelope(missing.json(), "not_found_error")
    assert wrong_method.status_code == 405
    assert_envelope(wrong_method.json(), "invalid_request_error")


def test_fields_that_change_nothing_are_accepted(app, engine):
    body = {"messages": user("x"), "response_format": {"type": "text"}, "tool_choice": "none", "max_tokens": 3}
    assert run(app, call("POST", CHAT_PATH, json=body)).status_code == 200


@pytest.mark.parametrize("given,echoed", [("client-7f3a.retry:2", True), ("has spaces", False), ("x" * 200, False),
                                          (None, False)])
def test_every_response_carries_a_request_id(app, given, echoed):
    headers = {} if given is None else {"x-request-id": given}

    async def scenario(client):
        return [await client.post(CHAT_PATH, json={"messages": user("x"), "max_tokens": 2}, headers=headers),
                await client.post(CHAT_PATH, json={"messages": "bad"}, headers=headers),
                await client.get("/v1/models/nope", headers=headers)]

    ids = [r.headers.get("x-request-id") for r in run(app, scenario)]
    assert all(ids) and len(set(ids)) == (1 if echoed else 3)
    assert (ids[0] == given) is echoed


def test_one_error_type_per_status():
    from service.api.errors import APIError

    expected = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                503: "server_error", 504: "server_error"}
    assert {status: APIError(status, "x").type for status in expected} == expected


def test_the_access_log_line_names_the_request_id(app, caplog):
    import logging

    async def scenario(client):
        return await client.post(CHAT_PATH, json={"messages": "bad"}, headers={"x-request-id": "trace-42"})

    with caplog.at_level(logging.INFO, logger="frontier.access"):
        r = run(app, scenario)
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "frontier.access"]
    assert r.status_code == 400 and any('"POST /v1/chat/completions" 400' in x and "request_id=trace-42" in x
                                        for x in lines), lines
