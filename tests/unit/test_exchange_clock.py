"""The exchange clock (shared/exchange_clock.py): extrapolation at the observed rate, never backwards."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.clock_feed import service_clock
from shared.exchange_clock import ClockNotSynced, ExchangeClock

T = datetime(2026, 4, 7, 14, 30, tzinfo=UTC)


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_unsynced_clock_refuses_to_tell_the_time() -> None:
    clock = ExchangeClock()
    assert not clock.synced
    with pytest.raises(ClockNotSynced, match="not been observed"):
        clock()


def test_rate_is_estimated_from_heartbeats_of_a_fast_peer() -> None:
    mono = FakeMonotonic()
    clock = ExchangeClock(monotonic=mono)
    for i in range(10):  # a peer running 60x: one heartbeat a real second, 60 s apart in its time
        clock.observe(T + timedelta(seconds=60 * i))
        mono.t += 1.0
    assert clock.rate == pytest.approx(60.0)
    mono.t += 0.5 - 1.0  # half a real second after the last heartbeat
    assert clock() == T + timedelta(seconds=60 * 9 + 30)
    assert clock.real_seconds(120) == pytest.approx(2.0)


def test_a_given_rate_is_used_as_is() -> None:
    mono = FakeMonotonic()
    clock = ExchangeClock(monotonic=mono)
    clock.observe(T, rate=30.0)
    mono.t += 2
    assert clock() == T + timedelta(seconds=60)


@given(st.lists(st.tuples(st.floats(0.01, 3.0), st.floats(-5.0, 5.0)), min_size=1, max_size=40))
def test_the_clock_never_runs_backwards(steps: list[tuple[float, float]]) -> None:
    """Late or jittery observations (an exchange time a few seconds off) never make the clock go back."""
    mono = FakeMonotonic()
    clock = ExchangeClock(monotonic=mono)
    clock.observe(T)
    last = clock()
    for k, (dt_real, jitter) in enumerate(steps):
        mono.t += dt_real
        clock.observe(T + timedelta(seconds=mono.t - 1000.0 + jitter + k * 0))
        now = clock()
        assert now >= last
        last = now


async def test_wait_until_follows_exchange_time_not_the_machines() -> None:
    clock = ExchangeClock()
    clock.observe(T, rate=200.0)  # 200x: 20 exchange seconds take 0.1 real seconds
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await clock.wait_until(T + timedelta(seconds=20))
    took = loop.time() - t0
    assert 0.05 < took < 1.0
    stop = asyncio.Event()
    stop.set()
    assert not await clock.wait_until(T + timedelta(days=1), stop)


def test_the_source_alone_chooses_the_clock() -> None:
    from shared.config import load_config

    cfg = load_config(None)
    live = service_clock(cfg, source="coinbase")
    replay = service_clock(cfg, source="replay")
    assert live.live and isinstance(live.clock, ExchangeClock)
    assert not replay.live and isinstance(replay.clock(), datetime)
