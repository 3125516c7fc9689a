"""POST /v1/chat/completions over the scripted engine: the OpenAI response and chunk shapes, n, stop
strings, max_tokens, logprobs and usage, streamed and not (issue #10). The script is the "model":
what it says is known, so every field can be checked exactly."""

from __future__ import annotations

import pytest

from tests.unit.fake_engine import CHAT, run, scripted_app, sse_events, user

SCRIPT = "Hello from the script, twice over."


@pytest.fixture
def make(tmp_path, chat_tokenizer):
    return lambda script=SCRIPT, **engine_kw: scripted_app(tmp_path, chat_tokenizer, script, **engine_kw)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def num_prompt(tokenizer, messages) -> int:
    return len(ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)))


def post(body):
    async def scenario(client):
        return await client.post("/v1/chat/completions", json=body)

    return scenario


def chunks_of(r) -> list[dict]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def test_non_streamed_response_shape_and_usage(make, chat_tokenizer):
    _, app = make()
    msgs = user("Say hello.")
    r = run(app, post({"model": CHAT, "messages": msgs}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == CHAT and isinstance(body["created"], int) and body["system_fingerprint"]
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": SCRIPT},
                                "logprobs": None, "finish_reason": "stop"}]
    # every generated token counts, the EOS that ended the reply included
    assert body["usage"] == {"prompt_tokens": num_prompt(chat_tokenizer, msgs),
                             "completion_tokens": len(ids(chat_tokenizer, SCRIPT)) + 1,
                             "total_tokens": num_prompt(chat_tokenizer, msgs) + len(ids(chat_tokenizer, SCRIPT)) + 1}


def test_default_model_and_prompt_is_the_rendered_template(make, chat_tokenizer):
    engine, app = make()
    msgs = [{"role": "system", "content": "Be brief."}, *user("Hi")]
    r = run(app, post({"messages": msgs}))  # no model: settings.default_chat_model
    assert r.status_code == 200 and r.json()["model"] == CHAT
    rendered = chat_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert engine.requests[0].prompt_token_ids == ids(chat_tokenizer, rendered)


def test_streamed_chunks_role_first_then_content_finish_usage_done(make, chat_tokenizer):
    _, app = make()
    msgs = user("Say hello.")
    r = run(app, post({"messages": msgs, "stream": True, "stream_options": {"include_usage": True}}))
    chunks = chunks_of(r)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == CHAT for c in chunks)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    body, final, tail = chunks[1:-2], chunks[-2], chunks[-1]
    assert len(body) > 1  # one delta per token, not one blob
    assert "".join(c["choices"][0]["delta"]["content"] for c in body) == SCRIPT
    assert all(c["choices"][0]["finish_reason"] is None for c in body)
    assert final["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert tail["choices"] == [] and tail["usage"]["completion_tokens"] == len(ids(chat_tokenizer, SCRIPT)) + 1
    assert tail["usage"]["prompt_tokens"] == num_prompt(chat_tokenizer, msgs)
    assert all(c["usage"] is None for c in chunks[:-1])  # include_usage: the key on every chunk, null until the end


def test_streamed_without_include_usage_has_no_usage(make):
    _, app = make()
    chunks = chunks_of(run(app, post({"messages": user("x"), "stream": True})))
    assert all("usage" not in c for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]


def test_n_choices_each_get_their_own_reply(make, chat_tokenizer):
    _, app = make(lambda req, i: f"Answer number {i}.")
    r = run(app, post({"messages": user("x"), "n": 3}))
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == [f"Answer number {i}." for i in range(3)]
    assert body["usage"]["completion_tokens"] == sum(len(ids(chat_tokenizer, f"Answer number {i}.")) + 1
                                                     for i in range(3))


def test_n_choices_streamed_interleave_by_index(make):
    engine, app = make(lambda req, i: f"Reply {i} is here.", max_num_seqs=2)
    chunks = chunks_of(run(app, post({"messages": user("x"), "n": 2, "stream": True})))
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks[2:] if c["choices"][0]["index"] == i]
        assert "".join(ch["delta"].get("content", "") for ch in mine) == f"Reply {i} is here."
        assert [ch["finish_reason"] for ch in mine if ch["finish_reason"]] == ["stop"]
    indexes = [c["choices"][0]["index"] for c in chunks[2:]]
    assert indexes[:4] in ([0, 1, 0, 1], [1, 0, 1, 0])  # one batch: both advance every step
    assert engine.stats()["num_steps"] <= 8


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_is_cut_and_never_sent(make, stream):
    _, app = make("alpha beta STOP gamma delta")
    r = run(app, post({"messages": user("x"), "stop": ["STOP", "never"], "stream": stream}))
    if stream:
        chunks = chunks_of(r)
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    else:
        text, reasons = r.json()["choices"][0]["message"]["content"], [r.json()["choices"][0]["finish_reason"]]
    assert text == "alpha beta " and reasons == ["stop"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_ends_with_length(make, chat_tokenizer, field):
    _, app = make()
    r = run(app, post({"messages": user("x"), field: 3}))
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["message"]["content"] == chat_tokenizer.decode(ids(chat_tokenizer, SCRIPT)[:3])


def test_logprobs_one_entry_per_token_with_sorted_top(make, chat_tokenizer):
    _, app = make()
    r = run(app, post({"messages": user("x"), "logprobs": True, "top_logprobs": 3, "max_tokens": 5}))
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    expected = ids(chat_tokenizer, SCRIPT)[:5]
    assert [item["token"] for item in content] == [chat_tokenizer.decode([t]) for t in expected]
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert item["bytes"] == list(item["token"].encode())
        assert item["logprob"] == pytest.approx(0.0, abs=1e-4)  # the script's token is the model's certainty
        tops = item["top_logprobs"]
        assert len(tops) == 3 and tops[0]["token"] == item["token"]
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[1]["logprob"] == pytest.approx(-100.0, abs=1e-3)


def test_logprobs_streamed_ride_on_the_deltas(make):
    _, app = make()
    chunks = chunks_of(run(app, post({"messages": user("x"), "logprobs": True, "max_tokens": 4, "stream": True})))
    lps = [item for c in chunks if c["choices"][0]["logprobs"] for item in c["choices"][0]["logprobs"]["content"]]
    assert len(lps) == 4 and all(item["top_logprobs"] == [] for item in lps)


def test_sampling_params_reach_the_engine(make):
    engine, app = make()
    r = run(app, post({"messages": user("x"), "temperature": 0.5, "top_p": 0.5, "seed": 7, "max_tokens": 9,
                       "stop": "zzz", "presence_penalty": 0.5}))
    assert r.status_code == 200, r.text
    p = engine.requests[0].sampling
    assert (p.temperature, p.top_p, p.seed, p.max_tokens, p.stop, p.presence_penalty) == (
        0.5, 0.5, 7, 9, ("zzz",), 0.5)
