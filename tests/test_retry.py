"""Retry pacing: redis-py's equal-jitter backoff, counted per failure and bounded however long it fails."""

from __future__ import annotations

import random

from streams.retry import Backoff


def test_delays_double_from_the_base_up_to_the_cap_each_between_half_and_all_of_it() -> None:
    random.seed(3)
    backoff = Backoff(base_s=0.2, cap_s=15.0)
    for failures in range(1, 40):
        ceiling = min(15.0, 0.2 * 2**failures)
        delays = [_delay_at(backoff, failures) for _ in range(50)]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays), failures
        assert max(delays) - min(delays) > ceiling / 10, "jittered, so restarted workers do not retry in step"
        assert backoff.failures == failures


def test_a_long_outage_stays_at_the_cap() -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0)
    delays = [backoff.next_delay() for _ in range(5000)]
    assert backoff.failures == 5000
    assert all(15.0 <= delay <= 30.0 for delay in delays[100:])


def test_reset_starts_again_from_the_base() -> None:
    backoff = Backoff(base_s=0.2, cap_s=15.0)
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.failures == 0
    assert 0.2 <= backoff.next_delay() <= 0.4


def _delay_at(backoff: Backoff, failures: int) -> float:
    backoff.reset()
    for _ in range(failures - 1):
        backoff.next_delay()
    return backoff.next_delay()
