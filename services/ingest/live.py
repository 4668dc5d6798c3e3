"""The live ingest: Coinbase -> md.candles (closed candles + a watermark per step), md.trades, md.clock.

Three tasks share one `LiveBook` (services/ingest/live_domain.py, where the finality rule lives):
- the websocket reader: heartbeats feed the exchange clock, trades are published and noted per bucket,
  connection coverage and sequence gaps are noted; it reconnects with exponential back-off and jitter;
- the clock task: REST server time while no heartbeat comes, and an `ExchangeTimeObserved` about once a second;
- the finaliser (the only writer of md.candles): asks REST what the book says is due, publishes every step
  that became final, in order, raises the deadline alert and the stale/fresh transitions.
All timing decisions run on the exchange's clock (`ExchangeClock`), never on the machine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import aiohttp
from pydantic import ValidationError

from services.ingest.coinbase_md import (
    CoinbaseRest,
    Frame,
    MarketDataError,
    ProtocolError,
    parse_frame,
    subscribe_messages,
    ws_products,
)
from services.ingest.live_domain import (
    Bar,
    FeedMonitor,
    FeedState,
    Fetch,
    IngestConfigError,
    IngestError,
    LiveBook,
    StepOut,
    floor_to,
    granularity,
    stale_reason,
)
from services.ingest.metrics import IngestMetrics
from shared.bus import KafkaAccess
from shared.clock import Clock, derived_id, from_epoch_s
from shared.config import INTERVAL_SECONDS, AppConfig
from shared.exchange_clock import ExchangeClock
from shared.kafka import Publisher, read_tail
from shared.messages import (
    CandleClosed,
    ExchangeTimeObserved,
    FeedStateChanged,
    TradeObserved,
    WatermarkAdvanced,
)
from shared.runtime import ServiceSettings
from shared.topics import Topics

log = logging.getLogger("ingest.live")

# A connection that stayed up this long (real s) was healthy: the next reconnect starts from the first delay.
HEALTHY_CONNECTION_S = 5.0
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.25, 30.0
WS_CONNECT_TIMEOUT_S = 10.0
# REST server times taken on start, this far apart (real s): enough span for the clock's rate estimate
# (bootstrap builds the ExchangeClock with min_span_s below the warm-up's span).
CLOCK_WARMUP_SAMPLES, CLOCK_WARMUP_SPACING_S = 6, 0.25
CLOCK_MIN_SPAN_S = 0.6  # a connect that hangs (a black-holed route) is retried like a refused one
# Heartbeats come once a second: a longer pause between frames may have lost trades (a stalled stream keeps
# its sequence numbers), so websocket coverage ends there.
QUIET_BREAK_S = 2.5
# A failing candles request is asked again after 0.25 s, doubling to this (real s).
REST_RETRY_MAX_S = 2.0
READBACK_RECORDS = 2000  # per partition: a few steps of every product, the last watermark and feed state
TRADE_IDS_KEPT = 5000  # per product: more than a snapshot (50) plus what arrives between two re-subscribes


@dataclass(frozen=True)
class LiveOptions:
    products: tuple[str, ...]
    interval_s: int
    rest_url: str
    ws_url: str
    grace_s: float
    deadline_s: float
    poll_interval_s: float
    history_steps: int
    stale_after_s: float
    max_requests_per_s: float

    @classmethod
    def from_config(
        cls: type[LiveOptions],
        app: AppConfig,
        *,
        interval: str | None = None,
        rest_url: str | None = None,
        ws_url: str | None = None,
    ) -> LiveOptions:
        """The settings of `system.market_data`, with the command line's overrides (validated like them)."""
        md = app.system.market_data
        updates = {k: v for k, v in (("rest_url", rest_url), ("ws_url", ws_url)) if v is not None}
        if interval is not None:
            if interval not in INTERVAL_SECONDS:
                raise IngestConfigError(
                    f"--interval {interval!r} is not one of {', '.join(INTERVAL_SECONDS)}"
                )
            updates["interval"] = interval
        if updates:
            try:
                md = md.model_validate(md.model_dump() | updates)
            except ValidationError as err:
                raise IngestConfigError("; ".join(str(e["msg"]) for e in err.errors())) from None
        granularity(md.interval_s)  # refuses an interval Coinbase does not serve
        products = tuple(app.all_products())
        if not products:
            raise IngestConfigError("no enabled profile has products to ingest")
        return cls(
            products=products,
            interval_s=md.interval_s,
            rest_url=md.rest_url,
            ws_url=md.ws_url,
            grace_s=md.grace_s,
            deadline_s=md.deadline_s,
            poll_interval_s=md.poll_interval_s,
            history_steps=md.history_steps,
            stale_after_s=md.stale_after_s,
            max_requests_per_s=md.max_requests_per_s,
        )


@dataclass
class Progress:
    """What md.candles already holds: where to resume, and what not to publish twice."""

    last_step: int | None = None
    interval_s: int | None = None
    after_last: dict[str, Bar] = field(default_factory=dict)  # candles of the step after the last watermark
    after_last_synthetic: set[str] = field(default_factory=set)
    last_close: dict[str, Decimal] = field(default_factory=dict)
    feed_state: FeedState = "fresh"


def _bar(c: CandleClosed) -> Bar:
    return Bar(int(c.open_time.timestamp()), c.open, c.high, c.low, c.close, c.volume)


async def read_progress(bootstrap: KafkaAccess, topic: str, now: Clock) -> Progress:
    """The tail of every partition of md.candles: the last watermark, the candles after it (a step whose
    watermark a crash prevented), each product's last close and the last feed state."""
    candles: dict[tuple[str, int], CandleClosed] = {}
    marks: list[tuple[int, int]] = []
    feed: tuple[float, FeedState] | None = None
    try:
        tail = await read_tail(bootstrap, topic, records=READBACK_RECORDS, now=now)
    except RuntimeError as err:
        raise IngestError(str(err)) from None
    for _, msg in tail:
        if isinstance(msg, CandleClosed):
            candles[(msg.product, int(msg.open_time.timestamp()))] = msg
        elif isinstance(msg, WatermarkAdvanced):
            marks.append((int(msg.step_time.timestamp()), msg.interval_s))
        elif isinstance(msg, FeedStateChanged):
            t = msg.event_time.timestamp()
            if feed is None or t >= feed[0]:
                feed = (t, msg.state)
    out = Progress(feed_state=feed[1] if feed else "fresh")
    if marks:
        out.last_step, out.interval_s = max(marks)
    for (product, t), c in sorted(candles.items(), key=lambda kv: kv[0][1]):
        out.last_close[product] = c.close
        if out.last_step is not None and t == out.last_step + (out.interval_s or 0):
            out.after_last[product] = _bar(c)
            if c.synthetic:
                out.after_last_synthetic.add(product)
    if out.last_step is not None:
        # A close after the last watermark belongs to a step not yet complete: the step before it is the
        # previous close only once that step is published; the after_last candles carry their own close.
        for product, bar in out.after_last.items():
            out.last_close[product] = bar.close
    return out


class LiveIngest:
    def __init__(
        self,
        cfg: AppConfig,
        settings: ServiceSettings,
        options: LiveOptions,
        *,
        wall: Clock,
        clock: ExchangeClock,
        monotonic: Callable[[], float],
        session_factory: Callable[[], aiohttp.ClientSession],
        metrics: IngestMetrics,
        metrics_port: int = 0,
        metrics_addr: str = "127.0.0.1",
    ) -> None:
        self.cfg = cfg
        self.metrics_port = metrics_port
        self.metrics_addr = metrics_addr
        self.settings = settings
        self.opt = options
        self.wall = wall
        self.clock = clock
        self.mono = monotonic
        self.session_factory = session_factory
        self.metrics = metrics
        self.topics = Topics(cfg.system.kafka.namespace)
        self.ws_ids = ws_products(options.products)
        self.book: LiveBook | None = None
        self.monitor = FeedMonitor()
        self.wake = asyncio.Event()
        self.resubscribed = asyncio.Event()
        self.rest_back = asyncio.Event()
        self._rest_failing = False
        self.started_mono = 0.0
        self.last_frame_mono: float | None = None
        self.last_heartbeat_mono: float | None = None
        self.clock_origin: str = "rest"
        self.caught_up_once = False
        self.alerted: set[tuple[str, int]] = set()
        self.started_s = float("inf")
        self.seen_trades: dict[str, OrderedDict[str, None]] = {p: OrderedDict() for p in options.products}
        self.connected = False
        self._trades_subscribed = False  # this connection's market_trades snapshot came: coverage may start
        # Figures a test or an operator reads (also exported as metrics).
        self.lags: list[tuple[float, float]] = []  # (exchange s, real s) from bucket end to its watermark
        self.reconnect_count = 0
        self.gap_count = 0

    # ------------------------------------------------------------------------------------ run
    async def run(self, stop: asyncio.Event) -> int:
        if self.metrics_port:
            self.metrics.serve(self.metrics_port, self.metrics_addr)
        try:
            return await self._run(stop)
        finally:
            self.metrics.close()

    async def _run(self, stop: asyncio.Event) -> int:
        self.started_mono = self.mono()
        self.publisher = Publisher(self.settings.kafka, client_id=f"{self.topics.ns}.ingest")
        await self.publisher.start()
        session = self.session_factory()
        self.rest = CoinbaseRest(
            session,
            self.opt.rest_url,
            max_requests_per_s=self.opt.max_requests_per_s,
            monotonic=self.mono,
            on_error=lambda kind: self.metrics.rest_errors.labels(kind).inc(),
            on_request=lambda what: self.metrics.backfill_requests.labels(what).inc(),
        )
        self.session = session
        tasks: list[asyncio.Task[None]] = []
        try:
            if not await self._sync_clock(stop):
                return 1
            progress = await read_progress(self.settings.kafka, self.topics.candles, self.clock)
            self.book = self._book_from(progress)
            # Buckets whose deadline passed before this start are a backfill, not an overdue bucket: no alert.
            self.started_s = self.clock.epoch_s()
            self.monitor.state = progress.feed_state
            log.info(
                "live ingest of %d products at %ds from %s (%s)",
                len(self.opt.products),
                self.opt.interval_s,
                from_epoch_s(self.book.next_step).isoformat(),
                "resuming"
                if progress.last_step is not None
                else f"first start, {self.opt.history_steps} steps of history",
            )
            tasks = [
                asyncio.create_task(self._ws_loop(stop), name="ingest-ws"),
                asyncio.create_task(self._clock_loop(stop), name="ingest-clock"),
            ]
            await self._finalise_loop(stop, tasks)
            return 0
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await session.close()
            await self.publisher.stop()

    def _book_from(self, progress: Progress) -> LiveBook:
        iv = self.opt.interval_s
        if progress.last_step is not None:
            if progress.interval_s != iv or progress.last_step % iv:
                raise IngestConfigError(
                    f"{self.topics.candles} holds steps of {progress.interval_s}s but the interval is {iv}s; "
                    "use a new namespace to change the interval"
                )
            next_step = progress.last_step + iv
        else:
            next_step = floor_to(self.clock.epoch_s(), iv) - self.opt.history_steps * iv
        return LiveBook(
            self.opt.products,
            iv,
            grace_s=self.opt.grace_s,
            deadline_s=self.opt.deadline_s,
            poll_interval_s=self.opt.poll_interval_s,
            next_step=next_step,
            last_close=progress.last_close,
            already=progress.after_last,
            already_synthetic=progress.after_last_synthetic,
        )

    async def _sync_clock(self, stop: asyncio.Event) -> bool:
        """The exchange's time and rate, from REST, before anything is timed on it or published on md.clock:
        a few server times a moment apart give the rate (1 against Coinbase, N against a peer N times
        faster), which heartbeats (one a second) would take seconds to tell."""
        delay = BACKOFF_FIRST_S
        taken = 0
        while not stop.is_set():
            try:
                await self._observe_rest_time()
                taken += 1
                if taken >= CLOCK_WARMUP_SAMPLES:
                    log.info(
                        "exchange clock: rate %.3f, skew %.3fs",
                        self.clock.rate,
                        self.clock.skew_s(self.wall()),
                    )
                    return True
                await _wait(stop, CLOCK_WARMUP_SPACING_S)
                continue
            except MarketDataError as err:
                self.metrics.rest_errors.labels(err.kind).inc()
                log.warning("server time: %s; retrying in %.1fs", err, delay)
            await _wait(stop, delay)
            delay = min(BACKOFF_MAX_S, delay * 2)
        return False

    async def _observe_rest_time(self) -> None:
        t0 = self.mono()
        try:
            t = await self.rest.server_time()
        except MarketDataError:
            self._rest_failing = True
            raise
        self._rest_answered()
        # The answer was made somewhere during the request: its middle is the best local time for it.
        t1 = self.mono()
        self.clock.observe(from_epoch_s(t), at=(t0 + t1) / 2, spread=(t1 - t0) / 2)
        self.clock_origin = "rest"

    # ------------------------------------------------------------------------------------ finaliser
    async def _finalise_loop(self, stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
        assert self.book is not None
        book = self.book
        fail_delay = 0.0
        while not stop.is_set():
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            now = self.clock.epoch_s()
            await self._publish_ready(now)
            self._alert_overdue(now)
            await self._check_stale(now)
            fetches = book.fetches(now)
            for f in fetches:
                if stop.is_set():
                    return
                if not await self._fetch(f):
                    fail_delay = min(REST_RETRY_MAX_S, max(0.25, fail_delay * 2))
                    break
                fail_delay = 0.0
                await self._publish_ready(self.clock.epoch_s())
            if fail_delay:
                # REST failing (an outage): ask again after a short back-off, or at once when the websocket
                # comes back (its snapshot wakes us).
                self.resubscribed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.resubscribed.wait(), timeout=fail_delay)
                continue
            if not fetches:
                now = self.clock.epoch_s()
                real = self.clock.real_seconds(book.next_wake(now) - now)
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=min(0.25, max(0.005, real)))

    async def _fetch(self, f: Fetch) -> bool:
        assert self.book is not None
        asked = self.clock.epoch_s()
        try:
            bars = await self.rest.candles(f.product, f.start_s, f.end_s, self.opt.interval_s)
        except MarketDataError as err:
            if err.kind != "http_429":  # the client counts each 429 it backs off from
                self.metrics.rest_errors.labels(err.kind).inc()
            log.warning("candles %s [%d, %d): %s", f.product, f.start_s, f.end_s, err)
            self._rest_failing = True
            return False
        self._rest_answered()
        self.book.on_answer(f, bars, asked)
        return True

    def _rest_answered(self) -> None:
        if self._rest_failing:
            self._rest_failing = False
            self.rest_back.set()

    async def _publish_ready(self, now: float) -> None:
        assert self.book is not None
        steps = self.book.ready(now)
        for step in steps:
            await self._publish_step(step, now)

    async def _publish_step(self, step: StepOut, now: float) -> None:
        iv = self.opt.interval_s
        t = step.time_s
        open_time, close_time, corr = from_epoch_s(t), from_epoch_s(t + iv), f"step:{t}"
        for c in step.candles:
            if not c.publish:
                continue
            b = c.bar
            msg = CandleClosed(
                id=derived_id("candle", c.product, t),
                event_time=close_time,
                correlation_id=corr,
                product=c.product,
                interval_s=iv,
                open_time=open_time,
                open=b.open,
                high=b.high,
                low=b.low,
                close=b.close,
                volume=b.volume,
                source="coinbase",
                synthetic=c.synthetic,
                trade_path=c.path,
            )
            await self.publisher.send(self.topics.candles, msg, key=c.product)
            self.metrics.candles.labels(str(c.synthetic).lower()).inc()
        # Acknowledged before the watermark, and the watermark before the next step's candles: batches of
        # different partitions are delivered independently, so without these a SIGKILL mid-backfill could leave
        # a watermark on the topic whose candles were lost. With them, a restart reads back exactly which
        # step is complete and which candles of the next one are already there.
        await self.publisher.flush()
        if step.missing:
            self.metrics.missing.inc(len(step.missing))
            log.error(
                "ALERT missing buckets: step %s goes out without %s (no final REST answer %gs after its end)",
                open_time.isoformat(),
                ", ".join(step.missing),
                self.opt.deadline_s,
            )
        wm = WatermarkAdvanced(
            id=derived_id("wm", t),
            event_time=close_time,
            correlation_id=corr,
            step_time=open_time,
            interval_s=iv,
            published_at=from_epoch_s(now),
            missing=list(step.missing),
        )
        await self.publisher.send_to_all_partitions(self.topics.candles, wm)
        await self.publisher.flush()
        lag = now - (t + iv)
        self.metrics.steps.inc()
        self.metrics.finalisation_lag.observe(lag)
        self.lags.append((lag, self.clock.real_seconds(lag)))
        del self.lags[:-10_000]

    def _alert_overdue(self, now: float) -> None:
        assert self.book is not None
        s = self.book.next_step
        if s + self.opt.interval_s + self.opt.deadline_s < self.started_s:
            return  # history this start is catching up on (a first start, or the gap of a restart)
        for p in self.book.overdue(now):
            if (p, s) not in self.alerted:
                self.alerted.add((p, s))
                log.error(
                    "ALERT bucket %s of %s is not final %gs after its end; asking REST again",
                    from_epoch_s(s).isoformat(),
                    p,
                    self.opt.deadline_s,
                )
        if len(self.alerted) > 1000:
            self.alerted = {a for a in self.alerted if a[1] >= s}

    async def _check_stale(self, now: float) -> None:
        assert self.book is not None
        iv = self.opt.interval_s
        lag = now - self.book.next_step
        if lag <= iv + self.opt.deadline_s:
            self.caught_up_once = True
        ref = self.last_frame_mono if self.last_frame_mono is not None else self.started_mono
        age = self.mono() - ref
        self.metrics.feed_age.set(age)
        reason = stale_reason(
            frame_age_s=age,
            stale_after_s=self.opt.stale_after_s,
            now=now,
            next_step=self.book.next_step,
            interval_s=iv,
            deadline_s=self.opt.deadline_s,
            caught_up_once=self.caught_up_once,
        )
        change = self.monitor.decide(reason)
        if change is None:
            return
        state, why = change
        self.metrics.feed_stale.set(1 if state == "stale" else 0)
        if state == "stale":
            log.warning("ALERT feed stale: %s", why)
        else:
            log.info("feed fresh again: %s", why)
        msg = FeedStateChanged(
            id=derived_id("feed", state, round(now * 1000)),
            event_time=from_epoch_s(now),
            correlation_id="feed",
            state=state,
            reason=why[:500],
            last_frame_age_s=round(age, 3),
            last_step_time=from_epoch_s(self.book.next_step - iv),
        )
        await self.publisher.send_to_all_partitions(self.topics.candles, msg)
        await self.publisher.flush()

    # ------------------------------------------------------------------------------------ clock
    async def _clock_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            hb = self.last_heartbeat_mono
            if hb is None or self.mono() - hb > 3.0:
                # No heartbeat lately: keep the clock from REST (also the cross-check during an outage).
                try:
                    await self._observe_rest_time()
                except MarketDataError as err:
                    self.metrics.rest_errors.labels(err.kind).inc()
            if self.clock.synced:
                now = self.clock()
                skew = self.clock.skew_s(self.wall())
                self.metrics.clock_skew.set(skew)
                self.metrics.clock_rate.set(self.clock.rate)
                await self.publisher.send(
                    self.topics.clock,
                    ExchangeTimeObserved(
                        id=derived_id("clock", self.settings.instance, round(now.timestamp() * 1000)),
                        event_time=now,
                        correlation_id="clock",
                        rate=self.clock.rate,
                        skew_s=skew,
                        origin="heartbeat" if self.clock_origin == "heartbeat" else "rest",
                    ),
                    key="clock",
                )
            await _wait(stop, 1.0)

    # ------------------------------------------------------------------------------------ websocket
    async def _ws_loop(self, stop: asyncio.Event) -> None:
        backoff = BACKOFF_FIRST_S
        while not stop.is_set():
            opened = self.mono()
            self._trades_subscribed = False
            try:
                async with asyncio.timeout(WS_CONNECT_TIMEOUT_S):
                    ws = await self.session.ws_connect(
                        self.opt.ws_url, autoping=True, heartbeat=None, max_msg_size=16 * 1024 * 1024
                    )
                async with ws:
                    for m in subscribe_messages(list(self.ws_ids)):
                        await ws.send_str(m)
                    self.connected = True
                    await self._read_ws(ws, stop)
            except (aiohttp.ClientError, OSError, TimeoutError, MarketDataError) as err:
                log.warning("websocket %s: %s: %s", self.opt.ws_url, type(err).__name__, err)
            finally:
                self.connected = False
                if self.book is not None and self.clock.synced:
                    self.book.ws_down(self.clock.epoch_s())
            if stop.is_set():
                return
            if self.mono() - opened >= HEALTHY_CONNECTION_S:
                backoff = BACKOFF_FIRST_S
            delay = backoff * random.uniform(1.0, 1.5)  # jitter: many clients must not reconnect together
            backoff = min(BACKOFF_MAX_S, backoff * 2)
            self.reconnect_count += 1
            self.metrics.reconnects.inc()
            log.info("websocket closed; reconnecting in %.2fs", delay)
            self.rest_back.clear()
            await _wait(stop, BACKOFF_FIRST_S)  # never more than a few connects a second
            with contextlib.suppress(TimeoutError):
                # REST answering again after failures says the exchange is back: reconnect now, not after the
                # back-off grown during the outage (at most once per outage, so no reconnect storm).
                await asyncio.wait_for(self.rest_back.wait(), timeout=max(0.0, delay - BACKOFF_FIRST_S))
            if self.rest_back.is_set():
                backoff = BACKOFF_FIRST_S

    async def _read_ws(self, ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> None:
        assert self.book is not None
        book = self.book
        seq: int | None = None
        prev_mono: float | None = None
        prev_ex: float | None = None
        # No frame for this long (real s): the stream is stalled; reconnect (heartbeats come every second).
        silence_s = max(self.opt.stale_after_s * 1.5, QUIET_BREAK_S + 0.5)
        while not stop.is_set():
            try:
                msg = await ws.receive(timeout=silence_s)
            except TimeoutError:
                log.warning("websocket: no frame for %.1fs; reconnecting", silence_s)
                self.metrics.rest_errors.labels("ws_silence").inc()
                return
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                log.warning("websocket closed by the server (code %s)", ws.close_code)
                return
            if msg.type == aiohttp.WSMsgType.ERROR:
                log.warning("websocket error: %s", ws.exception())
                return
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            now_mono = self.mono()
            self.last_frame_mono = now_mono
            now_ex = self.clock.epoch_s()
            if prev_mono is not None and prev_ex is not None and now_mono - prev_mono > QUIET_BREAK_S:
                book.ws_down(prev_ex)  # a stalled stream may have lost trades without a sequence gap
            prev_mono, prev_ex = now_mono, now_ex
            try:
                frame = parse_frame(msg.data)
            except ProtocolError as err:
                self.metrics.rest_errors.labels(err.kind).inc()
                log.warning("websocket: %s", err)
                book.ws_down(now_ex)  # what it held (trades?) is unknown
                continue
            if frame.seq is not None:
                if seq is not None and frame.seq != seq + 1:
                    self.gap_count += 1
                    self.metrics.sequence_gaps.inc()
                    log.warning("websocket sequence gap: %d after %d; checking REST", frame.seq, seq)
                    book.ws_down(now_ex)
                    book.poll_now()
                    self.wake.set()
                seq = frame.seq
            await self._on_frame(frame, now_mono, now_ex)

    async def _on_frame(self, frame: Frame, now_mono: float, now_ex: float) -> None:
        assert self.book is not None
        book = self.book
        if frame.kind == "error":
            raise MarketDataError("ws_error", f"websocket error frame: {frame.message!r}")
        if frame.kind == "heartbeat" and frame.current_time_s is not None:
            self.clock.observe(from_epoch_s(frame.current_time_s), at=now_mono)
            self.clock_origin = "heartbeat"
            self.last_heartbeat_mono = now_mono
            if book.coverage.open_since is None and self._trades_subscribed:
                book.ws_up(self.clock.epoch_s())
            return
        if frame.kind != "trades":
            return
        if frame.snapshot:
            # Subscribed: from here on every trade of our products comes to us (until a gap or a close).
            self._trades_subscribed = True
            book.ws_up(now_ex)
            book.poll_now()  # a reconnect: check REST for what the outage may have hidden
            self.wake.set()
            self.resubscribed.set()
        elif book.coverage.open_since is None and self._trades_subscribed:
            book.ws_up(now_ex)
        for t in frame.trades:
            product = self.ws_ids.get(t.ws_product)
            if product is None:
                continue
            seen = self.seen_trades[product]
            if t.trade_id in seen:
                continue
            seen[t.trade_id] = None
            if len(seen) > TRADE_IDS_KEPT:
                seen.popitem(last=False)
            if not book.on_trade(product, t.time_s, t.price) and not frame.snapshot:
                log.warning(
                    "trade %s of %s at %s came after its bucket was published", t.trade_id, product, t.time_s
                )
            await self.publisher.send(
                self.topics.trades,
                TradeObserved(
                    id=derived_id("trade", product, t.trade_id),
                    event_time=from_epoch_s(t.time_s),
                    correlation_id=f"trade:{product}",
                    product=product,
                    trade_id=t.trade_id,
                    price=t.price,
                    size=t.size,
                    side="buy" if t.side == "buy" else "sell" if t.side == "sell" else None,
                ),
                key=product,
            )
            self.metrics.trades.inc()
        self.wake.set()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, seconds))
