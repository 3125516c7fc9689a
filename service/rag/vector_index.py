"""The FAISS index of one collection: inner product over L2-normalized vectors (= cosine).

Exact (IndexFlatIP) while small; past `ann_threshold` vectors it becomes HNSW (IndexHNSWFlat), which
needs no training and takes inserts at any time. FAISS positions map to chunk ids through `ids`
(ascending, since chunk ids are); deletes are tombstones in `alive` that searches skip through an
IDSelectorBitmap; an exact index compacts at once, HNSW rebuilds when a quarter is dead.

Saved as one file written to a temporary name, fsynced and renamed over the old one (atomic):
  [faiss index][ids int64][alive bitmap][trailer JSON][trailer length u64][sha256 of all before][magic]
`load` checks magic, length and checksum (a truncated or damaged file raises IndexCorrupt); the
collection then compares the ids with SQLite and catches up or rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

MAGIC = b"FRVIDX01"
_TAIL = 8 + 32 + 8  # trailer length, sha256, magic


class IndexCorrupt(Exception):
    pass


@dataclass(frozen=True)
class IndexConfig:
    dim: int
    ann_threshold: int = 50_000  # exact search up to this many vectors
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 128
    exact_filter_max: int = 20_000  # a filter leaving at most this many vectors is searched exactly


class _RWLock:
    """Many searches (and saves) at once, or one mutation."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def read(self):
        return _Held(self, False)

    def write(self):
        return _Held(self, True)


class _Held:
    def __init__(self, lock: _RWLock, write: bool):
        self.lock, self.write = lock, write

    def __enter__(self):
        with self.lock._cond:
            while self.lock._writer or (self.write and self.lock._readers):
                self.lock._cond.wait()
            if self.write:
                self.lock._writer = True
            else:
                self.lock._readers += 1

    def __exit__(self, *exc):
        with self.lock._cond:
            if self.write:
                self.lock._writer = False
            else:
                self.lock._readers -= 1
            self.lock._cond.notify_all()


class VectorIndex:
    def __init__(self, config: IndexConfig):
        self.config = config
        self.index = faiss.IndexFlatIP(config.dim)
        self.ids = np.zeros(0, np.int64)  # position -> chunk id, ascending
        self.alive = np.zeros(0, bool)  # position -> not deleted
        self.generation = 0  # the docstore generation this index reflects
        self.lock = _RWLock()

    # ---- accounting ----
    @property
    def kind(self) -> str:
        return "hnsw" if isinstance(self.index, faiss.IndexHNSW) else "flat"

    @property
    def num_vectors(self) -> int:
        return int(self.alive.sum())

    @property
    def num_tombstones(self) -> int:
        return len(self.alive) - self.num_vectors

    def alive_ids(self) -> np.ndarray:
        return self.ids[self.alive]

    def needs_rebuild(self) -> bool:
        """HNSW with too many tombstones, or exact search grown past the threshold."""
        if self.kind == "hnsw":
            return self.num_tombstones > max(1000, len(self.ids) // 4)
        return self.num_vectors > self.config.ann_threshold

    # ---- mutations ----
    def can_add(self, ids: np.ndarray) -> bool:
        return len(ids) == 0 or ((np.diff(ids) > 0).all() and (not len(self.ids) or ids[0] > self.ids[-1]))

    def add(self, ids: np.ndarray, vectors: np.ndarray, generation: int | None = None) -> None:
        # ids: [n] ascending, all above the current ones; vectors: [n, dim]
        if not self.can_add(ids):
            raise ValueError("chunk ids must ascend past the ids already indexed")
        with self.lock.write():
            if len(ids):
                self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
                self.ids = np.concatenate([self.ids, ids.astype(np.int64)])
                self.alive = np.concatenate([self.alive, np.ones(len(ids), bool)])
            if generation is not None:
                self.generation = generation

    def remove(self, ids: np.ndarray, generation: int | None = None) -> int:
        with self.lock.write():
            pos = self._positions(ids)
            pos = pos[self.alive[pos]]
            if len(pos) and self.kind == "flat":  # exact index: really drop them
                self.index.remove_ids(faiss.IDSelectorBatch(pos.astype(np.int64)))
                keep = np.ones(len(self.ids), bool)
                keep[pos] = False
                self.ids, self.alive = self.ids[keep], self.alive[keep]
            elif len(pos):
                alive = self.alive.copy()
                alive[pos] = False
                self.alive = alive
            if generation is not None:
                self.generation = generation
            return len(pos)

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        ok = pos < len(self.ids)
        ok[ok] = self.ids[pos[ok]] == ids[ok]
        return pos[ok]

    def rebuilt(self) -> "VectorIndex":
        """A fresh index of the live vectors (compaction / exact -> HNSW); swap it in with `replace`."""
        with self.lock.read():
            pos = np.flatnonzero(self.alive)
            vecs = self.index.reconstruct_batch(pos) if len(pos) else np.zeros((0, self.config.dim), np.float32)
            ids, gen = self.ids[pos], self.generation
        return build(self.config, [(ids, vecs)], len(ids), gen)

    def replace(self, other: "VectorIndex") -> None:
        with self.lock.write():
            self.index, self.ids, self.alive, self.generation = other.index, other.ids, other.alive, other.generation

    # ---- search ----
    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[tuple[int, float]]]:
        """Best k (chunk id, score) per query; `allowed` limits the search to those chunk ids."""
        # queries: [nq, dim], L2-normalized
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with self.lock.read():
            if not len(self.ids) or k <= 0:
                return [[] for _ in range(len(queries))]
            mask = self.alive
            if allowed is not None:
                pos = self._positions(allowed)
                pos = pos[self.alive[pos]]
                if len(pos) <= self.config.exact_filter_max:
                    return self._exact(queries, pos, k)
                mask = np.zeros(len(self.ids), bool)
                mask[pos] = True
            params = self._params(k)
            bits = None
            if not mask.all():
                bits = np.packbits(mask, bitorder="little")
                params.sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
            scores, pos = self.index.search(queries, min(k, len(self.ids)), params=params)
            ids = self.ids
        del bits  # the selector read it during search
        return [[(int(ids[p]), float(s)) for p, s in zip(prow, srow) if p >= 0] for prow, srow in zip(pos, scores)]

    def _params(self, k: int):
        if self.kind == "hnsw":
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(self.config.ef_search, 2 * k)
            return p
        return faiss.SearchParameters()

    def _exact(self, queries: np.ndarray, pos: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        if not len(pos):
            return [[] for _ in range(len(queries))]
        vecs = self.index.reconstruct_batch(pos)  # [m, dim]
        scores = queries @ vecs.T  # [nq, m]
        top = np.argsort(-scores, axis=1)[:, :k]
        return [[(int(self.ids[pos[j]]), float(scores[i, j])) for j in row] for i, row in enumerate(top)]

    # ---- persistence ----
    def save(self, path: Path) -> int:
        """Write atomically (temp file, fsync, rename, fsync dir); returns bytes written."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        h = hashlib.sha256()
        with self.lock.read(), open(tmp, "wb") as f:
            def write(b: bytes):
                h.update(b)
                f.write(b)

            payload_start = f.tell()
            writer = faiss.PyCallbackIOWriter(write)
            faiss.write_index(self.index, writer)
            del writer
            payload_len = f.tell() - payload_start
            write(self.ids.tobytes())
            write(np.packbits(self.alive, bitorder="little").tobytes())
            trailer = json.dumps({"version": 1, "kind": self.kind, "dim": self.config.dim, "num_ids": len(self.ids),
                                  "payload_len": payload_len, "generation": self.generation}).encode()
            write(trailer)
            f.write(struct.pack("<Q", len(trailer)) + h.digest() + MAGIC)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return size

    @classmethod
    def load(cls, path: Path, config: IndexConfig) -> "VectorIndex":
        path = Path(path)
        size = path.stat().st_size
        if size < _TAIL:
            raise IndexCorrupt(f"{path.name}: {size} bytes, too short")
        with open(path, "rb") as f:
            f.seek(size - _TAIL)
            tail = f.read(_TAIL)
            (trailer_len,), digest, magic = struct.unpack("<Q", tail[:8]), tail[8:40], tail[40:]
            if magic != MAGIC or trailer_len > size - _TAIL:
                raise IndexCorrupt(f"{path.name}: bad magic or trailer (truncated?)")
            f.seek(0)
            h, left = hashlib.sha256(), size - _TAIL
            while left:
                block = f.read(min(left, 8 << 20))
                if not block:
                    raise IndexCorrupt(f"{path.name}: short read")
                h.update(block)
                left -= len(block)
            if h.digest() != digest:
                raise IndexCorrupt(f"{path.name}: checksum mismatch")
            f.seek(size - _TAIL - trailer_len)
            meta = json.loads(f.read(trailer_len))
            if meta.get("dim") != config.dim:
                raise IndexCorrupt(f"{path.name}: dimension {meta.get('dim')} != {config.dim}")
            f.seek(0)
            reader = faiss.PyCallbackIOReader(f.read)
            index = faiss.read_index(reader)
            del reader
            f.seek(meta["payload_len"])
            n = meta["num_ids"]
            ids = np.frombuffer(f.read(8 * n), dtype=np.int64).copy()
            alive = np.unpackbits(np.frombuffer(f.read((n + 7) // 8), dtype=np.uint8), count=n,
                                  bitorder="little").astype(bool)
        if index.ntotal != n or index.d != config.dim:
            raise IndexCorrupt(f"{path.name}: {index.ntotal} vectors for {n} ids")
        out = cls(config)
        out.index, out.ids, out.alive, out.generation = index, ids, alive, int(meta["generation"])
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = config.ef_search
        return out


def build(config: IndexConfig, batches, total: int, generation: int) -> VectorIndex:
    """An index of (ids, vectors) batches in ascending id order: exact or HNSW by `total`."""
    out = VectorIndex(config)
    if total > config.ann_threshold:
        out.index = faiss.IndexHNSWFlat(config.dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        out.index.hnsw.efConstruction = config.ef_construction
        out.index.hnsw.efSearch = config.ef_search
    for ids, vecs in batches:
        out.add(ids, vecs)
    out.generation = generation
    return out
