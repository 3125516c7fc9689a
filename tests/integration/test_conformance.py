"""Conformance: the clients people use against a real server, unchanged (issue #18). langchain-openai
(chat, streaming, structured output, tools, the Responses API and reasoning through it) and litellm
(chat, streaming, tools), plus the official client's async surface. The sync official client is
tests/integration/test_openai_chat.py."""

from __future__ import annotations

import asyncio
import os

import pytest
from pydantic import BaseModel

from tests.conftest import CHAT_MODEL

pytestmark = pytest.mark.slow
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not fetch its price list


class Person(BaseModel):
    name: str
    age: int


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def base_url(server):
    return f"{server.base_url}/v1"


def chat_model(base_url, **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=base_url, api_key="unused", model=CHAT_MODEL, **{"temperature": 0, "max_tokens": 16, **kw})


def test_langchain_invoke_stream_and_structured_output(base_url):
    llm = chat_model(base_url)
    text = llm.invoke("Name a planet.").content
    assert text and "".join(c.content for c in llm.stream("Name a planet.")) == text
    person = chat_model(base_url, max_tokens=64).with_structured_output(Person).invoke("Ada is 36 years old.")
    assert isinstance(person, Person)


def test_langchain_tool_loop(base_url):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        return f"18 C and cloudy in {city}"

    llm = chat_model(base_url, max_tokens=48)
    messages = [HumanMessage("What is the weather in Paris?")]
    ai = llm.bind_tools([get_weather], tool_choice="required").invoke(messages)
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
    messages += [ai, *(ToolMessage(get_weather.invoke(c["args"]), tool_call_id=c["id"]) for c in ai.tool_calls)]
    assert llm.bind_tools([get_weather]).invoke(messages).content


def test_langchain_over_the_responses_api_and_with_reasoning(base_url):
    plain = chat_model(base_url, use_responses_api=True).invoke("Name a planet.")
    assert plain.text
    thought = chat_model(base_url, max_tokens=32, reasoning={"effort": "low"}).invoke("What is 2+3?")
    kinds = [block.get("type") for block in thought.content]
    assert "reasoning" in kinds and thought.text


def test_litellm_chat_stream_and_tools(base_url):
    import litellm

    kw = dict(model=f"openai/{CHAT_MODEL}", api_base=base_url, api_key="unused", temperature=0, max_tokens=16)
    msgs = [{"role": "user", "content": "Name a planet."}]
    text = litellm.completion(messages=msgs, **kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(messages=msgs, stream=True, **kw))
    assert text and streamed == text
    call = litellm.completion(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                              tool_choice="required", **{**kw, "max_tokens": 48}).choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"


def test_official_async_client_chat_and_responses(base_url):
    from openai import AsyncOpenAI

    async def main():
        async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
            chat = await client.chat.completions.create(model=CHAT_MODEL, max_tokens=8, temperature=0,
                                                        messages=[{"role": "user", "content": "Hi"}])
            chunks = [c async for c in await client.chat.completions.create(
                model=CHAT_MODEL, max_tokens=8, temperature=0, stream=True,
                messages=[{"role": "user", "content": "Hi"}])]
            resp = await client.responses.create(model=CHAT_MODEL, input="Hi", max_output_tokens=8, temperature=0)
            return chat, chunks, resp

    chat, chunks, resp = asyncio.run(main())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content and resp.output_text
