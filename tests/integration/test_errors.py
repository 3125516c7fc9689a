"""Every error case answers with its status and the OpenAI envelope, never a 500 or a hang."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import CHAT_MODEL

pytestmark = pytest.mark.slow


def _post(server, path, **kw):
    return httpx.post(f"{server.base_url}{path}", timeout=60, **kw)


def _assert_envelope(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_unknown_model_is_404(server):
    r = _post(server, "/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    err = _assert_envelope(r, 404, "model")
    assert "nope" in err["message"]


def test_invalid_fields_are_400_naming_the_field(server):
    msgs = [{"role": "user", "content": "x"}]
    for field, value in [("temperature", 5), ("n", 0), ("top_p", 0), ("max_tokens", -1), ("top_logprobs", 50)]:
        r = _post(server, "/v1/chat/completions", json={"model": CHAT_MODEL, "messages": msgs, field: value})
        _assert_envelope(r, 400, field)
    _assert_envelope(_post(server, "/v1/chat/completions", json={"model": CHAT_MODEL}), 400, "messages")
    r = _post(server, "/v1/chat/completions",
              json={"model": CHAT_MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    _assert_envelope(r, 400)


def test_malformed_json_is_400(server):
    r = _post(server, "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    err = _assert_envelope(r, 400)
    assert "JSON" in err["message"]


def test_prompt_longer_than_context_is_400_with_both_numbers(server):
    long = "hello " * 9000
    r = _post(server, "/v1/chat/completions", json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": long}]})
    err = _assert_envelope(r, 400)
    assert "8192" in err["message"] and any(ch.isdigit() for ch in err["message"].replace("8192", ""))
    r = _post(server, "/v1/completions", json={"model": CHAT_MODEL, "prompt": "hi", "max_tokens": 9000})
    err = _assert_envelope(r, 400, "max_tokens")
    assert "8192" in err["message"] and "9000" in err["message"]


def test_embedding_model_refuses_chat_and_unknown_route_is_404(server):
    r = _post(server, "/v1/chat/completions",
              json={"model": "all-minilm-l6-v2", "messages": [{"role": "user", "content": "x"}]})
    _assert_envelope(r, 400, "model")
    _assert_envelope(httpx.get(f"{server.base_url}/v1/nothing-here"), 404)


def test_client_disconnect_stops_generation(server):
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Count to a million."}],
            "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data:") for line in got)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.base_url}/metrics").text
        running = [l for l in metrics.splitlines() if l.startswith("frontier_num_requests_running{")]
        if running and all(float(l.rsplit(" ", 1)[1]) == 0 for l in running):
            return
        time.sleep(0.25)
    pytest.fail("generation kept running after the client disconnected")


def test_health_ready_and_metrics(server, client):
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.base_url}/ready").status_code == 200
    client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in ("frontier_requests_total", "frontier_time_to_first_token_seconds_bucket",
                 "frontier_e2e_request_latency_seconds_count", "frontier_prompt_tokens_total",
                 "frontier_generation_tokens_total", "frontier_num_requests_waiting"):
        assert name in text, name
    assert 'route="/v1/chat/completions"' in text


def test_curl_style_form_encoded_json_is_read_as_json(server):
    # `curl -d '{...}'` without a content-type header sends application/x-www-form-urlencoded.
    body = b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    r = _post(server, "/v1/chat/completions", content=body,
              headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2
