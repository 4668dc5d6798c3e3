"""Registry claims against a real Redis (services/registry/claims.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.registry.claims import Holding, RedisClaims
from services.registry.domain import ClaimOutcome, ResolvedPlan, derive_candidate, resolve_plan_async
from shared.config import RegistrySettings, load_config

CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "coinbase_profiles.yaml"
H1, H2 = "a" * 64, "b" * 64
F1, F2 = "1" * 64, "2" * 64
HOUR = 3600


@pytest.fixture
async def client(redis_url: str, redis_admin: dict[str, Any]) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url, decode_responses=False, **redis_admin)
    yield r
    await r.aclose()


@pytest.fixture
async def claims(client: aioredis.Redis) -> AsyncIterator[RedisClaims]:
    ns = f"t{uuid.uuid4().hex[:10]}"
    yield RedisClaims(client, ns, grace_s=300)
    keys = [k async for k in client.scan_iter(match=f"{ns}:*")]
    if keys:
        await client.delete(*keys)


async def test_claim_ok_and_holders(claims: RedisClaims, client: aioredis.Redis) -> None:
    res = await claims.claim_interval("pa", 0, HOUR, hash_hex=H1, fingerprint=F1, asset="ADA")
    assert res.ok and res.holder is None
    assert await claims.holders("hash", H1) == [Holding("pa", 0, HOUR)]
    assert await claims.holders("fp", F1) == [Holding("pa", 0, HOUR)]
    assert await claims.holders("asset", "ADA", at_s=10) == [Holding("pa", 0, HOUR)]
    assert await claims.holders("asset", "ADA", at_s=HOUR) == []
    assert await claims.held_keys("pa") == sorted(
        [claims.key("hash", H1), claims.key("fp", F1), claims.key("asset", "ADA")]
    )
    # expiry: (end - start + grace) seconds of wall time
    ttl = await client.pttl(claims.key("fp", F1))
    assert (HOUR + 300) * 1000 - 5000 < ttl <= (HOUR + 300) * 1000
    snap = await claims.snapshot()
    assert snap == {
        "hash": {H1: [Holding("pa", 0, HOUR)]},
        "fp": {F1: [Holding("pa", 0, HOUR)]},
        "asset": {"ADA": [Holding("pa", 0, HOUR)]},
    }


async def test_overlapping_claims_conflict_with_holder(claims: RedisClaims) -> None:
    assert (await claims.claim_interval("pa", 0, 4 * HOUR, hash_hex=H1, fingerprint=F1, asset="ADA")).ok
    fp = await claims.claim_interval("pb", HOUR, 2 * HOUR, hash_hex=H2, fingerprint=F1, asset="DOT")
    assert (fp.outcome, fp.holder, fp.holder_start_s, fp.holder_end_s) == (
        ClaimOutcome.FP_TAKEN,
        "pa",
        0,
        4 * HOUR,
    )
    # the hash is checked first
    h = await claims.claim_interval("pb", HOUR, 2 * HOUR, hash_hex=H1, fingerprint=F1, asset="ADA")
    assert (h.outcome, h.holder) == (ClaimOutcome.HASH_TAKEN, "pa")
    asset = await claims.claim_interval("pb", 3 * HOUR, 5 * HOUR, hash_hex=H2, fingerprint=F2, asset="ADA")
    assert (asset.outcome, asset.holder) == (ClaimOutcome.ASSET_TAKEN, "pa")
    # a refused claim writes nothing
    assert await claims.holders("hash", H2) == []
    assert await claims.holders("fp", F2) == []
    assert await claims.held_keys("pb") == []
    # without an asset, the asset key is neither checked nor written
    ok = await claims.claim_interval("pb", HOUR, 2 * HOUR, hash_hex=H2, fingerprint=F2, asset=None)
    assert ok.ok
    assert await claims.holders("asset", "ADA") == [Holding("pa", 0, 4 * HOUR)]


async def test_non_overlapping_interval_is_ok(claims: RedisClaims) -> None:
    assert (await claims.claim_interval("pa", 0, HOUR, hash_hex=H1, fingerprint=F1, asset="ADA")).ok
    # adjacent half-open intervals do not overlap
    assert (await claims.claim_interval("pb", HOUR, 2 * HOUR, hash_hex=H1, fingerprint=F1, asset="ADA")).ok
    assert (await claims.claim_interval("pc", -HOUR, 0, hash_hex=H1, fingerprint=F1, asset="ADA")).ok
    assert [h.profile for h in await claims.holders("fp", F1)] == ["pc", "pa", "pb"]


async def test_reclaim_is_idempotent(claims: RedisClaims, client: aioredis.Redis) -> None:
    for _ in range(3):
        res = await claims.claim_interval("pa", 0, HOUR, hash_hex=H1, fingerprint=F1, asset="ADA")
        assert res.ok
    assert await client.zcard(claims.key("fp", F1)) == 1
    # the profile's own overlapping members never conflict with it
    assert (await claims.claim_interval("pa", 1800, 5400, hash_hex=H1, fingerprint=F1, asset="ADA")).ok


async def test_concurrent_claims_of_one_fingerprint_have_one_winner(
    redis_url: str, redis_admin: dict[str, Any], claims: RedisClaims
) -> None:
    # 50 claims race, over separate connections and separate adapters (like registry replicas)
    clients = [aioredis.Redis.from_url(redis_url, **redis_admin) for _ in range(5)]
    try:
        adapters = [RedisClaims(c, claims.namespace, grace_s=300) for c in clients]
        results = await asyncio.gather(
            *(
                adapters[i % 5].claim_interval(
                    f"p{i}", 0, HOUR, hash_hex=f"{i:064x}", fingerprint=F1, asset=f"A{i}"
                )
                for i in range(50)
            )
        )
    finally:
        for c in clients:
            await c.aclose()
    winners = [i for i, r in enumerate(results) if r.ok]
    assert len(winners) == 1
    winner = f"p{winners[0]}"
    assert all(r.outcome is ClaimOutcome.FP_TAKEN and r.holder == winner for r in results if not r.ok)
    snap = await claims.snapshot()
    assert snap["fp"] == {F1: [Holding(winner, 0, HOUR)]}
    assert list(snap["hash"]) == [f"{winners[0]:064x}"]  # the losers wrote nothing
    assert list(snap["asset"]) == [f"A{winners[0]}"]


async def test_release_frees_the_profiles_keys(claims: RedisClaims) -> None:
    assert (await claims.claim_interval("pa", 0, HOUR, hash_hex=H1, fingerprint=F1, asset="ADA")).ok
    assert (await claims.claim_interval("pa", HOUR, 2 * HOUR, hash_hex=H2, fingerprint=F1, asset="ADA")).ok
    assert (
        await claims.claim_interval("pb", HOUR, 2 * HOUR, hash_hex="c" * 64, fingerprint=F2, asset="DOT")
    ).ok
    assert not (await claims.claim_interval("pb", 0, HOUR, hash_hex=H1, fingerprint=F2, asset="DOT")).ok

    # one interval only (e.g. before re-resolving an epoch)
    assert await claims.release("pa", start_s=0) == 3
    assert await claims.holders("fp", F1) == [Holding("pa", HOUR, 2 * HOUR)]
    assert claims.key("hash", H1) not in await claims.held_keys("pa")
    assert claims.key("fp", F1) in await claims.held_keys("pa")
    assert (await claims.claim_interval("pb", 0, HOUR, hash_hex=H1, fingerprint=F2, asset="DOT")).ok

    # everything (a disabled profile)
    assert await claims.release("pa") == 3
    assert await claims.held_keys("pa") == []
    snap = await claims.snapshot()
    assert all(h.profile == "pb" for kind in snap.values() for hs in kind.values() for h in hs)
    assert (await claims.claim_interval("pc", HOUR, 2 * HOUR, hash_hex=H2, fingerprint=F1, asset="ADA")).ok
    assert await claims.release("nobody") == 0


async def test_old_members_are_pruned_in_event_time(claims: RedisClaims, client: aioredis.Redis) -> None:
    assert (await claims.claim_interval("pa", 0, HOUR, hash_hex=H1, fingerprint=F1, asset="ADA")).ok
    # pb's claim starts within the grace after pa's end: pa's member stays
    assert (
        await claims.claim_interval("pb", HOUR + 300, 3 * HOUR, hash_hex=H2, fingerprint=F1, asset=None)
    ).ok
    assert [h.profile for h in await claims.holders("fp", F1)] == ["pa", "pb"]
    # pc's claim starts more than grace_s after pa's end: pa's member is pruned from the keys pc checks
    assert (await claims.claim_interval("pc", 3 * HOUR, 4 * HOUR, hash_hex=H1, fingerprint=F1, asset=None)).ok
    assert [h.profile for h in await claims.holders("fp", F1)] == ["pb", "pc"]
    assert [h.profile for h in await claims.holders("hash", H1)] == ["pc"]
    assert [h.profile for h in await claims.holders("asset", "ADA")] == ["pa"]  # not checked by pc
    # expiry never shrinks: a longer claim lengthens it, a shorter one keeps it
    assert (
        await claims.claim_interval("pd", 10 * HOUR, 20 * HOUR, hash_hex="d" * 64, fingerprint=F1, asset=None)
    ).ok
    long_ttl = await client.pttl(claims.key("fp", F1))
    assert long_ttl > (10 * HOUR) * 1000
    assert (
        await claims.claim_interval("pd", 12 * HOUR, 13 * HOUR, hash_hex="e" * 64, fingerprint=F1, asset=None)
    ).ok
    assert await client.pttl(claims.key("fp", F1)) > 10 * HOUR * 1000
    # a claim that prunes every member starts the key afresh, with its own expiry
    assert (
        await claims.claim_interval("pe", 30 * HOUR, 31 * HOUR, hash_hex="f" * 64, fingerprint=F1, asset=None)
    ).ok
    assert await claims.holders("fp", F1) == [Holding("pe", 30 * HOUR, 31 * HOUR)]
    assert await client.pttl(claims.key("fp", F1)) <= (HOUR + 300) * 1000


async def test_claim_rejects_bad_input(claims: RedisClaims) -> None:
    with pytest.raises(ValueError, match="no '|'"):
        await claims.claim_interval("p|x", 0, HOUR, hash_hex=H1, fingerprint=F1, asset=None)
    with pytest.raises(ValueError, match="empty"):
        await claims.claim_interval("pa", HOUR, HOUR, hash_hex=H1, fingerprint=F1, asset=None)


async def test_resolution_over_redis(
    redis_url: str, redis_admin: dict[str, Any], claims: RedisClaims
) -> None:
    """Two registry replicas race to resolve six profiles (three pairs sharing hash settings) for 24 hours:
    fingerprints and random assets stay unique, the second of each pair bumps its nonce."""
    cfg = load_config(CONFIG_PATH)
    a, b = cfg.profiles["profile_a"], cfg.profiles["profile_b"]
    c = a.model_copy(update={"profile_hash": a.profile_hash.model_copy(update={"base_hash": "profile_c"})})
    profiles = {"pa": a, "pa2": a, "pb": b, "pb2": b, "pc": c, "pc2": c}
    reg = RegistrySettings()
    pools = {*a.strategy_config.random_asset_pool, *b.strategy_config.random_asset_pool}
    scores: dict[str, float | None] = {x: float(len(x)) for x in pools}
    other_client = aioredis.Redis.from_url(redis_url, **redis_admin)
    replica = RedisClaims(other_client, claims.namespace, grace_s=300)
    try:
        for hour in range(24):
            t = 1_710_000_000 + hour * HOUR
            jobs = []
            for pid, p in profiles.items():
                epoch = t // p.profile_hash.hash_rotation_interval
                for adapter in (claims, replica):
                    jobs.append(resolve_plan_async(pid, p, epoch, scores, reg, "USDC", adapter.claim))
            plans = await asyncio.gather(*jobs)
            by_profile: dict[str, ResolvedPlan] = {}
            for plan in plans:  # both replicas agree on each profile's plan
                assert by_profile.setdefault(plan.profile, plan) == plan
            assert len({p.fingerprint for p in by_profile.values()}) == 6
            assert len({p.hash for p in by_profile.values()}) == 6
            assert len({p.random_asset for p in by_profile.values()}) == 6
            assert not any(p.asset_shared for p in by_profile.values())
            for first, second in (("pa", "pa2"), ("pb", "pb2"), ("pc", "pc2")):
                assert sorted([by_profile[first].nonce, by_profile[second].nonce])[1] >= 1
    finally:
        await other_client.aclose()
    snap = await claims.snapshot()
    for kind in snap.values():
        for holdings in kind.values():
            for i, x in enumerate(holdings):
                for y in holdings[i + 1 :]:
                    assert x.profile == y.profile or not (x.start_s < y.end_s and y.start_s < x.end_s)
    # the plan a profile would derive at nonce 0 is what the claims refer to
    c0 = derive_candidate("pa", a, 1_710_000_000 // 3600, 0, scores, reg, "USDC")
    assert any(h.profile in ("pa", "pa2") for h in snap["hash"][c0.hash])
