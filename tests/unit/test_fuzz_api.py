"""Issue #16: hostile input never costs a 5xx. Two layers, both in-process (ASGI) against the real
create_app with a tiny random Llama native engine (context 128, so any generation is short) and a
hashed bag-of-words embedder injected into the pool; RAG collections in a temporary directory, one
of them filled ("fuzzed").

1. schemathesis over the app's own OpenAPI schema: every operation, valid cases (with `{name}` =
   the filled collection, so document, search and chat operations get past the 404) and invalid
   ones, bounded examples each. No 5xx; every JSON 4xx is the OpenAI error envelope.
2. hypothesis bodies the schema cannot describe: generation requests deep enough to reach the engine
   (sampling parameters, stop strings, n, logprobs, streaming, reasoning, RAG grounding), RAG
   documents (their JSON is parsed by hand, so the schema has no body for them) and search filters.
   No 5xx; a 200 stream has no error event and ends with [DONE].

Deterministic by default (the same cases every run); FRONTIER_FUZZ_RANDOM=1 draws new ones and
FRONTIER_FUZZ_EXAMPLES=N sets the number of cases per test."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from service.api.app import create_app
from service.config import Settings
from service.engine.config import EngineConfig
from service.engine.loading import load_native_engine
from tests.unit.rag_fakes import TokenizerEmbedder
from tests.unit.test_admission import PLAIN_TEMPLATE, build_app, tiny_dir  # noqa: F401 (fixture)

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "frontier-hypothesis")  # caches, not the checkout
COLLECTION = "fuzzed"
MAX_EXAMPLES = int(os.environ.get("FRONTIER_FUZZ_EXAMPLES", "15"))
# Every operation of the schema, known at collection time (openapi() starts nothing).
OPERATIONS = [(method.upper(), path) for path, ops in
              create_app(Settings(models=[], data_dir=Path(tempfile.gettempdir()) / "frontier-unused"))
              .openapi()["paths"].items() for method in ops]


@pytest.fixture
def fuzz_app(tiny_dir, tmp_path):
    """One app per test: schemathesis' pytest plugin ends every ASGI lifespan after each test (and the
    lifespan's end stops the engines and unloads the pool)."""
    engine = load_native_engine(tiny_dir, "cpu", torch.float32, EngineConfig(
        max_model_len=128, max_waiting=64, kv_cache_bytes=4 << 20, block_size=4, max_num_batched_tokens=64))
    engine.tokenizer.chat_template = PLAIN_TEMPLATE
    return build_app(tmp_path, engine, TokenizerEmbedder(engine.tokenizer), max_tokens_default=16, rag_chunk_size=32,
                     rag_chunk_overlap=8, rag_max_chunks_per_request=64, rag_max_documents_per_request=8)


@pytest.fixture
def api_schema(fuzz_app):
    from schemathesis.python import asgi

    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)  # starts the lifespan (RAG store)
    with asgi.get_client(fuzz_app) as client:
        r = client.post("/v1/rag/collections", json={"name": COLLECTION})
        assert r.status_code == 200, r.text
        r = client.post(f"/v1/rag/collections/{COLLECTION}/documents", json={"documents": [
            {"id": "a", "text": "w5 w6 w7 the lighthouse keeper", "metadata": {"k": 1, "tag": "x"}}]})
        assert r.status_code == 200, r.text
    try:
        yield schema
    finally:
        asgi.shutdown_lifespans()  # saves the RAG store, stops the engine


def _envelope_ok(status: int, content_type: str, body, where: str) -> None:
    assert status < 500, where
    if status >= 400 and content_type.startswith("application/json"):
        err = body.get("error") if isinstance(body, dict) else None
        assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, where


def _strategy(operation, mode: GenerationMode):
    names = {p.name for p in operation.path_parameters}
    if "name" in names and mode is GenerationMode.POSITIVE:  # valid cases target the filled collection
        return operation.as_strategy(generation_mode=mode, path_parameters={"name": COLLECTION})
    return operation.as_strategy(generation_mode=mode)


SETTINGS = dict(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("FRONTIER_FUZZ_RANDOM"), suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("method, path", OPERATIONS)
def test_schema_operations_never_5xx(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=_strategy(operation, mode))
    @settings(**SETTINGS)
    def check(case):
        response = case.call(timeout=60)
        where = f"{case.as_curl_command()}\n-> {response.status_code} {response.text[:2000]}"
        ctype = (response.headers.get("content-type") or [""])[0]
        _envelope_ok(response.status_code, ctype, response.json() if ctype.startswith("application/json") else None,
                     where)

    try:
        check()
    except Unsatisfiable:  # nothing to make invalid: no parameters, no body
        pytest.skip(f"no {mode.value} case for {method} {path}")


# ---- 2: bodies the schema does not describe ----
_WORDS = ["w5", "w6", "w7", "w8", "hello", "STOP", "<think>", "</think>", "é", "你好", "🙂", "\n", "  ", "\\", '"',
          "\u0000", "\ud83d\ude42"]
TEXT = st.lists(st.sampled_from(_WORDS) | st.text(max_size=6), max_size=10).map(" ".join)
NONEMPTY = TEXT.filter(lambda t: t.strip())
SCALAR = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
          | TEXT)
FLT_KEY = st.sampled_from(["k", "tag", "a.b", "missing", "$or", "$and", "$bogus", "bad key", ""])
FILTER = st.recursive(
    st.dictionaries(FLT_KEY, SCALAR | st.dictionaries(
        st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$regex"]),
        SCALAR | st.lists(SCALAR, max_size=3), max_size=2), max_size=3),
    lambda inner: st.dictionaries(st.sampled_from(["$and", "$or", "k"]), st.lists(inner, max_size=3) | inner,
                                  max_size=2), max_leaves=8)
RAG = st.fixed_dictionaries({"collection": st.sampled_from([COLLECTION, "missing", ""])},
                            optional={"top_k": st.integers(-1, 60),
                                      "mode": st.sampled_from(["hybrid", "dense", "keyword", "x"]),
                                      "filter": FILTER})
SAMPLING = {
    "temperature": st.none() | st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.integers(-1, 400),
    "min_p": st.floats(0, 1), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 3), "seed": st.integers(-2**63, 2**64 - 1),
    "stop": NONEMPTY | st.lists(NONEMPTY, max_size=4), "stop_token_ids": st.lists(st.integers(0, 255), max_size=4),
    "ignore_eos": st.booleans(), "n": st.integers(1, 4), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                 "content": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                   "text": TEXT}), max_size=2)})
# Mostly ending with a user turn (what RAG grounding searches with), sometimes anything.
MESSAGES = st.lists(MESSAGE, max_size=2).flatmap(
    lambda ms: st.builds(lambda t: ms + [{"role": "user", "content": t}], NONEMPTY)) | st.lists(MESSAGE, min_size=1,
                                                                                                max_size=3)
CHAT = st.fixed_dictionaries({"messages": MESSAGES}, optional={
    **SAMPLING, "max_tokens": st.integers(1, 24), "max_completion_tokens": st.integers(1, 24),
    "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5),
    "reasoning_effort": st.sampled_from(["low", "medium", "high", "none", "bogus"]),
    "reasoning": st.fixed_dictionaries({}, optional={"effort": st.sampled_from(["low", "high"]),
                                                     "max_tokens": st.integers(-1, 40),
                                                     "strategy": st.sampled_from(["single", "self_consistency"]),
                                                     "samples": st.integers(1, 4)}),
    "rag": RAG})
COMPLETION = st.fixed_dictionaries({"prompt": NONEMPTY | st.lists(st.integers(0, 255), min_size=1, max_size=20)
                                    | st.lists(NONEMPTY, min_size=1, max_size=3)}, optional={
    **SAMPLING, "max_tokens": st.integers(0, 24), "logprobs": st.integers(0, 5), "echo": st.booleans()})
DOCUMENTS = st.fixed_dictionaries({"documents": st.lists(st.fixed_dictionaries(
    {"text": TEXT}, optional={"id": st.sampled_from(["a", "b", "", "x/y", "../z", "a" * 300]) | TEXT,
                              "metadata": st.dictionaries(st.sampled_from(["k", "tag", "a", "$x", ""]), SCALAR,
                                                          max_size=3)}), max_size=4)},
                                   optional={"upsert": st.booleans()})
SEARCH = st.fixed_dictionaries({"query": TEXT}, optional={"top_k": st.integers(-1, 120), "filter": FILTER,
                                                          "mode": st.sampled_from(["hybrid", "dense", "keyword", "x"])})


def _send(fuzz_app, method: str, url: str, body) -> None:
    from schemathesis.python import asgi

    with asgi.get_client(fuzz_app, max_stream_events=100_000) as client:  # the default cuts streams at 20
        r = client.request(method, url, json=body, timeout=60)
    where = f"{method} {url} {json.dumps(body, ensure_ascii=True)[:3000]}\n-> {r.status_code} {r.text[:2000]}"
    ctype = r.headers.get("content-type", "")
    _envelope_ok(r.status_code, ctype, r.json() if ctype.startswith("application/json") else None, where)
    if r.status_code == 200 and ctype.startswith("text/event-stream"):
        events = [b[len("data: "):] for b in r.text.strip().split("\n\n")]
        assert events[-1] == "[DONE]", where
        assert not any('"error"' in e and "error" in json.loads(e) for e in events[:-1]), where


@pytest.mark.parametrize("url, body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", COMPLETION),
    (f"/v1/rag/collections/{COLLECTION}/chat",  # top_k there is the number of sources
     CHAT.map(lambda b: {k: v for k, v in b.items() if k not in ("rag", "top_k")})),
    (f"/v1/rag/collections/{COLLECTION}/documents", DOCUMENTS),
    (f"/v1/rag/collections/{COLLECTION}/search", SEARCH),
], ids=["chat", "completions", "rag-chat", "rag-documents", "rag-search"])
def test_bodies_never_5xx(api_schema, fuzz_app, url, body):
    @given(body=body)
    @settings(**SETTINGS)
    def check(body):
        _send(fuzz_app, "POST", url, body)

    check()


def test_replaced_documents_never_5xx(api_schema, fuzz_app):
    @given(doc_id=st.sampled_from(["a", "new", "x y", "🙂"]), body=st.fixed_dictionaries(
        {"text": TEXT}, optional={"metadata": st.dictionaries(st.sampled_from(["k", "tag", ""]), SCALAR, max_size=3)}))
    @settings(**SETTINGS)
    def check(doc_id, body):
        _send(fuzz_app, "PUT", f"/v1/rag/collections/{COLLECTION}/documents/{doc_id}", body)

    check()
