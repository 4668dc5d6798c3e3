"""The monitor service: follows a namespace's audit, events, plans, candles and dead-letter topics and feeds
the audit file, the alerts and the Prometheus metrics; polls consumer lag and service health every N seconds.

Restart behaviour: the monitor's state (positions, PnL, peaks) is derived from the messages. It writes a signed
snapshot of it (the performance tracker, the correlation alert gate) with the next offset of every partition it
covers to the compacted `state.monitor` topic every few seconds and on stop, after the audit file is flushed
and its dead letters acknowledged (docs/architecture.md, "Durable state"). On every partition assignment it
resumes at the newest snapshot's position, or, with none, re-reads the topic from its beginning. Records below
the group's committed offset were already handled by an earlier run: they rebuild the state but raise no alert
again (and the audit file de-duplicates them). Offsets are committed after the audit file is flushed, so the group's lag in
`mpctl lag` is how far the monitor is behind.

Every record passes the admit step (shared/admit.py: decode, plausible time). The monitor is the only
consumer of the audit topic, so it dead-letters what the step refuses there (once: records an earlier run
handled are not dead-lettered again); refused records of the other topics it only counts, their own consumers
dead-letter them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import IllegalStateError

from services.monitor.alerts import (
    Alert,
    AlertDispatcher,
    AlertGate,
    alerts_from_message,
    build_sinks,
    correlation_alerts,
    lag_alerts,
)
from services.monitor.audit_sink import AuditFileSink
from services.monitor.health import fetch_health
from services.monitor.lag import fetch_lag
from services.monitor.metrics import SNAPSHOT_SCHEMA, MonitorMetrics, PerformanceTracker
from shared.admit import Admission, Refused
from shared.clock import system_clock
from shared.config import AppConfig
from shared.kafka import LOST_PARTITIONS, Publisher, lost_partitions_line
from shared.messages import DeadLettered
from shared.runtime import ServiceSettings
from shared.snapshots import Durable, Positions, StateKeeper, clamp_positions, fingerprint
from shared.topics import Topics

log = logging.getLogger("monitor")


@dataclass(frozen=True)
class MonitorOptions:
    audit_file: Path | None = None
    alerts_file: Path | None = None
    webhooks: tuple[str, ...] = ()
    webhook_attempts: int = 3
    webhook_timeout_s: float = 3.0
    metrics_port: int | None = None  # None: no HTTP server; 0: any free port
    metrics_addr: str = (
        "127.0.0.1"  # loopback by default; a container needs 0.0.0.0 for Prometheus to reach it
    )
    lag_interval_s: float = 15.0
    lag_threshold: int = 1000
    correlation_threshold: float = 0.9
    correlation_window: int = 48
    drain: bool = False  # exit once caught up with the topics' end offsets as of start
    stop_drain_timeout_s: float = 5.0
    snapshot_file: Path | None = None  # the tracker's view as JSON, rewritten after each batch with news


@dataclass
class _Progress:
    boundary: dict[TopicPartition, int] = field(default_factory=dict)  # committed offset at assignment
    to_commit: dict[TopicPartition, int] = field(default_factory=dict)
    behind: set[TopicPartition] = field(default_factory=set)  # still re-reading what an earlier run handled


class _SeekToStart(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: MonitorService) -> None:
        self._svc = service

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._svc.commit()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._svc.on_assigned(list(assigned))


class MonitorService:
    def __init__(self, cfg: AppConfig, settings: ServiceSettings, options: MonitorOptions) -> None:
        self.cfg = cfg
        self.settings = settings
        self.opts = options
        self.ns = cfg.system.kafka.namespace
        self.topics = Topics(self.ns)
        self.tracker = PerformanceTracker(
            {pid: Decimal(str(p.paper.initial_quote_balance)) for pid, p in cfg.enabled_profiles().items()},
            correlation_window=options.correlation_window,
        )
        self.metrics = MonitorMetrics(self.ns)
        self.audit = AuditFileSink(options.audit_file) if options.audit_file else None
        self.dispatcher = AlertDispatcher(
            build_sinks(
                options.webhooks,
                alerts_file=options.alerts_file,
                attempts=options.webhook_attempts,
                timeout_s=options.webhook_timeout_s,
            )
        )
        self.lag_gate = AlertGate()
        self.corr_gate = AlertGate()
        self.progress = _Progress()
        self.consumer: AIOKafkaConsumer | None = None
        self.lost_told = False  # the warning that a rebalance took partitions before their commit
        self.metrics_bound: int | None = None
        self.undecodable = 0  # records the admit step refused (undecodable or implausibly timed)
        self.admission = Admission("monitor", system_clock)
        self.dead_letters: list[DeadLettered] = []  # to publish before the next commit
        self.publisher: Publisher | None = None
        self.alerts_raised = 0
        self._last_steps = 0
        self.keeper: StateKeeper | None = None
        self.restored: Positions = {}
        st = cfg.system.state
        self.durable = Durable(
            topic=self.topics.state("monitor"),
            namespace=self.ns,
            service="monitor",
            schema=SNAPSHOT_SCHEMA,
            fingerprint=fingerprint("monitor", self.tracker.initial, options.correlation_window),
            dump=self._dump,
            restore=self._restore,
            interval_s=st.snapshot_interval_s,
            every_messages=st.snapshot_every_messages,
            enabled=st.snapshots,
        )

    def _dump(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker,
            "corr_gate": self.corr_gate,
            "last_steps": self._last_steps,
            "undecodable": self.undecodable,
        }

    def _restore(self, data: dict[str, Any]) -> None:
        self.tracker = data["tracker"]
        self.corr_gate = data["corr_gate"]
        self._last_steps = data["last_steps"]
        self.undecodable = data["undecodable"]

    @property
    def watched_topics(self) -> list[str]:
        t = self.topics
        return [t.audit, t.events, t.decisions, t.plans, t.candles, t.dead_letter]

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        self.lost_told = False
        c = self.consumer
        if c is None or not assigned:
            return
        begins = await c.beginning_offsets(assigned)
        starts = clamp_positions(self.restored, begins)  # the snapshot's positions, else the beginnings
        for tp in assigned:
            committed = await c.committed(tp)
            self.progress.boundary[tp] = int(committed) if committed is not None else 0
            if self.progress.boundary[tp] > starts[tp]:
                self.progress.behind.add(tp)
            c.seek(tp, starts[tp])
        log.info(
            "assigned %d partition(s); reading them from %s",
            len(assigned),
            "the snapshot's positions" if self.restored else "their beginning",
        )

    async def commit(self) -> None:
        if self.dead_letters and self.publisher is not None:
            # The effect before the offset: a dead letter is out before its record counts as handled.
            pending, self.dead_letters = self.dead_letters, []
            for dl in pending:
                await self.publisher.send(self.topics.dead_letter, dl, key=dl.source_topic)
            await self.publisher.flush()
        if self.consumer is not None and self.progress.to_commit:
            if self.audit is not None:
                self.audit.flush()
            offsets, self.progress.to_commit = self.progress.to_commit, {}
            try:
                await self.consumer.commit(offsets)
            except LOST_PARTITIONS as err:
                # A rebalance took them (this process paused longer than its session, or another monitor
                # joined): their next owner reads from the last commit. Said once until the next assignment.
                if not self.lost_told:
                    self.lost_told = True
                    log.warning("%s", lost_partitions_line(self.topics.group("monitor"), offsets, err))
            except Exception as err:  # the coordinator unreachable: the next batch commits again
                log.debug("commit deferred: %r", err)
        if self.keeper is not None and self.keeper.due():
            await self.keeper.save()  # the audit file flushed, the dead letters acknowledged

    def _raise(self, alerts: list[Alert]) -> None:
        # Counted once the dispatcher took them: a message read on two topics raises its alert once.
        for a in self.dispatcher.emit(alerts):
            self.metrics.alerts.labels(kind=a.kind).inc()
            self.alerts_raised += 1

    def handle(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        tp = TopicPartition(rec.topic, rec.partition)
        self.metrics.messages.labels(topic=rec.topic).inc()
        admitted = self.admission.admit(rec)
        if isinstance(admitted, Refused):
            self.undecodable += 1
            # Other topics' consumers dead-letter their records; audit.log is only ours.
            if rec.topic == self.topics.audit and rec.offset >= self.progress.boundary.get(tp, 0):
                self.dead_letters.append(self.admission.dead_letter(rec, admitted.reason))
        else:
            msg = admitted.msg
            self.tracker.add(msg)
            if self.audit is not None and rec.topic == self.topics.audit:
                self.audit.write(msg)
            if rec.offset >= self.progress.boundary.get(tp, 0):
                self._raise(alerts_from_message(msg, self.ns))
        if rec.offset + 1 >= self.progress.boundary.get(tp, 0):
            self.progress.behind.discard(tp)
        if rec.offset + 1 > self.progress.boundary.get(tp, 0):
            self.progress.to_commit[tp] = rec.offset + 1
        if self.keeper is not None:
            self.keeper.advance(rec.topic, rec.partition, rec.offset + 1)

    def after_batch(self) -> None:
        self.metrics.update_performance(self.tracker)
        if self.audit is not None:
            self.metrics.audit_lines.set(len(self.audit))
        self.metrics.alerts_dropped.set(self.dispatcher.dropped)
        for sink, n in self.dispatcher.failed.items():
            self.metrics.alert_failures.labels(sink=sink).set(n)
        # Measured alerts wait until the re-read of already handled records is over: they were raised then.
        if self.tracker.steps != self._last_steps and not self.progress.behind:
            self._last_steps = self.tracker.steps
            alerts = correlation_alerts(
                self.tracker.correlations(),
                self.opts.correlation_threshold,
                self.corr_gate,
                now=datetime.fromtimestamp(self.tracker.step_time or time.time(), UTC),
                window=self.opts.correlation_window,
                namespace=self.ns,
            )
            self._raise(alerts)
        self._write_snapshot_file()

    def _write_snapshot_file(self) -> None:
        if self.opts.snapshot_file is not None:
            self.opts.snapshot_file.write_bytes(
                orjson.dumps(self.tracker.snapshot(), option=orjson.OPT_INDENT_2)
            )

    async def poll_once(self) -> None:
        bootstrap = self.settings.kafka
        report = await fetch_lag(bootstrap, self.ns)
        self.metrics.update_lag(report)
        self.metrics.update_health(await fetch_health(bootstrap, self.cfg, self.ns))
        own = self.topics.group("monitor")
        alerts = lag_alerts(
            # Not its own group: it is behind by design while it re-reads the topics after a start.
            {g.group: g.total for g in report.groups if g.group != own},
            self.opts.lag_threshold,
            self.lag_gate,
            now=datetime.now(UTC),
            namespace=self.ns,
        )
        self._raise(alerts)

    async def _poll_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll_once()
            except Exception as err:  # the broker may be restarting; the next poll tries again
                log.warning("lag/health poll failed: %s: %s", type(err).__name__, err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.opts.lag_interval_s)

    async def _process(self, batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        if not batches:
            return
        for recs in batches.values():
            for rec in recs:
                self.handle(rec)
        self.after_batch()
        await self.commit()

    async def _caught_up(self, ends: dict[TopicPartition, int]) -> bool:
        c = self.consumer
        assert c is not None
        for tp, end in ends.items():
            try:
                if tp in c.assignment() and await c.position(tp) < end:
                    return False
            except IllegalStateError:
                continue  # taken by a rebalance while asked: its new owner reads it
        return True

    async def _consume_until(self, ends: dict[TopicPartition, int], deadline: float) -> None:
        c = self.consumer
        assert c is not None
        while time.monotonic() < deadline and not await self._caught_up(ends):
            await self._process(await c.getmany(timeout_ms=200))

    async def _wait_assignment(self, stop: asyncio.Event, timeout: float = 30.0) -> None:
        c = self.consumer
        assert c is not None
        deadline = time.monotonic() + timeout
        while not c.assignment() and not stop.is_set() and time.monotonic() < deadline:
            await self._process(await c.getmany(timeout_ms=200))  # joining the group happens while polling

    async def _ends(self) -> dict[TopicPartition, int]:
        c = self.consumer
        assert c is not None
        tps = list(c.assignment())
        return dict(await c.end_offsets(tps)) if tps else {}

    async def run(self, stop: asyncio.Event) -> int:
        if self.audit is not None:
            self.audit.open()
        if self.opts.metrics_port is not None:
            self.metrics_bound = self.metrics.serve(self.opts.metrics_port, self.opts.metrics_addr)
        self.dispatcher.start()
        self.consumer = AIOKafkaConsumer(
            **self.settings.kafka.client_options(),
            group_id=self.topics.group("monitor"),
            client_id=f"{self.topics.group('monitor')}.{self.settings.instance}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            max_poll_records=2000,
        )
        poller: asyncio.Task[None] | None = None
        self.publisher = Publisher(self.settings.kafka, client_id=f"{self.topics.group('monitor')}.dlq")
        try:
            self.keeper = await self.durable.keeper(self.settings.kafka)
            if self.keeper is not None:
                self.restored = await self.keeper.load() or {}
            await self.publisher.start()
            await self.consumer.start()
            self.consumer.subscribe(self.watched_topics, listener=_SeekToStart(self))
            await self._wait_assignment(stop)
            if self.opts.drain:
                await self._consume_until(await self._ends(), float("inf"))
                # Also when a restored state left nothing new to read: the file shows the state drained to.
                self._write_snapshot_file()
                with contextlib.suppress(Exception):
                    await self.poll_once()
                log.info("drained: %d audit line(s), %d alert(s)", len(self.audit or ()), self.alerts_raised)
                return 0
            poller = asyncio.create_task(self._poll_loop(stop), name="lag-poller")
            while not stop.is_set():
                await self._process(await self.consumer.getmany(timeout_ms=500))
            # Stopping: take in what the other services wrote up to now, so the audit file is complete.
            await self._consume_until(await self._ends(), time.monotonic() + self.opts.stop_drain_timeout_s)
            return 0
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            committed = False
            with contextlib.suppress(Exception):
                await self.commit()
                committed = True
            if self.keeper is not None:
                with contextlib.suppress(
                    Exception
                ):  # a broker already gone: the last periodic snapshot stands
                    if committed:
                        await self.keeper.save(final=True)
                    await self.keeper.close()
            await self.consumer.stop()
            with contextlib.suppress(Exception):  # a broker already gone: the records are re-read next start
                await self.publisher.stop()
            await self.dispatcher.close()
            if self.audit is not None:
                self.audit.close()
            self.metrics.close()


def bootstrap(
    settings: ServiceSettings, options: MonitorOptions, *, overrides: dict[str, Any] | None = None
) -> MonitorService:
    o = overrides or {}
    cfg: AppConfig = o.get("config") or settings.load()
    return MonitorService(cfg, settings, options)
