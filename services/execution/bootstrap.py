"""Wiring of one profile's execution worker: orders.approved.<profile> + md.candles -> orders.events.

This worker is the only process that would ever hold the profile's credentials (live mode, a later step);
in paper mode it runs the paper exchange of services/execution/domain.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.execution import domain
from shared.clock import Clock, IdFactory, random_ids, system_clock
from shared.config import AppConfig
from shared.kafka import Route, StateMachineService
from shared.messages import Message, OrderFilled, OrderUpdated, WorkerFinished
from shared.runtime import ServiceSettings
from shared.topics import Topics


class ExecutionService:
    def __init__(self, cfg: AppConfig, settings: ServiceSettings, *, clock: Clock, ids: IdFactory) -> None:
        if settings.profile not in cfg.profiles:
            raise ValueError(f"--profile {settings.profile!r} is not in the config (have {sorted(cfg.profiles)})")
        self.profile_id: str = settings.profile
        self.cfg = cfg
        self.topics = Topics(cfg.system.kafka.namespace)
        profile = cfg.profiles[self.profile_id]
        self.state = domain.new_state(
            self.profile_id, profile, cfg.system.execution, frozenset(range(cfg.system.kafka.candle_partitions))
        )
        self.runner = StateMachineService(
            name=f"execution.{self.profile_id}",
            bootstrap=settings.kafka_bootstrap,
            topics=[self.topics.candles, self.topics.approved(self.profile_id)],
            group_id=self.topics.group("execution", self.profile_id),
            dead_letter_topic=self.topics.dead_letter,
            handle=self.handle,
            route=self.route,
            clock=clock,
            ids=ids,
        )

    async def handle(self, msg: Message, partition: int) -> list[Message]:
        return domain.decide(self.state, msg, partition)

    def route(self, msg: Message) -> list[Route]:
        t = self.topics
        if isinstance(msg, OrderUpdated | OrderFilled):
            return [(t.events, msg.profile, False), (t.audit, msg.profile, False)]
        if isinstance(msg, WorkerFinished):
            return [(t.status, f"execution.{self.profile_id}", False)]
        return [(t.audit, None, False)]

    async def run(self, stop: asyncio.Event) -> int:
        return await self.runner.run(stop)


def bootstrap(settings: ServiceSettings, *, overrides: dict[str, Any] | None = None) -> ExecutionService:
    o = overrides or {}
    cfg: AppConfig = o.get("config") or settings.load()
    return ExecutionService(cfg, settings, clock=o.get("clock", system_clock), ids=o.get("ids", random_ids))
