"""Decision records, the claim guard and recoveries against a real Redis (services/registry/ledger.py,
claims.py, recovery.py), without Kafka: the plans topic is a list here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.registry.claims import ClaimsLostError, Holding, RedisClaims
from services.registry.handlers import Held
from services.registry.ledger import PlanLedger
from services.registry.metrics import RegistryMetrics
from services.registry.recovery import RegistryBackend
from shared.clock import derived_id, from_epoch_s
from shared.messages import PlanPublished

HOUR = 3600
T = 1_710_028_800


def plan(
    profile: str,
    start: int,
    *,
    end: int | None = None,
    h: str = "a",
    fp: str = "1",
    asset: str | None = "ADA",
) -> PlanPublished:
    return PlanPublished(
        id=derived_id("plan", profile, start, fp),
        event_time=from_epoch_s(start),
        correlation_id="test",
        profile=profile,
        epoch=start // HOUR,
        epoch_start=from_epoch_s(start),
        epoch_end=from_epoch_s(end or start + HOUR),
        hash=h * 64,
        nonce=0,
        strategy="multi_phase_strategy_weight_tensor",
        parameters={"gain": 1.0},
        blend_weight=0.8,
        assets=["BTC", *([asset] if asset else [])],
        random_asset=asset,
        products=["BTC/USDC"],
        fingerprint=fp * 64,
    )


NS: dict[int, str] = {}


@pytest.fixture
async def client(
    redis_url: str, redis_admin: dict[str, Any], namespace: str
) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url, **redis_admin)
    NS[id(r)] = namespace
    yield r
    keys = [k async for k in r.scan_iter(match=f"{namespace}:*")]
    if keys:
        await r.delete(*keys)
    del NS[id(r)]
    await r.aclose()


def ns_of(r: aioredis.Redis) -> str:
    """The test's own namespace (conftest's `namespace`), so parallel tests never share keys."""
    return NS[id(r)]


async def test_first_decision_wins_and_is_marked_published(client: aioredis.Redis) -> None:
    ledger = PlanLedger(client, ns_of(client))
    a, b = plan("pa", T, fp="1"), plan("pa", T, fp="2")
    first, second = await asyncio.gather(
        ledger.decide(a, "r1", asset_claimed=True, generation=None),
        ledger.decide(b, "r2", asset_claimed=False, generation=None),
    )
    assert [first.won, second.won].count(True) == 1  # racing over two connections: exactly one wins
    win, lose = (first, second) if first.won else (second, first)
    assert lose.plan == win.plan and lose.owner == win.owner and lose.asset_claimed is win.asset_claimed
    assert not lose.published
    rec = await ledger.lookup("pa", T)
    assert rec is not None and rec.plan == win.plan and not rec.won
    other = b if win.plan == a else a
    assert not await ledger.mark_published("pa", T, other.id)  # not the recorded plan: untouched
    assert await ledger.mark_published("pa", T, win.plan.id)
    rec = await ledger.lookup("pa", T)
    assert rec is not None and rec.published
    assert await ledger.lookup("pa", T + HOUR) is None
    ttl = await client.pttl(ledger.key("pa", T))
    assert ttl > 5 * HOUR * 1000  # decisions outlive their epoch: a lagging replica must still find them


async def test_takeover_after_the_lease_only(client: aioredis.Redis) -> None:
    now = [1_000_000]
    ledger = PlanLedger(client, ns_of(client), now_ms=lambda: now[0])
    p = plan("pa", T)
    await ledger.decide(p, "r1", asset_claimed=True, generation=None)
    assert await ledger.takeover("pa", T, "r2", lease_s=10) == ("WAIT", None)
    assert await ledger.takeover("pa", T, "r1", lease_s=10) == ("OK", p)  # the owner itself, at once
    now[0] += 11_000
    assert await ledger.takeover("pa", T, "r2", lease_s=10) == ("OK", p)
    assert await ledger.takeover("pa", T, "r3", lease_s=10) == ("WAIT", None)  # r2's fresh lease
    await ledger.mark_published("pa", T, p.id)
    now[0] += 11_000
    assert await ledger.takeover("pa", T, "r3", lease_s=10) == ("PUBLISHED", None)
    assert await ledger.takeover("pb", T, "r3", lease_s=10) == ("GONE", None)


async def test_guard_refuses_claims_and_decisions_on_a_lost_claim_set(client: aioredis.Redis) -> None:
    ns = ns_of(client)
    claims, ledger = RedisClaims(client, ns), PlanLedger(client, ns)
    gen = await ledger.set_generation()
    claims.generation = gen
    assert (
        await claims.claim_interval("pa", T, T + HOUR, hash_hex="a" * 64, fingerprint="1" * 64, asset="ADA")
    ).ok
    await client.delete(claims.ready_key)  # what FLUSHDB / a restart without persistence does to it
    with pytest.raises(ClaimsLostError) as lost:
        await claims.claim_interval("pb", T, T + HOUR, hash_hex="b" * 64, fingerprint="2" * 64, asset="DOT")
    assert lost.value.reason == "NOT_READY"
    with pytest.raises(ClaimsLostError):
        await ledger.decide(plan("pb", T), "r1", asset_claimed=True, generation=gen)
    other = await ledger.set_generation()
    with pytest.raises(ClaimsLostError) as stale:
        await claims.claim_interval("pb", T, T + HOUR, hash_hex="b" * 64, fingerprint="2" * 64, asset="DOT")
    assert (stale.value.reason, stale.value.generation) == ("STALE", other)
    assert await claims.holders("hash", "b" * 64) == []  # nothing written by refused claims
    claims.generation = None  # unguarded (tests, benchmark) claims as before
    assert (
        await claims.claim_interval("pb", T, T + HOUR, hash_hex="b" * 64, fingerprint="2" * 64, asset="DOT")
    ).ok


def backend(client: aioredis.Redis, instance: str, topic: list[PlanPublished]) -> RegistryBackend:
    ns = ns_of(client)

    async def read_topic() -> list[PlanPublished]:
        await asyncio.sleep(0.05)  # as slow as a real read, so that concurrent recoveries overlap
        return list(topic)

    return RegistryBackend(
        RedisClaims(client, ns),
        PlanLedger(client, ns),
        instance=instance,
        read_topic=read_topic,
        priorities={"pa": 1, "pb": 2, "pc": 3},
        metrics=RegistryMetrics(instance),
    )


async def test_rebuild_restores_live_claims_and_decisions_once(client: aioredis.Redis) -> None:
    topic = [
        plan("pa", T - 3 * HOUR, h="a", fp="1", asset="ADA"),  # long over: decision only
        plan("pb", T - 4 * HOUR, end=T + 4 * HOUR, h="b", fp="2", asset="DOT"),  # 8-hour epoch, still live
        plan("pa", T, h="c", fp="3", asset="LINK"),
    ]
    b1, b2 = backend(client, "r1", topic), backend(client, "r2", topic)
    unpublished = Held(
        plan("pc", T, h="d", fp="4", asset="AVAX"), "r2", True
    )  # r2 decided it, not yet on Kafka
    kinds = await asyncio.gather(b1.recover([]), b2.recover([unpublished]))
    assert sorted(kinds) == ["rebuilt", "rejoined"]
    assert b1.generation == b2.generation == await b1.ledger.generation()
    claims = b1.claims
    assert await claims.holders("fp", "2" * 64) == [Holding("pb", T - 4 * HOUR, T + 4 * HOUR)]
    assert await claims.holders("asset", "LINK") == [Holding("pa", T, T + HOUR)]
    assert await claims.holders("asset", "AVAX") == [Holding("pc", T, T + HOUR)]
    assert await claims.holders("fp", "1" * 64) == []  # ended more than the grace before "now"
    for p in topic:
        rec = await b1.ledger.lookup(p.profile, int(p.epoch_start.timestamp()))
        assert rec is not None and rec.plan == p and rec.published
    rec = await b1.ledger.lookup("pc", T)
    assert rec is not None and rec.owner == "r2" and not rec.published
    # a guarded claim of another profile now meets the restored claims
    res = await claims.claim_interval("pd", T, T + HOUR, hash_hex="e" * 64, fingerprint="2" * 64, asset=None)
    assert res.holder == "pb"


async def test_a_new_redis_server_run_fences_the_claim_set(client: aioredis.Redis) -> None:
    ledger = PlanLedger(client, ns_of(client))
    await ledger.set_generation()
    run_id = await ledger.server_run_id()
    assert len(run_id) == 40
    assert not await ledger.fence(run_id)  # first record: nothing to fence
    assert not await ledger.fence(run_id)
    assert await ledger.generation() is not None
    # Redis came back from a snapshot: its run id differs from the one the claim set was built on
    await client.set(ledger.run_key, "0" * 40)
    assert await ledger.fence(run_id)
    assert await ledger.generation() is None  # the next guarded claim answers NOT_READY: a rebuild follows
    assert not await ledger.fence(run_id)  # only the first replica to notice fences
