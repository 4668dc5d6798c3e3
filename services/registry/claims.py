"""Atomic uniqueness claims in Redis: hash, fingerprint and random asset of a profile's plan, per epoch.

Key layout (``ns`` is the namespace, e.g. the Kafka namespace ``mp``):

- ``{ns}:reg:h:{hash}``      sorted set: who holds profile hash H, over which event-time interval;
- ``{ns}:reg:fp:{fp}``       sorted set: who holds strategy fingerprint F;
- ``{ns}:reg:asset:{asset}`` sorted set: who holds the asset as its random asset;
- ``{ns}:reg:held:{profile}`` set: every claim key the profile has a member in (for ``release``);
- ``{ns}:reg:ready``         string: the generation of the live claim set (see below);
- ``{ns}:reg:plan:{profile}:{start_s}`` and ``{ns}:reg:rebuild``: decision records and the rebuild lock
  (``services/registry/ledger.py``).

A claim member is ``"{profile}|{start_s}|{end_s}"`` with score ``start_s`` (Unix seconds of event time, the
epoch's half-open interval ``[start_s, end_s)``). A claim conflicts with another profile's member whose
interval overlaps (``start2 < end_s and start_s < end2``); the profile's own members never conflict, so
re-claiming is idempotent. One Lua script checks the keys in the order hash, fingerprint, asset and answers
the first conflict with its holder, or writes all of them at once: two registry replicas racing for the same
key cannot both win (DESIGN.md section 5, invariant 1).

Housekeeping: a claim prunes, from each key it checks, members that ended more than ``grace_s`` before its
start (event time), and sets each key's expiry to at least ``(end_s - start_s + grace_s)`` seconds of wall
time (an existing longer expiry is kept).

Guard: with ``RedisClaims.generation`` set, the script first checks that ``{ns}:reg:ready`` holds that
generation and otherwise writes nothing and answers ``NOT_READY`` (the key is gone: Redis lost its state) or
``STALE`` (another replica rebuilt since), raised as ``ClaimsLostError``. So no claim is ever made on top of a
lost claim set: the registry rebuilds from the plans topic first (docs/registry.md section 12).

Every key of one claim must live on one Redis node: fine for a single Redis or Redis with replicas; for Redis
Cluster put the namespace in braces (``{mp}``) so that all registry keys share one hash slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

from services.registry.domain import (
    ClaimOutcome,
    ClaimResult,
    ClaimsLostError,
    Holding,
    KeyKind,
    PlanCandidate,
)

# ClaimsLostError, Holding and KeyKind are the registry's domain types (domain.py), named here too for the
# callers that know them from this module.
__all__ = ["CLAIM_LUA", "RELEASE_LUA", "ClaimsLostError", "Holding", "KeyKind", "RedisClaims"]

_KIND_PREFIX: Mapping[str, str] = {"hash": "h", "fp": "fp", "asset": "asset"}
_PREFIX_KIND: Mapping[str, KeyKind] = {"h": "hash", "fp": "fp", "asset": "asset"}


def generation_guard(argv: int) -> str:
    """The opening of every registry script that writes: with a generation in ARGV[argv] ('' = unguarded), it
    answers NOT_READY or STALE (and writes nothing) unless the namespace's ready key (KEYS[2]) still holds it.
    The claims and decisions are only trusted while the generation the caller rebuilt from is the live one: a
    missing ready key means Redis lost its state (flush, restart without persistence, eviction)."""
    return f"""
local gen = ARGV[{argv}]
if gen ~= '' then
  local g = redis.call('GET', KEYS[2])
  if not g then
    return {{'NOT_READY'}}
  end
  if g ~= gen then
    return {{'STALE', g}}
  end
end"""


# KEYS[1] = held set of the profile; KEYS[2] = the namespace's ready key (generation);
# KEYS[3..] = hash key, fingerprint key, [asset key] (checked in that order)
# ARGV = profile, start_s, end_s, grace_s, ttl_ms, generation ('' = unguarded)
CLAIM_LUA = (
    generation_guard(6)
    + """
local profile = ARGV[1]
local s = tonumber(ARGV[2])
local e = tonumber(ARGV[3])
local grace = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local member = profile .. '|' .. ARGV[2] .. '|' .. ARGV[3]
local taken = {'HASH_TAKEN', 'FP_TAKEN', 'ASSET_TAKEN'}
for i = 3, #KEYS do
  local members = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', '(' .. ARGV[3])
  for _, m in ipairs(members) do
    local p, ms, me = string.match(m, '^(.+)|(%-?%d+)|(%-?%d+)$')
    if p then
      local s2 = tonumber(ms)
      local e2 = tonumber(me)
      if e2 + grace < s then
        redis.call('ZREM', KEYS[i], m)
      elseif p ~= profile and s2 < e and s < e2 then
        return {taken[i - 2], p, ms, me}
      end
    end
  end
end
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], s, member)
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  redis.call('SADD', KEYS[1], KEYS[i])
end
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {'OK'}
"""
)

# KEYS[1] = a claim key, KEYS[2] = the profile's held set; ARGV = profile, start_s or '' (every interval)
# Removes the profile's members from the key; forgets the key in the held set when none of them remains.
RELEASE_LUA = """
local prefix = ARGV[1] .. '|'
local only = ARGV[2]
local removed = 0
local remaining = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(m, 1, #prefix) == prefix then
    local ms = string.match(string.sub(m, #prefix + 1), '^(%-?%d+)|')
    if only == '' or ms == only then
      redis.call('ZREM', KEYS[1], m)
      removed = removed + 1
    else
      remaining = remaining + 1
    end
  end
end
if remaining == 0 then
  redis.call('SREM', KEYS[2], KEYS[1])
end
return removed
"""


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes | bytearray) else str(v)


def _glob_escape(s: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in s)


class RedisClaims:
    """The registry's claims in Redis. ``grace_s`` is ``system.registry.claim_grace_s``.

    ``generation``: when set, every claim is guarded: it is refused (``ClaimsLostError``, nothing written)
    unless the namespace's ready key holds exactly this generation. The registry sets it once it has
    rebuilt (or checked) the claims from the plans topic; left None, claims are unguarded (tests, benchmark).
    """

    def __init__(
        self, redis: aioredis.Redis, namespace: str, *, grace_s: int = 300, generation: str | None = None
    ) -> None:
        if not namespace:
            raise ValueError("the claims namespace must not be empty")
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s!r}")
        self._redis = redis
        self.namespace = namespace
        self.grace_s = int(grace_s)
        self.generation = generation
        self._claim = redis.register_script(CLAIM_LUA)
        self._release = redis.register_script(RELEASE_LUA)

    # ------------------------------------------------------------------------------ key names
    def key(self, kind: KeyKind, value: str) -> str:
        """The claim key of a hash (``kind="hash"``), fingerprint (``"fp"``) or asset (``"asset"``)."""
        return f"{self.namespace}:reg:{_KIND_PREFIX[kind]}:{value}"

    def held_key(self, profile: str) -> str:
        return f"{self.namespace}:reg:held:{profile}"

    @property
    def ready_key(self) -> str:
        """Holds the generation of the live claim set; its absence means Redis lost the registry's state."""
        return f"{self.namespace}:reg:ready"

    # ------------------------------------------------------------------------------ claims
    async def claim(self, candidate: PlanCandidate, fingerprint: str, asset: str | None) -> ClaimResult:
        """Claim the candidate's hash, ``fingerprint`` and (unless None) ``asset`` for its epoch, atomically.

        Usable directly as the ``try_claim`` of ``resolve_plan_async``.
        """
        return await self.claim_interval(
            candidate.profile,
            candidate.epoch_start_s,
            candidate.epoch_end_s,
            hash_hex=candidate.hash,
            fingerprint=fingerprint,
            asset=asset,
        )

    async def claim_interval(
        self,
        profile: str,
        start_s: int,
        end_s: int,
        *,
        hash_hex: str,
        fingerprint: str,
        asset: str | None,
    ) -> ClaimResult:
        """Claim hash, fingerprint and optionally asset for ``profile`` over ``[start_s, end_s)``."""
        if not profile or "|" in profile:
            raise ValueError(f"a profile id must be non-empty and contain no '|', got {profile!r}")
        start, end = int(start_s), int(end_s)
        if end <= start:
            raise ValueError(f"claim interval [{start}, {end}) is empty")
        keys = [
            self.held_key(profile),
            self.ready_key,
            self.key("hash", hash_hex),
            self.key("fp", fingerprint),
        ]
        if asset is not None:
            keys.append(self.key("asset", asset))
        ttl_ms = (end - start + self.grace_s) * 1000
        guard = self.generation or ""
        raw = await self._claim(keys=keys, args=[profile, start, end, self.grace_s, ttl_ms, guard])
        reply = [_text(x) for x in raw]
        if reply[0] in ("NOT_READY", "STALE"):
            raise ClaimsLostError(reply[0], reply[1] if len(reply) > 1 else None)
        outcome = ClaimOutcome(reply[0])
        if outcome is ClaimOutcome.OK:
            return ClaimResult(outcome)
        return ClaimResult(outcome, holder=reply[1], holder_start_s=int(reply[2]), holder_end_s=int(reply[3]))

    async def release(self, profile: str, *, start_s: int | None = None) -> int:
        """Remove the profile's claim members from every key it holds (e.g. the profile was disabled), or only
        those of the interval starting at ``start_s`` (e.g. before re-resolving that epoch). Returns how many
        members were removed."""
        held = self.held_key(profile)
        only = "" if start_s is None else str(int(start_s))
        removed = 0
        for key in sorted(_text(k) for k in await self._redis.smembers(held)):
            removed += int(await self._release(keys=[key, held], args=[profile, only]))
        return removed

    async def unclaim(self, profile: str, start_s: int, end_s: int, keys: list[tuple[KeyKind, str]]) -> int:
        """Remove the profile's member for exactly ``[start_s, end_s)`` from the given keys only.

        Used by a replica that lost the decision for an epoch after claiming a different plan than the
        winner's (docs/registry.md section 11): it takes back the keys the winner's plan does not use, so they
        do not block other profiles. Keys of other intervals and of the winner's plan are left alone.
        """
        member = f"{profile}|{int(start_s)}|{int(end_s)}"
        removed = 0
        for kind, value in keys:
            removed += int(await self._redis.zrem(self.key(kind, value), member))
        return removed

    # ------------------------------------------------------------------------------ inspection
    async def holders(self, kind: KeyKind, value: str, *, at_s: int | None = None) -> list[Holding]:
        """Who holds a hash, fingerprint or asset (every interval, or only the ones containing ``at_s``)."""
        members = await self._redis.zrange(self.key(kind, value), 0, -1)
        out = sorted((Holding.parse(_text(m)) for m in members), key=Holding.sort_key)
        if at_s is not None:
            out = [h for h in out if h.start_s <= at_s < h.end_s]
        return out

    async def held_keys(self, profile: str) -> list[str]:
        return sorted(_text(k) for k in await self._redis.smembers(self.held_key(profile)))

    async def snapshot(self) -> dict[KeyKind, dict[str, list[Holding]]]:
        """Every claim in the namespace: ``{"hash": {H: [...]}, "fp": {F: [...]}, "asset": {A: [...]}}``."""
        out: dict[KeyKind, dict[str, list[Holding]]] = {"hash": {}, "fp": {}, "asset": {}}
        base = f"{self.namespace}:reg:"
        async for raw_key in self._redis.scan_iter(match=_glob_escape(base) + "*", count=500):
            key = _text(raw_key)
            prefix, _, value = key[len(base) :].partition(":")
            kind = _PREFIX_KIND.get(prefix)
            if kind is None:
                continue
            holdings = await self.holders(kind, value)
            if holdings:
                out[kind][value] = holdings
        return out
