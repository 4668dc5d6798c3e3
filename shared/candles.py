"""Reading recorded candle files: `<source>_<BASE>-<QUOTE>_<interval>.csv[.gz]` with rows
`timestamp_ms,open,high,low,close,volume` (open time, UTC ms). Pure file parsing; no Kafka.

The interval is read from the data (the most common gap between consecutive rows), not from the name,
so a file whose name and content disagree is refused rather than replayed at the wrong pace.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import NoReturn

FILE_RE = re.compile(
    r"^(?P<source>[a-z0-9]+)_(?P<base>[A-Z0-9]+)-(?P<quote>[A-Z0-9]+)_(?P<interval>\d+[smhdw])\.csv(\.gz)?$"
)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
HEADER = "timestamp_ms,open,high,low,close,volume"


class CandleFileError(ValueError):
    """A candle file that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class CandleRow:
    open_time_ms: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal


@dataclass(frozen=True)
class CandleFile:
    path: Path
    source: str
    base: str
    quote: str
    interval_s: int
    rows: tuple[CandleRow, ...]


def interval_from_name(token: str) -> int:
    return int(token[:-1]) * _UNIT_S[token[-1]]


def _dec(text: str, what: str, where: str) -> Decimal:
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise CandleFileError(f"{where}: {what} {text!r} is not a number") from None
    if not d.is_finite():
        raise CandleFileError(f"{where}: {what} {text!r} is not finite")
    return d


def _diagnose(line: str, where: str) -> NoReturn:
    """Raise the precise error for a row the fast path refused."""
    parts = line.split(",")
    if len(parts) != 6:
        raise CandleFileError(f"{where}: expected 6 comma-separated fields, got {len(parts)}: {line[:80]!r}")
    try:
        int(parts[0])
    except ValueError:
        raise CandleFileError(f"{where}: timestamp {parts[0]!r} is not an integer (ms)") from None
    for x, k in zip(parts[1:], ("open", "high", "low", "close", "volume"), strict=True):
        _dec(x, k, where)
    raise CandleFileError(f"{where}: unreadable row {line[:80]!r}")  # not reached: one of the fields is bad


def read_candle_file(path: Path) -> CandleFile:
    m = FILE_RE.match(path.name)
    if not m:
        raise CandleFileError(
            f"{path}: name does not match <source>_<BASE>-<QUOTE>_<interval>.csv[.gz] (e.g. binance_BTC-USDT_1h.csv.gz)"
        )
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError) as err:
        raise CandleFileError(f"{path}: cannot read: {err}") from None
    lines = text.splitlines()
    if not lines or lines[0].replace(" ", "").strip() != HEADER:
        got = lines[0][:80] if lines else ""
        raise CandleFileError(f"{path}:1: first line must be the header {HEADER!r}, got {got!r}")
    rows: list[CandleRow] = []
    line_of: list[int] = []
    prev = -1
    zero = Decimal(0)
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split(",")
        # The fast path: six fields, an integer time, five finite numbers; anything else gets the slow,
        # precise diagnosis below (a whole file of 17k rows per asset makes the difference ~3x).
        try:
            if len(parts) != 6:
                raise ValueError
            ts = int(parts[0])
            o, h, lo, c, v = map(Decimal, parts[1:])
            if not (o.is_finite() and h.is_finite() and lo.is_finite() and c.is_finite() and v.is_finite()):
                raise ValueError
        except (ValueError, InvalidOperation):
            if not line.strip():
                continue
            _diagnose(line, f"{path}:{n}")
        if o <= zero or h <= zero or lo <= zero or c <= zero or v < zero:
            raise CandleFileError(f"{path}:{n}: prices must be > 0 and volume >= 0: {line[:80]!r}")
        if h < o or h < c or lo > o or lo > c:
            raise CandleFileError(f"{path}:{n}: high/low do not bound open/close: {line[:80]!r}")
        if ts <= prev:
            raise CandleFileError(f"{path}:{n}: timestamps must increase strictly ({ts} after {prev})")
        prev = ts
        rows.append(CandleRow(ts, o, h, lo, c, v))
        line_of.append(n)
    if len(rows) < 2:
        raise CandleFileError(f"{path}: needs at least 2 candles to know the interval, has {len(rows)}")
    gaps = Counter(b.open_time_ms - a.open_time_ms for a, b in zip(rows, rows[1:], strict=False))
    interval_ms = gaps.most_common(1)[0][0]
    if interval_ms % 1000:
        raise CandleFileError(f"{path}: interval {interval_ms} ms is not a whole number of seconds")
    named = interval_from_name(m.group("interval"))
    if named != interval_ms // 1000:
        raise CandleFileError(
            f"{path}: the name says {m.group('interval')} ({named} s) but the rows are {interval_ms // 1000} s apart"
        )
    misaligned = [
        (n, r.open_time_ms) for n, r in zip(line_of, rows, strict=True) if r.open_time_ms % interval_ms
    ]
    if misaligned:
        n, ts = misaligned[0]
        raise CandleFileError(
            f"{path}:{n}: open time {ts} is not a multiple of the {interval_ms // 1000} s interval"
        )
    return CandleFile(
        path, m.group("source"), m.group("base"), m.group("quote"), interval_ms // 1000, tuple(rows)
    )


def discover(data_dir: Path) -> list[Path]:
    if not data_dir.is_dir():
        raise CandleFileError(f"data folder {data_dir} does not exist")
    return sorted(p for p in data_dir.iterdir() if FILE_RE.match(p.name))


def load_products(data_dir: Path, products: list[str]) -> dict[str, CandleFile]:
    """One file per wanted product `<BASE>/<QUOTE>` (any source quote: a proxy is named in the data's README).

    Products without a file are simply absent (they score nothing and are never traded). Two files for one
    base asset, or files at different intervals, are refused.
    """
    wanted = {p.split("/")[0]: p for p in products}
    found: dict[str, CandleFile] = {}
    for path in discover(data_dir):
        m = FILE_RE.match(path.name)
        assert m is not None
        base = m.group("base")
        if base not in wanted:
            continue
        cf = read_candle_file(path)
        product = wanted[base]
        if product in found:
            raise CandleFileError(f"two files for {product}: {found[product].path.name} and {path.name}")
        found[product] = cf
    intervals = {cf.interval_s for cf in found.values()}
    if len(intervals) > 1:
        raise CandleFileError(
            f"files in {data_dir} have different intervals {sorted(intervals)}; replay one interval"
        )
    return found
