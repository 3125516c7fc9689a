"""/health, /ready, /v1/models(/{id}) and /metrics on the real app with the fakes loaded (issue #10)."""

from __future__ import annotations

import pytest

from service.engine.types import Engine
from tests.unit.fake_engine import CHAT, EMBED, ScriptedEngine, build_app, metric, run, user
from tests.unit.rag_fakes import TokenizerEmbedder


@pytest.fixture
def engine(chat_tokenizer):
    return ScriptedEngine(chat_tokenizer, "Four.", max_model_len=512)


@pytest.fixture
def app(tmp_path, engine, chat_tokenizer):
    return build_app(tmp_path, engine, TokenizerEmbedder(chat_tokenizer, max_seq_length=128))


def get(*paths):
    async def scenario(client):
        return [await client.get(p) for p in paths]

    return scenario


def test_the_fake_is_an_engine_as_the_api_sees_one(engine):
    assert isinstance(engine, Engine)  # runtime_checkable: every attribute and method the API reads
    assert isinstance(engine.eos_token_ids, frozenset) and engine.name == "scripted"


def test_health_and_ready(app):
    health, ready = run(app, get("/health", "/ready"))
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "models": [CHAT, EMBED]}


def test_ready_is_503_while_a_default_model_failed_to_load(tmp_path, engine):
    app = build_app(tmp_path, engine, models=["ghost"])  # the lifespan tries to load it, and cannot
    health, ready = run(app, get("/health", "/ready"))
    assert health.status_code == 200  # alive, so that operators can look
    assert ready.status_code == 503
    assert ready.json()["status"] == "error" and "ghost" in ready.json()["error"]


def test_model_list_and_cards(app):
    listed, chat, embed = run(app, get("/v1/models", f"/v1/models/{CHAT}", f"/v1/models/{EMBED}"))
    body = listed.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [CHAT, EMBED]
    assert body["data"] == [chat.json(), embed.json()]
    card = chat.json()
    assert {k: card[k] for k in ("id", "object", "owned_by", "task", "state", "max_model_len", "engine")} == {
        "id": CHAT, "object": "model", "owned_by": "frontier", "task": "chat", "state": "loaded",
        "max_model_len": 512, "engine": "native"}
    assert isinstance(card["created"], int) and card["kernels"]["quantization"] == "none"
    assert "cores" in card["kernels"]["device"]  # the CPU the kernels were chosen for
    e = embed.json()
    assert (e["task"], e["state"], e["max_model_len"]) == ("embedding", "loaded", 128) and "engine" not in e


def test_metrics_count_requests_tokens_and_engine_gauges(app, engine, chat_tokenizer):
    async def scenario(client):
        before = (await client.get("/metrics")).text
        r = await client.post("/v1/chat/completions", json={"messages": user("2+2?")})
        await client.get("/health")
        return before, r, await client.get("/metrics")

    before, r, after = run(app, scenario)
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    usage = r.json()["usage"]
    assert metric(before, "frontier_requests_total", route="/v1/chat/completions") == 0
    assert metric(text, "frontier_requests_total", route="/v1/chat/completions", model=CHAT, status="200") == 1
    assert metric(text, "frontier_requests_total", route="/health", status="200") == 1
    assert 'route="/metrics"' not in text  # scrapes are not counted
    assert metric(text, "frontier_prompt_tokens_total", model=CHAT) == usage["prompt_tokens"]
    assert metric(text, "frontier_generation_tokens_total", model=CHAT) == usage["completion_tokens"]
    assert metric(text, "frontier_request_success_total", model=CHAT, finish_reason="stop") == 1
    assert metric(text, "frontier_time_to_first_token_seconds_count", model=CHAT) == 1
    assert metric(text, "frontier_e2e_request_latency_seconds_count", model=CHAT) == 1
    assert metric(text, "frontier_num_steps", model=CHAT) == engine.stats()["num_steps"] > 0
    assert "frontier_num_requests_running" in text and "frontier_num_requests_waiting" in text


def test_unmatched_paths_are_counted_under_one_label(app):
    async def scenario(client):
        await client.get("/v1/nothing/123")
        await client.get("/v1/nothing/456")
        return (await client.get("/metrics")).text

    text = run(app, scenario)
    assert metric(text, "frontier_requests_total", route="unmatched", status="404") == 2
    assert "/v1/nothing" not in text  # raw paths never become label values
