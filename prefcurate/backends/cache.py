"""A content-addressed request cache in SQLite: paid work is done once.

The key is a hash of everything that determines an answer (endpoint, model, messages,
sampling parameters) and nothing that does not (the API key, concurrency, retries): the
caller builds the request dict and ``request_key`` hashes its canonical JSON.

Answers are written one by one as they arrive and committed at once, in WAL mode with
``synchronous=NORMAL``: a commit is an append to the write-ahead log (no fsync), so a
process that is killed keeps every answer it had received and a rerun repeats none of them.
Only answers the caller accepted are stored: failures and unparseable answers never are.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def request_key(request: dict[str, Any]) -> str:
    """A stable hash of a request's canonical JSON (sorted keys, no whitespace)."""
    blob = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.blake2b(blob, digest_size=20).hexdigest()


class RequestCache:
    """``get``/``put`` JSON values by request key. One connection, one thread."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            uri = f"file:{self.path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True) if self.path.exists() else None
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    def get(self, key: str) -> dict[str, Any] | None:
        if self._db is None:
            return None
        try:
            row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return None  # a read-only view of a cache that has no table yet
        return json.loads(row[0]) if row else None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store one accepted answer; committed on return (autocommit)."""
        assert self._db is not None, "read-only cache"
        self._db.execute(
            "INSERT OR REPLACE INTO answers (key, value, created) VALUES (?, ?, ?)",
            (key, json.dumps(value, ensure_ascii=False), time.time()),
        )

    def __len__(self) -> int:
        if self._db is None:
            return 0
        try:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> RequestCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
