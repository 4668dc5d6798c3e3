"""Redis lets in only the registry (issue #15): the bus's own Redis (`mpctl infra up`) has no `default` user; a
namespace's one Redis user (shared/principals.py `redis_users`), the registry, authenticates with its bus
principal's password and may use only its commands and its own prefix (`<ns>:reg:`). No other service has a
Redis user: the snapshot keepers get their key from mpctl (shared/snapshots.py), not from Redis."""

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
from shared.principals import principal, redis_users, registry_key_prefix
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
        # principals with no Redis user at all: every service but the registry
        *(
            secured.redis_credentials(principal(ns, *who))
            for who in (
                ("ingest",),
                ("operator",),
                ("arbiter",),
                ("monitor",),
                ("strategy", A),
                ("execution", A),
            )
        ),
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
        as_registry.get(f"{ns}:state:secret"),  # outside its prefix
        as_registry.get("unrelated"),
        as_registry.flushall(),
        as_registry.flushdb(),
        as_registry.config_get("*"),
        as_registry.keys("*"),
        as_registry.execute_command("ACL", "LIST"),
        as_registry.eval("return redis.call('GET', KEYS[1])", 1, f"{ns}:state:secret"),
    ]
    for call in refused:
        with pytest.raises(NoPermissionError):
            await call
    admin = connect(secured, **secured.redis_credentials())
    try:
        assert await admin.exists(f"{registry_key_prefix(ns)}probe") == 1  # nothing was flushed
    finally:
        await admin.aclose()


async def test_the_namespace_has_one_redis_user_and_stale_ones_are_removed(
    secured: Endpoints, ns: str, cfg: AppConfig
) -> None:
    """The registry is the namespace's only Redis user; a user left by an earlier version (a snapshot keeper's)
    is deleted when the namespace's users are applied again."""
    assert [u.name for u in redis_users(cfg, ns)] == [principal(ns, "registry")]
    stale = principal(ns, "strategy", A)
    admin = connect(secured, **secured.redis_credentials())
    try:
        await admin.execute_command("ACL", "SETUSER", stale, "on", ">some-old-password", "~x", "+get")
        assert bus_users(await admin.acl_users(), ns) == {principal(ns, "registry"), stale}
        await create_principals(secured.kafka, cfg, ns)
        assert bus_users(await admin.acl_users(), ns) == {principal(ns, "registry")}
    finally:
        await admin.aclose()


def bus_users(names: list[Any], ns: str) -> set[str]:
    """The namespace's users among Redis's (`ACL USERS`)."""
    text = (n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return {n for n in text if n.startswith(f"{ns}.")}


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


@pytest.mark.parametrize("signed_in", [False, True])
async def test_a_registry_refused_by_redis_stops_at_once_saying_what_to_change(
    secured: Endpoints, ns: str, signed_in: bool
) -> None:
    """A broker of one's own with the bus's Redis (REDIS_URL without MPCTL_BUS_DIR): the registry is not given
    the Redis sign-in, or its user there is wrong. It stops at its first Redis call, with one line, no
    traceback of retries and no password."""
    from pydantic import SecretStr

    from services.registry.bootstrap import bootstrap as registry_bootstrap
    from shared.bus import KafkaAccess
    from shared.runtime import ServiceSettings

    who = principal(ns, "registry")
    kafka = (
        KafkaAccess(servers=secured.kafka.servers, username=who, password=SecretStr("not-its-password"))
        if signed_in
        else KafkaAccess(servers=secured.kafka.servers)
    )
    settings = ServiceSettings(
        config_path=TEMPLATE, kafka=kafka, namespace=ns, redis_url=secured.redis_url, redis_auth=signed_in
    )
    svc = registry_bootstrap(settings)
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(SystemExit) as stopped:
        await svc.run(asyncio.Event())
    assert asyncio.get_running_loop().time() - t0 < 10  # not after the client's retries (about 25 s)
    text = str(stopped.value)
    if signed_in:
        assert f"refused the registry's user {who}" in text and "mpctl bus apply" in text
        assert "not-its-password" not in text
    else:
        assert "requires authentication and the registry gave none" in text and "--redis-auth" in text
    host = secured.redis_url.split("//")[1].split("/")[0]
    assert host in text
