"""service/rag/retriever.py (RRF, modes, filters) and prompt.py (numbered sources, token budget)."""

from __future__ import annotations

import numpy as np
import pytest

from service.rag.chunking import ChunkingConfig, chunk_text, offsets_from_tokenizer
from service.rag.docstore import DocStore, NewDocument
from service.rag.prompt import INSTRUCTIONS, drop_weakest, format_source, select_sources, sources_message
from service.rag.retriever import RRF_K, Mode, retrieve, rrf
from service.rag.vector_index import IndexConfig, VectorIndex
from tests.unit.rag_fakes import WordTokenizer, hash_vector

DIM = 64
OFFSETS = offsets_from_tokenizer(WordTokenizer())


def test_rrf_scores_and_order():
    fused = rrf([[1, 2, 3], [3, 4, 1]])
    scores = dict(fused)
    assert scores[1] == pytest.approx(1 / (RRF_K + 1) + 1 / (RRF_K + 3))
    assert scores[3] == pytest.approx(1 / (RRF_K + 3) + 1 / (RRF_K + 1))
    assert scores[4] == pytest.approx(1 / (RRF_K + 2))
    assert [i for i, _ in fused][:2] in ([1, 3], [3, 1]) and fused[-1][0] in (2, 4)
    assert rrf([]) == [] and rrf([[], [5]]) == [(5, pytest.approx(1 / (RRF_K + 1)))]


@pytest.fixture
def corpus(tmp_path):
    store = DocStore(tmp_path / "s.sqlite3")
    index = VectorIndex(IndexConfig(DIM))
    texts = {
        "cats": "cats purr softly and nap in sunny windows",
        "dogs": "dogs bark loudly and fetch sticks in parks",
        "code": "the error code XQ-7731 means the flux capacitor overheated",
        "tax": "quarterly tax filings are due at the end of each quarter",
    }
    docs = []
    for i, (doc_id, text) in enumerate(texts.items()):
        chunks = chunk_text(text, OFFSETS, ChunkingConfig(chunk_size=50, overlap=0))
        docs.append(NewDocument(doc_id, text, {"kind": "animal" if i < 2 else "other"}, chunks,
                                np.stack([hash_vector(c.text, DIM) for c in chunks])))
    res = store.add_documents(docs, replace=False)
    index.add(res.added_ids, res.added_vectors, res.generation)
    yield store, index
    store.close()


def search(corpus, query, mode, k=2, flt=None):
    store, index = corpus
    return retrieve(store, index, query, hash_vector(query, DIM), Mode(mode), k, flt)


@pytest.mark.parametrize("mode", ["dense", "keyword", "hybrid"])
def test_each_mode_finds_the_planted_passage(corpus, mode):
    got = search(corpus, "why does my flux capacitor show error XQ-7731", mode)
    assert got[0]["document_id"] == "code"
    r = got[0]
    assert set(r) >= {"document_id", "chunk_id", "score", "text", "metadata"} and r["metadata"] == {"kind": "other"}
    if mode == "hybrid":
        assert set(r["scores"]) == {"dense", "keyword"}


def test_filter_restricts_every_mode(corpus):
    for mode in ("dense", "keyword", "hybrid"):
        got = search(corpus, "tax filings quarter", mode, k=4, flt={"kind": "animal"})
        assert {r["document_id"] for r in got} <= {"cats", "dogs"}


def test_prompt_budget_never_cuts_a_chunk(tiny_tokenizer):
    results = [{"document_id": f"d{i}", "chunk_id": 10 - i, "score": 1.0 - i / 10,
                "text": ("Hello world, this is a test. " * (3 + i)).strip()} for i in range(5)]
    full = select_sources(results, tiny_tokenizer, 10_000)
    assert len(full) == 5
    base = len(tiny_tokenizer.encode(INSTRUCTIONS + "\n\nSources:\n", add_special_tokens=False))
    one = len(tiny_tokenizer.encode(format_source(99, results[0]) + "\n\n", add_special_tokens=False))
    small = select_sources(results, tiny_tokenizer, base + 2 * one + 10)
    assert 0 < len(small) < 5
    content, citations = sources_message(small)
    assert content.startswith(INSTRUCTIONS)
    for r in small:
        assert r["text"] in content  # whole
    for r in results:
        if r not in small:
            assert r["text"] not in content
    # numbered by chunk id, not rank: the same sources give the same prompt in any order
    assert [c["chunk_id"] for c in citations] == sorted(c["chunk_id"] for c in citations)
    assert [c["index"] for c in citations] == list(range(1, len(small) + 1))
    assert sources_message(list(reversed(small)))[0] == content
    assert f"[1] (document: {citations[0]['document_id']})" in content
    assert drop_weakest(small) == [r for r in small if r["score"] != min(x["score"] for x in small)]
    assert sources_message([])[1] == []
