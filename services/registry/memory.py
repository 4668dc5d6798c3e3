"""The registry's store in memory, for one process without Redis (`mpctl backtest`, tests): claims and decision
records with the semantics of the Redis script and ledger (services/registry/claims.py, ledger.py), behind the
same port as the Redis store (services/registry/ports.py `Backend`).

Pure and single-threaded: no I/O, nothing awaited inside a method, so every claim and decision is atomic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from services.registry.domain import (
    ClaimOutcome,
    ClaimResult,
    Decision,
    Held,
    KeyKind,
    PlanCandidate,
    TakeoverOutcome,
)
from services.registry.ports import Backend
from shared.messages import PlanPublished

__all__ = ["MemoryRegistry"]


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class MemoryRegistry:
    """What Redis holds for the registry, in memory: claims and decision records.

    Claims have the semantics of the Redis script (services/registry/claims.py): keys checked in the order
    hash, fingerprint, asset; a member of another profile whose event-time interval overlaps answers the first
    conflict with its holder; the profile's own members never conflict (re-entrant); members that ended more
    than `grace_s` before the claim's start are pruned; otherwise every key gets the member, atomically
    (one process, no await in between). One registry instance: every decision is won by the caller.
    """

    def __init__(self, grace_s: int) -> None:
        self.grace_s = grace_s
        self.holds: dict[tuple[KeyKind, str], dict[tuple[str, int, int], None]] = {}
        self.records: dict[tuple[str, int, int], Decision] = {}  # by (profile, epoch start, rotation)

    async def claim(self, candidate: PlanCandidate, fingerprint: str, asset: str | None) -> ClaimResult:
        return self.claim_interval(
            candidate.profile,
            candidate.epoch_start_s,
            candidate.epoch_end_s,
            candidate.hash,
            fingerprint,
            asset,
        )

    def claim_interval(
        self, profile: str, start: int, end: int, hash_hex: str, fingerprint: str, asset: str | None
    ) -> ClaimResult:
        keys: list[tuple[KeyKind, str]] = [("hash", hash_hex), ("fp", fingerprint)]
        if asset is not None:
            keys.append(("asset", asset))
        taken = (ClaimOutcome.HASH_TAKEN, ClaimOutcome.FP_TAKEN, ClaimOutcome.ASSET_TAKEN)
        for i, key in enumerate(keys):
            members = self.holds.get(key)
            if not members:
                continue
            # The script's order: ZRANGEBYSCORE, by start then by the member's text.
            for m in sorted(members, key=lambda m: (m[1], f"{m[0]}|{m[1]}|{m[2]}")):
                p, s2, e2 = m
                if s2 >= end:
                    continue  # the script reads members scored below the claim's end only
                if e2 + self.grace_s < start:
                    del members[m]
                elif p != profile and s2 < end and start < e2:
                    return ClaimResult(taken[i], holder=p, holder_start_s=s2, holder_end_s=e2)
        for key in keys:
            self.holds.setdefault(key, {})[(profile, start, end)] = None
        return ClaimResult(ClaimOutcome.OK)

    async def lookup(self, profile: str, start_s: int, rotation: int = 0) -> Decision | None:
        return self.records.get((profile, start_s, rotation))

    async def decide(self, plan: PlanPublished, *, asset_claimed: bool | None) -> Decision:
        key = (plan.profile, int(plan.epoch_start.timestamp()), plan.rotation)
        rec = self.records.get(key)
        if rec is not None:
            return dataclasses.replace(rec, won=False)
        rec = Decision(plan=plan, owner="0", published=True, asset_claimed=asset_claimed)
        self.records[key] = rec
        return dataclasses.replace(rec, won=True)

    async def unclaim(self, profile: str, start_s: int, end_s: int, keys: list[tuple[KeyKind, str]]) -> int:
        removed = 0
        member = (profile, start_s, end_s)
        for key in keys:
            members = self.holds.get(key, {})
            if member in members:
                del members[member]
                removed += 1
        return removed

    async def recover(self, known: Sequence[Held]) -> str:
        return "memory"  # nothing is ever lost in memory

    async def takeover(
        self, profile: str, start_s: int, rotation: int = 0
    ) -> tuple[TakeoverOutcome, PlanPublished | None]:
        # One process publishes every plan it decides: nothing is ever left to take over.
        return ("PUBLISHED" if (profile, start_s, rotation) in self.records else "GONE"), None


# mypy checks the port here, not only where a caller passes the class in.
_PORT: type[Backend] = MemoryRegistry
