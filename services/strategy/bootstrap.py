"""Wiring of one profile's strategy worker: a faust-streaming app (one consumer group per profile) whose agents
feed market data, the profile's plans and its order outcomes into the pure state machine of domain.py.

The worker sees only its own plan and order events (it filters by profile) and the market data.
A lock serialises decide-and-send, so one step's intents always precede its StepCompleted marker on every
intents partition.

State after a crash: the state is a deterministic function of the worker's input logs (md.candles,
registry.plans, orders.events, orders.decisions), whatever their interleaving. The worker writes a signed
snapshot of it, with the next offset of every input partition it covers, to its compacted state topic every
few seconds and on a clean stop (shared/snapshots.py), after the producer has flushed the outputs of those
inputs. Every start
restores the newest snapshot and resumes each input there; with none, it reads the inputs from the
beginning. Either way, before faust starts, the group's committed offsets are set to those positions (faust's
own start seeks to the committed offsets, so a seek of ours would be overridden). Faust still commits while
the worker runs, so consumer lag stays meaningful. What the rebuild re-sends (intents, step markers, halts)
carries the ids of the first run, and every consumer de-duplicates them (docs/backtest.md, "State that
survives a crash"; docs/architecture.md, "Durable state").
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from faust.transport.drivers import aiokafka as faust_aiokafka

from services.strategy import domain
from services.strategy.metrics import StrategyMetrics
from services.strategy.routing import ForeignKeys, Outputs, routes
from shared.admit import Admission, Refused
from shared.bus import SASL_MECHANISM, KafkaAccess
from shared.clock import system_clock
from shared.codec import encode
from shared.commands import gate_for
from shared.config import AppConfig
from shared.kafka import WORKER_FETCH_MAX_WAIT_MS, partitions_of
from shared.messages import (
    ControlCommand,
    Message,
    OrderFilled,
    OrderUpdated,
)
from shared.runtime import ServiceSettings
from shared.snapshots import (
    Durable,
    Positions,
    StateKeeper,
    clamp_positions,
    dataclass_dump,
    dataclass_restore,
    fingerprint,
)
from shared.topics import Topics

log = logging.getLogger("strategy")

SESSION_TIMEOUT_S = 10.0


def input_topics(topics: Topics) -> list[str]:
    """What the worker reads: market data, plans, order outcomes (the arbiter's decisions and the execution
    workers' order events: the backtest routes the same to it), and operator commands (none in a backtest)."""
    return [topics.candles, topics.plans, topics.events, topics.decisions, topics.commands]


def faust_credentials(access: KafkaAccess) -> faust.SASLCredentials | None:
    """The worker's principal in faust's terms (SCRAM over TLS); None on an unauthenticated broker."""
    if access.username is None or access.password is None:
        return None
    return faust.SASLCredentials(
        username=access.username,
        password=access.password.get_secret_value(),
        ssl_context=access.ssl_context(),
        mechanism=SASL_MECHANISM,
    )


def faust_datadir(owner: object, group: str) -> str:
    """A private folder for faust's data directory, removed when `owner` is collected or the process exits.

    faust creates "<datadir>/v1/tables" even with the memory store, and its default datadir is "<app id>-data" in
    the working directory (a demo left one per profile there). The memory store keeps nothing on disk, so the
    folder is temporary: nothing in the working directory, nothing left in the temporary one either.
    """
    parent = tempfile.mkdtemp(prefix=f"mp-faust-{group}-")
    weakref.finalize(owner, shutil.rmtree, parent, ignore_errors=True)
    return os.path.join(parent, "data")  # faust creates the leaf only


@dataclass(frozen=True, slots=True)
class HeldRecord:
    """A consumed record as the admit step and the dead-letter path read it (shared/admit.py Record): faust's
    own records give the time in seconds, and are not kept while an outcome waits to be judged."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


async def reset_group_to_beginning(
    bootstrap: KafkaAccess,
    group: str,
    topics: list[str],
    *,
    wait_s: float,
    positions: Positions | None = None,
) -> dict[tuple[str, int], int]:
    """Commit the beginning offset of every partition of `topics` for `group` (or, for the partitions a
    restored snapshot covers, its position), so the next consumer of the group reads from there. Kafka accepts
    such a commit only while the group has no member: after a SIGKILL the dead member stays until its session
    times out, hence the retries for up to `wait_s`.

    Returns the offsets the group had committed before (what the previous process had consumed), per
    (topic, partition): the metrics count only records from there on."""
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await partitions_of(consumer, topics, bootstrap)
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        starts = clamp_positions(positions or {}, begins)
        before = {}
        for tp in tps:
            committed = await consumer.committed(tp)
            before[(tp.topic, tp.partition)] = int(committed) if committed is not None else begins[tp]
        deadline = time.monotonic() + wait_s
        while True:
            try:
                await consumer.commit({tp: starts[tp] for tp in tps})
                return before
            except KafkaError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"consumer group {group!r} still has members after {wait_s:.0f} s ({err!r}): is another "
                        "strategy worker of this profile running?"
                    ) from None
                log.info(
                    "group %s not empty yet (%r); waiting for the previous member's session to end",
                    group,
                    err,
                )
                await asyncio.sleep(0.5)
    finally:
        await consumer.stop()


def max_publish_lag_s(cfg: AppConfig) -> float:
    """A live step normally goes out within its grace, re-polls and deadline; one published later is history."""
    md = cfg.system.market_data
    return md.grace_s + md.deadline_s + md.poll_interval_s


class _InputConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> AIOKafkaConsumer:
        consumer: AIOKafkaConsumer = super()._create_worker_consumer(transport)
        # faust hard-codes a 1,500 ms long poll; a per-profile worker's inputs wait WORKER_FETCH_MAX_WAIT_MS (shared/kafka.py).
        consumer._fetch_max_wait_ms = WORKER_FETCH_MAX_WAIT_MS  # noqa: SLF001 - read by start(), which comes later
        return consumer


class _InputConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _InputConsumerThread:
        return _InputConsumerThread(self, loop=self.loop, beacon=self.beacon)


class InputTransport(faust_aiokafka.Transport):
    """faust's Kafka transport whose worker consumer waits at most WORKER_FETCH_MAX_WAIT_MS in a fetch."""

    Consumer = _InputConsumer


class StrategyWorker:
    def __init__(self, cfg: AppConfig, settings: ServiceSettings) -> None:
        if settings.profile not in cfg.profiles:
            raise ValueError(
                f"--profile {settings.profile!r} is not in the config (have {sorted(cfg.profiles)})"
            )
        self.profile_id: str = settings.profile
        self.cfg = cfg
        self.settings = settings
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
        self.lock = asyncio.Lock()
        self.commands = gate_for(f"strategy.{self.profile_id}", cfg.system.commands.max_age_s)
        self.admission = Admission(f"strategy.{self.profile_id}", system_clock, self.commands)
        self.metrics = StrategyMetrics(self.profile_id)
        self.metrics_port = settings.metrics_port
        self.metrics_addr = settings.metrics_addr
        self.metrics_bound: int | None = None
        self._short = {name: name[len(self.t.ns) + 1 :] for name in self.inputs}
        self.app = faust.App(
            self.group,
            broker=f"kafka://{settings.kafka.servers}",
            broker_credentials=faust_credentials(settings.kafka),
            store="memory://",
            # No faust web server: metrics are served by StrategyMetrics, and a port per worker would only clash.
            web_enabled=False,
            topic_disable_leader=True,
            topic_allow_declare=False,
            consumer_auto_offset_reset="earliest",
            broker_heartbeat_interval=1.0,
            broker_session_timeout=SESSION_TIMEOUT_S,
            producer_acks=-1,
            stream_wait_empty=False,
            datadir=faust_datadir(self, self.group),
        )
        self.app.conf.web_enabled = False  # the constructor flag alone still bound 0.0.0.0:6066
        self.app.transport = InputTransport(self.app.conf.broker_consumer, self.app)
        self.out: dict[str, Any] = {}
        # Records of outcomes for intents this worker did not send, by message id, until the domain judges them.
        self.held_records: dict[str, tuple[str, deque[HeldRecord]]] = {}
        for name in self.inputs:
            self.app.agent(self._topic(name), name=f"consume-{name}")(self._agent)
        self.keeper: StateKeeper | None = None
        self.snapshot_lock = asyncio.Lock()
        st = cfg.system.state
        self.durable = Durable(
            topic=self.t.state("strategy", self.profile_id),
            namespace=self.t.ns,
            service=f"strategy.{self.profile_id}",
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
        self.app.timer(interval=min(1.0, st.snapshot_interval_s), name="snapshots")(self._snapshot_tick)
        self.app.on_before_shutdown.connect(self._on_shutdown)

    # ------------------------------------------------------------------------------------ durable state
    def _dump(self) -> dict[str, Any]:
        return {"state": dataclass_dump(self.state, domain.CONFIG_FIELDS), "held_records": self.held_records}

    def _restore(self, data: dict[str, Any]) -> None:
        dataclass_restore(self.state, data["state"])
        self.held_records = data["held_records"]

    def _advance(self, rec: Any) -> None:
        if self.keeper is not None:
            self.keeper.advance(rec.topic, rec.partition, rec.offset + 1)

    async def snapshot(self, *, final: bool = False) -> None:
        """A snapshot of every input handled so far, once their outputs are acknowledged."""
        keeper = self.keeper
        if keeper is None:
            return
        async with self.snapshot_lock:
            async with self.lock:  # no input is handled meanwhile: the state and positions are of one moment
                await self.app.producer.flush()
                data = keeper.capture()
            if data is not None:
                await keeper.write(data, final=final)

    async def _snapshot_tick(self) -> None:
        if self.keeper is not None and self.keeper.due():
            try:
                await self.snapshot()
            except Exception as err:  # the broker may be restarting: the next tick tries again
                log.warning("snapshot failed: %s: %s", type(err).__name__, err)

    async def _on_shutdown(self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # The consumers have stopped: a last snapshot covers everything handled.
        try:
            await self.snapshot(final=True)
        except Exception as err:
            log.warning("final snapshot failed: %s: %s", type(err).__name__, err)
        if self.keeper is not None:
            await self.keeper.close()

    def _topic(self, name: str) -> Any:
        # Raw bytes in and out: our own codec (orjson + pydantic) decodes, so bad bytes reach the dead-letter path.
        topic = self.out.get(name)
        if topic is None:
            topic = self.out[name] = self.app.topic(name, value_serializer="raw", key_serializer="raw")
        return topic

    async def _agent(self, stream: Any) -> None:
        async for event in stream.events():
            rec = event.message
            # faust gives the Kafka timestamp in seconds (a float); everything here counts milliseconds.
            published_ms = round(rec.timestamp * 1000) if rec.timestamp is not None else None
            self.metrics.consumed(rec.topic, rec.partition, rec.offset, self._short.get(rec.topic, rec.topic))
            if self.foreign.skips(rec.topic, rec.key):
                async with (
                    self.lock
                ):  # nothing for this profile: only its position moves (routing.ForeignKeys)
                    self._advance(rec)
                continue
            # faust's record, with the bytes our codec decodes (raw serializer) and the time in milliseconds.
            record = HeldRecord(
                rec.topic,
                rec.partition,
                rec.offset,
                rec.key,
                event.value,
                published_ms if published_ms is not None else round(system_clock().timestamp() * 1000),
            )
            admitted = self.admission.admit(record)
            if isinstance(admitted, Refused):
                await self._dead_letter(record, admitted.reason)
                self._advance(rec)
                continue
            msg = admitted.msg
            if admitted.verdict is not None:
                await self._publish(admitted.verdict)
                if not admitted.act:
                    self.metrics.error("command_refused", rec.topic, rec.partition, rec.offset)
                    self._advance(rec)
                    continue
            async with self.lock:
                if (
                    isinstance(msg, OrderFilled | OrderUpdated)
                    and msg.profile == self.profile_id
                    and msg.intent_id not in self.state.emitted
                ):
                    # Held by the domain, maybe refused later: keep the record to dead-letter it then.
                    self.held_records.setdefault(msg.id, (msg.intent_id, deque()))[1].append(record)
                # The record's Kafka time places a rotate command among the steps (domain.py).
                outs = domain.decide(self.state, msg, rec.partition, published_ms)
                for out in outs:
                    await self._publish(out)
                for refusal in domain.take_refused(self.state):
                    await self._dead_letter_refused(refusal)
                if self.held_records and outs:
                    # Outcomes judged at a step and applied: their records are no longer needed.
                    for mid, (intent_id, _) in list(self.held_records.items()):
                        if not domain.awaits(self.state, intent_id):
                            del self.held_records[mid]
                if outs or isinstance(msg, OrderFilled | ControlCommand):
                    self.metrics.update(self.state)
                self._advance(rec)

    async def _dead_letter_refused(self, refusal: domain.Refusal) -> None:
        recs = self.held_records.get(refusal.outcome.id)
        if not recs or not recs[1]:
            # Cannot happen (every foreign outcome's record is kept until judged); say so rather than lose it.
            log.error("refused %s, but its record is unknown: %s", refusal.outcome.id, refusal.reason)
            return
        await self._dead_letter(recs[1].popleft(), refusal.reason)

    async def _dead_letter(self, rec: HeldRecord, error: str) -> None:
        self.metrics.error("dead_lettered", rec.topic, rec.partition, rec.offset)
        dl = self.admission.dead_letter(rec, error)
        await self._topic(self.t.dead_letter).send(key=rec.topic.encode(), value=encode(dl))

    async def _publish(self, msg: Message) -> None:
        data = encode(msg)
        for topic, key, partition in routes(msg, self.outputs):
            await self._topic(topic).send(key=key, value=data, partition=partition)

    def run(self) -> int:
        # Before faust joins the group: the rebuild starts from the beginning of every input.
        # On the loop faust then runs on (asyncio.run would leave no current loop behind for it).
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        bootstrap = self.settings.kafka
        self.keeper = loop.run_until_complete(self.durable.keeper(bootstrap))
        positions = loop.run_until_complete(self.keeper.load()) if self.keeper is not None else None
        if positions is not None:
            self.metrics.update(self.state)
        self.metrics.counted_from = loop.run_until_complete(
            reset_group_to_beginning(
                bootstrap, self.group, self.inputs, wait_s=3 * SESSION_TIMEOUT_S, positions=positions
            )
        )
        if self.metrics_port:
            self.metrics_bound = self.metrics.serve(self.metrics_port, self.metrics_addr)
        # The logging set up by shared.runtime.main_entry stays (faust's would replace it): the same format as
        # every service, and the filter that collapses a broker outage's connection errors.
        worker = faust.Worker(
            self.app, loglevel="warn", quiet=True, redirect_stdouts=False, override_logging=False
        )
        try:
            worker.execute_from_commandline()
        finally:
            self.metrics.close()
        return 0


def bootstrap(settings: ServiceSettings, *, overrides: dict[str, Any] | None = None) -> StrategyWorker:
    o = overrides or {}
    cfg: AppConfig = o.get("config") or settings.load()
    return StrategyWorker(cfg, settings)
