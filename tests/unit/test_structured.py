"""Structured output pieces without a model (issue #13): the sampler's allowed-token mask, the
grammar controller (with and without a reasoning controller in front), strict objects, and the
tool-call parser that streamed and whole responses share."""

from __future__ import annotations

import json

import pytest
import torch

from service.engine.sampler import SamplingRow, sample, unpack_mask
from service.engine.types import SamplingParams
from service.pool.manifest import ToolsConfig
from service.structured.controller import GrammarController
from service.structured.grammar import GrammarError, build_tokenizer, closed, json_schema_grammar
from service.structured.tools import ToolPlan, split_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def mask_of(allowed: list[int], vocab: int) -> torch.Tensor:
    words = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    for t in allowed:
        words[t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)  # bit 31 wraps to the sign: int32 as llguidance
    return words


def row(**params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), None, [], [], [])


def test_unpack_mask_matches_the_bits_and_disallows_ids_past_the_words():
    allowed = [0, 5, 31, 32, 63, 64, 99]
    bits = unpack_mask(mask_of(allowed, 100)[None], 130)[0]
    assert bits.nonzero().flatten().tolist() == allowed  # 100..129: past the tokenizer, never allowed


@pytest.mark.parametrize("params", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 3},
                                    {"temperature": 0.8, "top_p": 0.9, "top_k": 5}])
def test_a_masked_row_draws_only_allowed_tokens_and_other_rows_are_untouched(params):
    torch.manual_seed(0)
    vocab = 200
    logits = torch.randn(3, vocab) * 3
    free, constrained = row(temperature=0.0), row(**params)
    constrained.allowed_mask = mask_of([7, 150, 199], vocab)
    for _ in range(20):
        tokens, _ = sample(logits, [free, constrained, row(temperature=0.0)])
        assert int(tokens[1]) in (7, 150, 199)
        assert int(tokens[0]) == int(logits[0].argmax()) and int(tokens[2]) == int(logits[2].argmax())


@pytest.fixture(scope="module")
def lltok(chat_tokenizer):
    return build_tokenizer(chat_tokenizer, {chat_tokenizer.eos_token_id})


def drive(controller, tokenizer, text: str, start: int = 0) -> list[int]:
    """Feed `text`'s tokens as if sampled: each must be allowed by the mask; returns the ids."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    for n, t in enumerate(ids, start=start):
        mask = controller.allowed_mask(n)
        if mask is not None:
            assert unpack_mask(mask[None], len(tokenizer))[0, t], (n, tokenizer.decode([t]))
        controller.on_token(t, n + 1)
    return ids


def test_controller_allows_a_valid_document_then_only_eos(chat_tokenizer, lltok):
    g = json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "p")
    c = GrammarController(lltok, g)
    ids = drive(c, chat_tokenizer, '{"a":12}')
    allowed = unpack_mask(c.allowed_mask(len(ids))[None], len(chat_tokenizer))[0].nonzero().flatten().tolist()
    assert allowed == [chat_tokenizer.eos_token_id]
    assert c.report() == {"grammar_complete": 1}


def test_controller_refuses_what_the_schema_forbids(chat_tokenizer, lltok):
    g = json_schema_grammar({"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"]}, "p")
    c = GrammarController(lltok, g)
    n = len(drive(c, chat_tokenizer, '{"a":"'))  # '":"' is one token: the only one allowed after the key
    bits = unpack_mask(c.allowed_mask(n)[None], len(chat_tokenizer))[0]
    first = [chat_tokenizer.encode(t, add_special_tokens=False)[0] for t in ("x", "y", "z", "1", " ")]
    assert [bool(bits[t]) for t in first] == [True, True, False, False, False]


class Thought:
    """A stand-in reasoning controller: the answer starts at generated index 4."""
    answer_start = None

    def on_token(self, token_id, num_generated):
        if num_generated == 4:
            self.answer_start = 4
        return []

    def banned_tokens(self, num_generated):
        return [99]

    def report(self):
        return {"reasoning_tokens": 4}


def test_with_reasoning_the_grammar_starts_at_the_answer(chat_tokenizer, lltok):
    g = json_schema_grammar({"type": "object"}, "p")
    c = GrammarController(lltok, g, inner=Thought())
    for n in range(4):
        assert c.allowed_mask(n) is None  # the thought is free
        c.on_token(100 + n, n + 1)
    assert c.allowed_mask(4) is not None and c.banned_tokens(4) == [99]
    drive(c, chat_tokenizer, '{"k":[1,2]}', start=4)
    assert c.report() == {"reasoning_tokens": 4, "grammar_complete": 1}


def test_closed_objects_keep_explicit_openness_and_all_of_branches():
    schema = {"type": "object", "properties": {"inner": {"type": "object", "properties": {"x": {}}},
                                               "free": {"type": "object", "properties": {"y": {}},
                                                        "additionalProperties": True},
                                               "both": {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},
                                               "properties": {"const": {"properties": 1}}}}
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["inner"]["additionalProperties"] is False
    assert out["properties"]["free"]["additionalProperties"] is True
    assert all("additionalProperties" not in b for b in out["properties"]["both"]["allOf"])
    assert out["properties"]["properties"] == {"const": {"properties": 1}}  # data, not a schema


def test_unbounded_strings_and_integers_are_capped_bounded_ones_kept():
    out = closed({"type": "object", "properties": {
        "s": {"type": "string"}, "p": {"type": "string", "pattern": "^a+$"}, "m": {"type": "string", "maxLength": 3},
        "i": {"type": "integer", "minimum": 0}, "j": {"type": "integer", "maximum": 5, "minimum": 1}}}, max_string=64)
    p = out["properties"]
    assert p["s"]["maxLength"] == 64 and "maxLength" not in p["p"] and p["m"]["maxLength"] == 3
    assert (p["i"]["minimum"], p["i"]["maximum"]) == (0, 10**15 - 1) and (p["j"]["minimum"], p["j"]["maximum"]) == (1, 5)
    assert "maxLength" not in closed({"type": "string"}, max_string=0)


@pytest.mark.parametrize("schema, fragment", [({"not": {"type": "string"}}, "not"),
                                              ({"type": "string", "format": "no-such-format"}, "format"),
                                              ({"$ref": "#/$defs/missing"}, "missing")])
def test_unsupported_schema_features_are_named(schema, fragment):
    with pytest.raises(GrammarError) as exc:
        json_schema_grammar(schema, "response_format.json_schema.schema")
    assert fragment in str(exc.value) and exc.value.param == "response_format.json_schema.schema"


def plan(choice="auto", parallel=None, **fmt):
    return ToolPlan.from_request([WEATHER], choice, parallel, ToolsConfig(**fmt))


TWO_CALLS = ('<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>\n'
             '<tool_call>{"name":"get_weather","arguments":{"city":"Rome"}}</tool_call>')


@pytest.mark.parametrize("text", [TWO_CALLS, "Checking both.\n" + TWO_CALLS, "No call <tool here.",
                                  'Broken <tool_call>{"name":"x"}</tool_call> and unclosed <tool_call>{"a"'])
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_streamed_parse_equals_the_whole_parse_at_any_chunking(text, step):
    whole_content, whole_calls = split_calls(text, plan())
    parser = plan().parser()
    content, calls = "", []
    for i in range(0, len(text), step):
        c, new = parser.feed(text[i:i + step])
        content, calls = content + c, calls + new
    content += parser.finish()
    assert (content or None if calls else content) == whole_content
    assert [(c["index"], c["function"]) for c in calls] == [(i, c["function"]) for i, c in enumerate(whole_calls)]


def test_whole_parse_fields():
    content, calls = split_calls(TWO_CALLS, plan())
    assert content is None and [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"},
                                                                                          {"city": "Rome"}]
    assert all(set(c) == {"id", "type", "function"} for c in calls)


def test_forced_grammar_bounds_the_number_of_calls(chat_tokenizer, lltok):
    def accepts(grammar, text):
        c = GrammarController(lltok, grammar)
        ids = chat_tokenizer.encode(text, add_special_tokens=False)
        return c.matcher.consume_tokens(ids) and c.matcher.is_accepting()

    one_call = TWO_CALLS.split("\n")[0]
    assert accepts(plan("required", max_calls=2).grammar(), TWO_CALLS)
    assert not accepts(plan("required", max_calls=1).grammar(), TWO_CALLS)
    assert not accepts(plan("required", parallel=False).grammar(), TWO_CALLS)
    assert accepts(plan({"type": "function", "function": {"name": "get_weather"}}).grammar(), one_call)
    assert not accepts(plan("required").grammar(), '<tool_call>{"name":"get_weather","arguments":{}}</tool_call>')
    assert plan("auto").grammar() is None
    with_answer = plan("auto").grammar({"type": "object", "properties": {"ok": {"type": "boolean"}}})
    assert accepts(with_answer, '{"ok":true}') and accepts(with_answer, one_call)
