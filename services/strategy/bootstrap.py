"""Wiring of one profile's strategy worker: a faust-streaming app (one consumer group per profile) whose agents
feed market data, the profile's plans and its order outcomes into the pure state machine of domain.py.

The worker sees only its own plan and order events (it filters by profile) and the market data.
A lock serialises decide-and-send, so one step's intents always precede its StepCompleted marker on every
intents partition.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import faust

from services.strategy import domain
from shared.clock import random_ids, system_clock
from shared.codec import DecodeError, decode, encode
from shared.config import AppConfig
from shared.messages import DeadLettered, Message, PlaceOrder, ProfileHalted, StepCompleted, WorkerFinished
from shared.runtime import ServiceSettings
from shared.topics import Topics

log = logging.getLogger("strategy")


class StrategyWorker:
    def __init__(self, cfg: AppConfig, settings: ServiceSettings) -> None:
        if settings.profile not in cfg.profiles:
            raise ValueError(f"--profile {settings.profile!r} is not in the config (have {sorted(cfg.profiles)})")
        self.profile_id: str = settings.profile
        self.cfg = cfg
        self.t = Topics(cfg.system.kafka.namespace)
        k = cfg.system.kafka
        self.state = domain.new_state(
            self.profile_id, cfg.profiles[self.profile_id], cfg.system.quote_asset, frozenset(range(k.candle_partitions))
        )
        self.intent_partitions = list(range(k.intent_partitions))
        self.lock = asyncio.Lock()
        self.app = faust.App(
            self.t.group("strategy", self.profile_id),
            broker=f"kafka://{settings.kafka_bootstrap}",
            store="memory://",
            web_enabled=False,
            web_host="127.0.0.1",
            web_bind="127.0.0.1",
            web_port=int(settings.extra.get("web_port", "0")) or 6066,
            topic_disable_leader=True,
            topic_allow_declare=False,
            consumer_auto_offset_reset="earliest",
            broker_heartbeat_interval=1.0,
            broker_session_timeout=10.0,
            producer_acks=-1,
            stream_wait_empty=False,
        )
        self.app.conf.web_enabled = False  # the constructor flag alone still bound 0.0.0.0:6066
        self.out_intents = self._topic(self.t.intents)
        self.out_events = self._topic(self.t.events)
        self.out_status = self._topic(self.t.status)
        self.out_audit = self._topic(self.t.audit)
        self.out_dead = self._topic(self.t.dead_letter)
        for name in (self.t.candles, self.t.plans, self.t.events):
            self.app.agent(self._topic(name), name=f"consume-{name}")(self._agent)

    def _topic(self, name: str) -> Any:
        # Raw bytes in and out: our own codec (orjson + pydantic) decodes, so bad bytes reach the dead-letter path.
        return self.app.topic(name, value_serializer="raw", key_serializer="raw")

    async def _agent(self, stream: Any) -> None:
        async for event in stream.events():
            rec = event.message
            try:
                msg = decode(event.value)
            except DecodeError as err:
                await self._dead_letter(rec, str(err))
                continue
            async with self.lock:
                for out in domain.decide(self.state, msg, rec.partition):
                    await self._publish(out)

    async def _dead_letter(self, rec: Any, error: str) -> None:
        log.warning("dead-lettered %s[%s]@%s: %s", rec.topic, rec.partition, rec.offset, error)
        dl = DeadLettered(
            id=random_ids(),
            event_time=system_clock(),
            correlation_id=f"{rec.topic}:{rec.partition}:{rec.offset}",
            source_topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key.decode("utf-8", "replace") if rec.key else None,
            payload_b64=base64.b64encode(rec.value or b"").decode(),
            error=error[:2000],
            service=f"strategy.{self.profile_id}",
        )
        await self.out_dead.send(key=rec.topic.encode(), value=encode(dl))

    async def _publish(self, msg: Message) -> None:
        data = encode(msg)
        if isinstance(msg, PlaceOrder):
            await self.out_intents.send(key=msg.product.encode(), value=data)
            await self.out_audit.send(key=msg.profile.encode(), value=data)
        elif isinstance(msg, StepCompleted):
            for p in self.intent_partitions:
                await self.out_intents.send(value=data, partition=p)
        elif isinstance(msg, ProfileHalted):
            await self.out_events.send(key=msg.profile.encode(), value=data)
            await self.out_audit.send(key=msg.profile.encode(), value=data)
        elif isinstance(msg, WorkerFinished):
            await self.out_status.send(key=f"strategy.{self.profile_id}".encode(), value=data)
        else:
            await self.out_audit.send(value=data)

    def run(self) -> int:
        worker = faust.Worker(self.app, loglevel="warn", quiet=True, redirect_stdouts=False)
        worker.execute_from_commandline()
        return 0


def bootstrap(settings: ServiceSettings, *, overrides: dict[str, Any] | None = None) -> StrategyWorker:
    o = overrides or {}
    cfg: AppConfig = o.get("config") or settings.load()
    return StrategyWorker(cfg, settings)
