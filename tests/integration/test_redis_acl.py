"""Redis lets in only the registry and the snapshot keepers (issue #15): the bus's own Redis (`mpctl infra up`)
has no `default` user; each namespace's Redis users (shared/principals.py `redis_users`) authenticate with
their bus principal's password, and each may use only its commands and keys. The registry its own prefix
(`<ns>:reg:`), the stateful services the namespace's snapshot key; the ingest and the operator nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from mpctl.bus import redis_admin
from mpctl.cli import build_parser
from mpctl.infra import Endpoints, LocalInfra
from services.registry.claims import RedisClaims
from shared.config import AppConfig, load_config
from shared.principals import principal, redis_users, registry_key_prefix, state_secret_key
from shared.snapshots import load_state_key
from tests.bus import create_principals
from tests.integration.ops_stack import TEMPLATE

A = "profile_a"


@pytest.fixture(scope="module")
def cfg() -> AppConfig:
    return load_config(TEMPLATE)


@pytest.fixture
def secured(infra: Endpoints) -> Endpoints:
    if not infra.redis_secured:
        pytest.skip("Redis given by the environment: used as given, no users of ours")
    return infra


@pytest.fixture
async def ns(secured: Endpoints, cfg: AppConfig) -> str:
    ns = f"t{uuid.uuid4().hex[:8]}"
    await create_principals(secured.kafka, cfg, ns)
    return ns


def connect(endpoints: Endpoints, **credentials: Any) -> aioredis.Redis:
    return aioredis.Redis.from_url(endpoints.redis_url, socket_timeout=5.0, **credentials)


@pytest.fixture
async def as_registry(secured: Endpoints, ns: str) -> AsyncIterator[aioredis.Redis]:
    r = connect(secured, **secured.redis_credentials(principal(ns, "registry")))
    yield r
    await r.aclose()


async def test_a_client_without_the_credentials_is_refused(secured: Endpoints, ns: str) -> None:
    registry = principal(ns, "registry")
    tries: list[dict[str, Any]] = [
        {},  # no credentials: the default user is off
        {"username": registry, "password": "not-the-password"},
        # another principal's password, as the registry
        {"username": registry, "password": secured.redis_credentials(principal(ns, "arbiter"))["password"]},
        # principals with no Redis user at all
        secured.redis_credentials(principal(ns, "ingest")),
        secured.redis_credentials(principal(ns, "operator")),
        {"password": secured.redis_credentials()["password"]},  # the admin's password for `default`
    ]
    for creds in tries:
        client = connect(secured, **creds)
        try:
            with pytest.raises((AuthenticationError, ResponseError)) as err:
                await client.get(f"{ns}:reg:ready")
            text = str(err.value)
            assert any(
                w in text for w in ("NOAUTH", "WRONGPASS", "invalid username-password", "authenticated")
            ), text
            if "password" in creds:
                assert creds["password"] not in text
        finally:
            await client.aclose()


async def test_the_registry_uses_its_prefix_and_commands_only(
    secured: Endpoints, ns: str, as_registry: aioredis.Redis
) -> None:
    # What it does: its claims' Lua scripts, its own keys.
    claims = RedisClaims(as_registry, ns, grace_s=300)
    res = await claims.claim_interval("pa", 0, 3600, hash_hex="a" * 64, fingerprint="1" * 64, asset="ADA")
    assert res.ok
    assert await claims.held_keys("pa")
    assert await claims.snapshot()  # SCAN of its prefix
    assert await claims.release("pa") > 0  # the release script
    await as_registry.set(f"{registry_key_prefix(ns)}probe", "1", ex=60)
    assert await as_registry.get(f"{registry_key_prefix(ns)}probe") == b"1"
    assert (await as_registry.info("server"))["run_id"]

    other = f"t{uuid.uuid4().hex[:8]}"
    refused = [
        as_registry.get(f"{registry_key_prefix(other)}ready"),  # another namespace's registry keys
        as_registry.set(f"{registry_key_prefix(other)}ready", "x"),
        as_registry.get(state_secret_key(ns)),  # the snapshot key is not the registry's
        as_registry.get("unrelated"),
        as_registry.flushall(),
        as_registry.flushdb(),
        as_registry.config_get("*"),
        as_registry.keys("*"),
        as_registry.execute_command("ACL", "LIST"),
        as_registry.eval("return redis.call('GET', KEYS[1])", 1, state_secret_key(ns)),
    ]
    for call in refused:
        with pytest.raises(NoPermissionError):
            await call
    admin = connect(secured, **secured.redis_credentials())
    try:
        assert await admin.exists(f"{registry_key_prefix(ns)}probe") == 1  # nothing was flushed
    finally:
        await admin.aclose()


async def test_a_stateful_service_reads_the_snapshot_key_and_nothing_else(
    secured: Endpoints, ns: str, cfg: AppConfig
) -> None:
    who = principal(ns, "strategy", A)
    creds = secured.redis_credentials(who)
    key = await load_state_key(ns, secured.redis_url, {}, credentials=creds)
    assert key is not None
    # Another keeper of the namespace gets the same key (the first one stored it).
    other = secured.redis_credentials(principal(ns, "arbiter"))
    assert await load_state_key(ns, secured.redis_url, {}, credentials=other) == key
    client = connect(secured, **creds)
    try:
        for call in (
            client.get(f"{registry_key_prefix(ns)}ready"),
            client.delete(state_secret_key(ns)),
            client.get(state_secret_key(f"t{uuid.uuid4().hex[:8]}")),
            client.keys("*"),
        ):
            with pytest.raises(NoPermissionError):
                await call
    finally:
        await client.aclose()
    # The users are exactly the table's.
    names = {u.name for u in redis_users(cfg, ns)}
    assert principal(ns, "registry") in names and principal(ns, "ingest") not in names


def test_the_users_survive_a_redis_restart(local_infra: LocalInfra, secured: Endpoints, ns: str) -> None:
    """The fault suite restarts Redis (and flushes it): the namespace's users are in the ACL file it starts
    with, so a restarted registry gets back in."""
    local_infra.restart_redis(flush=True)
    import redis

    client = redis.Redis.from_url(
        secured.redis_url, socket_timeout=5.0, **secured.redis_credentials(principal(ns, "registry"))
    )
    try:
        assert client.set(f"{registry_key_prefix(ns)}after", "1", ex=60)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
    finally:
        client.close()
    bus = secured.bus
    assert bus is not None
    admin = redis_admin(bus)
    assert isinstance(admin, redis.Redis)
    try:
        assert admin.ping()
    finally:
        admin.close()


async def test_rotating_the_registry_retires_its_old_redis_password(
    secured: Endpoints, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    who = principal(ns, "registry")
    old = secured.redis_credentials(who)
    argv = ["bus", "rotate", who, "--config", str(TEMPLATE), "--namespace", ns]
    args = build_parser("bus").parse_args([*argv, "--bootstrap", secured.kafka.servers])
    assert await asyncio.to_thread(args.handler, args) == 0
    new = secured.redis_credentials(who)
    assert new["password"] != old["password"]
    assert old["password"] not in capsys.readouterr().out
    for creds, works in ((new, True), (old, False)):
        client = connect(secured, **creds)
        try:
            if works:
                assert await client.set(f"{registry_key_prefix(ns)}rotated", "1", ex=60)
            else:
                with pytest.raises(AuthenticationError):
                    await client.get(f"{registry_key_prefix(ns)}rotated")
        finally:
            await client.aclose()
