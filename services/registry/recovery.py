"""Reading the plans topic back, and the Redis side of the registry: claims, decisions, recoveries.

The plans topic is the registry's source of truth: Redis holds derived state (claims and decision records)
that can always be rebuilt from it. ``RegistryBackend.recover`` does that whenever a guarded claim finds the
ready key gone (Redis flushed, restarted without persistence, keys evicted) or replaced (another replica
rebuilt), and at every start, before anything new is claimed (docs/registry.md section 12).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.registry.claims import RedisClaims
from services.registry.domain import (
    ClaimOutcome,
    ClaimResult,
    ClaimsLostError,
    Decision,
    Held,
    KeyKind,
    PlanCandidate,
    TakeoverOutcome,
)
from services.registry.ledger import PlanLedger
from services.registry.metrics import RegistryMetrics
from services.registry.ports import Backend
from shared.admit import Admitted, admit
from shared.bus import KafkaAccess
from shared.clock import system_clock
from shared.messages import PlanPublished

log = logging.getLogger("registry.recovery")

__all__ = ["RegistryBackend", "latest_per_profile", "read_plans", "topic_partitions", "unique_plans"]


async def topic_partitions(
    bootstrap: KafkaAccess, topic: str, *, wait_s: float = 0.0
) -> list[TopicPartition] | None:
    """The topic's partitions, asked of the cluster (not of a client's cached metadata); None when the topic
    does not exist after ``wait_s`` seconds."""
    admin = AIOKafkaAdminClient(**bootstrap.client_options(), request_timeout_ms=15_000)
    await admin.start()
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if topic in await admin.list_topics():
                for d in await admin.describe_topics([topic]):
                    if d["topic"] == topic and d["partitions"]:
                        ids = sorted(int(p["partition"]) for p in d["partitions"])
                        return [TopicPartition(topic, i) for i in ids]
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def read_plans(
    bootstrap: KafkaAccess, topic: str, *, wait_s: float = 0.0
) -> list[PlanPublished] | None:
    """Every PlanPublished on ``topic`` up to its end at the time of the call, in topic order (None when the
    topic does not exist after ``wait_s`` seconds). Other message types and undecodable records are skipped."""
    tps = await topic_partitions(bootstrap, topic, wait_s=wait_s)
    if tps is None:
        return None
    consumer = AIOKafkaConsumer(
        **bootstrap.client_options(), enable_auto_commit=False, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await seek_to_start(consumer, tps)
        out: list[PlanPublished] = []
        remaining = {tp for tp in tps}
        while remaining:
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
            if not remaining:
                break
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, recs in batch.items():
                for rec in recs:
                    if rec.offset >= ends[tp]:
                        continue
                    # A plan dated far in the future is forged or corrupt: trusting it would skip every epoch.
                    admitted = admit(rec, now=system_clock())
                    if isinstance(admitted, Admitted) and isinstance(admitted.msg, PlanPublished):
                        out.append(admitted.msg)
        return out
    finally:
        await consumer.stop()


async def seek_to_start(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
    # Explicit offsets: seek_to_beginning() is lazy and lost to the "latest" reset of a fresh assignment.
    begins = await consumer.beginning_offsets(tps)
    for tp in tps:
        consumer.seek(tp, begins[tp])


def unique_plans(plans: Iterable[PlanPublished]) -> list[PlanPublished]:
    """One plan per (profile, epoch, rotation): the first seen (the topic keeps them in publication order)."""
    seen: dict[tuple[str, int, int], PlanPublished] = {}
    for p in plans:
        seen.setdefault((p.profile, p.epoch, p.rotation), p)
    return list(seen.values())


def latest_per_profile(plans: Iterable[PlanPublished]) -> dict[str, PlanPublished]:
    out: dict[str, PlanPublished] = {}
    for p in plans:
        cur = out.get(p.profile)
        if cur is None or (p.epoch_start, p.rotation) > (cur.epoch_start, cur.rotation):
            out[p.profile] = p
    return out


class RegistryBackend:
    """The store port (ports.Backend) in Redis, with recoveries from the plans topic."""

    def __init__(
        self,
        claims: RedisClaims,
        ledger: PlanLedger,
        *,
        instance: str,
        read_topic: Callable[[], Awaitable[list[PlanPublished]]],
        priorities: Mapping[str, int],
        metrics: RegistryMetrics,
        lease_s: float = 10.0,
        lock_lease_s: float = 120.0,
        max_wait_s: float = 300.0,
    ) -> None:
        self.claims = claims
        self.ledger = ledger
        self.instance = instance
        self._read_topic = read_topic
        self._priorities = priorities
        self._metrics = metrics
        self.lease_s = lease_s
        self.lock_lease_s = lock_lease_s
        self.max_wait_s = max_wait_s

    @property
    def generation(self) -> str | None:
        return self.claims.generation

    # ------------------------------------------------------------------------------ handler protocol
    async def claim(self, candidate: PlanCandidate, fingerprint: str, asset: str | None) -> ClaimResult:
        return await self.claims.claim(candidate, fingerprint, asset)

    async def lookup(self, profile: str, start_s: int, rotation: int = 0) -> Decision | None:
        return await self.ledger.lookup(profile, start_s, rotation)

    async def decide(self, plan: PlanPublished, *, asset_claimed: bool | None) -> Decision:
        return await self.ledger.decide(
            plan, self.instance, asset_claimed=asset_claimed, generation=self.generation
        )

    async def unclaim(self, profile: str, start_s: int, end_s: int, keys: list[tuple[KeyKind, str]]) -> int:
        return await self.claims.unclaim(profile, start_s, end_s, keys)

    async def takeover(
        self, profile: str, start_s: int, rotation: int = 0
    ) -> tuple[TakeoverOutcome, PlanPublished | None]:
        return await self.ledger.takeover(profile, start_s, self.instance, self.lease_s, rotation)

    async def recover(self, known: Sequence[Held], topic_plans: Sequence[PlanPublished] | None = None) -> str:
        """Make this process's claims trustworthy again; returns what it did.

        - ready key present (another replica rebuilt, or at start with Redis intact): re-claim what this
          process knows (its current plans, and at start the topic's recent plans), then adopt the generation:
          ``rejoined``;
        - ready key absent: whoever takes the rebuild lock reads the whole plans topic, restores every decision
          record, re-claims every plan whose epoch is not over (plus its own current plans), then publishes a
          new generation: ``rebuilt``. The others wait for it, then rejoin.
        """
        deadline = time.monotonic() + self.max_wait_s
        while True:
            gen = await self.ledger.generation()
            if gen is not None:
                self.claims.generation = gen
                try:
                    await self._restore([*(topic_plans or [])], known, guarded=True)
                except ClaimsLostError:
                    continue  # lost again while rejoining: start over
                log.info("rejoined claim generation %s", gen)
                return "rejoined"
            token = await self.ledger.acquire_rebuild(self.lock_lease_s)
            if token is not None:
                try:
                    t0 = time.monotonic()
                    plans = await self._read_topic()
                    self.claims.generation = (
                        None  # nobody else claims: the ready key is absent and we hold the lock
                    )
                    n = await self._restore(plans, known, guarded=False)
                    self.claims.generation = await self.ledger.set_generation()
                    log.warning(
                        "rebuilt the claim set from %d plan(s) on the topic (%d re-claimed) in %.2f s; generation %s",
                        len(plans),
                        n,
                        time.monotonic() - t0,
                        self.claims.generation,
                    )
                finally:
                    await self.ledger.release_rebuild(token)
                return "rebuilt"
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"registry: Redis lost the claim set and no replica rebuilt it within {self.max_wait_s:.0f} s"
                )
            await asyncio.sleep(0.05)

    async def _restore(
        self, topic_plans: Sequence[PlanPublished], known: Sequence[Held], *, guarded: bool
    ) -> int:
        """Decision records for every plan, claims for those whose epoch is not over. Returns re-claims made."""
        held: dict[tuple[str, int, int], Held] = {}
        for p in unique_plans(topic_plans):
            held[(p.profile, p.epoch, p.rotation)] = Held(p, "topic", None)
        for h in known:
            held.setdefault((h.plan.profile, h.plan.epoch, h.plan.rotation), h)
        if not held:
            return 0
        gen = self.claims.generation if guarded else None
        for _, h in sorted(held.items(), key=lambda kv: self._order(kv[1].plan)):
            on_topic = h.owner == "topic"
            rec = await self.ledger.decide(
                h.plan, h.owner, asset_claimed=h.asset_claimed, generation=gen, published=on_topic
            )
            if on_topic and not rec.published and rec.plan.id == h.plan.id:
                # Published, but its owner died before recording that: nobody needs to take it over.
                await self.ledger.mark_published(
                    h.plan.profile, int(h.plan.epoch_start.timestamp()), h.plan.id, h.plan.rotation
                )
        # Event time "now" is the latest epoch start any known plan reached; a plan that ended more than the
        # grace before it would be pruned by the next claim anyway.
        now_ev = max(int(h.plan.epoch_start.timestamp()) for h in held.values())
        grace = self.claims.grace_s
        live = [h for h in held.values() if int(h.plan.epoch_end.timestamp()) + grace > now_ev]
        made = 0
        for h in sorted(live, key=lambda h: self._order(h.plan)):
            res = await self._reclaim(h)
            outcome = "OK" if res.ok else res.outcome.name
            self._metrics.reclaimed.labels(outcome=outcome).inc()
            if res.ok:
                made += 1
            else:
                log.error(
                    "re-claim of profile %s epoch %d refused (%s held by %s): the claim set was changed while it "
                    "was lost",
                    h.plan.profile,
                    h.plan.epoch,
                    res.outcome.name,
                    res.holder,
                )
        return made

    async def _reclaim(self, h: Held) -> ClaimResult:
        p = h.plan
        start, end = int(p.epoch_start.timestamp()), int(p.epoch_end.timestamp())
        asset = p.random_asset if h.asset_claimed is not False else None
        res = await self.claims.claim_interval(
            p.profile, start, end, hash_hex=p.hash, fingerprint=p.fingerprint, asset=asset
        )
        if res.outcome is ClaimOutcome.ASSET_TAKEN and h.asset_claimed is None:
            # From the topic we cannot tell a claimed random asset from a shared one (pool exhausted): shared.
            res = await self.claims.claim_interval(
                p.profile, start, end, hash_hex=p.hash, fingerprint=p.fingerprint, asset=None
            )
        return res

    def _order(self, p: PlanPublished) -> tuple[float, int, int, str]:
        return (p.epoch_start.timestamp(), p.rotation, self._priorities.get(p.profile, 1 << 30), p.profile)


# mypy checks the port here, not only where a caller passes the class in.
_PORT: type[Backend] = RegistryBackend
