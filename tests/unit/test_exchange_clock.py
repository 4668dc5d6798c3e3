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


@given(
    latencies=st.lists(st.floats(min_value=0.001, max_value=0.2), min_size=6, max_size=6),
    made_at=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=6, max_size=6),
)
def test_server_times_taken_on_warm_up_never_make_the_clock_early(
    latencies: list[float], made_at: list[float]
) -> None:
    """Six REST server times 0.25 s apart from a 60x peer, each request slow by up to 200 ms and answered at
    any point within it: the rate is at most the true one, so extrapolating a long busy second later the clock
    is not ahead of the peer (the ingest would finalise a bucket before the peer closed it)."""
    mono = FakeMonotonic()
    clock = ExchangeClock(monotonic=mono, min_span_s=0.6)
    true_rate, origin = 60.0, mono.t
    for lat, frac in zip(latencies, made_at, strict=True):
        sent = mono.t
        answered = sent + lat * frac
        clock.observe(
            T + timedelta(seconds=(answered - origin) * true_rate), at=sent + lat / 2, spread=lat / 2
        )
        mono.t = sent + lat + 0.25
    assert clock.rate <= true_rate * (1 + 1e-6)
    assert clock.rate >= true_rate * 0.5
    mono.t += 2.0
    assert clock.epoch_s() <= T.timestamp() + (mono.t - origin) * true_rate + 1e-6


def test_a_heartbeat_after_warm_up_switches_the_rate_back_to_least_squares() -> None:
    mono = FakeMonotonic()
    clock = ExchangeClock(monotonic=mono, min_span_s=0.6)
    for i in range(4):
        clock.observe(T + timedelta(seconds=15 * i), at=mono.t, spread=0.01)
        mono.t += 0.25
    bracketed = clock.rate
    assert bracketed < 60.0
    clock.observe(T + timedelta(seconds=60.0), at=mono.t - 0.25 + 1.0)  # a heartbeat receipt, no spread
    assert clock.rate != bracketed
