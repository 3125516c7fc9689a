"""Stored responses (`store: true`, the default): what `previous_response_id` continues and
`GET /v1/responses/{id}` returns. One SQLite database, data_dir/responses.sqlite3 (WAL,
synchronous=FULL: a response the client has received stays found), one table of JSON blobs.

Each row holds the whole conversation the response answered (the earlier turns' items, then its
request's input) beside the Response itself, so a continuation reads one row, and deleting an
earlier response never breaks a later one. The conversation is bounded (settings
`responses_max_stored_bytes`, a 400 past it: start afresh or send `store: false`); the response
adds at most one request's echo and its output tokens. Rows older than `responses_retention_s`
are not found and are deleted as new ones are written.

The database opens on first use; calls run in a thread (sqlite3 blocks), one connection under a lock.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple

from service.api.errors import APIError

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    stored_at REAL NOT NULL,
    conversation TEXT NOT NULL,
    response TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses(stored_at);
"""


class StoredResponse(NamedTuple):
    conversation: list[dict]  # input items, earlier turns first
    response: dict  # the Response object as it was returned


class ResponseStore:
    def __init__(self, path: Path, max_bytes: int, retention_s: float):
        self.path, self.max_bytes, self.retention_s = Path(path), max_bytes, retention_s
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> "ResponseStore":
        return cls(settings.data_dir / "responses.sqlite3", settings.responses_max_stored_bytes,
                   settings.responses_retention_s)

    def encode_conversation(self, conversation: list[dict], param: str) -> str:
        """The conversation as stored; a 400 when it is larger than a stored conversation may be."""
        blob = json.dumps(conversation, ensure_ascii=False, separators=(",", ":"))
        if len(blob.encode()) > self.max_bytes:
            raise APIError(400, f"the conversation is larger than the {self.max_bytes} bytes a stored response may "
                           "hold; start a new conversation or send store: false", param=param,
                           code="conversation_too_large")
        return blob

    async def get(self, response_id: str) -> StoredResponse | None:
        return await asyncio.to_thread(self._get, response_id)

    async def put(self, response: dict, conversation_json: str) -> None:
        await asyncio.to_thread(self._put, response, conversation_json)

    async def delete(self, response_id: str) -> bool:
        return await asyncio.to_thread(self._delete, response_id)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ---- blocking, under the lock ----
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _oldest_kept(self) -> float:
        return time.time() - self.retention_s

    def _get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db().execute("SELECT conversation, response FROM responses WHERE id = ? AND stored_at >= ?",
                                     (response_id, self._oldest_kept())).fetchone()
        return None if row is None else StoredResponse(json.loads(row[0]), json.loads(row[1]))

    def _put(self, response: dict, conversation_json: str) -> None:
        blob = json.dumps(response, ensure_ascii=False, separators=(",", ":"))
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM responses WHERE stored_at < ?", (self._oldest_kept(),))
                db.execute("INSERT OR REPLACE INTO responses (id, stored_at, conversation, response) "
                           "VALUES (?, ?, ?, ?)", (response["id"], time.time(), conversation_json, blob))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _delete(self, response_id: str) -> bool:
        with self._lock:
            return self._db().execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0
