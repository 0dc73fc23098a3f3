"""Retry pacing shared by the transports: redis-py's equal-jitter backoff, counted per failure."""

from __future__ import annotations

from redis.backoff import EqualJitterBackoff

#: Past this many failures the delay is at its cap anyway; bounding the exponent keeps
#: ``base * 2**failures`` a float however long an outage lasts.
_MAX_EXPONENT = 16


class Backoff:
    """Capped exponential backoff, each delay drawn between half the ceiling and the ceiling, so
    restarted workers do not retry in step; ``failures`` counts the delays handed out since ``reset``."""

    def __init__(self, base_s: float = 0.2, cap_s: float = 15.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self._policy = EqualJitterBackoff(cap=cap_s, base=base_s)

    def next_delay(self) -> float:
        self.failures += 1
        return self._policy.compute(min(self.failures, _MAX_EXPONENT))

    def reset(self) -> None:
        self.failures = 0
