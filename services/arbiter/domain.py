"""Cross-profile arbitration, pure: `decide(state, message, partition) -> messages`.

Intents are keyed by product, so one partition holds every intent of a product and one arbiter instance
decides them in order. Intents of one event-time step are held until every enabled profile has marked that
step complete on the partition (StepCompleted), then decided in the order (step, priority, profile, product):
when two profiles conflict, the higher-priority one is served, whatever order the strategies ran in.

Rule `opposite_side` (wash-trade prevention): an intent is rejected when another profile has an approved
order on the same product, on the other side, within `conflict_window_s` of it (event time). The decision
names both profiles. An approved order counts as live from its approval for the whole window, whether or
not it filled, which is the conservative reading.

A redelivered intent (same intent id) gets the decision it got the first time, re-published unchanged.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from shared.clock import derived_id, from_epoch_s
from shared.config import AppConfig
from shared.messages import ExecuteOrder, Message, OrderDecided, PlaceOrder, StepCompleted, WorkerFinished


def client_order_id(intent_id: str) -> str:
    """A UUID derived from the intent id: the same intent always maps to the same exchange order."""
    return str(_uuid(derived_id("client-order", intent_id)))


def _uuid(hex32: str) -> str:
    return f"{hex32[:8]}-{hex32[8:12]}-{hex32[12:16]}-{hex32[16:20]}-{hex32[20:32]}"


@dataclass(frozen=True)
class BookEntry:
    profile: str
    side: str
    time: datetime
    intent_id: str


@dataclass
class PartitionState:
    marks: dict[str, int] = field(default_factory=dict)  # profile -> last completed step (epoch s)
    final: set[str] = field(default_factory=set)
    buffer: list[PlaceOrder] = field(default_factory=list)
    finished: bool = False


@dataclass
class ArbiterState:
    profiles: dict[str, int]  # enabled profile -> priority
    conflict_window: timedelta
    partitions: dict[int, PartitionState] = field(default_factory=dict)
    decided: dict[str, list[Message]] = field(default_factory=dict)
    book: dict[str, deque[BookEntry]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def new_state(cfg: AppConfig) -> ArbiterState:
    return ArbiterState(
        profiles={pid: p.priority for pid, p in cfg.enabled_profiles().items()},
        conflict_window=timedelta(seconds=cfg.system.arbiter.conflict_window_s),
    )


def decide(state: ArbiterState, msg: Message, partition: int) -> list[Message]:
    ps = state.partitions.setdefault(partition, PartitionState())
    if isinstance(msg, PlaceOrder):
        if msg.intent_id in state.decided:
            return list(state.decided[msg.intent_id])  # redelivery: same decision again
        if msg.profile not in state.profiles:
            return _record(state, msg, _decision(msg, "rejected", "unknown_profile",
                                                 f"profile {msg.profile!r} is not an enabled profile"))
        if any(i.intent_id == msg.intent_id for i in ps.buffer):
            return []
        ps.buffer.append(msg)
        return _release(state, ps, partition)
    if isinstance(msg, StepCompleted):
        if msg.profile in state.profiles:
            t = int(msg.step_time.timestamp())
            ps.marks[msg.profile] = max(t, ps.marks.get(msg.profile, t))
            if msg.final:
                ps.final.add(msg.profile)
        return _release(state, ps, partition)
    return []


def _release(state: ArbiterState, ps: PartitionState, partition: int) -> list[Message]:
    out: list[Message] = []
    live = [p for p in state.profiles if p not in ps.final]
    low = None if any(p not in ps.marks for p in live) else min((ps.marks[p] for p in live), default=None)
    ready: list[PlaceOrder] = []
    keep: list[PlaceOrder] = []
    for i in ps.buffer:
        t = int(i.step_time.timestamp())
        # A finished profile sends nothing more, so only live profiles hold a step back.
        if (low is not None and t <= low) or not live:
            ready.append(i)
        else:
            keep.append(i)
    ps.buffer = keep
    ready.sort(key=lambda i: (i.step_time, state.profiles.get(i.profile, 1 << 30), i.profile, i.product, i.side))
    for intent in ready:
        out.extend(_decide_one(state, intent))
    if not live and not ps.buffer and not ps.finished:
        ps.finished = True
        out.append(
            WorkerFinished(
                id=derived_id("finished", "arbiter", partition),
                event_time=from_epoch_s(max(ps.marks.values(), default=0)),
                correlation_id="arbiter:final",
                service="arbiter",
                instance=f"partition-{partition}",
                detail={"counts": dict(state.counts)},
            )
        )
    return out


def _decide_one(state: ArbiterState, intent: PlaceOrder) -> list[Message]:
    book = state.book.setdefault(intent.product, deque())
    horizon = intent.event_time - state.conflict_window
    while book and book[0].time < horizon:
        book.popleft()
    for e in book:
        if e.profile != intent.profile and e.side != intent.side and abs(intent.event_time - e.time) < state.conflict_window:
            reason = (
                f"{intent.profile} {intent.side} {intent.product} conflicts with {e.profile} {e.side} "
                f"approved at {e.time.isoformat()} (within conflict_window_s={state.conflict_window.total_seconds():g})"
            )
            return _record(state, intent, _decision(intent, "rejected", "opposite_side", reason, e.profile))
    book.append(BookEntry(intent.profile, intent.side, intent.event_time, intent.intent_id))
    decision = _decision(intent, "approved", "approved", "no conflict")
    order = ExecuteOrder(
        id=derived_id("execute", intent.intent_id),
        event_time=intent.event_time,
        correlation_id=intent.correlation_id,
        causation_id=intent.id,
        intent_id=intent.intent_id,
        client_order_id=client_order_id(intent.intent_id),
        profile=intent.profile,
        product=intent.product,
        side=intent.side,
        size=intent.size,
        reference_price=intent.reference_price,
        reason=intent.reason,
        step_time=intent.step_time,
        not_before=intent.event_time,
    )
    return _record(state, intent, decision, order)


def _decision(
    intent: PlaceOrder, verdict: str, rule: str, reason: str, other: str | None = None
) -> OrderDecided:
    return OrderDecided(
        id=derived_id("decision", intent.intent_id),
        event_time=intent.event_time,
        correlation_id=intent.correlation_id,
        causation_id=intent.id,
        intent_id=intent.intent_id,
        profile=intent.profile,
        product=intent.product,
        side=intent.side,
        size=intent.size,
        verdict=verdict,
        rule=rule,
        reason=reason,
        conflicting_profile=other,
    )


def _record(state: ArbiterState, intent: PlaceOrder, *msgs: Message) -> list[Message]:
    state.decided[intent.intent_id] = list(msgs)
    first = msgs[0]
    assert isinstance(first, OrderDecided)
    key = f"{first.verdict}:{first.rule}"
    state.counts[key] = state.counts.get(key, 0) + 1
    return list(msgs)
