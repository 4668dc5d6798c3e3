"""Protective exits on the live market act where the trades reached their levels (issue #14 rule 2, last sentence):
the ingest's trade path (services/ingest/live_domain.py TradePath), its check on CandleClosed, and its reading
(shared/protective.py reached_on_path)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.ingest.live_domain import Bar, Fetch, LiveBook, TradePath
from shared import protective
from shared.messages import CandleClosed

D = Decimal
IV = 60
T0 = 1_775_570_400
GRACE = 2.0

trades_st = st.lists(
    st.tuples(st.integers(0, 40), st.integers(90, 110).map(lambda c: D(c) / 1)), min_size=1, max_size=60
)


def _brute_points(trades: list[tuple[int, Decimal]]) -> tuple[tuple[int, Decimal], ...]:
    """Every new low (time, then lower first) and new high (time, then higher first), merged: the definition."""
    lows, highs = [], []
    lo: Decimal | None = None
    for t, p in sorted(trades):
        if lo is None or p < lo:
            lows.append((t, p))
            lo = p
    hi: Decimal | None = None
    for t, p in sorted(trades, key=lambda x: (x[0], -x[1])):
        if hi is None or p > hi:
            highs.append((t, p))
            hi = p
    merged = sorted({(t, 0, p) for t, p in lows} | {(t, 1, p) for t, p in highs})
    out: list[tuple[int, Decimal]] = []
    for t, _, p in merged:
        if not out or out[-1] != (t, p):
            out.append((t, p))
    return tuple(out)


def _first_reached(
    trades: list[tuple[int, Decimal]], stop: Decimal, take: Decimal
) -> tuple[protective.Kind, Decimal] | None:
    """What a resting stop and take profit do with every trade in time order (lower first at one time)."""
    for _, p in sorted(trades):
        if p <= stop:
            return "stop_loss", p
        if p >= take:
            return "take_profit", take
    return None


@given(trades_st, st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None)
def test_the_path_keeps_exactly_the_new_lows_and_highs_whatever_order_trades_arrive_in(
    trades: list[tuple[int, Decimal]], rnd: random.Random
) -> None:
    arrival = list(trades)
    rnd.shuffle(arrival)  # a snapshot after a reconnect brings older trades late
    path = TradePath()
    for t, p in arrival:
        path.add(t, p)
    assert path.points() == _brute_points(trades)
    assert len(path.points()) <= 2 * len(trades)


@given(trades_st, st.integers(85, 115), st.integers(0, 30))
@settings(max_examples=300, deadline=None)
def test_the_path_answers_like_every_trade_would_for_any_stop_and_take_profit(
    trades: list[tuple[int, Decimal]], stop: int, gap: int
) -> None:
    path = TradePath()
    for t, p in trades:
        path.add(t, p)
    s, tp = D(stop), D(stop + 1 + gap)
    assert protective.reached_on_path(path.points(), s, tp) == _first_reached(trades, s, tp)


def _candle(path: tuple[tuple[int, Decimal], ...] | None, low: str = "95", high: str = "105") -> CandleClosed:
    return CandleClosed.model_validate(
        {
            "id": "c1",
            "event_time": datetime.fromtimestamp(T0 + IV, UTC),
            "correlation_id": "t",
            "product": "BTC/USDC",
            "interval_s": IV,
            "open_time": datetime.fromtimestamp(T0, UTC),
            "open": "100",
            "high": high,
            "low": low,
            "close": "100",
            "volume": "1",
            "trade_path": path,
        }
    )


def test_a_candle_refuses_a_path_that_disagrees_with_its_range_or_bucket() -> None:
    ms = T0 * 1000
    good = ((ms, D(100)), (ms + 5, D(95)), (ms + 9, D(105)))
    assert _candle(good).trade_path == good
    with pytest.raises(ValidationError, match=r"spans \[95, 104\], the candle \[95, 105\]"):
        _candle(((ms, D(100)), (ms + 5, D(95)), (ms + 9, D(104))))  # never reached the high
    with pytest.raises(ValidationError, match="out of time order or outside the bucket"):
        _candle(((ms + 9, D(105)), (ms + 5, D(95))))
    with pytest.raises(ValidationError, match="outside the bucket"):
        _candle(((ms - 1, D(105)), (ms + 5, D(95))))
    with pytest.raises(ValidationError, match="outside the bucket"):
        _candle(((ms, D(105)), ((T0 + IV) * 1000, D(95))))
    with pytest.raises(ValidationError, match="empty"):
        _candle(())


def _book() -> LiveBook:
    return LiveBook(
        ("A/USDC",),
        IV,
        grace_s=GRACE,
        deadline_s=120.0,
        poll_interval_s=2.0,
        next_step=T0,
        last_close={"A/USDC": D(99)},
    )


def test_a_final_candle_carries_its_path_only_when_every_trade_was_seen_and_they_match_it() -> None:
    b = _book()
    b.ws_up(T0 - 5)
    for t, p in [(T0 + 1.0, "100"), (T0 + 20.5, "96"), (T0 + 30.25, "104"), (T0 + 40, "97")]:
        assert b.on_trade("A/USDC", t, D(p))
    b.on_answer(Fetch("A/USDC", T0, T0 + IV), [Bar(T0, D(100), D(104), D(96), D(97), D(3))], T0 + IV + GRACE)
    (step,) = b.ready(T0 + IV + GRACE)
    ms = T0 * 1000
    assert step.candles[0].path == ((ms + 1000, D(100)), (ms + 20500, D(96)), (ms + 30250, D(104)))

    # REST's low is lower than any trade seen: the two disagree, so the candle's range decides.
    b.on_trade("A/USDC", T0 + IV + 1, D(100))
    b.on_answer(
        Fetch("A/USDC", T0 + IV, T0 + 2 * IV),
        [Bar(T0 + IV, D(100), D(100), D(90), D(100), D(1))],
        T0 + 2 * IV + GRACE,
    )
    (step,) = b.ready(T0 + 2 * IV + GRACE)
    assert step.candles[0].path is None


def test_no_path_when_the_websocket_had_a_gap_in_the_bucket() -> None:
    b = _book()
    b.ws_up(T0 - 5)
    b.on_trade("A/USDC", T0 + 1, D(100))
    b.ws_down(T0 + 10)
    b.ws_up(T0 + 11)  # trades in between may be lost
    b.on_trade("A/USDC", T0 + 30, D(101))
    b.on_answer(
        Fetch("A/USDC", T0, T0 + IV), [Bar(T0, D(100), D(101), D(100), D(101), D(2))], T0 + IV + GRACE
    )
    (step,) = b.ready(T0 + IV + GRACE)
    assert step.candles[0].path is None and not step.candles[0].synthetic
