"""Wiring of the registry: md.candles -> plans (registry.plans, keyed by profile) with claims and decisions in
Redis, and Prometheus metrics.

The registry's output is a deterministic function of the candles, so it keeps no consumer offsets: every start
reads md.candles from the beginning (rebuilding the lookback that scores the random asset exactly as an
uninterrupted run has it), after reading the plans topic (what is published is never derived again) and
re-claiming the plans whose epoch is not over, before it claims anything new.

It also reads the commands topic from the beginning (signed ``rotate`` commands, judged against the broker's
append time), in the same consumer as the candles: one fetch asks for both topics, and its response carries,
with the candles, the commands partition's end at that moment (its last stable offset). Before a batch of
candles is handled, the commands are read up to that end: every command appended before those candles is then
known, so the step a rotation applies at (the first step whose candles were published after the command) is
the same in every replica and every restart. No request besides the fetch is needed per batch (an offsets
request per batch used to wait behind the idle consumer's long poll: docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any, Literal
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError as RedisNoPermissionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.registry import handlers, routing
from services.registry.claims import RedisClaims
from services.registry.ledger import PlanLedger
from services.registry.metrics import RegistryMetrics
from services.registry.recovery import RegistryBackend, read_plans, seek_to_start, topic_partitions
from shared.admit import Admission, Refused
from shared.bus import KafkaAccess
from shared.clock import Clock, IdFactory, random_ids, system_clock
from shared.clock_feed import ServiceClock, service_clock
from shared.commands import gate_for
from shared.config import AppConfig
from shared.kafka import Publisher, Route, input_consumer
from shared.messages import (
    Message,
    PlanPublished,
)
from shared.runtime import ServiceSettings
from shared.topics import Topics

log = logging.getLogger("registry")

ClockMode = Literal["event", "wall"]
CLOCK_SYNC_TIMEOUT_S = 300.0  # the ingest may start after the registry and backfill first
# In wall-clock mode an epoch's plan is derived this long after the boundary, so that the candle closing at the
# boundary (the last one the score may use) has had time to arrive.
LIVE_PLAN_DELAY_S = 5
HOUSEKEEPING_S = 1.0
TOUCH_READY_S = 60.0
REDIS_RETRIES = 30


def registry_consumer(bootstrap: KafkaAccess) -> AIOKafkaConsumer:
    """The registry's one consumer: md.candles and the commands topic, read together (see the module's
    docstring), without a group (every start reads from the beginning)."""
    return input_consumer(
        bootstrap,
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        max_poll_records=500,
    )


class RegistryService:
    def __init__(
        self,
        cfg: AppConfig,
        settings: ServiceSettings,
        redis: aioredis.Redis,
        *,
        clock: Clock,
        ids: IdFactory,
        metrics_port: int = 0,
        lease_s: float = 10.0,
        clock_mode: ClockMode = "event",
        service_clock: ServiceClock | None = None,
        probe_url: str | None = None,
    ) -> None:
        """`probe_url`: the Redis to check once, without retries, before the first command (the URL `redis` was
        made from; None for a client given by a test)."""
        self.cfg = cfg
        self.settings = settings
        self._probe_url = probe_url
        ns = cfg.system.kafka.namespace
        self.topics = Topics(ns)
        self.redis = redis
        self.instance = settings.instance
        self.clock = clock
        self.service_clock = service_clock or ServiceClock(clock)
        self.ids = ids
        self.metrics_port = metrics_port
        self.lease_s = lease_s
        self.clock_mode: ClockMode = clock_mode
        self.metrics = RegistryMetrics(self.instance)
        grace = cfg.system.registry.claim_grace_s
        self.claims = RedisClaims(redis, ns, grace_s=grace)
        self.ledger = PlanLedger(redis, ns, grace_s=grace)
        self.backend = RegistryBackend(
            self.claims,
            self.ledger,
            instance=self.instance,
            read_topic=self._read_plans,
            priorities={pid: p.priority for pid, p in cfg.profiles.items()},
            metrics=self.metrics,
            lease_s=lease_s,
        )
        self.state = handlers.new_state(cfg, instance=self.instance, metrics=self.metrics)
        self.metrics_bound: int | None = None
        self._run_id = ""
        self.commands = gate_for("registry", cfg.system.commands.max_age_s)
        self.admission = Admission(
            "registry", clock, self.commands, judges=lambda cmd: cmd.action == "rotate"
        )

    async def _read_plans(self) -> list[PlanPublished]:
        plans = await read_plans(self.settings.kafka, self.topics.plans, wait_s=30.0)
        if plans is None:
            raise RuntimeError(
                f"topic {self.topics.plans!r} does not exist on {self.settings.kafka}; "
                "create the topics first (`mpctl demo` does, or shared.kafka.ensure_topics)"
            )
        return plans

    def route(self, msg: Message) -> list[Route]:
        return routing.route(msg, self.topics)

    async def _first_ping(self) -> None:
        """Reach Redis once before anything else. A Redis that refuses the registry's credentials (or wants some
        and got none) stops the start at once with one line saying what to change, never with the password;
        the client's retries are for a Redis that is away, so this check is made by a client without them."""
        if self._probe_url is not None:
            creds = self.settings.redis_credentials()
            probe = aioredis.Redis.from_url(
                self._probe_url, socket_connect_timeout=5.0, socket_timeout=5.0, **creds
            )
            try:
                await probe.ping()
            except (RedisAuthenticationError, RedisNoPermissionError) as err:
                where = redis_address(self._probe_url)
                user = creds.get("username")
                if user is None:
                    raise SystemExit(
                        f"Redis at {where} requires authentication and the registry gave none "
                        f"({type(err).__name__}): start it with --redis-auth (REDIS_AUTH=1) to sign in as its "
                        "bus principal, or give a REDIS_URL of a Redis it may use"
                    ) from None
                raise SystemExit(
                    f"Redis at {where} refused the registry's user {user} ({type(err).__name__}): give that user "
                    "its password and rights there (`mpctl bus apply` for the bus's own Redis)"
                ) from None
            except RedisError:
                pass  # away for now: the client below waits for it
            finally:
                await probe.aclose()
        await self.redis.ping()

    async def run(self, stop: asyncio.Event) -> int:
        try:
            await self._first_ping()
            # A disabled profile holds nothing: its claims from earlier runs would block the others.
            for pid, p in self.cfg.profiles.items():
                if not p.enabled:
                    await self.claims.release(pid)
            if self.metrics_port:
                self.metrics_bound = self.metrics.serve(self.metrics_port, self.settings.metrics_addr)
            publisher = Publisher(self.settings.kafka, client_id=f"{self.topics.ns}.registry.{self.instance}")
            consumer = registry_consumer(self.settings.kafka)
            await publisher.start()
            await consumer.start()
            try:
                t0 = time.monotonic()
                await self._check_server()
                published = await self._read_plans()
                handlers.load_published(self.state, published)
                # Before anything new is claimed: the topic's plans whose epoch is not over hold their keys again.
                kind = await self.backend.recover([], topic_plans=published)
                log.info(
                    "instance %s: %d plan(s) already on %s; claims %s in %.2f s",
                    self.instance,
                    len(published),
                    self.topics.plans,
                    kind,
                    time.monotonic() - t0,
                )
                tps = await topic_partitions(self.settings.kafka, self.topics.candles, wait_s=30.0)
                if tps is None:
                    raise RuntimeError(
                        f"topic {self.topics.candles!r} does not exist; create the topics first"
                    )
                ctps = await topic_partitions(self.settings.kafka, self.topics.commands, wait_s=30.0)
                if ctps is None:
                    raise RuntimeError(
                        f"topic {self.topics.commands!r} does not exist; create the topics first"
                    )
                consumer.assign([*tps, *ctps])
                await seek_to_start(consumer, [*tps, *ctps])
                ends = await consumer.end_offsets(tps)
                # Live: epochs turn on the exchange's clock, followed from md.clock (the ingest reports it).
                follower = asyncio.create_task(self.service_clock.run(self.settings.kafka, self.topics, stop))
                try:
                    if not await self.service_clock.wait_synced(stop, timeout_s=CLOCK_SYNC_TIMEOUT_S):
                        if stop.is_set():
                            return 0
                        raise RuntimeError(
                            f"no exchange time on {self.topics.clock!r} within {CLOCK_SYNC_TIMEOUT_S:.0f} s: "
                            "is the live ingest running?"
                        )
                    await self._loop(consumer, publisher, stop, ends, ctps)
                finally:
                    follower.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await follower
            finally:
                await consumer.stop()
                await publisher.stop()
            return 0
        finally:
            self.metrics.close()
            await self.redis.aclose()

    async def _loop(
        self,
        consumer: AIOKafkaConsumer,
        publisher: Publisher,
        stop: asyncio.Event,
        start_ends: dict[TopicPartition, int],
        commands: list[TopicPartition],
    ) -> None:
        # In wall-clock mode, steps only feed the lookback; the clock plans epochs once the history is read.
        self.state.plan_on_steps = self.clock_mode == "event"
        caught_up = False
        last_housekeeping = last_touch = 0.0
        while not stop.is_set():
            batches = await self._next_candles(consumer, commands, publisher)
            for records in batches.values():
                for rec in records:
                    admitted = self.admission.admit(rec)
                    if isinstance(admitted, Refused):
                        await self._dead_letter(publisher, rec, admitted.reason)
                        continue
                    out = await handlers.handle(
                        self.state, admitted.msg, rec.partition, self.backend, published_ms=rec.timestamp
                    )
                    await self._send(publisher, out)
            now = time.monotonic()
            if now - last_housekeeping >= HOUSEKEEPING_S:
                last_housekeeping = now
                if self.clock_mode == "wall":
                    if not caught_up:
                        caught_up = all(
                            [await consumer.position(tp) >= end for tp, end in start_ends.items()]
                        )
                    if caught_up:
                        wall_s = int(self.clock().timestamp()) - LIVE_PLAN_DELAY_S
                        await self._send(publisher, await handlers.on_clock(self.state, wall_s, self.backend))
                await self._send(
                    publisher, await handlers.check_watches(self.state, self.backend, self.lease_s)
                )
                await self._check_server()
                if now - last_touch >= TOUCH_READY_S:
                    last_touch = now
                    await self.ledger.touch_generation()
            await publisher.flush()
            # Only now is a decided plan really out: record it, so no replica takes it over.
            marks, self.state.to_mark = self.state.to_mark, []
            for plan in marks:
                await self.ledger.mark_published(
                    plan.profile, int(plan.epoch_start.timestamp()), plan.id, plan.rotation
                )

    async def _next_candles(
        self, consumer: AIOKafkaConsumer, commands: list[TopicPartition], publisher: Publisher
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """The next records of md.candles, once every command appended before them is handled.

        One fetch asks for every assigned partition of a broker, and its response gives each partition's end
        at that moment with its records (aiokafka: `last_stable_offset`, `last_poll_timestamp`). The client
        fetches again only when everything buffered is consumed, so the latest response is the one the candles
        in hand came in: the commands partition's end it gave was taken after those candles were appended, and
        the commands below it came in the same response (buffered: reading them asks the broker nothing).
        Where that does not hold (no response with the commands yet, or their partition led by another broker
        than the candles' in a cluster, whose responses come apart), the end is asked for, as before.

        Candles read while the commands catch up are kept, in order, for this batch."""
        candles: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        batches = await consumer.getmany(timeout_ms=200)
        while True:
            for tp, recs in batches.items():
                if tp in commands:
                    for rec in recs:
                        await self._on_command(rec, publisher)
                else:
                    candles.setdefault(tp, []).extend(recs)
            if not candles:
                return candles
            ends = self._commands_ends(consumer, commands, candles) or dict(
                await consumer.end_offsets(commands)
            )
            if all([await consumer.position(tp) >= ends[tp] for tp in commands]):
                return candles
            batches = await consumer.getmany(timeout_ms=200)

    @staticmethod
    def _commands_ends(
        consumer: AIOKafkaConsumer, commands: list[TopicPartition], candles: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int] | None:
        """The commands partitions' ends as the response of the candles in hand gave them (read_committed: the
        last stable offset; nothing past it is returned), or None when that response did not carry them."""
        cluster = consumer._client.cluster  # noqa: SLF001 - the leaders the client knows (no request)
        newest = max(consumer.last_poll_timestamp(tp) or 0 for tp in candles)
        leaders = {cluster.leader_for_partition(tp) for tp in [*commands, *candles]}
        ends: dict[TopicPartition, int] = {}
        for tp in commands:
            end, polled = consumer.last_stable_offset(tp), consumer.last_poll_timestamp(tp)
            if end is None or end < 0 or polled is None or polled < newest or len(leaders) != 1:
                return None
            ends[tp] = end
        return ends

    async def _on_command(self, rec: ConsumerRecord[bytes, bytes], publisher: Publisher) -> None:
        admitted = self.admission.admit(rec)
        if isinstance(admitted, Refused):
            await self._dead_letter(publisher, rec, admitted.reason)
            return
        if admitted.verdict is None:
            return  # the registry acts on rotate only; the other services judge and audit the rest
        await self._send(publisher, [admitted.verdict])
        if admitted.act:
            await self._send(
                publisher,
                await handlers.handle(
                    self.state, admitted.msg, rec.partition, self.backend, published_ms=rec.timestamp
                ),
            )

    async def _check_server(self) -> None:
        run_id = await self.ledger.server_run_id()
        if run_id and run_id != self._run_id:
            self._run_id = run_id
            if await self.ledger.fence(run_id):
                log.warning("Redis restarted with older state (new run_id): the claim set will be rebuilt")

    async def _send(self, publisher: Publisher, msgs: list[Message]) -> None:
        for m in msgs:
            for topic, key, broadcast in self.route(m):
                if broadcast:
                    await publisher.send_to_all_partitions(topic, m)
                else:
                    await publisher.send(topic, m, key=key)

    async def _dead_letter(self, publisher: Publisher, rec: ConsumerRecord[bytes, bytes], error: str) -> None:
        # Every registry start re-reads its topics: a record is dead-lettered again under the same id.
        await publisher.send(self.topics.dead_letter, self.admission.dead_letter(rec, error), key=rec.topic)


class RegistryOptions(BaseModel):
    """The registry's own command-line options (`python -m services.registry --help`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Seconds a decided plan may stay unpublished by its owner before another replica publishes it.
    publish_lease_s: float = Field(default=10.0, gt=0, le=3600)
    # Epochs follow the candles' event time (replay) or the wall/exchange clock (live); auto: by the source.
    clock: Literal["auto", "event", "wall"] = "auto"


def redis_address(url: str) -> str:
    """host:port of a Redis URL, without what it may carry in its user part (a password)."""
    parts = urlsplit(url)
    return f"{parts.hostname or '?'}:{parts.port or 6379}"


def bootstrap(
    settings: ServiceSettings,
    options: RegistryOptions | None = None,
    *,
    overrides: dict[str, Any] | None = None,
) -> RegistryService:
    o = overrides or {}
    opts = options or RegistryOptions()
    cfg: AppConfig = o.get("config") or settings.load()
    # A Redis restart must not stop the registry: commands wait and retry (about 25 s) while it is away.
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), REDIS_RETRIES)
    redis = o.get("redis") or aioredis.Redis.from_url(
        settings.redis_url,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        **settings.redis_credentials(),  # as its principal: its own key prefix and commands only
    )
    # Live market: epochs turn on the exchange's clock; a replay: on the candles' event time.
    mode: ClockMode = (
        ("wall" if cfg.system.market_data.live else "event") if opts.clock == "auto" else opts.clock
    )
    sclock = o.get("service_clock") or (
        service_clock(cfg)
        if mode == "wall" and "clock" not in o
        else ServiceClock(o.get("clock", system_clock))
    )
    return RegistryService(
        cfg,
        settings,
        redis,
        clock=o.get("clock", sclock.clock),
        service_clock=sclock,
        ids=o.get("ids", random_ids),
        metrics_port=settings.metrics_port,
        lease_s=opts.publish_lease_s,
        clock_mode=mode,
        probe_url=None if o.get("redis") else settings.redis_url,
    )
