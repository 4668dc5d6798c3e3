"""The registry's check of the commands topic costs no request per batch (issue 16), and still knows every
command appended before the candles it hands on (docs/registry.md section 13).

Real Kafka, the registry's own consumer and batch function, a spy on the requests its client sends: over many
batches of candles, with commands appended between some of them, the client sends fetches only (no offsets
request, no metadata request), and each command appended before a candle is handled before that candle is
returned. Not timed."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition

from services.registry.bootstrap import RegistryService, registry_consumer
from services.registry.recovery import seek_to_start
from shared.kafka import delete_topics, ensure_topics
from shared.topics import Topics, TopicSpec

BATCHES = 40


async def test_registry_command_check_sends_no_request_per_batch(
    kafka_bootstrap: str, namespace: str
) -> None:
    t = Topics(namespace)
    await ensure_topics(kafka_bootstrap, [TopicSpec(t.candles, 1), TopicSpec(t.commands, 1)])
    producer = AIOKafkaProducer(**kafka_bootstrap.client_options(), acks="all", enable_idempotence=True)
    consumer = registry_consumer(kafka_bootstrap)
    await producer.start()
    await consumer.start()
    candles, commands = TopicPartition(t.candles, 0), TopicPartition(t.commands, 0)
    handled: list[int] = []  # offsets of the commands handled, in order

    async def on_command(rec: ConsumerRecord[bytes, bytes], publisher: Any) -> None:
        handled.append(rec.offset)

    registry = SimpleNamespace(_on_command=on_command, _commands_ends=RegistryService._commands_ends)
    sent: Counter[str] = Counter()
    send = consumer._client.send  # noqa: SLF001 - the spy: every request the consumer's client sends

    async def spy(node_id: int, request: Any, *args: Any, **kwargs: Any) -> Any:
        sent[type(request).__name__] += 1
        return await send(node_id, request, *args, **kwargs)

    try:
        consumer.assign([candles, commands])
        await seek_to_start(consumer, [candles, commands])
        consumer._client.send = spy  # noqa: SLF001
        appended = 0  # commands appended so far
        for i in range(BATCHES):
            if i % 4 == 1:
                await producer.send_and_wait(t.commands, f"command {appended}".encode())
                appended += 1
            # The candle goes out after every command above: its batch must come with them handled.
            await producer.send_and_wait(t.candles, f"candle {i}".encode())
            got: list[ConsumerRecord[bytes, bytes]] = []
            while not got:
                batch = await RegistryService._next_candles(registry, consumer, [commands], None)  # type: ignore[arg-type]
                got = [rec for recs in batch.values() for rec in recs]
            assert [rec.value for rec in got] == [f"candle {i}".encode()]
            assert handled == list(range(appended)), (i, handled)
    finally:
        consumer._client.send = send  # noqa: SLF001
        await consumer.stop()
        await producer.stop()
        await delete_topics(kafka_bootstrap, [t.candles, t.commands])
    fetches = sum(n for name, n in sent.items() if name.startswith("FetchRequest"))
    others = {name: n for name, n in sent.items() if not name.startswith("FetchRequest")}
    assert fetches >= BATCHES, sent  # the spy saw the client's requests
    assert not [name for name in others if "Offset" in name], sent  # ListOffsets: OffsetRequest
    assert not [name for name in others if "Metadata" in name], sent
