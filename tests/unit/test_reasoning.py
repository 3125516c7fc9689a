"""Reasoning mode, asserted exactly with a scripted model whose next-token choices we control.

The scripted model "thinks" (emits one filler token) for `natural` tokens, then writes the
end-of-thinking tag token by token, then answers and stops. Budget forcing must cut it at the
maximum and stretch it to the minimum, whatever the script wants.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from service.engine.config import EngineConfig
from service.engine.hf_backend import HFEngine
from service.engine.types import GenerationRequest, SamplingParams
from service.reasoning.controller import ThinkingFormat
from service.reasoning.params import ReasoningParams
from service.reasoning.plan import ReasoningPlan
from service.reasoning.splitter import ThinkSplitter
from service.reasoning.voting import majority_vote, normalize_answer

pytestmark = pytest.mark.slow  # uses the default chat model's tokenizer


class ScriptedLM(torch.nn.Module):
    """A causal-LM stand-in for HFEngine: logits put all mass on the scripted next token."""

    def __init__(self, tokenizer, prompt_len: int, natural: int, answer: str = " 42"):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the engine a device
        self.tok = tokenizer
        self.vocab = len(tokenizer)
        self.prompt_len = prompt_len
        self.natural = natural
        self.end_ids = tokenizer.encode("</think>", add_special_tokens=False)
        self.answer_ids = tokenizer.encode(answer, add_special_tokens=False)
        self.filler = tokenizer.encode(" the", add_special_tokens=False)[0]
        self.eos = tokenizer.eos_token_id

    def _next(self, generated: list[int]) -> int:
        text = self.tok.decode(generated)
        if "</think>" in text:
            after = generated[len(generated) - self._answer_len(generated):]
            return self.answer_ids[len(after)] if len(after) < len(self.answer_ids) else self.eos
        partial = 0  # how much of the end tag has been written
        for k in range(len(self.end_ids) - 1, 0, -1):
            if generated[-k:] == self.end_ids[:k]:
                partial = k
                break
        if partial:
            return self.end_ids[partial]
        return self.end_ids[0] if len(generated) >= self.natural else self.filler

    def _answer_len(self, generated: list[int]) -> int:
        for i in range(len(generated), 0, -1):
            if "</think>" in self.tok.decode(generated[:i]) and "</think>" not in self.tok.decode(generated[:i - 1]):
                return len(generated) - i
        return 0

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=1):
        seqs = input_ids if cache is None else torch.cat([cache, input_ids], dim=1)
        logits = torch.full((seqs.shape[0], 1, self.vocab), -1e4)
        for b, row in enumerate(seqs.tolist()):
            logits[b, 0, self._next(row[self.prompt_len:])] = 0.0
        return SimpleNamespace(logits=logits, cache=seqs)


def _run(tokenizer, natural: int, params: ReasoningParams, answer_tokens: int = 20):
    prompt = tokenizer.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    model = ScriptedLM(tokenizer, len(prompt), natural)
    engine = HFEngine(model, tokenizer, {tokenizer.eos_token_id}, EngineConfig(max_model_len=4096))
    plan = ReasoningPlan(params, ThinkingFormat(), tokenizer, {tokenizer.eos_token_id})
    sampling = SamplingParams(max_tokens=params.max_tokens + answer_tokens, temperature=0)
    made = []
    factory = plan.controller_factory()
    req = GenerationRequest(prompt, sampling, controller_factory=lambda: made.append(factory()) or made[-1])

    async def go():
        text, n, report = "", 0, None
        async for out in engine.generate(req):
            text, n = text + out.text, out.num_generated_tokens
            report = out.report if out.finished else report
        await engine.shutdown()
        return text, n, report

    text, n, report = asyncio.run(go())
    splitter = plan.splitter()
    splitter.feed(text)
    splitter.finish()
    c = made[0]  # the API reads the counts from the final output's report, never the controller
    assert report == {"reasoning_tokens": c.num_reasoning_tokens, "reasoning_extensions": c.num_extensions,
                      "budget_forced": int(c.budget_forced)}
    return c, splitter, n


def test_max_budget_forces_the_end_and_an_answer(chat_tokenizer):
    c, split, n = _run(chat_tokenizer, natural=200, params=ReasoningParams(max_tokens=30))
    assert c.budget_forced and c.num_reasoning_tokens <= 30
    assert c.num_reasoning_tokens == 30  # forced so the closing tag ends exactly at the budget
    assert split.content == "42" and split.reasoning.startswith("the the")


def test_natural_end_inside_the_budget_is_untouched(chat_tokenizer):
    c, split, _ = _run(chat_tokenizer, natural=10, params=ReasoningParams(max_tokens=100))
    assert not c.budget_forced and c.num_extensions == 0
    assert c.num_reasoning_tokens == 10 + len(c.end_ids)
    assert split.content == "42"


def test_min_budget_inserts_wait_until_reached(chat_tokenizer):
    c, split, _ = _run(chat_tokenizer, natural=5, params=ReasoningParams(max_tokens=200, min_tokens=40))
    assert c.num_extensions >= 1 and "Wait" in split.reasoning
    assert c.num_reasoning_tokens >= 40 and not c.budget_forced
    assert split.content == "42"


def test_tiny_budget_closes_the_thought_in_the_prompt(chat_tokenizer):
    plan = ReasoningPlan(ReasoningParams(max_tokens=1), ThinkingFormat(), chat_tokenizer, set())
    assert not plan.thinks() and plan.controller_factory() is None
    assert plan.prompt_suffix("...assistant\n").endswith("</think>\n")


def test_splitter_holds_back_a_partial_tag():
    s = ThinkSplitter("<think>", "</think>")
    assert s.feed("\nstep one </th") == ("step one ", "")
    assert s.feed("ink>\n The answer") == ("", "The answer")
    assert s.feed(" is 4.") == ("", " is 4.")
    assert (s.reasoning, s.content) == ("step one ", "The answer is 4.")


def test_votes_normalize_numbers_and_text():
    assert normalize_answer("So the total is 1,200.50 dollars") == "1200.5"
    assert normalize_answer("The Paris!") == "paris"
    winner, votes = majority_vote(["It is 7.", "answer: 12", "7", "12.0", "twelve", "I think 7"])
    assert winner == 0 and votes[0] == {"answer": "7", "count": 3} and votes[1] == {"answer": "12", "count": 2}
