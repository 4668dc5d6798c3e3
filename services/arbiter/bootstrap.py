"""Wiring of the arbiter: orders.intents -> decisions (orders.events) and approved orders (orders.approved.<p>)."""

from __future__ import annotations

import asyncio
from typing import Any

from services.arbiter import domain
from shared.clock import Clock, IdFactory, random_ids, system_clock
from shared.config import AppConfig
from shared.kafka import Route, StateMachineService
from shared.messages import ExecuteOrder, Message, OrderDecided, WorkerFinished
from shared.runtime import ServiceSettings
from shared.topics import Topics


class ArbiterService:
    def __init__(self, cfg: AppConfig, settings: ServiceSettings, *, clock: Clock, ids: IdFactory) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.system.kafka.namespace)
        self.state = domain.new_state(cfg)
        self.finished_partitions: set[int] = set()
        self.runner = StateMachineService(
            name="arbiter",
            bootstrap=settings.kafka_bootstrap,
            topics=[self.topics.intents],
            group_id=self.topics.group("arbiter"),
            dead_letter_topic=self.topics.dead_letter,
            handle=self.handle,
            route=self.route,
            clock=clock,
            ids=ids,
        )

    async def handle(self, msg: Message, partition: int) -> list[Message]:
        out = domain.decide(self.state, msg, partition)
        for m in out:
            if isinstance(m, WorkerFinished):
                self.finished_partitions.add(partition)
        return out

    def route(self, msg: Message) -> list[Route]:
        t = self.topics
        if isinstance(msg, OrderDecided):
            return [(t.events, msg.profile, False), (t.audit, msg.profile, False)]
        if isinstance(msg, ExecuteOrder):
            return [(t.approved(msg.profile), msg.product, False)]
        if isinstance(msg, WorkerFinished):
            return [(t.status, "arbiter", False)]
        return [(t.audit, None, False)]

    async def run(self, stop: asyncio.Event) -> int:
        return await self.runner.run(stop)


def bootstrap(settings: ServiceSettings, *, overrides: dict[str, Any] | None = None) -> ArbiterService:
    o = overrides or {}
    cfg: AppConfig = o.get("config") or settings.load()
    return ArbiterService(cfg, settings, clock=o.get("clock", system_clock), ids=o.get("ids", random_ids))
