"""The exchange's clock, as the feed reports it: every live decision (rotation, de-sync waits, order timeouts)
runs on it, never on the machine's clock.

Observations (a heartbeat's `current_time`, REST server time, or an `ExchangeTimeObserved` on md.clock) are
pairs (exchange time, local monotonic time). Between them the clock extrapolates at the observed rate: 1.0
against Coinbase, faster against a test peer whose clock runs faster, so the whole stack moves with it. The
clock never runs backwards. Pure: no Kafka, no network; the monotonic source is injected.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

MIN_RATE, MAX_RATE = 1e-3, 1e6


class ClockNotSynced(RuntimeError):
    """No observation of the exchange's time yet: nothing may be timed on this clock."""


class ExchangeClock:
    """Callable like `shared.clock.Clock`: `clock()` is the exchange's time now (UTC)."""

    def __init__(
        self,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        window: int = 30,
        min_span_s: float = 2.0,
    ) -> None:
        self._mono = monotonic
        self._samples: deque[tuple[float, float]] = deque(
            maxlen=window
        )  # (local monotonic, exchange epoch s)
        # Per sample, how far its local time may be off (half a REST request's duration; None: a receipt time).
        self._spread: deque[float | None] = deque(maxlen=window)
        self._min_span_s = min_span_s
        self._rate = 1.0
        self._given_rate: float | None = None
        self._last_out = float("-inf")

    # ------------------------------------------------------------------------------------ feeding
    def observe(
        self,
        exchange_time: datetime,
        *,
        at: float | None = None,
        rate: float | None = None,
        spread: float | None = None,
    ) -> None:
        """One observation: the exchange's time was `exchange_time` at local monotonic `at` (default: now).
        `rate`, when the observer already knows it (md.clock carries the ingest's estimate), is used as is;
        otherwise it is estimated from the recent observations (least squares). `spread`: the answer was made
        within `at` +- `spread` (half a request's round trip); while every observation in the window has one,
        the rate is the lowest the brackets allow, so a slow request can only make the clock late, never early
        (early would finalise a bucket before the exchange has closed it)."""
        local = self._mono() if at is None else at
        self._samples.append((local, exchange_time.timestamp()))
        self._spread.append(spread)
        if rate is not None:
            self._given_rate = min(MAX_RATE, max(MIN_RATE, rate))
        self._rate = self._given_rate if self._given_rate is not None else self._estimate()

    def _estimate(self) -> float:
        if len(self._samples) < 3 or self._samples[-1][0] - self._samples[0][0] < self._min_span_s:
            return self._rate
        first_w, last_w = self._spread[0], self._spread[-1]
        if first_w is not None and last_w is not None and all(w is not None for w in self._spread):
            (l0, e0), (l1, e1) = self._samples[0], self._samples[-1]
            widest = (l1 + last_w) - (l0 - first_w)
            if widest > 0 and e1 > e0:
                return min(MAX_RATE, max(MIN_RATE, (e1 - e0) / widest))
        n = len(self._samples)
        mx = sum(s[0] for s in self._samples) / n
        my = sum(s[1] for s in self._samples) / n
        sxx = sum((s[0] - mx) ** 2 for s in self._samples)
        if sxx <= 0:
            return self._rate
        sxy = sum((s[0] - mx) * (s[1] - my) for s in self._samples)
        return min(MAX_RATE, max(MIN_RATE, sxy / sxx))

    # ------------------------------------------------------------------------------------ reading
    @property
    def synced(self) -> bool:
        return bool(self._samples)

    @property
    def rate(self) -> float:
        """Exchange seconds per local second."""
        return self._rate

    def epoch_s(self) -> float:
        if not self._samples:
            raise ClockNotSynced(
                "the exchange's time has not been observed yet (no heartbeat or server time)"
            )
        local, ex = self._samples[-1]
        # A bracketed answer was made at the latest at its receipt: extrapolate from there.
        local += self._spread[-1] or 0.0
        now = ex + (self._mono() - local) * self._rate
        # Never backwards: a late observation or a lower rate estimate holds the clock until it catches up.
        self._last_out = max(self._last_out, now)
        return self._last_out

    def __call__(self) -> datetime:
        return datetime.fromtimestamp(self.epoch_s(), UTC)

    def real_seconds(self, exchange_seconds: float) -> float:
        """How long a wait of `exchange_seconds` of exchange time takes here."""
        return max(0.0, exchange_seconds) / self._rate

    async def sleep(self, exchange_seconds: float) -> None:
        """Sleep `exchange_seconds` of exchange time (for `sleep=` injection into waits written in exchange time)."""
        await asyncio.sleep(self.real_seconds(exchange_seconds))

    async def wait_until(
        self, t: datetime, stop: asyncio.Event | None = None, *, max_step_s: float = 0.5
    ) -> bool:
        """Wait until exchange time reaches `t` (re-checked at least every `max_step_s` real seconds, so a rate
        change is followed); False when `stop` was set first."""
        while True:
            if stop is not None and stop.is_set():
                return False
            left = (t - self()).total_seconds()
            if left <= 0:
                return True
            await asyncio.sleep(min(max_step_s, self.real_seconds(left)))

    def skew_s(self, wall: datetime) -> float:
        """Exchange time minus `wall` (the machine's clock): a metric, alerting when large."""
        return (self() - wall) / timedelta(seconds=1)
