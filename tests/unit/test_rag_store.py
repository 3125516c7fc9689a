"""service/rag/store.py: the collection manager with a fake embedder (no model): lifecycle, limits,
serialized concurrent ingests, batched query embeddings, save on close."""

from __future__ import annotations

import asyncio

import pytest

from service.rag.errors import RagError
from service.rag.store import DocInput, RagConfig, RagStore
from tests.unit.rag_fakes import FakeEmbedder


def make_store(tmp_path, **cfg):
    emb = FakeEmbedder()

    async def embedder_for(model_id):
        if model_id != "fake":
            raise RagError(404, f"no model {model_id}")
        return emb

    return RagStore(tmp_path / "rag", RagConfig(**{"save_interval_s": 3600, **cfg}), embedder_for), emb


def run(coro):
    return asyncio.run(coro)


def test_collection_lifecycle(tmp_path):
    async def main():
        store, _ = make_store(tmp_path)
        await store.start()
        info = await store.create("docs", "fake", 50, 10, metadata={"team": "x"})
        assert info["name"] == "docs" and info["dimensions"] == 64 and info["num_chunks"] == 0
        assert info["chunking"] == {"chunk_size": 50, "chunk_overlap": 10}
        for bad, status in [("bad name!", 400), ("docs", 409)]:
            with pytest.raises(RagError) as e:
                await store.create(bad, "fake", None, None)
            assert e.value.status == status
        with pytest.raises(RagError) as e:
            await store.create("big", "fake", 1000, None)  # longer than the embedder takes
        assert e.value.status == 400 and e.value.param == "chunk_size"
        assert [c["name"] for c in await store.list()] == ["docs"]
        await store.drop("docs")
        assert await store.list() == []
        with pytest.raises(RagError) as e:
            await store.describe("docs")
        assert e.value.status == 404
        await store.close()

    run(main())


def test_limits_and_nothing_half_ingested(tmp_path):
    async def main():
        store, _ = make_store(tmp_path, max_chunks_per_request=5, max_documents_per_request=3)
        await store.start()
        await store.create("c", "fake", 10, 0)
        long = "word " * 200  # ~20 chunks of 10 tokens
        with pytest.raises(RagError) as e:
            await store.add("c", [DocInput("short one"), DocInput(long)])
        assert e.value.status == 413 and "5" in e.value.message
        with pytest.raises(RagError) as e:
            await store.add("c", [DocInput("x")] * 4)
        assert e.value.status == 413
        with pytest.raises(RagError) as e:
            await store.add("c", [DocInput("ok", id="a"), DocInput("  ", id="b")])
        assert e.value.status == 400
        with pytest.raises(RagError) as e:
            await store.add("c", [DocInput("ok", id="a"), DocInput("again", id="a")])
        assert e.value.status == 400
        d = await store.describe("c")
        assert d["num_documents"] == 0 and d["num_vectors"] == 0
        await store.close()

    run(main())


def test_concurrent_ingests_are_serialized_and_all_land(tmp_path):
    async def main():
        store, emb = make_store(tmp_path)
        await store.start()
        await store.create("c", "fake", 20, 5)
        await asyncio.gather(*[store.add("c", [DocInput(f"doc {i} unique{i} " * 10, id=f"d{i}")])
                               for i in range(20)])
        d = await store.describe("c")
        assert d["num_documents"] == 20 and d["num_vectors"] == d["num_chunks"] > 20
        emb.calls.clear()
        results = await asyncio.gather(*[store.search("c", f"doc {i} unique{i}", 3, "dense") for i in range(20)])
        assert all(r[0]["document_id"] == f"d{i}" for i, r in enumerate(results))
        assert len(emb.calls) < 20 and sum(emb.calls) == 20  # batched query embeddings
        kw = await store.search("c", "unique7", 3, "keyword")
        assert kw[0]["document_id"] == "d7"
        out = await store.delete_document("c", "d7")
        assert out["deleted"] and out["num_chunks"] > 0
        assert all(r["document_id"] != "d7" for r in await store.search("c", "unique7", 10, "hybrid"))
        with pytest.raises(RagError) as e:
            await store.get_document("c", "d7", False)
        assert e.value.status == 404
        await store.close()
        # close() saved the index: a restart loads it without a rebuild
        store2, _ = make_store(tmp_path)
        await store2.start()
        d2 = await store2.describe("c")
        assert d2["index"]["state"] == "loaded" and d2["num_vectors"] == d2["num_chunks"] == d["num_chunks"] - out["num_chunks"]
        await store2.close()

    run(main())


def test_upsert_replaces_and_conflict_without_it(tmp_path):
    async def main():
        store, _ = make_store(tmp_path)
        await store.start()
        await store.create("c", "fake", 20, 0)
        await store.add("c", [DocInput("old text about walruses", id="a", metadata={"v": 1})])
        with pytest.raises(RagError) as e:
            await store.add("c", [DocInput("new", id="a")])
        assert e.value.status == 409
        r = await store.add("c", [DocInput("new text about penguins", id="a", metadata={"v": 2})], upsert=True)
        assert r["num_replaced_chunks"] == 1
        doc = await store.get_document("c", "a", True)
        assert doc["metadata"] == {"v": 2} and "penguins" in doc["text"] and len(doc["chunks"]) == 1
        assert not await store.search("c", "walruses", 5, "keyword")
        await store.close()

    run(main())


def test_start_sweeps_half_created_collections(tmp_path):
    async def main():
        store, _ = make_store(tmp_path)
        (tmp_path / "rag" / ".new-x-123").mkdir(parents=True)
        (tmp_path / "rag" / ".drop-y-456").mkdir(parents=True)
        await store.start()
        assert not list((tmp_path / "rag").iterdir())
        await store.close()

    run(main())
