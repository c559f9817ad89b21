"""Admission: at most ``parallel`` requests run at once (on a pool of that many threads, since the
engines block), at most ``queue`` more wait; one more is refused at once (429 with Retry-After)
rather than queued without end."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Gate:
    def __init__(self, parallel: int, queue: int):
        self.parallel, self.queue = parallel, queue
        self.pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="localforge-serve")
        self._lock = threading.Lock()
        self._held = 0  # admitted and not finished: running or waiting
        self._mean_s = 1.0  # a running mean of a request's seconds, for Retry-After
        self.served = self.refused = 0

    def admit(self) -> bool:
        with self._lock:
            if self._held >= self.parallel + self.queue:
                self.refused += 1
                return False
            self._held += 1
            return True

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the pool for an admitted request; its slot is freed when ``fn`` ends
        (or when it is cancelled before it starts)."""
        t0 = time.monotonic()

        def done(_: Future) -> None:
            with self._lock:
                self._held -= 1
                self.served += 1
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - t0)

        try:
            future = self.pool.submit(fn)
        except RuntimeError:  # the pool is shutting down
            with self._lock:
                self._held -= 1
            raise
        future.add_done_callback(done)
        return future

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: a request's mean time over ``parallel``."""
        with self._lock:
            return max(1, math.ceil(self._mean_s / self.parallel))

    def state(self) -> dict[str, int]:
        with self._lock:
            held = self._held
        return {"running": min(held, self.parallel), "waiting": max(0, held - self.parallel),
                "parallel": self.parallel, "queue": self.queue, "served": self.served, "refused": self.refused}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
