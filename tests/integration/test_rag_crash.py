"""Durability: SIGKILL a server in the middle of a stream of ingests; after a restart every
acknowledged document is searchable, index and SQLite counts match, no document is half there;
then a truncated index file is detected and rebuilt from SQLite."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time

import httpx
import pytest

from tests.conftest import EMBED_MODEL, ServerProcess

pytestmark = pytest.mark.slow


def _env(data_dir) -> dict[str, str]:
    return {"FRONTIER_DATA_DIR": str(data_dir), "FRONTIER_MODELS": json.dumps([EMBED_MODEL]),
            "FRONTIER_RAG_SAVE_INTERVAL_S": "0.3",  # index saves race with the kill too
            "FRONTIER_RAG_ANN_THRESHOLD": "200"}  # the index turns HNSW mid-stream


def _doc(i: int) -> dict:
    return {"id": f"doc-{i}", "metadata": {"i": i},
            "text": f"Record {i} keyword zq{i}x. " + "This filler sentence describes the archive in general. " * 6}


def _ingest(base: str, acked: list[int], stop: threading.Event, worker: int):
    with httpx.Client(base_url=base, timeout=30) as c:
        i = worker * 100_000
        while not stop.is_set():
            batch = list(range(i, i + 3))
            i += 3
            try:
                r = c.post("/v1/rag/collections/crash/documents", json={"documents": [_doc(j) for j in batch]})
            except httpx.HTTPError:
                return  # the server died: these were never acknowledged
            if r.status_code == 200:
                acked.extend(batch)


def _sqlite_counts(db) -> tuple[int, int, list]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        docs = conn.execute("SELECT count(*) FROM documents").fetchone()[0]
        chunks = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        partial = conn.execute("SELECT d.id FROM documents d LEFT JOIN chunks c ON c.document_id = d.id "
                               "GROUP BY d.id HAVING count(c.id) != max(d.num_chunks)").fetchall()
        return docs, chunks, partial
    finally:
        conn.close()


def test_sigkill_mid_ingest_then_truncated_index(embed_model_dir, tmp_path):
    data = tmp_path / "data"
    srv = ServerProcess(_env(data), tmp_path / "server1.log")
    try:
        srv.wait_ready()
        r = httpx.post(f"{srv.base_url}/v1/rag/collections", json={"name": "crash", "chunk_size": 48}, timeout=60)
        assert r.status_code == 200, r.text
        acked: list[int] = []
        stop = threading.Event()
        workers = [threading.Thread(target=_ingest, args=(srv.base_url, acked, stop, w)) for w in range(2)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 120
        while len(acked) < 150 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(srv.proc.pid, signal.SIGKILL)  # mid-stream: requests are in flight
        srv.proc.wait(10)
        stop.set()
        for w in workers:
            w.join(30)
    finally:
        srv.stop()
    assert len(acked) >= 150, f"only {len(acked)} acknowledged before the deadline"
    db = data / "rag" / "crash" / "store.sqlite3"

    srv = ServerProcess(_env(data), tmp_path / "server2.log")
    try:
        srv.wait_ready()
        with httpx.Client(base_url=f"{srv.base_url}/v1/rag/collections", timeout=60) as c:
            info = c.get("/crash").json()
            docs, chunks, partial = _sqlite_counts(db)
            assert partial == [], "a document is half ingested"
            assert info["num_documents"] == docs >= len(acked)
            assert info["num_chunks"] == info["num_vectors"] == chunks
            assert info["index"]["kind"] == "hnsw"
            for i in acked:  # every acknowledged document is there and searchable
                hits = c.post("/crash/search", json={"query": f"zq{i}x", "mode": "keyword", "top_k": 1}).json()["results"]
                assert hits and hits[0]["document_id"] == f"doc-{i}", i
            for i in acked[:: max(1, len(acked) // 15)]:  # and its vectors are in the index
                got = c.post("/crash/search", json={"query": _doc(i)["text"], "mode": "dense", "top_k": 5,
                                              "filter": {"i": i}}).json()["results"]
                assert got and got[0]["document_id"] == f"doc-{i}"
                got = c.post("/crash/search", json={"query": f"Record {i} keyword zq{i}x.", "mode": "hybrid",
                                              "top_k": 3}).json()["results"]
                assert f"doc-{i}" in [g["document_id"] for g in got]
            before = c.get("/crash").json()
    finally:
        srv.stop()  # graceful: the index is saved

    index_file = data / "rag" / "crash" / "vectors.faiss"
    raw = index_file.read_bytes()
    index_file.write_bytes(raw[: len(raw) * 2 // 3])  # truncated
    srv = ServerProcess(_env(data), tmp_path / "server3.log")
    try:
        srv.wait_ready()
        with httpx.Client(base_url=f"{srv.base_url}/v1/rag/collections", timeout=60) as c:
            info = c.get("/crash").json()
            assert info["index"]["state"] == "rebuilt", info["index"]
            assert "corrupt" in info["index"]["reason"]
            assert info["num_vectors"] == info["num_chunks"] == before["num_chunks"]
            i = acked[-1]
            got = c.post("/crash/search", json={"query": _doc(i)["text"], "mode": "dense", "top_k": 5,
                                          "filter": {"i": i}}).json()["results"]
            assert got and got[0]["document_id"] == f"doc-{i}"
        assert index_file.stat().st_size >= len(raw) * 0.9  # rebuilt and saved again
    finally:
        srv.stop()
