"""The consume loop against a real broker: dead letters for bad bytes, commit only after effects, redelivery
after a failed handler, and strict topic declaration."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from aiokafka import AIOKafkaProducer

from mpctl.infra import Endpoints
from services.monitor.collect import read_topics
from shared.clock import random_ids, system_clock
from shared.codec import encode
from shared.kafka import ConsumeLoop, HandlingError, Outbox, Publisher, ensure_topics
from shared.messages import CandleClosed, DeadLettered, Message
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
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
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


def _loop(bootstrap: str, topics: list[str], group: str, pub: Publisher, dlq: str) -> ConsumeLoop:
    return ConsumeLoop(
        bootstrap=bootstrap,
        topics=topics,
        group_id=group,
        publisher=pub,
        dead_letter_topic=dlq,
        service="test",
        clock=system_clock,
        ids=random_ids,
    )


async def test_malformed_bytes_go_to_dead_letter_and_valid_messages_all_arrive(
    infra: Endpoints, namespace: str
) -> None:
    b = infra.kafka_bootstrap
    src, out, dlq = await _setup(b, namespace)
    bad_schema = b'{"type": "CandleClosed", "id": "x"}'
    await _produce(
        b, src, [encode(candle(0)), b"\xff not json", encode(candle(1)), bad_schema, encode(candle(2))]
    )
    pub = Publisher(b, client_id="t")
    await pub.start()
    seen: list[str] = []

    async def handler(msg: Message, rec: object, box: Outbox) -> None:
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
    b = infra.kafka_bootstrap
    src, _out, dlq = await _setup(b, namespace)
    await _produce(b, src, [encode(candle(0)), encode(candle(1))])
    pub = Publisher(b, client_id="t")
    await pub.start()

    async def handler(msg: Message, rec: object, box: Outbox) -> None:
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
    b = infra.kafka_bootstrap
    src, _out, dlq = await _setup(b, namespace)
    await _produce(b, src, [encode(candle(i)) for i in range(3)])
    group = f"{namespace}.g"

    pub = Publisher(b, client_id="t")
    await pub.start()

    async def crashing(msg: Message, rec: object, box: Outbox) -> None:
        if msg.id == "c2":
            raise RuntimeError("simulated crash before the effect")

    loop = _loop(b, [src], group, pub, dlq)
    await loop.start()
    with pytest.raises(RuntimeError, match="simulated crash"):
        await asyncio.wait_for(loop.run(crashing), 30)
    await loop.close()

    second: list[str] = []

    async def recording(msg: Message, rec: object, box: Outbox) -> None:
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
    b = infra.kafka_bootstrap
    await ensure_topics(b, [TopicSpec(f"{namespace}.x", 2)])
    await ensure_topics(b, [TopicSpec(f"{namespace}.x", 2)])  # idempotent
    with pytest.raises(RuntimeError, match=r"has 2 partitions but 3 are declared"):
        await ensure_topics(b, [TopicSpec(f"{namespace}.x", 3)])


async def test_rebuild_on_start_rereads_the_whole_log_despite_committed_offsets(
    infra: Endpoints, namespace: str
) -> None:
    b = infra.kafka_bootstrap
    src, _out, dlq = await _setup(b, namespace)
    await _produce(b, src, [encode(candle(i)) for i in range(3)])
    group = f"{namespace}.g"
    pub = Publisher(b, client_id="t")
    await pub.start()
    seen: list[str] = []

    async def recording(msg: Message, rec: object, box: Outbox) -> None:
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
            ids=random_ids,
            rebuild_on_start=rebuild,
        )
        await loop.start()
        try:
            if rebuild or not seen:
                await _run_until(loop, recording, 3)
            else:
                # Committed offsets are at the end: a plain restart sees nothing new.
                with pytest.raises(TimeoutError):
                    await _run_until(loop, recording, 1, timeout=3)
        finally:
            await loop.close()
    await pub.stop()
    assert seen == ["c0", "c1", "c2", "c0", "c1", "c2"]
