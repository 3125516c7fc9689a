"""service/rag/docstore.py + filters.py: SQLite WAL source of truth, FTS5 keyword search, filters,
all-or-nothing writes."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from service.rag.chunking import ChunkingConfig, chunk_text, offsets_from_tokenizer
from service.rag.docstore import DocStore, NewDocument
from service.rag.keywords import fts_query
from service.rag.errors import RagError
from service.rag.filters import filter_sql
from tests.unit.rag_fakes import WordTokenizer, hash_vector

DIM = 32
OFFSETS = offsets_from_tokenizer(WordTokenizer())


def doc(doc_id: str, text: str, **metadata) -> NewDocument:
    chunks = chunk_text(text, OFFSETS, ChunkingConfig(chunk_size=20, overlap=0))
    return NewDocument(doc_id, text, metadata, chunks, np.stack([hash_vector(c.text, DIM) for c in chunks]))


@pytest.fixture
def store(tmp_path):
    s = DocStore(tmp_path / "store.sqlite3")
    yield s
    s.close()


def test_wal_and_full_sync(store):
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_add_get_and_keyword_search(store):
    res = store.add_documents([doc("a", "The zebra crossing is painted white.", lang="en", year=2020),
                               doc("b", "Quantum chromodynamics of gluons.", lang="en", year=2024)], replace=False)
    assert list(res.added_ids) == sorted(res.added_ids) and len(res.added_ids) == 2
    assert res.added_vectors.shape == (2, DIM) and res.generation == 1
    got = store.get_document("a")
    assert got["text"].startswith("The zebra") and got["metadata"] == {"lang": "en", "year": 2020}
    hits = store.keyword_search("zebra", 5)
    assert len(hits) == 1 and store.chunks_by_ids([hits[0][0]])[hits[0][0]]["document_id"] == "a"
    assert hits[0][1] > 0
    # porter stemming: "gluon" finds "gluons"
    assert store.keyword_search("gluon", 5)[0][0] == res.added_ids[1]


def test_keyword_query_is_sanitized(store):
    store.add_documents([doc("a", "error code ERR_4471 occurred in module foo-bar")], replace=False)
    for q in ['ERR_4471', '"unbalanced', 'foo-bar AND NOT', 'NEAR(x y)', '*', "col:umn"]:
        store.keyword_search(q, 5)  # never an FTS5 syntax error
    assert store.keyword_search("err_4471", 5)
    assert fts_query("!!!") == ""


def test_filters(store):
    store.add_documents([doc("a", "alpha text", lang="en", year=2020, tags="x"),
                         doc("b", "alpha text", lang="de", year=2024, nested={"k": True}),
                         doc("c", "alpha text", lang="en", year=2024)], replace=False)

    def docs_for(flt):
        ids = store.filtered_ids(flt)
        return sorted(r["document_id"] for r in store.chunks_by_ids(ids).values())

    assert docs_for({"lang": "en"}) == ["a", "c"]
    assert docs_for({"lang": "en", "year": {"$gte": 2021}}) == ["c"]
    assert docs_for({"year": {"$in": [2020, 2024]}, "lang": {"$ne": "en"}}) == ["b"]
    assert docs_for({"$or": [{"lang": "de"}, {"year": 2020}]}) == ["a", "b"]
    assert docs_for({"nested.k": True}) == ["b"]
    assert docs_for({"tags": {"$exists": True}}) == ["a"]
    hits = store.keyword_search("alpha", 10, {"lang": "de"})
    assert [store.chunks_by_ids([h[0]])[h[0]]["document_id"] for h in hits] == ["b"]
    for bad in [{"$nope": 1}, {"a;drop": 1}, {"k": {"$in": []}}, {"k": {"$gt": [1]}}, {"k": {"$regex": "x"}}]:
        with pytest.raises(RagError) as e:
            filter_sql(bad)
        assert e.value.status == 400 and e.value.param == "filter"


def test_conflict_rolls_back_the_whole_request(store):
    store.add_documents([doc("a", "first version")], replace=False)
    with pytest.raises(RagError) as e:
        store.add_documents([doc("new", "should not stay"), doc("a", "conflict")], replace=False)
    assert e.value.status == 409
    assert store.get_document("new") is None
    assert store.stats()["num_documents"] == 1 and store.generation() == 1
    assert not store.keyword_search("stay", 5)


def test_replace_and_delete_remove_chunks_and_fts(store):
    first = store.add_documents([doc("a", "old words about walruses")], replace=False)
    res = store.add_documents([doc("a", "new words about penguins")], replace=True)
    assert list(res.removed_ids) == list(first.added_ids)
    assert not store.keyword_search("walruses", 5) and store.keyword_search("penguins", 5)
    res = store.delete_document("a")
    assert list(res.removed_ids) == list(store.chunk_ids()) + list(res.removed_ids)  # nothing left
    assert len(store.chunk_ids()) == 0 and not store.keyword_search("penguins", 5)
    with pytest.raises(RagError):
        store.delete_document("a")
    assert store.generation() == 3


def test_vectors_round_trip_and_ids_never_reused(store):
    a = store.add_documents([doc("a", "one two three. " * 20)], replace=False)
    store.delete_document("a")
    b = store.add_documents([doc("b", "four five six")], replace=False)
    assert b.added_ids.min() > a.added_ids.max()
    ids, vecs = next(store.iter_vectors(DIM))
    assert list(ids) == list(b.added_ids) and np.allclose(vecs, b.added_vectors)
    assert np.allclose(store.vectors_for(b.added_ids, DIM), b.added_vectors)
