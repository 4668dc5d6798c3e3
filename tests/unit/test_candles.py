"""Candle files: the bundled real data reads; every kind of corruption is refused naming file and line."""

from __future__ import annotations

import csv
import gzip
import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from shared.candles import (
    FILE_RE,
    CandleFileError,
    discover,
    interval_from_name,
    load_products,
    read_candle_file,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "market"
BTC = DATA / "binance_BTC-USDT_1h.csv.gz"
HEADER = "timestamp_ms,open,high,low,close,volume"
H = 3_600_000  # one hour in ms
T0 = 1_627_776_000_000  # 2021-08-01T00:00:00Z, the first open time of the bundled files


def _manifest() -> dict[str, dict[str, str]]:
    with (DATA / "MANIFEST.csv").open(newline="", encoding="utf-8") as f:
        return {row["file"]: row for row in csv.DictReader(f)}


MANIFEST = _manifest()


def rows_1h(n: int = 5, start: int = T0) -> list[str]:
    """n valid hourly rows (open time, open, high, low, close, volume)."""
    out = []
    for i in range(n):
        price = 100 + i
        out.append(f"{start + i * H},{price},{price + 2},{price - 1},{price + 1},{10 + i}.5")
    return out


def write(tmp_path: Path, name: str, rows: list[str], header: str = HEADER, gz: bool | None = None) -> Path:
    path = tmp_path / name
    text = "\n".join([header, *rows]) + "\n"
    if gz is None:
        gz = name.endswith(".gz")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def refused(path: Path, *fragments: str) -> str:
    with pytest.raises(CandleFileError) as info:
        read_candle_file(path)
    message = str(info.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------------------------- bundled data
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_bundled_file_reads_with_manifest_rows_and_span(name: str) -> None:
    cf = read_candle_file(DATA / name)
    entry = MANIFEST[name]
    assert len(cf.rows) == int(entry["rows"]) == 1458
    assert cf.rows[0].open_time_ms == int(entry["first_open_ms"])
    assert cf.rows[-1].open_time_ms == int(entry["last_open_ms"])
    assert cf.interval_s == 3600
    assert cf.source == "binance"
    assert cf.quote == "USDT"
    assert name == f"binance_{cf.base}-USDT_1h.csv.gz"


def test_bundled_btc_first_row_is_exact_decimals() -> None:
    cf = read_candle_file(BTC)
    first = cf.rows[0]
    assert first.open_time_ms == T0
    assert (first.open, first.high, first.low, first.close) == (
        Decimal("41461.84"),
        Decimal("41772.87"),
        Decimal("41120"),
        Decimal("41737.37"),
    )
    assert first.volume == Decimal("2544.490704")


def test_bundled_files_are_strictly_increasing_and_aligned() -> None:
    cf = read_candle_file(BTC)
    times = [r.open_time_ms for r in cf.rows]
    assert times == sorted(set(times))
    assert all(t % H == 0 for t in times)
    # 61 days = 1464 hours; 6 are missing (maintenance gaps), so the interval is the usual gap, not the only one.
    assert (times[-1] - times[0]) // H + 1 == 1464
    assert sum(1 for a, b in zip(times, times[1:], strict=False) if b - a != H) == 2


def test_interval_is_read_from_the_data_not_only_the_name(tmp_path: Path) -> None:
    rows = [f"{T0 + i * 4 * H},{100},{101},{99},{100},{1}" for i in range(6)]
    cf = read_candle_file(write(tmp_path, "test_BTC-USD_4h.csv", rows))
    assert cf.interval_s == 14_400


def test_plain_csv_and_gzip_read_the_same(tmp_path: Path) -> None:
    rows = rows_1h(4)
    a = read_candle_file(write(tmp_path, "x_BTC-USD_1h.csv", rows))
    b = read_candle_file(write(tmp_path, "x_ETH-USD_1h.csv.gz", rows))
    assert a.rows == b.rows


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    rows = rows_1h(3)
    cf = read_candle_file(write(tmp_path, "x_BTC-USD_1h.csv", [rows[0], "", rows[1], "   ", rows[2]]))
    assert len(cf.rows) == 3


def test_interval_from_name_units() -> None:
    assert interval_from_name("15m") == 900
    assert interval_from_name("1h") == 3600
    assert interval_from_name("4h") == 14_400
    assert interval_from_name("1d") == 86_400
    assert interval_from_name("30s") == 30


# --------------------------------------------------------------------------------------------- corrupted files
def test_truncated_gzip_is_refused_naming_the_file(tmp_path: Path) -> None:
    data = BTC.read_bytes()
    path = tmp_path / BTC.name
    path.write_bytes(data[: len(data) // 2])
    refused(path, "cannot read")


def test_corrupted_gzip_body_is_refused_naming_the_file(tmp_path: Path) -> None:
    data = bytearray(BTC.read_bytes())
    for i in range(40, 80):
        data[i] ^= 0xFF
    path = tmp_path / BTC.name
    path.write_bytes(bytes(data))
    refused(path, "cannot read")


def test_not_gzip_at_all_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "binance_BTC-USDT_1h.csv.gz"
    path.write_text(HEADER + "\n", encoding="utf-8")
    refused(path, "cannot read")


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "binance_BTC-USDT_1h.csv"
    path.write_bytes(HEADER.encode() + b"\n\xff\xfe\n")
    refused(path, "cannot read")


def test_non_numeric_price_is_refused_naming_line(tmp_path: Path) -> None:
    rows = rows_1h(5)
    parts = rows[2].split(",")
    parts[4] = "12o.5"
    rows[2] = ",".join(parts)
    path = write(tmp_path, "x_BTC-USD_1h.csv.gz", rows)
    refused(path, f"{path}:4", "close", "'12o.5'", "not a number")


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_non_finite_price_is_refused_naming_line(tmp_path: Path, value: str) -> None:
    rows = rows_1h(4)
    parts = rows[1].split(",")
    parts[2] = value
    rows[1] = ",".join(parts)
    path = write(tmp_path, "x_BTC-USD_1h.csv", rows)
    refused(path, f"{path}:3", "high")


def test_non_integer_timestamp_is_refused_naming_line(tmp_path: Path) -> None:
    rows = rows_1h(4)
    rows[3] = "2021-08-01T03:00:00Z" + rows[3][rows[3].index(",") :]
    path = write(tmp_path, "x_BTC-USD_1h.csv", rows)
    refused(path, f"{path}:5", "timestamp", "not an integer")


def test_high_below_close_is_refused_naming_line(tmp_path: Path) -> None:
    rows = rows_1h(5)
    rows[3] = f"{T0 + 3 * H},100,101,99,105,1"
    path = write(tmp_path, "x_BTC-USD_1h.csv.gz", rows)
    refused(path, f"{path}:5", "high/low")


def test_low_above_open_is_refused_naming_line(tmp_path: Path) -> None:
    rows = rows_1h(5)
    rows[0] = f"{T0},100,110,101,105,1"
    path = write(tmp_path, "x_BTC-USD_1h.csv", rows)
    refused(path, f"{path}:2", "high/low")


def test_negative_volume_is_refused_naming_line(tmp_path: Path) -> None:
    rows = rows_1h(5)
    rows[4] = f"{T0 + 4 * H},100,101,99,100,-3"
    path = write(tmp_path, "x_BTC-USD_1h.csv.gz", rows)
    refused(path, f"{path}:6", "volume >= 0")


def test_zero_price_is_refused_naming_line(tmp_path: Path) -> None:
    rows = rows_1h(3)
    rows[1] = f"{T0 + H},0,1,0,1,1"
    path = write(tmp_path, "x_BTC-USD_1h.csv", rows)
    refused(path, f"{path}:3", "prices must be > 0")


def test_zero_volume_is_accepted(tmp_path: Path) -> None:
    rows = rows_1h(3)
    rows[1] = f"{T0 + H},100,101,99,100,0"
    assert read_candle_file(write(tmp_path, "x_BTC-USD_1h.csv", rows)).rows[1].volume == 0


@pytest.mark.parametrize("kind", ["duplicate", "decreasing"])
def test_non_increasing_timestamps_are_refused_naming_line(tmp_path: Path, kind: str) -> None:
    rows = rows_1h(5)
    earlier = T0 + 2 * H if kind == "duplicate" else T0 + H
    rows[3] = f"{earlier}" + rows[3][rows[3].index(",") :]
    path = write(tmp_path, "x_BTC-USD_1h.csv.gz", rows)
    refused(path, f"{path}:5", "increase strictly", str(earlier))


@pytest.mark.parametrize("line", ["1627783200000,100,101,99,100", "1627783200000,100,101,99,100,1,7"])
def test_wrong_field_count_is_refused_naming_line(tmp_path: Path, line: str) -> None:
    rows = rows_1h(5)
    rows[2] = line
    path = write(tmp_path, "x_BTC-USD_1h.csv", rows)
    refused(path, f"{path}:4", "expected 6 comma-separated fields", f"got {line.count(',') + 1}")


def test_name_interval_disagreeing_with_data_is_refused(tmp_path: Path) -> None:
    # Real hourly candles saved under a 15-minute name.
    path = tmp_path / "binance_BTC-USDT_15m.csv.gz"
    shutil.copyfile(BTC, path)
    refused(path, "15m", "900 s", "3600 s")


@pytest.mark.parametrize(
    "header",
    [
        "time,open,high,low,close,volume",
        "timestamp_ms,open,high,low,close",
        "timestamp_ms;open;high;low;close;volume",
        "timestamp_ms,close,high,low,open,volume",
        "1627776000000,41461.84,41772.87,41120,41737.37,2544.490704",
    ],
)
def test_bad_header_is_refused_naming_line_1(tmp_path: Path, header: str) -> None:
    path = write(tmp_path, "x_BTC-USD_1h.csv", rows_1h(3), header=header)
    refused(path, f"{path}:1", "header")


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x_BTC-USD_1h.csv"
    path.write_bytes(b"")
    refused(path, "header")


def test_header_with_bom_or_spaces_is_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path, "x_BTC-USD_1h.csv", rows_1h(3), header="\ufefftimestamp_ms, open, high, low, close, volume"
    )
    assert len(read_candle_file(path).rows) == 3


def test_misaligned_timestamps_are_refused_naming_line(tmp_path: Path) -> None:
    # Hourly spacing, but every candle opens at half past: not candles of a 1 h grid.
    path = write(tmp_path, "x_BTC-USD_1h.csv.gz", rows_1h(5, start=T0 + H // 2))
    refused(path, f"{path}:2", "not a multiple", "3600 s")


def test_one_misaligned_row_is_refused_naming_its_line(tmp_path: Path) -> None:
    rows = rows_1h(8)
    rows[5] = f"{T0 + 5 * H + 60_000}" + rows[5][rows[5].index(",") :]
    path = write(tmp_path, "x_BTC-USD_1h.csv", rows)
    refused(path, f"{path}:7", "not a multiple")


def test_too_few_candles_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "x_BTC-USD_1h.csv", rows_1h(1))
    refused(path, "at least 2 candles")


@pytest.mark.parametrize(
    "name",
    [
        "BTC-USDT_1h.csv",
        "binance_BTCUSDT_1h.csv",
        "binance_btc-usdt_1h.csv",
        "binance_BTC-USDT_1x.csv",
        "binance_BTC-USDT_1h.txt",
    ],
)
def test_badly_named_file_is_refused(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, rows_1h(3), gz=False)
    refused(path, "<source>_<BASE>-<QUOTE>_<interval>")


def test_file_name_pattern() -> None:
    m = FILE_RE.match("coinbase_BTC-USD_15m.csv")
    assert m is not None
    assert (m.group("source"), m.group("base"), m.group("quote"), m.group("interval")) == (
        "coinbase",
        "BTC",
        "USD",
        "15m",
    )


# --------------------------------------------------------------------------------------------- load_products
def _copy(tmp_path: Path, *names: str) -> Path:
    for name in names:
        shutil.copyfile(DATA / name, tmp_path / name)
    return tmp_path


def test_load_products_maps_base_to_the_config_quote_ignoring_source_quote(tmp_path: Path) -> None:
    folder = _copy(
        tmp_path, "binance_BTC-USDT_1h.csv.gz", "binance_ETH-USDT_1h.csv.gz", "binance_SOL-USDT_1h.csv.gz"
    )
    found = load_products(folder, ["BTC/USDC", "ETH/USDC"])
    assert sorted(found) == ["BTC/USDC", "ETH/USDC"]  # SOL is present in the folder but not wanted
    assert found["BTC/USDC"].base == "BTC"
    assert found["BTC/USDC"].quote == "USDT"  # the source quote is kept on the file, not in the product


def test_load_products_leaves_out_products_without_a_file(tmp_path: Path) -> None:
    folder = _copy(tmp_path, "binance_BTC-USDT_1h.csv.gz")
    found = load_products(folder, ["BTC/USDC", "UNI/USDC"])
    assert list(found) == ["BTC/USDC"]


def test_load_products_on_the_bundled_folder() -> None:
    bases = ["BTC", "ETH", "SOL", "XRP", "ADA", "DOT", "LINK", "MATIC", "AVAX", "ATOM", "LTC", "UNI"]
    found = load_products(DATA, [f"{b}/USDC" for b in bases])
    assert sorted(found) == sorted(f"{b}/USDC" for b in bases if b != "UNI")
    assert {cf.interval_s for cf in found.values()} == {3600}


def test_load_products_does_not_read_unwanted_files(tmp_path: Path) -> None:
    folder = _copy(tmp_path, "binance_BTC-USDT_1h.csv.gz")
    (folder / "binance_DOGE-USDT_1h.csv.gz").write_bytes(b"not gzip")
    assert list(load_products(folder, ["BTC/USDC"])) == ["BTC/USDC"]


def test_load_products_refuses_two_files_for_one_base(tmp_path: Path) -> None:
    folder = _copy(tmp_path, "binance_BTC-USDT_1h.csv.gz")
    shutil.copyfile(BTC, folder / "coinbase_BTC-USD_1h.csv.gz")
    with pytest.raises(CandleFileError, match="two files for BTC/USDC") as info:
        load_products(folder, ["BTC/USDC"])
    assert "binance_BTC-USDT_1h.csv.gz" in str(info.value)
    assert "coinbase_BTC-USD_1h.csv.gz" in str(info.value)


def test_load_products_refuses_mixed_intervals(tmp_path: Path) -> None:
    folder = _copy(tmp_path, "binance_BTC-USDT_1h.csv.gz")
    # Every other hourly ETH candle is a valid 2 h file (open times on the 2 h grid, OHLC consistent).
    eth = read_candle_file(DATA / "binance_ETH-USDT_1h.csv.gz")
    rows = [
        f"{r.open_time_ms},{r.open},{r.high},{r.low},{r.close},{r.volume}"
        for r in eth.rows
        if r.open_time_ms % (2 * H) == 0
    ]
    write(folder, "binance_ETH-USDT_2h.csv.gz", rows)
    with pytest.raises(CandleFileError, match="different intervals") as info:
        load_products(folder, ["BTC/USDC", "ETH/USDC"])
    assert "3600" in str(info.value) and "7200" in str(info.value)


def test_load_products_propagates_a_corrupt_wanted_file(tmp_path: Path) -> None:
    path = tmp_path / "binance_BTC-USDT_1h.csv.gz"
    path.write_bytes(BTC.read_bytes()[:1000])
    with pytest.raises(CandleFileError, match="binance_BTC-USDT_1h.csv.gz"):
        load_products(tmp_path, ["BTC/USDC"])


def test_missing_folder_is_refused_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "no_such_data"
    with pytest.raises(CandleFileError, match="does not exist") as info:
        load_products(folder, ["BTC/USDC"])
    assert str(folder) in str(info.value)


def test_discover_lists_only_candle_files_sorted(tmp_path: Path) -> None:
    _copy(tmp_path, "binance_ETH-USDT_1h.csv.gz", "binance_BTC-USDT_1h.csv.gz")
    (tmp_path / "README.md").write_text("x", encoding="utf-8")
    (tmp_path / "MANIFEST.csv").write_text("x", encoding="utf-8")
    assert [p.name for p in discover(tmp_path)] == [
        "binance_BTC-USDT_1h.csv.gz",
        "binance_ETH-USDT_1h.csv.gz",
    ]
