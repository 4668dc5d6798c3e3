"""Consumer lag on a real broker: a consumer that committed offset k of n messages per partition and then
paused (still a member of its group) shows lag exactly n - k on each partition, in the table and in --json."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from mpctl import commands_ops
from mpctl.infra import Endpoints
from services.monitor.lag import fetch_lag, format_table, to_json
from tests.bus import create_namespace
from tests.integration.ops_stack import ns_config

PRODUCED = {0: 10, 1: 7, 2: 0}  # messages per partition (partition 2 stays empty)
COMMITTED = {0: 4, 1: 7}  # what the consumer commits before pausing


async def _topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(**bootstrap.client_options())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def _delete(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(**bootstrap.client_options())
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


@pytest.fixture
async def paused_group(infra: Endpoints, namespace: str) -> AsyncIterator[tuple[str, str]]:
    topic, group = f"{namespace}.lagtest", f"{namespace}.lagger"
    await create_namespace(infra.kafka, ns_config(namespace), namespace)  # its operator, for `mpctl lag`
    await _topic(infra.kafka, topic, 3)
    producer = AIOKafkaProducer(**infra.kafka.client_options(), acks="all")
    await producer.start()
    try:
        for p, n in PRODUCED.items():
            for i in range(n):
                await producer.send_and_wait(topic, f"m{p}-{i}".encode(), partition=p)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        **infra.kafka.client_options(),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )
    await consumer.start()
    try:
        for _ in range(100):  # join the group and get the partitions assigned
            await consumer.getmany(timeout_ms=200)
            if len(consumer.assignment()) == 3:
                break
        assert len(consumer.assignment()) == 3
        await consumer.commit({TopicPartition(topic, p): k for p, k in COMMITTED.items()})
        consumer.pause(*consumer.assignment())  # alive in the group, consuming nothing: lag stays
        yield topic, group
    finally:
        await consumer.stop()
        await _delete(infra.kafka, [topic])


async def test_lag_is_exactly_end_minus_committed(
    infra: Endpoints, namespace: str, paused_group: tuple[str, str]
) -> None:
    topic, group = paused_group
    report = await fetch_lag(infra.kafka, namespace)
    [g] = report.groups
    assert (g.group, g.members, g.state) == (group, 1, "Stable")
    rows = {p.partition: p for p in g.partitions}
    assert set(rows) == {0, 1, 2}
    for p in (0, 1):
        assert rows[p].end == PRODUCED[p]
        assert rows[p].committed == COMMITTED[p]
        assert rows[p].lag == PRODUCED[p] - COMMITTED[p]
    # Assigned but never committed: no lag value, as Kafka's own tool shows it.
    assert (rows[2].committed, rows[2].lag) == (None, None)
    assert g.total == 6 and report.total == 6

    table = format_table(report)
    lines = table.splitlines()
    assert lines[1].split() == ["GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "MEMBERS", "STATE"]
    assert lines[2].split() == ["lagger", "lagtest", "0", "4", "10", "6", "1", "Stable"]
    assert lines[3].split() == ["lagger", "lagtest", "1", "7", "7", "0", "1", "Stable"]
    assert lines[4].split() == ["lagger", "lagtest", "2", "-", "0", "-", "1", "Stable"]
    assert "total lag 6 over 1 group(s)" in table
    assert to_json(report)["groups"][0]["partitions"][0] == {
        "topic": topic,
        "partition": 0,
        "committed": 4,
        "end": 10,
        "lag": 6,
    }


def _cli(*argv: str) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser()
    commands_ops.register(parser.add_subparsers(dest="command"))
    return parser, parser.parse_args(list(argv))


async def test_mpctl_lag_json_and_table(
    infra: Endpoints, namespace: str, paused_group: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, args = _cli("lag", "--namespace", namespace, "--bootstrap", infra.kafka.servers, "--json")
    # The command runs its own event loop (asyncio.run), so it goes to a thread here.
    assert await asyncio.to_thread(args.handler, args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["total_lag"] == 6 and doc["namespace"] == namespace
    parts = {p["partition"]: p["lag"] for p in doc["groups"][0]["partitions"]}
    assert parts == {0: 6, 1: 0, 2: None}

    _, args = _cli("lag", "--namespace", namespace, "--bootstrap", infra.kafka.servers, "--fail-above", "5")
    assert await asyncio.to_thread(args.handler, args) == 3
    out = capsys.readouterr().out
    assert "lagger" in out and "total lag 6" in out


async def test_lag_of_an_empty_namespace(infra: Endpoints, namespace: str) -> None:
    report = await fetch_lag(infra.kafka, namespace)
    assert report.groups == () and "no consumer group in this namespace" in format_table(report)
