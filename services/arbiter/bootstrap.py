"""Wiring of the arbiter: orders.intents + registry.plans + md.candles -> decisions (orders.decisions, audit.log),
approved orders (orders.approved.<profile>), internal-cross and correlation records (audit.log).

Several arbiter processes may run (docs/arbiter.md, "Two arbiters"):

- Every process reads *every* partition of its three input topics from the beginning, without a consumer
  group, and runs the same pure state machine (domain.py). Its decisions are a function of the inputs alone, so
  every process holds the same state and computes the same decisions, including the rules that span products
  (total exposure, correlation). A restarted process rebuilds its state the same way.
- A consumer group on the intents topic only says who *publishes*: a process publishes the outputs of the
  intents of the partitions it is assigned, from the group's committed offset of the partition on, and
  commits, after its outputs are acknowledged, the offset below which every intent of the partition is
  decided (every COMMIT_EVERY_S while busy, at once when idle). When a process dies (or a partition moves),
  the new owner publishes from that offset: what the old one published after its last commit is published
  again with the same ids, which every consumer ignores.

Durable state: every few seconds and on a clean stop, after its outputs are acknowledged, a process writes a
signed snapshot of its state (domain state and the outputs it retains per intents partition) with the next
offset of every input partition it covers to the compacted `state.arbiter` topic; a starting process restores
the newest one and reads each input from there, so a restart after any length of run no longer depends on
inputs retention has deleted (docs/architecture.md, "Durable state"). Any process's snapshot serves any other:
they all hold the same state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.arbiter import domain, routing
from services.arbiter.metrics import ArbiterMetrics
from shared.admit import Admission, Refused
from shared.clock import Clock, IdFactory, random_ids, system_clock
from shared.config import AppConfig
from shared.kafka import (
    LOST_PARTITIONS,
    Publisher,
    Route,
    input_consumer,
    lost_partitions_line,
    partitions_of,
)
from shared.messages import (
    Message,
    PlaceOrder,
    WorkerFinished,
)
from shared.runtime import ServiceSettings
from shared.snapshots import (
    Durable,
    StateKeeper,
    clamp_positions,
    dataclass_dump,
    dataclass_restore,
    fingerprint,
)
from shared.topics import Topics

log = logging.getLogger("arbiter")

SESSION_TIMEOUT_MS = 10_000
PRUNE_EVERY_S = 30.0
# How often a busy arbiter commits the intents it decided (an idle one: at once). A new owner of a partition
# publishes again, with the same ids, what was decided after the last commit: at most this much.
COMMIT_EVERY_S = 0.5


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, svc: ArbiterService) -> None:
        self.svc = svc

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Stop publishing at once; the next owner starts from the last commit (a few duplicates, same ids).
        for tp in revoked:
            self.svc.owned.pop(tp.partition, None)
        self.svc.assigned.difference_update(tp.partition for tp in revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.svc.assigned.update(tp.partition for tp in assigned)
        self.svc.lost_told = False


class ArbiterService:
    def __init__(
        self,
        cfg: AppConfig,
        settings: ServiceSettings,
        *,
        clock: Clock,
        ids: IdFactory,
        metrics_port: int = 0,
    ) -> None:
        self.cfg = cfg
        self.settings = settings
        self.clock = clock
        self.admission = Admission("arbiter", clock)
        self.ids = ids
        self.topics = Topics(cfg.system.kafka.namespace)
        self.group = self.topics.group("arbiter")
        # What it reads (every partition, from the beginning); the backtest routes these topics to it too.
        self.inputs = [self.topics.intents, self.topics.plans, self.topics.candles]
        self.state = domain.new_state(cfg)
        self.metrics = ArbiterMetrics()
        self.metrics_port = metrics_port
        self.metrics_bound: int | None = None
        self.finished_partitions: set[int] = set()
        # Publishing bookkeeping, per intents partition: where each intent was first read, the outputs that
        # belong to the partition (kept so that a partition assigned later can be published from its
        # committed offset), the partitions this process owns with the offset it publishes from.
        self.origin: dict[str, tuple[int, int]] = {}
        self.retained: dict[int, list[tuple[int, Message]]] = defaultdict(list)
        self.owned: dict[int, int] = {}
        self.assigned: set[int] = set()
        self.next_offset: dict[int, int] = {}
        self.last_offset: dict[int, int] = {}
        self.committed: dict[int, int] = {}
        self.lost_told = False  # the warning that a rebalance took partitions before their commit
        self.publisher: Publisher | None = None
        self.keeper: StateKeeper | None = None
        st = cfg.system.state
        k = cfg.system.kafka
        self.durable = Durable(
            topic=self.topics.state("arbiter"),
            namespace=self.topics.ns,
            service="arbiter",
            schema=domain.SNAPSHOT_SCHEMA,
            fingerprint=fingerprint(
                "arbiter",
                cfg.profiles,
                cfg.system.arbiter,
                cfg.system.execution,
                k.intent_partitions,
                k.candle_partitions,
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
        return {
            "state": dataclass_dump(self.state, domain.CONFIG_FIELDS),
            "origin": self.origin,
            "retained": dict(self.retained),
            "next_offset": self.next_offset,
            "last_offset": self.last_offset,
            "finished_partitions": self.finished_partitions,
        }

    def _restore(self, data: dict[str, Any]) -> None:
        dataclass_restore(self.state, data["state"])
        self.origin = data["origin"]
        self.retained = defaultdict(list, data["retained"])
        self.next_offset = data["next_offset"]
        self.last_offset = data["last_offset"]
        self.finished_partitions = data["finished_partitions"]

    # ------------------------------------------------------------------------------------ pure part
    async def handle(self, msg: Message, partition: int) -> list[Message]:
        out = domain.decide(self.state, msg, partition)
        for m in out:
            if isinstance(m, WorkerFinished):
                self.finished_partitions.add(int(m.instance.rsplit("-", 1)[1]))
        return out

    def route(self, msg: Message) -> list[Route]:
        return routing.route(msg, self.topics)

    # ------------------------------------------------------------------------------------ process
    def consumers(self) -> tuple[AIOKafkaConsumer, AIOKafkaConsumer]:
        """The observer (every partition of the inputs, no group) and the member of the group on the intents
        topic (says which partitions' outputs this process publishes; its partitions stay paused)."""
        bootstrap = self.settings.kafka
        observer = input_consumer(
            bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=2000,
        )
        member = input_consumer(
            bootstrap,
            group_id=self.group,
            client_id=f"{self.group}.{self.settings.instance}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=1_000,
        )
        return observer, member

    async def run(self, stop: asyncio.Event) -> int:
        bootstrap = self.settings.kafka
        t = self.topics
        publisher = self.publisher = Publisher(bootstrap, client_id=f"{self.group}.{self.settings.instance}")
        observer, member = self.consumers()
        keeper = self.keeper = await self.durable.keeper(bootstrap)
        positions = await keeper.load() if keeper is not None else None
        await publisher.start()
        await observer.start()
        try:
            tps = await partitions_of(observer, self.inputs, bootstrap)
            observer.assign(tps)
            if positions:
                for tp, offset in clamp_positions(positions, await observer.beginning_offsets(tps)).items():
                    observer.seek(tp, offset)
            else:
                await observer.seek_to_beginning(*tps)
            member.subscribe([t.intents], listener=_Listener(self))
            await member.start()
            if self.metrics_port:
                self.metrics_bound = self.metrics.serve(self.metrics_port, self.settings.metrics_addr)
            last_prune = last_commit = time.monotonic()
            try:
                while not stop.is_set():
                    await self._take_over(member)
                    batch = await observer.getmany(timeout_ms=200)
                    for recs in batch.values():
                        for rec in recs:
                            await self._on_record(rec)
                            if keeper is not None:
                                keeper.advance(rec.topic, rec.partition, rec.offset + 1)
                    # The commit (after the outputs are acknowledged) bounds only what a new owner publishes
                    # again, with the same ids: done every COMMIT_EVERY_S and when idle, not between one batch
                    # and the next (a flush and a coordinator round trip on the way from the last marker to the
                    # decisions).
                    if not batch or time.monotonic() - last_commit >= COMMIT_EVERY_S:
                        last_commit = time.monotonic()
                        await publisher.flush()
                        await self._commit(member)
                    if keeper is not None and keeper.due():
                        await publisher.flush()
                        keeper.save_soon()  # after the outputs of the handled inputs are acknowledged
                    # Keeps the membership alive (its partitions are paused: it fetches nothing).
                    await member.getmany(timeout_ms=0)
                    if time.monotonic() - last_prune > PRUNE_EVERY_S:
                        last_prune = time.monotonic()
                        await self._prune(member)
                    self.metrics.owned.set(len(self.owned))
                    self.metrics.held.set(len(self.state.buffer))
                if keeper is not None:  # a clean stop: a snapshot of everything handled
                    await publisher.flush()
                    await keeper.save(final=True)
            finally:
                await member.stop()
                if keeper is not None:
                    await keeper.close()
        finally:
            await observer.stop()
            await publisher.stop()
            self.metrics.close()
        return 0

    async def _on_record(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        intents = rec.topic == self.topics.intents
        if intents:
            self.last_offset[rec.partition] = rec.offset
            self.next_offset[rec.partition] = rec.offset + 1
        admitted = self.admission.admit(rec)
        if isinstance(admitted, Refused):
            # Dead-lettered by the intents' consumer (this service); other topics' records by their own consumers.
            # A far-future time would move the arbiter's event time past every real message.
            if intents:
                await self._dead_letter(rec, admitted.reason)
            else:
                log.warning("ignored %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, admitted.reason)
            return
        msg = admitted.msg
        if intents and isinstance(msg, PlaceOrder):
            self.origin.setdefault(msg.intent_id, (rec.partition, rec.offset))
        for out in await self.handle(msg, rec.partition):
            p, off = self._belongs(out, rec, msg)
            self.retained[p].append((off, out))
            floor = self.owned.get(p)
            if floor is not None and off >= floor:
                await self._publish(out)

    def _belongs(self, out: Message, rec: ConsumerRecord[bytes, bytes], cause: Message) -> tuple[int, int]:
        """The intents partition (and offset) an output belongs to: its intent's, where that was read."""
        if isinstance(out, WorkerFinished):
            p = int(out.instance.rsplit("-", 1)[1])
            return p, self.last_offset.get(p, 0)
        intent_id = getattr(out, "intent_id", None)
        if (
            isinstance(cause, PlaceOrder)
            and cause.intent_id == intent_id
            and rec.topic == self.topics.intents
        ):
            return rec.partition, rec.offset  # decided (or re-sent for a redelivery) on reading it
        if intent_id is not None and intent_id in self.origin:
            return self.origin[intent_id]
        return 0, self.last_offset.get(0, 0)

    async def _publish(self, msg: Message) -> None:
        assert self.publisher is not None
        for topic, key, _ in self.route(msg):
            await self.publisher.send(topic, msg, key=key)
        self.metrics.observe(msg)

    async def _dead_letter(self, rec: ConsumerRecord[bytes, bytes], error: str) -> None:
        floor = self.owned.get(rec.partition)
        if floor is None or rec.offset < floor:
            return  # the owner of the partition dead-letters it
        assert self.publisher is not None
        await self.publisher.send(
            self.topics.dead_letter, self.admission.dead_letter(rec, error), key=rec.topic
        )

    async def _take_over(self, member: AIOKafkaConsumer) -> None:
        """Partitions newly assigned: publish what this process decided for them since their last commit."""
        new = sorted(self.assigned - set(self.owned))
        if not new:
            return
        with contextlib.suppress(Exception):  # the assignment may change again under us: paused next time
            member.pause(*[TopicPartition(self.topics.intents, p) for p in self.assigned])
        for p in new:
            tp = TopicPartition(self.topics.intents, p)
            try:
                floor = await member.committed(tp)
            except KafkaError as err:
                log.warning("cannot read the committed offset of %s (%r); retrying", tp, err)
                continue
            floor = floor or 0
            self.owned[p] = floor
            self.committed[p] = floor
            sent = 0
            for off, msg in self.retained.get(p, []):
                if off >= floor:
                    await self._publish(msg)
                    sent += 1
            log.info(
                "partition %d assigned: publishing from offset %d (%d outputs caught up)", p, floor, sent
            )

    def _safe_offset(self, p: int) -> int:
        """Below this offset every intent of partition p is decided (and its outputs published)."""
        waiting = [
            self.origin[i.intent_id][1]
            for i, part in self.state.buffer
            if part == p and i.intent_id in self.origin
        ]
        return min(waiting) if waiting else self.next_offset.get(p, 0)

    async def _commit(self, member: AIOKafkaConsumer) -> None:
        offsets: dict[TopicPartition, int] = {}
        for p in list(self.owned):
            safe = self._safe_offset(p)
            if safe > self.committed.get(p, 0):
                offsets[TopicPartition(self.topics.intents, p)] = safe
        if not offsets:
            return
        try:
            await member.commit(offsets)
        except LOST_PARTITIONS as err:
            # A rebalance took them (this process paused longer than its session, or another arbiter joined):
            # their next owner publishes from the last commit; this one stops at the revocation and rejoins.
            # Said once until the next assignment: the loop tries again every batch meanwhile.
            if not self.lost_told:
                self.lost_told = True
                log.warning("%s", lost_partitions_line(self.group, offsets, err))
            return
        except (KafkaError, AssertionError) as err:
            # Another failure (the coordinator unreachable while the broker restarts): the next batch commits.
            log.info("commit of %s deferred: %r", sorted(tp.partition for tp in offsets), err)
            return
        for tp, off in offsets.items():
            self.committed[tp.partition] = off
            self._drop_below(tp.partition, off)

    def _drop_below(self, p: int, offset: int) -> None:
        kept = self.retained.get(p)
        if kept:
            self.retained[p] = [(o, m) for o, m in kept if o >= offset]

    async def _prune(self, member: AIOKafkaConsumer) -> None:
        """Outputs of partitions owned elsewhere that their owner has committed are never needed again."""
        for p in list(self.retained):
            if p in self.owned:
                continue
            with contextlib.suppress(KafkaError):
                committed = await member.committed(TopicPartition(self.topics.intents, p))
                if committed:
                    self._drop_below(p, committed)


def bootstrap(settings: ServiceSettings, *, overrides: dict[str, Any] | None = None) -> ArbiterService:
    o = overrides or {}
    cfg: AppConfig = o.get("config") or settings.load()
    return ArbiterService(
        cfg,
        settings,
        clock=o.get("clock", system_clock),
        ids=o.get("ids", random_ids),
        metrics_port=int(o.get("metrics_port", settings.metrics_port)),
    )
