"""The official `openai` client against the in-process app (issue #10): chat streamed and not,
completions, models, reasoning fields through extra_body, and errors as the client's exception types."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.unit.fake_engine import CHAT, ScriptedEngine, build_app, client_for, user

REPLY = "Hello from the scripted model."


@pytest.fixture
def engine(chat_tokenizer):
    return ScriptedEngine(chat_tokenizer, REPLY, max_waiting=1)


@pytest.fixture
def app(tmp_path, engine):
    return build_app(tmp_path, engine)


def with_openai(app, scenario):
    async def main():
        async with client_for(app):  # the lifespan (engines stopped at its end)
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://frontier")
            async with openai.AsyncOpenAI(base_url="http://frontier/v1", api_key="x", http_client=http,
                                          max_retries=0) as client:
                return await asyncio.wait_for(scenario(client), 30)

    return asyncio.run(main())


def test_chat_non_streamed(app, chat_tokenizer):
    r = with_openai(app, lambda c: c.chat.completions.create(model=CHAT, messages=user("hi"), max_tokens=32,
                                                             logprobs=True, top_logprobs=2))
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == REPLY
    assert choice.finish_reason == "stop" and r.object == "chat.completion"
    assert r.usage.completion_tokens == len(choice.logprobs.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streamed_matches(app):
    async def scenario(c):
        stream = await c.chat.completions.create(model=CHAT, messages=user("hi"), stream=True,
                                                 stream_options={"include_usage": True})
        return [chunk async for chunk in stream]

    chunks = with_openai(app, scenario)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_reasoning_fields_through_extra_body(tmp_path, chat_tokenizer):
    engine = ScriptedEngine(chat_tokenizer, "<think>Easy sum.</think>4")
    r = with_openai(build_app(tmp_path, engine), lambda c: c.chat.completions.create(
        model=CHAT, messages=user("2+2?"), max_tokens=8, extra_body={"reasoning": {"max_tokens": 32}}))
    msg = r.choices[0].message
    assert (msg.content, msg.reasoning_content) == ("4", "Easy sum.")
    assert r.usage.completion_tokens_details.reasoning_tokens > 0


def test_completions_and_models(app):
    async def scenario(c):
        return await c.completions.create(model=CHAT, prompt="Say", max_tokens=32), await c.models.list()

    completion, models = with_openai(app, scenario)
    assert completion.choices[0].text == REPLY and completion.choices[0].finish_reason == "stop"
    assert [m.id for m in models.data] == [CHAT]


def test_errors_are_the_clients_exception_types(app, engine):
    async def scenario(c):
        errors = []
        for kwargs in ({"model": "nope"}, {"model": CHAT, "temperature": 5}):
            try:
                await c.chat.completions.create(messages=user("hi"), **kwargs)
            except openai.APIStatusError as exc:
                errors.append(exc)
        engine.gate.clear()  # hold the engine: one waiting request fills the queue (max_waiting=1)
        task = asyncio.ensure_future(c.chat.completions.create(model=CHAT, messages=user("hi")))
        await engine.until(lambda s: s["num_waiting_seqs"] == 1)
        try:
            await c.chat.completions.create(model=CHAT, messages=user("hi"), stream=True)
        except openai.APIStatusError as exc:
            errors.append(exc)
        engine.gate.set()
        await task
        return errors

    not_found, bad, overloaded = with_openai(app, scenario)
    assert isinstance(not_found, openai.NotFoundError) and not_found.code == "model_not_found"
    assert isinstance(bad, openai.BadRequestError) and bad.param == "temperature"
    assert isinstance(overloaded, openai.RateLimitError) and overloaded.code == "server_overloaded"
    assert overloaded.response.headers["retry-after"] == "1"
