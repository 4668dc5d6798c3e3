"""mpctl.infra against the real servers: Kafka round trip, Redis, idempotent up, env override, down."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from mpctl import infra as infra_mod
from mpctl.bus import BusSecrets
from mpctl.infra import ENV_BUS_DIR, Endpoints, LocalInfra, _port_open, resolve_endpoints
from shared.bus import KafkaAccess
from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[2]


async def test_kafka_produce_consume_round_trip(kafka_bootstrap: str, namespace: str) -> None:
    topic = f"{namespace}.roundtrip"
    admin = AIOKafkaAdminClient(**kafka_bootstrap.client_options())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(**kafka_bootstrap.client_options(), acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = [f"m{i}".encode() for i in range(10)]
        for value in sent:
            await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        **kafka_bootstrap.client_options(),
        group_id=f"{namespace}.g",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        received: list[bytes] = []
        while len(received) < len(sent):
            batches = await consumer.getmany(timeout_ms=10_000)
            assert batches, f"no messages within 10 s; got {received}"
            for records in batches.values():
                received.extend(r.value for r in records if r.value is not None)
        await consumer.commit()
    finally:
        await consumer.stop()
    assert received == sent


def test_redis_set_get(redis_url: str, redis_admin: dict[str, Any], namespace: str) -> None:
    client = redis.Redis.from_url(redis_url, **redis_admin)
    try:
        assert client.set(f"{namespace}:k", b"v", ex=60)
        assert client.get(f"{namespace}:k") == b"v"
    finally:
        client.close()


def test_status_reports_running(local_infra: LocalInfra) -> None:
    status = local_infra.status()
    assert status["kafka"]["state"] == "running"
    assert status["kafka"]["port"] == local_infra.kafka_port
    assert status["kafka"]["controller_port"] == local_infra.controller_port
    assert isinstance(status["kafka"]["pid"], int)
    assert status["redis"]["state"] == "running"
    assert status["redis"]["port"] == local_infra.redis_port
    assert isinstance(status["redis"]["pid"], int)
    # The SLF4J binding works: without one the broker runs but its log stays empty.
    assert "Kafka Server started" in Path(status["kafka"]["log"]).read_text()


async def test_local_broker_settings(local_infra: LocalInfra) -> None:
    admin = AIOKafkaAdminClient(**local_infra.endpoints.kafka.client_options())
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, "1")])
    finally:
        await admin.close()
    configs = {entry[0]: entry[1] for resource in response.resources for entry in resource[4]}
    assert configs["auto.create.topics.enable"] == "false"
    assert configs["group.initial.rebalance.delay.ms"] == "0"
    assert configs["offsets.topic.replication.factor"] == "1"


def test_env_override_starts_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, infra: Endpoints
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", infra.kafka.servers)
    monkeypatch.setenv("REDIS_URL", infra.redis_url)
    kafka_port, controller_port, redis_port = free_ports(3)
    state = tmp_path / "unused"
    local = LocalInfra(state, kafka_port, controller_port, redis_port, detach=False)

    assert resolve_endpoints(local) == infra
    assert not state.exists()
    assert not any(_port_open("127.0.0.1", p) for p in (kafka_port, controller_port, redis_port))
    assert {c["state"] for c in local.status().values()} == {"stopped"}


def test_env_override_is_per_component(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[bool, bool]] = []

    class Spy(LocalInfra):
        def up(
            self, progress: infra_mod.Progress | None = None, *, kafka: bool = True, redis: bool = True
        ) -> Endpoints:
            calls.append((kafka, redis))
            return self.endpoints

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker.example:9092")
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv(ENV_BUS_DIR, raising=False)  # a broker mpctl does not run: its access from the env
    spy = Spy(tmp_path, 1, 2, 3)
    expected = Endpoints(KafkaAccess(servers="broker.example:9092"), "redis://127.0.0.1:3/0")
    assert resolve_endpoints(spy) == expected
    assert calls == [(False, True)]


def test_cli_up_with_servers_in_the_environment_says_which_it_uses_and_starts_nothing(
    tmp_path: Path, infra: Endpoints
) -> None:
    kafka_port, controller_port, redis_port = free_ports(3)
    state = tmp_path / "unused"
    # A password in REDIS_URL is masked on stderr; nothing connects to this URL (nothing is started either).
    redis_with_password = "redis://:hunter2-not-shown@127.0.0.1:1/0"
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=infra.kafka.servers,
        REDIS_URL=redis_with_password,
        CI="true",  # a pipe and CI: the terminal-only progress says nothing, so this is not progress
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.run(
        [
            sys.executable, "-m", "mpctl.cli", "infra", "up", "--state-dir", str(state),
            "--kafka-port", str(kafka_port), "--controller-port", str(controller_port),
            "--redis-port", str(redis_port),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        f"mpctl infra up: using KAFKA_BOOTSTRAP_SERVERS={infra.kafka.servers}; not starting a local broker",
        "mpctl infra up: using REDIS_URL=redis://:***@127.0.0.1:1/0; not starting a local redis",
    ]
    # stdout keeps its contract: the exports, for `eval "$(mpctl infra up)"`.
    assert infra.bus is not None
    assert proc.stdout.splitlines() == [
        f"KAFKA_BOOTSTRAP_SERVERS={infra.kafka.servers}",
        f"{ENV_BUS_DIR}={infra.bus.folder}",  # the broker's secrets, as the environment gave them
        f"REDIS_URL={redis_with_password}",
    ]
    assert not state.exists()
    assert not any(_port_open("127.0.0.1", p) for p in (kafka_port, controller_port, redis_port))


def test_only_the_servers_given_are_announced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Spy(LocalInfra):
        def up(
            self, progress: infra_mod.Progress | None = None, *, kafka: bool = True, redis: bool = True
        ) -> Endpoints:
            return self.endpoints

    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker.example:9092")
    monkeypatch.delenv("REDIS_URL", raising=False)
    said: list[str] = []
    resolve_endpoints(Spy(tmp_path, 1, 2, 3), announce=said.append)
    assert said == ["using KAFKA_BOOTSTRAP_SERVERS=broker.example:9092; not starting a local broker"]


def test_up_is_idempotent_and_down_stops_both(tmp_path: Path) -> None:
    kafka_port, controller_port, redis_port = free_ports(3)
    state = tmp_path / "infra"
    first = LocalInfra(state, kafka_port, controller_port, redis_port, detach=False)
    try:
        endpoints = first.up()
        assert (endpoints.kafka.servers, endpoints.kafka.username, endpoints.redis_url) == (
            f"127.0.0.1:{kafka_port}",
            "admin",
            f"redis://127.0.0.1:{redis_port}/0",
        )
        assert endpoints.bus == BusSecrets(state / "kafka" / "bus")
        status = first.status()
        pids = {name: status[name]["pid"] for name in ("kafka", "redis")}
        assert all(isinstance(pid, int) for pid in pids.values())

        assert first.up() == endpoints
        # A second instance on the same state dir is what a second `mpctl infra up` sees.
        second = LocalInfra(state, kafka_port, controller_port, redis_port, detach=False)
        assert second.up() == endpoints
        status = second.status()
        assert {name: status[name]["pid"] for name in ("kafka", "redis")} == pids
        assert {c["state"] for c in status.values()} == {"running"}
    finally:
        first.down()

    assert not any(_port_open("127.0.0.1", p) for p in (kafka_port, controller_port, redis_port))
    assert {c["state"] for c in first.status().values()} == {"stopped"}
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    first.down()  # nothing running: still fine


def test_cli_status_json_on_empty_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="mpctl")
    infra_mod.register(parser.add_subparsers(dest="command", required=True))
    kafka_port, controller_port, redis_port = free_ports(3)
    args = parser.parse_args(
        [
            "infra", "status", "--json", "--state-dir", str(tmp_path),
            "--kafka-port", str(kafka_port), "--controller-port", str(controller_port),
            "--redis-port", str(redis_port),
        ]
    )  # fmt: skip
    assert args.handler(args) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["state_dir"] == str(tmp_path)
    assert out["kafka"]["state"] == out["redis"]["state"] == "stopped"
    with pytest.raises(SystemExit):
        parser.parse_args(["infra", "up", "--kafka-port", "70000"])
