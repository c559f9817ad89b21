"""Retries, deadlines and the circuit breaker, on real callables (no clock tricks)."""

from __future__ import annotations

import time

import pytest

from localforge.backends import BackendTimeout, BackendUnavailable
from localforge.backends.resilience import CircuitOpen, Endpoint, RetryPolicy, Transient

FAST = RetryPolicy(attempts=5, base_s=0.01, max_s=0.02)


def flaky(failures: int, refused: bool = False):
    state = {"calls": 0}

    def fn(_left):
        state["calls"] += 1
        if state["calls"] <= failures:
            raise Transient(BackendUnavailable("down"), refused=refused)
        return "ok"

    return fn, state


def test_transient_failures_are_retried():
    ep = Endpoint("x", retry=FAST)
    fn, state = flaky(3)
    assert ep.call(fn, 5) == "ok" and state["calls"] == 4


def test_refused_on_a_server_never_seen_fails_at_once():
    ep = Endpoint("x", retry=FAST)
    fn, state = flaky(3, refused=True)
    with pytest.raises(BackendUnavailable):
        ep.call(fn, 5)
    assert state["calls"] == 1


def test_refused_on_a_server_seen_before_is_retried():
    ep = Endpoint("x", retry=FAST)
    assert ep.call(lambda _left: "hello", 5) == "hello" and ep.alive
    fn, state = flaky(2, refused=True)
    assert ep.call(fn, 5) == "ok" and state["calls"] == 3


def test_a_restarting_server_is_waited_for_in_time_not_attempts():
    """A server that answered before and now refuses is restarting: retried for ``restart_s``
    (20 refusals with a 5-attempt policy), and given up on after it."""
    ep = Endpoint("x", retry=RetryPolicy(attempts=5, base_s=0.01, max_s=0.02, restart_s=2.0))
    assert ep.call(lambda _left: "hello", 5) == "hello"
    fn, state = flaky(20, refused=True)
    assert ep.call(fn, 5) == "ok" and state["calls"] == 21
    fn, state = flaky(10**6, refused=True)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable):
        ep.call(fn, 30)
    assert 1.9 < time.monotonic() - t0 < 3.0 and state["calls"] > 5


def test_the_deadline_bounds_retries():
    ep = Endpoint("x", retry=RetryPolicy(attempts=100, base_s=0.2, max_s=0.2))
    fn, _ = flaky(10**6)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable):
        ep.call(fn, 0.5)
    assert time.monotonic() - t0 < 1.0


def test_waiting_for_a_slot_counts_toward_the_timeout():
    ep = Endpoint("x", concurrency=1)
    ep._slots.acquire()  # someone else holds the only slot
    with pytest.raises(BackendTimeout, match="all 1 request slots stayed busy"):
        ep.call(lambda _left: "never", 0.2)


def test_breaker_half_opens_after_the_cooldown():
    ep = Endpoint("x", retry=RetryPolicy(attempts=1))
    ep.breaker.cooldown_s = 0.2
    fn, _ = flaky(3)
    for _ in range(3):
        with pytest.raises(BackendUnavailable):
            ep.call(fn, 5)
    with pytest.raises(CircuitOpen):
        ep.call(fn, 5)
    time.sleep(0.25)
    assert ep.call(fn, 5) == "ok"  # the trial call succeeds and closes the breaker
    assert ep.call(fn, 5) == "ok"
