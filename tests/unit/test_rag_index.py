"""service/rag/vector_index.py + collection.py: exact/HNSW search, deletes, atomic save, and the
index rebuilt or caught up from SQLite when missing, truncated, corrupt or stale."""

from __future__ import annotations

import numpy as np
import pytest

from service.rag.chunking import ChunkingConfig, chunk_text, offsets_from_tokenizer
from service.rag.collection import Collection, CollectionSettings
from service.rag.docstore import NewDocument
from service.rag.vector_index import IndexConfig, IndexCorrupt, VectorIndex, build
from tests.unit.rag_fakes import WordTokenizer, hash_vector, random_unit

DIM = 32


def exact_top(x, q, k):
    return list(np.argsort(-(x @ q))[:k])


def test_flat_search_and_real_removal():
    x = random_unit(500, DIM)
    idx = VectorIndex(IndexConfig(DIM))
    idx.add(np.arange(1, 501), x, generation=1)
    hits = idx.search(x[:3], 5)
    assert [h[0][0] for h in hits] == [1, 2, 3] and abs(hits[0][0][1] - 1.0) < 1e-5
    assert idx.remove(np.array([1, 2, 999])) == 2
    assert idx.kind == "flat" and idx.num_vectors == 498 and idx.num_tombstones == 0
    assert idx.search(x[:1], 1)[0][0][0] != 1
    assert idx.search(x[2:3], 1)[0][0][0] == 3
    with pytest.raises(ValueError):
        idx.add(np.array([5]), x[:1])  # ids must ascend


def test_hnsw_above_threshold_with_tombstones_and_recall():
    x = random_unit(3000, DIM, seed=1)
    cfg = IndexConfig(DIM, ann_threshold=1000, hnsw_m=16, ef_construction=64, ef_search=64)
    idx = build(cfg, [(np.arange(1, 3001), x)], 3000, generation=7)
    assert idx.kind == "hnsw" and idx.generation == 7
    q = random_unit(50, DIM, seed=2)
    recall = np.mean([len(set(i - 1 for i, _ in got) & set(exact_top(x, qq, 10))) / 10
                      for got, qq in zip(idx.search(q, 10), q)])
    assert recall >= 0.9
    idx.remove(np.arange(1, 101))
    assert idx.num_tombstones == 100 and idx.num_vectors == 2900
    for got in idx.search(x[:100], 10):
        assert all(i > 100 for i, _ in got)


def test_filtered_search_exact_and_selector():
    x = random_unit(2000, DIM, seed=3)
    idx = build(IndexConfig(DIM, ann_threshold=500, exact_filter_max=100), [(np.arange(1, 2001), x)], 2000, 1)
    small = np.arange(1, 2001, 50)  # 40 ids: exact path
    got = idx.search(x[:1], 5, allowed=small)[0]
    assert got[0][0] == 1 and all(i in set(small) for i, _ in got)
    big = np.arange(1, 2001, 2)  # 1000 ids: selector path
    got = idx.search(x[2:3], 5, allowed=big)[0]
    assert got[0][0] == 3 and all(i % 2 == 1 for i, _ in got)


def test_save_load_round_trip_and_corruption(tmp_path):
    x = random_unit(300, DIM)
    idx = build(IndexConfig(DIM, ann_threshold=100), [(np.arange(10, 310), x)], 300, 5)
    idx.remove(np.array([10, 11]))
    path = tmp_path / "vectors.faiss"
    size = idx.save(path)
    assert path.stat().st_size == size and not list(tmp_path.glob(".*tmp"))
    back = VectorIndex.load(path, IndexConfig(DIM, ann_threshold=100))
    assert back.kind == "hnsw" and back.generation == 5 and back.num_vectors == 298
    assert back.search(x[5:6], 1)[0][0][0] == 15
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(IndexCorrupt):
        VectorIndex.load(path, IndexConfig(DIM))
    flipped = bytearray(data)
    flipped[100] ^= 0xFF  # one damaged byte
    path.write_bytes(bytes(flipped))
    with pytest.raises(IndexCorrupt, match="checksum"):
        VectorIndex.load(path, IndexConfig(DIM))


# ---- collection: rebuild / catch up from SQLite ----
OFFSETS = offsets_from_tokenizer(WordTokenizer())


def new_doc(i: int) -> NewDocument:
    text = f"document number {i} talks about topic{i} and shared words. " * 3
    chunks = chunk_text(text, OFFSETS, ChunkingConfig(chunk_size=12, overlap=0))
    return NewDocument(f"d{i}", text, {"i": i}, chunks, np.stack([hash_vector(c.text, DIM) for c in chunks]))


def make_collection(tmp_path, ann_threshold=10_000):
    s = CollectionSettings("c", "fake", DIM, 12, 0, ann_threshold)
    cfg = IndexConfig(DIM, ann_threshold=ann_threshold)
    return Collection.create(tmp_path / "c", s, cfg), (lambda st: IndexConfig(st.dim, ann_threshold=st.ann_threshold))


def test_reopen_loads_a_saved_index(tmp_path):
    coll, cfg_for = make_collection(tmp_path)
    coll.write([new_doc(i) for i in range(5)], replace=False)
    coll.save()
    coll.close()
    again = Collection.open(tmp_path / "c", cfg_for)
    assert again.index_status["state"] == "loaded"
    assert again.index.num_vectors == again.docstore.stats()["num_chunks"] > 0


def test_stale_index_catches_up(tmp_path):
    coll, cfg_for = make_collection(tmp_path)
    coll.write([new_doc(i) for i in range(5)], replace=False)
    coll.save()  # the file knows d0..d4
    coll.write([new_doc(i) for i in range(5, 8)], replace=False)  # not saved: "crash" now
    coll.delete_document("d0")
    coll.close()
    again = Collection.open(tmp_path / "c", cfg_for)
    assert again.index_status["state"] == "caught_up"
    assert set(again.index.alive_ids()) == set(again.docstore.chunk_ids())
    d7 = [c["chunk_id"] for c in again.docstore.document_chunks("d7")]
    assert again.index.search(again.docstore.vectors_for(np.array(d7[:1]), DIM), 1)[0][0][0] == d7[0]


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage"])
def test_missing_or_corrupt_index_is_rebuilt(tmp_path, damage):
    coll, cfg_for = make_collection(tmp_path, ann_threshold=20)  # HNSW after rebuild
    coll.write([new_doc(i) for i in range(10)], replace=False)
    coll.save()
    coll.close()
    path = tmp_path / "c" / "vectors.faiss"
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.write_bytes(b"\x00" * 5000)
    again = Collection.open(tmp_path / "c", cfg_for)
    assert again.index_status["state"] == "rebuilt", again.index_status
    assert set(again.index.alive_ids()) == set(again.docstore.chunk_ids())
    assert again.index.kind == "hnsw"
    VectorIndex.load(path, IndexConfig(DIM))  # the rebuilt index was saved
