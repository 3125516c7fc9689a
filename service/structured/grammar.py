"""Grammars for constrained decoding: JSON Schema, any JSON object, and Lark (tool calls), compiled
and checked by llguidance. A grammar is llguidance's serialized form (a string), so it is cheap to
keep in a request and to hand to the engine thread, where each sequence builds its own matcher.

Unsupported schema features are refused (a 400 naming them), never silently ignored: llguidance
reports keys it does not implement as warnings, and a warning here is an error.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import llguidance
import llguidance.hf

MAX_SCHEMA_BYTES = 64 * 1024  # a schema's JSON text; larger ones are a 400 (compile time, memory)
# Compact JSON: no free whitespace, so a small model cannot spend its tokens on spaces and newlines.
JSON_DEFAULTS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """The request's schema or grammar cannot be used: the API answers 400 with `param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _checked(grammar: str, param: str) -> str:
    try:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except Exception as exc:  # malformed grammar text
        raise GrammarError(f"invalid grammar: {exc}", param) from None
    if is_error or messages:
        raise GrammarError(f"unsupported or invalid schema: {'; '.join(messages) or 'rejected'}", param)
    return grammar


@functools.lru_cache(maxsize=256)
def _json_schema_grammar(schema_text: str, param: str) -> str:
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text, defaults=JSON_DEFAULTS)
    except Exception as exc:
        raise GrammarError(f"invalid JSON schema: {exc}", param) from None
    return _checked(grammar, param)


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_DATA = ("enum", "const", "default", "examples", "required")


MAX_INTEGER = 10**15 - 1  # bound of integers a schema leaves unbounded
DEFAULT_MAX_STRING = 512  # characters of a string the schema leaves unbounded (settings: structured_max_string)


def closed(schema: Any, max_string: int = DEFAULT_MAX_STRING, in_all_of: bool = False) -> Any:
    """The schema narrowed for a small model, so that what it writes still validates against the
    request's schema and ends within its max_tokens:
    - `additionalProperties: false` on every object that lists its properties and says nothing about
      others (xgrammar's strict mode, OpenAI's strict schemas): given the freedom of extra keys, a
      135M model writes them until max_tokens. allOf branches stay open (closing each would reject
      the others' properties);
    - strings without a bound, pattern or format get `maxLength: max_string` (0: none): a model that
      loops inside a string would otherwise never close it;
    - integers without bounds stay within +-(10**15 - 1) (15 digits), for the same reason (a model
      looping on digits). Non-integer numbers are not bounded this way (see the README).
    Only the set of outputs shrinks: every output is valid under the original schema."""
    if isinstance(schema, list):
        return [closed(s, max_string, in_all_of) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in _SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: closed(sub, max_string) for name, sub in v.items()}
        elif k in _DATA:
            out[k] = v
        else:
            out[k] = closed(v, max_string, k == "allOf")
    opened = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf")
    if "properties" in out and not in_all_of and not any(k in out for k in opened):
        out["additionalProperties"] = False
    bounded = ("maxLength", "pattern", "format", "enum", "const")
    if max_string and out.get("type") == "string" and not any(k in out for k in bounded):
        out["maxLength"] = max(max_string, out.get("minLength", 0))
    if out.get("type") == "integer" and not any(k in out for k in ("enum", "const")):
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = max(MAX_INTEGER, out.get("minimum", 0))
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = min(-MAX_INTEGER, out.get("maximum", 0))
    return out


def json_schema_grammar(schema: dict[str, Any], param: str, max_string: int = DEFAULT_MAX_STRING) -> str:
    """A grammar for JSON documents valid under `schema` (compiled once per distinct schema)."""
    text = json.dumps(closed(schema, max_string))  # key order matters: properties are generated in the order given
    if len(text) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the schema is {len(text)} bytes; at most {MAX_SCHEMA_BYTES}", param)
    return _json_schema_grammar(text, param)


@functools.lru_cache(maxsize=256)
def lark_grammar(text: str, param: str) -> str:
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(text)
    except Exception as exc:
        raise GrammarError(f"invalid grammar: {exc}", param) from None
    return _checked(grammar, param)


def build_tokenizer(tokenizer, eos_token_ids) -> llguidance.LLTokenizer:
    """llguidance's view of a transformers tokenizer (~0.1 s for 49k tokens: a loaded model keeps its
    own). eos_token_ids: the engine's, so that a finished grammar allows exactly the tokens that end
    it. Logit columns past the tokenizer's ids are never allowed (service/engine/sampler.py)."""
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=sorted(eos_token_ids))


def response_format_schema(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's response_format: None (free text), or the JSON Schema the answer must follow
    (json_object: any object)."""
    kind = "text" if fmt is None else fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError('response_format json_schema is {"name": ..., "schema": {...}, "strict": ...}',
                               "response_format.json_schema")
        return spec.get("schema") or {}
    raise GrammarError(f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
                       "response_format.type")


def answer_grammar(schema: dict[str, Any], max_string: int = DEFAULT_MAX_STRING) -> str:
    return json_schema_grammar(schema, "response_format.json_schema.schema", max_string)
