"""POST /v1/responses over the scripted engine (issue #18): the Responses API as a front end of the
chat pipeline. Plain and item inputs, the official openai client (create, stream), the event
sequence, max_output_tokens, a mid-stream failure, and storage (GET / DELETE / 404,
previous_response_id across a restart). Tools, formats, reasoning, refusals and file_search:
test_api_responses_tools.py."""

from __future__ import annotations

import openai
import pytest

from tests.unit.fake_engine import CHAT, ScriptedEngine, assert_envelope, build_app, run, scripted_app
from tests.unit.responses_helpers import both, created, named_events, post, without_ids

SCRIPT = "Hello from the script."


@pytest.fixture
def make(tmp_path, chat_tokenizer):
    return lambda script=SCRIPT, **kw: scripted_app(tmp_path, chat_tokenizer, script, **kw)


def test_string_input_is_one_user_message(make, chat_tokenizer):
    engine, app = make()
    body = created(app, input="Say hello.")
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["status"] == "completed"
    assert body["model"] == CHAT and body["error"] is None and body["incomplete_details"] is None
    [msg] = body["output"]
    assert msg["type"] == "message" and msg["status"] == "completed" and msg["id"].startswith("msg_")
    assert msg["content"] == [{"type": "output_text", "text": SCRIPT, "annotations": [], "logprobs": []}]
    assert body["output_text"] == SCRIPT
    rendered = chat_tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                                  add_generation_prompt=True)
    prompt_ids = chat_tokenizer.encode(rendered, add_special_tokens=False)
    assert engine.requests[0].prompt_token_ids == prompt_ids  # the chat pipeline's prompt, exactly
    n_out = len(chat_tokenizer.encode(SCRIPT, add_special_tokens=False)) + 1  # the EOS too
    assert body["usage"] == {"input_tokens": len(prompt_ids), "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": len(prompt_ids) + n_out}
    assert body["store"] is True and body["tools"] == [] and body["tool_choice"] == "auto"
    assert body["text"] == {"format": {"type": "text"}} and body["metadata"] == {}


def test_item_list_with_instructions(make, chat_tokenizer):
    engine, app = make()
    created(app, instructions="Be brief.", input=[
        {"role": "developer", "content": "Answer in English."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"role": "user", "content": "Again"}], metadata={"k": "v"})
    expected = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Answer in English."},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Again"}]
    rendered = chat_tokenizer.apply_chat_template(expected, tokenize=False, add_generation_prompt=True)
    assert engine.requests[0].prompt_token_ids == chat_tokenizer.encode(rendered, add_special_tokens=False)


def test_openai_client_create_and_stream_agree(make):
    _, app = make()

    async def scenario(http):  # the official client over the in-process ASGI transport
        client = openai.AsyncOpenAI(base_url="http://frontier/v1", api_key="unused", http_client=http, max_retries=0)
        whole = await client.responses.create(model=CHAT, input="Say hello.", metadata={"run": "1"})
        async with client.responses.stream(model=CHAT, input="Say hello.", metadata={"run": "1"}) as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        return whole, deltas, final

    whole, deltas, final = run(app, scenario)
    assert whole.output_text == SCRIPT and final.output_text == SCRIPT
    assert len(deltas) > 1 and "".join(deltas) == SCRIPT  # one delta per engine step
    assert without_ids(final.model_dump()) == without_ids(whole.model_dump())


def test_stream_event_sequence(make):
    _, app = make()
    r = run(app, post({"model": CHAT, "input": "Say hello.", "stream": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = named_events(r.text)
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    assert all(e.get("item_id", e.get("item", {}).get("id")) == item_id and e["output_index"] == 0
               for e in events[3:-1])
    final = events[-1]["response"]
    assert final["output_text"] == SCRIPT and final["id"] == events[0]["response"]["id"]


def test_max_output_tokens_is_incomplete(make):
    _, app = make()
    body, events = both(app, input="Say hello.", max_output_tokens=2)
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["usage"]["output_tokens"] == 2
    assert body["max_output_tokens"] == 2
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["status"] == "incomplete"


def test_store_get_delete_and_not_found(make):
    _, app = make()

    async def scenario(client):
        first = (await client.post("/v1/responses", json={"input": "Hi"})).json()
        got = await client.get(f"/v1/responses/{first['id']}")
        unstored = (await client.post("/v1/responses", json={"input": "Hi", "store": False})).json()
        unstored_get = await client.get(f"/v1/responses/{unstored['id']}")
        deleted = await client.delete(f"/v1/responses/{first['id']}")
        after = await client.get(f"/v1/responses/{first['id']}")
        again = await client.delete(f"/v1/responses/{first['id']}")
        continued = await client.post("/v1/responses", json={"input": "More", "previous_response_id": first["id"]})
        return first, got, unstored, unstored_get, deleted, after, again, continued

    first, got, unstored, unstored_get, deleted, after, again, continued = run(app, scenario)
    assert got.status_code == 200 and got.json() == first
    assert unstored["store"] is False and unstored_get.status_code == 404
    assert deleted.json() == {"id": first["id"], "object": "response.deleted", "deleted": True}
    for r in (after, again):
        assert r.status_code == 404
        assert_envelope(r.json(), "not_found_error", "response_not_found")
    assert continued.status_code == 404
    assert_envelope(continued.json(), "not_found_error", "response_not_found", "previous_response_id")


def test_stored_conversation_chains_and_survives_a_restart(tmp_path, chat_tokenizer):
    engine, app = scripted_app(tmp_path, chat_tokenizer, SCRIPT)
    first = created(app, input="My name is Ada.")
    engine, app = scripted_app(tmp_path, chat_tokenizer, SCRIPT)  # a new app over the same data_dir

    async def scenario(client):
        second = (await client.post("/v1/responses", json={"input": "What is my name?", "instructions": "Be kind.",
                                                           "previous_response_id": first["id"]})).json()
        return (await client.post("/v1/responses", json={"input": "Thanks.",
                                                          "previous_response_id": second["id"]})).json()

    assert run(app, scenario)["status"] == "completed"
    prompt = chat_tokenizer.decode(engine.requests[-1].prompt_token_ids)
    for turn in ("My name is Ada.", "What is my name?", "Thanks."):
        assert turn in prompt
    assert prompt.count(SCRIPT) == 2 and "Be kind." not in prompt  # instructions are not carried over


def test_mid_stream_failure_is_an_error_event_then_response_failed(make):
    _, app = make(fail_at_step=3)

    async def scenario(client):
        r = await client.post("/v1/responses", json={"model": CHAT, "input": "Say hello.", "stream": True})
        events = named_events(r.text)
        return events, await client.get(f"/v1/responses/{events[0]['response']['id']}")

    events, stored = run(app, scenario)
    assert "response.output_text.delta" in [e["type"] for e in events]  # it failed after it began
    error, failed = events[-2:]
    assert error["type"] == "error" and error["message"].startswith("generation failed")
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "server_error"
    assert stored.status_code == 404  # a failed response is not stored


def test_a_conversation_too_large_to_store_is_400_unless_not_stored(tmp_path, chat_tokenizer):
    app = build_app(tmp_path, ScriptedEngine(chat_tokenizer, SCRIPT), responses_max_stored_bytes=200)

    async def scenario(client):
        big = {"model": CHAT, "input": "word " * 60}
        return await client.post("/v1/responses", json=big), await client.post("/v1/responses",
                                                                               json={**big, "store": False})

    refused, unstored = run(app, scenario)
    assert refused.status_code == 400
    assert_envelope(refused.json(), "invalid_request_error", "conversation_too_large", "input")
    assert unstored.status_code == 200, unstored.text
