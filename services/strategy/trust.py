"""Which order events a strategy worker may book: the rules it applies before an outcome reaches its books
(services/strategy/domain.py books what passes). shared/book.py holds the fill check itself (`check_fill`, the
report's rule); this module holds when and against what the worker checks.

Fills of its own intents: a fill that contradicts the intent it answers (another product or side, fills adding
up to more than the intent's size; a duplicate order's fill is real, outside that size) is refused.

Outcomes of intents this state never sends (manual orders: `mpctl.router` sends a `PlaceOrder` with reason
`manual` through the arbiter) are trusted only when the arbiter approved them: an `OrderDecided` of this
profile approving the intent, with the same product and side, and fills never exceeding its size in total.
Such an outcome is judged before the first step closing after its event time (an outcome of our own intents
is never older than the close of the step that sent them, so by then it cannot be ours): applied if approved;
dead-lettered (`StrategyState.refused`, drained by the worker) if inconsistent with the decision; held while no
decision is known, and dead-lettered once `decision_wait_steps` further steps closed without one. The
decision is written before its fills (the arbiter writes it before it hands the order to execution), but it
travels on orders.decisions, only the arbiter can write, and the fills on orders.events: a worker may read
either first. A decision read first is kept (`hold`) until the fill comes; a fill read first waits for it; the
wait also covers a decision whose write was delayed (broker retry, arbiter fail-over).

The rules read and write only the fields of the strategy's state that `TrustState` names (the state is
snapshotted as one dataclass, so they stay there); booking an accepted outcome is the caller's `apply`, called
in the order the outcomes are judged (a redelivered fill is recognised by what the earlier ones booked).
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from shared.aligner import Step
from shared.book import Order, check_fill
from shared.messages import OrderDecided, OrderFilled, OrderUpdated
from shared.native import reduce_frozen

log = logging.getLogger(__name__)

Outcome = OrderDecided | OrderUpdated | OrderFilled


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class Refusal:
    """An outcome the state refused (it moves no books): the worker dead-letters the record it came in."""

    outcome: Outcome
    reason: str

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


class TrustState(Protocol):
    """The fields of services.strategy.domain.StrategyState these rules use (described there)."""

    profile_id: str
    seen_fills: set[str]
    own_orders: dict[str, tuple[str, str, Decimal]]
    own_filled: dict[str, Decimal]
    held: dict[str, list[Outcome]]
    held_times: list[tuple[float, int, str]]
    held_seq: int
    decisions: dict[str, OrderDecided]
    decided_filled: dict[str, Decimal]
    awaiting: dict[str, tuple[int, list[Outcome]]]
    decision_wait_steps: int
    refused: list[Refusal]


def refuse(state: TrustState, o: Outcome, reason: str) -> None:
    log.warning("%s", reason)
    state.refused.append(Refusal(o, reason))


def take_refused(state: TrustState) -> list[Refusal]:
    """The outcomes refused since the last call (the worker dead-letters them)."""
    out, state.refused = state.refused, []
    return out


def awaits(state: TrustState, intent_id: str) -> bool:
    """Outcomes of this intent are still held (not yet applied or refused)."""
    return intent_id in state.held or intent_id in state.awaiting


def hold(state: TrustState, o: Outcome) -> None:
    """An outcome of an intent this state has not sent (yet): held until the state sends that intent (a
    rebuild reads outcomes ahead of the steps) or `release_foreign` judges it. A decision is held too (it may
    answer an intent not re-emitted yet), and the first one per intent is what its outcomes are judged by."""
    if isinstance(o, OrderDecided):
        state.decisions.setdefault(o.intent_id, o)
    held = state.held.get(o.intent_id)
    if held is None:
        held = state.held[o.intent_id] = []
        state.held_seq += 1
        heapq.heappush(state.held_times, (o.event_time.timestamp(), state.held_seq, o.intent_id))
    held.append(o)


def release_foreign(state: TrustState, step: Step, apply: Callable[[Outcome], None]) -> None:
    """Judge held outcomes older than the step's close: an outcome of one of our intents is never older than
    the close of the step that sent it, so these answer no intent of ours (e.g. a manual order)."""
    before_s = step.close_s
    times = state.held_times
    while times and times[0][0] < before_s:
        _, _, intent_id = heapq.heappop(times)
        outcomes = state.held.pop(intent_id, [])
        waiting = state.awaiting.get(intent_id)
        if waiting is not None:
            waiting[1].extend(outcomes)
        else:
            # The wait counts whole steps from the first one that could judge it.
            deadline = before_s + state.decision_wait_steps * step.interval_s
            state.awaiting[intent_id] = (deadline, outcomes)
    if state.awaiting:
        for intent_id in list(state.awaiting):
            deadline, outcomes = state.awaiting[intent_id]
            decision = state.decisions.get(intent_id)
            if decision is None and before_s < deadline:
                continue  # the decision may still come
            del state.awaiting[intent_id]
            for o in outcomes:
                _judge_foreign(state, o, decision, apply)


def _judge_foreign(
    state: TrustState, o: Outcome, decision: OrderDecided | None, apply: Callable[[Outcome], None]
) -> None:
    """Apply an outcome of an intent this state did not send if the arbiter approved it, else refuse it."""
    if isinstance(o, OrderDecided):
        apply(o)  # a decision moves no books
        return
    if isinstance(o, OrderFilled) and o.fill_id in state.seen_fills:
        return  # a redelivered copy of an applied fill: counted once, as for our own
    what = (
        f"{type(o).__name__} {o.id} ({o.side} {o.size} {o.product}) of {o.profile} for intent {o.intent_id}"
    )
    reason: str | None = None
    if decision is None:
        reason = (
            f"{what} refused: it is not an intent of this worker and no OrderDecided of {state.profile_id} for it "
            f"was seen within {state.decision_wait_steps} steps after its event time {o.event_time.isoformat()} "
            "(a manual order is decided by the arbiter before it is executed)"
        )
    elif decision.verdict == "rejected":
        reason = f"{what} refused: the arbiter rejected that intent ({decision.rule}: {decision.reason})"
    elif (o.product, o.side) != (decision.product, decision.side):
        reason = f"{what} refused: {o.side} {o.product} does not match the approved {decision.side} {decision.product}"
    elif isinstance(o, OrderFilled):
        # shared/book.py's rule (the report's): a fill adds to what the intent has filled, except a duplicate
        # order's fill (OrderFilled.duplicate_of), which is outside the intent's size.
        approved = Order(decision.product, decision.side, decision.size)
        verdict, total = check_fill(o, approved, state.decided_filled.get(o.intent_id, Decimal(0)))
        if verdict == "over_size":
            reason = f"{what} refused: fills of {total} would exceed the approved size {decision.size}"
        else:
            state.decided_filled[o.intent_id] = total
    elif o.filled_size > decision.size:  # an order event states its filled size as a whole
        reason = f"{what} refused: fills of {o.filled_size} would exceed the approved size {decision.size}"
    if reason is None:
        apply(o)
    else:
        refuse(state, o, reason)


def contradicts_own(state: TrustState, f: OrderFilled) -> str | None:
    """Why a fill of one of our intents cannot be real (None when it is consistent), counting it if it is."""
    if f.fill_id in state.seen_fills:
        return None  # a redelivered copy: the books count it once
    asked = state.own_orders.get(f.intent_id)
    if asked is None:
        return None  # every emitted intent is recorded; nothing to compare against otherwise
    product, side, size = asked
    what = f"OrderFilled {f.id} ({f.side} {f.size} {f.product}) of {f.profile} for its intent {f.intent_id}"
    # shared/book.py's rule, against what we asked (a duplicate order's fill is real, outside the intent's size).
    verdict, total = check_fill(f, Order(product, side, size), state.own_filled.get(f.intent_id, Decimal(0)))
    if verdict == "mismatch":
        return f"{what} refused: the intent was {side} {product}"
    if verdict == "over_size":
        return f"{what} refused: fills of {total} would exceed the intent's size {size}"
    if verdict == "counted":
        state.own_filled[f.intent_id] = total
    return None
