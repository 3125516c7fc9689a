"""Issue #9 through the official openai client against the real fp32 server: echo + logprobs score
the prompt (what lm-evaluation-harness loglikelihood tasks and perplexity read), and the values are
transformers' own log-softmax over the whole sequence."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import CHAT_MODEL

pytestmark = pytest.mark.slow
TEXT = "The capital of France is Paris. The capital of Germany is Berlin."


@pytest.fixture(scope="module")
def reference(chat_model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval()

    def ref(ids):
        with torch.inference_mode():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)

    return ref


def test_echo_logprobs_as_lm_eval_calls_them(client, chat_tokenizer, reference):
    ids = chat_tokenizer.encode(TEXT, add_special_tokens=False)
    r = client.completions.create(model=CHAT_MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(chat_tokenizer.decode(ids))
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(ids)
    want = [ref[t - 1, ids[t]].item() for t in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want, abs=2e-3)
    # lm-eval's is_greedy: a token is greedy when its logprob equals the top alternative's
    for t in range(1, len(ids)):
        top2 = ref[t - 1].topk(2)
        if top2.values[0] - top2.values[1] > 1e-3:  # a near-tie may go either way
            greedy = int(top2.indices[0]) == ids[t]
            assert (lp.token_logprobs[t] == max(lp.top_logprobs[t].values())) == greedy


def test_max_tokens_zero_gives_prompt_perplexity(client, chat_tokenizer, reference):
    r = client.completions.create(model=CHAT_MODEL, prompt=TEXT, echo=True, logprobs=0, max_tokens=0)
    choice = r.choices[0]
    assert choice.text == TEXT and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    ids = chat_tokenizer.encode(TEXT, add_special_tokens=False)
    nll = -sum(choice.logprobs.token_logprobs[1:]) / (len(ids) - 1)
    ref = reference(ids)
    want = -sum(ref[t - 1, ids[t]].item() for t in range(1, len(ids))) / (len(ids) - 1)
    assert math.exp(nll) == pytest.approx(math.exp(want), rel=1e-3)
