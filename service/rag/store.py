"""The collection manager the app state owns: create/open/drop collections, ingest, delete, search.

Concurrency: one asyncio lock per collection serializes its writes (chunking and embedding happen
before taking it); SQLite and FAISS work runs in threads (asyncio.to_thread), embeddings in the
embedder's thread. Query embeddings are batched: queries that arrive while one batch is encoding
go together in the next. A background task saves indexes that changed (SQLite is the truth, so a
lagging index file only costs a catch-up at the next start); close() saves the rest.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

from service.rag.chunking import ChunkingConfig, chunk_text, offsets_from_tokenizer
from service.rag.collection import DB_FILE, Collection, CollectionSettings
from service.rag.config import DocInput, RagConfig
from service.rag.docstore import NewDocument
from service.rag.errors import (RagError, collection_damaged, collection_not_found, damage_reason,
                                document_not_found)
from service.rag.batcher import QueryBatcher
from service.rag.retriever import Mode, retrieve
from service.rag.validate import (NAME, check_collection_name, check_document_id, check_documents, check_json,
                                  check_text)
from service.rag.vector_index import IndexConfig

log = logging.getLogger(__name__)


class RagStore:
    def __init__(self, root: Path, config: RagConfig, embedder_for: Callable[[str], Awaitable[object]],
                 metrics=None):
        self.root = Path(root)
        self.config = config
        self.embedder_for = embedder_for  # model id -> Embedder (encode, tokenizer, dim, max_seq_length)
        self.metrics = metrics
        self.collections: dict[str, Collection] = {}
        self.damaged: dict[str, str] = {}  # name -> why it could not be opened (retried on each use)
        self._open_locks: dict[str, asyncio.Lock] = {}
        self._write_locks: dict[str, asyncio.Lock] = {}
        self._batchers: dict[str, QueryBatcher] = {}
        self._offsets: dict[str, object] = {}  # embedding model id -> token offsets function
        self._saver: asyncio.Task | None = None

    def index_config(self, s: CollectionSettings) -> IndexConfig:
        c = self.config
        return IndexConfig(s.dim, s.ann_threshold, c.hnsw_m, c.ef_construction, c.ef_search)

    # ---- lifetime ----
    async def start(self) -> None:
        await asyncio.to_thread(self._sweep)
        self._saver = asyncio.create_task(self._save_loop())
        for name in await asyncio.to_thread(self._names):  # verify / rebuild indexes now, not on first use
            try:
                await self.get(name)
            except RagError:  # damaged: logged by get, reported by list/describe
                pass

    def _sweep(self) -> None:
        """Remove what a crash mid-create or mid-drop left behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        for p in self.root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)

    def _names(self) -> list[str]:
        # Only valid names: a directory made by hand (or by an older version) must not break the listing.
        return sorted(p.name for p in self.root.iterdir() if NAME.fullmatch(p.name) and (p / DB_FILE).exists())

    async def close(self) -> None:
        if self._saver:
            self._saver.cancel()
        for coll in list(self.collections.values()):
            async with self._write_locks[coll.settings.name]:
                if coll.dirty and not coll.closed:
                    await asyncio.to_thread(coll.save)
                coll.close()
        self.collections.clear()

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.save_interval_s)
            for name, coll in list(self.collections.items()):
                if coll.dirty and not coll.closed:
                    try:  # saving takes the index's read lock: searches go on meanwhile
                        await asyncio.to_thread(coll.save)
                    except Exception:
                        log.exception("saving the index of %s failed (SQLite still has everything)", name)

    # ---- collections ----
    async def create(self, name: str, embedding_model: str, chunk_size: int | None, chunk_overlap: int | None,
                     ann_threshold: int | None = None, metadata: dict | None = None) -> dict:
        check_collection_name(name, "name")
        if metadata is not None:
            check_json(metadata, "metadata")
        embedder = await self.embedder_for(embedding_model)
        size = chunk_size or self.config.chunk_size
        overlap = min(self.config.chunk_overlap, size // 5) if chunk_overlap is None else chunk_overlap
        limit = embedder.max_seq_length - 2
        if size > limit:
            raise RagError(400, f"chunk_size {size} exceeds what {embedding_model} embeds ({limit} tokens)",
                           param="chunk_size")
        try:
            ChunkingConfig(size, overlap)
        except ValueError as exc:
            raise RagError(400, str(exc), param="chunk_overlap" if "overlap" in str(exc) else "chunk_size") from None
        settings = CollectionSettings(name, embedding_model, embedder.dim, size, overlap,
                                      ann_threshold or self.config.ann_threshold, metadata or {})
        async with self._open_lock(name):
            if (self.root / name).exists():
                raise RagError(409, f"collection {name!r} already exists", param="name", code="collection_exists")
            coll = await asyncio.to_thread(self._create_sync, settings)
            self._write_locks.setdefault(name, asyncio.Lock())
            self.collections[name] = coll
        return await asyncio.to_thread(coll.describe)

    def _create_sync(self, settings: CollectionSettings) -> Collection:
        tmp = self.root / f".new-{settings.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        coll = Collection.create(tmp, settings, self.index_config(settings))
        coll.close()
        tmp.rename(self.root / settings.name)  # atomic: all there or nothing
        return Collection.open(self.root / settings.name, self.index_config)

    def _open_lock(self, name: str) -> asyncio.Lock:
        return self._open_locks.setdefault(name, asyncio.Lock())

    async def get(self, name: str) -> Collection:
        coll = self.collections.get(name)
        if coll is not None:
            return coll
        check_collection_name(name)  # a path segment such as '..' never reaches the file system
        async with self._open_lock(name):
            if name in self.collections:
                return self.collections[name]
            path = self.root / name
            if not (path / DB_FILE).exists():
                raise collection_not_found(name)
            try:
                coll = await asyncio.to_thread(Collection.open, path, self.index_config)
            except Exception as exc:  # corrupt database or settings: this collection only
                reason = self.damaged[name] = damage_reason(exc, path)
                log.error("collection %s is damaged: %s", name, reason)
                raise collection_damaged(name, reason) from None
            self.damaged.pop(name, None)
            self._write_locks.setdefault(name, asyncio.Lock())
            self.collections[name] = coll
            return coll

    async def list(self) -> list[dict]:
        out = []
        for name in await asyncio.to_thread(self._names):
            try:
                out.append(await self.describe(name))
            except RagError:  # dropped meanwhile
                continue
        return out

    async def describe(self, name: str) -> dict:
        """The collection's state; a damaged one answers {"status": "damaged", "reason"} instead of failing."""
        try:
            coll = await self.get(name)
            return await asyncio.to_thread(coll.describe)
        except RagError as exc:
            if exc.code != "collection_damaged":
                raise
            reason = self.damaged.get(name, exc.message)
        except Exception as exc:  # open, but its files broke since: report, do not fail the listing
            reason = damage_reason(exc, self.root / name)
            log.error("collection %s: describe failed: %s", name, reason)
        return {"object": "rag.collection", "name": name, "status": "damaged", "reason": reason}

    async def drop(self, name: str) -> None:
        """Drop a collection, damaged ones included (that is how a client gets rid of them)."""
        check_collection_name(name)
        async with self._open_lock(name):
            coll = self.collections.pop(name, None)
            if coll is None and not (self.root / name / DB_FILE).exists():
                raise collection_not_found(name)
            async with self._write_locks.setdefault(name, asyncio.Lock()):
                if coll is not None:
                    coll.close()
                grave = self.root / f".drop-{name}-{uuid.uuid4().hex[:8]}"
                await asyncio.to_thread((self.root / name).rename, grave)  # gone at once, even if rmtree stops
                await asyncio.to_thread(shutil.rmtree, grave, True)
            self._batchers.pop(name, None)
            self.damaged.pop(name, None)

    # ---- documents ----
    async def add(self, name: str, inputs: list[DocInput], upsert: bool = False) -> dict:
        t0 = time.monotonic()
        coll = await self.get(name)
        cfg = self.config
        if not inputs:
            raise RagError(400, "no documents given", param="documents")
        if len(inputs) > cfg.max_documents_per_request:
            raise RagError(413, f"{len(inputs)} documents in one request; the limit is "
                           f"{cfg.max_documents_per_request}: send smaller batches", param="documents",
                           code="too_many_documents")
        ids = [d.id or uuid.uuid4().hex for d in inputs]
        check_documents(inputs, ids)
        embedder = await self.embedder_for(coll.settings.embedding_model)
        chunking = ChunkingConfig(coll.settings.chunk_size, coll.settings.chunk_overlap)
        offsets = self._offsets.get(coll.settings.embedding_model)
        if offsets is None:
            offsets = self._offsets[coll.settings.embedding_model] = offsets_from_tokenizer(embedder.tokenizer)
        chunked = await asyncio.to_thread(lambda: [chunk_text(d.text, offsets, chunking) for d in inputs])
        total = sum(len(c) for c in chunked)
        if total > cfg.max_chunks_per_request:
            raise RagError(413, f"these documents make {total} chunks; the limit is {cfg.max_chunks_per_request} "
                           "per request: send fewer or shorter documents per request", param="documents",
                           code="too_many_chunks")
        texts = [f"{c.heading}\n{c.text}" if c.heading and c.heading not in c.text else c.text
                 for chunks in chunked for c in chunks]
        vecs = np.asarray(await embedder.encode(texts), dtype=np.float32) if texts else None
        docs, at = [], 0
        for d, doc_id, chunks in zip(inputs, ids, chunked):
            docs.append(NewDocument(doc_id, d.text, d.metadata or {}, chunks, vecs[at:at + len(chunks)], d.source))
            at += len(chunks)
        async with self._write_locks[name]:
            if coll.closed:
                raise collection_not_found(name)
            res = await asyncio.to_thread(coll.write, docs, upsert)
        self._observe("ingest", name, t0)
        return {"object": "list", "data": [{"object": "rag.document", **d} for d in res.documents],
                "num_chunks": len(res.added_ids), "num_replaced_chunks": len(res.removed_ids)}

    async def delete_document(self, name: str, doc_id: str) -> dict:
        check_document_id(doc_id)  # a URL path segment: '..' or '.' here was never a document
        coll = await self.get(name)
        async with self._write_locks[name]:
            try:
                res = await asyncio.to_thread(coll.delete_document, doc_id)
            except RagError as exc:
                if exc.status == 404:
                    raise document_not_found(name, doc_id) from None
                raise
        return {"object": "rag.document.deleted", "id": doc_id, "deleted": True,
                "num_chunks": len(res.removed_ids)}

    async def get_document(self, name: str, doc_id: str, with_chunks: bool) -> dict:
        check_document_id(doc_id)  # a URL path segment: '..' or '.' here was never a document
        coll = await self.get(name)

        def read():
            doc = coll.docstore.get_document(doc_id)
            if doc is not None and with_chunks:
                doc["chunks"] = coll.docstore.document_chunks(doc_id)
            return doc

        doc = await asyncio.to_thread(read)
        if doc is None:
            raise document_not_found(name, doc_id)
        return {"object": "rag.document", **doc}

    async def list_documents(self, name: str, limit: int, after: str | None) -> dict:
        coll = await self.get(name)
        docs = await asyncio.to_thread(coll.docstore.list_documents, limit + 1, after)
        return {"object": "list", "data": [{"object": "rag.document", **d} for d in docs[:limit]],
                "has_more": len(docs) > limit, "last_id": docs[:limit][-1]["id"] if docs else None}

    # ---- search ----
    async def search(self, name: str, query: str, top_k: int = 5, mode: str = "hybrid",
                     flt: dict | None = None) -> list[dict]:
        t0 = time.monotonic()
        coll = await self.get(name)
        try:
            mode_ = Mode(mode)
        except ValueError:
            raise RagError(400, "mode must be one of dense, keyword, hybrid", param="mode") from None
        if not isinstance(query, str) or not query.strip():
            raise RagError(400, "query must be non-empty", param="query")
        check_text(query, "query")
        if flt is not None:
            check_json(flt, "filter", code="invalid_filter")
        qvec = None
        if mode_ != Mode.KEYWORD:
            batcher = self._batchers.get(name)
            if batcher is None:
                batcher = self._batchers[name] = QueryBatcher(await self.embedder_for(coll.settings.embedding_model))
            qvec = await batcher.encode(query)
        results = await asyncio.to_thread(retrieve, coll.docstore, coll.index, query, qvec, mode_, top_k, flt)
        self._observe("search", name, t0, mode_.value)
        return results

    def _observe(self, kind: str, name: str, t0: float, mode: str | None = None) -> None:
        if self.metrics is None:
            return
        try:  # metrics never break a request
            if kind == "ingest":
                self.metrics.rag_ingest_latency.labels(name).observe(time.monotonic() - t0)
            else:
                self.metrics.rag_search_latency.labels(name, mode).observe(time.monotonic() - t0)
        except Exception:
            pass

    def stats(self) -> dict[str, dict]:
        """Per open collection: documents, chunks (SQLite) and vectors (index), for metrics."""
        return {name: {**c.counts, "num_vectors": c.index.num_vectors}
                for name, c in list(self.collections.items()) if not c.closed}

