"""Decision records in Redis: exactly one plan per (profile, epoch), whichever registry replica derives it first.

Claims (claims.py) keep plans of *different* profiles apart. They cannot, alone, stop two replicas from
publishing two *different* plans for the same profile and epoch: a replica that lags far enough behind sees
claims pruned or added since, may take another path through the resolution and end with another plan. So the
first replica to finish resolving (profile, epoch) records the plan here, atomically, and every other replica
adopts the recorded plan instead of its own (docs/registry.md section 11).

Keys (``ns`` is the namespace):

- ``{ns}:reg:plan:{profile}:{start_s}`` hash (``...:{start_s}:r{k}`` for the k-th early rotation, which may
  start at the same second as the epoch's scheduled plan): ``plan`` (the PlanPublished JSON), ``id``, ``owner`` (the
  instance that decided it, the only one that publishes it), ``state`` (``decided``, then ``published`` once
  Kafka acknowledged it), ``at`` (wall ms of the decision or of the last takeover), ``asset_claimed``
  (``1``/``0``: whether the random asset was claimed or is shared; empty when unknown);
- ``{ns}:reg:ready`` string: the generation of the live claim set (the claim guard, see claims.py);
- ``{ns}:reg:rebuild`` string: the rebuild lock (a token with a wall-time expiry);
- ``{ns}:reg:server-run`` string: the run id of the Redis server the claim set was built on (a restart from a
  snapshot or AOF changes it: ``fence``).

A decided record whose owner has not marked it published within the lease can be taken over by another
replica, which then publishes it (same message id): a replica dying between its decision and Kafka's
acknowledgement loses no plan.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from services.registry.claims import generation_guard
from services.registry.domain import ClaimsLostError, Decision, TakeoverOutcome
from shared.codec import DecodeError, decode, encode
from shared.messages import PlanPublished

# Decision and TakeoverOutcome are domain types (domain.py), named here too for the callers that know them here.
__all__ = ["DECIDE_LUA", "MIN_DECISION_TTL_S", "READY_TTL_S", "Decision", "PlanLedger", "TakeoverOutcome"]

# Decisions outlive their epoch by hours (claims only by the grace): a replica that lags behind must still
# find the decision of an old epoch rather than derive the epoch again.
MIN_DECISION_TTL_S = 6 * 3600
# The ready key lives as long as the topics' retention unless a running registry refreshes it: a namespace
# nobody runs any more leaves nothing behind, and a missing key only ever costs a rebuild.
READY_TTL_S = 7 * 24 * 3600

# KEYS[1] = decision key, KEYS[2] = ready key
# ARGV = plan json, plan id, owner, now_ms, ttl_ms, asset_claimed ('1'/'0'/''), generation ('' = unguarded), state
DECIDE_LUA = (
    generation_guard(7)
    + """
local cur = redis.call('HMGET', KEYS[1], 'plan', 'owner', 'state', 'asset_claimed')
if cur[1] then
  return {'EXISTS', cur[1], cur[2] or '', cur[3] or '', cur[4] or ''}
end
redis.call('HSET', KEYS[1], 'plan', ARGV[1], 'id', ARGV[2], 'owner', ARGV[3], 'state', ARGV[8],
  'at', ARGV[4], 'asset_claimed', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {'OK'}
"""
)

# KEYS[1] = decision key; ARGV = plan id. Marks the record published only if it still records that plan.
MARK_LUA = """
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', 'published')
  return 1
end
return 0
"""

# KEYS[1] = decision key; ARGV = new owner, now_ms, lease_ms
TAKEOVER_LUA = """
local r = redis.call('HMGET', KEYS[1], 'plan', 'owner', 'state', 'at')
if not r[1] then
  return {'GONE'}
end
if r[3] == 'published' then
  return {'PUBLISHED'}
end
if r[2] ~= ARGV[1] and tonumber(r[4]) + tonumber(ARGV[3]) > tonumber(ARGV[2]) then
  return {'WAIT'}
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'at', ARGV[2])
return {'OK', r[1]}
"""

# KEYS[1] = server-run key, KEYS[2] = ready key; ARGV = the server's run_id (INFO server).
# A Redis restarted from a snapshot or an AOF brings back the ready key but may have lost the latest claims:
# the first registry to see a new run_id deletes the ready key, so the next claim triggers a rebuild.
FENCE_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if cur then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""

# KEYS[1] = lock key; ARGV = token. Deletes the lock only if this token still holds it.
UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes | bytearray) else str(v)


def _flag(v: str) -> bool | None:
    return {"1": True, "0": False}.get(v)


def _plan(raw: Any) -> PlanPublished:
    try:
        msg = decode(raw if isinstance(raw, bytes) else _text(raw).encode())
    except DecodeError as err:
        raise RuntimeError(f"registry decision record holds an undecodable plan: {err}") from None
    if not isinstance(msg, PlanPublished):
        raise RuntimeError(f"registry decision record holds a {type(msg).__name__}, not a PlanPublished")
    return msg


class PlanLedger:
    """Decision records, the ready key (generation) and the rebuild lock of one namespace."""

    def __init__(
        self,
        redis: aioredis.Redis,
        namespace: str,
        *,
        grace_s: int = 300,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        if not namespace:
            raise ValueError("the ledger namespace must not be empty")
        self._redis = redis
        self.namespace = namespace
        self.grace_s = int(grace_s)
        self._now_ms = now_ms
        self._decide = redis.register_script(DECIDE_LUA)
        self._mark = redis.register_script(MARK_LUA)
        self._takeover = redis.register_script(TAKEOVER_LUA)
        self._unlock = redis.register_script(UNLOCK_LUA)
        self._fence = redis.register_script(FENCE_LUA)

    # ------------------------------------------------------------------------------ keys
    def key(self, profile: str, start_s: int, rotation: int = 0) -> str:
        base = f"{self.namespace}:reg:plan:{profile}:{int(start_s)}"
        return f"{base}:r{int(rotation)}" if rotation else base

    @property
    def ready_key(self) -> str:
        return f"{self.namespace}:reg:ready"

    @property
    def lock_key(self) -> str:
        return f"{self.namespace}:reg:rebuild"

    @property
    def run_key(self) -> str:
        return f"{self.namespace}:reg:server-run"

    # ------------------------------------------------------------------------------ decisions
    async def lookup(self, profile: str, start_s: int, rotation: int = 0) -> Decision | None:
        raw = await self._redis.hmget(
            self.key(profile, start_s, rotation), ["plan", "owner", "state", "asset_claimed"]
        )
        if raw[0] is None:
            return None
        return Decision(
            plan=_plan(raw[0]),
            owner=_text(raw[1] or b""),
            published=_text(raw[2] or b"") == "published",
            asset_claimed=_flag(_text(raw[3] or b"")),
        )

    async def decide(
        self,
        plan: PlanPublished,
        owner: str,
        *,
        asset_claimed: bool | None,
        generation: str | None,
        published: bool = False,
    ) -> Decision:
        """Record ``plan`` for its (profile, epoch) unless a plan is recorded already; returns the recorded one
        (``won=True`` when it is this call's). Guarded like a claim: ``ClaimsLostError`` when Redis lost the
        state or another replica rebuilt it since ``generation``."""
        start_s = int(plan.epoch_start.timestamp())
        ttl_s = max(int(plan.epoch_end.timestamp()) - start_s + self.grace_s, MIN_DECISION_TTL_S)
        flag = "" if asset_claimed is None else ("1" if asset_claimed else "0")
        raw = await self._decide(
            keys=[self.key(plan.profile, start_s, plan.rotation), self.ready_key],
            args=[
                encode(plan),
                plan.id,
                owner,
                self._now_ms(),
                ttl_s * 1000,
                flag,
                generation or "",
                "published" if published else "decided",
            ],
        )
        head = _text(raw[0])
        if head in ("NOT_READY", "STALE"):
            raise ClaimsLostError(head, _text(raw[1]) if len(raw) > 1 else None)
        if head == "OK":
            return Decision(
                plan=plan, owner=owner, published=published, asset_claimed=asset_claimed, won=True
            )
        return Decision(
            plan=_plan(raw[1]),
            owner=_text(raw[2]),
            published=_text(raw[3]) == "published",
            asset_claimed=_flag(_text(raw[4])),
        )

    async def mark_published(self, profile: str, start_s: int, plan_id: str, rotation: int = 0) -> bool:
        return bool(await self._mark(keys=[self.key(profile, start_s, rotation)], args=[plan_id]))

    async def takeover(
        self, profile: str, start_s: int, owner: str, lease_s: float, rotation: int = 0
    ) -> tuple[TakeoverOutcome, PlanPublished | None]:
        """Become the publisher of a decided plan whose owner did not publish it within ``lease_s``."""
        raw = await self._takeover(
            keys=[self.key(profile, start_s, rotation)], args=[owner, self._now_ms(), int(lease_s * 1000)]
        )
        head = _text(raw[0])
        if head == "OK":
            return "OK", _plan(raw[1])
        if head in ("PUBLISHED", "GONE", "WAIT"):
            return head, None  # type: ignore[return-value]
        raise RuntimeError(f"unexpected takeover reply {head!r}")

    # ------------------------------------------------------------------------------ generation and lock
    async def generation(self) -> str | None:
        raw = await self._redis.get(self.ready_key)
        return None if raw is None else _text(raw)

    async def set_generation(self) -> str:
        """Declare the claim set rebuilt: a new generation, which every replica adopts before claiming."""
        gen = uuid.uuid4().hex
        await self._redis.set(self.ready_key, gen, ex=READY_TTL_S)
        return gen

    async def touch_generation(self) -> bool:
        """Keep the ready key alive while a registry runs (False when it is gone: the next claim recovers)."""
        await self._redis.expire(self.run_key, READY_TTL_S)
        return bool(await self._redis.expire(self.ready_key, READY_TTL_S))

    async def server_run_id(self) -> str:
        info = await self._redis.info("server")
        return str(info.get("run_id", ""))

    async def fence(self, run_id: str) -> bool:
        """Record the Redis server's run id; True when it changed since the last record (Redis restarted with
        older state), in which case the ready key was deleted and the claim set will be rebuilt."""
        return bool(await self._fence(keys=[self.run_key, self.ready_key], args=[run_id, READY_TTL_S]))

    async def acquire_rebuild(self, lease_s: float) -> str | None:
        token = uuid.uuid4().hex
        ok = await self._redis.set(self.lock_key, token, nx=True, px=max(1, int(lease_s * 1000)))
        return token if ok else None

    async def release_rebuild(self, token: str) -> None:
        await self._unlock(keys=[self.lock_key], args=[token])
