"""The live feed's decisions, pure: which buckets are final, which are empty, which are missing, what to ask
REST next, and whether the feed is stale. No Kafka, no network, no clock of its own: every time is an
exchange time (epoch seconds) given by the caller. The rule is written out in docs/ingest.md.

A bucket [s, s+I) of product p is final once the exchange's time >= s+I+grace AND a REST answer obtained at
exchange time >= s+I+grace covers it:
- the answer holds the bucket: its values;
- it does not, no trade of p inside it came on the websocket, and either REST holds a later bucket of p or the
  websocket was connected without a gap for the whole bucket: empty, a synthetic candle flat at p's
  previous close with volume 0;
- otherwise (a late bucket, or no way to tell) it is asked again every poll interval; once an answer obtained
  at or after s+I+deadline still leaves it undecided, it is *missing* and its step goes out without it.
Steps go out in order, each once every product's bucket of it is final or missing.

A final bucket from REST carries its trades' path (`TradePath`: the successive new lows and new highs) when the
websocket was connected without a gap for the whole bucket and the trades' extremes are the candle's low and
high; otherwise none (shared/protective.py then reads the candle's range).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

# Coinbase Advanced Trade REST granularities by interval seconds.
GRANULARITY: dict[int, str] = {
    60: "ONE_MINUTE",
    300: "FIVE_MINUTE",
    900: "FIFTEEN_MINUTE",
    1800: "THIRTY_MINUTE",
    3600: "ONE_HOUR",
    7200: "TWO_HOUR",
    21600: "SIX_HOUR",
    86400: "ONE_DAY",
}
# More than 300 buckets a request silently loses data on Coinbase (notes/coinbase-market-data.md).
MAX_BUCKETS_PER_REQUEST = 300
# Buckets asked before the first step when a product's previous close is unknown (a synthetic empty candle
# needs it): a first start, or a restart whose read-back did not reach the product's last candle.
SEED_BUCKETS = 60


class IngestError(Exception):
    """Base of the ingest's own errors."""


class IngestConfigError(IngestError):
    """A setting the live ingest cannot run with (the text names the value)."""


def granularity(interval_s: int) -> str:
    try:
        return GRANULARITY[interval_s]
    except KeyError:
        raise IngestConfigError(
            f"interval {interval_s}s has no Coinbase candle granularity; use one of "
            f"{', '.join(f'{k}s' for k in GRANULARITY)}"
        ) from None


def floor_to(t: float, interval_s: int) -> int:
    return int(math.floor(t / interval_s)) * interval_s


@dataclass(frozen=True)
class Bar:
    """One bucket's values (validated by the parser: finite, prices > 0, high/low bounding open/close)."""

    start_s: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal


@dataclass(frozen=True)
class Fetch:
    """A REST candles request: product, [start_s, end_s) (at most MAX_BUCKETS_PER_REQUEST buckets)."""

    product: str
    start_s: int
    end_s: int


@dataclass
class TradePath:
    """One bucket's trades reduced to its new lows and new highs in time order: the first trade at or below any
    level is a new low (every earlier one was above it), so these answer where a resting stop or take profit was
    reached, in a few points instead of every trade. Trades may come out of order (a snapshot after a
    reconnect); a trade that is no new low never becomes one by later inserts, so the lists stay exact.

    At one millisecond the worse trade for a stop (the lower) and for a take profit (the higher) is taken to
    have come first: the conservative reading."""

    lows: list[tuple[int, Decimal]] = field(default_factory=list)  # (t_ms, price), prices strictly falling
    neg_highs: list[tuple[int, Decimal]] = field(default_factory=list)  # (t_ms, -price): the highs as lows

    def add(self, t_ms: int, price: Decimal) -> None:
        _insert_low(self.lows, (t_ms, price))
        _insert_low(self.neg_highs, (t_ms, -price))

    def points(self) -> tuple[tuple[int, Decimal], ...]:
        """Lows and highs merged in time order, lows first at one time (the stop decides a tie)."""
        merged = sorted({(t, 0, p) for t, p in self.lows} | {(t, 1, -n) for t, n in self.neg_highs})
        out: list[tuple[int, Decimal]] = []
        for t, _, p in merged:
            if not out or out[-1] != (t, p):
                out.append((t, p))
        return tuple(out)


def _insert_low(records: list[tuple[int, Decimal]], point: tuple[int, Decimal]) -> None:
    """Insert `point` into records ordered by (time, price), each lower than every earlier trade, if it is one."""
    i = bisect.bisect_left(records, point)
    if i > 0 and records[i - 1][1] <= point[1]:
        return  # an earlier trade was as low: this one reached nothing new
    j = i
    while j < len(records) and records[j][1] >= point[1]:
        j += 1  # later records are no longer new lows: this trade came first
    records[i:j] = [point]


@dataclass(frozen=True)
class Final:
    product: str
    bar: Bar
    synthetic: bool
    publish: bool = True  # False: already on the topic (read back after a restart); counted, not sent again
    path: tuple[tuple[int, Decimal], ...] | None = None  # the bucket's TradePath.points() when complete


@dataclass(frozen=True)
class StepOut:
    time_s: int
    candles: tuple[Final, ...]  # sorted by product
    missing: tuple[str, ...]


class _Missing:
    pass


MISSING = _Missing()
Decision = Final | _Missing | None


@dataclass
class Coverage:
    """When the websocket was connected without a gap, in exchange time: [start, end] intervals, the last one
    possibly still open. A bucket inside one interval had every one of its trades shown to us."""

    closed: list[tuple[float, float]] = field(default_factory=list)
    open_since: float | None = None

    def up(self, t: float) -> None:
        if self.open_since is None:
            self.open_since = t

    def down(self, t: float) -> None:
        if self.open_since is not None:
            if t > self.open_since:
                self.closed.append((self.open_since, t))
            self.open_since = None

    def covers(self, a: float, b: float) -> bool:
        if self.open_since is not None and self.open_since <= a:
            return True
        return any(x <= a and y >= b for x, y in self.closed)

    def prune(self, before: float) -> None:
        self.closed = [(x, y) for x, y in self.closed if y >= before]


@dataclass
class ProductBook:
    rows: dict[int, tuple[Bar, float]] = field(default_factory=dict)  # start -> (bar, answered at)
    covered: set[int] = field(default_factory=set)  # covered by an answer obtained after end + grace
    asked_past_deadline: set[int] = field(default_factory=set)  # ... obtained after end + deadline
    trades: set[int] = field(default_factory=set)  # buckets in which the websocket showed a trade
    paths: dict[int, TradePath] = field(default_factory=dict)  # bucket start -> its trades' path
    latest_row: int | None = None  # the newest bucket start REST ever returned
    last_close: Decimal | None = None
    seeded: bool = False  # last_close is known, or REST was asked for the buckets before the first step
    last_poll: float | None = None
    asked_to: int = 0  # end of the last range asked: a page further on is asked at once (backfill)
    asked_edge: bool = False  # ... and whether it reached the bucket in progress


class LiveBook:
    """Per-product REST answers and websocket evidence, and the next step to publish."""

    def __init__(
        self,
        products: Iterable[str],
        interval_s: int,
        *,
        grace_s: float,
        deadline_s: float,
        poll_interval_s: float,
        next_step: int,
        last_close: Mapping[str, Decimal] | None = None,
        already: Mapping[str, Bar] | None = None,
        already_synthetic: Iterable[str] = (),
    ) -> None:
        if next_step % interval_s:
            raise IngestError(f"first step {next_step} is not aligned to the interval {interval_s}s")
        self.products = sorted(set(products))
        if not self.products:
            raise IngestConfigError("no products: enable a profile with trading pairs")
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.deadline_s = max(deadline_s, grace_s)
        self.poll_interval_s = poll_interval_s
        self.next_step = next_step
        self.coverage = Coverage()
        self.books = {p: ProductBook() for p in self.products}
        for p, c in (last_close or {}).items():
            if p in self.books:
                self.books[p].last_close = c
                self.books[p].seeded = True
        # Candles of `next_step` already on the topic (a crash between a step's candles and its watermark).
        synth = set(already_synthetic)
        self.prefilled: dict[str, Final] = {
            p: Final(p, bar, p in synth, publish=False)
            for p, bar in (already or {}).items()
            if p in self.books and bar.start_s == next_step
        }

    # ------------------------------------------------------------------------------------ evidence
    def on_answer(self, f: Fetch, bars: Iterable[Bar], asked_at: float) -> None:
        """A REST answer for `f`, asked at exchange time `asked_at` (the send time: the answer is at least
        that recent). Only a whole, valid answer counts: the caller drops a page with a malformed row."""
        b = self.books[f.product]
        iv = self.interval_s
        bars = list(bars)
        for bar in bars:
            if bar.start_s % iv:
                continue  # not a bucket of our interval: ignored rather than trusted
            old = b.rows.get(bar.start_s)
            if old is None or old[1] <= asked_at:
                b.rows[bar.start_s] = (bar, asked_at)
            if b.latest_row is None or bar.start_s > b.latest_row:
                b.latest_row = bar.start_s
        # Only an answer reaching the bucket in progress can show that nothing later exists yet: a backfill
        # page ending in an empty bucket says nothing about it, the next page will.
        to_the_edge = f.end_s > floor_to(asked_at, iv)
        lo = max(f.start_s, self.next_step - iv)
        for s in range(lo - lo % iv, f.end_s, iv):
            if s < f.start_s or s + iv > f.end_s:
                continue
            if asked_at >= s + iv + self.grace_s:
                b.covered.add(s)
            if to_the_edge and asked_at >= s + iv + self.deadline_s:
                b.asked_past_deadline.add(s)
        if not b.seeded and f.start_s < self.next_step:
            before = [bar for bar in bars if bar.start_s < self.next_step]
            if before:
                b.last_close = max(before, key=lambda x: x.start_s).close
            b.seeded = True
        b.last_poll = asked_at if b.last_poll is None else max(b.last_poll, asked_at)
        b.asked_to = f.end_s
        b.asked_edge = to_the_edge

    def on_trade(self, product: str, t: float, price: Decimal | None = None) -> bool:
        """A websocket trade of `product` at exchange time `t`; False when its bucket was already decided."""
        b = self.books.get(product)
        if b is None:
            return True
        s = floor_to(t, self.interval_s)
        if s < self.next_step:
            return False
        b.trades.add(s)
        if price is not None:
            # Via whole microseconds (the feed's precision), so float noise never moves a trade across a millisecond.
            t_ms = min(round(t * 1_000_000) // 1000, (s + self.interval_s) * 1000 - 1)
            b.paths.setdefault(s, TradePath()).add(t_ms, price)
        return True

    def _path(self, b: ProductBook, s: int, bar: Bar) -> tuple[tuple[int, Decimal], ...] | None:
        """The bucket's trade path when it is whole: the websocket saw the whole bucket and its trades reach
        exactly the candle's low and high (REST and the trades tell the same story)."""
        path = b.paths.get(s)
        if path is None or not self.coverage.covers(s, s + self.interval_s):
            return None
        points = path.points()
        prices = [p for _, p in points]
        if min(prices) != bar.low or max(prices) != bar.high:
            return None
        return points

    def ws_up(self, t: float) -> None:
        self.coverage.up(t)

    def ws_down(self, t: float) -> None:
        """The connection closed, or lost frames (a sequence gap, a silence): coverage ends at `t`."""
        self.coverage.down(t)

    def poll_now(self) -> None:
        """After a reconnect or a gap: ask REST again at once, whatever the poll interval says."""
        for b in self.books.values():
            b.last_poll = None

    # ------------------------------------------------------------------------------------ decisions
    def decide(self, product: str, s: int) -> Decision:
        """Final, MISSING, or None (not yet: ask again)."""
        pre = self.prefilled.get(product) if s == self.next_step else None
        if pre is not None:
            return pre
        b = self.books[product]
        iv = self.interval_s
        if s in b.covered:
            row = b.rows.get(s)
            if row is not None and row[1] >= s + iv + self.grace_s:
                return Final(product, row[0], synthetic=False, path=self._path(b, s, row[0]))
            no_trade = s not in b.trades
            later = b.latest_row is not None and b.latest_row > s
            if no_trade and b.last_close is not None and (later or self.coverage.covers(s, s + iv)):
                c = b.last_close
                return Final(product, Bar(s, c, c, c, c, Decimal(0)), synthetic=True)
        if s in b.asked_past_deadline:
            return MISSING
        return None

    def ready(self, now: float) -> list[StepOut]:
        """Every step that can go out at exchange time `now`, in order; advances `next_step` past them."""
        out: list[StepOut] = []
        iv = self.interval_s
        while now >= self.next_step + iv + self.grace_s:
            s = self.next_step
            finals: list[Final] = []
            missing: list[str] = []
            for p in self.products:
                d = self.decide(p, s)
                if d is None:
                    return out
                if isinstance(d, Final):
                    finals.append(d)
                else:
                    missing.append(p)
            for f in finals:
                self.books[f.product].last_close = f.bar.close
            out.append(StepOut(s, tuple(finals), tuple(missing)))
            self._advance()
        return out

    def _advance(self) -> None:
        self.next_step += self.interval_s
        self.prefilled = {}
        keep = self.next_step - self.interval_s
        for b in self.books.values():
            b.rows = {s: r for s, r in b.rows.items() if s >= keep}
            b.covered = {s for s in b.covered if s >= self.next_step}
            b.asked_past_deadline = {s for s in b.asked_past_deadline if s >= self.next_step}
            b.trades = {s for s in b.trades if s >= self.next_step}
            b.paths = {s: p for s, p in b.paths.items() if s >= self.next_step}
        self.coverage.prune(self.next_step)

    def fetches(self, now: float) -> list[Fetch]:
        """The REST requests due at `now`: for each product whose bucket of the next closed step is not
        decided, from that step (or a little before it, to learn the previous close) for at most 300
        buckets, up to and including the bucket in progress (a later bucket tells an empty one)."""
        iv = self.interval_s
        s = self.next_step
        if now < s + iv + self.grace_s:
            return []
        end_cap = floor_to(now, iv) + iv
        out = []
        for p in self.products:
            b = self.books[p]
            if self.decide(p, s) is not None:
                continue
            # Asked lately, and that answer could tell (it held a bucket after s, or reached the live edge):
            # wait for the poll interval. Otherwise (a backfill page ended at s) ask the next page now.
            could_tell = s + iv < b.asked_to or (s + iv == b.asked_to and b.asked_edge)
            if b.last_poll is not None and now - b.last_poll < self.poll_interval_s and could_tell:
                continue
            start = s if b.seeded else s - SEED_BUCKETS * iv
            out.append(Fetch(p, start, min(end_cap, start + MAX_BUCKETS_PER_REQUEST * iv)))
        return out

    def next_wake(self, now: float) -> float:
        """The exchange time something may next change without new evidence: the next step's end + grace,
        a re-poll, or a deadline."""
        iv = self.interval_s
        s = self.next_step
        times = [s + iv + self.grace_s]
        if now >= times[0]:
            polls = [
                b.last_poll + self.poll_interval_s for b in self.books.values() if b.last_poll is not None
            ]
            times = [min(polls, default=now), s + iv + self.deadline_s]
        return max(now, min(times))

    def overdue(self, now: float) -> list[str]:
        """Products whose bucket of the next step is past its deadline and still undecided (the alert)."""
        s = self.next_step
        if now < s + self.interval_s + self.deadline_s:
            return []
        return [p for p in self.products if not isinstance(self.decide(p, s), Final)]


# ---------------------------------------------------------------------------------------- staleness
FeedState = Literal["fresh", "stale"]


def stale_reason(
    *,
    frame_age_s: float | None,
    stale_after_s: float,
    now: float,
    next_step: int,
    interval_s: int,
    deadline_s: float,
    caught_up_once: bool,
) -> str | None:
    """Why the feed is stale now, or None. `frame_age_s` is real seconds since the last websocket frame (None:
    never had one); `next_step` is the end of the newest published step. The step test waits for the first
    catch-up, so a start with history to publish is not reported stale."""
    if frame_age_s is None or frame_age_s > stale_after_s:
        seen = (
            "no websocket frame yet" if frame_age_s is None else f"no websocket frame for {frame_age_s:.1f}s"
        )
        return f"{seen} (stale_after_s {stale_after_s:g})"
    lag = now - next_step
    if caught_up_once and lag > interval_s + deadline_s:
        return f"the newest published step ended {lag:.0f}s ago (more than interval {interval_s}s + deadline {deadline_s:g}s)"
    return None


@dataclass
class FeedMonitor:
    """The feed's published state; `decide` returns the transition to publish, if any."""

    state: FeedState = "fresh"

    def decide(self, reason: str | None) -> tuple[FeedState, str] | None:
        if reason is not None and self.state == "fresh":
            self.state = "stale"
            return ("stale", reason)
        if reason is None and self.state == "stale":
            self.state = "fresh"
            return ("fresh", "websocket frames flow and the watermark is current")
        return None
