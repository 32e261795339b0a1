"""Flow control inside a shard: a concurrency cap, a rate limit and a cost budget.

All three are plain asyncio objects: they bound one process. Several flow runs are
capped together with a Prefect global concurrency limit instead (see
:func:`tasks.shard.process_shard`).
"""

from __future__ import annotations

import asyncio
import time

#: Token amounts this close count as equal (float residue must not cause another wait).
_EPSILON = 1e-9


class RateLimiter:
    """A token bucket: at most ``rate`` permits per second, bursts up to ``burst``.

    A request for more permits than the bucket holds (an HTTP batch larger than the
    burst) goes as soon as the bucket is not in debt and leaves a debt that later
    requests wait off, so the long-run rate stays exactly ``rate``.
    """

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be > 0 permits per second (or None), got {rate!r}")
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate or 1.0)
        self._tokens = self.capacity
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, permits: float = 1.0) -> None:
        """Wait until ``permits`` tokens are available (no-op without a rate)."""
        if not self.rate:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
                self._last = now
                # What must be in the bucket: the permits, or for an oversized request an
                # empty bucket (waiting for more would be capped at capacity and lost).
                needed = permits if permits <= self.capacity else 0.0
                if self._tokens >= needed - _EPSILON:
                    self._tokens -= permits
                    return
                await asyncio.sleep((needed - self._tokens) / self.rate)


class Budget:
    """A spending allowance in USD: reserve before sending, settle after.

    ``allowance=None`` means unlimited. Once a reservation is refused the budget is
    *exhausted* and stays so: no new work is scheduled, work in flight finishes.
    """

    def __init__(self, allowance: float | None) -> None:
        self.allowance = allowance
        self.spent = 0.0
        self.reserved = 0.0
        self.exhausted = False

    def try_reserve(self, amount: float) -> bool:
        if self.exhausted:
            return False
        if (
            self.allowance is not None
            and self.spent + self.reserved + amount > self.allowance + 1e-12
        ):
            self.exhausted = True
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        """Turn a reservation into what was actually charged (0 for failures)."""
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual
