"""Issue #9, API side: /v1/completions with echo + logprobs answers the prompt's tokens too (first
logprob null), in OpenAI's legacy shape; max_tokens 0 with echo returns just the prompt; streaming
puts the echoed prompt and its logprobs in the first chunk. The real app (create_app) over ASGI with
a tiny random Llama native engine injected into the pool (see test_admission.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.golden.test_native_golden import make_engine
from tests.unit.test_admission import build_app, serve, tiny_dir  # noqa: F401  (fixture)

PROMPT = "w5 w6 w7 w8 w9 w20"  # the tiny WordLevel tokenizer: word "wI" is token id I (not w1x: "w1" is EOS)
PROMPT_IDS = [5, 6, 7, 8, 9, 20]


@pytest.fixture
def engine(tiny_dir):  # noqa: F811
    return make_engine(tiny_dir)


@pytest.fixture(scope="module")
def reference(tiny_dir):  # noqa: F811
    """log_softmax of transformers' full-sequence logits: [T, V] for a list of token ids."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()

    def ref(ids):
        with torch.inference_mode():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)

    return ref


def body(**kw) -> dict:
    return {"model": "tiny", "prompt": PROMPT, "temperature": 0, "ignore_eos": True, **kw}


def assert_prompt_part(lp: dict, ids: list[int], ref: torch.Tensor, k: int) -> None:
    """The first len(ids) entries of a legacy logprobs object score the prompt."""
    assert lp["tokens"][: len(ids)] == [f"w{i}" for i in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
        top = lp["top_logprobs"][t]
        if k == 0:
            assert top is None
        else:
            vals, top_ids = ref[t - 1].topk(k)
            assert list(top) == [f"w{i}" for i in top_ids.tolist()]
            assert list(top.values()) == pytest.approx(vals.tolist(), abs=1e-4)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_echo_logprobs_cover_prompt_then_completion(tmp_path, engine, reference):
    async def scenario(client):
        return await client.post("/v1/completions", json=body(echo=True, logprobs=2, max_tokens=3))

    r = serve(build_app(tmp_path, engine), engine, scenario)
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["text"].startswith(PROMPT) and len(choice["text"]) > len(PROMPT)
    assert usage == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}
    lp = choice["logprobs"]
    assert all(len(lp[key]) == 9 for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"))
    assert_prompt_part(lp, PROMPT_IDS, reference(PROMPT_IDS), 2)
    completion_ids = [int(t[1:]) for t in lp["tokens"][6:]]
    full = reference(PROMPT_IDS + completion_ids)
    for j, tid in enumerate(completion_ids):  # greedy: each generated token is the top alternative
        assert lp["token_logprobs"][6 + j] == pytest.approx(full[5 + j, tid].item(), abs=1e-4)
        assert list(lp["top_logprobs"][6 + j])[0] == f"w{tid}"
    assert lp["text_offset"][6] == len(PROMPT)  # completion offsets continue after the echoed text


def test_max_tokens_zero_with_echo_returns_the_prompt_only(tmp_path, engine, reference):
    async def scenario(client):
        zero = await client.post("/v1/completions", json=body(echo=True, logprobs=1, max_tokens=0))
        echo_only = await client.post("/v1/completions", json=body(echo=True, max_tokens=0))
        refused = await client.post("/v1/completions", json=body(max_tokens=0, logprobs=1))
        return zero, echo_only, refused

    zero, echo_only, refused = serve(build_app(tmp_path, engine), engine, scenario)
    assert zero.status_code == 200, zero.text
    choice = zero.json()["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert zero.json()["usage"]["completion_tokens"] == 0
    assert len(choice["logprobs"]["tokens"]) == 6
    assert_prompt_part(choice["logprobs"], PROMPT_IDS, reference(PROMPT_IDS), 1)
    assert echo_only.status_code == 200 and echo_only.json()["choices"][0]["text"] == PROMPT
    assert echo_only.json()["choices"][0]["logprobs"] is None
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


def test_list_of_prompts_token_ids_and_n(tmp_path, engine, reference):
    prompts = [[5, 6, 7], [40, 41, 42, 43]]

    async def scenario(client):
        ids = await client.post("/v1/completions", json=body(prompt=prompts, echo=True, logprobs=0, max_tokens=1))
        texts = await client.post("/v1/completions", json=body(prompt=["w5 w6 w7", "w40 w41 w42 w43"], n=2,
                                                                 echo=True, logprobs=3, max_tokens=2))
        return ids, texts

    ids, texts = serve(build_app(tmp_path, engine), engine, scenario)
    assert ids.status_code == 200 and texts.status_code == 200, (ids.text, texts.text)
    for c, p in zip(ids.json()["choices"], prompts):
        assert c["text"].startswith(" ".join(f"w{i}" for i in p))
        assert len(c["logprobs"]["tokens"]) == len(p) + 1
        assert_prompt_part(c["logprobs"], p, reference(p), 0)
    choices = texts.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        p = prompts[c["index"] // 2]
        assert len(c["logprobs"]["tokens"]) == len(p) + 2
        assert_prompt_part(c["logprobs"], p, reference(p), 3)


def test_streaming_echo_sends_prompt_and_its_logprobs_first(tmp_path, engine, reference):
    async def scenario(client):
        async with client.stream("POST", "/v1/completions",
                                 json=body(echo=True, logprobs=1, max_tokens=4, stream=True)) as r:
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        zero = []
        async with client.stream("POST", "/v1/completions",
                                 json=body(echo=True, logprobs=1, max_tokens=0, stream=True)) as r:
            zero = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        plain = await client.post("/v1/completions", json=body(echo=True, logprobs=1, max_tokens=4))
        return events, zero, plain

    events, zero, plain = serve(build_app(tmp_path, engine), engine, scenario)
    assert events[-1] == "[DONE]" and zero[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert chunks[0]["text"].startswith(PROMPT)
    assert_prompt_part(chunks[0]["logprobs"], PROMPT_IDS, reference(PROMPT_IDS), 1)
    merged = {k: [v for c in chunks if c["logprobs"] for v in c["logprobs"][k]] for k in ("tokens", "token_logprobs")}
    expected = plain.json()["choices"][0]
    assert "".join(c["text"] for c in chunks) == expected["text"]
    assert merged["tokens"] == expected["logprobs"]["tokens"] and len(merged["tokens"]) == 10
    assert merged["token_logprobs"][1:] == pytest.approx(expected["logprobs"]["token_logprobs"][1:], abs=1e-5)
    assert chunks[-1]["finish_reason"] == "length"
    [only] = [json.loads(e)["choices"][0] for e in zero[:-1]]
    assert only["text"] == PROMPT and only["finish_reason"] == "length"
    assert len(only["logprobs"]["tokens"]) == 6 and only["logprobs"]["token_logprobs"][0] is None
