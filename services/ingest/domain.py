"""Replay schedule: recorded candles merged into event-time steps. Pure: no Kafka."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from shared.aligner import Step
from shared.candles import CandleFile
from shared.clock import derived_id, from_epoch_s
from shared.messages import CandleClosed, ReplayFinished


def _utc_s(dt: datetime) -> int:
    """Epoch seconds; a naive datetime (an ISO time without offset) is UTC, never the machine's local time."""
    return int((dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp())


def build_schedule(
    files: dict[str, CandleFile],
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    hours: float | None = None,
) -> list[Step]:
    """Steps in time order. `start`/`end` bound open times ([start, end)); `hours` keeps the first N hours."""
    if not files:
        raise ValueError(
            "no candle file matches the configured products; check --data and the profiles' assets"
        )
    interval = next(iter(files.values())).interval_s
    by_time: dict[int, list[CandleClosed]] = defaultdict(list)
    # Each open time's datetimes and correlation id, made once for the candles of every product (immutable).
    stamps: dict[int, tuple[datetime, datetime, str]] = {}
    for product in sorted(files):
        cf = files[product]
        source = f"{cf.source}:{cf.base}-{cf.quote}"
        template: CandleClosed | None = None
        for r in cf.rows:
            t = r.open_time_ms // 1000
            stamp = stamps.get(t)
            if stamp is None:
                stamp = stamps[t] = (from_epoch_s(t), from_epoch_s(t + interval), f"step:{t}")
            fields = {
                "id": derived_id("candle", product, t),
                "event_time": stamp[1],
                "correlation_id": stamp[2],
                "open_time": stamp[0],
                "open": r.open,
                "high": r.high,
                "low": r.low,
                "close": r.close,
                "volume": r.volume,
            }
            if template is None:
                template = CandleClosed(product=product, interval_s=interval, source=source, **fields)
                by_time[t].append(template)
            else:
                # A copy of the product's first (validated) candle with this row's values, unvalidated:
                # read_candle_file checked every row (finite, prices > 0, high/low bounding open/close) and
                # the times are UTC by construction; validating 190k candles again costs more than the rest
                # of loading. tests/unit/test_ingest_domain.py checks the result equals validated construction.
                by_time[t].append(template.model_copy(update=fields))
    times = sorted(by_time)
    lo = _utc_s(start) if start else times[0]
    hi = _utc_s(end) if end else times[-1] + 1
    if hours is not None:
        if not hours > 0 or hours == float("inf"):  # also refuses NaN
            raise ValueError(f"--hours must be positive, got {hours!r}")
        hi = min(hi, lo + int(hours * 3600))
    steps = [Step(t, interval, tuple(by_time[t])) for t in times if lo <= t < hi]
    if not steps:
        raise ValueError(
            f"no candles between {from_epoch_s(lo).isoformat()} and {from_epoch_s(hi).isoformat()}; "
            f"the data spans {from_epoch_s(times[0]).isoformat()} .. {from_epoch_s(times[-1]).isoformat()}"
        )
    return steps


def finished_message(steps: list[Step]) -> ReplayFinished:
    last = steps[-1] if steps else None
    return ReplayFinished(
        id=derived_id("replay-finished", last.time_s if last else 0, len(steps)),
        event_time=from_epoch_s(last.time_s + last.interval_s) if last else from_epoch_s(0),
        correlation_id="replay",
        last_step_time=from_epoch_s(last.time_s) if last else None,
        steps=len(steps),
    )


def resume_point(steps: list[Step], last_watermark_s: int | None) -> int:
    """Index of the first step still to publish after a restart (steps up to the last watermark are complete)."""
    if last_watermark_s is None:
        return 0
    for i, s in enumerate(steps):
        if s.time_s > last_watermark_s:
            return i
    return len(steps)
