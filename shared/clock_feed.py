"""The one place a service's clock is chosen from the market-data source, and the follower that keeps an
`ExchangeClock` fed from md.clock.

- replay: the machine's clock (decisions run on the candles' event time; the clock only stamps records);
- coinbase: the exchange's time as the ingest reports it on md.clock (`ExchangeTimeObserved`, about 1/s),
  extrapolated at the reported rate between observations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.admit import Refused, admit
from shared.bus import KafkaAccess
from shared.clock import Clock, system_clock
from shared.config import AppConfig
from shared.exchange_clock import ExchangeClock
from shared.messages import ExchangeTimeObserved
from shared.topics import Topics

log = logging.getLogger("clock")


async def follow_clock(bootstrap: KafkaAccess, topic: str, clock: ExchangeClock, stop: asyncio.Event) -> None:
    """Feed `clock` from `topic` (partition 0), starting at its newest record, until `stop` is set. No consumer
    group: every process reads the latest observation for itself."""
    consumer = AIOKafkaConsumer(
        **bootstrap.client_options(), enable_auto_commit=False, auto_offset_reset="latest"
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.seek(tp, max(0, end - 1))
        while not stop.is_set():
            batch = await consumer.getmany(tp, timeout_ms=500)
            for rec in batch.get(tp, []):
                # A far-future observation would move the exchange clock past every real message.
                admitted = admit(rec, now=system_clock())
                if isinstance(admitted, Refused):
                    log.warning("%s offset %d: %s", topic, rec.offset, admitted.reason)
                elif isinstance(admitted.msg, ExchangeTimeObserved):
                    clock.observe(admitted.msg.event_time, rate=admitted.msg.rate)
    finally:
        await consumer.stop()


@dataclass
class ServiceClock:
    """What a service is given: the clock, and (live) the task that keeps it fed."""

    clock: Clock
    exchange: ExchangeClock | None = None

    @property
    def live(self) -> bool:
        return self.exchange is not None

    async def sleep(self, seconds: float) -> None:
        """Sleep `seconds` of this clock's time (exchange seconds when live)."""
        await (
            self.exchange.sleep(seconds) if self.exchange is not None else asyncio.sleep(max(0.0, seconds))
        )

    async def run(self, bootstrap: KafkaAccess, topics: Topics, stop: asyncio.Event) -> None:
        """Follow md.clock until `stop` (nothing to do in a replay); restarts the follower after an error."""
        if self.exchange is None:
            return
        while not stop.is_set():
            try:
                await follow_clock(bootstrap, topics.clock, self.exchange, stop)
            except Exception as err:  # noqa: BLE001 - a broker hiccup must not stop the service's clock for good
                log.warning("clock follower: %s; retrying", err)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    async def wait_synced(self, stop: asyncio.Event, timeout_s: float = 60.0) -> bool:
        """Live: wait for the first observation (the ingest publishes one a second); True at once in a replay."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.exchange is not None and not self.exchange.synced:
            if stop.is_set() or loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


def service_clock(cfg: AppConfig, *, source: str | None = None) -> ServiceClock:
    """The clock a service runs on, chosen once from the market-data source."""
    if (source or cfg.system.market_data.source) == "coinbase":
        ex = ExchangeClock()
        return ServiceClock(ex, ex)
    return ServiceClock(system_clock)
