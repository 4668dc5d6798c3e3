"""Wiring of the ingest service: candle files -> md.candles (replay), in event time; or Coinbase live
(services/ingest/live.py) with the exchange's clock."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict

from services.ingest.domain import build_schedule, finished_message, resume_point
from services.ingest.live import CLOCK_MIN_SPAN_S, LiveIngest, LiveOptions
from services.ingest.metrics import IngestMetrics
from shared.aligner import Step
from shared.bus import KafkaAccess
from shared.candles import load_products
from shared.clock import Clock, system_clock
from shared.config import AppConfig
from shared.exchange_clock import ExchangeClock
from shared.kafka import Publisher, read_tail
from shared.messages import ReplayFinished, WatermarkAdvanced, WorkerFinished
from shared.runtime import ServiceSettings
from shared.topics import Topics

log = logging.getLogger("ingest")


@dataclass
class ReplayOptions:
    """The replay's own command-line options (`python -m services.ingest --source replay --help`)."""

    data_dir: Path
    start: datetime | None = None
    end: datetime | None = None
    hours: float | None = None
    speed: float = 0.0  # 0: as fast as the broker takes it; N: N times real time


class LiveSourceOptions(BaseModel):
    """The live source's command-line overrides of `system.market_data` (validated as the config's values are,
    by LiveOptions.from_config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval: str | None = None
    rest_url: str | None = None
    ws_url: str | None = None


async def last_progress(bootstrap: KafkaAccess, topic: str) -> tuple[int | None, bool]:
    """The last watermark (epoch s) on partition 0 and whether the replay already finished: resume after a crash."""
    last: int | None = None
    done = False
    for _, msg in await read_tail(bootstrap, topic, records=200, now=system_clock, partitions=[0]):
        if isinstance(msg, WatermarkAdvanced):
            last = int(msg.step_time.timestamp())
        elif isinstance(msg, ReplayFinished):
            done = True
    return last, done


class IngestService:
    def __init__(
        self, cfg: AppConfig, settings: ServiceSettings, options: ReplayOptions, *, clock: Clock
    ) -> None:
        self.cfg = cfg
        self.settings = settings
        self.options = options
        self.clock = clock
        self.topics = Topics(cfg.system.kafka.namespace)
        self.steps: list[Step] = []

    def load(self) -> None:
        files = load_products(self.options.data_dir, self.cfg.all_products())
        self.steps = build_schedule(
            files, start=self.options.start, end=self.options.end, hours=self.options.hours
        )
        log.info(
            "replaying %d steps of %d products (%s .. %s)",
            len(self.steps),
            len(files),
            self.steps[0].candles[0].open_time.isoformat(),
            self.steps[-1].candles[0].open_time.isoformat(),
        )

    async def run(self, stop: asyncio.Event) -> int:
        if not self.steps:
            self.load()
        self.publisher = Publisher(self.settings.kafka, client_id=f"{self.topics.ns}.ingest")
        await self.publisher.start()
        try:
            last, done = await last_progress(self.settings.kafka, self.topics.candles)
            if done:
                log.info("replay already finished on %s; nothing to publish", self.topics.candles)
                return 0
            first = resume_point(self.steps, last)
            if first:
                log.info("resuming after step %s (%d of %d published)", last, first, len(self.steps))
            for step in self.steps[first:]:
                if stop.is_set():
                    return 1
                for c in step.candles:
                    await self.publisher.send(self.topics.candles, c, key=c.product)
                await self.publisher.send_to_all_partitions(self.topics.candles, step.watermark())
                if self.options.speed > 0:
                    await self.publisher.flush()
                    await asyncio.sleep(step.interval_s / self.options.speed)
            await self.publisher.send_to_all_partitions(self.topics.candles, finished_message(self.steps))
            await self.publisher.send(
                self.topics.status,
                WorkerFinished(
                    id=f"ingest-finished-{len(self.steps)}",
                    event_time=self.clock(),
                    correlation_id="replay",
                    service="ingest",
                    instance=self.settings.instance,
                    detail={"steps": len(self.steps)},
                ),
                key="ingest",
            )
            await self.publisher.flush()
            log.info("published %d steps", len(self.steps))
            return 0
        finally:
            await self.publisher.stop()


def bootstrap(
    settings: ServiceSettings,
    options: ReplayOptions | None = None,
    *,
    overrides: dict[str, Any] | None = None,
) -> IngestService:
    """The replay. `options` default: every candle of `system.market_data.data_dir`, as fast as the broker takes."""
    o = overrides or {}
    cfg: AppConfig = o.get("config") or settings.load()
    opts = options or ReplayOptions(data_dir=Path(cfg.system.market_data.data_dir))
    return IngestService(cfg, settings, opts, clock=o.get("clock", system_clock))


def bootstrap_live(
    settings: ServiceSettings,
    options: LiveSourceOptions | None = None,
    *,
    overrides: dict[str, Any] | None = None,
) -> LiveIngest:
    """The live ingest. Overrides (tests): config, monotonic, wall (the machine's clock), session_factory,
    metrics. Raises IngestConfigError for settings it cannot run with."""
    o = overrides or {}
    cfg: AppConfig = o.get("config") or settings.load()
    cli = options or LiveSourceOptions()
    live_options = LiveOptions.from_config(
        cfg, interval=cli.interval, rest_url=cli.rest_url, ws_url=cli.ws_url
    )
    monotonic = o.get("monotonic", time.monotonic)
    return LiveIngest(
        cfg,
        settings,
        live_options,
        wall=o.get("wall", system_clock),
        clock=o.get("exchange_clock") or ExchangeClock(monotonic=monotonic, min_span_s=CLOCK_MIN_SPAN_S),
        monotonic=monotonic,
        session_factory=o.get("session_factory", aiohttp.ClientSession),
        metrics=o.get("metrics") or IngestMetrics(),
        metrics_port=settings.metrics_port,
        metrics_addr=settings.metrics_addr,
    )
