"""A content-addressed cache of LLM calls, in SQLite.

The key hashes everything that decides an answer: backend, model (and server), generation
parameters (JSON schema included) and the messages. Re-running an extraction or teaching job
re-uses every answer it already paid for. SQLite in WAL mode with a busy timeout makes it safe
for several threads and processes writing at once. A corrupt file is reported, moved aside and
rebuilt: the cache is an optimisation, never a reason for a job to fail.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from localforge.backends.base import Conversation, GenerationParams

_SCHEMA = "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"


def default_path() -> Path:
    from localforge.models import cache_dir

    return cache_dir() / "calls.sqlite"


def call_key(identity: tuple, params: GenerationParams, conversation: Conversation) -> str:
    payload = {"backend": list(identity), "params": asdict(params), "messages": conversation}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class CallCache:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        self._local = threading.local()
        self._reset_lock = threading.Lock()
        self.hits = self.misses = 0

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
            self._local.conn = conn
        return conn

    def _guard(self, op, default=None):
        try:
            return op(self._conn())
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                return default  # another writer held it past the timeout: skip, do not fail
            self._rebuild(exc)
            try:
                return op(self._conn())
            except sqlite3.DatabaseError:
                return default

    def _rebuild(self, exc: Exception) -> None:
        with self._reset_lock:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()
                self._local.conn = None
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.replace(Path(str(aside) + suffix))
            sys.stderr.write(
                f"warning: call cache {self.path} was unreadable ({exc}); moved it to {aside.name} "
                "and started a new one\n"
            )

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._guard(lambda c: c.execute("SELECT value FROM calls WHERE key = ?", (key,)).fetchone())
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._guard(lambda c: c.execute(
            "INSERT OR REPLACE INTO calls (key, value, created) VALUES (?, ?, ?)",
            (key, json.dumps(value, ensure_ascii=False), time.time()),
        ))

    def __len__(self) -> int:
        return self._guard(lambda c: c.execute("SELECT COUNT(*) FROM calls").fetchone()[0], 0)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
