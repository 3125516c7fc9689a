"""API keys with scopes, per-key rate limits and /metrics access at the edge (issue #16).
In-process: the real app factory with no models; every request here ends at the edge or at a
route that needs no model."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from service.api import auth
from service.api.app import create_app
from service.api.auth import KeyPolicy, load_keys, required_scope
from service.api.limits import Bucket, RateLimiter, estimate_tokens
from service.config import Settings

KEYS = {"sk-infer-0123456789": ["inference"], "sk-write-0123456789": ["rag_write"],
        "sk-admin-0123456789": {"scopes": ["admin", "inference"]}}


@contextmanager
def serve(tmp_path, **overrides):
    settings = Settings(models=[], data_dir=tmp_path / "data", api_key=None, **overrides)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def envelope(r, status, type_=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if type_:
        assert err["type"] == type_, err
    return err


# ---- where keys come from ----
@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_keys_file_yaml_or_json(tmp_path, suffix):
    path = tmp_path / f"keys.{suffix}"
    spec = {"keys": {"sk-a": {"scopes": ["inference"], "requests_per_minute": 5, "tokens_per_minute": 900},
                     "sk-b": ["rag_write", "admin"]}}
    path.write_text(json.dumps(spec) if suffix == "json" else
                    "keys:\n  sk-a: {scopes: [inference], requests_per_minute: 5, tokens_per_minute: 900}\n"
                    "  sk-b: [rag_write, admin]\n")
    store = load_keys(Settings(api_keys_file=path, rate_limit_requests_per_minute=60))
    a, b = store.lookup("sk-a"), store.lookup("sk-b")
    assert (a.scopes, a.requests_per_minute, a.tokens_per_minute) == ({"inference"}, 5, 900)
    assert (b.scopes, b.requests_per_minute, b.tokens_per_minute) == ({"rag_write", "admin"}, 60, None)
    assert store.lookup("sk-c") is None and store.lookup("") is None and store.lookup("sk-a ") is None


def test_keys_from_environment_and_single_key_has_every_scope(monkeypatch):
    monkeypatch.setenv("FRONTIER_API_KEYS", json.dumps({"sk-env": ["inference"]}))
    monkeypatch.setenv("FRONTIER_API_KEY", "sk-single")
    store = load_keys(Settings())
    assert store.lookup("sk-env").scopes == {"inference"}
    assert store.lookup("sk-single").scopes == {"inference", "rag_write", "admin"}


def test_bad_key_entries_fail_at_start_without_showing_the_key(tmp_path):
    for bad in ({"sk-secret-1": ["root"]}, {"sk-secret-1": {"scopes": ["inference"], "requests_per_minute": 0}},
                {"sk-secret-1": []}):
        with pytest.raises(ValueError) as exc:
            load_keys(Settings(api_keys=bad))
        assert "sk-secret-1" not in str(exc.value) and auth.key_id("sk-secret-1") in str(exc.value)


def test_keys_are_never_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with serve(tmp_path, api_keys=KEYS) as client:
        client.get("/v1/models", headers=bearer("sk-infer-0123456789"))
        client.get("/v1/models", headers=bearer("sk-wrong-0123456789"))
    assert auth.key_id("sk-infer-0123456789") in caplog.text  # the startup line names keys by hash prefix
    assert "0123456789" not in caplog.text


def test_lookup_compares_in_constant_time(monkeypatch):
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    store = load_keys(Settings(api_keys=KEYS))
    assert store.lookup("sk-infer-0123456789").scopes == {"inference"}
    assert calls == [(32, 32)] * 3  # every stored key visited, digests of equal length (no early exit)


# ---- which scope a route needs ----
@pytest.mark.parametrize("method,route,scope", [
    ("POST", "/v1/chat/completions", "inference"), ("POST", "/v1/completions", "inference"),
    ("POST", "/v1/embeddings", "inference"), ("GET", "/v1/models", "inference"),
    ("GET", "/v1/models/{model_id}", "inference"), ("GET", "/v1/rag/collections", "inference"),
    ("GET", "/v1/rag/collections/{name}/documents/{doc_id}", "inference"),
    ("POST", "/v1/rag/collections/{name}/search", "inference"),
    ("POST", "/v1/rag/collections/{name}/chat", "inference"),
    ("POST", "/v1/rag/collections", "rag_write"), ("DELETE", "/v1/rag/collections/{name}", "rag_write"),
    ("POST", "/v1/rag/collections/{name}/documents", "rag_write"),
    ("PUT", "/v1/rag/collections/{name}/documents/{doc_id}", "rag_write"),
    ("DELETE", "/v1/rag/collections/{name}/documents/{doc_id}", "rag_write"),
    ("GET", "/metrics", "admin"), ("POST", "/admin/reload", "admin"),
    ("GET", "/health", None), ("GET", "/ready", None),
])
def test_scope_of_each_route(method, route, scope):
    assert required_scope(method, route, route, metrics_require_auth=True) == scope


def test_401_403_and_allowed(tmp_path):
    with serve(tmp_path, api_keys=KEYS) as client:
        err = envelope(client.get("/v1/models"), 401, "authentication_error")
        assert err["code"] == "invalid_api_key"
        envelope(client.get("/v1/models", headers=bearer("sk-nope")), 401, "authentication_error")
        assert client.get("/v1/nothing-here").status_code == 401  # /v1 cannot be probed without a key
        assert client.get("/v1/models", headers=bearer("sk-infer-0123456789")).status_code == 200
        r = client.post("/v1/rag/collections", json={"name": "c"}, headers=bearer("sk-infer-0123456789"))
        assert "rag_write" in envelope(r, 403, "permission_error")["message"]
        envelope(client.delete("/v1/rag/collections/c", headers=bearer("sk-infer-0123456789")), 403)
        envelope(client.get("/v1/models", headers=bearer("sk-write-0123456789")), 403)
        r = client.delete("/v1/rag/collections/c", headers=bearer("sk-write-0123456789"))
        assert envelope(r, 404)["code"] == "collection_not_found"  # past the edge: the route answered
        assert client.get("/health").status_code == 200  # probes stay open


def test_metrics_need_admin_when_keys_are_configured(tmp_path):
    with serve(tmp_path, api_keys=KEYS) as client:
        envelope(client.get("/metrics"), 401)
        envelope(client.get("/metrics", headers=bearer("sk-infer-0123456789")), 403)
        assert "frontier_requests_total" in client.get("/metrics", headers=bearer("sk-admin-0123456789")).text
    with serve(tmp_path, api_keys=KEYS, metrics_require_auth=False) as client:
        assert client.get("/metrics").status_code == 200


# ---- per-key rate limits ----
def test_requests_per_minute_answer_429_with_retry_after(tmp_path):
    keys = {"sk-r": {"scopes": ["inference"], "requests_per_minute": 2}, "sk-other": ["inference"]}
    with serve(tmp_path, api_keys=keys) as client:
        for _ in range(2):
            assert client.get("/v1/models", headers=bearer("sk-r")).status_code == 200
        r = client.get("/v1/models", headers=bearer("sk-r"))
        err = envelope(r, 429, "rate_limit_error")
        assert err["code"] == "rate_limit_exceeded" and "2 requests per minute" in err["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 30
        assert client.get("/v1/models", headers=bearer("sk-other")).status_code == 200  # per key


def test_tokens_per_minute_count_max_tokens(tmp_path):
    keys = {"sk-t": {"scopes": ["inference"], "tokens_per_minute": 1000}}
    body = {"model": "nope", "prompt": "hi", "max_tokens": 600}
    with serve(tmp_path, api_keys=keys) as client:
        assert client.post("/v1/completions", json=body, headers=bearer("sk-t")).status_code == 404
        r = client.post("/v1/completions", json=body, headers=bearer("sk-t"))
        assert "1000 tokens per minute" in envelope(r, 429, "rate_limit_error")["message"]
        assert int(r.headers["Retry-After"]) >= 10  # ~220 tokens short at 1000/min
        small = client.post("/v1/completions", json={**body, "max_tokens": 100}, headers=bearer("sk-t"))
        assert small.status_code == 404  # a smaller request still fits


def test_token_estimate_and_usage_correction():
    assert estimate_tokens(b'{"prompt": "x", "max_tokens": 100, "n": 2}', "/v1/completions", 512) == 210
    assert estimate_tokens(b'{"messages": []}', "/v1/chat/completions", 512) == 4 + 512
    assert estimate_tokens(b'{"input": "abcdefgh"}', "/v1/embeddings", 512) == 5  # input only
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    policy = KeyPolicy("key-x", frozenset({"inference"}), None, 600)
    charge = limiter.charge(policy, 500)
    assert limiter.retry_after(policy, 200)[0] == pytest.approx(10.0)  # 100 left, 10 tokens/s
    charge.observe(b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_')
    charge.observe(b'tokens": 10}}\n\n')  # the number split across chunks
    charge.settle(200)
    assert charge.actual == 10 and limiter.retry_after(policy, 590)[0] == 0  # corrected to what was used
    failed = limiter.charge(policy, 590)
    failed.settle(500)  # a server failure is not charged
    assert limiter.retry_after(policy, 590)[0] == 0


def test_bucket_refills_over_time():
    b = Bucket(60, now=0.0)
    b.take(60, 0.0)
    assert b.wait_s(1, 0.0) == pytest.approx(1.0) and b.wait_s(1, 1.0) == 0.0
    assert b.wait_s(1000, 60.0) == 0.0  # larger than the bucket: waits for a full bucket, not forever
