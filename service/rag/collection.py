"""One collection on disk: its SQLite docstore (the truth) and its FAISS index (derived, rebuildable).

Layout: data_dir/rag/<name>/store.sqlite3 (+ -wal, -shm) and vectors.faiss. Every method here is
blocking (SQLite, FAISS, file I/O) and runs in a thread; the store serializes writes per collection.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from service.rag.docstore import DocStore, NewDocument, WriteResult
from service.rag.vector_index import IndexConfig, IndexCorrupt, VectorIndex, build

log = logging.getLogger(__name__)
DB_FILE, INDEX_FILE = "store.sqlite3", "vectors.faiss"


@dataclass
class CollectionSettings:
    name: str
    embedding_model: str
    dim: int
    chunk_size: int
    chunk_overlap: int
    ann_threshold: int
    metadata: dict = field(default_factory=dict)
    created_at: int = field(default_factory=lambda: int(time.time()))


class Collection:
    def __init__(self, root: Path, settings: CollectionSettings, index_config: IndexConfig):
        self.root = Path(root)
        self.settings = settings
        self.index_config = index_config
        self.docstore = DocStore(self.root / DB_FILE)
        self.index = VectorIndex(index_config)
        self.index_status: dict = {"state": "unopened"}
        self.saved_generation = -1
        self.counts = {"num_documents": 0, "num_chunks": 0}
        self.closed = False

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    # ---- create / open ----
    @classmethod
    def create(cls, root: Path, settings: CollectionSettings, index_config: IndexConfig) -> "Collection":
        Path(root).mkdir(parents=True, exist_ok=True)
        coll = cls(root, settings, index_config)
        coll.docstore.set_meta("settings", asdict(settings))
        coll.index_status = {"state": "new"}
        coll.save()
        return coll

    @classmethod
    def open(cls, root: Path, index_config_for) -> "Collection":
        """index_config_for(CollectionSettings) -> IndexConfig. Verifies the index against SQLite."""
        store = DocStore(Path(root) / DB_FILE)
        try:
            raw = store.get_meta("settings")
        finally:
            store.close()
        if raw is None:
            raise ValueError(f"{root}: no collection settings in the database")
        if not isinstance(raw, dict):
            raise ValueError("collection settings are not an object")
        settings = CollectionSettings(**raw)
        coll = cls(root, settings, index_config_for(settings))
        try:
            coll.open_index()
        except BaseException:  # a damaged collection keeps no connections open
            coll.close()
            raise
        return coll

    def open_index(self) -> dict:
        """Load the saved index and reconcile it with SQLite; rebuild it when missing or corrupt."""
        t0 = time.monotonic()
        ids = self.docstore.chunk_ids()  # [n] ascending: what must be searchable
        generation = self.docstore.generation()
        state, reason, idx = "loaded", "", None
        try:
            idx = VectorIndex.load(self.index_path, self.index_config)
        except FileNotFoundError:
            state, reason = "rebuilt", "index file missing"
        except (IndexCorrupt, RuntimeError, ValueError, OSError) as exc:  # faiss raises RuntimeError
            state, reason = "rebuilt", f"index file corrupt: {exc}"
        if idx is not None:
            alive = idx.alive_ids()
            extra = np.setdiff1d(alive, ids, assume_unique=True)
            missing = np.setdiff1d(ids, alive, assume_unique=True)
            if len(missing) and not idx.can_add(missing):
                state, reason, idx = "rebuilt", "index stale beyond catching up", None
            elif len(extra) or len(missing) or idx.generation != generation:
                state = "caught_up"
                reason = f"index stale (generation {idx.generation} < {generation}): " \
                         f"+{len(missing)} vectors, -{len(extra)} deleted"
                idx.remove(extra)
                last = int(idx.ids[-1]) if len(idx.ids) else 0
                for batch_ids, vecs in self.docstore.iter_vectors(self.settings.dim, after=last):
                    idx.add(batch_ids, vecs)
        if idx is None:
            idx = build(self.index_config, self.docstore.iter_vectors(self.settings.dim), len(ids), generation)
        if idx.needs_rebuild():
            idx = idx.rebuilt()
        idx.generation = generation
        if idx.num_vectors != len(ids):  # an internal invariant, checked where it is cheap
            raise RuntimeError(f"{self.settings.name}: index has {idx.num_vectors} vectors, SQLite {len(ids)} chunks")
        self.index = idx
        if state == "loaded":
            self.saved_generation = generation
        else:
            log.warning("collection %s: %s; %s from SQLite (%d vectors) in %.2fs", self.settings.name, reason,
                        state.replace("_", " "), len(ids), time.monotonic() - t0)
            self.save()
        self.index_status = {"state": state, "reason": reason, "seconds": round(time.monotonic() - t0, 3)}
        self.refresh_counts()
        return self.index_status

    # ---- writes ----
    def write(self, docs: list[NewDocument], replace: bool) -> WriteResult:
        res = self.docstore.add_documents(docs, replace)  # committed (durable) when this returns
        self._apply(res)
        return res

    def delete_document(self, doc_id: str) -> WriteResult:
        res = self.docstore.delete_document(doc_id)
        self._apply(res)
        return res

    def _apply(self, res: WriteResult) -> None:
        """Mirror a committed write into the index; on failure the index is reconciled from SQLite."""
        try:
            if len(res.removed_ids):
                self.index.remove(res.removed_ids)
            self.index.add(res.added_ids, res.added_vectors, res.generation)
            if self.index.needs_rebuild():
                t0 = time.monotonic()
                self.index.replace(self.index.rebuilt())
                log.info("collection %s: index rebuilt as %s (%d vectors) in %.1fs", self.settings.name,
                         self.index.kind, self.index.num_vectors, time.monotonic() - t0)
        except Exception:
            log.exception("collection %s: index update failed; reconciling from SQLite", self.settings.name)
            self.open_index()
        self.refresh_counts()

    def refresh_counts(self) -> None:
        s = self.docstore.stats()
        self.counts = {"num_documents": s["num_documents"], "num_chunks": s["num_chunks"]}

    # ---- persistence ----
    @property
    def dirty(self) -> bool:
        return self.index.generation != self.saved_generation

    def save(self) -> None:
        gen = self.index.generation
        self.index.save(self.index_path)
        self.saved_generation = gen

    def describe(self) -> dict:
        s = self.docstore.stats()
        try:
            index_bytes = self.index_path.stat().st_size
        except OSError:
            index_bytes = 0
        return {
            "object": "rag.collection", "name": self.settings.name, "status": "ready",
            "created_at": self.settings.created_at,
            "embedding_model": self.settings.embedding_model, "dimensions": self.settings.dim,
            "chunking": {"chunk_size": self.settings.chunk_size, "chunk_overlap": self.settings.chunk_overlap},
            "metadata": self.settings.metadata,
            "num_documents": s["num_documents"], "num_chunks": s["num_chunks"], "num_tokens": s["num_tokens"],
            "num_vectors": self.index.num_vectors, "size_bytes": s["db_bytes"] + index_bytes,
            "index": {"kind": self.index.kind, "num_vectors": self.index.num_vectors,
                      "num_tombstones": self.index.num_tombstones, "ann_threshold": self.settings.ann_threshold,
                      "file_bytes": index_bytes, "saved": not self.dirty, **self.index_status},
        }

    def close(self) -> None:
        self.closed = True
        self.docstore.close()

