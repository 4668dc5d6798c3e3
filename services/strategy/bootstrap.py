"""Wiring of one profile's strategy worker: one consume loop (shared/kafka.py ConsumeLoop, its own consumer group)
that feeds market data, the profile's plans and its order outcomes into the pure state machine of domain.py.

The worker acts only on its own plans and order events and on the market data: another profile's records on the
plans, events and decisions topics are skipped by their key before decoding (routing.ForeignKeys). Records are
handled one at a time in offset order per partition, so one step's intents always precede its StepCompleted
marker on every intents partition. A batch's outputs are acknowledged before its offsets are committed.

The worker consumed with faust until issue 16: faust's per-event machinery (its stream, drain and producer
buffer) was about 85 % of a worker's CPU on the way from candle to order, the worker's own decisions 15 %
(docs/benchmarks.md); the consume loop is the one the execution worker already used.

State after a crash: the state is a deterministic function of the worker's input logs (md.candles,
registry.plans, orders.events, orders.decisions), whatever their interleaving. The worker writes a signed
snapshot of it, with the next offset of every input partition it covers, to its compacted state topic every
few seconds and on a clean stop (shared/snapshots.py), after the producer has flushed the outputs of those
inputs. Every start restores the newest snapshot and reads each input from there (with none, from the
beginning): the consume loop's rebuild (shared/kafka.py). Committed offsets then serve lag monitoring only.
What the rebuild re-sends (intents, step markers, halts) carries the ids of the first run, and every consumer
de-duplicates them (docs/backtest.md, "State that survives a crash"; docs/architecture.md, "Durable state").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord

from services.strategy import domain
from services.strategy.metrics import StrategyMetrics
from services.strategy.routing import ForeignKeys, Outputs, routes
from shared.admit import Admitted, Record
from shared.clock import Clock, system_clock
from shared.commands import gate_for
from shared.config import AppConfig
from shared.kafka import ConsumeLoop, Outbox, Publisher
from shared.messages import (
    ControlCommand,
    Message,
    OrderFilled,
    OrderUpdated,
)
from shared.runtime import ServiceSettings
from shared.snapshots import (
    Durable,
    StateKeeper,
    dataclass_dump,
    dataclass_restore,
    fingerprint,
)
from shared.topics import Topics

SESSION_TIMEOUT_MS = 10_000


def input_topics(topics: Topics) -> list[str]:
    """What the worker reads: market data, plans, order outcomes (the arbiter's decisions and the execution
    workers' order events: the backtest routes the same to it), and operator commands (none in a backtest)."""
    return [topics.candles, topics.plans, topics.events, topics.decisions, topics.commands]


@dataclass(frozen=True, slots=True)
class HeldRecord:
    """A consumed record as the admit step and the dead-letter path read it (shared/admit.py Record), kept (in the
    snapshot too) while the outcome it carries waits to be judged: a plain value, not the client's record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


def max_publish_lag_s(cfg: AppConfig) -> float:
    """A live step normally goes out within its grace, re-polls and deadline; one published later is history."""
    md = cfg.system.market_data
    return md.grace_s + md.deadline_s + md.poll_interval_s


class StrategyWorker:
    def __init__(self, cfg: AppConfig, settings: ServiceSettings, *, clock: Clock = system_clock) -> None:
        if settings.profile not in cfg.profiles:
            raise ValueError(
                f"--profile {settings.profile!r} is not in the config (have {sorted(cfg.profiles)})"
            )
        self.profile_id: str = settings.profile
        self.cfg = cfg
        self.settings = settings
        self.clock = clock
        self.t = Topics(cfg.system.kafka.namespace)
        k = cfg.system.kafka
        self.state = domain.new_state(
            self.profile_id,
            cfg.profiles[self.profile_id],
            cfg.system.quote_asset,
            frozenset(range(k.candle_partitions)),
            on_rotation=cfg.system.registry.on_rotation,
            decision_wait_steps=cfg.system.strategy.decision_wait_steps,
            max_publish_lag_s=max_publish_lag_s(cfg),
            live=cfg.system.mode == "live",
        )
        self.outputs = Outputs.of(self.t, k.intent_partitions, self.profile_id)
        self.foreign = ForeignKeys.of(self.t, cfg.profiles, self.profile_id)
        self.group = self.t.group("strategy", self.profile_id)
        self.inputs = input_topics(self.t)
        self.service = f"strategy.{self.profile_id}"
        # Named by the profile: several profiles' workers may share a process (--shared-loop) and its log.
        self.log = logging.getLogger(self.service)
        self.commands = gate_for(self.service, cfg.system.commands.max_age_s)
        self.metrics = StrategyMetrics(self.profile_id)
        self.metrics_port = settings.metrics_port
        self.metrics_addr = settings.metrics_addr
        self.metrics_bound: int | None = None
        self._short = {name: name[len(self.t.ns) + 1 :] for name in self.inputs}
        # Records of outcomes for intents this worker did not send, by message id, until the domain judges them.
        self.held_records: dict[str, tuple[str, deque[HeldRecord]]] = {}
        # Kafka clients need a running event loop: the loop is built in run().
        self.loop: ConsumeLoop | None = None
        st = cfg.system.state
        self.durable = Durable(
            topic=self.t.state("strategy", self.profile_id),
            namespace=self.t.ns,
            service=self.service,
            schema=domain.SNAPSHOT_SCHEMA,
            fingerprint=fingerprint(
                "strategy",
                cfg.profiles[self.profile_id],
                cfg.system.quote_asset,
                k.candle_partitions,
                cfg.system.registry.on_rotation,
                cfg.system.strategy.decision_wait_steps,
                max_publish_lag_s(cfg),
                cfg.system.mode,
            ),
            dump=self._dump,
            restore=self._restore,
            interval_s=st.snapshot_interval_s,
            every_messages=st.snapshot_every_messages,
            enabled=st.snapshots,
        )

    # ------------------------------------------------------------------------------------ durable state
    def _dump(self) -> dict[str, Any]:
        return {"state": dataclass_dump(self.state, domain.CONFIG_FIELDS), "held_records": self.held_records}

    def _restore(self, data: dict[str, Any]) -> None:
        dataclass_restore(self.state, data["state"])
        self.held_records = data["held_records"]

    # ------------------------------------------------------------------------------------ the consume loop's hooks
    def _skip(self, rec: ConsumerRecord[bytes, bytes]) -> bool:
        """Every record is counted; another profile's (by its key) is skipped undecoded (routing.ForeignKeys)."""
        self.metrics.consumed(rec.topic, rec.partition, rec.offset, self._short.get(rec.topic, rec.topic))
        return self.foreign.skips(rec.topic, rec.key)

    def _dead_lettered(self, rec: Record, error: str) -> None:
        self.metrics.error("dead_lettered", rec.topic, rec.partition, rec.offset)

    async def handle(self, admitted: Admitted, rec: ConsumerRecord[bytes, bytes], outbox: Outbox) -> None:
        """One admitted record: the domain's decisions go in the outbox, published in order before the commit."""
        msg = admitted.msg
        if admitted.verdict is not None:
            self._emit(admitted.verdict, outbox)
            if not admitted.act:
                self.metrics.error("command_refused", rec.topic, rec.partition, rec.offset)
                return
        if (
            isinstance(msg, OrderFilled | OrderUpdated)
            and msg.profile == self.profile_id
            and msg.intent_id not in self.state.emitted
        ):
            # Held by the domain, maybe refused later: keep the record to dead-letter it then.
            held = HeldRecord(rec.topic, rec.partition, rec.offset, rec.key, rec.value, rec.timestamp)
            self.held_records.setdefault(msg.id, (msg.intent_id, deque()))[1].append(held)
        # The record's Kafka time places a rotate command among the steps (domain.py).
        outs = domain.decide(self.state, msg, rec.partition, rec.timestamp)
        for out in outs:
            self._emit(out, outbox)
        for refusal in domain.take_refused(self.state):
            await self._refuse(refusal)
        if self.held_records and outs:
            # Outcomes judged at a step and applied: their records are no longer needed.
            for mid, (intent_id, _) in list(self.held_records.items()):
                if not domain.awaits(self.state, intent_id):
                    del self.held_records[mid]
        if outs or isinstance(msg, OrderFilled | ControlCommand):
            self.metrics.update(self.state)

    def _emit(self, msg: Message, outbox: Outbox) -> None:
        for topic, key, partition in routes(msg, self.outputs):
            outbox.add(topic, msg, key, partition=partition)

    async def _refuse(self, refusal: domain.Refusal) -> None:
        recs = self.held_records.get(refusal.outcome.id)
        if not recs or not recs[1] or self.loop is None:
            # Cannot happen (every foreign outcome's record is kept until judged); say so rather than lose it.
            self.log.error("refused %s, but its record is unknown: %s", refusal.outcome.id, refusal.reason)
            return
        await self.loop.dead_letter(recs[1].popleft(), refusal.reason)

    # ------------------------------------------------------------------------------------ running
    def consume_loop(self, publisher: Publisher, keeper: StateKeeper | None) -> ConsumeLoop:
        """The loop over the worker's inputs (built in run(): Kafka clients need a running event loop)."""
        return ConsumeLoop(
            bootstrap=self.settings.kafka,
            topics=self.inputs,
            group_id=self.group,
            publisher=publisher,
            dead_letter_topic=self.t.dead_letter,
            service=self.service,
            clock=self.clock,
            commands=self.commands,
            rebuild_on_start=True,
            keeper=keeper,
            session_timeout_ms=SESSION_TIMEOUT_MS,
            skip=self._skip,
            on_dead_letter=self._dead_lettered,
        )

    async def run(self, stop: asyncio.Event) -> int:
        bootstrap = self.settings.kafka
        publisher = Publisher(bootstrap, client_id=self.group)
        keeper = await self.durable.keeper(bootstrap)
        loop = self.loop = self.consume_loop(publisher, keeper)
        # Filled as the loop is given its partitions, before it reads any of their records.
        self.metrics.counted_from = loop.committed_before
        if self.metrics_port:
            self.metrics_bound = self.metrics.serve(self.metrics_port, self.metrics_addr)

        async def watch() -> None:
            await stop.wait()
            loop.stop()

        try:
            await publisher.start()
            # Restores the newest snapshot (or none: the state is rebuilt from the beginning).
            await loop.start()
            self.metrics.update(self.state)
            watcher = asyncio.create_task(watch())
            try:
                await loop.run(self.handle)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await loop.final_snapshot()
            return 0
        finally:
            await loop.close()
            await publisher.stop()
            self.metrics.close()


def bootstrap(settings: ServiceSettings, *, overrides: dict[str, Any] | None = None) -> StrategyWorker:
    o = overrides or {}
    cfg: AppConfig = o.get("config") or settings.load()
    return StrategyWorker(cfg, settings, clock=o.get("clock", system_clock))
