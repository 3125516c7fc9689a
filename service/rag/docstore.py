"""The source of truth of one collection: an SQLite database (WAL, synchronous=FULL) holding its
settings, documents, chunks (with their embedding vectors) and an FTS5 index over chunk text.

One database per collection (data_dir/rag/<name>/store.sqlite3): collections never contend for the
single SQLite writer, a collection is created and dropped as a directory (atomic rename), and a
damaged collection cannot spoil the others. Chunk ids are INTEGER PRIMARY KEY AUTOINCREMENT: never
reused, so they double as FAISS ids and ascend in insertion order.

Every method is blocking: callers run them in a thread. Writes go through one connection under a
lock; reads use one connection per thread (WAL readers never block the writer).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.rag.chunking import Chunk
from service.rag.errors import RagError
from service.rag.filters import filter_sql
from service.rag.keywords import fts_query
from service.rag.validate import readable_json

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY, metadata TEXT NOT NULL DEFAULT '{}', source TEXT, text TEXT NOT NULL,
    num_chunks INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    position INTEGER NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL, heading TEXT NOT NULL DEFAULT '', text TEXT NOT NULL,
    embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id, position);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    text, heading, content='chunks', content_rowid='id', tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text, heading) VALUES (new.id, new.text, new.heading); END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text, heading) VALUES ('delete', old.id, old.text, old.heading); END;
"""


@dataclass
class NewDocument:
    id: str
    text: str
    metadata: dict
    chunks: list[Chunk]
    vectors: np.ndarray  # [len(chunks), dim] float32, L2-normalized
    source: str | None = None


@dataclass
class WriteResult:
    added_ids: np.ndarray  # [n] int64 chunk ids, ascending
    added_vectors: np.ndarray  # [n, dim] float32, same order
    removed_ids: np.ndarray  # [m] int64 chunk ids of replaced or deleted documents
    documents: list[dict] = field(default_factory=list)  # {"id", "num_chunks"}
    generation: int = 0


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a committed transaction survives power loss
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:  # e.g. "file is not a database": the collection is damaged, not the process
        conn.close()
        raise
    return conn


class DocStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._write_lock = threading.Lock()
        self._writer = _connect(self.path)
        try:
            self._writer.executescript(SCHEMA)
        except BaseException:  # not a database (corrupt file): do not leak the connection
            self._writer.close()
            raise
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    # ---- connections ----
    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        with self._write_lock:
            self._writer.close()

    def _tx(self):
        return _Transaction(self._writer, self._write_lock)

    # ---- settings and bookkeeping ----
    def get_meta(self, key: str, default=None):
        row = self._reader().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return readable_json(row[0]) if row else default

    def set_meta(self, key: str, value) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def generation(self) -> int:
        return self.get_meta("generation", 0)

    def stats(self) -> dict:
        c = self._reader()
        docs = c.execute("SELECT count(*) FROM documents").fetchone()[0]
        chunks, tokens = c.execute("SELECT count(*), coalesce(sum(num_tokens), 0) FROM chunks").fetchone()
        size = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        return {"num_documents": docs, "num_chunks": chunks, "num_tokens": tokens, "db_bytes": size}

    # ---- writes (each one transaction: all or nothing) ----
    def add_documents(self, docs: list[NewDocument], replace: bool) -> WriteResult:
        added_ids, added_vecs, removed, out = [], [], [], []
        with self._tx() as c:
            for d in docs:
                if c.execute("SELECT 1 FROM documents WHERE id = ?", (d.id,)).fetchone():
                    if not replace:
                        raise RagError(409, f"document {d.id!r} already exists; replace it with PUT "
                                       f".../documents/{d.id} or send \"upsert\": true",
                                       param="documents.id", code="document_exists")
                    removed += self._delete(c, d.id)
                c.execute("INSERT INTO documents(id, metadata, source, text, num_chunks, created_at) "
                          "VALUES (?, ?, ?, ?, ?, ?)",
                          (d.id, json.dumps(d.metadata), d.source, d.text, len(d.chunks), time.time()))
                vecs = np.ascontiguousarray(d.vectors, dtype=np.float32)
                for ch, vec in zip(d.chunks, vecs):
                    cur = c.execute(
                        'INSERT INTO chunks(document_id, position, start, "end", num_tokens, heading, text, '
                        "embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (d.id, ch.position, ch.start, ch.end, ch.num_tokens, ch.heading, ch.text, vec.tobytes()))
                    added_ids.append(cur.lastrowid)
                added_vecs.append(vecs)
                out.append({"id": d.id, "num_chunks": len(d.chunks)})
            gen = self._bump(c)
        dim = docs[0].vectors.shape[1] if docs else 0
        return WriteResult(np.asarray(added_ids, dtype=np.int64),
                           np.concatenate(added_vecs) if added_vecs else np.zeros((0, dim), np.float32),
                           np.asarray(removed, dtype=np.int64), out, gen)

    def delete_document(self, doc_id: str) -> WriteResult:
        with self._tx() as c:
            if not c.execute("SELECT 1 FROM documents WHERE id = ?", (doc_id,)).fetchone():
                raise RagError(404, f"document {doc_id!r} does not exist", param="document_id",
                               code="document_not_found")
            removed = self._delete(c, doc_id)
            gen = self._bump(c)
        return WriteResult(np.zeros(0, np.int64), np.zeros((0, 0), np.float32),
                           np.asarray(removed, dtype=np.int64), [{"id": doc_id}], gen)

    @staticmethod
    def _delete(c: sqlite3.Connection, doc_id: str) -> list[int]:
        ids = [r[0] for r in c.execute("SELECT id FROM chunks WHERE document_id = ?", (doc_id,))]
        c.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
        c.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
        return ids

    @staticmethod
    def _bump(c: sqlite3.Connection) -> int:
        row = c.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        gen = (json.loads(row[0]) if row else 0) + 1
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('generation', ?)", (json.dumps(gen),))
        return gen

    # ---- reads ----
    def get_document(self, doc_id: str, with_text: bool = True) -> dict | None:
        row = self._reader().execute(
            "SELECT id, metadata, source, num_chunks, created_at, length(text)" + (", text" if with_text else "")
            + " FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return _doc(row, with_text) if row else None

    def document_chunks(self, doc_id: str) -> list[dict]:
        rows = self._reader().execute(
            'SELECT id, position, start, "end", num_tokens, heading, text FROM chunks WHERE document_id = ? '
            "ORDER BY position", (doc_id,))
        return [{"chunk_id": r[0], "position": r[1], "start": r[2], "end": r[3], "num_tokens": r[4],
                 "heading": r[5], "text": r[6]} for r in rows]

    def list_documents(self, limit: int, after: str | None) -> list[dict]:
        rows = self._reader().execute(
            "SELECT id, metadata, source, num_chunks, created_at, length(text) FROM documents "
            "WHERE id > ? ORDER BY id LIMIT ?", (after or "", limit))
        return [_doc(r, False) for r in rows]

    def chunk_ids(self) -> np.ndarray:
        rows = self._reader().execute("SELECT id FROM chunks ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def iter_vectors(self, dim: int, after: int = 0, batch: int = 20000):
        """(ids [n], vectors [n, dim]) in ascending id order, for chunk ids > after."""
        c = self._reader()
        last = after
        while True:
            rows = c.execute("SELECT id, embedding FROM chunks WHERE id > ? ORDER BY id LIMIT ?",
                             (last, batch)).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            yield ids, vecs
            last = int(ids[-1])

    def vectors_for(self, ids: np.ndarray, dim: int) -> np.ndarray:
        got = self.chunks_by_ids(ids, with_embedding=True)
        return np.stack([np.frombuffer(got[int(i)]["embedding"], dtype=np.float32) for i in ids]) \
            if len(ids) else np.zeros((0, dim), np.float32)

    def chunks_by_ids(self, ids, with_embedding: bool = False) -> dict[int, dict]:
        ids = [int(i) for i in ids]
        out: dict[int, dict] = {}
        cols = 'c.id, c.document_id, c.position, c.start, c."end", c.heading, c.text, d.metadata'
        cols += ", c.embedding" if with_embedding else ""
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            q = (f"SELECT {cols} FROM chunks c JOIN documents d ON d.id = c.document_id "
                 f"WHERE c.id IN ({','.join('?' * len(part))})")
            for r in self._reader().execute(q, part):
                out[r[0]] = {"chunk_id": r[0], "document_id": r[1], "position": r[2], "start": r[3], "end": r[4],
                             "heading": r[5], "text": r[6], "metadata": readable_json(r[7])}
                if with_embedding:
                    out[r[0]]["embedding"] = r[8]
        return out

    def filtered_ids(self, flt: dict) -> np.ndarray:
        cond, params = filter_sql(flt)
        rows = self._reader().execute(
            f"SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id WHERE {cond} ORDER BY c.id",
            params).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def keyword_search(self, query: str, k: int, flt: dict | None = None) -> list[tuple[int, float]]:
        """(chunk id, BM25 score; higher is better) of the best k chunks matching any query word."""
        match = fts_query(query)
        if not match:
            return []
        cond, params = filter_sql(flt)
        join = "" if not flt else (" AND f.rowid IN (SELECT c.id FROM chunks c JOIN documents d "
                                   f"ON d.id = c.document_id WHERE {cond})")
        rows = self._reader().execute(
            f"SELECT f.rowid, bm25(chunks_fts) AS s FROM chunks_fts f WHERE chunks_fts MATCH ?{join} "
            "ORDER BY s LIMIT ?", [match] + (params if flt else []) + [k]).fetchall()
        return [(r[0], -r[1]) for r in rows]


def _doc(row, with_text: bool) -> dict:
    d = {"id": row[0], "metadata": readable_json(row[1]), "source": row[2], "num_chunks": row[3],
         "created_at": int(row[4]), "num_chars": row[5]}
    if with_text:
        d["text"] = row[6]
    return d


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the writer lock; ROLLBACK on any error."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock):
        self.conn, self.lock = conn, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        try:
            self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()
        return False
