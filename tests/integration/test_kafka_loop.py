"""The consume loop against a real broker: dead letters for bad bytes, commit only after effects, redelivery
after a failed handler, strict topic declaration, and a member that loses its partitions while paused."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient

from mpctl.infra import Endpoints
from shared.admit import Admitted
from shared.clock import system_clock
from shared.codec import encode
from shared.kafka import ConsumeLoop, HandlingError, Outbox, Publisher, ensure_topics, read_topics
from shared.messages import CandleClosed, DeadLettered
from shared.topics import TopicSpec


def candle(i: int) -> CandleClosed:
    t = datetime(2021, 8, 1, i, tzinfo=UTC)
    return CandleClosed(
        id=f"c{i}",
        event_time=t,
        correlation_id="t",
        product="BTC/USDC",
        interval_s=3600,
        open_time=t,
        open=Decimal("100"),
        high=Decimal("110"),
        low=Decimal("90"),
        close=Decimal(100 + i),
        volume=Decimal("1"),
    )


async def _setup(bootstrap: str, ns: str) -> tuple[str, str, str]:
    src, out, dlq = f"{ns}.in", f"{ns}.out", f"{ns}.dlq"
    await ensure_topics(bootstrap, [TopicSpec(src, 1), TopicSpec(out, 1), TopicSpec(dlq, 1)])
    return src, out, dlq


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    p = AIOKafkaProducer(**bootstrap.client_options())
    await p.start()
    try:
        for v in values:
            await p.send_and_wait(topic, v)
    finally:
        await p.stop()


async def _run_until(loop: ConsumeLoop, handler: object, count: int, timeout: float = 30.0) -> None:
    async def watch() -> None:
        while loop.processed < count:
            await asyncio.sleep(0.05)
        loop.stop()

    w = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(loop.run(handler), timeout)  # type: ignore[arg-type]
    finally:
        w.cancel()


def _loop(
    bootstrap: str, topics: list[str], group: str, pub: Publisher, dlq: str, **options: Any
) -> ConsumeLoop:
    return ConsumeLoop(
        bootstrap=bootstrap,
        topics=topics,
        group_id=group,
        publisher=pub,
        dead_letter_topic=dlq,
        service="test",
        clock=system_clock,
        **options,
    )


async def test_malformed_bytes_go_to_dead_letter_and_valid_messages_all_arrive(
    infra: Endpoints, namespace: str
) -> None:
    b = infra.kafka
    src, out, dlq = await _setup(b, namespace)
    bad_schema = b'{"type": "CandleClosed", "id": "x"}'
    await _produce(
        b, src, [encode(candle(0)), b"\xff not json", encode(candle(1)), bad_schema, encode(candle(2))]
    )
    pub = Publisher(b, client_id="t")
    await pub.start()
    seen: list[str] = []

    async def handler(admitted: Admitted, rec: object, box: Outbox) -> None:
        msg = admitted.msg
        seen.append(msg.id)
        box.add(out, msg, key="k")

    loop = _loop(b, [src], f"{namespace}.g", pub, dlq)
    await loop.start()
    try:
        await _run_until(loop, handler, 5)
    finally:
        await loop.close()
        await pub.stop()
    assert seen == ["c0", "c1", "c2"]
    dead, _ = await read_topics(b, [dlq])
    assert [type(m) for m in dead] == [DeadLettered, DeadLettered]
    d0, d1 = dead
    assert isinstance(d0, DeadLettered) and isinstance(d1, DeadLettered)
    assert "not JSON" in d0.error and base64.b64decode(d0.payload_b64) == b"\xff not json"
    assert "CandleClosed" in d1.error and "event_time" in d1.error  # names the missing field
    assert (d0.source_topic, d0.offset, d1.offset) == (src, 1, 3)
    forwarded, _ = await read_topics(b, [out])
    assert [m.id for m in forwarded] == ["c0", "c1", "c2"]


async def test_refused_message_is_dead_lettered_with_reason(infra: Endpoints, namespace: str) -> None:
    b = infra.kafka
    src, _out, dlq = await _setup(b, namespace)
    await _produce(b, src, [encode(candle(0)), encode(candle(1))])
    pub = Publisher(b, client_id="t")
    await pub.start()

    async def handler(admitted: Admitted, rec: object, box: Outbox) -> None:
        msg = admitted.msg
        if msg.id == "c1":
            raise HandlingError("close 101 is not allowed here")

    loop = _loop(b, [src], f"{namespace}.g", pub, dlq)
    await loop.start()
    try:
        await _run_until(loop, handler, 2)
    finally:
        await loop.close()
        await pub.stop()
    dead, _ = await read_topics(b, [dlq])
    assert len(dead) == 1 and isinstance(dead[0], DeadLettered)
    assert "close 101 is not allowed here" in dead[0].error


async def test_failed_handler_commits_nothing_and_batch_is_redelivered(
    infra: Endpoints, namespace: str
) -> None:
    b = infra.kafka
    src, _out, dlq = await _setup(b, namespace)
    await _produce(b, src, [encode(candle(i)) for i in range(3)])
    group = f"{namespace}.g"

    pub = Publisher(b, client_id="t")
    await pub.start()

    async def crashing(admitted: Admitted, rec: object, box: Outbox) -> None:
        msg = admitted.msg
        if msg.id == "c2":
            raise RuntimeError("simulated crash before the effect")

    loop = _loop(b, [src], group, pub, dlq)
    await loop.start()
    with pytest.raises(RuntimeError, match="simulated crash"):
        await asyncio.wait_for(loop.run(crashing), 30)
    await loop.close()

    second: list[str] = []

    async def recording(admitted: Admitted, rec: object, box: Outbox) -> None:
        msg = admitted.msg
        second.append(msg.id)

    loop2 = _loop(b, [src], group, pub, dlq)
    await loop2.start()
    try:
        await _run_until(loop2, recording, 3)
    finally:
        await loop2.close()
        await pub.stop()
    # Nothing of the failed batch was committed: every message comes again (at least once, never lost).
    assert second == ["c0", "c1", "c2"]


async def test_declared_topic_with_other_partition_count_is_refused(infra: Endpoints, namespace: str) -> None:
    b = infra.kafka
    await ensure_topics(b, [TopicSpec(f"{namespace}.x", 2)])
    await ensure_topics(b, [TopicSpec(f"{namespace}.x", 2)])  # idempotent
    with pytest.raises(RuntimeError, match=r"has 2 partitions but 3 are declared"):
        await ensure_topics(b, [TopicSpec(f"{namespace}.x", 3)])


async def test_rebuild_on_start_rereads_the_whole_log_despite_committed_offsets(
    infra: Endpoints, namespace: str
) -> None:
    b = infra.kafka
    src, _out, dlq = await _setup(b, namespace)
    await _produce(b, src, [encode(candle(i)) for i in range(3)])
    group = f"{namespace}.g"
    pub = Publisher(b, client_id="t")
    await pub.start()
    seen: list[str] = []

    async def recording(admitted: Admitted, rec: object, box: Outbox) -> None:
        msg = admitted.msg
        seen.append(msg.id)

    for rebuild in (False, False, True):
        loop = ConsumeLoop(
            bootstrap=b,
            topics=[src],
            group_id=group,
            publisher=pub,
            dead_letter_topic=dlq,
            service="t",
            clock=system_clock,
            rebuild_on_start=rebuild,
        )
        await loop.start()
        try:
            if rebuild or not seen:
                await _run_until(loop, recording, 3)
                if rebuild:
                    # What the group had consumed before (its metrics count from there): read on assignment.
                    assert loop.committed_before == {(src, 0): 3}
            else:
                # Committed offsets are at the end: a plain restart sees nothing new.
                with pytest.raises(TimeoutError):
                    await _run_until(loop, recording, 1, timeout=3)
        finally:
            await loop.close()
    await pub.stop()
    assert seen == ["c0", "c1", "c2", "c0", "c1", "c2"]


# ------------------------------------------------------------------------------ a member that loses its partitions
SESSION_MS = 6_000  # the broker's least (group.min.session.timeout.ms): the group notices a pause soonest


class _Member:
    """A ConsumeLoop in its own thread and event loop, as a second process would be: the test can stop that
    loop dead (a blocking wait: what SIGSTOP does to a process) or only its handler (an await)."""

    def __init__(self, name: str, bootstrap: str, src: str, out: str, dlq: str, group: str) -> None:
        self.name, self.bootstrap, self.src, self.out, self.dlq, self.group = (
            name,
            bootstrap,
            src,
            out,
            dlq,
            group,
        )
        self.handled: list[tuple[int, int]] = []  # (partition, offset), in order
        self.error: BaseException | None = None
        self.loop: ConsumeLoop | None = None
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.stall: Callable[[tuple[int, int]], Awaitable[None]] | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self.ready.wait(30), f"{self.name} did not start"

    def assignment(self) -> set[int]:
        assert self.loop is not None
        return {tp.partition for tp in self.loop.consumer.assignment()}

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), f"{self.name} did not stop"

    async def _main(self) -> None:
        pub = Publisher(self.bootstrap, client_id=self.name)
        await pub.start()
        loop = self.loop = ConsumeLoop(
            bootstrap=self.bootstrap,
            topics=[self.src],
            group_id=self.group,
            publisher=pub,
            dead_letter_topic=self.dlq,
            service=self.name,
            clock=system_clock,
            session_timeout_ms=SESSION_MS,
            max_poll_interval_ms=SESSION_MS,
        )
        await loop.start()

        async def handler(admitted: Admitted, rec: ConsumerRecord[bytes, bytes], box: Outbox) -> None:
            msg = admitted.msg
            key = (rec.partition, rec.offset)
            self.handled.append(key)
            stall, self.stall = self.stall, None
            if stall is not None:
                await stall(key)
            box.add(self.out, msg, key=f"{rec.partition}:{rec.offset}")

        async def watch() -> None:
            while not self.stopping.is_set():
                await asyncio.sleep(0.05)
            loop.stop()

        watcher = asyncio.create_task(watch())
        self.ready.set()
        try:
            await loop.run(handler)
        except BaseException as err:
            self.error = err
        finally:
            watcher.cancel()
            await loop.close()
            await pub.stop()


async def _wait(what: str, cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _committed(bootstrap: str, group: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(**bootstrap.client_options())
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items()}


async def _produce_to(bootstrap: str, topic: str, per_partition: dict[int, int], first: int) -> None:
    p = AIOKafkaProducer(**bootstrap.client_options())
    await p.start()
    try:
        for part, n in per_partition.items():
            for i in range(n):
                c = candle(0).model_copy(update={"id": f"p{part}-{first + i}"})
                await p.send_and_wait(topic, encode(c), partition=part)
    finally:
        await p.stop()


@pytest.mark.parametrize("pause", ["stopped", "slow"])
async def test_member_that_loses_its_partitions_warns_once_and_rejoins(
    infra: Endpoints, namespace: str, caplog: pytest.LogCaptureFixture, pause: str
) -> None:
    """A member stops in the middle of a batch longer than the group allows: its whole process stopped
    ("stopped": no heartbeat, the session expires, as SIGSTOP does) or only its handler ("slow": heartbeats go
    on, the poll interval expires). The other member takes its partition over and reads it from the last commit;
    when the first resumes, its commit is refused: one warning, no exception, no record of the lost partition
    handled after the pause, and it rejoins and shares the next records."""
    b = infra.kafka
    src, out, dlq = f"{namespace}.in", f"{namespace}.out", f"{namespace}.dlq"
    await ensure_topics(b, [TopicSpec(src, 2), TopicSpec(out, 1), TopicSpec(dlq, 1)])
    group = f"{namespace}.g"
    victim = _Member("victim", b, src, out, dlq, group)
    survivor = _Member("survivor", b, src, out, dlq, group)
    caplog.set_level(logging.INFO, logger="shared.kafka")
    victim.start()
    survivor.start()
    try:
        await _wait(
            "one partition each",
            lambda: (
                len(victim.assignment()) == len(survivor.assignment()) == 1
                and victim.assignment() != survivor.assignment()
            ),
        )
        [mine] = victim.assignment()
        release = threading.Event()

        async def stall(key: tuple[int, int]) -> None:
            # Until the survivor has taken the partition over and committed it: longer than the group allows.
            deadline = time.monotonic() + 90
            while not release.is_set() and time.monotonic() < deadline:
                if pause == "stopped":
                    time.sleep(0.1)  # the victim's event loop stops dead, its heartbeats with it
                else:
                    await asyncio.sleep(0.1)

        victim.stall = stall
        await _produce_to(b, src, {0: 10, 1: 10}, first=0)
        first = {(p, o) for p in (0, 1) for o in range(10)}
        await _wait("the survivor to take over", lambda: set(survivor.handled) >= first, timeout=90)
        deadline = time.monotonic() + 30
        while await _committed(b, group) != {0: 10, 1: 10}:
            assert time.monotonic() < deadline, await _committed(b, group)
            await asyncio.sleep(0.2)
        release.set()
        await _wait(
            "the victim's warning",
            lambda: victim.error is not None or (victim.loop is not None and victim.loop.lost >= 1),
        )
        assert victim.error is None, f"the victim's loop crashed: {victim.error!r}"
        # The victim rejoins: the partitions are shared again, and new records go to both.
        await _wait("the victim back in the group", lambda: len(victim.assignment()) == 1)
        await _wait("the survivor down to one partition", lambda: len(survivor.assignment()) == 1)
        await _produce_to(b, src, {0: 5, 1: 5}, first=10)
        everything = {(p, o) for p in (0, 1) for o in range(15)}
        await _wait("the second records", lambda: set(victim.handled) | set(survivor.handled) >= everything)
        await asyncio.sleep(1)  # any stray second handling would show now
    finally:
        victim.stop()
        survivor.stop()
    assert victim.error is None and survivor.error is None, (victim.error, survivor.error)
    paused = (mine, 0)
    first_wave = [k for k in victim.handled if k[1] < 10]
    assert first_wave == [paused], f"the victim acted on records after its pause: {first_wave}"
    # The survivor handled every record once; the only record handled twice is the one the victim held.
    assert sorted(survivor.handled) == sorted(set(survivor.handled)), survivor.handled
    both = set(victim.handled) & set(survivor.handled)
    assert both == {paused}, both
    assert set(victim.handled) | set(survivor.handled) == everything
    assert any(k[1] >= 10 for k in victim.handled), (
        f"the victim handled nothing after rejoining: {victim.handled}"
    )
    lost = [r for r in caplog.records if "were lost to another member" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING, [r.getMessage() for r in lost]
    assert f"{src}[{mine}]" in lost[0].getMessage()
    assert victim.loop is not None and victim.loop.lost == 1
    # Outputs: one per record, the held record's twice (the same input: consumers de-duplicate it).
    forwarded, _ = await read_topics(b, [out])
    ids = Counter(m.id for m in forwarded)
    assert {i for i, n in ids.items() if n > 1} == {f"p{mine}-0"}, ids
    assert len(ids) == 30


async def test_rebuild_resumes_a_partition_given_back_by_a_rebalance_where_its_state_is(
    infra: Endpoints, namespace: str
) -> None:
    """A rebalance revokes every partition and assigns them again (eager protocol); with rebuild_on_start the
    loop reads a partition it already applied from where it stopped: nothing enters its state twice."""
    b = infra.kafka
    src, _out, dlq = await _setup(b, namespace)
    other = f"{namespace}.other"
    await ensure_topics(b, [TopicSpec(other, 1)])
    await _produce(b, src, [encode(candle(i)) for i in range(3)])
    group = f"{namespace}.g"
    pub = Publisher(b, client_id="t")
    await pub.start()
    seen: list[str] = []
    assignments = 0

    async def recording(admitted: Admitted, rec: object, box: Outbox) -> None:
        msg = admitted.msg
        seen.append(msg.id)

    loop = ConsumeLoop(
        bootstrap=b,
        topics=[src],
        group_id=group,
        publisher=pub,
        dead_letter_topic=dlq,
        service="t",
        clock=system_clock,
        rebuild_on_start=True,
    )
    await loop.start()
    running = asyncio.create_task(loop.run(recording))
    joiner = AIOKafkaConsumer(**b.client_options(), group_id=group, enable_auto_commit=False)

    class Count(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: object) -> None:
            return None

        async def on_partitions_assigned(self, assigned: object) -> None:
            nonlocal assignments
            assignments += 1

    try:
        await _wait("the first records", lambda: seen == ["c0", "c1", "c2"])
        # Another member of the group (on another topic): the group rebalances, the loop keeps its partition.
        await joiner.start()
        joiner.subscribe([other], listener=Count())
        await asyncio.wait_for(joiner.getmany(timeout_ms=100), 30)
        while assignments == 0:
            await joiner.getmany(timeout_ms=100)
        await _produce(b, src, [encode(candle(3))])
        await _wait("the next record", lambda: len(seen) >= 4)
        await asyncio.sleep(1)  # a re-read from the beginning would show now
    finally:
        await joiner.stop()
        loop.stop()
        await asyncio.wait_for(running, 30)
        await loop.close()
        await pub.stop()
    assert seen == ["c0", "c1", "c2", "c3"]


async def _produce_keyed(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    p = AIOKafkaProducer(**bootstrap.client_options())
    await p.start()
    try:
        for key, value in records:
            await p.send_and_wait(topic, value, key=key)
    finally:
        await p.stop()


async def test_skipped_records_are_never_decoded_and_only_their_positions_move(
    infra: Endpoints, namespace: str
) -> None:
    """`skip` (the strategy worker's: another profile's records by key): a skipped record, even malformed, is
    neither handled nor dead-lettered, and the loop's position moves past it; a malformed record that is not
    skipped is dead-lettered and the service is told (`on_dead_letter`)."""
    b = infra.kafka
    src, out, dlq = await _setup(b, namespace)
    await _produce_keyed(
        b,
        src,
        [
            (b"mine", encode(candle(0))),
            (b"theirs", b"\xff theirs, not json"),
            (b"theirs", encode(candle(1))),
            (b"mine", b"\xff mine, not json"),
            (b"mine", encode(candle(2))),
        ],
    )
    pub = Publisher(b, client_id="t")
    await pub.start()
    seen: list[str] = []
    asked: list[int] = []
    told: list[tuple[int, str]] = []

    def skip(rec: ConsumerRecord[bytes, bytes]) -> bool:
        asked.append(rec.offset)
        return rec.key == b"theirs"

    async def handler(admitted: Admitted, rec: object, box: Outbox) -> None:
        seen.append(admitted.msg.id)
        box.add(out, admitted.msg, key=b"bytes key")

    loop = _loop(
        b,
        [src],
        f"{namespace}.g",
        pub,
        dlq,
        skip=skip,
        on_dead_letter=lambda rec, error: told.append((rec.offset, error)),
    )
    await loop.start()
    try:
        await _run_until(loop, handler, 5)
    finally:
        await loop.close()
        await pub.stop()
    assert asked == [0, 1, 2, 3, 4]
    assert seen == ["c0", "c2"]
    assert [(offset, "not JSON" in error) for offset, error in told] == [(3, True)]
    dead, _ = await read_topics(b, [dlq])
    assert [(m.offset, m.source_topic) for m in dead if isinstance(m, DeadLettered)] == [(3, src)]
    assert {tp.partition: offset for tp, offset in loop.applied.items()} == {0: 5}
    forwarded, _ = await read_topics(b, [out])
    assert [m.id for m in forwarded] == ["c0", "c2"]


async def test_a_rebuild_loop_commits_what_it_handled_once_idle_after_its_outputs(
    infra: Endpoints, namespace: str
) -> None:
    """A loop that rebuilds its state on start commits at most every REBUILD_COMMIT_INTERVAL_S, and as soon as
    nothing more comes: its committed offsets (lag monitoring) reach the end while it runs, and every output of
    what they cover is on its topic by then."""
    b = infra.kafka
    src, out, dlq = await _setup(b, namespace)
    await _produce(b, src, [encode(candle(i)) for i in range(3)])
    group = f"{namespace}.g"
    pub = Publisher(b, client_id="t")
    await pub.start()

    async def handler(admitted: Admitted, rec: object, box: Outbox) -> None:
        box.add(out, admitted.msg, key="k")

    loop = _loop(b, [src], group, pub, dlq, rebuild_on_start=True)
    reader = AIOKafkaConsumer(**b.client_options(), group_id=group, enable_auto_commit=False)
    await loop.start()
    await reader.start()
    running = asyncio.create_task(loop.run(handler))
    committed: int | None = None
    try:
        tp = TopicPartition(src, 0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            committed = await reader.committed(tp)
            if committed == 3:
                break
            await asyncio.sleep(0.1)
        forwarded, _ = await read_topics(b, [out])
        assert not running.done()  # committed by the running loop, not by its stop
    finally:
        loop.stop()
        await asyncio.wait_for(running, 30)
        await reader.stop()
        await loop.close()
        await pub.stop()
    assert committed == 3
    assert [m.id for m in forwarded] == ["c0", "c1", "c2"]
