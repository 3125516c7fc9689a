"""response_format and tools over the scripted engine (issue #13): the grammar controller runs in
the real sampler and sequence state machine, so what the script says passes through the same mask
a model's tokens would. What the script says is known, so every field can be checked exactly; the
real model's validity over many schemas is tests/golden/test_structured_smollm2.py."""

from __future__ import annotations

import json

import pytest

from tests.unit.fake_engine import CHAT, run, scripted_app, sse_events, user

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture
def make(tmp_path, chat_tokenizer):
    return lambda script, **kw: scripted_app(tmp_path, chat_tokenizer, script, **kw)


def post(path, body):
    async def scenario(client):
        return await client.post(path, json=body)

    return scenario


def chat(app, **body):
    r = run(app, post("/v1/chat/completions", {"model": CHAT, "messages": user("Weather in Paris?"), **body}))
    assert r.status_code == 200, r.text
    return r.json()


def both(app, **body):
    """(the non-streamed response, the streamed chunks) of the same request, in one app lifetime."""
    body = {"model": CHAT, "messages": user("Weather in Paris?"), **body}

    async def scenario(client):
        whole = await client.post("/v1/chat/completions", json=body)
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        return whole, streamed

    whole, streamed = run(app, scenario)
    assert whole.status_code == 200 and streamed.status_code == 200, (whole.text, streamed.text)
    return whole.json(), [e for e in sse_events(streamed.text) if e != "[DONE]"]


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def test_json_schema_answer_streamed_and_not(make):
    _, app = make('{"name":"Ada","age":36}')
    body, chunks = both(app, response_format=schema_format(PERSON))
    assert json.loads(body["choices"][0]["message"]["content"]) == {"name": "Ada", "age": 36}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == body["choices"][0]["message"]["content"]


def test_the_grammar_overrides_what_the_model_prefers(make):
    """The script wants a space after the colon; compact JSON allows none, so another token is drawn."""
    _, app = make('{"name": "Ada"}')
    content = chat(app, response_format={"type": "json_object"}, max_tokens=40)["choices"][0]["message"]["content"]
    assert not content.startswith('{"name": "'), content
    assert content.startswith('{"name":'), content


def test_n_logprobs_and_stop_with_a_schema(make):
    _, app = make('{"name":"Ada","age":36}')
    body = chat(app, response_format=schema_format(PERSON), n=2, logprobs=True, top_logprobs=2, stop=["36"])
    for c in body["choices"]:
        assert c["message"]["content"] == '{"name":"Ada","age":'  # the stop string cuts it, as asked
        assert c["logprobs"]["content"] and c["finish_reason"] == "stop"


def test_required_tool_call_non_streamed(make):
    _, app = make(CALL)
    choice = chat(app, tools=[WEATHER], tool_choice="required")["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_streamed_tool_call_deltas_reassemble_to_the_non_streamed_call(make):
    _, app = make(CALL)
    whole, chunks = both(app, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict] = {}
    content = ""
    for c in chunks:
        delta = c["choices"][0]["delta"] if c["choices"] else {}
        content += delta.get("content") or ""
        for d in delta.get("tool_calls", []):
            entry = calls.setdefault(d["index"], {"id": "", "name": "", "arguments": ""})
            entry["id"] += d.get("id") or ""
            entry["name"] += d["function"].get("name") or ""
            entry["arguments"] += d["function"].get("arguments") or ""
    [expected] = whole["choices"][0]["message"]["tool_calls"]
    assert content == ""
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (expected["function"]["name"], expected["function"]["arguments"])]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_parses_a_call_out_of_text_and_leaves_unknown_ones(make):
    _, app = make("Let me check. " + CALL)
    msg = chat(app, tools=[WEATHER])["choices"][0]
    assert msg["message"]["content"] == "Let me check." and msg["finish_reason"] == "tool_calls"  # trailing space held, dropped
    unknown = '<tool_call>{"name":"launch","arguments":{}}</tool_call>'
    _, app = make(unknown)
    msg = chat(app, tools=[WEATHER])["choices"][0]
    assert msg["message"]["content"] == unknown and "tool_calls" not in msg["message"]
    assert msg["finish_reason"] == "stop"


def test_tool_history_is_rendered_in_the_models_format(make, chat_tokenizer):
    engine, app = make("It is 18 degrees.")
    messages = [*user("Weather in Paris?"),
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'}]
    body = chat(app, messages=messages, tools=[WEATHER])
    assert body["choices"][0]["message"]["content"] == "It is 18 degrees."
    prompt = chat_tokenizer.decode(engine.requests[0].prompt_token_ids)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    assert '<tool_response>\n{"temp_c": 18}\n</tool_response>' in prompt
    assert '"name": "get_weather"' in prompt.split("<|im_end|>")[0]  # the tools, described in the system turn


def test_reasoning_thought_stays_free_and_the_answer_follows_the_schema(make):
    _, app = make('Hmm, Ada is 36 years old. </think>{"name":"Ada","age":36}')
    msg = chat(app, response_format=schema_format(PERSON), reasoning_effort="low")["choices"][0]["message"]
    assert "Ada is 36 years old" in msg["reasoning_content"]
    assert json.loads(msg["content"]) == {"name": "Ada", "age": 36}


def test_completions_follow_response_format(make):
    _, app = make('{"name":"Ada","age":36}')
    r = run(app, post("/v1/completions", {"model": CHAT, "prompt": "A person:", "max_tokens": 30,
                                          "response_format": schema_format(PERSON)}))
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["text"]) == {"name": "Ada", "age": 36}
