"""POST /v1/completions over the scripted engine (issue #10): string, list and token-id prompts,
n choices, echo, logprobs (the prompt's too), streaming, and OpenAI's default max_tokens."""

from __future__ import annotations

import pytest

from tests.unit.fake_engine import CHAT, ScriptedEngine, build_app, run, sse_events


def reply_for(tokenizer):
    """The script: each choice says which prompt and which sequence it answers."""
    return lambda req, i: f" [{tokenizer.decode(req.prompt_token_ids)}|{i}]"


@pytest.fixture
def make(tmp_path, chat_tokenizer):
    def build(script=None, **engine_kw):
        engine = ScriptedEngine(chat_tokenizer, script or reply_for(chat_tokenizer), **engine_kw)
        return engine, build_app(tmp_path, engine)

    return build


def post(body):
    async def scenario(client):
        return await client.post("/v1/completions", json={"model": CHAT, **body})

    return scenario


def test_string_prompt_shape_and_usage(make, chat_tokenizer):
    _, app = make()
    r = run(app, post({"prompt": "The sky is"}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == CHAT
    assert body["choices"] == [{"index": 0, "text": " [The sky is|0]", "finish_reason": "stop", "logprobs": None}]
    n_prompt = len(chat_tokenizer.encode("The sky is"))
    n_out = len(chat_tokenizer.encode(" [The sky is|0]", add_special_tokens=False)) + 1  # + EOS
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def test_list_of_prompts_times_n_are_numbered_prompt_major(make):
    _, app = make()
    body = run(app, post({"prompt": ["alpha", "beta"], "n": 2})).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [" [alpha|0]", " [alpha|1]", " [beta|0]", " [beta|1]"]


@pytest.mark.parametrize("as_batch", [False, True])
def test_token_id_prompts_are_used_as_given_and_echoed_decoded(make, chat_tokenizer, as_batch):
    engine, app = make()
    ids = chat_tokenizer.encode("Two plus two", add_special_tokens=False)
    body = run(app, post({"prompt": [ids, ids] if as_batch else ids, "echo": True, "max_tokens": 50})).json()
    assert [r.prompt_token_ids for r in engine.requests] == [ids] * (2 if as_batch else 1)
    assert {c["text"] for c in body["choices"]} == {"Two plus two [Two plus two|0]"}
    assert body["usage"]["prompt_tokens"] == len(ids) * (2 if as_batch else 1)


def test_echo_puts_the_prompt_first(make):
    _, app = make()
    assert run(app, post({"prompt": "Hi", "echo": True})).json()["choices"][0]["text"] == "Hi [Hi|0]"


def test_default_max_tokens_is_openais_16(make):
    engine, app = make("word " * 40)
    body = run(app, post({"prompt": "x"})).json()
    assert engine.requests[0].sampling.max_tokens == 16
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 16


def test_logprobs_legacy_shape(make, chat_tokenizer):
    _, app = make("one two three")
    lp = run(app, post({"prompt": "x", "logprobs": 2, "max_tokens": 3})).json()["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["tokens"] == [chat_tokenizer.decode([t]) for t in chat_tokenizer.encode("one two three",
                                                                                      add_special_tokens=False)]
    assert all(v == pytest.approx(0.0, abs=1e-4) for v in lp["token_logprobs"])
    assert all(len(t) == 2 and next(iter(t)) == tok for t, tok in zip(lp["top_logprobs"], lp["tokens"]))
    assert lp["text_offset"] == [0, 3, 7]


def test_echo_with_logprobs_scores_the_prompt(make, chat_tokenizer):
    _, app = make()
    body = run(app, post({"prompt": ["The sky is", "Two plus two"], "echo": True, "logprobs": 1,
                          "max_tokens": 2})).json()
    assert sum(len(c["logprobs"]["tokens"]) for c in body["choices"]) == (body["usage"]["prompt_tokens"] +
                                                                          body["usage"]["completion_tokens"])
    for c, prompt in zip(body["choices"], ["The sky is", "Two plus two"]):
        lp = c["logprobs"]
        n_prompt = len(chat_tokenizer.encode(prompt))
        assert "".join(lp["tokens"][:n_prompt]) == prompt and c["text"].startswith(prompt)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(v is not None and v <= 0 for v in lp["token_logprobs"][1:])


def test_echo_only_max_tokens_zero_generates_nothing(make, chat_tokenizer):
    _, app = make()
    body = run(app, post({"prompt": "The sky is", "echo": True, "logprobs": 0, "max_tokens": 0})).json()
    choice = body["choices"][0]
    assert choice["text"] == "The sky is" and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == len(chat_tokenizer.encode("The sky is"))


@pytest.mark.parametrize("echo", [False, True])
def test_stream_concatenates_to_the_non_streamed_text(make, echo):
    _, app = make()
    full = run(app, post({"prompt": ["p1", "p2"], "echo": echo})).json()
    _, app2 = make()
    r = run(app2, post({"prompt": ["p1", "p2"], "echo": echo, "stream": True,
                        "stream_options": {"include_usage": True}}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks, tail = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    for choice in full["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(m["text"] for m in mine) == choice["text"]
        assert [m["finish_reason"] for m in mine if m["finish_reason"]] == [choice["finish_reason"]]
        if echo:
            assert mine[0]["text"].startswith(f"p{choice['index'] + 1}")
    assert tail["choices"] == [] and tail["usage"] == full["usage"]
