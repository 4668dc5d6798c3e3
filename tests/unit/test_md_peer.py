"""The market-data peer's pure parts: the fast clock, the deterministic tape and candle aggregation."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.candles import CandleRow
from tests.peer.coinbase_md_peer import (
    DATA_DIR,
    CoinbaseMdPeer,
    MarketTape,
    PeerClock,
    Trade,
    _rows_for,
    aggregate,
    canonical,
    go_time,
    merge,
    rfc3339_us,
)

START = datetime(2026, 4, 7, 14, 30, tzinfo=UTC)
START_S = int(START.timestamp())
G = 60


class FakeMono:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _tape(**kw: object) -> MarketTape:
    rows = {p: _rows_for(DATA_DIR, p.split("-")[0]) for p in ("BTC-USD", "ETH-USD")}
    return MarketTape(rows, granularity_s=G, start_s=START_S, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- clock
def test_clock_runs_at_its_speed_and_changes_speed_continuously() -> None:
    mono = FakeMono()
    clock = PeerClock(START, 30, monotonic=mono)
    assert clock.now() == START
    mono.t += 2
    assert clock.now_s() == START_S + 60
    clock.set_speed(120)
    assert clock.now_s() == START_S + 60  # no jump when the speed changes
    mono.t += 0.5
    assert clock.now_s() == START_S + 120
    assert clock.real_seconds_until(START_S + 240) == pytest.approx(1.0)
    assert clock.uptime_s() == pytest.approx(2.5)


def test_clock_refuses_naive_start_and_bad_speed() -> None:
    with pytest.raises(ValueError):
        PeerClock(datetime(2026, 1, 1), 1)  # noqa: DTZ001 - the point of the test
    with pytest.raises(ValueError):
        PeerClock(START, 0)


def test_time_formats() -> None:
    us = START_S * 1_000_000 + 12_345
    assert rfc3339_us(us) == "2026-04-07T14:30:00.012345Z"
    assert go_time(START_S * 1_000_000_000 + 123_456, 91717.525857105) == (
        "2026-04-07 14:30:00.000123456 +0000 UTC m=+91717.525857105"
    )


def test_usdc_is_answered_as_usd() -> None:
    assert canonical("BTC-USDC") == "BTC-USD"
    assert canonical("BTC-USD") == "BTC-USD"
    assert canonical("ETH-BTC") == "ETH-BTC"


# ---------------------------------------------------------------------------------------------- tape
def test_bucket_k0_serves_the_first_data_row_and_wraps() -> None:
    tape = _tape()
    rows = tape.rows["BTC-USD"]
    k0 = START_S // G
    assert tape.row("BTC-USD", k0) == rows[0]
    assert tape.row("BTC-USD", k0 + 5) == rows[5]
    assert tape.row("BTC-USD", k0 - 1) == rows[-1]
    assert tape.row("BTC-USD", k0 + len(rows)) == rows[0]


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(min_value=-1500, max_value=3000), product=st.sampled_from(["BTC-USD", "ETH-USD"]))
def test_trades_aggregate_exactly_to_the_served_candle(offset: int, product: str) -> None:
    tape = _tape()
    k = START_S // G + offset
    trades = tape.bucket_trades(product, k)
    row = tape.row(product, k)
    assert 4 <= len(trades) <= 9
    assert all(k * G * 1_000_000 <= t.time_us < (k + 1) * G * 1_000_000 for t in trades)
    assert [t.time_us for t in trades] == sorted({t.time_us for t in trades})
    assert [t.trade_id for t in trades] == sorted({t.trade_id for t in trades})
    assert all(t.size > 0 and t.side in ("BUY", "SELL") for t in trades)
    c = aggregate(k * G, trades)
    assert c is not None
    assert (c.open, c.high, c.low, c.close, c.volume) == (row.open, row.high, row.low, row.close, row.volume)
    assert c == tape.final_candle(product, k)


def test_tape_is_deterministic_and_seeded() -> None:
    k = START_S // G + 7
    assert _tape().bucket_trades("BTC-USD", k) == _tape().bucket_trades("BTC-USD", k)
    assert _tape(seed=1).bucket_trades("BTC-USD", k) != _tape().bucket_trades("BTC-USD", k)


def test_trade_ids_increase_across_buckets_and_ranges_are_half_open() -> None:
    tape = _tape()
    k = START_S // G
    lo, hi = (k - 3) * G * 1_000_000, (k + 3) * G * 1_000_000
    trades = tape.trades_between("BTC-USD", lo, hi)
    ids = [t.trade_id for t in trades]
    assert ids == sorted(set(ids))
    assert {t.time_us // (G * 1_000_000) for t in trades} == set(range(k - 3, k + 3))
    first = trades[0]
    assert tape.trades_between("BTC-USD", first.time_us, hi)[0] != first  # after < time
    assert tape.trades_between("BTC-USD", lo, first.time_us)[-1] == first  # time <= upto


def test_empty_and_quiet_buckets_have_no_trades() -> None:
    k = START_S // G
    tape = _tape(empty={("BTC-USDC", (k + 1) * G)}, quiet_every={"ETH-USD": 3})
    assert tape.bucket_trades("BTC-USD", k + 1) == ()
    assert tape.final_candle("BTC-USD", k + 1) is None
    assert tape.bucket_trades("BTC-USD", k + 2)
    quiet = [kk for kk in range(k, k + 9) if not tape.bucket_trades("ETH-USD", kk)]
    assert quiet == [kk for kk in range(k, k + 9) if kk % 3 == 0] and len(quiet) == 3


def test_recent_is_newest_first_and_bounded() -> None:
    tape = _tape(quiet_every={"ETH-USD": 2})
    upto = START_S * 1_000_000 + 30_000_000
    got = tape.recent("ETH-USD", upto, 50)
    assert len(got) == 50
    assert [t.time_us for t in got] == sorted((t.time_us for t in got), reverse=True)
    assert all(t.time_us <= upto for t in got)


def test_tiny_volume_still_splits_exactly() -> None:
    row = CandleRow(0, Decimal("1.5"), Decimal("2"), Decimal("1"), Decimal("1.25"), Decimal("0.00000003"))
    tape = MarketTape({"X-USD": [row]}, granularity_s=G, start_s=START_S)
    trades = tape.bucket_trades("X-USD", START_S // G)
    c = aggregate(0, trades)
    assert c is not None and c.volume == row.volume and c.high == 2 and c.low == 1
    assert c.open == Decimal("1.5") and c.close == Decimal("1.25")


def test_merge_of_five_minute_bucket_equals_aggregate_of_its_trades() -> None:
    tape = _tape()
    k = START_S // G
    parts = [c for kk in range(k, k + 5) if (c := tape.final_candle("BTC-USD", kk))]
    trades: list[Trade] = [t for kk in range(k, k + 5) for t in tape.bucket_trades("BTC-USD", kk)]
    assert merge(k * G, parts) == aggregate(k * G, trades)


def test_unknown_granularity_and_missing_data_are_refused() -> None:
    with pytest.raises(ValueError):
        MarketTape({"BTC-USD": _rows_for(DATA_DIR, "BTC")}, granularity_s=61, start_s=0)
    with pytest.raises(ValueError):
        CoinbaseMdPeer(["UNI-USD"])


def test_final_candles_ground_truth_matches_rows() -> None:
    mono = FakeMono()
    peer = CoinbaseMdPeer(["BTC-USD"], start=START, speed=60, monotonic=mono, quiet_every={"BTC-USD": 4})
    assert peer.final_candles("BTC-USD", START_S, START_S + 600) == []  # nothing closed yet
    mono.t += 10  # 600 peer seconds
    got = peer.final_candles("BTC-USD", START_S, START_S + 600)
    starts = [int(c["start"]) for c in got]
    assert starts == [s for s in range(START_S, START_S + 600, G) if (s // G) % 4]
    rows = peer.tape.rows["BTC-USD"]
    assert Decimal(got[0]["open"]) == rows[(starts[0] - START_S) // G].open
    five = peer.final_candles("BTC-USD", START_S, START_S + 600, granularity_s=300)
    assert len(five) == 2
    assert Decimal(five[0]["volume"]) == sum(
        Decimal(c["volume"]) for c in got if int(c["start"]) < START_S + 300
    )


def test_a_shock_makes_its_buckets_trade_at_one_price_in_trades_and_candles_alike() -> None:
    tape = _tape()
    k = START_S // G + 7
    before = tape.bucket_trades("BTC-USD", k)  # cached: the shock must replace it
    assert len({t.price for t in before}) > 1
    tape.shock("BTC-USDC", Decimal("12345.67"), k, 2)
    for kk in (k, k + 1):
        trades = tape.bucket_trades("BTC-USD", kk)
        assert {t.price for t in trades} == {Decimal("12345.67")}
        c = tape.final_candle("BTC-USD", kk)
        assert c is not None and (c.open, c.high, c.low, c.close) == (Decimal("12345.67"),) * 4
        assert c.volume == sum((t.size for t in trades), Decimal(0))
    assert tape.row("BTC-USD", k + 2) == tape.rows["BTC-USD"][9]  # after it, the data again
    assert tape.row("ETH-USD", k) == tape.rows["ETH-USD"][7]  # other products untouched
    with pytest.raises(ValueError, match="positive"):
        tape.shock("BTC-USD", Decimal("0"), k, 1)
    with pytest.raises(ValueError, match="unknown product"):
        tape.shock("DOGE-USD", Decimal("1"), k, 1)
