"""Shared fixtures: real Kafka and Redis for integration and e2e tests, started only when requested.

Where the servers come from, in order:
1. ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` in the environment (a component left unset is started locally),
   with ``MPCTL_BUS_DIR`` the broker's secrets (`mpctl infra up` prints all three);
2. :class:`mpctl.infra.LocalInfra` (real Apache Kafka from Maven Central + Debian's redis-server) in a
   temporary state dir on free ports, stopped at the end of the session.

The broker authenticates every client and authorizes with ACLs (docs/operations.md, "The bus"): the fixtures
give the admin's access; a service a test starts connects as its own principal (tests/bus.py).

Unit tests never request these fixtures, so they never start anything.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mpctl.infra import ENV_BUS_DIR, Endpoints, LocalInfra, resolve_endpoints
from shared.bus import KafkaAccess
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


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_ports(count: int, *, consecutive: bool = False) -> list[int]:
    """Distinct loopback ports that were free a moment ago (all held open together so they differ).

    Taken below the kernel's ephemeral range: a port the kernel hands out (bind to 0) is one the next outgoing
    connection of any client on the machine may take as its local port before the server under test binds it.
    `consecutive`: first, first + 1, ... (a shared-loop host serves profile i's metrics on first + i)."""
    floor = _ephemeral_floor()
    rng = random.Random()
    for _ in range(200):
        if consecutive:
            first = rng.randrange(10_000, floor - count)
            ports = list(range(first, first + count))
        else:
            ports = rng.sample(range(10_000, floor), count)
        with contextlib.ExitStack() as stack:
            try:
                for port in ports:
                    stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)).bind(
                        ("127.0.0.1", port)
                    )
            except OSError:
                continue
        return ports
    raise RuntimeError(f"no {count} free loopback ports found below {floor}")


def _progress(message: str) -> None:
    # Past pytest's capture: a first run downloads jars, and silence would look like a hang.
    stream = sys.__stderr__
    if stream is not None and not os.environ.get("CI"):
        print(f"\n[infra] {message}", file=stream, flush=True)


@dataclass(frozen=True)
class InfraSession:
    endpoints: Endpoints
    local: LocalInfra | None  # set only when this session started the servers itself


@pytest.fixture(scope="session")
def infra_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfraSession]:
    with _bus_dir_in_env(tmp_path_factory) as session:
        yield session


@contextlib.contextmanager
def _bus_dir_in_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfraSession]:
    """The session's servers, with MPCTL_BUS_DIR set for the session so that every `mpctl` command a test runs
    (in process or not) finds the broker's secrets as a user's shell would after `mpctl infra up`."""
    with _servers(tmp_path_factory) as session:
        bus = session.endpoints.bus
        old = os.environ.get(ENV_BUS_DIR)
        if bus is not None:
            os.environ[ENV_BUS_DIR] = str(bus.folder)
        try:
            yield session
        finally:
            if old is None:
                os.environ.pop(ENV_BUS_DIR, None)
            else:
                os.environ[ENV_BUS_DIR] = old


@contextlib.contextmanager
def _servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfraSession]:
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
def kafka_bootstrap(infra: Endpoints) -> KafkaAccess:
    """The broker as its admin (a super user): what a test itself reads, writes and sets up with."""
    return infra.kafka


@pytest.fixture(scope="session")
def redis_url(infra: Endpoints) -> str:
    return infra.redis_url


@pytest.fixture(scope="session")
def redis_admin(infra: Endpoints) -> dict[str, Any]:
    """redis-py's credentials of the session Redis's admin (a test's own client: any key, any command); empty
    for a Redis the environment gave as it is."""
    return infra.redis_credentials()


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
