"""The registry's store port (services/registry/ports.py) holds the same way in both stores: the same cases run
against the in-memory store of the backtest (memory.py) and the Redis one (recovery.py over claims.py and
ledger.py) on the Redis the test harness gives."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.registry.claims import RedisClaims
from services.registry.domain import ClaimOutcome, ClaimResult, Held, KeyKind, PlanCandidate
from services.registry.ledger import PlanLedger
from services.registry.memory import MemoryRegistry
from services.registry.metrics import RegistryMetrics
from services.registry.ports import Backend
from services.registry.recovery import RegistryBackend
from shared.clock import derived_id, from_epoch_s
from shared.messages import PlanPublished

HOUR = 3600
T = 1_710_028_800
GRACE_S = 300
OK = ClaimOutcome.OK


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield MemoryRegistry(GRACE_S)
        return
    # Only the Redis case asks for the harness's infrastructure.
    client = aioredis.Redis.from_url(
        request.getfixturevalue("redis_url"), **request.getfixturevalue("redis_admin")
    )
    metrics = RegistryMetrics("r1")

    async def no_plans() -> list[PlanPublished]:
        return []

    try:
        yield RegistryBackend(
            RedisClaims(client, namespace, grace_s=GRACE_S),
            PlanLedger(client, namespace, grace_s=GRACE_S),
            instance="r1",
            read_topic=no_plans,
            priorities={},
            metrics=metrics,
        )
    finally:
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*")]
        if keys:
            await client.delete(*keys)
        metrics.close()
        await client.aclose()


async def claim_as(
    store: Backend, profile: str, start: int, end: int, h: str, fp: str, asset: str | None
) -> ClaimResult:
    """Claim hash ``h``, fingerprint ``fp`` and ``asset`` for ``profile`` over ``[start, end)``."""
    c = PlanCandidate(
        profile=profile,
        epoch=start // HOUR,
        epoch_start_s=start,
        epoch_end_s=end,
        hash=h,
        nonce=0,
        strategy="s",
        parameters={},
        blend_weight=1.0,
        base_assets=("BTC",),
        asset_candidates=(),
    )
    return await store.claim(c, fp, asset)


def plan(
    profile: str, start: int, *, h: str = "a", fp: str = "1", asset: str | None = "ADA"
) -> PlanPublished:
    return PlanPublished(
        id=derived_id("plan", profile, start, fp),
        event_time=from_epoch_s(start),
        correlation_id="test",
        profile=profile,
        epoch=start // HOUR,
        epoch_start=from_epoch_s(start),
        epoch_end=from_epoch_s(start + HOUR),
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


async def test_claims_answer_the_first_conflict_in_key_order(store: Backend) -> None:
    assert (await claim_as(store, "a", T, T + HOUR, "h1", "f1", "ADA")).outcome is OK
    assert (
        await claim_as(store, "a", T, T + HOUR, "h1", "f1", "ADA")
    ).outcome is OK  # own members: re-entrant
    r = await claim_as(store, "b", T + 1800, T + 5400, "h1", "f2", "DOT")  # overlapping: hash checked first
    assert (r.outcome, r.holder, r.holder_start_s, r.holder_end_s) == (
        ClaimOutcome.HASH_TAKEN,
        "a",
        T,
        T + HOUR,
    )
    r = await claim_as(store, "b", T + 1800, T + 5400, "h2", "f1", "ADA")  # fingerprint before asset
    assert (r.outcome, r.holder) == (ClaimOutcome.FP_TAKEN, "a")
    assert (
        await claim_as(store, "b", T + 1800, T + 5400, "h2", "f2", "ADA")
    ).outcome is ClaimOutcome.ASSET_TAKEN
    # A refused claim wrote nothing: h2 and f2 are still free for another profile.
    assert (await claim_as(store, "c", T + 1800, T + 5400, "h2", "f2", None)).outcome is OK
    # Half-open intervals: touching is no overlap.
    assert (await claim_as(store, "d", T + HOUR, T + 2 * HOUR, "h1", "f1", "ADA")).outcome is OK


async def test_claims_prune_members_ended_more_than_the_grace_before(store: Backend) -> None:
    assert (await claim_as(store, "a", T, T + HOUR, "h1", "f1", None)).outcome is OK
    # Within the grace, a's member stays; a claim starting later than that prunes it from the keys it checks.
    later = T + HOUR + GRACE_S + 1
    assert (await claim_as(store, "d", later, later + HOUR, "h1", "f9", None)).outcome is OK
    # Gone from h1 (pruned), still in f1 (not checked by d's claim).
    assert (await claim_as(store, "b", T, T + HOUR, "h1", "f2", None)).outcome is OK
    r = await claim_as(store, "c", T, T + HOUR, "h3", "f1", None)
    assert (r.outcome, r.holder) == (ClaimOutcome.FP_TAKEN, "a")


async def test_the_first_decision_wins_and_is_what_lookup_answers(store: Backend) -> None:
    a, b = plan("pa", T, fp="1"), plan("pa", T, fp="2")
    assert await store.lookup("pa", T) is None
    first = await store.decide(a, asset_claimed=True)
    assert (first.plan, first.won, first.asset_claimed) == (a, True, True)
    second = await store.decide(b, asset_claimed=False)
    assert (second.plan, second.won, second.asset_claimed, second.owner) == (a, False, True, first.owner)
    rec = await store.lookup("pa", T)
    assert rec is not None and (rec.plan, rec.won, rec.owner) == (a, False, first.owner)
    assert await store.lookup("pa", T + HOUR) is None  # another epoch
    assert await store.lookup("pa", T, 1) is None  # an early rotation of the same epoch
    assert await store.lookup("pb", T) is None  # another profile


async def test_unclaim_gives_back_only_the_keys_named_for_that_interval(store: Backend) -> None:
    assert (await claim_as(store, "a", T, T + HOUR, "h1", "f1", "ADA")).outcome is OK
    assert (await claim_as(store, "a", T + HOUR, T + 2 * HOUR, "h1", "f1", "ADA")).outcome is OK
    keys: list[tuple[KeyKind, str]] = [("fp", "f1"), ("asset", "ADA")]
    assert await store.unclaim("a", T, T + HOUR, keys) == 2
    assert await store.unclaim("a", T, T + HOUR, keys) == 0  # nothing left to give back
    assert (await claim_as(store, "b", T, T + HOUR, "h2", "f1", "ADA")).outcome is OK
    r = await claim_as(store, "c", T, T + HOUR, "h1", "f3", None)  # not named: still a's
    assert (r.outcome, r.holder) == (ClaimOutcome.HASH_TAKEN, "a")
    r = await claim_as(store, "c", T + HOUR, T + 2 * HOUR, "h3", "f1", None)  # another interval: still a's
    assert (r.outcome, r.holder, r.holder_start_s) == (ClaimOutcome.FP_TAKEN, "a", T + HOUR)


async def test_recovery_keeps_the_known_plans_claimed(store: Backend) -> None:
    p = plan("pa", T, h="a", fp="1", asset="ADA")
    assert (await claim_as(store, "pa", T, T + HOUR, p.hash, p.fingerprint, "ADA")).outcome is OK
    assert isinstance(await store.recover([Held(p, "r1", True)]), str)
    r = await claim_as(store, "pb", T, T + HOUR, p.hash, "2" * 64, None)
    assert (r.outcome, r.holder) == (ClaimOutcome.HASH_TAKEN, "pa")
    assert (await claim_as(store, "pa", T, T + HOUR, p.hash, p.fingerprint, "ADA")).outcome is OK


async def test_takeover_of_an_unknown_decision_is_gone(store: Backend) -> None:
    assert await store.takeover("pz", T) == ("GONE", None)
