"""Reconnect delays: capped exponential backoff with full jitter (Brooker, AWS 2015).

The n-th consecutive failure waits ``uniform(floor, min(cap, base * 2**n))``: many builders that
lose the runner at the same moment spread their reconnects over the whole window instead of
arriving in one spike, and none retries faster than ``floor``.  ``reset`` after a connection has
been healthy for a while starts again from the first, short window.
"""

from __future__ import annotations

import random

import attrs


@attrs.define(eq=False)
class Backoff:
    base: float = 1.0
    cap: float = 60.0
    floor: float = 0.1
    rng: random.Random = attrs.field(factory=random.Random)
    failures: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.floor <= self.base <= self.cap:
            raise ValueError("backoff needs 0 <= floor <= base <= cap")

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        window = min(self.cap, self.base * 2.0 ** min(self.failures, 62))
        self.failures += 1
        return self.rng.uniform(self.floor, max(self.floor, window))

    def reset(self) -> None:
        self.failures = 0
