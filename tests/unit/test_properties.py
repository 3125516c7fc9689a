"""Issue #16: property tests (hypothesis) of the parsers that hostile or unlucky input reaches.

- RAG chunking: chunks are exact spans of the text, cover every non-space character, stay within
  chunk_size tokens, and consecutive chunks of a section share at most `overlap` tokens.
- RAG filters: any filter is either a 400 RagError or SQL that SQLite evaluates; nothing else.
- Stop strings: the streamed deltas concatenated are the final text, which is a prefix of the
  decoded tokens holding no stop string, cut exactly where one begins.
- Think-tag splitter: reasoning and content, streamed in any chunking, equal the one-shot split,
  which is the input without the tags (and the whitespace next to them).

Deterministic by default; FRONTIER_FUZZ_RANDOM=1 draws new cases, FRONTIER_FUZZ_EXAMPLES=N sets how many."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from service.engine.output_processor import SequenceOutput
from service.engine.types import FinishReason, SamplingParams
from service.rag.chunking import ChunkingConfig, _Tokens, chunk_text
from service.rag.errors import RagError
from service.rag.filters import filter_sql
from service.reasoning.splitter import ThinkSplitter
from tests.unit.conftest import build_tokenizer
from tests.unit.rag_fakes import WordTokenizer

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "frontier-hypothesis")  # caches, not the checkout
SETTINGS = settings(max_examples=int(os.environ.get("FRONTIER_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                    derandomize=not os.environ.get("FRONTIER_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- RAG chunking
_MD = st.sampled_from(["# Title\n", "## Sub section\n", "```\n", "\n\n", "\n", ". ", "! ", "? ", "  ", "\t",
                       "word", "other", "longerword", "x", "é", "你好", "🙂", ",", "- item\n", "#no heading"])
DOC = st.lists(_MD | st.text(max_size=8), max_size=120).map("".join)
WORDS = WordTokenizer()


def _offsets(text: str):
    return WORDS.encode(text).offsets


@given(text=DOC, size=st.integers(8, 40), overlap_frac=st.floats(0, 0.5))
@SETTINGS
def test_chunks_cover_the_text_within_size_and_overlap(text, size, overlap_frac):
    cfg = ChunkingConfig(size, int(overlap_frac * size))
    tokens = _Tokens(_offsets(text))
    chunks = chunk_text(text, _offsets, cfg)
    covered = [False] * len(text)
    for i, c in enumerate(chunks):
        assert c.position == i and 0 <= c.start < c.end <= len(text)
        assert c.text == text[c.start:c.end]
        assert c.num_tokens == tokens.count(c.start, c.end) <= cfg.chunk_size
        for j in range(c.start, c.end):
            covered[j] = True
    missed = [j for j, ch in enumerate(text) if not ch.isspace() and not covered[j]]
    assert not missed, (missed[:5], [text[j] for j in missed[:5]])
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.start >= prev.start
        if nxt.start < prev.end:  # overlap: only within a section, at most `overlap` tokens
            assert nxt.heading == prev.heading
            assert tokens.count(nxt.start, prev.end) <= cfg.overlap


# ---------------------------------------------------------------- RAG filters
_KEYS = st.sampled_from(["k", "tag", "n", "a.b", "a.b.c", "missing", "x-y", "_", "bad key", "", "k\n", "$and", "$or",
                         "$not", "'; DROP TABLE documents; --", "\ud800", "a..b", ".a"]) | st.text(max_size=6)
_OPS = st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$regex", "$", ""])
_SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
            | st.sampled_from(["\ud800", "a\udfffb", "🙂", "'", '"', "\\", "%", "_"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_OPS | _KEYS, inner,
                                                                                               max_size=3),
                       max_leaves=6)
FILTERS = st.recursive(
    st.dictionaries(_KEYS, _VALUES | st.dictionaries(_OPS, _VALUES, max_size=3), max_size=3),
    lambda inner: st.dictionaries(st.sampled_from(["$and", "$or"]) | _KEYS, st.lists(inner, max_size=3) | inner,
                                  max_size=3),
    max_leaves=12) | _VALUES

_DB = None


def _db() -> sqlite3.Connection:
    global _DB  # one in-memory table for every example (module-private, read-only after this)
    if _DB is None:
        _DB = sqlite3.connect(":memory:")
        _DB.execute("CREATE TABLE documents (id TEXT, metadata TEXT)")
        rows = [{"k": 1, "tag": "x", "a": {"b": 2}}, {"k": "1", "n": None, "tag": ["x", "y"]}, {},
                {"a": {"b": {"c": True}}},
                {"k": 2**62, "n": 1.5, "x-y": "🙂"}]
        _DB.executemany("INSERT INTO documents VALUES (?, ?)", [(str(i), json.dumps(r)) for i, r in enumerate(rows)])
    return _DB


@given(flt=FILTERS)
@SETTINGS
@example(flt={"k": 2**63})
@example(flt={"k": {"$gt": math.nan}})
@example(flt={"$or": []})
@example(flt={"k": {"$in": list(range(1001))}})
@example(flt={"a.b": {"$exists": True}, "$and": [{"k": 1}, {"$or": [{"tag": "x"}, {"n": None}]}]})
def test_filters_are_a_400_or_sql_that_runs(flt):
    try:
        sql, params = filter_sql(flt)
    except RagError as exc:
        assert exc.status == 400 and (exc.param or "").startswith("filter") and exc.message
        return
    rows = _db().execute(f"SELECT d.id FROM documents d WHERE {sql}", params).fetchall()
    assert all(isinstance(r[0], str) for r in rows)


# ---------------------------------------------------------------- stop strings
_TOK = build_tokenizer()
_PIECES = st.sampled_from(["Hello", " world", ",", " this", " is", " a", " test", ".", " STOP", "###", " end", "é",
                           "你好", "🙂", " ", "\n", "sto", "p"])
STOP_TEXT = st.lists(_PIECES, min_size=1, max_size=30).map("".join)


# Text the tokenizer encodes, or any token ids at all (partial UTF-8 characters decode to U+FFFD).
IDS = STOP_TEXT.map(_TOK.encode) | st.lists(st.integers(0, len(_TOK) - 1), max_size=30)


@given(ids=IDS, data=st.data())
@SETTINGS
def test_streamed_stop_strings_never_leak(ids, data):
    ids = [i for i in ids if i != _TOK.eos_token_id]  # a special token decodes to nothing
    assume(ids)
    decoded = _TOK.decode(ids)
    # Ending inside a character: the detokenizer's flush at max_tokens is checked for stop strings too.
    assume(decoded and not decoded.endswith("\ufffd"))
    stops = data.draw(st.lists(
        st.sampled_from(["STOP", "###", "\n", "is a", "🙂", "é", "sto", "p", " ", "x", "你", "\ufffd"])
        | st.integers(0, len(decoded) - 1).flatmap(lambda i: st.integers(i + 1, min(len(decoded), i + 6))
                                                   .map(lambda j: decoded[i:j])),
        min_size=1, max_size=3))
    seq = SequenceOutput("r", 0, SamplingParams(max_tokens=len(ids), stop=tuple(stops), ignore_eos=True), _TOK,
                         set(), 1, 10_000)
    streamed = ""
    for i in ids:
        out = seq.append(i)
        if out is not None:
            streamed += out.text
            assert not any(s in streamed for s in stops), (streamed, stops)
        if seq.finished:
            break
    assert seq.finished
    assert streamed == seq.text  # what was streamed is what the final message says
    full = _TOK.decode(seq.token_ids)  # the tokens consumed until the stop
    assert full.startswith(streamed)
    if seq.finish_reason == FinishReason.STOP:
        assert any(full.startswith(s, len(streamed)) for s in stops), (full, streamed, stops)
    else:
        assert seq.finish_reason == FinishReason.LENGTH and streamed == decoded
        assert not any(s in decoded for s in stops)


def test_stop_string_in_the_flushed_tail():
    partial = next(t for t in range(len(_TOK))  # complete characters, then a partial one
                   if _TOK.decode([t]).endswith("\ufffd") and _TOK.decode([t]).rstrip("\ufffd"))
    stop = _TOK.decode([partial]).rstrip("\ufffd")  # its complete characters, e.g. " " of " \xc3"
    ids = _TOK.encode("Hello") + [partial]
    seq = SequenceOutput("r", 0, SamplingParams(max_tokens=len(ids), stop=(stop,), ignore_eos=True), _TOK, set(), 1,
                         10_000)
    streamed = "".join(o.text for o in (seq.append(i) for i in ids) if o is not None)
    assert stop not in streamed and seq.finish_reason == FinishReason.STOP, (streamed, stop, seq.finish_reason)


# ---------------------------------------------------------------- think-tag splitter
START, END = "<think>", "</think>"
_THINK = st.sampled_from([START, END, "<", "</", "</th", "think>", ">", "<th", " ", "\n", "\t", "a", "reason", "ans",
                          "é", "🙂", "<b>", "</b>", "/"])
THINK_TEXT = st.lists(_THINK | st.text(max_size=3), max_size=25).map("".join)


def _expected(text: str, thinking: bool) -> tuple[str, str]:
    """The split by its definition: leading whitespace and an opening tag dropped, reasoning up to the
    first end tag, the answer after it without leading whitespace."""
    if not thinking:
        return "", text.lstrip()
    rest = text.lstrip()
    if rest.startswith(START):
        rest = rest[len(START):].lstrip()
    i = rest.find(END)
    if i < 0:
        return rest, ""
    return rest[:i], rest[i + len(END):].lstrip()


def _chunked(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(text))), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _split_stream(chunks: list[str], thinking: bool) -> tuple[str, str]:
    sp = ThinkSplitter(START, END, thinking=thinking)
    reasoning = content = ""
    for c in chunks:
        r, a = sp.feed(c)
        reasoning, content = reasoning + r, content + a
    r, a = sp.finish()
    reasoning, content = reasoning + r, content + a
    assert (reasoning, content) == (sp.reasoning, sp.content)  # deltas add up to the message
    return reasoning, content


@given(text=THINK_TEXT, cuts=st.lists(st.integers(0, 80), max_size=12), thinking=st.booleans())
@SETTINGS
def test_think_splitter_any_chunking_equals_the_definition(text, cuts, thinking):
    assert _split_stream([text], thinking) == _expected(text, thinking)
    assert _split_stream(_chunked(text, cuts), thinking) == _expected(text, thinking)
    assert _split_stream(list(text), thinking) == _expected(text, thinking)  # one character at a time


# The opening tag split across deltas, or followed by a second one, splits as the whole text does.
@pytest.mark.parametrize("chunks, expected", [
    (["<th", "ink>x</think>y"], ("x", "y")),
    (["  <think", ">\nx</think>y"], ("x", "y")),
    (["<think>", "<think>x</think>y"], ("<think>x", "y")),
])
def test_think_splitter_opening_tag_across_deltas(chunks, expected):
    assert _expected("".join(chunks), True) == expected
    assert _split_stream(chunks, True) == expected
