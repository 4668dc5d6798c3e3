"""Kafka helpers over aiokafka: topic declaration, a publisher, and a consume loop that commits offsets only
after the effects of a batch are flushed, and dead-letters what cannot be decoded.

Nothing connects at import time; every object is built by a service's `bootstrap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)

from shared.admit import Admission, Admitted, Record, Refused, admit
from shared.bus import KafkaAccess
from shared.clock import Clock
from shared.codec import DecodeError, decode, encode
from shared.commands import CommandGate
from shared.messages import ControlCommand, Message
from shared.snapshots import Durable, Positions, StateKeeper, clamp_positions
from shared.topics import Route as Route  # re-exported: the bootstraps name it here
from shared.topics import TopicSpec

log = logging.getLogger(__name__)

# How long a producer keeps a message while its partition has no leader (a broker restarting) before failing.
PRODUCER_REQUEST_TIMEOUT_MS = 300_000

# How long the broker may hold a fetch of a service's input consumer when there is nothing to return. A
# consumer's client sends its other requests (offsets, metadata) on the connection its fetch uses, and the
# broker answers a connection's requests in order: behind aiokafka's default long poll (500 ms; faust's worker,
# which the strategy used until issue 16: 1,500 ms) such a request waited for the poll to expire (the registry's
# offsets request per batch did, 1.2 s per step). No consumer on a step's way from candle to order sends such
# a request per batch any more; new data ends a poll at once whatever this is, so the value only bounds what a
# rare request (a metadata refresh, a seek) can wait. Each empty poll costs CPU: an idle 8-profile stack used
# 0.12 cores with the defaults, 0.16 with 100 ms, 0.23 with 50 ms, 0.41 with 20 ms (docs/benchmarks.md). Every
# input consumer on the hot path is built with it: `input_consumer`, and the per-profile workers' ConsumeLoop
# (below).
FETCH_MAX_WAIT_MS = 50

# The same for the per-profile workers' input consumers (the ConsumeLoop of the execution and strategy workers):
# 2P of them, so their empty polls are what an idle stack spends (100 profiles at 50 ms: about 2.5 cores of
# clients and 1 of the broker, more than this machine's two; docs/scaling.md). They send nothing besides
# their fetch per batch on the fetch connection (commits and heartbeats go to the coordinator's own connection),
# so a longer wait costs no step latency (docs/benchmarks.md, "A hundred profiles"); it bounds only what a seek
# after a rebalance waits.
WORKER_FETCH_MAX_WAIT_MS = 500

# How often a consume loop that rebuilds its state on start (the strategy and paper execution workers) commits
# what it handled. Its committed offsets serve lag monitoring only, so a commit per batch bought nothing but a
# producer flush and a coordinator round trip between one batch and the next, on the way from candle to order.
REBUILD_COMMIT_INTERVAL_S = 1.0


def input_consumer(bootstrap: KafkaAccess, **options: Any) -> AIOKafkaConsumer:
    """The consumer of a service's inputs: `options` as AIOKafkaConsumer's, the fetch wait FETCH_MAX_WAIT_MS."""
    options.setdefault("fetch_max_wait_ms", FETCH_MAX_WAIT_MS)
    return AIOKafkaConsumer(**bootstrap.client_options(), **options)


# What a group member's commit (or seek) raises once a rebalance took its partitions: the process was paused
# (SIGSTOP, a VM or GC pause) longer than its session, went longer than max_poll_interval_ms between polls, or
# another member joined meanwhile. aiokafka raises CommitFailedError for a rebalance in progress, a stale
# generation or an unknown member id, IllegalStateError for a partition no longer assigned. The member rejoins
# on its next poll; the partitions' next owner reads from the last commit (at least once).
LOST_PARTITIONS = (CommitFailedError, IllegalStateError)


def lost_partitions_line(group: str, partitions: Iterable[TopicPartition], err: Exception | None) -> str:
    """The one warning a member logs when a rebalance took partitions before it committed them."""
    names = ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(partitions)) or "none"
    why = type(err).__name__ if err is not None else "no longer assigned"
    return (
        f"group {group}: partitions {names} were lost to another member or a rebalance before this member "
        f"committed them ({why}; was the process paused longer than its session?): their next owner reads "
        "them from the last commit; rejoining the group"
    )


class HandlingError(ValueError):
    """A well-formed message a handler refuses (bad values); it goes to the dead-letter topic with the reason."""


async def ensure_topics(
    bootstrap: KafkaAccess, specs: Sequence[TopicSpec], *, replication_factor: int = 1
) -> None:
    """Create the declared topics; existing ones are checked for their partition count."""
    admin = AIOKafkaAdminClient(**bootstrap.client_options(), request_timeout_ms=30_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=replication_factor,
                topic_configs=s.configs(),
            )
            for s in specs
            if s.name not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process won the race; checked below
                await admin.create_topics(new, validate_only=False)
        # Right after creation the metadata may still list 0 partitions, or partitions without a leader (a
        # producer sending then logs NotLeaderForPartitionError): ask again until every partition has a leader.
        for attempt in range(100):
            described = await admin.describe_topics([s.name for s in specs])
            counts = {d["topic"]: len(d["partitions"]) for d in described}
            led = all(
                p.get("error_code", 0) == 0 and p.get("leader", -1) >= 0
                for d in described
                for p in d["partitions"]
            )
            if (all(counts.get(s.name) for s in specs) and led) or attempt == 99:
                break
            await asyncio.sleep(0.1)
        for s in specs:
            have = counts.get(s.name)
            if not have:
                raise RuntimeError(f"topic {s.name!r} was not created on {bootstrap}")
            if have != s.partitions:
                raise RuntimeError(
                    f"topic {s.name!r} has {have} partitions but {s.partitions} are declared; "
                    "delete it or change system.kafka settings"
                )
    finally:
        await admin.close()


async def delete_topics(bootstrap: KafkaAccess, names: Iterable[str]) -> None:
    admin = AIOKafkaAdminClient(**bootstrap.client_options())
    await admin.start()
    try:
        wanted = list(names)
        existing = set(await admin.list_topics())
        todo = [n for n in wanted if n in existing]
        if todo:
            with contextlib.suppress(UnknownTopicOrPartitionError):
                await admin.delete_topics(todo)
    finally:
        await admin.close()


async def list_topics(bootstrap: KafkaAccess) -> list[str]:
    admin = AIOKafkaAdminClient(**bootstrap.client_options())
    await admin.start()
    try:
        return sorted(await admin.list_topics())
    finally:
        await admin.close()


async def partitions_of(
    consumer: AIOKafkaConsumer, topics: Sequence[str], bootstrap: KafkaAccess, *, attempts: int = 100
) -> list[TopicPartition]:
    """Every partition of `topics`, in topic then partition order, asking for metadata until a fresh client
    knows them: at most `attempts` metadata refreshes per topic, 0.1 s apart. A topic still unknown raises
    RuntimeError naming it."""
    tps: list[TopicPartition] = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic)
        for _ in range(attempts):
            if parts:
                break
            # A fresh client may not have the topic's metadata yet: track it and refresh. Not by subscribing, which
            # a consumer with a group_id answers by joining the group, and a later assign() then breaks aiokafka's
            # coordinator ("Should not be called", seen when an authenticated client's first metadata came late).
            await consumer._client.add_topic(topic)  # noqa: SLF001 - no public refresh in aiokafka
            await consumer._client.force_metadata_update()  # noqa: SLF001
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await asyncio.sleep(0.1)
        if not parts:
            raise RuntimeError(f"topic {topic!r} not found on {bootstrap}; create the topics first")
        tps += [TopicPartition(topic, p) for p in sorted(parts)]
    return tps


async def read_topics(bootstrap: KafkaAccess, topics: Sequence[str]) -> tuple[list[Message], int]:
    """All decodable messages of `topics` up to their end offsets at the time of the call, in topic, partition
    and offset order per partition (partitions interleave as the broker delivers them); returns them and the
    number of undecodable records skipped. Reads with no group (nothing committed) and no isolation filter.
    A topic unknown to the cluster after about 5 s raises RuntimeError."""
    consumer = AIOKafkaConsumer(
        **bootstrap.client_options(),
        enable_auto_commit=False,
        max_poll_records=5000,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    out: list[Message] = []
    bad = 0
    try:
        tps = await partitions_of(consumer, topics, bootstrap, attempts=50)
        if not tps:
            return out, bad
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, begins[tp])
        remaining = {tp for tp in tps if ends[tp] > begins[tp]}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, recs in batch.items():
                for rec in recs:
                    if rec.offset >= ends[tp]:
                        continue
                    try:
                        out.append(decode(rec.value))
                    except DecodeError:
                        bad += 1
            for tp in list(remaining):
                # The position, not the last record: transaction markers can sit at the end of a partition.
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        return out, bad
    finally:
        await consumer.stop()


async def read_tail(
    bootstrap: KafkaAccess, topic: str, *, records: int, now: Clock, partitions: Sequence[int] | None = None
) -> list[tuple[int, Message]]:
    """The last `records` records of each partition of `topic` (or of `partitions`), decoded, as (partition,
    message) in offset order: what a producer reads back to resume. Undecodable records are skipped, and so are
    records timed implausibly far ahead of `now`: a forged far-future record must not make a producer skip
    real work."""
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False)
    await consumer.start()
    out: list[tuple[int, Message]] = []
    try:
        if partitions is None:
            tps = await partitions_of(consumer, [topic], bootstrap)
        else:
            tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            pos = max(0, ends[tp] - records)
            consumer.seek(tp, pos)
            while pos < ends[tp]:
                recs = (await consumer.getmany(tp, timeout_ms=2000)).get(tp, [])
                if not recs:
                    break
                for rec in recs:
                    admitted = admit(rec, now=now())
                    if isinstance(admitted, Admitted):
                        out.append((tp.partition, admitted.msg))
                pos = recs[-1].offset + 1
    finally:
        await consumer.stop()
    return out


class Publisher:
    """Idempotent producer (acks=all). `send` queues; `flush` waits until everything queued is acknowledged."""

    def __init__(self, bootstrap: KafkaAccess, *, client_id: str) -> None:
        self._producer = AIOKafkaProducer(
            **bootstrap.client_options(),
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            # aiokafka fails a queued batch whose partition has had no leader for this long, and the service
            # then stops: its 40 s default is shorter than a broker restart on a loaded machine.
            request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
        )
        self._pending: list[asyncio.Future[Any]] = []
        self._partitions: dict[str, list[int]] = {}

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self.flush()
        await self._producer.stop()

    async def send(
        self, topic: str, msg: Message, *, key: str | bytes | None, partition: int | None = None
    ) -> None:
        fut = await self._producer.send(
            topic, encode(msg), key=key.encode() if isinstance(key, str) else key, partition=partition
        )
        self._pending.append(fut)

    async def partitions(self, topic: str) -> list[int]:
        if topic not in self._partitions:
            parts = await self._producer.partitions_for(topic)
            if not parts:
                raise RuntimeError(
                    f"topic {topic!r} does not exist; run `mpctl infra up` / topic creation first"
                )
            self._partitions[topic] = sorted(parts)
        return self._partitions[topic]

    async def send_to_all_partitions(self, topic: str, msg: Message) -> None:
        """Markers (watermarks, step ends) must reach every partition so each consumer sees them in order."""
        for p in await self.partitions(topic):
            await self.send(topic, msg, key=None, partition=p)

    async def flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            await asyncio.gather(*pending)


@dataclass
class Outbox:
    """Messages a handler wants published; the loop sends them in order, flushes, then commits the inputs.

    An item: (topic, message, key, broadcast, partition); partition None: the key's (or the producer's) choice."""

    items: list[tuple[str, Message, str | bytes | None, bool, int | None]] = field(default_factory=list)

    def add(self, topic: str, msg: Message, key: str | bytes | None, *, partition: int | None = None) -> None:
        self.items.append((topic, msg, key, False, partition))

    def broadcast(self, topic: str, msg: Message) -> None:
        self.items.append((topic, msg, None, True, None))


# A service's decisions on an admitted record (shared/admit.py): outputs go in the outbox, published before the
# record's offset is committed.
Handler = Callable[[Admitted, ConsumerRecord[bytes, bytes], Outbox], Awaitable[None]]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Tells the loop which partitions a rebalance took (it stops handling their records of the batch in hand),
    and with `rebuild` reads every assigned partition from where this process's state is.

    Rebuild: the service rebuilds its state from its snapshot and its input log (shared/snapshots.py). A
    partition is read from the position this process already applied (a partition that comes back after a
    rebalance: its records are in the state once, never twice), else from the position its restored snapshot
    covers, else from its beginning. Its handlers are deterministic and their outputs carry ids derived from the
    inputs, so what is re-published after a restart repeats ids every consumer already de-duplicates. Committed
    offsets then serve lag monitoring only.
    """

    def __init__(self, loop: ConsumeLoop, positions: Positions | None, *, rebuild: bool) -> None:
        self._loop = loop
        self._positions = positions or {}
        self._rebuild = rebuild

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._loop.revoked.update(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        parts = list(assigned)
        if not self._rebuild or not parts:
            return
        consumer = self._loop.consumer
        applied = self._loop.applied
        for tp in parts:
            if tp in applied:
                consumer.seek(tp, applied[tp])
        fresh = [tp for tp in parts if tp not in applied]
        if not fresh:
            return
        # What the group had consumed before this process: its metrics count only records from there on.
        committed = await asyncio.gather(*(consumer.committed(tp) for tp in fresh))
        for tp, offset in zip(fresh, committed, strict=True):
            if offset is not None:
                self._loop.committed_before[(tp.topic, tp.partition)] = int(offset)
        if not self._positions:
            await consumer.seek_to_beginning(*fresh)
            return
        begins = await consumer.beginning_offsets(fresh)
        for tp, offset in clamp_positions(self._positions, begins).items():
            consumer.seek(tp, offset)


class ConsumeLoop:
    """At-least-once consumption: a batch is handled, its outputs flushed, and only then its offsets committed.
    With `rebuild_on_start` the commits (still after the flush) come at most every REBUILD_COMMIT_INTERVAL_S and
    when idle: such a service resumes from its snapshot's positions, the committed offsets serve lag monitoring.

    Every record passes the admit step first (shared/admit.py: decode, time, the command gate); what it refuses
    and messages a handler refuses with HandlingError go to the dead-letter topic with the error text; any other exception stops the loop without committing (the batch is redelivered on restart).

    A rebalance that takes a partition while a batch is handled ends the handling of that partition's records
    in the batch: they are not ours to act on any more, and its next owner (maybe this member again) reads them
    from the last commit. A member that finds its partitions gone at commit time (it was paused: see
    LOST_PARTITIONS) logs one warning and goes on: aiokafka rejoins the group on the next poll. Going on rather
    than exiting, because nothing in hand is lost (the uncommitted records are read again by their next owner)
    and an exit would take the whole run (a demo, a compose stack) down for a pause it has recovered from.

    A handler about to act outside Kafka (an exchange order) asks `holds(tp, within_s)` first: the group's
    coordinator confirms that this member still holds the partition in the current generation. When it does
    not, the record in hand is not committed and is left to be read again by the partition's owner.
    """

    def __init__(
        self,
        *,
        bootstrap: KafkaAccess,
        topics: Sequence[str],
        group_id: str,
        publisher: Publisher,
        dead_letter_topic: str,
        service: str,
        clock: Clock,
        commands: CommandGate | None = None,
        from_beginning: bool = True,
        rebuild_on_start: bool = False,
        keeper: StateKeeper | None = None,
        session_timeout_ms: int = 10_000,
        max_poll_interval_ms: int = 300_000,
        skip: Callable[[ConsumerRecord[bytes, bytes]], bool] | None = None,
        on_dead_letter: Callable[[Record, str], None] | None = None,
    ) -> None:
        """`skip(record)`: asked of every record before it is decoded; True: the record is none of this
        service's business (e.g. another profile's, by its key), only its position moves. `on_dead_letter(record,
        error)`: told of every record the admit step refuses (a service's own error metrics)."""
        self._topics = list(topics)
        self._skip = skip
        self._on_dead_letter = on_dead_letter
        self._group = group_id
        self._session_s = session_timeout_ms / 1000
        heartbeat_ms = min(1_000, session_timeout_ms // 3)
        self._heartbeat_s = heartbeat_ms / 1000
        self._rebuild = rebuild_on_start
        self.keeper = keeper  # snapshots of the service's state (only with rebuild_on_start)
        self._consumer = input_consumer(
            bootstrap,
            fetch_max_wait_ms=WORKER_FETCH_MAX_WAIT_MS,  # the loop of the per-profile workers
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            isolation_level="read_committed",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_ms,
            max_poll_interval_ms=max_poll_interval_ms,
            max_poll_records=500,
        )
        self._publisher = publisher
        self._dlq = dead_letter_topic
        self.admission = Admission(service, clock, commands)
        self._stop = asyncio.Event()
        self.processed = 0
        self.dead_lettered = 0
        self.lost = 0  # times the group took partitions before this member committed them
        self.revoked: set[TopicPartition] = set()  # by a rebalance since the batch in hand was fetched
        # The next offset of each partition, after what this process handled (with rebuild: what its state holds).
        self.applied: dict[TopicPartition, int] = {}
        # The offset of each partition's first record in the batch in hand: everything before it was handled and
        # its outputs acknowledged, so committing it moves nothing past unfinished work (`holds`).
        self.batch_start: dict[TopicPartition, int] = {}
        # Partitions `holds` found lost (or could not confirm) during the batch in hand: the record being handled
        # and the rest of the batch's records of them are left to be read again.
        self.disowned: set[TopicPartition] = set()
        # Rebuild: the offset the group had committed on each partition when this process was first given it
        # (what an earlier process consumed; a service's metrics count only the records from there on).
        self.committed_before: dict[tuple[str, int], int] = {}
        # Rebuild: handled offsets not committed yet, and when the last commit was (see run).
        self._uncommitted: dict[TopicPartition, int] = {}
        self._committed_at = time.monotonic()

    @property
    def consumer(self) -> AIOKafkaConsumer:
        return self._consumer

    async def start(self) -> None:
        positions = await self.keeper.load() if self.keeper is not None and self._rebuild else None
        await self._consumer.start()
        self._consumer.subscribe(self._topics, listener=_Listener(self, positions, rebuild=self._rebuild))

    async def final_snapshot(self) -> None:
        """On a clean stop: the outputs acknowledged, a snapshot of everything handled."""
        if self.keeper is not None and self._rebuild:
            await self._publisher.flush()
            await self.keeper.save(final=True)

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        await self._consumer.stop()
        if self.keeper is not None:
            await self.keeper.close()

    async def holds(self, tp: TopicPartition, within_s: float) -> str | None:
        """None when this member still holds `tp` in the group's current generation, confirmed by the group's
        coordinator, with at least `within_s` seconds of its session surely left after the answer; else why not
        (and `tp` is disowned for the batch in hand).

        The confirmation is a synchronous commit of the batch's start offset of `tp` (it moves nothing: all
        before it is done): the coordinator refuses it from a member a rebalance has removed (CommitFailedError:
        unknown member, stale generation, rebalance in progress). No rebalance since the batch was fetched
        (`revoked`) and an accepted commit mean the member held `tp` without a break up to the coordinator's
        answer. The coordinator can then remove it no earlier than one session after its last heartbeat, which
        was at most one heartbeat interval before the check began; so the check's own time counts against what
        is left: session - heartbeat interval - the check's duration must be at least `within_s`."""
        budget = self._session_s - self._heartbeat_s - within_s
        if budget <= 0:
            raise ValueError(
                f"group {self._group}: a session of {self._session_s:g} s leaves no time for a request of "
                f"{within_s:g} s after a heartbeat interval of {self._heartbeat_s:g} s: raise session_timeout_ms"
            )
        name = f"{tp.topic}[{tp.partition}]"
        if tp in self.revoked or tp not in self._consumer.assignment():
            self.disowned.add(tp)
            return f"{name} is no longer assigned to this member of group {self._group}"
        offset = self.batch_start.get(tp)
        if offset is None:
            committed = await self._consumer.committed(tp)
            offset = committed if committed is not None else 0
        started = time.monotonic()
        why: str | None = None
        try:
            await asyncio.wait_for(self._consumer.commit({tp: offset}), timeout=budget)
        except LOST_PARTITIONS as err:
            why = f"group {self._group} took {name} from this member ({type(err).__name__}): it was paused longer than its session, or a rebalance is under way"
        except (KafkaError, TimeoutError) as err:
            why = f"the group's coordinator did not confirm that this member holds {name} within {budget:.1f} s ({type(err).__name__})"
        else:
            if tp in self.revoked:
                why = f"a rebalance took {name} from this member while it was being confirmed"
            else:
                left = self._session_s - self._heartbeat_s - (time.monotonic() - started)
                if left < within_s:
                    why = f"{name} confirmed with {left:.1f} s of session surely left, less than the {within_s:g} s a request may take"
        if why is not None:
            self.disowned.add(tp)
        return why

    async def dead_letter(self, rec: Record, error: str) -> None:
        """Send `rec` to the dead-letter topic with `error` (the admit step's refusals, HandlingError, and a
        service's own later refusals of a record it kept)."""
        self.dead_lettered += 1
        if self._on_dead_letter is not None:
            self._on_dead_letter(rec, error)
        await self._publisher.send(self._dlq, self.admission.dead_letter(rec, error), key=rec.topic)

    async def _handle(self, handler: Handler, rec: ConsumerRecord[bytes, bytes]) -> None:
        if self._skip is not None and self._skip(rec):
            self._done(rec)  # not this service's: only its position moves
            return
        outbox = Outbox()
        admitted = self.admission.admit(rec)
        if isinstance(admitted, Refused):
            await self.dead_letter(rec, admitted.reason)
        else:
            try:
                await handler(admitted, rec, outbox)
            except HandlingError as err:
                await self.dead_letter(rec, f"{type(admitted.msg).__name__}: {err}")
                outbox = Outbox()
        for topic, out, key, broadcast, partition in outbox.items:
            if broadcast:
                await self._publisher.send_to_all_partitions(topic, out)
            else:
                await self._publisher.send(topic, out, key=key, partition=partition)
        self._done(rec)

    def _done(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        self.processed += 1
        self.applied[TopicPartition(rec.topic, rec.partition)] = rec.offset + 1
        if self.keeper is not None:
            self.keeper.advance(rec.topic, rec.partition, rec.offset + 1)

    async def run(self, handler: Handler, *, idle: Callable[[], Awaitable[None]] | None = None) -> None:
        while not self._stop.is_set():
            batches = await self._consumer.getmany(timeout_ms=200)
            fetched = time.monotonic()
            # What getmany returns belongs to the partitions assigned now; a rebalance from here on may take some.
            self.revoked.clear()
            self.disowned.clear()
            self.batch_start = {tp: records[0].offset for tp, records in batches.items() if records}
            if not batches:
                if self._uncommitted:
                    await self._commit_handled()
                await self._snapshot_if_due()  # one that fell due in the last batch, not at the next
                if idle is not None:
                    await idle()
                continue
            offsets: dict[TopicPartition, int] = {}
            left: dict[TopicPartition, int] = {}  # records not handled: see _leave
            for tp, records in batches.items():
                for i, rec in enumerate(records):
                    if tp in self.revoked or time.monotonic() - fetched > self._session_s:
                        self._leave(tp, rec.offset)
                        left[tp] = len(records) - i
                        break
                    await self._handle(handler, rec)
                    if tp in self.disowned:
                        # Its handler found the partition is not (surely) this member's: this record is read again
                        # by its owner, maybe this member after its next poll; its outputs are facts with derived
                        # ids, published anyway.
                        self._leave(tp, rec.offset)
                        left[tp] = len(records) - i
                        break
                    offsets[tp] = rec.offset + 1
            if not self._rebuild:
                await self._publisher.flush()
                await self._commit(offsets, left)
                continue
            # Rebuild: the state and its positions come from the snapshot, never from the committed offsets, so
            # those are committed at most every REBUILD_COMMIT_INTERVAL_S (and when idle): no flush and no
            # coordinator round trip between one batch and the next on the way from candle to order.
            self._uncommitted.update(offsets)
            due = time.monotonic() - self._committed_at >= REBUILD_COMMIT_INTERVAL_S
            if due:
                await self._commit_handled()
            await self._commit({}, left)  # only says what a rebalance took, or what is left to read again
            await self._snapshot_if_due()
        if self._rebuild:
            await self._commit_handled()

    async def _snapshot_if_due(self) -> None:
        if self.keeper is not None and self._rebuild and self.keeper.due():
            await self._publisher.flush()
            self.keeper.save_soon()  # the outputs of every handled input are acknowledged

    async def _commit_handled(self) -> None:
        """Rebuild: commit what was handled since the last commit, its outputs acknowledged first."""
        self._committed_at = time.monotonic()
        if self._uncommitted:
            # A partition a rebalance took since is left out: its next owner reads it from where its own state is.
            assigned = self._consumer.assignment()
            offsets = {tp: o for tp, o in self._uncommitted.items() if tp in assigned}
            self._uncommitted = {}
            await self._publisher.flush()
            await self._commit(offsets, {})

    def _leave(self, tp: TopicPartition, offset: int) -> None:
        """Stop handling the batch's records of `tp` from `offset` on. Taken by a rebalance: the rebalance set
        the partition's position back (to the last commit, or with rebuild to what this process applied), and
        whoever holds it now reads them again. Or the batch has been in hand longer than the session (the
        process was paused, or its handlers are slow): the group may have given the partition to another member
        without this one knowing yet, so it acts on nothing more before its next poll tells; it reads them
        again from `offset` if the partition is still its own."""
        if tp in self.revoked:
            return
        # IllegalStateError: no longer assigned, its next owner reads from the last commit.
        with contextlib.suppress(IllegalStateError):
            self._consumer.seek(tp, offset)

    async def _commit(self, offsets: dict[TopicPartition, int], left: dict[TopicPartition, int]) -> None:
        assigned = self._consumer.assignment()
        mine = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        lost = {tp for tp in [*offsets, *left] if tp not in assigned}
        error: Exception | None = None
        try:
            if mine:
                await self._consumer.commit(mine)
        except LOST_PARTITIONS as err:
            error = err
            lost.update(mine)
        if lost:
            self.lost += 1
            log.warning("%s", lost_partitions_line(self._group, lost, error))
        elif left:
            log.info(
                "group %s: %d record(s) of %s left to be read again (a rebalance, or a batch in hand longer "
                "than the %.0f s session)",
                self._group,
                sum(left.values()),
                ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(left)),
                self._session_s,
            )


class StateMachineService:
    """Runs a service whose logic is `handle(message, partition) -> messages`: consumes its topics from the
    beginning, publishes each output where `route` says, and commits after the outputs are acknowledged.

    Outputs carry ids derived from their inputs, so a restart that re-reads inputs re-publishes the same ids,
    which every consumer de-duplicates.
    """

    def __init__(
        self,
        *,
        name: str,
        bootstrap: KafkaAccess,
        topics: Sequence[str],
        group_id: str,
        dead_letter_topic: str,
        handle: Callable[[Message, int], Awaitable[list[Message]]],
        route: Callable[[Message], list[Route]],
        clock: Clock,
        done: Callable[[], bool] = lambda: False,
        rebuild_on_start: bool = False,
        commands: CommandGate | None = None,
        observe: Callable[[Message, ConsumerRecord[bytes, bytes]], None] | None = None,
        durable: Durable | None = None,
        session_timeout_ms: int = 10_000,
    ) -> None:
        self.name = name
        self._durable = durable  # snapshots of the state, with rebuild_on_start (shared/snapshots.py)
        self._observe = observe  # sees every decoded input with its record (topic, Kafka timestamp): metrics
        # Kafka clients need a running event loop: they are built in run(), never at construction.
        self._bootstrap = bootstrap
        self._client_args = {
            "bootstrap": bootstrap,
            "topics": topics,
            "group_id": group_id,
            "dead_letter_topic": dead_letter_topic,
            "service": name,
            "clock": clock,
            "commands": commands,
            "rebuild_on_start": rebuild_on_start,
            "session_timeout_ms": session_timeout_ms,
        }
        self.loop: ConsumeLoop | None = None
        self._handle = handle
        self._route = route
        self._done = done

    async def _on_message(
        self, admitted: Admitted, rec: ConsumerRecord[bytes, bytes], outbox: Outbox
    ) -> None:
        msg = admitted.msg
        if self._observe is not None:
            self._observe(msg, rec)
        if isinstance(msg, ControlCommand) and admitted.verdict is None:
            return  # a service without a command gate acts on no command
        outputs: list[Message] = [admitted.verdict] if admitted.verdict is not None else []
        if admitted.act:
            outputs += await self._handle(msg, rec.partition)
        for out in outputs:
            for topic, key, broadcast in self._route(out):
                if broadcast:
                    outbox.broadcast(topic, out)
                else:
                    outbox.add(topic, out, key)

    def consume_loop(self, publisher: Publisher, keeper: StateKeeper | None) -> ConsumeLoop:
        """The loop over the service's inputs (built in run(): Kafka clients need a running event loop)."""
        return ConsumeLoop(publisher=publisher, keeper=keeper, **self._client_args)  # type: ignore[arg-type]

    async def run(self, stop: asyncio.Event, *, exit_when_done: bool = False) -> int:
        a = self._client_args
        publisher = Publisher(self._bootstrap, client_id=str(a["group_id"]))
        keeper = await self._durable.keeper(self._bootstrap) if self._durable is not None else None
        loop = self.loop = self.consume_loop(publisher, keeper)
        await publisher.start()
        await loop.start()
        try:

            async def watch() -> None:
                while not stop.is_set():
                    if exit_when_done and self._done():
                        break
                    await asyncio.sleep(0.1)
                loop.stop()

            watcher = asyncio.create_task(watch())
            try:
                await loop.run(self._on_message)
            finally:
                watcher.cancel()
            await loop.final_snapshot()
            return 0
        finally:
            await loop.close()
            await publisher.stop()
