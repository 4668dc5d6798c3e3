"""Benchmark: claims per second the registry's claim path sustains, against Redis `SET NX` in the same run.

    .venv/bin/python scripts/bench_registry.py [--redis-url URL] [--n 20000] [--concurrency 1,16]
                                               [--profiles 8] [--epochs 250]

For each concurrency c (c asyncio workers sharing ONE client and its connection pool), on the same Redis:

- ``setnx``: N `SET key 1 NX` on distinct keys: the raw rate of the primitive a claim replaces;
- ``claim``: N `RedisClaims.claim` (the Lua script: guard, overlap check of hash, fingerprint and asset keys,
  then ZADD/PEXPIRE/SADD) on distinct hashes, fingerprints and assets;
- ``resolve``: `resolve_plan_async` for P profiles x M epochs (the workers take epochs; inside an epoch the
  profiles are resolved in priority order, as the registry does), every quarter of the profiles sharing hash
  settings so that collisions and taken assets happen; counted as plans/s and claim calls/s;
- ``registry_path``: the same plus the registry's decision record per plan (lookup before, decide after).

Ratios are claim rates over the SET NX rate at the same concurrency. Prints one JSON document; the keys it
writes (a fresh namespace) are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpctl.infra import redis_admin_credentials  # noqa: E402
from services.registry.claims import RedisClaims  # noqa: E402
from services.registry.domain import (  # noqa: E402
    ClaimResult,
    PlanCandidate,
    epoch_bounds,
    resolve_plan_async,
)
from services.registry.handlers import plan_message  # noqa: E402
from services.registry.ledger import PlanLedger  # noqa: E402
from shared.config import Profile, RegistrySettings, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_710_000_000 // 3600 * 3600


async def workers(n_items: int, concurrency: int, job: Callable[[int], Awaitable[int]]) -> tuple[float, int]:
    """Run job(i) for i in 0..n_items-1 with `concurrency` workers; returns (seconds, sum of job results)."""
    counter = itertools.count()
    total = 0

    async def worker() -> None:
        nonlocal total
        while (i := next(counter)) < n_items:
            done = await job(i)  # awaited first: `total += await ...` would lose concurrent updates
            total += done

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t, total


def bench_profiles(n: int) -> dict[str, Profile]:
    base = load_config(ROOT / "config" / "coinbase_profiles.yaml").profiles["profile_a"]
    out: dict[str, Profile] = {}
    for i in range(n):
        # Every group of four shares hash settings: the registry must bump nonces, as with real users' files.
        ph = base.profile_hash.model_copy(update={"base_hash": f"bench_group_{i // 4}"})
        out[f"p{i:03d}"] = base.model_copy(update={"profile_hash": ph, "priority": i})
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    # The bus's own Redis takes its admin only (it measures the registry's commands on its own prefix).
    creds = redis_admin_credentials(args.redis_url)
    redis = aioredis.Redis.from_url(args.redis_url, max_connections=max(args.concurrency) + 4, **creds)
    ns = f"bench{uuid.uuid4().hex[:8]}"
    info = await redis.info("server")
    out: dict[str, Any] = {
        "redis_version": info.get("redis_version"),
        "redis_url_host": args.redis_url.split("@")[-1],  # never the password part of a URL
        "python": platform.python_version(),
        "n": args.n,
        "profiles": args.profiles,
        "epochs": args.epochs,
        "results": {},
    }
    reg = RegistrySettings()
    profiles = bench_profiles(args.profiles)
    pool = sorted({a for p in profiles.values() for a in p.strategy_config.random_asset_pool})
    scores: dict[str, float | None] = {a: 1.0 + i / 10 for i, a in enumerate(pool)}
    try:
        for c in args.concurrency:
            run_ns = f"{ns}:c{c}"

            async def setnx(i: int, run_ns: str = run_ns) -> int:
                await redis.set(f"{run_ns}:setnx:{i}", b"1", nx=True)
                return 1

            start, end = epoch_bounds(T0 // 3600, 3600)
            candidates = [
                PlanCandidate(
                    profile=f"q{i % 64}",
                    epoch=T0 // 3600,
                    epoch_start_s=start,
                    epoch_end_s=end,
                    hash=hashlib.sha256(f"h{i}".encode()).hexdigest(),
                    nonce=0,
                    strategy="multi_phase_strategy_weight_tensor",
                    parameters={},
                    blend_weight=0.8,
                    base_assets=("BTC",),
                    asset_candidates=(f"A{i}",),
                )
                for i in range(args.n)
            ]
            fps = [hashlib.sha256(f"f{i}".encode()).hexdigest() for i in range(args.n)]

            def claimer(
                cl: RedisClaims, cands: list[PlanCandidate] = candidates, fps: list[str] = fps
            ) -> Callable[[int], Awaitable[int]]:
                async def claim(k: int) -> int:
                    res = await cl.claim(cands[k], fps[k], f"A{k}")
                    assert res.ok, res
                    return 1

                return claim

            # The raw primitive and the claim alternate three times; the better of each is kept (warm caches, no
            # one-off pause on either side).
            setnx_s = claim_s = float("inf")
            for rep in range(3):
                s, _ = await workers(args.n, c, setnx)
                setnx_s = min(setnx_s, s)
                await redis.delete(*[f"{run_ns}:setnx:{i}" for i in range(args.n)])
                s, _ = await workers(
                    args.n, c, claimer(RedisClaims(redis, f"{run_ns}:r{rep}", grace_s=reg.claim_grace_s))
                )
                claim_s = min(claim_s, s)

            def resolver(prefix: str, with_ledger: bool) -> Callable[[int], Awaitable[int]]:
                # One namespace per epoch: concurrent workers then never prune each other's members (the
                # registry walks epochs in order; workers out of order would make the claims cheaper).
                def job(e: int) -> Awaitable[int]:
                    cl = RedisClaims(redis, f"{prefix}:e{e}", grace_s=reg.claim_grace_s)
                    ledger = (
                        PlanLedger(redis, f"{prefix}:e{e}", grace_s=reg.claim_grace_s)
                        if with_ledger
                        else None
                    )
                    return resolve_epoch(e, cl, ledger)

                return job

            async def resolve_epoch(e: int, cl: RedisClaims, ledger: PlanLedger | None) -> int:
                epoch = T0 // 3600 + e
                calls = 0

                async def counted(cand: PlanCandidate, fp: str, asset: str | None) -> ClaimResult:
                    nonlocal calls
                    calls += 1
                    return await cl.claim(cand, fp, asset)

                for pid, prof in profiles.items():
                    s0, _ = epoch_bounds(epoch, prof.profile_hash.hash_rotation_interval)
                    if ledger is not None and await ledger.lookup(pid, s0) is not None:
                        continue
                    plan = await resolve_plan_async(pid, prof, epoch, scores, reg, "USDC", counted)
                    if ledger is not None:
                        await ledger.decide(
                            plan_message(plan, correlation="bench"),
                            "bench",
                            asset_claimed=True,
                            generation=None,
                        )
                return calls

            resolve_s, resolve_calls = await workers(args.epochs, c, resolver(f"{run_ns}:resolve", False))
            path_s, path_calls = await workers(args.epochs, c, resolver(f"{run_ns}:path", True))
            plans = args.profiles * args.epochs
            setnx_rate = args.n / setnx_s
            out["results"][str(c)] = {
                "setnx_per_s": round(setnx_rate),
                "claim_per_s": round(args.n / claim_s),
                "claim_vs_setnx": round(args.n / claim_s / setnx_rate, 3),
                "resolve_plans_per_s": round(plans / resolve_s),
                "resolve_claims_per_s": round(resolve_calls / resolve_s),
                "resolve_claims_per_plan": round(resolve_calls / plans, 2),
                "resolve_claims_vs_setnx": round(resolve_calls / resolve_s / setnx_rate, 3),
                "registry_path_plans_per_s": round(plans / path_s),
                "registry_path_claims_per_s": round(path_calls / path_s),
            }
            await _delete(redis, f"{run_ns}:*")
    finally:
        await _delete(redis, f"{ns}:*")
        await redis.aclose()
    return out


async def _delete(redis: aioredis.Redis, pattern: str) -> None:
    batch: list[Any] = []
    async for k in redis.scan_iter(match=pattern, count=2000):
        batch.append(k)
        if len(batch) >= 2000:
            await redis.delete(*batch)
            batch = []
    if batch:
        await redis.delete(*batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:16379/0"))
    p.add_argument("--n", type=int, default=20_000, help="SET NX calls and claims per measurement")
    p.add_argument("--concurrency", default="1,16", help="comma-separated worker counts, one client")
    p.add_argument("--profiles", type=int, default=8)
    p.add_argument("--epochs", type=int, default=250)
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    print(json.dumps(asyncio.run(run(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
