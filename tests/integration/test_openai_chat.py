"""The OpenAI surface through the official client against a real server on loopback."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from tests.conftest import CHAT_MODEL

pytestmark = pytest.mark.slow
HELLO = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_models_lists_defaults_with_state(client):
    models = {m.id: m for m in client.models.list().data}
    assert models[CHAT_MODEL].state == "loaded"
    assert models["all-minilm-l6-v2"].state == "loaded"
    assert "gemma-3-270m" in models


def test_chat_answers_and_counts_usage(client, chat_tokenizer):
    r = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                       logprobs=True)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    prompt = chat_tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(chat_tokenizer.encode(prompt, add_special_tokens=False))
    # One logprob entry per generated token: completion_tokens counts exactly what was sampled.
    assert r.usage.completion_tokens == len(choice.logprobs.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")


def test_stream_concatenates_to_non_streamed_text(client):
    kwargs = dict(model=CHAT_MODEL, messages=HELLO, max_tokens=16, temperature=0.8, seed=1234)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_max_tokens_gives_length_and_ignore_eos_fixes_length(client):
    r = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_completion_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_stop_string_is_cut_and_never_emitted(client):
    base = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=20, temperature=0)
    text = base.choices[0].message.content
    words = text.split()
    assert len(words) >= 4, text
    stop = words[3]
    expected = text[: text.index(stop)]
    r = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=20, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_n_choices_and_seed_reproduces(client):
    kwargs = dict(model=CHAT_MODEL, messages=HELLO, max_tokens=12, temperature=1.0, seed=7, n=2)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == b.usage.completion_tokens
    other = client.chat.completions.create(**{**kwargs, "seed": 8})
    assert [c.message.content for c in other.choices] != [c.message.content for c in a.choices]


def test_top_logprobs_are_sorted_and_include_the_greedy_token(client):
    r = client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    for item in r.choices[0].logprobs.content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert item.token == item.top_logprobs[0].token and item.logprob == pytest.approx(tops[0], abs=1e-4)


def test_penalties_are_accepted_and_change_output(client):
    msgs = [{"role": "user", "content": "Repeat the word cat many times."}]
    plain = client.chat.completions.create(model=CHAT_MODEL, messages=msgs, max_tokens=24, temperature=0)
    penal = client.chat.completions.create(model=CHAT_MODEL, messages=msgs, max_tokens=24, temperature=0,
                                           frequency_penalty=2.0, presence_penalty=1.5)
    assert penal.choices[0].message.content != plain.choices[0].message.content


def test_completions_prompts_echo_and_logprobs(client):
    r = client.completions.create(model=CHAT_MODEL, prompt=["The sky is", "Two plus two"], max_tokens=4,
                                  temperature=0, logprobs=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("The sky is") and r.choices[1].text.startswith("Two plus two")
    # echo + logprobs scores the prompt tokens too (the first has no logprob), then the completion
    assert sum(len(c.logprobs.tokens) for c in r.choices) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert all(c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None for c in r.choices)
    assert all(lp is not None and lp <= 0 for c in r.choices for lp in c.logprobs.token_logprobs[1:])
    streamed = client.completions.create(model=CHAT_MODEL, prompt="The sky is", max_tokens=4, temperature=0,
                                         stream=True)
    single = client.completions.create(model=CHAT_MODEL, prompt="The sky is", max_tokens=4, temperature=0)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == single.choices[0].text


class Person(BaseModel):
    name: str
    age: int
    city: str


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_parse_with_a_pydantic_model_gives_a_typed_object(client):
    r = client.chat.completions.parse(model=CHAT_MODEL, response_format=Person, temperature=0, max_tokens=64,
                                      messages=[{"role": "user", "content": "Ada is 36 and lives in London."}])
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and r.choices[0].finish_reason == "stop"


def test_tool_call_round_trip_streamed_and_not(client):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=CHAT_MODEL, messages=msgs, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=64)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    with client.chat.completions.stream(model=CHAT_MODEL, messages=msgs, tools=[WEATHER], tool_choice="required",
                                        temperature=0, max_tokens=64) as stream:
        final = stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
    answer = client.chat.completions.create(
        model=CHAT_MODEL, tools=[WEATHER], temperature=0, max_tokens=32,
        messages=[*msgs, r.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18}'}])
    assert answer.choices[0].message.content


def test_an_image_through_the_official_client(client):
    """The default model sees through its shipped adapter: a red circle is red."""
    import base64
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (512, 512), "white")
    ImageDraw.Draw(img).ellipse((128, 128, 384, 384), fill=(220, 20, 20))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    r = client.chat.completions.create(model=CHAT_MODEL, temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What colour is the shape?"}]}])
    assert "red" in r.choices[0].message.content.lower()
    card = client.models.retrieve(CHAT_MODEL)
    assert card.input_modalities == ["text", "image"]


def test_responses_create_stream_and_continue(client):
    r = client.responses.create(model=CHAT_MODEL, input="Name a planet.", max_output_tokens=16, temperature=0)
    assert r.status in ("completed", "incomplete") and r.output_text
    follow = client.responses.create(model=CHAT_MODEL, input="And another?", previous_response_id=r.id,
                                     max_output_tokens=16, temperature=0)
    assert follow.previous_response_id == r.id and follow.usage.input_tokens > r.usage.input_tokens
    with client.responses.stream(model=CHAT_MODEL, input="Name a planet.", max_output_tokens=16,
                                 temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response() if r.status == "completed" else None
    assert "".join(deltas) == r.output_text
    if final is not None:
        assert final.output_text == r.output_text
