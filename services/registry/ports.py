"""The registry's store port: what the handler (handlers.py) needs from the place claims and decisions are kept.

Two implementations: Redis (recovery.py `RegistryBackend`, over claims.py and ledger.py), shared by every
replica, and memory (memory.py `MemoryRegistry`), for one process without Redis (`mpctl backtest`). The same
behavioural cases run against both (tests/integration/test_registry_backends.py); the Redis script's own
rules are in claims.py, the decision records' in ledger.py.

Times are Unix seconds of event time; an interval is half-open, ``[start_s, end_s)``. Every method is atomic
with respect to the others (a Lua script in Redis; no await inside a method in memory). A method may raise
``ClaimsLostError`` (domain.py) where it says so, and only then.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from services.registry.domain import ClaimResult, Decision, Held, KeyKind, PlanCandidate, TakeoverOutcome
from shared.messages import PlanPublished

__all__ = ["Backend"]


class Backend(Protocol):
    """Claims (which profile holds which hash, fingerprint and random asset over which interval) and decision
    records (the one plan of each (profile, epoch))."""

    async def claim(self, candidate: PlanCandidate, fingerprint: str, asset: str | None) -> ClaimResult:
        """Claim the candidate's hash, ``fingerprint`` and (unless None) ``asset`` over its epoch, all or none.

        The keys are checked in the order hash, fingerprint, asset; the first one held by *another* profile over
        an overlapping interval answers ``HASH_TAKEN``, ``FP_TAKEN`` or ``ASSET_TAKEN`` with that holder and its
        interval, and nothing is written. The profile's own members never conflict (claiming again is
        idempotent), and intervals that only touch do not overlap. Members that ended more than the store's
        grace (``system.registry.claim_grace_s``) before the claim's start are pruned from the keys it checks.
        ``ClaimsLostError``: Redis lost the claim set this process built on; nothing was written.
        """
        ...

    async def lookup(self, profile: str, start_s: int, rotation: int = 0) -> Decision | None:
        """The recorded decision of (profile, epoch starting at ``start_s``, rotation), or None if none is."""
        ...

    async def decide(self, plan: PlanPublished, *, asset_claimed: bool | None) -> Decision:
        """Record ``plan`` as the plan of its (profile, epoch, rotation) unless one is recorded already.

        Returns the recorded decision: this plan with ``won=True`` if this call created the record, else the
        earlier one, unchanged, with ``won=False``. Exactly one call wins per (profile, epoch, rotation), in
        every replica. ``ClaimsLostError`` as for ``claim``.
        """
        ...

    async def unclaim(self, profile: str, start_s: int, end_s: int, keys: list[tuple[KeyKind, str]]) -> int:
        """Remove the profile's member for exactly ``[start_s, end_s)`` from the given keys only; returns how
        many were removed. Other intervals, other keys and other profiles' members are left alone."""
        ...

    async def recover(self, known: Sequence[Held]) -> str:
        """Make the claims trustworthy again after ``ClaimsLostError`` (``known``: this process's current
        plans, claimed again); returns what was done (a word for logs and metrics)."""
        ...

    async def takeover(
        self, profile: str, start_s: int, rotation: int = 0
    ) -> tuple[TakeoverOutcome, PlanPublished | None]:
        """Become the publisher of a decided plan whose owner has not published it within the store's lease.

        ``("OK", plan)``: the caller publishes ``plan`` now; ``PUBLISHED``: it is out, nothing to do; ``GONE``:
        no such record; ``WAIT``: the owner's lease runs, ask again later.
        """
        ...
