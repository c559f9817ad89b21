"""Calls to servers that are slow, busy or restarting: retries, a circuit breaker, a limit.

- ``RetryPolicy``: exponential backoff with full jitter, for transient failures only
  (connection refused, timeouts, 429, 5xx); a 4xx is the caller's mistake and is not retried.
  A refused connection fails at once on a server that never answered (a wrong port), and is
  retried for ``restart_s`` (30 s, within the call's timeout) on one that did (it is restarting).
- ``CircuitBreaker``: one per endpoint. After ``threshold`` calls in a row have failed even
  after their retries, the endpoint is treated as dead for ``cooldown_s``: calls fail at once
  instead of each waiting out its own retries. Then one trial call is let through.
- ``Endpoint``: the breaker plus a semaphore that bounds concurrent requests to one server, so
  many callers can run in parallel without overloading a laptop server.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from localforge.backends.types import BackendTimeout, BackendUnavailable

T = TypeVar("T")


class Transient(Exception):
    """Wraps a failure worth retrying; ``final`` is the user-facing error to raise at the end.

    ``refused`` marks a connection that was refused: worth retrying on a server that has
    answered before (it is restarting), not on one that never has (a wrong port fails fast).
    """

    def __init__(self, final: Exception, refused: bool = False):
        super().__init__(str(final))
        self.final = final
        self.refused = refused


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # total tries, the first included
    base_s: float = 0.25
    max_s: float = 4.0
    restart_s: float = 30.0  # how long a server that answered before may refuse connections (it is
                             # restarting) before a call gives up; counted in time, not attempts

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0, min(self.max_s, self.base_s * 2 ** min(attempt, 16)))


class CircuitOpen(BackendUnavailable):
    pass


class CircuitBreaker:
    def __init__(self, threshold: int = 3, cooldown_s: float = 15.0):
        self.threshold, self.cooldown_s = threshold, cooldown_s
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        self._lock = threading.Lock()
        self.last_error: Exception | None = None

    def before(self, name: str) -> None:
        with self._lock:
            if self._opened_at is None:
                return
            waited = time.monotonic() - self._opened_at
            if waited < self.cooldown_s or self._trial:
                raise CircuitOpen(
                    f"{name} failed {self._failures} calls in a row and is paused for "
                    f"{self.cooldown_s - waited:.0f} s more: {self.last_error}"
                )
            self._trial = True  # half-open: let exactly one call try

    def success(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._trial = 0, None, False

    def failure(self, error: Exception) -> None:
        with self._lock:
            self._failures += 1
            self.last_error = error
            self._trial = False
            if self._failures >= self.threshold:
                self._opened_at = time.monotonic()


class Endpoint:
    """What one server's callers share: its breaker and its concurrency limit."""

    def __init__(self, name: str, concurrency: int = 4, retry: RetryPolicy | None = None,
                 breaker: CircuitBreaker | None = None):
        self.name = name
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker()
        self._slots = threading.BoundedSemaphore(concurrency)
        self.alive = False  # has this server answered at least once?

    def call(self, fn: Callable[[float], T], timeout_s: float, *, attempts: int | None = None) -> T:
        """Run ``fn(seconds_left)`` under the limit, retrying ``Transient`` failures with backoff.

        ``timeout_s`` bounds the whole call, retries and waiting for a slot included: a server
        that hangs fails the call at the timeout, not after several timeouts.
        """
        attempts = attempts or self.retry.attempts
        deadline = time.monotonic() + timeout_s
        self.breaker.before(self.name)
        refused_since: float | None = None
        attempt = 0
        while True:
            if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise BackendTimeout(
                    f"{self.name}: all {self.concurrency} request slots stayed busy for {timeout_s:.0f} s; "
                    "raise the timeout or lower the load"
                )
            try:
                result = fn(max(0.05, deadline - time.monotonic()))
            except Transient as exc:
                pause, now = self.retry.delay(attempt), time.monotonic()
                if exc.refused and self.alive:  # restarting: retried for restart_s, however many tries
                    refused_since = refused_since or now
                    again = now + pause - refused_since < self.retry.restart_s
                else:  # a server never seen refuses at once (a wrong port fails fast)
                    again = not exc.refused and attempt + 1 < attempts
                if again and now + pause < deadline:
                    time.sleep(pause)
                    attempt += 1
                    continue
                self.breaker.failure(exc.final)
                raise exc.final from None
            finally:
                self._slots.release()
            self.alive = True
            self.breaker.success()
            return result


_BREAKERS: dict[str, CircuitBreaker] = {}
_ENDPOINTS: dict[tuple[str, int], Endpoint] = {}
_LOCK = threading.Lock()


def endpoint(name: str, concurrency: int = 4) -> Endpoint:
    """The ``Endpoint`` for a server: one circuit breaker per server, shared by every backend
    that talks to it, and one request limit per (server, concurrency)."""
    with _LOCK:
        breaker = _BREAKERS.setdefault(name, CircuitBreaker())
        key = (name, concurrency)
        if key not in _ENDPOINTS:
            _ENDPOINTS[key] = Endpoint(name, concurrency, breaker=breaker)
        return _ENDPOINTS[key]
