"""Hostile bodies at the HTTP edge (issue #16): size limits however the body is sent, JSON nesting,
lone surrogates, and metric labels that never carry raw paths. In-process: the real app factory with
no models to load (nothing here reaches a model)."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.edge import json_depth_exceeds, lone_surrogate
from service.config import Settings


@contextmanager
def serve(tmp_path, **overrides):
    settings = Settings(models=[], data_dir=tmp_path / "data", api_key=None, **overrides)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def envelope(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ---- body size ----
def test_chunked_body_without_content_length_is_413_naming_the_limit(tmp_path):
    def chunks():  # an iterator: httpx sends it chunked, with no Content-Length
        for _ in range(50):
            yield b'{"input": "' + b"x" * 200 + b'"}'

    with serve(tmp_path, max_request_bytes=1000) as client:
        r = client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
        err = envelope(r, 413)
        assert "1000" in err["message"] and err["code"] == "request_too_large"
        r = client.post("/v1/embeddings", content=b"x" * 2000, headers={"content-type": "application/json"})
        assert envelope(r, 413)["code"] == "request_too_large"  # with Content-Length: refused unread


def test_body_limit_stops_reading_at_the_limit(tmp_path):
    """Pure ASGI: the edge pulls no more http.request messages once the limit is passed."""
    app = create_app(Settings(models=[], data_dir=tmp_path / "data", max_request_bytes=1000))
    pulled, sent = [], []

    async def receive():
        pulled.append(1)
        return {"type": "http.request", "body": b"[" * 100, "more_body": True}  # never ends

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "raw_path": b"/v1/embeddings",
             "root_path": "", "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "scheme": "http", "server": ("test", 80), "client": ("test", 1), "http_version": "1.1"}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    assert sent[0]["status"] == 413 and len(pulled) == 11


# ---- JSON nesting ----
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("path,template", [
    ("/v1/chat/completions", '{{"messages": [{{"role": "user", "content": {}}}]}}'),
    ("/v1/completions", '{{"prompt": {}}}'),
    ("/v1/embeddings", '{{"input": {}}}'),
    ("/v1/rag/collections/c/documents", '{{"documents": [{{"text": "x", "metadata": {{"a": {}}}}}]}}'),
    ("/v1/rag/collections/c/search", '{{"query": "x", "filter": {}}}'),
])
def test_json_deeper_than_the_limit_is_400_before_parsing(tmp_path, path, template):
    with serve(tmp_path) as client:
        r = client.post(path, content=template.format(_nested(5000)), headers={"content-type": "application/json"})
        err = envelope(r, 400)
        assert err["code"] == "json_too_deep" and "64" in err["message"]


def test_depth_scan_counts_only_structure():
    assert not json_depth_exceeds(b'{"a": [' + b"[" * 62 + b"]" * 62 + b"]}", 64)  # exactly 64 levels
    assert json_depth_exceeds(b'{"a": [' + b"[" * 63 + b"]" * 63 + b"]}", 64)
    in_string = b'{"a": "' + b"[{" * 500 + b'\\"[[[[\\\\", "b": [1, 2, {"c": "]]]]"}]}'
    assert not json_depth_exceeds(in_string, 64)  # brackets inside strings (escaped quotes too) are text
    assert not json_depth_exceeds(b"[1]," * 100_000, 64)  # many brackets, shallow
    t0 = time.monotonic()
    assert json_depth_exceeds(b"[" * (8 * 1024 * 1024), 64)  # the whole body limit: linear, vectorized
    assert time.monotonic() - t0 < 5


# ---- lone surrogates ----
@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages.0.content.0.text"),
    ("/v1/completions", {"prompt": ["ok", "\udfff\ud800"]}, "prompt.1"),
    ("/v1/embeddings", {"input": ["a", "b", "x\udbff"]}, "input.2"),
    ("/v1/rag/collections/c/documents", {"documents": [{"text": "\ud83d"}]}, "documents.0.text"),
    ("/v1/rag/collections/c/search", {"query": "q\udc01"}, "query"),
    ("/v1/rag/collections/c/chat", {"query": "fine", "messages": [{"role": "user", "content": "\ud800"}]},
     "messages.0.content"),
])
def test_lone_surrogates_are_400_naming_the_field(tmp_path, path, body, param):
    with serve(tmp_path) as client:
        r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        err = envelope(r, 400)
        assert err["param"] == param and err["code"] == "invalid_unicode", err


def test_surrogates_in_keys_raw_utf8_and_form_encoded_bodies(tmp_path):
    with serve(tmp_path) as client:
        r = client.post("/v1/rag/collections/c/documents",
                        content=json.dumps({"documents": [{"text": "x", "metadata": {"k\ud800": 1}}]}))
        err = envelope(r, 400)  # no content type: read as JSON, so checked as JSON
        assert err["param"] == "documents.0.metadata.k\\ud800" and "key" in err["message"]
        raw = b'{"input": "\xed\xa0\x80"}'  # a surrogate encoded as UTF-8 bytes (CESU-style)
        r = client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
        assert envelope(r, 400)["param"] == "input"
        # A valid pair, escaped or not, is one character: it passes the edge (then: unknown model).
        for text in ('"\\ud83d\\ude00"', '"\U0001F600"', '"\\\\ud800"'):
            body = '{"model": "nope", "input": ' + text + "}"
            r = client.post("/v1/embeddings", content=body.encode(), headers={"content-type": "application/json"})
            assert envelope(r, 404)["param"] == "model"


def test_large_body_checked_off_the_loop_still_refused(tmp_path):
    big = {"input": ["word " * 50] * 2000 + ["late \udc00"]}  # ~500 KB: checked in a worker thread
    with serve(tmp_path) as client:
        r = client.post("/v1/embeddings", content=json.dumps(big), headers={"content-type": "application/json"})
        assert envelope(r, 400)["param"] == "input.2000"


def test_lone_surrogate_scan():
    assert lone_surrogate(b'{"a": "plain", "b": ["\\u00e9"]}') is None
    assert lone_surrogate(b'{"a": {"b": [0, "\\uDC00"]}}') == ("a.b.1", "\\udc00", False)
    assert lone_surrogate(b'"\\ud800"') == ("", "\\ud800", False)
    assert lone_surrogate(b'{"a": "\\ud800') is None  # malformed: left to the route's parser
    # An escaped backslash, then the text "ud83d", then a lone low surrogate: not a pair.
    assert lone_surrogate(b'{"a": "\\\\ud83d\\ude00"}') == ("a", "\\ude00", False)
    assert lone_surrogate(b'{"a": "\\ud83d\\ude00 \\\\ud800"}') is None  # a pair, then plain text


# ---- metrics ----
def test_metric_labels_are_route_templates_never_raw_paths(tmp_path):
    with serve(tmp_path) as client:
        client.get("/v1/rag/collections/secret-coll/documents/secret-doc")
        client.delete("/v1/rag/collections/secret-coll/documents/secret-doc")
        client.post("/v1/rag/collections/secret-coll/search", json={"query": "x"})
        client.get("/no/such/path-secret-123")
        client.post("/v1/embeddings", content=b"[" * 100)  # refused at the edge: still counted
        text = client.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("frontier_requests_total")]
    assert not any("secret" in line for line in lines), lines
    routes = {line.split('route="')[1].split('"')[0] for line in lines}
    assert routes == {"/v1/rag/collections/{name}/documents/{doc_id}", "/v1/rag/collections/{name}/search",
                      "unmatched", "/v1/embeddings"}, routes


def test_metrics_can_be_turned_off(tmp_path):
    with serve(tmp_path, metrics_enabled=False) as client:
        envelope(client.get("/metrics"), 404)
        assert client.get("/health").status_code == 200
