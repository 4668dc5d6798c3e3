"""Wiring of the registry: md.candles -> plans (registry.plans, compacted, keyed by profile) with claims in Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from services.registry import handlers
from services.registry.claims import RedisClaims
from shared.clock import Clock, IdFactory, random_ids, system_clock
from shared.config import AppConfig
from shared.kafka import Route, StateMachineService
from shared.messages import Message, PlanPublished, WorkerFinished
from shared.runtime import ServiceSettings
from shared.topics import Topics


class RegistryService:
    def __init__(
        self,
        cfg: AppConfig,
        settings: ServiceSettings,
        redis: aioredis.Redis,
        *,
        clock: Clock,
        ids: IdFactory,
    ) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.system.kafka.namespace)
        self.redis = redis
        self.claims = RedisClaims(
            redis, cfg.system.kafka.namespace, grace_s=cfg.system.registry.claim_grace_s
        )
        self.state = handlers.new_state(cfg)
        self.runner = StateMachineService(
            name="registry",
            bootstrap=settings.kafka_bootstrap,
            topics=[self.topics.candles],
            group_id=self.topics.group("registry"),
            dead_letter_topic=self.topics.dead_letter,
            handle=self.handle,
            route=self.route,
            clock=clock,
            ids=ids,
        )

    async def handle(self, msg: Message, partition: int) -> list[Message]:
        return await handlers.handle(self.state, msg, partition, self.claims.claim)

    def route(self, msg: Message) -> list[Route]:
        t = self.topics
        if isinstance(msg, PlanPublished):
            return [(t.plans, msg.profile, False), (t.audit, msg.profile, False)]
        if isinstance(msg, WorkerFinished):
            return [(t.status, "registry", False)]
        return [(t.audit, None, False)]

    async def run(self, stop: asyncio.Event) -> int:
        try:
            await self.redis.ping()
            # A disabled profile holds nothing: its claims from earlier runs would block the others.
            for pid, p in self.cfg.profiles.items():
                if not p.enabled:
                    await self.claims.release(pid)
            return await self.runner.run(stop)
        finally:
            await self.redis.aclose()


def bootstrap(settings: ServiceSettings, *, overrides: dict[str, Any] | None = None) -> RegistryService:
    o = overrides or {}
    cfg: AppConfig = o.get("config") or settings.load()
    redis = o.get("redis") or aioredis.Redis.from_url(settings.redis_url)
    return RegistryService(
        cfg, settings, redis, clock=o.get("clock", system_clock), ids=o.get("ids", random_ids)
    )
