"""Retry pacing shared by the transports."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with full jitter, so restarted workers do not retry in step."""

    def __init__(self, base_s: float = 0.2, cap_s: float = 15.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.failures, 16))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0
