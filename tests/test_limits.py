"""``tasks.limits``: the token-bucket rate limiter and the cost budget.

No real time passes: the limiter's clock (``tasks.limits.time``) is replaced by a fake
one, and ``asyncio.sleep`` by a fake that records each requested delay and advances that
clock, so the tests check the exact waits the limiter asks for.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from guideflow.errors import InvalidParameter
from tasks import limits
from tasks.limits import Budget, RateLimiter
from tasks.work import RunConfig

_real_sleep = asyncio.sleep


class FakeClock:
    """A monotonic clock that only moves when the limiter sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.sleeps.append(delay)
        self.now += max(0.0, delay)
        await _real_sleep(0)  # still yield to the loop, like a real sleep
        return result


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(limits, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    monkeypatch.setattr(asyncio, "sleep", fake.sleep)
    return fake


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())


async def acquire_times(limiter: RateLimiter, clock: FakeClock, n: int, permits=1.0) -> list:
    times = []
    for _ in range(n):
        await limiter.acquire(permits)
        times.append(clock.now)
    return times


# -- RateLimiter ---------------------------------------------------------------------------


def test_without_a_rate_nothing_ever_waits(clock: FakeClock) -> None:
    limiter = RateLimiter(None)
    times = run(lambda: acquire_times(limiter, clock, 1000, permits=20))
    assert clock.sleeps == [] and set(times) == {0.0}


def test_burst_then_steady_rate(clock: FakeClock) -> None:
    limiter = RateLimiter(5.0)  # burst defaults to the rate: 5 permits
    times = run(lambda: acquire_times(limiter, clock, 25))

    assert times[:5] == [0.0] * 5  # the bucket starts full
    assert times[5:] == pytest.approx([0.2 * k for k in range(1, 21)])
    assert clock.sleeps == pytest.approx([0.2] * 20)
    # never more than burst + rate·t permits by time t
    for count, t in enumerate(times, start=1):
        assert count <= 5 + 5.0 * t + 1e-9


def test_fractional_rate_and_explicit_burst(clock: FakeClock) -> None:
    slow = RateLimiter(0.5)  # one permit every 2 s, burst 1
    assert run(lambda: acquire_times(slow, clock, 3)) == pytest.approx([0.0, 2.0, 4.0])

    clock.now, clock.sleeps = 100.0, []
    bursty = RateLimiter(2.0, burst=4)
    times = run(lambda: acquire_times(bursty, clock, 6))
    assert times == pytest.approx([100.0] * 4 + [100.5, 101.0])


def test_idle_time_refills_up_to_the_burst_only(clock: FakeClock) -> None:
    limiter = RateLimiter(10.0, burst=3)

    async def scenario() -> list[float]:
        first = await acquire_times(limiter, clock, 3)  # drains the bucket
        clock.now += 60.0  # a long idle spell: 600 tokens' worth, capped at 3
        return first + await acquire_times(limiter, clock, 5)

    times = run(scenario)
    assert times[:3] == [0.0] * 3
    assert times[3:6] == [60.0] * 3
    assert times[6:] == pytest.approx([60.1, 60.2])


def test_batch_acquisitions_count_every_permit(clock: FakeClock) -> None:
    """A request of 4 tasks takes 4 permits: 2 requests a second at rate 8."""
    limiter = RateLimiter(8.0)
    times = run(lambda: acquire_times(limiter, clock, 6, permits=4))
    assert times == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.5, 2.0])


def test_a_request_larger_than_the_burst_goes_and_is_paid_for_afterwards(
    clock: FakeClock,
) -> None:
    """A batch bigger than the bucket must not wait forever: it goes once the bucket is not
    in debt and leaves a debt the next request waits off, so the long-run rate is exact
    (10 permits every 5 s at rate 2). It used to wait for the whole batch's tokens first,
    which the burst cap then threw away: 10 permits every 9 s."""
    limiter = RateLimiter(2.0, burst=2)
    times = run(lambda: acquire_times(limiter, clock, 4, permits=10))
    assert times == pytest.approx([0.0, 4.0, 9.0, 14.0])


def test_concurrent_acquirers_share_one_rate(clock: FakeClock) -> None:
    limiter = RateLimiter(4.0, burst=1)
    stamps: list[float] = []

    async def worker() -> None:
        for _ in range(5):
            await limiter.acquire()
            stamps.append(clock.now)

    async def scenario() -> None:
        await asyncio.gather(*(worker() for _ in range(4)))

    run(scenario)
    assert len(stamps) == 20
    assert sorted(stamps) == pytest.approx([0.25 * k for k in range(20)])


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_a_rate_that_is_not_positive_is_refused(rate: float) -> None:
    """rate <= 0 used to mean "unlimited" (0) or a busy loop that never returned (< 0)."""
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(rate)


@pytest.mark.parametrize("rate", [0.0, -2.5])
def test_run_config_refuses_a_non_positive_rate(rate: float) -> None:
    from connectors.manifest import ManifestSpec

    with pytest.raises(InvalidParameter) as info:
        RunConfig(
            manifest=ManifestSpec("m.csv"),
            preprocessors=("canny",),
            output="o",
            ledger="l",
            rate=rate,
        )
    assert info.value.code == "invalidParameter" and info.value.parameter == "rate"


# -- Budget --------------------------------------------------------------------------------


def test_unlimited_budget_reserves_everything() -> None:
    budget = Budget(None)
    for _ in range(1000):
        assert budget.try_reserve(1.0)
        budget.settle(1.0, 1.0)
    assert budget.spent == pytest.approx(1000.0)
    assert budget.reserved == 0.0 and not budget.exhausted


def test_reservations_count_before_they_are_settled() -> None:
    budget = Budget(1.0)
    assert budget.try_reserve(0.4)
    assert budget.try_reserve(0.4)
    assert budget.reserved == pytest.approx(0.8) and budget.spent == 0.0
    assert not budget.try_reserve(0.4)  # 0.8 in flight + 0.4 > 1.0
    assert budget.exhausted


def test_exhaustion_is_sticky_even_when_money_comes_back() -> None:
    """Once refused, no new work starts: work in flight finishes, nothing new is scheduled."""
    budget = Budget(1.0)
    assert budget.try_reserve(0.9)
    assert not budget.try_reserve(0.2)
    budget.settle(0.9, 0.0)  # the request failed: nothing charged
    assert budget.spent == 0.0 and budget.reserved == 0.0
    assert not budget.try_reserve(0.01)


def test_settle_charges_the_actual_cost() -> None:
    budget = Budget(1.0)
    assert budget.try_reserve(0.3)
    budget.settle(0.3, 0.5)  # the service charged more than the price table said
    assert budget.spent == pytest.approx(0.5) and budget.reserved == 0.0
    assert budget.try_reserve(0.5)
    assert not budget.try_reserve(1e-6)


def test_exact_fit_despite_float_rounding() -> None:
    """5 × 0.0006 fits a 0.003 budget (0.0006·5 is 0.0030000000000000005 in floats)."""
    budget = Budget(0.003)
    for _ in range(5):
        assert budget.try_reserve(0.0006)
        budget.settle(0.0006, 0.0006)
    assert not budget.try_reserve(0.0006)
    assert budget.spent <= 0.003 + 1e-12


def test_zero_budget_allows_nothing_but_free_work() -> None:
    budget = Budget(0.0)
    assert budget.try_reserve(0.0)
    assert not budget.try_reserve(0.0006) and budget.exhausted
