"""Event-time alignment of market data.

Candles of one step (one open time) may arrive over several partitions in any interleaving. The ingest
sends a watermark to every partition after each step; a consumer releases step T only when every partition
it reads has a watermark >= T. Consumers therefore see complete steps, in time order, whatever the
partitioning and however the broker interleaves partitions: the basis of deterministic replay.
Duplicated candles (redelivery) are dropped by (product, open_time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import FunctionType
from typing import Any

# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from shared.clock import derived_id, from_epoch_s
from shared.messages import CandleClosed, ReplayFinished, WatermarkAdvanced
from shared.native import reduce_frozen


def _probe() -> None:
    """Nothing: its type tells whether this module runs compiled (see _NATIVE)."""


# Whether mypyc compiled this module: Step.__init__ then stores its fields directly (a compiled class's own slots;
# `frozen` guards setattr from outside, which still raises), else through object.__setattr__ as the dataclass's
# generated __init__ does (services/strategy/signals.py does the same for Bar and Signal).
_NATIVE = not isinstance(_probe, FunctionType)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True, init=False)
class Step:
    """One event-time step of market data: every candle opening at `time_s`. What the aligner releases to a
    consumer, and what a replay schedule is made of (services/ingest/domain.py builds them from recorded
    candles; the ingest publishes each one's candles, then its `watermark()`)."""

    time_s: int
    interval_s: int
    candles: tuple[CandleClosed, ...]  # sorted by product
    # Live feed: the exchange's time at which the step's watermark went out (None in a replay). A step published
    # long after its close is history (a warm-up or a backfill after an outage), not the market of now.
    published_s: float | None = None

    def __init__(
        self,
        time_s: int,
        interval_s: int,
        candles: tuple[CandleClosed, ...],
        published_s: float | None = None,
    ) -> None:
        # The dataclass's own __init__, written here so that mypyc compiles it (a step per candle interval).
        if _NATIVE:
            self.time_s = time_s  # type: ignore[misc]
            self.interval_s = interval_s  # type: ignore[misc]
            self.candles = candles  # type: ignore[misc]
            self.published_s = published_s  # type: ignore[misc]
        else:
            _set = object.__setattr__
            _set(self, "time_s", time_s)
            _set(self, "interval_s", interval_s)
            _set(self, "candles", candles)
            _set(self, "published_s", published_s)

    @property
    def close_s(self) -> int:
        return self.time_s + self.interval_s

    def watermark(self) -> WatermarkAdvanced:
        """The replay's watermark of this step: the same id and fields for the same step on every run and every
        partition (no `published_at`, no `missing`: those are the live feed's)."""
        t = from_epoch_s(self.time_s)
        return WatermarkAdvanced(
            id=derived_id("wm", self.time_s),
            event_time=from_epoch_s(self.time_s + self.interval_s),
            correlation_id=f"step:{self.time_s}",
            step_time=t,
            interval_s=self.interval_s,
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


# float(open), float(high), float(low), float(close), float(volume) of one candle.
CandleFloats = tuple[float, float, float, float, float]

# The last candles converted (see candle_floats): the candle tuple itself (held, so its identity is not reused)
# and their floats.
_floats_of: tuple[tuple[CandleClosed, ...], list[CandleFloats]] | None = None


def candle_floats(candles: tuple[CandleClosed, ...]) -> list[CandleFloats]:
    """Each candle's prices and volume as floats (`float(Decimal)`, which CPython makes through a string), in the
    candles' order. The result for the last tuple asked for is kept: in the backtest one step's candles (the
    same tuple object) reach the registry and then the strategies' indicators, which convert them once between
    them. Read only (the list is shared by its callers). Candles are frozen, so the tuple's floats never change."""
    global _floats_of
    memo = _floats_of
    if memo is not None and memo[0] is candles:
        return memo[1]
    out = [(float(c.open), float(c.high), float(c.low), float(c.close), float(c.volume)) for c in candles]
    _floats_of = (candles, out)
    return out


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class Aligner:
    partitions: frozenset[int]
    _pending: dict[int, dict[str, CandleClosed]] = field(default_factory=dict)
    _marks: dict[int, int] = field(default_factory=dict)
    _finished: set[int] = field(default_factory=set)
    _released_upto: int | None = None
    _interval: dict[int, int] = field(default_factory=dict)
    _published: dict[int, float] = field(default_factory=dict)

    def add(self, partition: int, msg: CandleClosed | WatermarkAdvanced | ReplayFinished) -> list[Step]:
        """Feed one market-data message; returns the steps it completes, oldest first."""
        if isinstance(msg, CandleClosed):
            t = int(msg.open_time.timestamp())
            if self._released_upto is not None and t <= self._released_upto:
                return []  # a redelivered candle of a step already released
            self._pending.setdefault(t, {})[msg.product] = msg
            self._interval[t] = msg.interval_s
            return []
        if isinstance(msg, WatermarkAdvanced):
            t = int(msg.step_time.timestamp())
            self._marks[partition] = max(t, self._marks.get(partition, t))
            if t in self._pending:  # a step without candles (or already released) leaves nothing behind
                self._interval.setdefault(t, msg.interval_s)
                if msg.published_at is not None:
                    # The first partition's copy: every copy of one watermark carries the same time.
                    self._published.setdefault(t, msg.published_at.timestamp())
        else:
            self._finished.add(partition)
        return self._release()

    @property
    def finished(self) -> bool:
        return self._finished >= self.partitions and not self._pending

    def _low_watermark(self) -> int | None:
        marks = []
        for p in self.partitions:
            if p in self._finished:
                continue
            if p not in self._marks:
                return None
            marks.append(self._marks[p])
        if not marks:
            return max(self._pending, default=None)  # every partition finished: release all
        return min(marks)

    def _release(self) -> list[Step]:
        low = self._low_watermark()
        if low is None:
            return []
        ready = sorted(t for t in self._pending if t <= low)
        steps = []
        for t in ready:
            candles = self._pending.pop(t)
            steps.append(
                Step(
                    t,
                    self._interval.pop(t, 0),
                    tuple(candles[p] for p in sorted(candles)),
                    self._published.pop(t, None),
                )
            )
            self._released_upto = t
        return steps
