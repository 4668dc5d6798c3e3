"""One profile's trading decisions, as a pure state machine: `decide(state, message, now) -> messages`.

Inputs: complete event-time steps of candles (see shared/aligner.py), the profile's plans, and the outcomes
of its own orders. A step is evaluated only when (a) the plan of its epoch is known and (b) every intent of
earlier steps has a final outcome (filled, cancelled or rejected). So the position a decision sees is
exactly the one a live trader would have, whatever order Kafka delivers the topics in: replay is deterministic.

Long-only spot: a buy opens a position, a sell closes it. Exits (stop loss, take profit, signal reversal) come
before entries; entries need the blended signal and confidence above the profile's thresholds and the
market's volatility between `entropy_threshold` (per candle) and `volatility_threshold` (annualised).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from typing import Literal

from services.strategy.signals import Bar, ProductSignals, Signal, blend
from shared.aligner import Aligner, Step
from shared.clock import derived_id, from_epoch_s
from shared.config import Profile
from shared.messages import (
    TERMINAL_STATUSES,
    CandleClosed,
    Message,
    OrderDecided,
    OrderFilled,
    OrderUpdated,
    PlaceOrder,
    PlanPublished,
    ProfileHalted,
    ReplayFinished,
    StepCompleted,
    WatermarkAdvanced,
    WorkerFinished,
)
from shared.strategy_catalog import CATALOG

log = logging.getLogger(__name__)

SIZE_STEP = Decimal("0.00000001")
MIN_NOTIONAL = Decimal("1")
Reason = Literal["entry", "exit_signal", "stop_loss", "take_profit", "manual", "flatten"]


@dataclass
class Position:
    size: Decimal
    avg_price: Decimal


@dataclass
class StrategyState:
    profile_id: str
    profile: Profile
    quote: str
    aligner: Aligner
    cash: Decimal
    initial_equity: Decimal
    positions: dict[str, Position] = field(default_factory=dict)
    plans: dict[int, PlanPublished] = field(default_factory=dict)
    signals: dict[str, ProductSignals] = field(default_factory=dict)
    marks: dict[str, Decimal] = field(default_factory=dict)
    pending: dict[str, PlaceOrder] = field(default_factory=dict)
    queue: deque[Step] = field(default_factory=deque)
    seen_fills: set[str] = field(default_factory=set)
    realized_pnl: Decimal = Decimal(0)
    fees: Decimal = Decimal(0)
    high_water: Decimal = Decimal(0)
    day: int | None = None
    day_start_equity: Decimal = Decimal(0)
    halted: str | None = None  # drawdown halt: until a resume command
    entries_paused_day: int | None = None  # daily-loss halt: until the next UTC day
    steps_done: int = 0
    last_step_s: int | None = None
    finished: bool = False
    intents_sent: int = 0

    def equity(self) -> Decimal:
        return self.cash + sum((p.size * self.marks.get(prod, p.avg_price) for prod, p in self.positions.items()), Decimal(0))


def new_state(profile_id: str, profile: Profile, quote: str, partitions: frozenset[int]) -> StrategyState:
    cash = Decimal(str(profile.paper.initial_quote_balance))
    return StrategyState(
        profile_id=profile_id,
        profile=profile,
        quote=quote,
        aligner=Aligner(partitions),
        cash=cash,
        initial_equity=cash,
        high_water=cash,
    )


def decide(state: StrategyState, msg: Message, now_partition: int = 0) -> list[Message]:
    """Apply one input message; return the messages to publish (intents, step markers, halts, finish)."""
    if isinstance(msg, CandleClosed | WatermarkAdvanced | ReplayFinished):
        for step in state.aligner.add(now_partition, msg):
            state.queue.append(step)
    elif isinstance(msg, PlanPublished):
        if msg.profile == state.profile_id:
            state.plans[msg.epoch] = msg
    elif isinstance(msg, OrderDecided):
        if msg.profile == state.profile_id and msg.verdict == "rejected":
            state.pending.pop(msg.intent_id, None)
    elif isinstance(msg, OrderFilled):
        if msg.profile == state.profile_id:
            _apply_fill(state, msg)
    elif isinstance(msg, OrderUpdated) and msg.profile == state.profile_id and msg.status in TERMINAL_STATUSES:
        state.pending.pop(msg.intent_id, None)
    return _drain(state)


def _apply_fill(state: StrategyState, f: OrderFilled) -> None:
    if f.fill_id in state.seen_fills:
        return  # redelivered fill: counted once
    state.seen_fills.add(f.fill_id)
    state.fees += f.fee
    notional = f.size * f.price
    pos = state.positions.get(f.product)
    if f.side == "buy":
        state.cash -= notional + f.fee
        if pos is None:
            state.positions[f.product] = Position(f.size, f.price)
        else:
            total = pos.size + f.size
            pos.avg_price = (pos.avg_price * pos.size + notional) / total
            pos.size = total
    else:
        state.cash += notional - f.fee
        if pos is not None:
            sold = min(pos.size, f.size)
            state.realized_pnl += (f.price - pos.avg_price) * sold
            pos.size -= sold
            if pos.size <= 0:
                del state.positions[f.product]


def _plan_for(state: StrategyState, step: Step) -> PlanPublished | None:
    interval = state.profile.profile_hash.hash_rotation_interval
    return state.plans.get(step.time_s // interval)


def _drain(state: StrategyState) -> list[Message]:
    out: list[Message] = []
    while state.queue and not state.pending:
        step = state.queue[0]
        plan = _plan_for(state, step)
        if plan is None:
            break  # the registry has not published this epoch's plan yet
        state.queue.popleft()
        out.extend(_evaluate_step(state, step, plan))
    if state.aligner.finished and not state.queue and not state.pending and not state.finished:
        state.finished = True
        t = from_epoch_s(state.last_step_s or 0)
        out.append(
            StepCompleted(
                id=derived_id("final", state.profile_id),
                event_time=t,
                correlation_id=f"{state.profile_id}:final",
                profile=state.profile_id,
                step_time=t,
                intents=0,
                final=True,
            )
        )
        out.append(
            WorkerFinished(
                id=derived_id("finished", "strategy", state.profile_id),
                event_time=t,
                correlation_id=f"{state.profile_id}:final",
                service="strategy",
                instance=state.profile_id,
                detail={"steps": state.steps_done, "intents": state.intents_sent},
            )
        )
    return out


def _evaluate_step(state: StrategyState, step: Step, plan: PlanPublished) -> list[Message]:
    p = state.profile
    sc, rm = p.strategy_config, p.risk_management
    close_t = from_epoch_s(step.close_s)
    corr = f"step:{step.time_s}"
    for c in step.candles:
        ps = state.signals.get(c.product)
        if ps is None:
            ps = state.signals[c.product] = ProductSignals(step.interval_s)
        ps.update(
            Bar(step.time_s, float(c.open), float(c.high), float(c.low), float(c.close), float(c.volume))
        )
        state.marks[c.product] = c.close
    state.steps_done += 1
    state.last_step_s = step.time_s
    out: list[Message] = []

    equity = state.equity()
    state.high_water = max(state.high_water, equity)
    day = step.close_s // 86400
    if state.day != day:
        state.day = day
        state.day_start_equity = equity
    out.extend(_risk_halts(state, equity, day, corr))

    tunables = {name: dict(spec.tunable) for name, spec in CATALOG.items()}
    tunables[plan.strategy] = {k: v for k, v in plan.parameters.items() if k in CATALOG[plan.strategy].tunable}
    weights: dict[str, float] = {str(k): v for k, v in sc.strategy_weights.items()}

    def blended(product: str) -> Signal | None:
        ps = state.signals.get(product)
        if ps is None:
            return None
        return blend(plan.strategy, ps.evaluate(plan.strategy, tunables), weights, plan.blend_weight)

    present = {c.product for c in step.candles}
    intents: list[PlaceOrder] = []
    # Exits first: they free slots and never wait on the market regime.
    for product in sorted(state.positions):
        pos = state.positions[product]
        if product not in present:
            continue
        price = state.marks[product]
        change_pct = (price / pos.avg_price - 1) * 100
        reason: Reason | None = None
        exit_sig: Signal | None = None  # the signal behind an exit_signal, recorded on the intent
        if change_pct <= -Decimal(str(rm.stop_loss_pct)):
            reason = "stop_loss"
        elif change_pct >= Decimal(str(rm.take_profit_pct)):
            reason = "take_profit"
        else:
            sig = blended(product)
            if sig is not None and sig.value <= -sc.signal_strength_threshold:
                reason, exit_sig = "exit_signal", sig
        if reason is not None:
            intents.append(_intent(state, plan, step, product, "sell", pos.size, price, reason, exit_sig))

    if state.halted is None and state.entries_paused_day != day:
        slots = p.trading_params.max_open_positions - len(state.positions)
        candidates: list[tuple[float, str, Signal]] = []
        for product in plan.products:
            if product in state.positions or product not in present or slots <= 0:
                continue
            ps = state.signals[product]
            per_candle, annual = ps.volatility.per_candle(), ps.volatility.annualised()
            if per_candle is None or annual is None:
                continue
            if per_candle < sc.entropy_threshold or annual > p.risk_management.volatility_threshold:
                continue  # a flat market has nothing to trade; a wild one is outside the profile's risk
            sig = blended(product)
            if sig is None:
                continue
            if sig.value >= sc.signal_strength_threshold and sig.confidence >= sc.confidence_threshold:
                candidates.append((-sig.value, product, sig))
        for _, product, sig in sorted(candidates)[: max(0, slots)]:
            price = state.marks[product]
            budget = equity * Decimal(str(sc.max_position_size_pct / 100 * sig.confidence / sc.risk_adjustment_factor))
            budget = min(budget, state.cash * Decimal("0.98"))  # keep room for fee and slippage
            size = (budget / price).quantize(SIZE_STEP, rounding=ROUND_DOWN)
            if size <= 0 or size * price < MIN_NOTIONAL:
                continue
            intents.append(_intent(state, plan, step, product, "buy", size, price, "entry", sig))

    for i in intents:
        state.pending[i.intent_id] = i
    state.intents_sent += len(intents)
    out.extend(intents)
    out.append(
        StepCompleted(
            id=derived_id("step", state.profile_id, step.time_s),
            event_time=close_t,
            correlation_id=corr,
            profile=state.profile_id,
            step_time=from_epoch_s(step.time_s),
            intents=len(intents),
        )
    )
    return out


def _risk_halts(state: StrategyState, equity: Decimal, day: int, corr: str) -> list[Message]:
    rm = state.profile.risk_management
    out: list[Message] = []
    assert state.last_step_s is not None
    when = from_epoch_s(state.last_step_s)
    if state.halted is None and state.high_water > 0:
        dd_pct = (state.high_water - equity) / state.high_water * 100
        if dd_pct >= Decimal(str(rm.max_drawdown_pct)):
            state.halted = f"drawdown {dd_pct:.2f}% >= max_drawdown_pct {rm.max_drawdown_pct}"
            out.append(_halt(state, state.halted, None, when, corr))
    if state.entries_paused_day != day and state.day_start_equity > 0:
        loss_pct = (state.day_start_equity - equity) / state.day_start_equity * 100
        if loss_pct >= Decimal(str(rm.max_daily_loss_pct)):
            state.entries_paused_day = day
            reason = f"daily loss {loss_pct:.2f}% >= max_daily_loss_pct {rm.max_daily_loss_pct}"
            out.append(_halt(state, reason, from_epoch_s((day + 1) * 86400), when, corr))
    return out


def _halt(state: StrategyState, reason: str, until: datetime | None, when: datetime, corr: str) -> ProfileHalted:
    return ProfileHalted(
        id=derived_id("halt", state.profile_id, when.isoformat(), reason.split(" ")[0]),
        event_time=when,
        correlation_id=corr,
        profile=state.profile_id,
        reason=reason,
        until=until,
    )


def _intent(
    state: StrategyState,
    plan: PlanPublished,
    step: Step,
    product: str,
    side: Literal["buy", "sell"],
    size: Decimal,
    price: Decimal,
    reason: Reason,
    sig: Signal | None,
) -> PlaceOrder:
    intent_id = derived_id("intent", state.profile_id, product, step.time_s, side)
    return PlaceOrder(
        id=intent_id,
        event_time=from_epoch_s(step.close_s),
        correlation_id=f"step:{step.time_s}",
        intent_id=intent_id,
        profile=state.profile_id,
        product=product,
        side=side,
        size=size,
        reference_price=price,
        reason=reason,
        fingerprint=plan.fingerprint,
        epoch=plan.epoch,
        step_time=from_epoch_s(step.time_s),
        priority=state.profile.priority,
        signal=max(-1.0, min(1.0, sig.value)) if sig else 0.0,
        confidence=max(0.0, min(1.0, sig.confidence)) if sig else 0.0,
    )

