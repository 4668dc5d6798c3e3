"""Registry message handling: market-data steps in, one plan per profile per epoch out.

A profile's plan for epoch e is derived at the first step inside e, from the candles strictly before the
epoch's start (no look-ahead), and claimed in Redis before it is published. Profiles are resolved in
priority order (then id), so when two collide the later one in that order bumps its nonce.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.registry.domain import (
    ClaimOutcome,
    ClaimResult,
    PlanCandidate,
    ResolvedPlan,
    epoch_of,
    resolve_plan_async,
    score_asset,
)
from shared.aligner import Aligner, Step
from shared.clock import derived_id, from_epoch_s
from shared.config import AppConfig
from shared.messages import (
    CandleClosed,
    Message,
    PlanPublished,
    ReplayFinished,
    WatermarkAdvanced,
    WorkerFinished,
)

log = logging.getLogger("registry")

TryClaim = Callable[[PlanCandidate, str, str | None], Awaitable[ClaimOutcome | ClaimResult]]


@dataclass
class RegistryState:
    cfg: AppConfig
    aligner: Aligner
    lookback: dict[str, deque[tuple[int, float, float]]] = field(
        default_factory=dict
    )  # asset -> (open_s, close, vol)
    current_epoch: dict[str, int] = field(default_factory=dict)
    finished: bool = False
    published: int = 0
    collisions: int = 0


def new_state(cfg: AppConfig) -> RegistryState:
    return RegistryState(cfg=cfg, aligner=Aligner(frozenset(range(cfg.system.kafka.candle_partitions))))


def scores_before(state: RegistryState, start_s: int) -> dict[str, float | None]:
    n = state.cfg.system.registry.score_lookback_candles
    out: dict[str, float | None] = {}
    for asset, buf in state.lookback.items():
        rows = [r for r in buf if r[0] < start_s][-n:]
        out[asset] = score_asset([r[1] for r in rows], [r[2] for r in rows]) if rows else None
    return out


def plan_message(r: ResolvedPlan, *, correlation: str) -> PlanPublished:
    return PlanPublished(
        id=derived_id("plan", r.profile, r.epoch, r.fingerprint),
        event_time=from_epoch_s(r.epoch_start_s),
        correlation_id=correlation,
        profile=r.profile,
        epoch=r.epoch,
        epoch_start=from_epoch_s(r.epoch_start_s),
        epoch_end=from_epoch_s(r.epoch_end_s),
        hash=r.hash,
        nonce=r.nonce,
        strategy=r.strategy,
        parameters=dict(r.parameters),
        blend_weight=r.blend_weight,
        assets=list(r.assets),
        random_asset=r.random_asset,
        products=list(r.products),
        fingerprint=r.fingerprint,
        collisions=r.collisions,
        asset_candidates=list(r.asset_candidates),
    )


async def handle(state: RegistryState, msg: Message, partition: int, try_claim: TryClaim) -> list[Message]:
    if not isinstance(msg, CandleClosed | WatermarkAdvanced | ReplayFinished):
        return []
    out: list[Message] = []
    for step in state.aligner.add(partition, msg):
        out.extend(await _on_step(state, step, try_claim))
    if state.aligner.finished and not state.finished:
        state.finished = True
        out.append(
            WorkerFinished(
                id=derived_id("finished", "registry"),
                event_time=from_epoch_s(0),
                correlation_id="registry:final",
                service="registry",
                instance="0",
                detail={"plans": state.published, "collisions": state.collisions},
            )
        )
    return out


async def _on_step(state: RegistryState, step: Step, try_claim: TryClaim) -> list[Message]:
    cfg = state.cfg
    out: list[Message] = []
    for pid, profile in cfg.enabled_profiles().items():
        e = epoch_of(step.time_s, profile.profile_hash.hash_rotation_interval)
        if state.current_epoch.get(pid) == e:
            continue
        start_s = e * profile.profile_hash.hash_rotation_interval
        resolved = await resolve_plan_async(
            pid,
            profile,
            e,
            scores_before(state, start_s),
            cfg.system.registry,
            cfg.system.quote_asset,
            try_claim,
        )
        state.current_epoch[pid] = e
        state.published += 1
        state.collisions += resolved.collisions
        if resolved.collisions:
            log.info(
                "profile %s epoch %d: %d collision(s) resolved, nonce %d",
                pid,
                e,
                resolved.collisions,
                resolved.nonce,
            )
        out.append(plan_message(resolved, correlation=f"step:{step.time_s}"))
    # The step's own candles join the lookback only after this step's plans: no look-ahead.
    keep = cfg.system.registry.score_lookback_candles + 1
    for c in step.candles:
        asset = c.product.split("/")[0]
        buf = state.lookback.setdefault(asset, deque(maxlen=keep))
        buf.append((step.time_s, float(c.close), float(c.volume)))
    return out
