"""Structured output on the real default model (issue #13): 30 JSON Schemas (bench/data/json_schemas.json:
nested objects, arrays, enums, bounded numbers, optional fields, anyOf, patterns, $ref), greedy and
sampled, in one batch with unconstrained requests. Every constrained output parses and validates
with jsonschema; the unconstrained rows are token-identical to a run without the constrained ones;
a required tool call always validates against its function's parameters."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from service.engine.config import EngineConfig
from service.engine.loading import load_native_engine
from service.engine.types import GenerationRequest, SamplingParams
from service.pool.manifest import ToolsConfig
from service.structured.controller import GrammarController
from service.structured.grammar import build_tokenizer, json_schema_grammar
from service.structured.tools import ToolPlan, split_calls
from tests.golden.test_native_golden import generate

SCHEMAS = json.loads((Path(__file__).parents[2] / "bench/data/json_schemas.json").read_text())
FREE = ["Tell me a short story about a cat.", "What is 2 + 2?", "Name three colors."]


@pytest.fixture(scope="module")
def smol(chat_model_dir):
    config = EngineConfig(max_model_len=2048, max_waiting=256, kv_cache_bytes=512 << 20, max_num_seqs=96)
    engine = load_native_engine(chat_model_dir, "cpu", torch.float32, config)
    tok = engine.tokenizer
    return engine, tok, build_tokenizer(tok, engine.eos_token_ids)


def chat_ids(tok, text: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)


def constrained(ll, grammar: str):
    return lambda: GrammarController(ll, grammar)


def request(ids, controller=None, **sampling) -> GenerationRequest:
    params = SamplingParams(**{"max_tokens": 400, "temperature": 0.0, **sampling})
    return GenerationRequest(ids, params, controller_factory=controller)


def test_every_schema_validates_greedy_and_sampled_beside_free_rows(smol):
    engine, tok, ll = smol
    free = [request(chat_ids(tok, q), max_tokens=40) for q in FREE]
    alone = [t[0] for t, _ in generate(engine, free)]
    reqs = list(free)
    for i, case in enumerate(SCHEMAS):
        ids = chat_ids(tok, f"{case['prompt']} Reply in JSON following this schema: {json.dumps(case['schema'])}")
        grammar = json_schema_grammar(case["schema"], "schema")
        reqs.append(request(ids, constrained(ll, grammar)))
        reqs.append(request(ids, constrained(ll, grammar), temperature=0.8, top_p=0.95, seed=i))
    results = generate(engine, reqs)
    assert [t[0] for t, _ in results[:len(FREE)]] == alone  # the masks touch only their own rows
    for k, (toks, reports) in enumerate(results[len(FREE):]):
        case = SCHEMAS[k // 2]
        text = tok.decode(toks[0], skip_special_tokens=True)
        jsonschema.validate(json.loads(text), case["schema"])  # parses and validates, or the test fails
        assert reports[0]["grammar_complete"] == 1, (case["prompt"], text)


def test_required_tool_calls_validate(smol):
    engine, tok, ll = smol
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": SCHEMAS[1]["schema"]}},
             {"type": "function", "function": {"name": "add_todo", "description": "Add a todo item",
                                               "parameters": SCHEMAS[23]["schema"]}}]
    plan = ToolPlan.from_request(tools, "required", None, ToolsConfig(max_calls=2))
    grammar = plan.grammar()
    questions = ["What's the weather in Paris?", "Remind me to buy milk.", "Weather in Rome and Oslo?"]
    reqs = [request(chat_ids(tok, q, plan.instruction()), constrained(ll, grammar), **s)
            for q in questions for s in ({}, {"temperature": 1.0, "seed": 7})]
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for toks, _ in generate(engine, reqs):
        content, calls = split_calls(tok.decode(toks[0], skip_special_tokens=True), plan)
        assert content is None and 1 <= len(calls) <= 2
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), by_name[call["function"]["name"]])


def test_schemas_validate_alone_too(smol):
    """One constrained request at a time (no batch around it), greedy and sampled."""
    engine, tok, ll = smol
    for i, case in enumerate(SCHEMAS[::6]):
        ids = chat_ids(tok, f"{case['prompt']} Reply in JSON following this schema: {json.dumps(case['schema'])}")
        grammar = json_schema_grammar(case["schema"], "schema")
        for sampling in ({}, {"temperature": 0.8, "seed": i}):
            [(toks, _)] = generate(engine, [request(ids, constrained(ll, grammar), **sampling)])
            jsonschema.validate(json.loads(tok.decode(toks[0], skip_special_tokens=True)), case["schema"])
