"""A broker outage against real clients: a broker of this test's own (LocalInfra, Kafka only) is stopped for
10 s under the project's consume loop, its publisher and a service heartbeat. A handler with the filter every
service installs (shared/broker_noise.py) shows a few lines; an unfiltered one, the same records, shows them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpctl.infra import LocalInfra
from shared.admit import Admitted
from shared.broker_noise import install_broker_noise_filter, is_connection_noise
from shared.clock import system_clock
from shared.codec import encode
from shared.heartbeat import start_heartbeat
from shared.kafka import ConsumeLoop, Outbox, Publisher, ensure_topics
from shared.topics import TopicSpec
from tests.conftest import free_ports
from tests.integration.test_kafka_loop import _produce, candle

DOWN_S = 10.0


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(
            logging.WARNING
        )  # what a service shows of the libraries (shared.runtime.setup_logging)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.name, record.getMessage()))


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalInfra]:
    kafka_port, controller_port, redis_port = free_ports(3)
    local = LocalInfra(tmp_path / "infra", kafka_port, controller_port, redis_port, detach=False)
    try:
        local.up(kafka=True, redis=False)
        yield local
    finally:
        local.down()


async def test_a_ten_second_outage_is_a_few_lines_where_unfiltered_it_is_hundreds(
    own_broker: LocalInfra, namespace: str
) -> None:
    b = own_broker.endpoints.kafka
    src, out, dlq, beats = f"{namespace}.in", f"{namespace}.out", f"{namespace}.dlq", f"{namespace}.beats"
    await ensure_topics(b, [TopicSpec(src, 2), TopicSpec(out, 1), TopicSpec(dlq, 1), TopicSpec(beats, 1)])
    heartbeat = start_heartbeat(b, beats, "test", "0", interval_s=1.0)
    pub = Publisher(b, client_id="outage")
    await pub.start()
    loop = ConsumeLoop(
        bootstrap=b,
        topics=[src],
        group_id=f"{namespace}.g",
        publisher=pub,
        dead_letter_topic=dlq,
        service="outage",
        clock=system_clock,
    )
    await loop.start()
    seen: list[str] = []

    async def handler(admitted: Admitted, rec: object, box: Outbox) -> None:
        msg = admitted.msg
        seen.append(msg.id)
        box.add(out, msg, key="k")

    running = asyncio.create_task(loop.run(handler))
    filtered, unfiltered = Lines(), Lines()
    noise = install_broker_noise_filter(filtered)
    root = logging.getLogger()
    try:
        await _produce(b, src, [encode(candle(0))])
        deadline = time.monotonic() + 60
        while seen != ["c0"]:
            assert time.monotonic() < deadline and not running.done(), (seen, running)
            await asyncio.sleep(0.1)
        root.addHandler(filtered)
        root.addHandler(unfiltered)
        t0 = time.monotonic()
        await asyncio.to_thread(own_broker.restart_kafka, down_s=DOWN_S)
        outage_s = time.monotonic() - t0
        deadline = time.monotonic() + 30
        while not any("reachable again" in m for _, m in filtered.lines):
            assert time.monotonic() < deadline, filtered.lines
            await asyncio.sleep(0.2)
        # The loop went on: a record sent after the outage is handled.
        await _produce(b, src, [encode(candle(1))])
        deadline = time.monotonic() + 60
        while seen != ["c0", "c1"]:
            assert time.monotonic() < deadline and not running.done(), (seen, running)
            await asyncio.sleep(0.1)
    finally:
        root.removeHandler(filtered)
        root.removeHandler(unfiltered)
        loop.stop()
        await asyncio.wait_for(running, 30)
        await loop.close()
        await pub.stop()
        if heartbeat is not None:
            heartbeat.stop()
    connection_errors = [m for name, m in unfiltered.lines if is_connection_noise(name, m)]
    print(
        f"outage {outage_s:.1f} s: {len(unfiltered.lines)} lines unfiltered ({len(connection_errors)} connection "
        f"errors), {len(filtered.lines)} filtered: {filtered.lines}"
    )
    assert len(connection_errors) >= 100, unfiltered.lines[:20]
    assert noise.dropped == len(connection_errors)
    told = [m for name, m in filtered.lines if name == "shared.broker_noise"]
    assert len(told) == 2, told
    assert told[0].startswith("Kafka broker unreachable: ")
    assert (
        told[1].startswith("Kafka broker reachable again") and f"{noise.dropped} connection errors" in told[1]
    )
    # Besides those two: the libraries' news (the coordinator marked dead; when the restart outlasts the 10 s
    # session, its expiry in three lines) and the heartbeat's own line about its failure.
    assert not [m for name, m in filtered.lines if is_connection_noise(name, m)]
    assert len(filtered.lines) <= 8, filtered.lines
