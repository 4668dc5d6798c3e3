"""Shared fixtures: real Kafka and Redis for integration and e2e tests, started only when requested.

Where the servers come from, in order:
1. ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` in the environment (a component left unset is started locally);
2. testcontainers, when a Docker engine answers;
3. :class:`mpctl.infra.LocalInfra` (real Apache Kafka from Maven Central + Debian's redis-server) in a
   temporary state dir on free ports, stopped at the end of the session.

Unit tests never request these fixtures, so they never start anything.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpctl.infra import Endpoints, LocalInfra, resolve_endpoints
from tests.peer.coinbase_peer import CoinbasePeer

_TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Directory decides the marker, so `-m "not integration and not e2e"` selects the unit tests.
    for item in items:
        path = Path(str(item.path)).resolve()
        if (_TESTS_DIR / "integration") in path.parents:
            item.add_marker(pytest.mark.integration)
        elif (_TESTS_DIR / "e2e") in path.parents:
            item.add_marker(pytest.mark.e2e)


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports that were free a moment ago (all held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _progress(message: str) -> None:
    # Past pytest's capture: a first run downloads jars, and silence would look like a hang.
    stream = sys.__stderr__
    if stream is not None and not os.environ.get("CI"):
        print(f"\n[infra] {message}", file=stream, flush=True)


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return False
    try:
        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def _containers() -> Iterator[Endpoints]:
    from testcontainers.kafka import KafkaContainer  # type: ignore[import-not-found,unused-ignore]
    from testcontainers.redis import RedisContainer  # type: ignore[import-not-found,unused-ignore]

    image = os.environ.get("MPCTL_TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.0")
    kafka = KafkaContainer(image).with_kraft().with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
    with kafka, RedisContainer("redis:7.0") as redis_c:
        host = redis_c.get_container_host_ip()
        port = redis_c.get_exposed_port(6379)
        yield Endpoints(kafka_bootstrap=kafka.get_bootstrap_server(), redis_url=f"redis://{host}:{port}/0")


@dataclass(frozen=True)
class InfraSession:
    endpoints: Endpoints
    local: LocalInfra | None  # set only when this session started the servers itself


@pytest.fixture(scope="session")
def infra_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfraSession]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("REDIS_URL"):
        local: LocalInfra | None = None
        if not (os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("REDIS_URL")):
            local = _new_local_infra(tmp_path_factory)
        try:
            yield InfraSession(resolve_endpoints(local, _progress), local)
        finally:
            if local is not None:
                local.down()
        return
    if _docker_available():
        with _containers() as endpoints:
            yield InfraSession(endpoints, None)
        return
    local = _new_local_infra(tmp_path_factory)
    try:
        yield InfraSession(local.up(_progress), local)
    finally:
        local.down()


def _new_local_infra(tmp_path_factory: pytest.TempPathFactory) -> LocalInfra:
    kafka_port, controller_port, redis_port = free_ports(3)
    return LocalInfra(
        tmp_path_factory.mktemp("infra"),
        kafka_port=kafka_port,
        controller_port=controller_port,
        redis_port=redis_port,
        detach=False,  # die with the test run even if teardown never happens
    )


@pytest.fixture(scope="session")
def infra(infra_session: InfraSession) -> Endpoints:
    return infra_session.endpoints


@pytest.fixture(scope="session")
def local_infra(infra_session: InfraSession) -> LocalInfra:
    """The session's LocalInfra; skips when the servers came from the environment or containers."""
    if infra_session.local is None:
        pytest.skip("servers were not started by LocalInfra in this session")
    return infra_session.local


@pytest.fixture(scope="session")
def kafka_bootstrap(infra: Endpoints) -> str:
    return infra.kafka_bootstrap


@pytest.fixture(scope="session")
def redis_url(infra: Endpoints) -> str:
    return infra.redis_url


@pytest.fixture
def namespace() -> str:
    """A unique prefix for topics, groups and keys, so tests sharing one broker never collide."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def peer() -> AsyncIterator[CoinbasePeer]:
    """A local Coinbase protocol peer (tests/peer/coinbase_peer.py) on loopback, stopped after the test."""
    p = CoinbasePeer()
    await p.start()
    try:
        yield p
    finally:
        await p.stop()
