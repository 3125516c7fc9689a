"""POST /v1/responses with tools and formats over the scripted engine (issue #18): a function call
round trip through previous_response_id, streamed calls, text.format json_schema, reasoning items,
400s naming the Responses field, and file_search over a RAG collection (file_search_call item,
file_citation annotations)."""

from __future__ import annotations

import json

import pytest

from tests.unit.fake_engine import CHAT, ScriptedEngine, assert_envelope, build_app, run, scripted_app
from tests.unit.rag_fakes import TokenizerEmbedder
from tests.unit.responses_helpers import both, created, message_text, named_events, post, without_ids

SCRIPT = "Hello from the script."
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture
def make(tmp_path, chat_tokenizer):
    return lambda script=SCRIPT, **kw: scripted_app(tmp_path, chat_tokenizer, script, **kw)


def test_function_call_round_trip_with_previous_response_id(make, chat_tokenizer):
    replies = iter([CALL, "It is 18 degrees in Paris."])
    engine, app = make(lambda _req, _i: next(replies))

    async def scenario(client):
        first = (await client.post("/v1/responses", json={"model": CHAT, "input": "Weather in Paris?",
                                                          "tools": [WEATHER], "tool_choice": "required"})).json()
        [call] = first["output"]
        second = await client.post("/v1/responses", json={
            "model": CHAT, "previous_response_id": first["id"], "tools": [WEATHER],
            "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": '{"temp_c": 18}'}]})
        return first, second

    first, second = run(app, scenario)
    [call] = first["output"]
    assert call["type"] == "function_call" and call["status"] == "completed" and call["name"] == "get_weather"
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert first["tools"] == [WEATHER] and first["tool_choice"] == "required" and first["output_text"] == ""
    assert second.status_code == 200, second.text
    assert second.json()["output_text"] == "It is 18 degrees in Paris."
    assert second.json()["previous_response_id"] == first["id"]
    prompt = chat_tokenizer.decode(engine.requests[1].prompt_token_ids)  # the whole conversation, replayed
    assert "Weather in Paris?" in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert '<tool_response>\n{"temp_c": 18}\n</tool_response>' in prompt


def test_streamed_function_call_events(make):
    _, app = make(CALL)
    r = run(app, post({"model": CHAT, "input": "Weather?", "tools": [WEATHER], "tool_choice": "required",
                       "stream": True}))
    events = named_events(r.text)
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert events[2]["item"]["arguments"] == "" and events[3]["delta"] == events[4]["arguments"]
    assert events[-1]["response"]["output"] == [events[5]["item"]]


def test_text_format_json_schema(make):
    _, app = make('{"name":"Ada","age":36}')
    body = created(app, input="Ada is 36.", text={"format": {"type": "json_schema", "name": "person",
                                                              "schema": PERSON, "strict": True}})
    assert json.loads(body["output_text"]) == {"name": "Ada", "age": 36}
    assert body["text"]["format"]["name"] == "person"


def test_reasoning_item_and_reasoning_tokens(make):
    thought = "2 plus 2 is 4."
    _, app = make(f"{thought}</think>The answer is 4.")
    body, streamed = both(app, input="What is 2 + 2?", reasoning={"effort": "low"})
    reasoning, message = body["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["summary"] == [{"type": "summary_text", "text": thought}]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": thought}]
    assert message_text(body) == "The answer is 4." == body["output_text"]
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    assert body["reasoning"] == {"effort": "low", "summary": None}
    text = "".join(e["delta"] for e in streamed if e["type"] == "response.reasoning_summary_text.delta")
    assert text == thought
    assert without_ids(streamed[-1]["response"]) == without_ids(body)


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"tools": [WEATHER, {"type": "code_interpreter"}]}, "tools.1.type"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
    ({"background": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"tool_choice": {"type": "allowed_tools", "tools": []}}, "tool_choice"),
])
def test_unsupported_is_400_naming_it(make, body, param):
    engine, app = make()
    r = run(app, post({"model": CHAT, "input": "Hi", **body}))
    assert r.status_code == 400, r.text
    assert_envelope(r.json(), "invalid_request_error", "unsupported", param)
    assert engine.requests == []


@pytest.mark.parametrize("body, param", [
    ({"reasoning": {"effort": "enormous"}}, "reasoning.effort"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object",
                                                                          "not": {"required": ["a"]}}}}},
     "text.format.schema"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools.0.name"),
    ({"temperature": 3}, "temperature"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]},
     "input"),  # the vision stage's "messages", named as the request names it
])
def test_invalid_fields_are_400_with_responses_names(make, body, param):
    _, app = make()
    r = run(app, post({"model": CHAT, "input": "Hi", **body}))
    assert r.status_code == 400, r.text
    assert_envelope(r.json(), "invalid_request_error", param=param)


DOCS = [{"id": "lighthouse", "text": "The lighthouse keeper lights the lamp at dusk every evening."},
        {"id": "bakery", "text": "The bakery sells fresh bread and rolls each morning."}]


def test_file_search_over_a_rag_collection(tmp_path, chat_tokenizer):
    engine = ScriptedEngine(chat_tokenizer, "The keeper lights the lamp at dusk [1].")
    app = build_app(tmp_path, engine, TokenizerEmbedder(chat_tokenizer))
    tool = {"type": "file_search", "vector_store_ids": ["docs"], "max_num_results": 1}

    async def scenario(client):
        await client.post("/v1/rag/collections", json={"name": "docs"})
        await client.post("/v1/rag/collections/docs/documents", json={"documents": DOCS})
        whole = await client.post("/v1/responses", json={"input": "When is the lamp lit?", "tools": [tool]})
        streamed = await client.post("/v1/responses", json={"input": "When is the lamp lit?", "tools": [tool],
                                                            "stream": True})
        missing = await client.post("/v1/responses", json={"input": "x", "tools": [
            {"type": "file_search", "vector_store_ids": ["nope"]}]})
        return whole, streamed, missing

    whole, streamed, missing = run(app, scenario)
    assert whole.status_code == 200, whole.text
    search, message = whole.json()["output"]
    assert search["type"] == "file_search_call" and search["status"] == "completed"
    assert search["queries"] == ["When is the lamp lit?"]
    assert [(r["file_id"], r["text"]) for r in search["results"]] == [("lighthouse", DOCS[0]["text"])]
    text = message["content"][0]["text"]
    assert message["content"][0]["annotations"] == [
        {"type": "file_citation", "file_id": "lighthouse", "filename": "lighthouse", "index": text.index("[1]")}]
    prompt = chat_tokenizer.decode(engine.requests[0].prompt_token_ids)
    assert DOCS[0]["text"] in prompt and DOCS[1]["text"] not in prompt  # max_num_results -> top_k
    events = named_events(streamed.text)
    kinds = [e["type"] for e in events]
    assert kinds[2:8] == ["response.output_item.added", "response.file_search_call.in_progress",
                          "response.file_search_call.searching", "response.file_search_call.completed",
                          "response.output_item.done", "response.output_item.added"]
    assert "response.output_text.annotation.added" in kinds
    assert without_ids(events[-1]["response"]) == without_ids(whole.json())
    assert missing.status_code == 404
    assert_envelope(missing.json(), "not_found_error", "collection_not_found", "tools.0.vector_store_ids")
