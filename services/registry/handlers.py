"""Registry message handling: market-data steps in, exactly one plan per profile per epoch out.

A profile's plan for epoch e is derived at the first step inside e (event time; or at the wall-clock boundary
with ``--clock wall``), from the candles strictly before the epoch's start (no look-ahead), claimed in Redis
and recorded as *the* plan of (profile, e) before it is published. Profiles are resolved in priority order
(then id), so when two collide the later one in that order bumps its nonce.

Several replicas may run this over the same candles (docs/registry.md section 11). For each (profile, epoch):

1. already on the plans topic when this process started -> taken as is (after a crash nothing is derived
   twice, and the lookback of candles still advances so later plans are the ones an uninterrupted run makes);
2. else a decision recorded in Redis (by another replica, or by this instance before a restart) -> adopted;
   published only by its owner (this instance after a restart, or a replica taking over after the lease);
3. else resolved (claims) and recorded; the replica whose record wins publishes, the others adopt the
   winner's plan and, if theirs differed, give back the keys the winner's plan does not use.

Planned ahead (event time): once a step's candles join the lookback, a profile whose next epoch starts at the
next step has that epoch's plan resolved and claimed at once (``Prepared``): its scores read only candles before
the epoch's start, which are all in. It is recorded and published when the next step's first candle arrives
(before that step is complete), so the claims' Redis round trips are off the way from candle to order. The
claims are made in the same order as when planning at the step, so the plans are the same; a prepared plan whose
epoch or lookback no longer matches (a gap in the candles, the end of the replay) gives its keys back unused.

Early rotations (an operator's signed ``rotate`` command, docs/registry.md section 13): a command appended to
the commands topic at broker time T applies at the first step whose candles were published at or after T
(``published_ms``, the candle records' Kafka timestamps: the same for every replica and every re-read of the
logs). At that step each targeted profile gets the next rotation k of its current epoch: a plan derived with the
``|r{k}`` hash suffix over ``[step, epoch end)``, claimed and recorded like any plan (one publisher).

A claim or decision refused because Redis lost its state (``ClaimsLostError``) triggers a recovery first:
the claim set is rebuilt from the plans topic (and this process's current plans) before anything new is
claimed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from services.registry.domain import (
    ClaimsLostError,
    Decision,
    Held,
    KeyKind,
    ResolvedPlan,
    epoch_of,
    resolve_plan_async,
    score_asset,
)
from services.registry.metrics import RegistryMetrics
from services.registry.ports import Backend
from shared.aligner import Aligner, Step, candle_floats
from shared.clock import derived_id, from_epoch_s
from shared.config import AppConfig, Profile
from shared.messages import (
    CandleClosed,
    ControlCommand,
    Message,
    PlanPublished,
    ReplayFinished,
    WatermarkAdvanced,
    WorkerFinished,
)
from shared.native import reduce_frozen

log = logging.getLogger("registry")

MAX_RECOVERIES_PER_EPOCH = 5


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class RotationRequest:
    """An accepted ``rotate`` command waiting for its step (broker append time in ms)."""

    command_id: str
    target: str  # a profile id or "all"
    appended_ms: int

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class Stats:
    decided: int = 0  # derived and recorded first by this process
    rotations: int = 0  # early rotations applied (plans derived or adopted for a rotate command)
    published: int = 0  # handed to Kafka by this process (decided, re-published as owner, or taken over)
    adopted: int = 0  # recorded by another replica, taken as is
    skipped: int = 0  # already on the plans topic at start
    collisions: int = 0  # nonce bumps in the plans this process decided
    refused: Counter[str] = field(default_factory=Counter)  # refused claims by outcome, every resolution
    refused_decided: Counter[str] = field(
        default_factory=Counter
    )  # ... in the resolutions that were recorded
    divergent: int = 0
    recoveries: Counter[str] = field(default_factory=Counter)
    takeovers: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "plans": self.published,
            "decided": self.decided,
            "adopted": self.adopted,
            "skipped": self.skipped,
            "collisions": self.collisions,
            "refused": dict(sorted(self.refused.items())),
            "refused_decided": dict(sorted(self.refused_decided.items())),
            "divergent": self.divergent,
            "recoveries": dict(sorted(self.recoveries.items())),
            "takeovers": self.takeovers,
            "rotations": self.rotations,
        }


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class Prepared:
    """An epoch's scheduled plan, resolved and claimed ahead of its first step, not yet recorded or published."""

    epoch: int
    resolved: ResolvedPlan
    # RegistryState.steps_done when resolved: valid only while no step joined the lookback since.
    steps_done: int

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class RegistryState:
    cfg: AppConfig
    aligner: Aligner
    instance: str = "0"
    metrics: RegistryMetrics = field(default_factory=RegistryMetrics)
    lookback: dict[str, deque[tuple[int, float, float]]] = field(
        default_factory=dict
    )  # asset -> (open_s, close, vol)
    current_epoch: dict[str, int] = field(default_factory=dict)
    latest: dict[str, Held] = field(default_factory=dict)
    # (profile, start_s, rotation) -> plan published before this process started
    on_topic: dict[tuple[str, int, int], PlanPublished] = field(default_factory=dict)
    last_on_topic: dict[str, tuple[int, int]] = field(
        default_factory=dict
    )  # profile -> last (start_s, rotation)
    to_mark: list[PlanPublished] = field(default_factory=list)  # mark published once Kafka acknowledged
    # adopted, unpublished: (profile, start_s, rotation) -> since (monotonic)
    watches: dict[tuple[str, int, int], float] = field(default_factory=dict)
    stats: Stats = field(default_factory=Stats)
    plan_on_steps: bool = True  # event time (replay); False with --clock wall, where on_clock plans
    finished: bool = False
    # Scores per epoch start, valid until the lookback changes: profiles sharing an epoch start share them.
    score_cache: dict[int, dict[str, float | None]] = field(default_factory=dict)
    step_published: dict[int, int] = field(
        default_factory=dict
    )  # step -> latest Kafka timestamp of its candles
    rotation_requests: list[RotationRequest] = field(default_factory=list)  # accepted, not applied yet
    rotation_of: dict[str, tuple[int, int]] = field(
        default_factory=dict
    )  # profile -> (epoch, last rotation k)
    plan_ahead: bool = True  # resolve the next epoch's plans when the step before it is in (module docstring)
    prepared: dict[str, Prepared] = field(default_factory=dict)  # profile -> its next epoch's plan
    steps_done: int = 0  # steps whose candles joined the lookback
    last_step_s: int | None = None


# product -> its base asset (`product.split("/")[0]`), for the lookback of every candle.
_asset_of: dict[str, str] = {}

# The enabled profiles of the last config asked for (AppConfig is frozen): `AppConfig.enabled_profiles` sorts
# them at every call, and a step asks twice. Read only (iterated), never changed.
_enabled_of: tuple[AppConfig, dict[str, Profile]] | None = None


def _enabled(cfg: AppConfig) -> dict[str, Profile]:
    """`cfg.enabled_profiles()`, computed once per config object."""
    global _enabled_of
    memo = _enabled_of
    if memo is None or memo[0] is not cfg:
        memo = _enabled_of = (cfg, cfg.enabled_profiles())
    return memo[1]


def new_state(
    cfg: AppConfig, *, instance: str = "0", metrics: RegistryMetrics | None = None
) -> RegistryState:
    return RegistryState(
        cfg=cfg,
        aligner=Aligner(frozenset(range(cfg.system.kafka.candle_partitions))),
        instance=instance,
        metrics=metrics or RegistryMetrics(instance),
    )


def load_published(state: RegistryState, plans: Sequence[PlanPublished]) -> None:
    """Plans already on the topic at start: never derived again by this process."""
    for p in plans:
        mark = (int(p.epoch_start.timestamp()), p.rotation)
        state.on_topic[(p.profile, *mark)] = p
        state.last_on_topic[p.profile] = max(mark, state.last_on_topic.get(p.profile, mark))


def scores_before(state: RegistryState, start_s: int) -> dict[str, float | None]:
    cached = state.score_cache.get(start_s)
    if cached is not None:
        return cached
    n = state.cfg.system.registry.score_lookback_candles
    out: dict[str, float | None] = {}
    for asset, buf in state.lookback.items():
        rows = [r for r in buf if r[0] < start_s][-n:]
        out[asset] = score_asset([r[1] for r in rows], [r[2] for r in rows]) if rows else None
    state.score_cache[start_s] = out
    return out


def plan_message(r: ResolvedPlan, *, correlation: str, commands: Sequence[str] = ()) -> PlanPublished:
    # Derived from what the plan is: replicas and reruns that derive the same plan publish the same id (the
    # scheduled plan's id is unchanged by the rotation feature).
    ident = (
        derived_id("plan", r.profile, r.epoch, r.fingerprint)
        if r.rotation == 0
        else derived_id("plan", r.profile, r.epoch, f"r{r.rotation}", r.epoch_start_s, r.fingerprint)
    )
    return PlanPublished(
        id=ident,
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
        rotation=r.rotation,
        rotation_commands=list(commands),
    )


def holds_asset(r: ResolvedPlan) -> bool:
    """Whether the plan holds its random asset (not when every candidate was held and it shares one)."""
    return r.random_asset is not None and not r.asset_shared


def plan_keys(plan: PlanPublished | ResolvedPlan, asset_claimed: bool | None) -> set[tuple[KeyKind, str]]:
    keys: set[tuple[KeyKind, str]] = {("hash", plan.hash), ("fp", plan.fingerprint)}
    if plan.random_asset is not None and asset_claimed is not False:
        keys.add(("asset", plan.random_asset))
    return keys


async def handle(
    state: RegistryState, msg: Message, partition: int, backend: Backend, *, published_ms: int | None = None
) -> list[Message]:
    """``published_ms``: the record's Kafka timestamp (candles: when they were published; a verified command:
    when the broker appended it). Only commands already verified (shared/commands.py) may be passed here."""
    if isinstance(msg, ControlCommand):
        if msg.action == "rotate" and published_ms is not None:
            state.rotation_requests.append(RotationRequest(msg.id, msg.target, published_ms))
        return []
    if not isinstance(msg, CandleClosed | WatermarkAdvanced | ReplayFinished):
        return []
    out: list[Message] = []
    if isinstance(msg, CandleClosed):
        t = int(msg.open_time.timestamp())
        if published_ms is not None:
            state.step_published[t] = max(published_ms, state.step_published.get(t, published_ms))
        if (
            state.prepared
            and state.last_step_s is not None
            and t == state.last_step_s + state.cfg.system.market_data.interval_s
        ):
            # The first candle of the step right after the last one: every candle before it is in the lookback,
            # so this step's plans are what the complete step would give; publish them now, not after its
            # last candle.
            out.extend(await _plan_profiles(state, t, backend, correlation=f"step:{t}"))
    for step in state.aligner.add(partition, msg):
        out.extend(await _on_step(state, step, backend))
    if state.aligner.finished and not state.finished:
        state.finished = True
        await _give_back_all(state, backend)
        out.append(
            WorkerFinished(
                id=derived_id("finished", "registry", state.instance),
                event_time=from_epoch_s(0),
                correlation_id="registry:final",
                service="registry",
                instance=state.instance,
                detail=state.stats.as_dict(),
            )
        )
    return out


async def on_step(state: RegistryState, step: Step, backend: Backend) -> list[Message]:
    """One complete step, as `handle` gets it from the aligner once its candles and watermarks are in: the
    backtest's entry point (it holds whole steps, so it feeds them without the per-message aligner)."""
    return await _on_step(state, step, backend)


async def on_clock(state: RegistryState, now_s: int, backend: Backend) -> list[Message]:
    """Live mode: derive the plans of the epochs that wall time ``now_s`` has entered, without waiting for a
    candle of the new epoch (which only closes one candle interval later)."""
    return await _plan_profiles(state, now_s, backend, correlation=f"clock:{now_s}")


async def _on_step(state: RegistryState, step: Step, backend: Backend) -> list[Message]:
    out: list[Message] = []
    corr = f"step:{step.time_s}"
    if state.plan_on_steps:
        out = await _plan_profiles(state, step.time_s, backend, correlation=corr)
    published = state.step_published.pop(step.time_s, None)
    if published is not None and state.rotation_requests:
        due = [r for r in state.rotation_requests if r.appended_ms <= published]
        if due:
            state.rotation_requests = [r for r in state.rotation_requests if r.appended_ms > published]
            out.extend(await _rotate_profiles(state, step.time_s, due, backend, correlation=corr))
    # The step's own candles join the lookback only after this step's plans: no look-ahead.
    state.score_cache.clear()
    keep = state.cfg.system.registry.score_lookback_candles + 1
    lookback = state.lookback
    candles = step.candles
    # float(c.close) and float(c.volume) of each candle, converted once per step (shared.aligner.candle_floats).
    floats = candle_floats(candles)
    t = step.time_s
    for i in range(len(candles)):
        product = candles[i].product
        asset = _asset_of.get(product)
        if asset is None:
            asset = _asset_of[product] = product.split("/")[0]
        f = floats[i]
        buf = lookback.get(asset)
        if buf is None:
            buf = lookback[asset] = deque(maxlen=keep)
        buf.append((t, f[3], f[4]))
    state.steps_done += 1
    state.last_step_s = step.time_s
    if state.plan_on_steps and state.plan_ahead:
        await _prepare_next(state, step.time_s, backend)
    return out


async def _prepare_next(state: RegistryState, t_s: int, backend: Backend) -> None:
    """Resolve and claim the plans of the epochs that start at the step after ``t_s``, in priority order (the
    order ``_plan_profiles`` claims in at that step); ``_decide_epoch`` records and publishes them."""
    cfg = state.cfg
    nxt = t_s + cfg.system.market_data.interval_s
    for pid, profile in _enabled(cfg).items():
        interval = profile.profile_hash.hash_rotation_interval
        e = epoch_of(nxt, interval)
        current = state.current_epoch.get(pid)
        if e == epoch_of(t_s, interval) or (current is not None and e <= current) or pid in state.prepared:
            continue
        start_s = e * interval
        mark = (start_s, 0)
        if (pid, *mark) in state.on_topic or mark < state.last_on_topic.get(pid, mark):
            continue  # published before this process started: taken from the topic at the step
        try:
            if await backend.lookup(pid, start_s) is not None:
                continue  # recorded already (a replica, or this instance before a restart): adopted at the step
            resolved = await resolve_plan_async(
                pid,
                profile,
                e,
                scores_before(state, start_s),
                cfg.system.registry,
                cfg.system.quote_asset,
                backend.claim,
            )
        except ClaimsLostError as err:
            # The step's own planning meets the same loss and recovers; nothing is prepared meanwhile.
            log.warning("profile %s epoch %d: not planned ahead: %s", pid, e, err)
            await _give_back_all(state, backend)
            return
        state.prepared[pid] = Prepared(e, resolved, state.steps_done)


async def _give_back(backend: Backend, prepared: Prepared) -> None:
    r = prepared.resolved
    await backend.unclaim(r.profile, r.epoch_start_s, r.epoch_end_s, sorted(plan_keys(r, holds_asset(r))))


async def _give_back_all(state: RegistryState, backend: Backend) -> None:
    """Unclaim every prepared plan that will not be recorded (the replay ended, or Redis lost the claims)."""
    prepared, state.prepared = state.prepared, {}
    for p in prepared.values():
        await _give_back(backend, p)


async def _plan_profiles(
    state: RegistryState, t_s: int, backend: Backend, *, correlation: str
) -> list[Message]:
    out: list[Message] = []
    due: dict[str, tuple[Profile, int]] = {}
    for pid, profile in _enabled(state.cfg).items():
        e = epoch_of(t_s, profile.profile_hash.hash_rotation_interval)
        current = state.current_epoch.get(pid)
        if current is None or e > current:  # epochs only move forward (live: a late step never re-plans)
            due[pid] = (profile, e)
    if not due:
        return out  # most steps: no epoch starts (_decide_prepared would find no prepared plan due)
    decided = await _decide_prepared(state, {pid: e for pid, (_, e) in due.items()}, backend, correlation)
    for pid, (profile, e) in due.items():
        out.extend(await _plan_epoch(state, pid, profile, e, backend, correlation, decided=decided.get(pid)))
    return out


async def _decide_prepared(
    state: RegistryState, due: dict[str, int], backend: Backend, correlation: str
) -> dict[str, Decision]:
    """Record the prepared plans of the due epochs all at once: one profile's record never depends on another's,
    so the round trips overlap instead of queueing (a profile whose call failed is decided again in turn)."""
    ready = [
        (pid, p)
        for pid, p in state.prepared.items()
        if (p.epoch, p.steps_done) == (due.get(pid), state.steps_done)
    ]
    if not ready:
        return {}
    results = await asyncio.gather(
        *(
            backend.decide(
                plan_message(p.resolved, correlation=correlation), asset_claimed=holds_asset(p.resolved)
            )
            for _, p in ready
        ),
        return_exceptions=True,
    )
    decided: dict[str, Decision] = {}
    for (pid, _), r in zip(ready, results, strict=True):
        if isinstance(r, Decision):
            decided[pid] = r
        elif not isinstance(r, ClaimsLostError):
            raise r
    return decided


async def _rotate_profiles(
    state: RegistryState, t_s: int, due: Sequence[RotationRequest], backend: Backend, *, correlation: str
) -> list[Message]:
    """Early rotations due at step ``t_s``, in profile priority order (like the scheduled plans)."""
    out: list[Message] = []
    for pid, profile in _enabled(state.cfg).items():
        commands = [r.command_id for r in due if r.target in (pid, "all")]
        if not commands:
            continue
        interval = profile.profile_hash.hash_rotation_interval
        epoch = epoch_of(t_s, interval)
        start_s = t_s
        current = state.current_epoch.get(pid)
        if current is not None and current > epoch:
            # Wall-clock mode plans ahead of the steps: rotate the current epoch, from its start.
            epoch, start_s = current, current * interval
        last_epoch, last_k = state.rotation_of.get(pid, (epoch, 0))
        k = (last_k if last_epoch == epoch else 0) + 1
        log.info(
            "profile %s: early rotation %d of epoch %d at %d (commands %s)", pid, k, epoch, start_s, commands
        )
        state.stats.rotations += 1
        state.metrics.rotations.labels(profile=pid).inc()
        out.extend(
            await _plan_epoch(
                state,
                pid,
                profile,
                epoch,
                backend,
                correlation,
                rotation=k,
                start_s=start_s,
                commands=commands,
            )
        )
    return out


async def _plan_epoch(
    state: RegistryState,
    pid: str,
    profile: Profile,
    epoch: int,
    backend: Backend,
    correlation: str,
    *,
    rotation: int = 0,
    start_s: int | None = None,
    commands: Sequence[str] = (),
    decided: Decision | None = None,
) -> list[Message]:
    if start_s is None:
        start_s = epoch * profile.profile_hash.hash_rotation_interval
    mark = (start_s, rotation)
    state.rotation_of[pid] = (epoch, rotation)
    known = state.on_topic.get((pid, *mark))
    if known is not None or mark < state.last_on_topic.get(pid, mark):
        # Published before this process started: never derived again. (An older epoch missing from the
        # topic was compacted away: the profile's later plan is on it, so this one is over too.)
        state.stats.skipped += 1
        state.metrics.adopted.labels(profile=pid, source="topic").inc()
        if known is not None:
            _take(state, pid, epoch, Held(known, "topic", None))
        else:
            state.current_epoch[pid] = epoch
        return []
    for _ in range(MAX_RECOVERIES_PER_EPOCH):
        try:
            return await _decide_epoch(
                state,
                pid,
                profile,
                epoch,
                backend,
                correlation,
                rotation=rotation,
                start_s=start_s,
                commands=commands,
                decided=decided,
            )
        except ClaimsLostError as err:
            log.warning("profile %s epoch %d: %s", pid, epoch, err)
            await _give_back_all(state, backend)  # resolved against the claim set that was lost
            kind = await backend.recover(list(state.latest.values()))
            state.stats.recoveries[kind] += 1
            state.metrics.recoveries.labels(kind=kind).inc()
    raise RuntimeError(
        f"registry: profile {pid!r} epoch {epoch}: Redis lost the claim set {MAX_RECOVERIES_PER_EPOCH} times in a "
        "row while planning this epoch; check the Redis server (flushes, evictions, restarts)"
    )


async def _decide_epoch(
    state: RegistryState,
    pid: str,
    profile: Profile,
    epoch: int,
    backend: Backend,
    correlation: str,
    *,
    rotation: int,
    start_s: int,
    commands: Sequence[str],
    decided: Decision | None,
) -> list[Message]:
    """``decided``: the record ``_decide_prepared`` made or found for this profile's prepared plan."""
    cfg = state.cfg
    prepared = state.prepared.pop(pid, None) if rotation == 0 else None
    if prepared is None or decided is None:
        if prepared is not None:
            # Not recorded by _decide_prepared (resolved for another epoch or lookback, or Redis lost the
            # claims): not this plan.
            await _give_back(backend, prepared)
        prepared = decided = None
    # The scheduled plan keeps the backend's original call (backtest and test backends key by start only).
    # A prepared plan was looked up when it was prepared; ``decided`` says if another record came first (then
    # the keys it does not use are given back below, as by a replica that lost the decision).
    rec = (
        None
        if decided is not None
        else await (backend.lookup(pid, start_s, rotation) if rotation else backend.lookup(pid, start_s))
    )
    if rec is None:
        resolved = (
            prepared.resolved
            if prepared is not None
            else await resolve_plan_async(
                pid,
                profile,
                epoch,
                scores_before(state, start_s),
                cfg.system.registry,
                cfg.system.quote_asset,
                backend.claim,
                rotation=rotation,
                start_s=start_s if rotation else None,
            )
        )
        for c in resolved.conflicts:
            state.stats.refused[c.outcome.name] += 1
            state.metrics.refused.labels(profile=pid, outcome=c.outcome.name).inc()
        claimed = holds_asset(resolved)
        # The plan's message: built here only when it is recorded here or compared below (a prepared plan's was
        # built and recorded by _decide_prepared, with the same values).
        mine: PlanPublished | None = None
        if decided is None:
            mine = plan_message(resolved, correlation=correlation, commands=commands)
            rec = await backend.decide(mine, asset_claimed=claimed)
        else:
            rec = decided
        if rec.won:
            state.stats.decided += 1
            state.stats.refused_decided.update(c.outcome.name for c in resolved.conflicts)
            state.stats.collisions += resolved.collisions
            state.metrics.decided.labels(profile=pid).inc()
            if resolved.collisions:
                state.metrics.collisions.labels(profile=pid).inc(resolved.collisions)
                log.info(
                    "profile %s epoch %d: %d collision(s) resolved, nonce %d",
                    pid,
                    epoch,
                    resolved.collisions,
                    resolved.nonce,
                )
        else:
            if mine is None:
                mine = plan_message(resolved, correlation=correlation, commands=commands)
            if rec.plan.id != mine.id:
                # Lost the decision with another plan (this replica saw a different claim set): give back the
                # keys the recorded plan does not use, so they block nobody.
                extra = plan_keys(mine, claimed) - plan_keys(rec.plan, rec.asset_claimed)
                await backend.unclaim(pid, resolved.epoch_start_s, resolved.epoch_end_s, sorted(extra))
                state.stats.divergent += 1
                state.metrics.divergent.labels(profile=pid).inc()
                log.warning(
                    "profile %s epoch %d: another replica decided a different plan first; adopted it",
                    pid,
                    epoch,
                )
    out: list[Message] = []
    if rec.won or (rec.owner == state.instance and not rec.published):
        # The winner publishes; so does this instance for its own decision that a crash left unpublished.
        out.append(rec.plan)
        _queued(state, rec.plan)
    else:
        state.stats.adopted += 1
        state.metrics.adopted.labels(profile=pid, source="replica").inc()
        if not rec.published:
            state.watches[(pid, start_s, rotation)] = time.monotonic()
    _take(state, pid, epoch, Held(rec.plan, rec.owner, rec.asset_claimed))
    return out


def _queued(state: RegistryState, plan: PlanPublished) -> None:
    state.to_mark.append(plan)
    state.stats.published += 1
    state.metrics.published.labels(profile=plan.profile).inc()


def _take(state: RegistryState, pid: str, epoch: int, held: Held) -> None:
    state.current_epoch[pid] = epoch
    state.latest[pid] = held
    state.metrics.epoch.labels(profile=pid).set(epoch)


async def check_watches(state: RegistryState, backend: Backend, lease_s: float) -> list[Message]:
    """Publish the adopted plans whose owner has not published them within ``lease_s`` (it died between its
    decision and Kafka's acknowledgement). Same message id as the owner's, so a late owner is harmless."""
    out: list[Message] = []
    now = time.monotonic()
    for key, since in list(state.watches.items()):
        if now - since < lease_s:
            continue
        pid, start_s, rotation = key
        outcome, plan = await (
            backend.takeover(pid, start_s, rotation) if rotation else backend.takeover(pid, start_s)
        )
        if outcome == "WAIT":
            state.watches[key] = now
            continue
        del state.watches[key]
        if outcome == "OK" and plan is not None:
            log.warning(
                "profile %s epoch %d: owner did not publish within %.0f s; publishing it",
                pid,
                plan.epoch,
                lease_s,
            )
            state.stats.takeovers += 1
            state.metrics.takeovers.inc()
            out.append(plan)
            _queued(state, plan)
    return out
