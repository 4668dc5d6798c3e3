"""The bus lets no one in (issue #15): on the real broker with its authorizer on, every principal is refused
every topic, operation and group its role does not need; the refusal is logged without the secret; and what
a refused client tried to write is not in the books.

Each case connects as the principal `mpctl` would start that service as (shared/principals.py), with the
password mpctl would hand it (mpctl/bus.py)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
)
from pydantic import SecretStr

from mpctl.cli import build_parser
from mpctl.infra import Endpoints, LocalInfra
from mpctl.stack import create_topics
from shared.bus import KafkaAccess
from shared.config import AppConfig, load_config
from shared.principals import acls, principal, principals
from shared.topics import Topics
from tests.integration.ops_stack import TEMPLATE

A, B = "profile_a", "profile_b"

# (service, profile, topic of the namespace): writes each principal must be refused.
REFUSED_WRITES: list[tuple[str, str | None, Callable[[Topics], str]]] = [
    ("strategy", A, lambda t: t.approved(A)),  # hand the worker an order to send with A's key
    ("execution", B, lambda t: t.approved(A)),
    ("monitor", None, lambda t: t.approved(A)),
    ("operator", None, lambda t: t.approved(A)),
    ("execution", A, lambda t: t.decisions),  # a forged decision, to have a forged fill trusted
    ("execution", B, lambda t: t.decisions),
    ("strategy", A, lambda t: t.decisions),
    ("strategy", B, lambda t: t.decisions),
    ("monitor", None, lambda t: t.decisions),
    ("operator", None, lambda t: t.decisions),
    ("arbiter", None, lambda t: t.events),  # fills are the execution workers'
    ("registry", None, lambda t: t.events),  # a forged fill
    ("monitor", None, lambda t: t.events),
    ("operator", None, lambda t: t.events),
    ("ingest", None, lambda t: t.events),
    ("arbiter", None, lambda t: t.plans),  # plans are the registry's alone
    ("strategy", A, lambda t: t.plans),
    ("registry", None, lambda t: t.commands),  # commands are the operator's alone
    ("strategy", A, lambda t: t.commands),
    ("execution", A, lambda t: t.commands),
    ("monitor", None, lambda t: t.commands),
    ("monitor", None, lambda t: t.candles),  # candles are the ingest's alone
    ("arbiter", None, lambda t: t.candles),
    ("ingest", None, lambda t: t.intents),
    ("execution", A, lambda t: t.state("strategy", A)),  # each state topic is its owner's
    ("strategy", B, lambda t: t.state("strategy", A)),
]
# Reads each must be refused (a record is there: an admin wrote it, and an allowed reader sees it).
REFUSED_READS: list[tuple[str, str | None, Callable[[Topics], str]]] = [
    ("execution", A, lambda t: t.approved(B)),
    ("strategy", A, lambda t: t.approved(A)),
    ("operator", None, lambda t: t.approved(A)),
    (
        "execution",
        A,
        lambda t: t.decisions,
    ),  # the worker sends what it is handed: decisions are not its input
    ("monitor", None, lambda t: t.state("execution", A)),
    ("strategy", B, lambda t: t.state("strategy", A)),
]
# Consumer groups each must not join.
REFUSED_GROUPS: list[tuple[str, str | None, Callable[[Topics], str]]] = [
    ("strategy", A, lambda t: t.group("execution", A)),
    ("execution", B, lambda t: t.group("execution", A)),
    ("monitor", None, lambda t: t.group("arbiter")),
    ("operator", None, lambda t: t.group("strategy", B)),
]


def case_id(case: tuple[str, str | None, Callable[[Topics], str]]) -> str:
    who, profile, where = case
    return f"{who}{'.' + profile if profile else ''}->{where(Topics('ns'))[3:]}"


@pytest.fixture(scope="module")
async def bus(infra: Endpoints) -> tuple[Endpoints, AppConfig, str]:
    """One namespace, set up as `mpctl demo` sets it up: its topics, principals and ACLs."""
    if infra.bus is None:
        pytest.skip("the broker's secrets are not given (MPCTL_BUS_DIR): not a broker mpctl runs")
    cfg = load_config(TEMPLATE)
    ns = f"acl{uuid.uuid4().hex[:6]}"
    await create_topics(infra, cfg, ns)
    return infra, cfg, ns


def access(endpoints: Endpoints, ns: str, who: str, profile: str | None) -> KafkaAccess:
    return endpoints.principal(principal(ns, who, profile))


async def end_offset(admin: KafkaAccess, topic: str) -> int:
    c = AIOKafkaConsumer(**admin.client_options(), enable_auto_commit=False)
    await c.start()
    try:
        tp = TopicPartition(topic, 0)
        return int((await c.end_offsets([tp]))[tp])
    finally:
        await c.stop()


async def write(acc: KafkaAccess, topic: str, value: bytes) -> None:
    p = AIOKafkaProducer(**acc.client_options(), acks="all", request_timeout_ms=10_000)
    await p.start()
    try:
        await p.send_and_wait(topic, value, key=b"k")  # a key: compacted topics (plans, state) need one
    finally:
        await p.stop()


async def read(acc: KafkaAccess, topic: str) -> list[bytes]:
    """What `acc` gets from the start of partition 0 in 3 s (an unauthorized fetch returns nothing)."""
    c = AIOKafkaConsumer(**acc.client_options(), enable_auto_commit=False, auto_offset_reset="earliest")
    await c.start()
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek(tp, 0)
        batch = await c.getmany(tp, timeout_ms=3000)
        return [r.value for r in batch.get(tp, []) if r.value is not None]
    finally:
        await c.stop()


def assert_logged_without_secret(caplog: pytest.LogCaptureFixture, *secrets: SecretStr | None) -> None:
    text = caplog.text
    for s in secrets:
        if s is not None:
            assert s.get_secret_value() not in text, "a bus password appeared in a log line"


def test_the_acl_set_covers_every_principal_and_grants_approvals_to_their_owners_only() -> None:
    cfg = load_config(TEMPLATE)
    rules = acls(cfg, "ns")
    who = {r.principal for r in rules}
    assert who == set(principals(cfg, "ns")), "a principal without rights, or rights without a principal"
    t = Topics("ns")
    for pid in cfg.profiles:
        on = [r for r in rules if r.resource == "topic" and r.name == t.approved(pid)]
        assert {(r.principal, r.operation) for r in on} == {
            ("ns.arbiter", "write"),
            (f"ns.execution.{pid}", "read"),
        }
    prefixed = {(r.principal, r.resource, r.name) for r in rules if r.pattern == "prefixed"}
    assert all(r.operation == "describe" for r in rules if r.pattern == "prefixed")  # offsets, never a record
    assert prefixed == {(w, k, "ns.") for w in ("ns.monitor", "ns.operator") for k in ("topic", "group")}
    assert {r.principal for r in rules if r.name == t.commands and r.operation == "write"} == {"ns.operator"}
    assert {r.principal for r in rules if r.name == t.plans and r.operation == "write"} == {"ns.registry"}
    assert {r.principal for r in rules if r.name == t.candles and r.operation == "write"} == {"ns.ingest"}
    writers = {r.principal for r in rules if r.name == t.events and r.operation == "write"}
    workers = {f"ns.{s}.{p}" for s in ("execution", "strategy") for p in cfg.profiles}
    assert writers == workers  # the strategies for their halts (see shared/principals.py)
    # Decisions: written by the arbiter alone, read by every strategy worker and the reports.
    on_decisions = {(r.principal, r.operation) for r in rules if r.name == t.decisions}
    assert {w for w, op in on_decisions if op == "write"} == {"ns.arbiter"}
    readers = {w for w, op in on_decisions if op == "read"}
    assert readers >= {f"ns.strategy.{p}" for p in cfg.profiles} | {"ns.monitor", "ns.operator"}
    assert not any(w.startswith("ns.execution.") for w in readers)


@pytest.mark.parametrize("case", REFUSED_WRITES, ids=case_id)
async def test_a_write_outside_the_role_is_refused_and_nothing_is_appended(
    bus: tuple[Endpoints, AppConfig, str],
    case: tuple[str, str | None, Callable[[Topics], str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoints, _cfg, ns = bus
    who, profile, where = case
    topic = where(Topics(ns))
    before = await end_offset(endpoints.kafka, topic)
    acc = access(endpoints, ns, who, profile)
    with caplog.at_level(logging.DEBUG), pytest.raises(TopicAuthorizationFailedError):
        await write(acc, topic, b'{"forged": true}')
    assert await end_offset(endpoints.kafka, topic) == before
    assert_logged_without_secret(caplog, acc.password, endpoints.kafka.password)


@pytest.mark.parametrize("case", REFUSED_READS, ids=case_id)
async def test_a_read_outside_the_role_gets_nothing(
    bus: tuple[Endpoints, AppConfig, str],
    case: tuple[str, str | None, Callable[[Topics], str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoints, _cfg, ns = bus
    who, profile, where = case
    topic = where(Topics(ns))
    marker = f"record-{uuid.uuid4().hex}".encode()
    await write(endpoints.kafka, topic, marker)
    assert marker in await read(endpoints.kafka, topic)  # it is there for a reader allowed to see it
    acc = access(endpoints, ns, who, profile)
    with caplog.at_level(logging.DEBUG):
        try:
            got = await read(acc, topic)
        except TopicAuthorizationFailedError:
            got = None  # a principal that may see the topic's offsets (Describe) is refused the fetch itself
    if got is not None:  # one that may not even see the topic gets nothing, and the client says why
        assert got == []
        assert f"Topic {topic} is not authorized" in caplog.text
    assert_logged_without_secret(caplog, acc.password, endpoints.kafka.password)


@pytest.mark.parametrize("case", REFUSED_GROUPS, ids=case_id)
async def test_joining_another_services_group_is_refused(
    bus: tuple[Endpoints, AppConfig, str], case: tuple[str, str | None, Callable[[Topics], str]]
) -> None:
    endpoints, _cfg, ns = bus
    who, profile, group = case
    t = Topics(ns)
    acc = access(endpoints, ns, who, profile)
    c = AIOKafkaConsumer(**acc.client_options(), group_id=group(t), enable_auto_commit=False)
    await c.start()
    try:
        c.subscribe([t.candles])
        with pytest.raises(GroupAuthorizationFailedError):
            await asyncio.wait_for(c.getmany(timeout_ms=5000), 30)
    finally:
        await c.stop()


async def test_what_each_role_needs_is_allowed(bus: tuple[Endpoints, AppConfig, str]) -> None:
    """The controls: the same clients succeed where the role allows, so the refusals above are the ACLs."""
    endpoints, _cfg, ns = bus
    t = Topics(ns)
    order = f"order-{uuid.uuid4().hex}".encode()
    await write(access(endpoints, ns, "arbiter", None), t.approved(A), order)
    assert order in await read(access(endpoints, ns, "execution", A), t.approved(A))
    await write(access(endpoints, ns, "operator", None), t.commands, b"{}")
    await write(access(endpoints, ns, "registry", None), t.plans, b"{}")
    await write(access(endpoints, ns, "execution", A), t.events, b"{}")
    decision = f"decision-{uuid.uuid4().hex}".encode()
    await write(access(endpoints, ns, "arbiter", None), t.decisions, decision)
    assert decision in await read(access(endpoints, ns, "strategy", A), t.decisions)


async def test_another_namespaces_principal_is_refused(bus: tuple[Endpoints, AppConfig, str]) -> None:
    endpoints, cfg, ns = bus
    other = f"acl{uuid.uuid4().hex[:6]}"
    await create_topics(endpoints, cfg, other)
    intruder = access(endpoints, other, "arbiter", None)  # the arbiter of another run on the same broker
    with pytest.raises(TopicAuthorizationFailedError):
        await write(intruder, Topics(ns).approved(A), b"{}")


async def test_no_or_wrong_credentials_cannot_connect_and_the_secret_is_not_logged(
    bus: tuple[Endpoints, AppConfig, str], caplog: pytest.LogCaptureFixture
) -> None:
    endpoints, _cfg, ns = bus
    t = Topics(ns)
    anonymous = KafkaAccess(servers=endpoints.kafka.servers)
    wrong = SecretStr(f"wrong-{uuid.uuid4().hex}")
    impostor = endpoints.kafka.as_principal(principal(ns, "operator"), wrong)
    unknown = endpoints.kafka.as_principal(f"{ns}.nobody", wrong)
    before = await end_offset(endpoints.kafka, t.commands)
    with caplog.at_level(logging.DEBUG):
        for acc in (anonymous, impostor, unknown):
            p = AIOKafkaProducer(**acc.client_options(), request_timeout_ms=5_000)
            with pytest.raises(KafkaConnectionError):
                await asyncio.wait_for(p.start(), 30)
            await p.stop()
    assert "SaslAuthenticationFailed" in caplog.text  # the refusal is said ...
    assert_logged_without_secret(caplog, wrong, endpoints.kafka.password)  # ... without the secret
    assert await end_offset(endpoints.kafka, t.commands) == before


async def test_the_broker_logs_each_denial_without_a_secret(
    bus: tuple[Endpoints, AppConfig, str], local_infra: LocalInfra
) -> None:
    endpoints, _cfg, ns = bus
    t = Topics(ns)
    acc = access(endpoints, ns, "strategy", B)
    with pytest.raises(TopicAuthorizationFailedError):
        await write(acc, t.approved(B), b"{}")
    log = local_infra.kafka_log.read_text(errors="replace")
    denied = [ln for ln in log.splitlines() if f"User:{ns}.strategy.{B}" in ln and "Denied" in ln]
    assert any(t.approved(B) in ln for ln in denied), "the broker did not log the denied write"
    assert acc.password is not None and endpoints.kafka.password is not None
    for secret in (acc.password, endpoints.kafka.password):
        assert secret.get_secret_value() not in log


async def test_rotating_a_principal_retires_its_old_password(
    bus: tuple[Endpoints, AppConfig, str], capsys: pytest.CaptureFixture[str]
) -> None:
    endpoints, _cfg, ns = bus
    t = Topics(ns)
    who = principal(ns, "operator")
    old = endpoints.principal(who)
    await write(old, t.commands, b"{}")
    args = build_parser("bus").parse_args(
        ["bus", "rotate", who, "--config", str(TEMPLATE), "--namespace", ns, "--bootstrap", old.servers]
    )
    assert await asyncio.to_thread(args.handler, args) == 0
    out = capsys.readouterr().out
    new = endpoints.principal(who)
    assert new.password != old.password and "generation 1" in out
    assert old.password is not None and new.password is not None
    assert old.password.get_secret_value() not in out and new.password.get_secret_value() not in out
    await write(new, t.commands, b"{}")
    p = AIOKafkaProducer(**old.client_options(), request_timeout_ms=5_000)
    with pytest.raises(KafkaConnectionError):
        await asyncio.wait_for(p.start(), 30)
    await p.stop()


def test_unknown_principal_is_refused_naming_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser("bus").parse_args(["bus", "rotate", "mp.strategy.nobody", "--config", str(TEMPLATE)])
    assert args.handler(args) == 2
    err = capsys.readouterr().err
    assert "unknown principal 'mp.strategy.nobody'" in err and "mp.strategy.profile_a" in err
