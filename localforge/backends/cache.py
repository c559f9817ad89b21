"""A content-addressed cache of LLM calls, in SQLite.

The key hashes everything that decides an answer: backend, model (and server), generation
parameters (JSON schema included) and the messages. Re-running an extraction or teaching job
re-uses every answer it already paid for. SQLite in WAL mode with a busy timeout makes it safe
for several threads and processes writing at once. A corrupt file is reported, moved aside and
rebuilt: the cache is an optimisation, never a reason for a job to fail.

``Cached`` layers the cache on top of any backend: it is a backend itself, answers what it has
seen and hands the rest to the backend it wraps. ``with_cache`` builds one from the ``cache=``
option that ``get_backend`` takes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from localforge.backends.base import Backend
from localforge.backends.types import ChatResult, Conversation, GenerationParams

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


class Cached(Backend):
    """``backend`` with a call cache in front: hits come from the cache (marked ``cached``), misses
    from the backend. A backend that runs requests in parallel (a server) gets the misses one by
    one, that many at a time, and each answer is stored as it arrives, so a job that dies part-way
    keeps what it got; other backends get the misses as one batch."""

    def __init__(self, backend: Backend, cache: CallCache):
        super().__init__(backend.model_ref)
        self.inner, self.cache = backend, cache
        self.name = backend.name
        self.capabilities = backend.capabilities

    @property
    def model_name(self) -> str:  # type: ignore[override]
        return self.inner.model_name

    def identity(self) -> tuple:
        return self.inner.identity()

    def generate(self, conversations: list[Conversation], params: GenerationParams) -> list[ChatResult]:
        keys = [call_key(self.identity(), params, conv) for conv in conversations]
        results: list[ChatResult | None] = []
        for key in keys:
            hit = self.cache.get(key)
            results.append(ChatResult(**{**hit, "cached": True}) if hit else None)
        todo = [i for i, r in enumerate(results) if r is None]

        def one(i: int) -> None:
            results[i] = self.inner.generate([conversations[i]], params)[0]
            self.cache.put(keys[i], results[i].to_dict())

        if len(todo) > 1 and self.capabilities.parallel > 1:
            with ThreadPoolExecutor(max_workers=min(len(todo), self.capabilities.parallel)) as pool:
                list(pool.map(one, todo))
        elif todo:
            fresh = self.inner.generate([conversations[i] for i in todo], params)
            for i, result in zip(todo, fresh, strict=True):
                self.cache.put(keys[i], result.to_dict())
                results[i] = result
        return results  # type: ignore[return-value]

    def health(self):
        return self.inner.health()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, attr: str) -> Any:
        # what a particular engine offers beyond the interface (list_models, tokenizer, device)
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)


def with_cache(backend: Backend, cache: Any) -> Backend:
    """``backend`` behind a call cache: ``cache`` is None or False (none), True (the default file),
    a path, or a ``CallCache``."""
    if cache is None or cache is False:
        return backend
    return Cached(backend, cache if isinstance(cache, CallCache) else CallCache(None if cache is True else cache))
