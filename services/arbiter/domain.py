"""Cross-profile arbitration, pure: `decide(state, message, partition) -> messages`.

Inputs, told apart by type (so `partition` is the partition of the message's own topic):
- `PlaceOrder` / `StepCompleted` from `orders.intents` (keyed by product);
- `PlanPublished` from `registry.plans` (plan echo, de-sync seeds);
- `CandleClosed` / `WatermarkAdvanced` / `ReplayFinished` from `md.candles` (marks and returns).

Order. The intents of one event-time step are decided together, once (a) every enabled profile has marked
that step complete (`StepCompleted`) on *every* intents partition, (b) the market data of the step is complete
(candle watermark), and (c) the plan of every intent's epoch is known. They are decided in the order
(priority, profile, product, side), steps in time order, across all products. So every decision is a function
of the inputs alone, whatever order Kafka delivers the topics and partitions in, and the rules that span
products (total exposure, correlation) see one global order. docs/arbiter.md explains why the barrier spans
partitions and how two arbiter processes share the work.

Rules, applied to each intent in that order (each one below is a pure function of the state and the draft):
1. `plan_echo`: the intent's fingerprint must be its profile's registered plan for the intent's epoch, and that
   epoch must not have ended before the intent's step (stale after a rotation). Manual intents (reason
   `manual`, the operator's router) are not produced by a plan and skip it.
2. `correlation_guard` (buys): when the rolling correlation of the profile's returns with an earlier-ranked
   profile's is above the threshold, the size is scaled down.
3. `exposure_cap` (buys): total notional per product and in all, across profiles, capped; trim or reject.
4. `opposite_side`: another profile's live order or recent fill on the other side of the product blocks the
   intent (wash-trade prevention); the decision names both profiles. An approved (or delayed) order is live for
   its whole working life, from its decision until its latest possible end: its predicted send time plus its
   profile's `trading_params.order_timeout` (a paper order keeps filling, part by part, until then; its last
   fill is no later). It then blocks for `conflict_window_s` after that end. Conservative and deterministic:
   the arbiter does not read order events (their arrival relative to the intents is not deterministic), so an
   order that finishes early still blocks until that end. Each such
   pair is an internal-cross opportunity (reported with what netting would save); with
   `internal_cross: execute` two intents of one step are netted instead, as an internal transfer.
5. `crowding`: different profiles' orders on one product are sent at least `min_cross_profile_gap_ms` apart.
   The arbiter predicts each order's send time (not_before + the execution worker's seeded de-sync delay,
   the same function: shared.orders.desync_delay_ms) and delays an order whose send would fall too close
   (verdict `delayed`, `not_before`).

A redelivered intent (same intent id) gets the decision it got the first time, re-published unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any, Literal

# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from shared import book as shared_book
from shared.aligner import Aligner, Step
from shared.clock import derived_id, from_epoch_s
from shared.config import AppConfig, ArbiterSettings, ExecutionSettings
from shared.messages import (
    CandleClosed,
    CorrelationAlert,
    ExecuteOrder,
    InternalCrossOpportunity,
    Message,
    OrderDecided,
    PlaceOrder,
    PlanPublished,
    ReplayFinished,
    StepCompleted,
    WatermarkAdvanced,
    WorkerFinished,
)
from shared.orders import client_order_id, desync_delay_ms

SIZE_STEP = Decimal("0.00000001")
MONEY_STEP = Decimal("0.00000001")
ZERO = Decimal(0)
_INF = 1 << 62


def _ms(dt: datetime) -> int:
    return round(dt.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    return from_epoch_s(0) + timedelta(milliseconds=ms)  # exact: no float round trip


def _num(d: Decimal) -> str:
    return format(d, "f")


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation of two equally long step-return series (shared/book.py) with the arbiter's floor;
    None when the lengths differ, either is constant or too short."""
    if len(xs) != len(ys):
        return None
    return shared_book.pearson(xs, ys, floor=shared_book.STEP_PNL_FLOOR)


# ------------------------------------------------------------------------------------------ state
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class BookEntry:
    """A market order another intent may conflict with: live from its decision (`start`) until its latest
    possible end (`end` = predicted send + the profile's order_timeout: it may keep filling until then), then
    a recent fill for `conflict_window_s`."""

    profile: str
    side: str
    start: datetime
    end: datetime
    intent_id: str
    size: Decimal
    cross_open: Decimal  # what of it has not yet been counted in an internal-cross opportunity
    send: datetime | None = None  # the predicted send time (`end` - order_timeout)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class Draft:
    """One intent's decision while its step is decided (a later intent of the step may net against it)."""

    intent: PlaceOrder
    partition: int
    size: Decimal
    verdict: Literal["approved", "rejected", "delayed"] = "approved"
    rule: str = "approved"
    reason: str = "no conflict"
    conflicting: str | None = None
    internal: Decimal = ZERO
    counterparties: list[str] = field(default_factory=list)
    cross_open: Decimal = ZERO
    details: dict[str, Any] = field(default_factory=dict)
    plan_hash: str | None = None
    not_before: datetime | None = None
    send: datetime | None = None
    extra: list[Message] = field(default_factory=list)

    @property
    def market(self) -> Decimal:
        return self.size - self.internal

    @property
    def live(self) -> bool:
        return self.verdict != "rejected"


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class PartitionState:
    marks: dict[str, int] = field(default_factory=dict)  # profile -> last completed step (epoch s)
    final: set[str] = field(default_factory=set)
    finished: bool = False


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class ArbiterState:
    profiles: dict[str, int]  # enabled profile -> priority
    rank: dict[str, int]  # enabled profile -> position in decision order (priority, then id)
    settings: ArbiterSettings
    execution: ExecutionSettings
    conflict_window: timedelta
    n_partitions: int
    base_hash: dict[str, str]
    slippage: dict[str, Decimal]
    initial: dict[str, Decimal]
    rotation_s: dict[str, int]
    order_timeout: dict[str, timedelta]  # profile -> trading_params.order_timeout (an order's working life)
    aligner: Aligner
    candle_partitions: frozenset[int]
    partitions: dict[int, PartitionState] = field(default_factory=dict)
    buffer: list[tuple[PlaceOrder, int]] = field(default_factory=list)
    buffered: set[str] = field(default_factory=set)
    decided: dict[str, list[Message]] = field(default_factory=dict)
    # profile -> (epoch, rotation) -> plan; rotation > 0: an early rotation inside the epoch (docs/registry.md)
    plans: dict[str, dict[tuple[int, int], PlanPublished]] = field(default_factory=dict)
    last_plan_epoch: dict[str, int] = field(default_factory=dict)
    # Market data: watermarks per candle partition, released steps' closes not yet turned into returns.
    market_marks: dict[int, int] = field(default_factory=dict)
    market_finished: set[int] = field(default_factory=set)
    pending_closes: deque[tuple[int, dict[str, Decimal]]] = field(default_factory=deque)
    closes: dict[str, Decimal] = field(default_factory=dict)  # last close per product, up to `returns_upto`
    returns_upto: int | None = None
    reference: dict[str, Decimal] = field(
        default_factory=dict
    )  # last intent price per product (fallback mark)
    # What the arbiter's approvals make of each profile's positions (approved orders assumed filled).
    positions: dict[str, dict[str, Decimal]] = field(default_factory=dict)
    returns: dict[str, deque[float]] = field(default_factory=dict)
    correlations: dict[tuple[str, str], float | None] = field(default_factory=dict)
    breached: set[tuple[str, str]] = field(default_factory=set)
    book: dict[str, deque[BookEntry]] = field(default_factory=dict)
    sends: dict[str, deque[tuple[str, int]]] = field(default_factory=dict)  # product -> (profile, send ms)
    counts: dict[str, int] = field(default_factory=dict)
    savings: dict[str, Decimal] = field(default_factory=dict)


# Durable state (shared/snapshots.py): the version of ArbiterState's snapshot form (raise it when a field
# changes meaning), and the fields new_state sets from the configuration, which a snapshot leaves out.
SNAPSHOT_SCHEMA = 2  # 2: BookEntry.end is send + order_timeout (was the send), BookEntry.send
CONFIG_FIELDS = frozenset(
    {
        "profiles",
        "rank",
        "settings",
        "execution",
        "conflict_window",
        "n_partitions",
        "base_hash",
        "slippage",
        "initial",
        "rotation_s",
        "order_timeout",
        "candle_partitions",
    }
)


def new_state(cfg: AppConfig) -> ArbiterState:
    a = cfg.system.arbiter
    if a.internal_cross == "execute" and cfg.system.mode != "paper":
        raise ValueError(
            "system.arbiter.internal_cross: execute is a paper-mode option; use report in live mode"
        )
    enabled = cfg.enabled_profiles()  # already in decision order
    candle_parts = frozenset(range(cfg.system.kafka.candle_partitions))
    return ArbiterState(
        profiles={pid: p.priority for pid, p in enabled.items()},
        rank={pid: i for i, pid in enumerate(enabled)},
        settings=a,
        execution=cfg.system.execution,
        conflict_window=timedelta(seconds=a.conflict_window_s),
        n_partitions=cfg.system.kafka.intent_partitions,
        base_hash={pid: p.profile_hash.base_hash for pid, p in enabled.items()},
        slippage={pid: Decimal(str(p.trading_params.slippage_tolerance)) for pid, p in enabled.items()},
        initial={pid: Decimal(str(p.paper.initial_quote_balance)) for pid, p in enabled.items()},
        rotation_s={pid: p.profile_hash.hash_rotation_interval for pid, p in enabled.items()},
        order_timeout={pid: timedelta(seconds=p.trading_params.order_timeout) for pid, p in enabled.items()},
        aligner=Aligner(candle_parts),
        candle_partitions=candle_parts,
        positions={pid: {} for pid in enabled},
        returns={pid: deque(maxlen=a.correlation_window_steps) for pid in enabled},
    )


# ------------------------------------------------------------------------------------------ entry point
def decide(state: ArbiterState, msg: Message, partition: int) -> list[Message]:
    if isinstance(msg, PlaceOrder):
        if msg.intent_id in state.decided:
            return list(state.decided[msg.intent_id])  # redelivery: same decision again
        if msg.profile not in state.profiles:
            d = Draft(
                msg,
                partition,
                msg.size,
                "rejected",
                "unknown_profile",
                f"profile {msg.profile!r} is not an enabled profile",
            )
            return _emit(state, d)
        if msg.intent_id in state.buffered:
            return []
        state.buffer.append((msg, partition))
        state.buffered.add(msg.intent_id)
    elif isinstance(msg, StepCompleted):
        if msg.profile not in state.profiles:
            return []
        _step_marked(state, msg.profile, int(msg.step_time.timestamp()), msg.final, partition)
    elif isinstance(msg, PlanPublished):
        if msg.profile not in state.profiles:
            return []
        state.plans.setdefault(msg.profile, {})[(msg.epoch, msg.rotation)] = msg
        state.last_plan_epoch[msg.profile] = max(msg.epoch, state.last_plan_epoch.get(msg.profile, msg.epoch))
    elif isinstance(msg, CandleClosed):
        state.aligner.add(partition, msg)
        return []  # a candle alone never completes a step: nothing to release (the hot path of a replay)
    elif isinstance(msg, WatermarkAdvanced | ReplayFinished):
        if isinstance(msg, WatermarkAdvanced):
            t = int(msg.step_time.timestamp())
            state.market_marks[partition] = max(t, state.market_marks.get(partition, t))
        elif isinstance(msg, ReplayFinished):
            state.market_finished.add(partition)
        for step in state.aligner.add(partition, msg):
            state.pending_closes.append((step.time_s, {c.product: c.close for c in step.candles}))
    else:
        return []
    return _release(state)


def on_step_marker(state: ArbiterState, profile: str, step_time_s: int, partition: int) -> list[Message]:
    """What `decide` does with a profile's (not final) StepCompleted of step `step_time_s` on `partition`, for a
    caller that has the marker's values and no message (the backtest's held markers: no message is built for
    them). The marker's other fields (id, times, intents) are not read by the arbiter."""
    if profile not in state.profiles:
        return []
    _step_marked(state, profile, step_time_s, False, partition)
    return _release(state)


def _step_marked(state: ArbiterState, profile: str, t: int, final: bool, partition: int) -> None:
    """A profile's marker of step `t` on `partition`: its mark raised, and finished if `final`."""
    ps = state.partitions.get(partition)
    if ps is None:  # setdefault without building a PartitionState for every marker
        ps = state.partitions[partition] = PartitionState()
    ps.marks[profile] = max(t, ps.marks.get(profile, t))
    if final:
        ps.final.add(profile)


def on_market_step(state: ArbiterState, step: Step) -> list[Message]:
    """One complete market step: what `decide` does with the step's candles and the watermark of every candle
    partition, for a caller that holds whole steps (the backtest). The same state changes, and one release
    instead of one per watermark: the earlier ones find the step incomplete and nothing else changed since
    the last release, so they release nothing."""
    t = step.time_s
    marks = state.market_marks
    for p in state.candle_partitions:
        marks[p] = max(t, marks.get(p, t))
    state.pending_closes.append((t, {c.product: c.close for c in step.candles}))
    return _release(state)


# ------------------------------------------------------------------------------------------ barriers
def _intents_low(state: ArbiterState) -> int | None:
    """The last step every enabled profile has completed on every intents partition (None: not known yet)."""
    low = _INF
    profiles = state.profiles
    for p in range(state.n_partitions):
        ps = state.partitions.get(p)
        if ps is not None and not ps.final and len(ps.marks) == len(profiles):
            # The common case: every profile marked (marks hold enabled profiles only), none finished.
            low = min(low, min(ps.marks.values()))
            continue
        for pid in profiles:
            if ps is not None and pid in ps.final:
                continue  # a finished profile sends nothing more: it holds no step back
            if ps is None or pid not in ps.marks:
                return None
            low = min(low, ps.marks[pid])
    return low


def _market_upto(state: ArbiterState) -> int:
    """The last step whose market data is complete on every candle partition."""
    low = _INF
    for p in state.candle_partitions:
        if p in state.market_finished:
            continue
        if p not in state.market_marks:
            return -_INF
        low = min(low, state.market_marks[p])
    return low


def _order_key(state: ArbiterState, item: tuple[PlaceOrder, int]) -> tuple[Any, ...]:
    i = item[0]
    return (i.step_time, state.rank.get(i.profile, 1 << 30), i.profile, i.product, i.side, i.intent_id)


_UNKNOWN = "unknown"


def _plan_for(state: ArbiterState, intent: PlaceOrder, low: int) -> PlanPublished | None | str:
    """The plan an intent is checked against: None when it needs none (manual), "stale" or "gone" when it is
    rejected without one, _UNKNOWN while it waits for the plans topic to be read."""
    if intent.reason == "manual":
        return None
    step = int(intent.step_time.timestamp())
    if intent.epoch != step // state.rotation_s[intent.profile]:
        return "stale"  # a strategy acts on a step with the plan of the step's own epoch
    known = state.plans.get(intent.profile, {})
    plan = known.get((intent.epoch, intent.plan_rotation))
    if plan is not None:
        return plan
    # A strategy evaluates (and marks complete) a step only once it has the plan of the step's epoch, so when
    # the profile completed this step the plan is on the plans topic: wait for it. A profile that finished
    # before this step never had it. A plan lost anyway (compacted away) is given up plan_wait_s of event time
    # after a later plan of the profile (docs/arbiter.md).
    reached = any(ps.marks.get(intent.profile, -_INF) >= step for ps in state.partitions.values())
    if not reached:
        return "gone"
    later = state.last_plan_epoch.get(intent.profile, -1) > intent.epoch or any(
        e == intent.epoch and r > intent.plan_rotation for e, r in known
    )
    if later and low >= step + state.settings.plan_wait_s:
        return "gone"
    return _UNKNOWN


def _release(state: ArbiterState) -> list[Message]:
    out: list[Message] = []
    low = _intents_low(state)
    market = _market_upto(state)
    if state.buffer and low is not None:
        state.buffer.sort(key=lambda it: _order_key(state, it))
        while state.buffer:
            t = int(state.buffer[0][0].step_time.timestamp())
            if t > low or t > market:
                break
            group = [it for it in state.buffer if int(it[0].step_time.timestamp()) == t]
            plans = [_plan_for(state, i, low) for i, _ in group]
            if any(p == _UNKNOWN for p in plans):
                break  # decided in order: nothing after it goes first
            del state.buffer[: len(group)]
            for i, _ in group:
                state.buffered.discard(i.intent_id)
            out.extend(_decide_step(state, t, group, plans))
    # Returns of steps no intent waits on (positions change only at decisions, all made before them).
    horizon = min(low if low is not None else -_INF, market)
    if state.buffer:
        horizon = min(horizon, int(state.buffer[0][0].step_time.timestamp()))
    _advance_returns(state, horizon)
    out.extend(_finish_partitions(state))
    return out


def _finish_partitions(state: ArbiterState) -> list[Message]:
    out: list[Message] = []
    waiting = {p for _, p in state.buffer} if state.buffer else set()
    for p in range(state.n_partitions):
        ps = state.partitions.get(p)
        # len(final) first: it holds enabled profiles only, so it is short of them until every one finished.
        if ps is None or ps.finished or len(ps.final) < len(state.profiles) or p in waiting:
            continue
        if not all(pid in ps.final for pid in state.profiles):
            continue
        ps.finished = True
        out.append(
            WorkerFinished(
                id=derived_id("finished", "arbiter", p),
                event_time=from_epoch_s(max(ps.marks.values(), default=0)),
                correlation_id="arbiter:final",
                service="arbiter",
                instance=f"partition-{p}",
                detail={
                    "counts": dict(state.counts),
                    "savings": {k: _num(v) for k, v in state.savings.items()},
                },
            )
        )
    return out


# ------------------------------------------------------------------------------------------ returns
def _advance_returns(state: ArbiterState, upto: int) -> None:
    """Per-step returns of every profile up to candle step `upto`: r = sum over its positions of
    size x (close - previous close), divided by the profile's initial balance (docs/arbiter.md)."""
    while state.pending_closes and state.pending_closes[0][0] <= upto:
        t, closes = state.pending_closes.popleft()
        for pid, pos in state.positions.items():
            pnl = ZERO
            for product, size in pos.items():
                now, before = closes.get(product), state.closes.get(product)
                if size and now is not None and before is not None:
                    pnl += size * (now - before)
            state.returns[pid].append(float(pnl / state.initial[pid]))
        state.closes.update(closes)
        state.returns_upto = t


def _mark(state: ArbiterState, product: str) -> Decimal | None:
    return state.closes.get(product) or state.reference.get(product)


def _correlation_step(state: ArbiterState, t: int, first: PlaceOrder) -> list[Message]:
    """Correlation of every pair of profiles at step t; an alert when a pair crosses the threshold or clears."""
    s = state.settings
    out: list[Message] = []
    pids = list(state.rank)
    # pearson(xs, ys) of every pair, with each profile's series centred once (the same arithmetic).
    centred = {
        pid: shared_book.centred(r) if len(r) >= max(3, s.correlation_min_steps) else None
        for pid, r in state.returns.items()
    }
    for i, older in enumerate(pids):
        for newer in pids[i + 1 :]:
            xs, ys = state.returns[older], state.returns[newer]
            a, b = centred[older], centred[newer]
            c = (
                shared_book.pearson_centred(a, b, floor=shared_book.STEP_PNL_FLOOR)
                if a is not None and b is not None and len(xs) == len(ys)
                else None
            )
            pair = (older, newer)
            state.correlations[pair] = c
            breach = c is not None and c > s.correlation_threshold
            if breach == (pair in state.breached):
                continue
            (state.breached.add if breach else state.breached.discard)(pair)
            kind: Literal["breach", "clear"] = "breach" if breach else "clear"
            out.append(
                CorrelationAlert(
                    id=derived_id("correlation", older, newer, t, kind),
                    event_time=first.event_time,
                    correlation_id=f"step:{t}",
                    intent_id=first.intent_id,
                    profile=newer,
                    other_profile=older,
                    state=kind,
                    correlation=c,
                    threshold=s.correlation_threshold,
                    window_steps=s.correlation_window_steps,
                    points=len(xs),
                    size_scale=s.correlation_size_scale,
                    step_time=from_epoch_s(t),
                )
            )
    return out


# ------------------------------------------------------------------------------------------ one step
def _decide_step(
    state: ArbiterState, t: int, group: list[tuple[PlaceOrder, int]], plans: list[PlanPublished | None | str]
) -> list[Message]:
    _advance_returns(state, t)
    alerts = _correlation_step(state, t, group[0][0])
    drafts: list[Draft] = []
    for (intent, partition), plan in zip(group, plans, strict=True):
        d = Draft(intent, partition, intent.size)
        state.reference[intent.product] = intent.reference_price
        rule_plan_echo(state, d, plan)
        if d.live and intent.side == "buy":
            rule_correlation_guard(state, d)
        if d.live and intent.side == "buy":
            rule_exposure(state, d)
        if d.live:
            rule_opposite_side(state, d, drafts)
        if d.live:
            d.cross_open = d.market
            pos = state.positions[intent.profile]
            delta = d.size if intent.side == "buy" else -d.size
            left = max(ZERO, pos.get(intent.product, ZERO) + delta)
            if left:
                pos[intent.product] = left
            else:
                pos.pop(intent.product, None)
        drafts.append(d)
    for d in drafts:
        if d.live:
            rule_crowding(state, d)
    out: list[Message] = list(alerts)
    for d in drafts:
        out.extend(_emit(state, d))
    return out


def rule_plan_echo(state: ArbiterState, d: Draft, plan: PlanPublished | None | str) -> None:
    i = d.intent
    if plan is None:
        d.details["plan_echo"] = {"skipped": "manual intent"}
        return
    if plan == "stale":
        expected = int(i.step_time.timestamp()) // state.rotation_s[i.profile]
        _reject(
            d,
            "plan_echo",
            f"{i.profile}'s intent for step {i.step_time.isoformat()} carries the plan of epoch "
            f"{i.epoch}, but that step is in epoch {expected} (stale after a rotation)",
            {"epoch": i.epoch, "step_epoch": expected, "fingerprint": i.fingerprint},
        )
        return
    if isinstance(plan, str):
        _reject(
            d,
            "plan_echo",
            f"{i.profile} has no registered plan for epoch {i.epoch}: the intent's "
            f"fingerprint {i.fingerprint[:12]} cannot be checked (forged or lost)",
            {"epoch": i.epoch, "fingerprint": i.fingerprint, "registered": None},
        )
        return
    d.plan_hash = plan.hash
    info = {"epoch": i.epoch, "fingerprint": i.fingerprint, "registered": plan.fingerprint}
    if i.fingerprint != plan.fingerprint:
        _reject(
            d,
            "plan_echo",
            f"{i.profile}'s intent carries fingerprint {i.fingerprint[:12]}, but its plan for "
            f"epoch {i.epoch} has {plan.fingerprint[:12]} (stale or forged)",
            info,
        )
    else:
        d.details["plan_echo"] = info


def rule_correlation_guard(state: ArbiterState, d: Draft) -> None:
    """A buy of the newer profile of a correlated pair is scaled down (newer: later in decision order)."""
    p = d.intent.profile
    hot = {o: state.correlations.get((o, p)) for o, n in sorted(state.breached) if n == p}
    if not hot:
        return
    scale = Decimal(str(state.settings.correlation_size_scale))
    before = d.size
    d.size = (d.size * scale).quantize(SIZE_STEP, rounding=ROUND_DOWN)
    d.details["correlation_guard"] = {
        "correlations": {o: c for o, c in hot.items()},
        "threshold": state.settings.correlation_threshold,
        "scale": float(scale),
        "size_before": _num(before),
        "size_after": _num(d.size),
    }
    _set_rule(
        d,
        "correlation_guard",
        f"size scaled by {scale} (correlation with {', '.join(sorted(hot))} "
        f"above {state.settings.correlation_threshold})",
    )
    _min_notional(state, d, "correlation_guard")


def rule_exposure(state: ArbiterState, d: Draft) -> None:
    s = state.settings
    if s.max_product_notional is None and s.max_total_notional is None:
        return
    i = d.intent
    price = _mark(state, i.product) or i.reference_price
    product_total = ZERO
    total = ZERO
    for pos in state.positions.values():
        for product, size in pos.items():
            m = _mark(state, product) or ZERO
            total += size * m
            if product == i.product:
                product_total += size * m
    room: list[tuple[Decimal, str]] = []
    if s.max_product_notional is not None:
        room.append((Decimal(str(s.max_product_notional)) - product_total, "max_product_notional"))
    if s.max_total_notional is not None:
        room.append((Decimal(str(s.max_total_notional)) - total, "max_total_notional"))
    headroom, cap = min(room)
    notional = d.size * price
    info = {
        "price": _num(price),
        "notional": _num(notional.quantize(MONEY_STEP)),
        "product_exposure": _num(product_total.quantize(MONEY_STEP)),
        "total_exposure": _num(total.quantize(MONEY_STEP)),
        "max_product_notional": s.max_product_notional,
        "max_total_notional": s.max_total_notional,
        "binding": cap,
        "headroom": _num(headroom.quantize(MONEY_STEP)),
        "action": s.exposure_action,
    }
    if notional <= headroom:
        return
    d.details["exposure_cap"] = info
    if s.exposure_action == "reject" or headroom <= 0:
        _reject(
            d,
            "exposure_cap",
            f"{i.profile} buy {i.product} of {notional:.2f} exceeds {cap} headroom {headroom:.2f}",
            info,
        )
        return
    before = d.size
    d.size = (headroom / price).quantize(SIZE_STEP, rounding=ROUND_DOWN)
    info["size_before"], info["size_after"] = _num(before), _num(d.size)
    _set_rule(d, "exposure_cap", f"trimmed from {before} to {d.size} to stay within {cap}")
    _min_notional(state, d, "exposure_cap")


def _min_notional(state: ArbiterState, d: Draft, rule: str) -> None:
    price = _mark(state, d.intent.product) or d.intent.reference_price
    floor = Decimal(str(state.settings.min_order_notional))
    if d.size <= 0 or d.size * price < floor:
        _reject(
            d,
            rule,
            f"{d.reason}; what is left ({d.size} x {price:.2f}) is below min_order_notional {floor}",
            d.details.get(rule, {}),
        )


def rule_opposite_side(state: ArbiterState, d: Draft, drafts: list[Draft]) -> None:
    """Wash-trade prevention against other profiles' live orders and recent fills; internal-cross report
    (or, with internal_cross: execute, netting against the opposite intents of the same step)."""
    i = d.intent
    if i.trigger_price is not None:
        # A protective exit: the stop or take-profit resting at the exchange was reached within its candle. A
        # trigger order that takes liquidity at its level cannot trade with another profile's market order,
        # and refusing it would leave the position unprotected: it is neither blocked nor blocking (the
        # summary reports such pairs apart, services/monitor/domain.py).
        return
    window = state.conflict_window
    book = state.book.setdefault(i.product, deque())
    # Entries are in decision order; their ends are not (order_timeout is per profile): an expired entry
    # behind a live one stays until it reaches the front, and the filter below ignores it meanwhile.
    while book and book[0].end < i.event_time - window:
        book.popleft()
    old = [
        e
        for e in book
        if e.profile != i.profile
        and e.side != i.side
        and e.end > i.event_time - window
        and e.start < i.event_time + window
    ]
    now = [
        o
        for o in drafts
        if o.live
        and o.intent.trigger_price is None
        and o.intent.product == i.product
        and o.intent.profile != i.profile
        and o.intent.side != i.side
        and o.market > 0
        and abs(o.intent.event_time - i.event_time) < window
    ]
    if not old and not now:
        return
    execute = state.settings.internal_cross == "execute" and not old
    first = old[0].profile if old else now[0].intent.profile
    # The opportunity: what of this intent could have crossed with the opposite orders, in their order.
    left = d.size
    crossed: list[tuple[str, str, Decimal, Draft | None]] = []  # (profile, intent id, quantity, draft)
    for e in old:
        q = min(left, e.cross_open)
        if q > 0:
            e.cross_open -= q
            left -= q
            crossed.append((e.profile, e.intent_id, q, None))
    for o in now:
        q = min(left, o.market if execute else o.cross_open)
        if q > 0:
            if not execute:
                o.cross_open -= q
            left -= q
            crossed.append((o.intent.profile, o.intent.intent_id, q, o))
    for other, other_intent, q, od in crossed:
        d.extra.append(_opportunity(state, d, other, other_intent, q, executed=execute))
        if execute and od is not None:
            od.internal += q
            od.counterparties.append(i.profile)
            od.details.setdefault("internal_cross", {})[i.intent_id] = _num(q)
            if od.rule == "approved":
                od.rule = "internal_cross"
                od.reason = f"{_num(od.internal)} settled internally with {', '.join(od.counterparties)}"
            d.internal += q
            d.counterparties.append(other)
    info = {
        "conflicts": [
            {
                "profile": e.profile,
                "side": e.side,
                "intent_id": e.intent_id,
                "from": e.start.isoformat(),
                "send": e.send.isoformat() if e.send is not None else None,
                "until": e.end.isoformat(),
            }
            for e in old
        ]
        + [
            {
                "profile": o.intent.profile,
                "side": o.intent.side,
                "intent_id": o.intent.intent_id,
                "from": o.intent.event_time.isoformat(),
                "until": None,
            }
            for o in now
        ],
        "conflict_window_s": window.total_seconds(),
    }
    if execute:
        d.details["internal_cross"] = {
            **info,
            "internal_size": _num(d.internal),
            "market_size": _num(d.market),
        }
        _set_rule(
            d,
            "internal_cross",
            f"{i.profile} {i.side} {i.product}: {_num(d.internal)} settled internally "
            f"with {', '.join(d.counterparties)} at the mid price",
        )
        d.conflicting = first
        return
    reason = (
        f"{i.profile} {i.side} {i.product} conflicts with {first} "
        f"{'buy' if i.side == 'sell' else 'sell'} within conflict_window_s={window.total_seconds():g} "
        f"(order working until send + order_timeout, or its recent fill)"
    )
    _reject(d, "opposite_side", reason, info)
    d.conflicting = first


def _opportunity(
    state: ArbiterState, d: Draft, other: str, other_intent: str, q: Decimal, *, executed: bool
) -> Message:
    i = d.intent
    price = i.reference_price
    notional = q * price
    fee = (notional * 2 * Decimal(str(state.execution.taker_fee_rate))).quantize(MONEY_STEP)
    slip = (notional * (state.slippage[i.profile] + state.slippage.get(other, ZERO))).quantize(MONEY_STEP)
    buyer, seller = (i.profile, other) if i.side == "buy" else (other, i.profile)
    buy_id, sell_id = (i.intent_id, other_intent) if i.side == "buy" else (other_intent, i.intent_id)
    for k, v in (("fees", fee), ("slippage", slip), ("total", fee + slip)):
        state.savings[k] = state.savings.get(k, ZERO) + v
    state.savings["opportunities"] = state.savings.get("opportunities", ZERO) + 1
    return InternalCrossOpportunity(
        id=derived_id("internal-cross", i.intent_id, other_intent),
        event_time=i.event_time,
        correlation_id=i.correlation_id,
        causation_id=i.id,
        intent_id=i.intent_id,
        profile=i.profile,
        product=i.product,
        buyer=buyer,
        seller=seller,
        buy_intent_id=buy_id,
        sell_intent_id=sell_id,
        size=q,
        price=price,
        fee_saving=fee,
        slippage_saving=slip,
        saving=fee + slip,
        executed=executed,
        step_time=i.step_time,
    )


def rule_crowding(state: ArbiterState, d: Draft) -> None:
    """Send the order's market part at least min_cross_profile_gap_ms away from other profiles' orders on the
    product: its send time is not_before + the worker's de-sync delay, so not_before is moved if needed."""
    i = d.intent
    if d.market <= 0:
        d.not_before = i.event_time  # settled internally: nothing goes to the exchange
        return
    ex = state.execution
    seed = d.plan_hash or state.base_hash[i.profile]
    delay = desync_delay_ms(seed, i.intent_id, ex.desync_min_ms, ex.desync_max_ms)
    gap = state.settings.min_cross_profile_gap_ms
    start = _ms(i.event_time)
    sends = state.sends.setdefault(i.product, deque())
    while sends and sends[0][1] < start - gap - ex.desync_max_ms - 60_000:
        sends.popleft()
    natural = start + delay
    t = natural
    for s in sorted(s for p, s in sends if p != i.profile):
        if s - gap < t < s + gap:
            t = s + gap
    sends.append((i.profile, t))
    d.not_before = _from_ms(t - delay)
    d.send = _from_ms(t)
    # Live until its latest possible end: the paper exchange may fill it until send + order_timeout.
    if i.trigger_price is None:  # a protective exit blocks nobody (rule_opposite_side)
        state.book.setdefault(i.product, deque()).append(
            BookEntry(
                i.profile,
                i.side,
                i.event_time,
                d.send + state.order_timeout[i.profile],
                i.intent_id,
                d.market,
                d.cross_open,
                send=d.send,
            )
        )
    if t != natural:
        d.details["crowding"] = {
            "delay_ms": delay,
            "natural_send": _from_ms(natural).isoformat(),
            "send": d.send.isoformat(),
            "pushed_ms": t - natural,
            "min_cross_profile_gap_ms": gap,
        }
        d.verdict = "delayed"
        prior = "" if d.rule == "approved" else f"{d.reason}; "
        d.rule, d.reason = (
            "crowding",
            f"{prior}sent {t - natural} ms later to keep {gap} ms from other profiles' orders",
        )


def _set_rule(d: Draft, rule: str, reason: str) -> None:
    d.reason = reason if d.rule == "approved" else f"{d.reason}; {reason}"
    d.rule = rule


def _reject(d: Draft, rule: str, reason: str, info: dict[str, Any]) -> None:
    d.verdict, d.rule, d.reason = "rejected", rule, reason
    d.details[rule] = info


# ------------------------------------------------------------------------------------------ output
def _emit(state: ArbiterState, d: Draft) -> list[Message]:
    i = d.intent
    d.details.setdefault("priority", state.profiles.get(i.profile))
    decision = OrderDecided(
        id=derived_id("decision", i.intent_id),
        event_time=i.event_time,
        correlation_id=i.correlation_id,
        causation_id=i.id,
        intent_id=i.intent_id,
        profile=i.profile,
        product=i.product,
        side=i.side,
        size=d.size if d.live else i.size,
        verdict=d.verdict,
        rule=d.rule,
        reason=d.reason,
        conflicting_profile=d.conflicting,
        not_before=d.not_before if d.verdict == "delayed" else None,
        requested_size=i.size if d.live and d.size != i.size else None,
        details=d.details,
    )
    msgs: list[Message] = [decision]
    if d.live:
        msgs.append(
            ExecuteOrder(
                id=derived_id("execute", i.intent_id),
                event_time=i.event_time,
                correlation_id=i.correlation_id,
                causation_id=i.id,
                intent_id=i.intent_id,
                client_order_id=client_order_id(i.intent_id),
                profile=i.profile,
                product=i.product,
                side=i.side,
                size=d.size,
                reference_price=i.reference_price,
                reason=i.reason,
                intent_reason=i.reason,
                step_time=i.step_time,
                not_before=d.not_before or i.event_time,
                internal_size=d.internal,
                counterparties=d.counterparties,
                profile_hash=d.plan_hash,
                trigger_price=i.trigger_price,
                trigger_candle=i.trigger_candle,
            )
        )
    msgs.extend(d.extra)
    state.decided[i.intent_id] = msgs
    key = f"{d.verdict}:{d.rule}"
    state.counts[key] = state.counts.get(key, 0) + 1
    return list(msgs)
