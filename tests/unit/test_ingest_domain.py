"""Replay schedule (services/ingest/domain.py) over the bundled real candles: windows, order, ids, resume."""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from services.ingest.domain import build_schedule, finished_message, resume_point
from shared.aligner import Step
from shared.candles import CandleFile, load_products, read_candle_file

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "market"
PRODUCTS = ["SOL/USDC", "BTC/USDC", "ETH/USDC"]  # deliberately unsorted
FIRST = datetime(2021, 8, 1, tzinfo=UTC)
LAST = datetime(2021, 9, 30, 23, tzinfo=UTC)


@pytest.fixture(scope="module")
def files() -> dict[str, CandleFile]:
    return load_products(DATA, PRODUCTS)


def aggregate_to_4h(source: Path, target_dir: Path) -> Path:
    """Aggregate an hourly candle file into 4 h candles (open of first, max high, min low, close of last,
    summed volume; buckets on the 4 h UTC grid), written as `<source>_<BASE>-<QUOTE>_4h.csv.gz`."""
    cf = read_candle_file(source)
    bucket_ms = 4 * 3600 * 1000
    buckets: dict[int, list[tuple[Decimal, Decimal, Decimal, Decimal, Decimal]]] = {}
    for r in cf.rows:
        buckets.setdefault(r.open_time_ms - r.open_time_ms % bucket_ms, []).append(
            (r.open, r.high, r.low, r.close, r.volume)
        )
    lines = ["timestamp_ms,open,high,low,close,volume"]
    for t in sorted(buckets):
        rows = buckets[t]
        high = max(x[1] for x in rows)
        low = min(x[2] for x in rows)
        volume = sum((x[4] for x in rows), Decimal(0))
        lines.append(f"{t},{rows[0][0]},{high},{low},{rows[-1][3]},{volume}")
    path = target_dir / f"{cf.source}_{cf.base}-{cf.quote}_4h.csv.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def ids(steps: list[Step]) -> list[str]:
    return [c.id for s in steps for c in s.candles] + [s.watermark().id for s in steps]


# --------------------------------------------------------------------------------------------- whole data
def test_full_schedule_covers_every_bundled_hour(files: dict[str, CandleFile]) -> None:
    steps = build_schedule(files)
    assert len(steps) == 1458  # every product shares the same 6 missing hours
    assert steps[0].time_s == int(FIRST.timestamp())
    assert steps[-1].time_s == int(LAST.timestamp())
    assert all(s.interval_s == 3600 for s in steps)


def test_steps_are_sorted_and_each_step_candles_sorted_by_product(files: dict[str, CandleFile]) -> None:
    steps = build_schedule(files)
    times = [s.time_s for s in steps]
    assert times == sorted(set(times))
    for s in steps:
        products = [c.product for c in s.candles]
        assert products == sorted(PRODUCTS)
        assert all(c.open_time == datetime.fromtimestamp(s.time_s, UTC) for c in s.candles)


def test_candles_carry_the_file_values_and_source(files: dict[str, CandleFile]) -> None:
    steps = build_schedule(files, hours=1)
    btc = next(c for c in steps[0].candles if c.product == "BTC/USDC")
    row = files["BTC/USDC"].rows[0]
    assert (btc.open, btc.high, btc.low, btc.close, btc.volume) == (
        row.open,
        row.high,
        row.low,
        row.close,
        row.volume,
    )
    assert btc.source == "binance:BTC-USDT"
    assert btc.interval_s == 3600


def test_event_time_is_open_plus_interval(files: dict[str, CandleFile]) -> None:
    for s in build_schedule(files, hours=48):
        for c in s.candles:
            assert c.event_time == c.open_time + timedelta(seconds=3600)
        wm = s.watermark()
        assert wm.step_time == datetime.fromtimestamp(s.time_s, UTC)
        assert wm.event_time == wm.step_time + timedelta(seconds=3600)
        assert wm.interval_s == 3600


def test_ids_are_deterministic_and_unique(files: dict[str, CandleFile]) -> None:
    first = build_schedule(files, hours=72)
    again = build_schedule(load_products(DATA, PRODUCTS), hours=72)
    assert ids(first) == ids(again)
    assert len(set(ids(first))) == len(ids(first))
    assert [s.candles[0].correlation_id for s in first] == [f"step:{s.time_s}" for s in first]


def test_candle_id_does_not_depend_on_the_window(files: dict[str, CandleFile]) -> None:
    # A candle replayed in a longer or later window keeps its id: consumers deduplicate on it.
    short = build_schedule(files, hours=10)
    later = build_schedule(files, start=FIRST + timedelta(hours=5), hours=10)
    by_id_short = {c.id: c for s in short for c in s.candles}
    shared = [c for s in later for c in s.candles if c.id in by_id_short]
    assert len(shared) == 5 * len(PRODUCTS)
    assert all(by_id_short[c.id] == c for c in shared)


# --------------------------------------------------------------------------------------------- windows
def test_hours_keeps_the_first_n_hours(files: dict[str, CandleFile]) -> None:
    steps = build_schedule(files, hours=24)
    assert len(steps) == 24
    assert steps[0].time_s == int(FIRST.timestamp())
    assert steps[-1].time_s == int((FIRST + timedelta(hours=23)).timestamp())


def test_fractional_hours(files: dict[str, CandleFile]) -> None:
    assert len(build_schedule(files, hours=2.5)) == 3  # opens at 0:00, 1:00, 2:00 are within 2.5 h


def test_hours_across_a_data_gap_counts_wall_hours_not_candles(files: dict[str, CandleFile]) -> None:
    # 2021-08-13 02:00..05:00 (4 hours) are missing in the bundled data.
    start = datetime(2021, 8, 13, 0, tzinfo=UTC)
    steps = build_schedule(files, start=start, hours=8)
    assert [datetime.fromtimestamp(s.time_s, UTC).hour for s in steps] == [0, 1, 6, 7]


def test_start_and_end_bound_open_times_half_open(files: dict[str, CandleFile]) -> None:
    start = datetime(2021, 8, 2, tzinfo=UTC)
    end = datetime(2021, 8, 3, tzinfo=UTC)
    steps = build_schedule(files, start=start, end=end)
    assert len(steps) == 24
    assert steps[0].time_s == int(start.timestamp())
    assert all(s.time_s < int(end.timestamp()) for s in steps)


def test_start_and_end_parsed_from_iso_utc(files: dict[str, CandleFile]) -> None:
    a = build_schedule(
        files,
        start=datetime.fromisoformat("2021-08-02T00:00:00Z"),
        end=datetime.fromisoformat("2021-08-02T06:00:00+00:00"),
    )
    b = build_schedule(
        files,
        start=datetime.fromisoformat("2021-08-02T02:00:00+02:00"),  # the same instant, written in UTC+2
        end=datetime(2021, 8, 2, 6, tzinfo=UTC),
    )
    assert [s.time_s for s in a] == [s.time_s for s in b]
    assert len(a) == 6


@pytest.fixture
def new_york_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.usefixtures("new_york_local_time")
def test_naive_iso_times_are_utc_not_local_time(files: dict[str, CandleFile]) -> None:
    naive = datetime(2021, 8, 2)
    assert naive.timestamp() != naive.replace(tzinfo=UTC).timestamp()  # local time really is not UTC here
    steps = build_schedule(files, start=datetime.fromisoformat("2021-08-02T00:00:00"), hours=3)
    assert steps[0].time_s == int(datetime(2021, 8, 2, tzinfo=UTC).timestamp())
    assert len(steps) == 3


def test_start_with_hours(files: dict[str, CandleFile]) -> None:
    start = datetime(2021, 9, 1, 12, tzinfo=UTC)
    steps = build_schedule(files, start=start, hours=6)
    assert [s.time_s for s in steps] == [int((start + timedelta(hours=i)).timestamp()) for i in range(6)]


def test_end_before_hours_limit_wins(files: dict[str, CandleFile]) -> None:
    steps = build_schedule(files, end=FIRST + timedelta(hours=3), hours=10)
    assert len(steps) == 3


def test_end_only(files: dict[str, CandleFile]) -> None:
    steps = build_schedule(files, end=FIRST + timedelta(days=1))
    assert len(steps) == 24


def test_empty_window_names_the_data_span(files: dict[str, CandleFile]) -> None:
    with pytest.raises(ValueError, match="no candles between") as info:
        build_schedule(files, start=datetime(2022, 1, 1, tzinfo=UTC))
    message = str(info.value)
    assert "2022-01-01T00:00:00+00:00" in message
    assert "2021-08-01T00:00:00+00:00" in message and "2021-09-30T23:00:00+00:00" in message


def test_reversed_window_is_empty(files: dict[str, CandleFile]) -> None:
    with pytest.raises(ValueError, match="the data spans"):
        build_schedule(files, start=datetime(2021, 8, 5, tzinfo=UTC), end=datetime(2021, 8, 4, tzinfo=UTC))


@pytest.mark.parametrize("hours", [0, -1, -0.5])
def test_non_positive_hours_are_refused(files: dict[str, CandleFile], hours: float) -> None:
    with pytest.raises(ValueError, match="hours must be positive"):
        build_schedule(files, hours=hours)


def test_no_files_is_refused() -> None:
    with pytest.raises(ValueError, match="no candle file matches"):
        build_schedule({})


# --------------------------------------------------------------------------------------------- resume, finish
def test_resume_point(files: dict[str, CandleFile]) -> None:
    steps = build_schedule(files, hours=10)
    assert resume_point(steps, None) == 0
    assert resume_point(steps, steps[0].time_s - 3600) == 0
    assert resume_point(steps, steps[0].time_s) == 1
    assert resume_point(steps, steps[4].time_s) == 5
    assert resume_point(steps, steps[4].time_s + 1800) == 5  # between steps: the next one is still to publish
    assert resume_point(steps, steps[-1].time_s) == len(steps)
    assert resume_point(steps, steps[-1].time_s + 10 * 3600) == len(steps)
    assert resume_point([], None) == 0
    assert resume_point([], 123) == 0


def test_finished_message(files: dict[str, CandleFile]) -> None:
    steps = build_schedule(files, hours=5)
    msg = finished_message(steps)
    assert msg.steps == 5
    assert msg.last_step_time == datetime.fromtimestamp(steps[-1].time_s, UTC)
    assert msg.event_time == msg.last_step_time + timedelta(hours=1)
    assert finished_message(steps).id == msg.id
    assert finished_message(build_schedule(files, hours=6)).id != msg.id
    empty = finished_message([])
    assert empty.steps == 0 and empty.last_step_time is None


# --------------------------------------------------------------------------------------------- other interval
def test_aggregated_4h_data_gives_interval_14400(tmp_path: Path) -> None:
    for base in ("BTC", "ETH"):
        aggregate_to_4h(DATA / f"binance_{base}-USDT_1h.csv.gz", tmp_path)
    assert (tmp_path / "binance_BTC-USDT_4h.csv.gz").exists()
    found = load_products(tmp_path, ["BTC/USDC", "ETH/USDC"])
    assert {cf.interval_s for cf in found.values()} == {14_400}
    steps = build_schedule(found)
    assert len(steps) == 61 * 6  # 61 days of six 4 h candles; no 4 h bucket is empty
    assert all(s.interval_s == 14_400 for s in steps)
    assert all(b.time_s - a.time_s == 14_400 for a, b in zip(steps, steps[1:], strict=False))
    for s in steps[:20]:
        assert [c.product for c in s.candles] == ["BTC/USDC", "ETH/USDC"]
        for c in s.candles:
            assert c.interval_s == 14_400
            assert c.event_time == c.open_time + timedelta(seconds=14_400)
            assert s.watermark().event_time == c.event_time
    # The first 4 h candle of BTC aggregates the first four hourly ones.
    hourly = read_candle_file(DATA / "binance_BTC-USDT_1h.csv.gz").rows[:4]
    first = steps[0].candles[0]
    assert first.open == hourly[0].open
    assert first.close == hourly[3].close
    assert first.high == max(r.high for r in hourly)
    assert first.low == min(r.low for r in hourly)
    assert first.volume == sum((r.volume for r in hourly), Decimal(0))


def test_aggregated_4h_hours_window(tmp_path: Path) -> None:
    aggregate_to_4h(DATA / "binance_BTC-USDT_1h.csv.gz", tmp_path)
    steps = build_schedule(load_products(tmp_path, ["BTC/USDC"]), hours=24)
    assert len(steps) == 6


def test_schedule_candles_equal_validated_candles(files: dict[str, CandleFile]) -> None:
    """build_schedule skips pydantic validation (the file reader checked the rows): every candle must still be
    exactly what validated construction gives, field by field and on the wire."""
    from shared.codec import decode, encode
    from shared.messages import CandleClosed

    steps = build_schedule(files)
    candles = [c for s in steps for c in s.candles]
    assert len(candles) > 4000
    for c in candles:
        checked = CandleClosed.model_validate(c.model_dump())
        assert checked == c
        assert checked.model_dump() == c.model_dump()
        assert decode(encode(c)) == checked
