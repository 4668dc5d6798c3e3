"""One profile's state machine (services/strategy/domain.py), driven by synthetic candles and plans.

The market paths are synthetic: `zigzag` is a choppy up-trend (per-candle volatility ~0.4 %, ~38 %/year on
hourly candles: between the config's entropy_threshold and volatility_threshold). The signal models need 49
candles before every strategy is warm, so tests that need entries run 60+ steps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.strategy.domain import MarketSignals, StrategyState, decide, new_state, on_step, take_refused
from services.strategy.signals import Bar, VolatilityTracker
from shared.aligner import Step
from shared.config import AppConfig, Profile
from shared.messages import (
    CandleClosed,
    FeedStateChanged,
    Message,
    OrderDecided,
    OrderFilled,
    PlaceOrder,
    PlanPublished,
    ProfileHalted,
    StepCompleted,
    WatermarkAdvanced,
    WorkerFinished,
)
from tests.unit.builders import (
    DAY,
    HOUR,
    T0,
    D,
    approval_of,
    candle,
    config,
    decided,
    dt,
    fill_for,
    manual_fill,
    of_type,
    order_filled,
    order_updated,
    path_candles,
    plan,
    plans_covering,
    replay_finished,
    step_messages,
    tune,
    zigzag,
)

PID = "profile_a"
Responder = Callable[[PlaceOrder], list[Message]]


@pytest.fixture(scope="module")
def cfg() -> AppConfig:
    return config()


@pytest.fixture(scope="module")
def profile(cfg: AppConfig) -> Profile:
    return cfg.profiles[PID]


def open_thresholds(p: Profile, signal: float = 0.0, confidence: float = 0.0) -> Profile:
    return tune(p, strategy_config={"signal_strength_threshold": signal, "confidence_threshold": confidence})


def fresh(p: Profile, pid: str = PID) -> StrategyState:
    return new_state(pid, p, "USDC", frozenset({0}))


def fill(i: PlaceOrder) -> list[Message]:
    return fill_for(i)


def reject(i: PlaceOrder) -> list[Message]:
    return [decided(i, "rejected", "test")]


def feed(state: StrategyState, msgs: Sequence[Message], respond: Responder | None = None) -> list[Message]:
    """Feed messages in order; `respond` answers every intent right away (like the arbiter + execution)."""
    out: list[Message] = []
    todo: deque[Message] = deque(msgs)
    while todo:
        produced = decide(state, todo.popleft(), 0)
        out.extend(produced)
        if respond is not None:
            replies = [r for i in of_type(produced, PlaceOrder) for r in respond(i)]
            todo.extendleft(reversed(replies))
    return out


def plans_for(p: Profile, start: int, steps: int, pid: str = PID, **kw: Any) -> list[PlanPublished]:
    return plans_covering(pid, start, start + steps * HOUR, p.profile_hash.hash_rotation_interval, **kw)


def steps_done(out: list[Message]) -> list[int]:
    return [int(m.step_time.timestamp()) for m in of_type(out, StepCompleted) if not m.final]


def buys(out: list[Message]) -> list[PlaceOrder]:
    return [i for i in of_type(out, PlaceOrder) if i.side == "buy"]


def hold(product: str, size: Any, price: Any) -> list[Message]:
    """A position the profile already holds (an approved manual fill it receives before the steps)."""
    return manual_fill(PID, "buy", product=product, size=size, price=price, at=T0 - 10 * DAY)


# ------------------------------------------------------------------------------------------ plans gate steps
def test_no_step_evaluated_before_its_epoch_plan_then_catches_up(profile: Profile) -> None:
    assert profile.profile_hash.hash_rotation_interval == HOUR  # one epoch per hourly step
    state = fresh(profile)
    market = step_messages(path_candles("BTC/USDC", [100, 101, 102]))
    assert of_type(feed(state, market), StepCompleted) == []
    assert feed(state, [plan(PID, (T0 + HOUR) // HOUR)]) == []  # the plan of step 1 cannot release step 0
    assert feed(state, [plan("profile_b", T0 // HOUR)]) == []  # another profile's plan is not ours
    assert steps_done(feed(state, [plan(PID, T0 // HOUR)])) == [T0, T0 + HOUR]
    assert steps_done(feed(state, [plan(PID, (T0 + 2 * HOUR) // HOUR)])) == [T0 + 2 * HOUR]


def test_one_plan_covers_every_step_of_its_epoch(cfg: AppConfig) -> None:
    p = cfg.profiles["profile_b"]
    interval = p.profile_hash.hash_rotation_interval
    assert interval == 4 * HOUR
    state = fresh(p, "profile_b")
    feed(state, step_messages(path_candles("BTC/USDC", [100] * 6)))
    out = feed(state, [plan("profile_b", T0 // interval, interval=interval)])
    assert steps_done(out) == [T0 + k * HOUR for k in range(4)]
    out = feed(state, [plan("profile_b", T0 // interval + 1, interval=interval)])
    assert steps_done(out) == [T0 + 4 * HOUR, T0 + 5 * HOUR]


def _interleave(market: list[Message], plans: list[PlanPublished], positions: list[int]) -> list[Message]:
    msgs = list(market)
    for pl, pos in sorted(zip(plans, positions, strict=True), key=lambda x: -x[1]):
        msgs.insert(pos, pl)
    return msgs


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_late_plans_give_the_same_decisions_as_plans_known_up_front(data: st.DataObject) -> None:
    p = open_thresholds(config().profiles[PID], 0.05, 0.05)
    n = 70
    market = step_messages(path_candles("BTC/USDC", zigzag(n)))
    plans = plans_for(p, T0, n)
    early = feed(fresh(p), [*plans, *market], fill)
    positions = data.draw(st.lists(st.integers(0, len(market)), min_size=len(plans), max_size=len(plans)))
    late = feed(fresh(p), _interleave(market, plans, positions), fill)
    assert buys(early)  # the scenario trades
    assert [(type(m).__name__, m.id) for m in late] == [(type(m).__name__, m.id) for m in early]
    assert late == early


# ------------------------------------------------------------------------------------------ pending intents
def _stop_loss_pending(profile: Profile) -> tuple[StrategyState, PlaceOrder]:
    state = fresh(profile)
    feed(state, [*plans_for(profile, T0, 4), *hold("BTC/USDC", 10, 100)])
    out = feed(state, step_messages(path_candles("BTC/USDC", [100, 97])))
    (intent,) = of_type(out, PlaceOrder)
    assert intent.reason == "stop_loss"
    return state, intent


def test_no_next_step_evaluated_while_an_intent_is_pending(profile: Profile) -> None:
    state, intent = _stop_loss_pending(profile)
    later = step_messages(
        [candle("BTC/USDC", T0 + 2 * HOUR, 97, close=96), candle("BTC/USDC", T0 + 3 * HOUR, 96, close=95)]
    )
    assert feed(state, later) == []
    assert feed(state, [decided(intent, "approved")]) == []  # approval is not an outcome
    assert feed(state, [order_updated(intent, "submitted")]) == []
    out = feed(state, fill_for(intent))
    assert steps_done(out) == [T0 + 2 * HOUR, T0 + 3 * HOUR]
    assert of_type(out, PlaceOrder) == []  # the position is gone, so no second stop loss
    assert state.positions == {}


@pytest.mark.parametrize(
    "outcome",
    [
        lambda i: [decided(i, "rejected")],  # by the arbiter
        lambda i: [order_updated(i, "rejected")],  # by the exchange
        lambda i: [order_updated(i, "cancelled")],
    ],
    ids=["arbiter-rejected", "exchange-rejected", "cancelled"],
)
def test_step_resumes_after_a_rejection_and_retries_the_exit(
    profile: Profile, outcome: Callable[[PlaceOrder], list[Message]]
) -> None:
    state, intent = _stop_loss_pending(profile)
    later = step_messages(
        [candle("BTC/USDC", T0 + 2 * HOUR, 97, close=96), candle("BTC/USDC", T0 + 3 * HOUR, 96, close=95)]
    )
    assert feed(state, later) == []
    out = feed(state, outcome(intent))
    assert steps_done(out) == [T0 + 2 * HOUR]  # the next step runs, and holds the one after it
    (retry,) = of_type(out, PlaceOrder)
    assert (retry.reason, retry.step_time.timestamp()) == ("stop_loss", T0 + 2 * HOUR)
    assert retry.intent_id != intent.intent_id
    assert state.positions["BTC/USDC"].size == 10


def _next_step(state: StrategyState, at: int = T0 + 2 * HOUR, price: Any = 97) -> list[Message]:
    """Evaluate the step after the pending one: outcomes are applied when a step closing after them is."""
    return feed(state, step_messages([candle("BTC/USDC", at, price)]))


def test_outcomes_are_applied_only_by_a_step_closing_after_them(profile: Profile) -> None:
    state, intent = _stop_loss_pending(profile)  # sells the 10 BTC held at 100
    feed(state, fill_for(intent))
    assert state.positions["BTC/USDC"].size == 10  # known, not yet seen by any decision
    _next_step(state)
    assert "BTC/USDC" not in state.positions


def test_redelivered_fill_is_counted_once(profile: Profile) -> None:
    state, intent = _stop_loss_pending(profile)  # sells the 10 BTC held at 100
    cash = state.cash
    f, done = fill_for(intent, fee="1.2")
    feed(state, [f, f, done, f])
    _next_step(state)
    assert "BTC/USDC" not in state.positions
    assert state.cash == cash + 10 * intent.reference_price - D("1.2")
    assert state.fees == D("1.2")


def test_approved_fill_of_no_intent_of_ours_is_applied_before_the_next_step_closing_after_it(
    profile: Profile,
) -> None:
    # A fill that answers no intent this state sent (a manual order) is held until a step closes after it: an
    # outcome of our own intents is never older than the close of the step that sent them.
    state = fresh(profile)
    decision, f = manual_fill(PID, "buy", size="2", price="100", fee="1.2", at=T0)
    feed(state, [decision, f, f, *plans_for(profile, T0, 2)])
    assert state.positions == {}
    feed(state, step_messages([candle("BTC/USDC", T0)]))
    assert state.positions["BTC/USDC"].size == 2
    assert state.cash == D(profile.paper.initial_quote_balance) - 200 - D("1.2")
    assert state.fills == 1 and take_refused(state) == []  # the redelivered copy counts once


# ------------------------------------------------------------------------------------------ forged outcomes
WAIT = 3  # decision_wait_steps of these tests


def _waiting(p: Profile) -> StrategyState:
    return new_state(PID, p, "USDC", frozenset({0}), decision_wait_steps=WAIT)


def _flat_steps(state: StrategyState, p: Profile, first: int, n: int) -> list[Message]:
    """n flat BTC steps from `first` (no signal, no entry), with their plans."""
    market = step_messages([candle("BTC/USDC", first + k * HOUR) for k in range(n)])
    return feed(state, [*plans_for(p, first, n), *market])


def _books(state: StrategyState) -> tuple[Any, ...]:
    return (state.cash, state.fees, state.fills, dict(state.positions))


def test_forged_fill_of_no_intent_is_refused_after_the_wait_and_moves_no_books(profile: Profile) -> None:
    state = _waiting(profile)
    untouched = _books(state)
    forged = order_filled(PID, "buy", size="2", price="100", fee="1.2", at=T0, intent_id="forged-intent")
    feed(state, [forged])
    _flat_steps(state, profile, T0, WAIT)  # closes T0+1h .. T0+3h: the decision may still come
    assert take_refused(state) == [] and _books(state) == untouched
    _flat_steps(state, profile, T0 + WAIT * HOUR, 1)
    (refusal,) = take_refused(state)
    assert refusal.outcome == forged
    assert "forged-intent" in refusal.reason and "no OrderDecided of profile_a" in refusal.reason
    assert _books(state) == untouched
    assert not state.held and not state.awaiting  # nothing left to apply later


def test_fill_read_before_its_decision_is_held_then_applied_once(profile: Profile) -> None:
    # The decision's write was delayed: the fill arrives first, its decision steps later (within the wait).
    state = _waiting(profile)
    decision, f = manual_fill(PID, "buy", size="2", price="100", fee="1.2", at=T0)
    feed(state, [f])
    _flat_steps(state, profile, T0, WAIT - 1)
    assert state.positions == {} and take_refused(state) == []
    feed(state, [decision, f])
    _flat_steps(state, profile, T0 + (WAIT - 1) * HOUR, 3)
    assert state.positions["BTC/USDC"].size == 2 and state.fills == 1
    assert state.cash == D(profile.paper.initial_quote_balance) - 200 - D("1.2")
    assert take_refused(state) == []


def test_fills_beyond_the_decided_size_are_refused(profile: Profile) -> None:
    state = _waiting(profile)
    first = order_filled(PID, "buy", size="1", price="100", at=T0, intent_id="manual-1", fill_id="f1")
    second = order_filled(PID, "buy", size="1", price="100", at=T0 + 1, intent_id="manual-1", fill_id="f2")
    third = order_filled(PID, "buy", size="0.5", price="100", at=T0 + 2, intent_id="manual-1", fill_id="f3")
    feed(state, [approval_of(first, size="1.5"), first, second, third])
    _flat_steps(state, profile, T0, 1)
    # 1 fits the approved 1.5; 1 more would make 2; the 0.5 after it fits (1.5 in all).
    assert state.positions["BTC/USDC"].size == D("1.5") and state.fills == 2
    (refusal,) = take_refused(state)
    assert refusal.outcome == second
    assert "manual-1" in refusal.reason and "exceed the approved size 1.5" in refusal.reason


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"product": "ETH/USDC"}, "does not match the approved buy ETH/USDC"),
        ({"side": "sell"}, "does not match the approved sell BTC/USDC"),
        ({"verdict": "rejected"}, "the arbiter rejected that intent"),
    ],
    ids=["other-product", "other-side", "rejected"],
)
def test_fill_inconsistent_with_its_decision_is_refused_without_waiting(
    profile: Profile, change: dict[str, str], why: str
) -> None:
    state = _waiting(profile)
    f = order_filled(PID, "buy", size="1", price="100", at=T0, intent_id="manual-2")
    decision = approval_of(f).model_copy(update=change)
    feed(state, [decision, f])
    _flat_steps(state, profile, T0, 1)  # the first step that can judge it
    (refusal,) = take_refused(state)
    assert "manual-2" in refusal.reason and why in refusal.reason
    assert state.positions == {} and state.fills == 0


def test_decision_of_another_profile_does_not_approve_a_fill_of_this_one(profile: Profile) -> None:
    state = _waiting(profile)
    f = order_filled(PID, "buy", size="1", price="100", at=T0, intent_id="b-intent")
    feed(state, [approval_of(f).model_copy(update={"profile": "profile_b"}), f])
    _flat_steps(state, profile, T0, WAIT + 1)
    (refusal,) = take_refused(state)
    assert "b-intent" in refusal.reason and state.positions == {}


def test_own_intent_outcomes_need_no_decision(profile: Profile) -> None:
    # As before: the outcomes of the intents this state sent are applied on arrival (the fault suite and the
    # rebuild tests cover their ordering).
    state, intent = _stop_loss_pending(profile)
    feed(state, fill_for(intent))
    _next_step(state)
    assert state.positions == {} and take_refused(state) == []


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"size": D("11"), "fill_id": "extra-size"}, "exceed the intent's size 10"),
        ({"product": "ETH/USDC", "fill_id": "extra-product"}, "the intent was sell BTC/USDC"),
        ({"side": "buy", "fill_id": "extra-side"}, "the intent was sell BTC/USDC"),
    ],
    ids=["beyond-size", "other-product", "other-side"],
)
def test_fill_contradicting_our_own_intent_is_refused_and_moves_no_books(
    profile: Profile, change: dict[str, object], why: str
) -> None:
    state, intent = _stop_loss_pending(profile)  # sells the 10 BTC held at 100
    cash, fills = state.cash, state.fills
    f, _done = fill_for(intent)
    forged = f.model_copy(update={"id": str(change["fill_id"]), **change})
    feed(state, [forged])
    (refusal,) = take_refused(state)
    assert refusal.outcome == forged and intent.intent_id in refusal.reason and why in refusal.reason
    assert state.positions["BTC/USDC"].size == 10 and state.cash == cash and state.fills == fills


def test_second_fill_of_our_intent_beyond_its_size_is_refused_after_the_real_one(profile: Profile) -> None:
    state, intent = _stop_loss_pending(profile)
    fills = state.fills
    f, done = fill_for(intent)
    feed(state, [f, done])
    extra = f.model_copy(update={"id": "again", "fill_id": "again", "size": D("1")})
    feed(state, [extra])
    _next_step(state)
    (refusal,) = take_refused(state)
    assert "fills of 11 would exceed the intent's size 10" in refusal.reason
    assert "BTC/USDC" not in state.positions and state.fills == fills + 1


def test_messages_of_other_profiles_are_ignored(profile: Profile) -> None:
    state = fresh(profile)
    other = order_filled("profile_b", "buy", size="2", price="100")
    feed(state, [other, plan("profile_b", T0 // HOUR), *step_messages([candle("BTC/USDC", T0)])])
    assert state.positions == {} and state.plans == {}


# ------------------------------------------------------------------------------------------ exits
def _price_at(avg: Decimal, pct: float, nudge: str) -> Decimal:
    return (avg * (1 + D(pct) / 100) + D(nudge)).quantize(Decimal("0.0001"))


def test_stop_loss_exit_sells_the_whole_position_once_the_loss_reaches_the_limit(profile: Profile) -> None:
    sl = profile.risk_management.stop_loss_pct
    state = fresh(profile)
    feed(state, [*plans_for(profile, T0, 3), *hold("BTC/USDC", "1.5", 200)])
    above, below = _price_at(D(200), -sl, "0.01"), _price_at(D(200), -sl, "-0.01")
    out = feed(state, step_messages(path_candles("BTC/USDC", [200, above])))
    assert of_type(out, PlaceOrder) == []
    (intent,) = of_type(
        feed(state, step_messages([candle("BTC/USDC", T0 + 2 * HOUR, above, close=below)])), PlaceOrder
    )
    assert (intent.side, intent.reason, intent.size) == ("sell", "stop_loss", D("1.5"))
    # The stop rested at the exchange: it acted within the candle at its level, not at the close.
    stop = (D(200) * (1 - D(sl) / 100)).quantize(D("0.00000001"))
    assert below < stop < above
    assert intent.reference_price == intent.trigger_price == stop
    assert intent.trigger_candle is not None and intent.trigger_candle.timestamp() == T0 + 2 * HOUR
    assert intent.step_time.timestamp() == T0 + 2 * HOUR
    assert intent.event_time.timestamp() == T0 + 3 * HOUR  # decided at the close of the step


def _with_path(c: CandleClosed, points: list[tuple[int, Any]]) -> CandleClosed:
    """The candle as the live ingest publishes it when the websocket showed every trade of its bucket."""
    ms = int(c.open_time.timestamp()) * 1000
    return CandleClosed.model_validate(
        {**c.model_dump(), "trade_path": [(ms + dt_ms, D(p)) for dt_ms, p in points]}
    )


def test_on_a_live_candle_the_trades_decide_which_level_came_first_and_the_stops_price(
    profile: Profile,
) -> None:
    p = tune(profile, risk_management={"stop_loss_pct": 5.0, "take_profit_pct": 5.0})
    stop, take = D(190), D(210)
    both = candle("BTC/USDC", T0 + 2 * HOUR, 200, high=211, low=185, close=200)  # reaches both levels

    def exit_on(c: CandleClosed) -> PlaceOrder:
        state = fresh(p)
        feed(state, [*plans_for(p, T0, 3), *hold("BTC/USDC", "1.5", 200)])
        assert of_type(feed(state, step_messages(path_candles("BTC/USDC", [200, 200]))), PlaceOrder) == []
        (intent,) = of_type(feed(state, step_messages([c])), PlaceOrder)
        return intent

    # The range alone: the stop decides (which came first is unknown), at its level.
    by_range = exit_on(both)
    assert (by_range.reason, by_range.trigger_price) == ("stop_loss", stop)
    # The trades went up through the take profit first: it sold there, at its level.
    up_first = exit_on(_with_path(both, [(0, 200), (10, 211), (20, 185)]))
    assert (up_first.reason, up_first.trigger_price) == ("take_profit", take)
    # Down first, jumping from 195 to 185: the stop sold at the first trade through it, not at its level.
    down_first = exit_on(_with_path(both, [(0, 200), (5, 195), (10, 185), (20, 211)]))
    assert (down_first.reason, down_first.trigger_price, down_first.reference_price) == (
        "stop_loss",
        D(185),
        D(185),
    )
    assert down_first.trigger_candle == both.open_time


def test_take_profit_exit_sells_once_the_gain_reaches_the_target(profile: Profile) -> None:
    tp = profile.risk_management.take_profit_pct
    state = fresh(profile)
    feed(state, [*plans_for(profile, T0, 3), *hold("ETH/USDC", "4", 50)])
    below, above = _price_at(D(50), tp, "-0.01"), _price_at(D(50), tp, "0.01")
    assert of_type(feed(state, step_messages(path_candles("ETH/USDC", [50, below]))), PlaceOrder) == []
    (intent,) = of_type(
        feed(state, step_messages([candle("ETH/USDC", T0 + 2 * HOUR, below, close=above)])), PlaceOrder
    )
    assert (intent.side, intent.reason, intent.size, intent.product) == (
        "sell",
        "take_profit",
        D(4),
        "ETH/USDC",
    )


def test_signal_reversal_exits_with_the_signal_recorded(profile: Profile) -> None:
    # A choppy down-trend under a position whose stop loss and take profit are out of reach.
    p = tune(profile, risk_management={"stop_loss_pct": 60.0, "take_profit_pct": 500.0})
    n = 70
    state = fresh(p)
    feed(
        state,
        [
            *plans_for(p, T0, n, strategy="quantum_strategy_calculator", products=("ETH/USDC",)),
            *hold("BTC/USDC", 10, 100),
        ],
    )
    out = feed(state, step_messages(path_candles("BTC/USDC", zigzag(n, up=1.002, down=0.994))), reject)
    exits = of_type(out, PlaceOrder)
    assert exits, "the down-trend should turn the blended signal below -signal_strength_threshold"
    assert {i.reason for i in exits} == {"exit_signal"}
    assert all(i.side == "sell" and i.size == 10 for i in exits)
    thr = p.strategy_config.signal_strength_threshold
    assert all(i.signal <= -thr for i in exits)


# ------------------------------------------------------------------------------------------ entries
def _trend_run(p: Profile, n: int = 80, respond: Responder = fill) -> list[Message]:
    state = fresh(p)
    return feed(state, [*plans_for(p, T0, n), *step_messages(path_candles("BTC/USDC", zigzag(n)))], respond)


def test_entries_need_signal_and_confidence_above_the_thresholds(profile: Profile) -> None:
    sc = profile.strategy_config
    assert buys(_trend_run(profile)) == []  # a mild trend is below the config's thresholds
    lowered = open_thresholds(profile, 0.1, 0.1)
    entries = buys(_trend_run(lowered))
    assert entries
    assert all(i.signal >= 0.1 and i.confidence >= 0.1 and i.reason == "entry" for i in entries)
    # ... so it was the config's gate that held them back
    assert any(i.signal < sc.signal_strength_threshold for i in entries)


@pytest.mark.parametrize("gate", ["signal_strength_threshold", "confidence_threshold"])
def test_either_threshold_alone_blocks_entries(profile: Profile, gate: str) -> None:
    open_run = buys(_trend_run(open_thresholds(profile, 0.05, 0.05)))
    assert open_run
    strict = tune(open_thresholds(profile, 0.05, 0.05), strategy_config={gate: 0.9})
    assert buys(_trend_run(strict)) == []


def test_entry_is_sized_by_equity_confidence_and_risk_factor(profile: Profile) -> None:
    p = open_thresholds(profile, 0.1, 0.1)
    sc = p.strategy_config
    first = buys(_trend_run(p))[0]  # the first entry: equity is still the initial balance
    budget = D(p.paper.initial_quote_balance) * D(
        sc.max_position_size_pct / 100 * first.confidence / sc.risk_adjustment_factor
    )
    assert first.size * first.reference_price <= budget
    assert budget - first.size * first.reference_price < first.reference_price * Decimal("0.00000002")


def test_entry_budget_leaves_cash_for_fee_and_slippage(profile: Profile) -> None:
    p = open_thresholds(profile, 0.05, 0.05)
    n = 80
    state = fresh(p)
    # Nearly all the equity sits in ETH (no ETH candles: it stays at its entry price), 50 USDC in cash.
    feed(state, [*plans_for(p, T0, n), *hold("ETH/USDC", "99.5", 100)])
    cash = D(p.paper.initial_quote_balance) - D("99.5") * 100  # the hold is applied before the first step
    entries = buys(feed(state, step_messages(path_candles("BTC/USDC", zigzag(n))), reject))
    assert entries
    assert all(i.size * i.reference_price <= cash * Decimal("0.98") for i in entries)
    assert max(i.size * i.reference_price for i in entries) > cash * Decimal("0.97")


def test_entries_gated_by_market_volatility(profile: Profile) -> None:
    p = open_thresholds(profile, 0.1, 0.1)
    assert buys(_trend_run(p))
    flat_for_profile = tune(p, strategy_config={"entropy_threshold": 0.05})  # the market is too calm for it
    assert buys(_trend_run(flat_for_profile)) == []
    wild_for_profile = tune(p, risk_management={"volatility_threshold": 0.1})  # ~38 %/year is too wild for it
    assert buys(_trend_run(wild_for_profile)) == []


def test_flat_market_opens_nothing(profile: Profile) -> None:
    p = open_thresholds(profile)
    state = fresh(p)
    out = feed(state, [*plans_for(p, T0, 70), *step_messages(path_candles("BTC/USDC", [100] * 70))], fill)
    assert buys(out) == [] and len(steps_done(out)) == 70


def test_open_positions_never_exceed_max_open_positions(profile: Profile) -> None:
    p = tune(open_thresholds(profile, 0.05, 0.05), trading_params={"max_open_positions": 2})
    n = 80
    products = ("BTC/USDC", "ETH/USDC", "SOL/USDC")
    state = fresh(p)
    candles: list[CandleClosed] = []
    for k, prod in enumerate(products):
        candles += path_candles(prod, zigzag(n, start=50.0 * (k + 1), up=1.006 + 0.001 * k))
    feed(state, plans_for(p, T0, n, products=products))
    most = 0
    opened: set[str] = set()
    for m in step_messages(candles):
        feed(state, [m], fill)
        most = max(most, len(state.positions))
        opened |= set(state.positions)
    assert most == 2
    assert len(opened) >= 2


# ------------------------------------------------------------------------------------------ risk halts
# Steps start 60 h before T0 (a UTC midnight), so the signals are warm when day T0 begins (step 60 closes at
# T0 + 1h). The profile holds 90 ETH at 100 (9 000 of its 10 000) from the start; ETH trades only from day
# T0 on, and falls at step DROP. Entries are answered with rejections, so the equity is the ETH position alone.
START = T0 - 60 * HOUR
N = 100
DROP = 63  # opens T0 + 3h


def _halt_run(p: Profile, eth_closes: list[Any]) -> tuple[StrategyState, list[Message]]:
    state = fresh(p)
    btc = path_candles("BTC/USDC", zigzag(N), START)
    eth = path_candles("ETH/USDC", eth_closes, START + (DROP - 3) * HOUR)  # eth_closes[3] is at DROP
    msgs = [*plans_for(p, START, N), *hold("ETH/USDC", 90, 100), *step_messages([*btc, *eth])]
    return state, feed(state, msgs, reject)


def _step_of(i: PlaceOrder) -> int:
    return int((i.step_time.timestamp() - START) // HOUR)


def test_drawdown_halt_is_emitted_once_and_blocks_entries_but_not_exits(profile: Profile) -> None:
    base = tune(open_thresholds(profile, 0.05, 0.05), risk_management={"stop_loss_pct": 50.0})
    eth = [100, 100, 100, 80, 40]  # the 80 is at DROP: equity 1 000 + 90 * 80 = 8 200, an 18 % drawdown
    control = tune(base, risk_management={"max_drawdown_pct": 100.0, "max_daily_loss_pct": 100.0})
    _, free = _halt_run(control, eth)
    assert any(_step_of(i) >= DROP for i in buys(free)), (
        "precondition: entries after the drop without the halt"
    )

    state, out = _halt_run(base, eth)
    dd = [h for h in of_type(out, ProfileHalted) if h.reason.startswith("drawdown")]
    assert len(dd) == 1
    # Stamped when it is known: at the close of the step whose close breached the limit.
    assert dd[0].until is None and dd[0].event_time.timestamp() == START + (DROP + 1) * HOUR
    assert str(base.risk_management.max_drawdown_pct) in dd[0].reason
    assert any(_step_of(i) < DROP for i in buys(out))
    assert [i for i in buys(out) if _step_of(i) >= DROP] == []  # for the rest of the run, days included
    exits = [(e.product, e.reason, _step_of(e)) for e in of_type(out, PlaceOrder) if e.side == "sell"]
    # close_on_halt (the default): the halt sells the position at once; every sale is rejected here, so it is
    # tried again at each step, and the stop (reached within the next candle) acts first where it can.
    assert exits[:3] == [
        ("ETH/USDC", "halt", DROP),
        ("ETH/USDC", "stop_loss", DROP + 1),
        ("ETH/USDC", "halt", DROP + 2),
    ]
    assert {r for _, r, _ in exits[3:]} == {"halt"}
    assert state.halted is not None

    keep = tune(base, risk_management={"close_on_halt": False})
    state, out = _halt_run(keep, eth)
    exits = [(e.product, e.reason, _step_of(e)) for e in of_type(out, PlaceOrder) if e.side == "sell"]
    assert exits == [("ETH/USDC", "stop_loss", DROP + 1)]  # the halt only blocked entries
    assert state.halted is not None


def test_daily_loss_halts_entries_until_the_next_utc_day(profile: Profile) -> None:
    base = tune(open_thresholds(profile, 0.05, 0.05), risk_management={"stop_loss_pct": 50.0})
    eth = [100, 100, 100, 94]  # equity 10 000 -> 9 460 within day T0: 5.4 % >= 4 %, below the 12 % drawdown
    control = tune(base, risk_management={"max_daily_loss_pct": 100.0})
    next_day = (T0 + DAY - START) // HOUR - 1  # first step closing on the next UTC day
    _, free = _halt_run(control, eth)
    assert any(DROP <= _step_of(i) < next_day for i in buys(free)), "precondition: entries later that day"

    _, out = _halt_run(base, eth)
    (halt,) = of_type(out, ProfileHalted)
    assert halt.reason.startswith("daily loss")
    assert halt.until is not None and halt.until.timestamp() == T0 + DAY
    assert halt.event_time.timestamp() == START + (DROP + 1) * HOUR
    assert [i for i in buys(out) if DROP <= _step_of(i) < next_day] == []
    assert any(_step_of(i) >= next_day for i in buys(out))  # entries resume the next UTC day
    assert any(_step_of(i) < DROP for i in buys(out))


def test_halt_messages_are_deterministic(profile: Profile) -> None:
    base = tune(open_thresholds(profile, 0.05, 0.05), risk_management={"stop_loss_pct": 50.0})
    a = _halt_run(base, [100, 100, 100, 94])[1]
    b = _halt_run(base, [100, 100, 100, 94])[1]
    assert a == b


# ------------------------------------------------------------------------------------------ end of run
def test_final_markers_emitted_once_after_the_last_step(profile: Profile) -> None:
    state = fresh(profile)
    feed(state, plans_for(profile, T0, 3))
    out = feed(
        state, [*step_messages(path_candles("BTC/USDC", [100, 101, 102])), replay_finished(T0 + 2 * HOUR, 3)]
    )
    finals = [m for m in of_type(out, StepCompleted) if m.final]
    assert len(finals) == 1
    assert finals[0].step_time.timestamp() == T0 + 2 * HOUR
    (wf,) = of_type(out, WorkerFinished)
    assert wf.service == "strategy" and wf.instance == PID and wf.detail["steps"] == 3
    assert out.index(finals[0]) > max(out.index(m) for m in of_type(out, StepCompleted) if not m.final)
    assert feed(state, [replay_finished(T0 + 2 * HOUR, 3)]) == []


def test_final_markers_wait_for_pending_intents(profile: Profile) -> None:
    state, intent = _stop_loss_pending(profile)
    assert feed(state, [replay_finished(T0 + HOUR, 2)]) == []
    out = feed(state, [decided(intent, "rejected")])
    assert [m.final for m in of_type(out, StepCompleted)] == [True]
    assert len(of_type(out, WorkerFinished)) == 1
    assert of_type(out, OrderDecided) == []


def test_final_markers_wait_for_missing_plans(profile: Profile) -> None:
    state = fresh(profile)
    out = feed(state, [*step_messages(path_candles("BTC/USDC", [100, 101])), replay_finished(T0 + HOUR, 2)])
    assert out == []
    out = feed(state, plans_for(profile, T0, 2))
    assert [m.final for m in of_type(out, StepCompleted)] == [False, False, True]


# ------------------------------------------------------------------------------------------ risk limits, exactly
# Each limit at its boundary: the value that reaches it triggers, the nearest value short of it does not.
def _first_entry(p: Profile, n: int = 80) -> PlaceOrder:
    entries = buys(_trend_run(p, n, reject))
    assert entries, "precondition: the trend opens a position with open thresholds"
    return entries[0]


def _volatility_at(step_time: int, n: int = 80) -> tuple[float, float]:
    """Per-candle and annualised volatility of the trend's BTC after the step opening at `step_time`,
    computed by an independent VolatilityTracker."""
    vt = VolatilityTracker(24, HOUR)
    for c in path_candles("BTC/USDC", zigzag(n)):
        t = int(c.open_time.timestamp())
        if t > step_time:
            break
        vt.update(Bar(t, float(c.open), float(c.high), float(c.low), float(c.close), float(c.volume)))
    pc, an = vt.per_candle(), vt.annualised()
    assert pc is not None and an is not None
    return pc, an


def _entry_at(p: Profile, step_time: float) -> bool:
    return any(i.step_time.timestamp() == step_time for i in buys(_trend_run(p, 80, reject)))


def test_entropy_threshold_at_its_limit(profile: Profile) -> None:
    p = open_thresholds(profile, 0.05, 0.05)
    first = _first_entry(p)
    t = int(first.step_time.timestamp())
    per_candle, _ = _volatility_at(t)
    assert _entry_at(
        tune(p, strategy_config={"entropy_threshold": per_candle}), t
    )  # >= the threshold: trades
    above = math.nextafter(per_candle, math.inf)
    assert not _entry_at(tune(p, strategy_config={"entropy_threshold": above}), t)


def test_volatility_threshold_at_its_limit(profile: Profile) -> None:
    p = open_thresholds(profile, 0.05, 0.05)
    first = _first_entry(p)
    t = int(first.step_time.timestamp())
    _, annualised = _volatility_at(t)
    assert _entry_at(
        tune(p, risk_management={"volatility_threshold": annualised}), t
    )  # <= the threshold: trades
    below = math.nextafter(annualised, 0.0)
    assert not _entry_at(tune(p, risk_management={"volatility_threshold": below}), t)


def test_max_open_positions_at_its_limit(profile: Profile) -> None:
    # Three products all asking for an entry at once: exactly max_open_positions of them are bought, the
    # strongest signals first, and none after while the positions stay open.
    n = 80
    products = ("BTC/USDC", "ETH/USDC", "SOL/USDC")
    candles: list[CandleClosed] = []
    for k, prod in enumerate(products):
        candles += path_candles(prod, zigzag(n, start=50.0 * (k + 1), up=1.006 + 0.001 * k))
    for limit in (1, 2, 3):
        p = tune(open_thresholds(profile, 0.05, 0.05), trading_params={"max_open_positions": limit})
        state = fresh(p)
        out = feed(state, [*plans_for(p, T0, n, products=products), *step_messages(candles)], fill)
        assert len(state.positions) <= limit
        first_step = min(i.step_time for i in buys(out))
        opened_together = [i for i in buys(out) if i.step_time == first_step]
        assert len(opened_together) == min(limit, 3)
        assert [i.signal for i in opened_together] == sorted(
            (i.signal for i in opened_together), reverse=True
        )


def _all_in_eth(p: Profile, eth_closes: list[Any]) -> list[ProfileHalted]:
    """10 000 of equity, all of it 100 ETH bought at 100 (no cash, so no entry changes the equity)."""
    state = fresh(p)
    btc = path_candles("BTC/USDC", zigzag(N), START)
    eth = path_candles("ETH/USDC", eth_closes, START + (DROP - 3) * HOUR)
    msgs = [*plans_for(p, START, N), *hold("ETH/USDC", 100, 100), *step_messages([*btc, *eth])]
    return of_type(feed(state, msgs, reject), ProfileHalted)


@pytest.mark.parametrize(("price", "halts"), [("96", True), ("96.0001", False)])
def test_max_daily_loss_at_its_limit(profile: Profile, price: str, halts: bool) -> None:
    p = tune(
        profile, risk_management={"max_daily_loss_pct": 4.0, "max_drawdown_pct": 50.0, "stop_loss_pct": 50.0}
    )
    daily = [h for h in _all_in_eth(p, [100, 100, 100, price]) if h.reason.startswith("daily loss")]
    assert bool(daily) is halts  # 100 x 96 = 9 600: exactly 4 % of the day's 10 000
    if halts:
        assert daily[0].reason.startswith("daily loss 4.00% >= max_daily_loss_pct 4.0")


@pytest.mark.parametrize(("price", "halts"), [("88", True), ("88.0001", False)])
def test_max_drawdown_at_its_limit(profile: Profile, price: str, halts: bool) -> None:
    p = tune(
        profile, risk_management={"max_daily_loss_pct": 50.0, "max_drawdown_pct": 12.0, "stop_loss_pct": 50.0}
    )
    dd = [h for h in _all_in_eth(p, [100, 100, 100, price]) if h.reason.startswith("drawdown")]
    assert bool(dd) is halts  # 100 x 88 = 8 800: exactly 12 % below the 10 000 peak
    if halts:
        assert dd[0].until is None  # until a resume command (signed commands: issue 7)


# ------------------------------------------------------------------------------------------ rotation policy
def _rotation_run(policy: str, respond: Responder) -> list[PlaceOrder]:
    p = tune(config().profiles["profile_b"])  # rotates every 4 hours
    assert p.profile_hash.hash_rotation_interval == 4 * HOUR
    state = new_state("profile_b", p, "USDC", frozenset({0}), on_rotation=policy)  # type: ignore[arg-type]
    held = manual_fill("profile_b", "buy", product="BTC/USDC", size=2, price=100, at=T0 - DAY)
    other = manual_fill("profile_b", "buy", product="ETH/USDC", size=3, price=50, at=T0 - DAY)
    market = step_messages(path_candles("BTC/USDC", [100] * 10))  # flat: no stop, no take profit, no signal
    msgs = [*plans_covering("profile_b", T0, T0 + 10 * HOUR, 4 * HOUR), *held, *other, *market]
    return of_type(feed(state, msgs, respond), PlaceOrder)


def test_rotation_keep_leaves_positions_open() -> None:
    assert _rotation_run("keep", fill) == []


def test_rotation_close_sells_every_position_at_the_first_step_of_the_new_epoch() -> None:
    sells = _rotation_run("close", fill)
    assert [(i.product, i.side, i.reason, i.size) for i in sells] == [
        ("BTC/USDC", "sell", "flatten", D(2)),
        ("ETH/USDC", "sell", "flatten", D(3)),  # no ETH candle in the step: sold at its last known price
    ]
    assert {i.step_time.timestamp() for i in sells} == {T0 + 4 * HOUR}  # epoch 2's first step, not epoch 1's
    assert sells[1].reference_price == 50


def test_rotation_close_retries_a_sale_that_did_not_happen() -> None:
    answers = iter([reject, fill, fill])
    sells = _rotation_run("close", lambda i: next(answers)(i) if i.product == "BTC/USDC" else fill(i))
    btc = [i for i in sells if i.product == "BTC/USDC"]
    assert [(i.reason, i.step_time.timestamp()) for i in btc] == [
        ("flatten", T0 + 4 * HOUR),
        ("flatten", T0 + 5 * HOUR),
    ]
    assert len({i.intent_id for i in btc}) == 2


# ------------------------------------------------------------------------------------------ rebuild after a crash
def _recorded_run(
    p: Profile, n: int = 90, manual: Sequence[Message] = (), *, approve: bool = False
) -> tuple[list[Message], list[Message], list[Message], list[Message]]:
    """An uninterrupted run, and its three input logs as a worker reads them: plans, market, order outcomes
    (`manual`: order events of a manual order, first on the events log; `approve`: a filled intent's approving
    decision comes before its fill, as the arbiter writes it)."""
    plans = list(plans_for(p, T0, n, products=("BTC/USDC", "ETH/USDC")))
    market = step_messages(
        [*path_candles("BTC/USDC", zigzag(n)), *path_candles("ETH/USDC", zigzag(n, 50.0, 1.004, 0.997))]
    )
    events: list[Message] = list(manual)
    k = 0

    def respond(i: PlaceOrder) -> list[Message]:
        nonlocal k
        k += 1
        if k % 3 == 0:
            out = reject(i)
        else:
            out = [*([decided(i, "approved")] if approve else []), *fill_for(i, fee="0.5")]
        events.extend(out)
        return out

    out = feed(fresh(p), [*manual, *plans, *market], respond)
    return out, list(plans), market, events


def _interleavings(*logs: list[Message]) -> st.SearchStrategy[list[Message]]:
    """Every merge of the logs that keeps each log's own order (Kafka's per-partition order)."""
    tags = [i for i, log in enumerate(logs) for _ in log]
    return st.permutations(tags).map(lambda order: _merge(order, logs))


def _merge(order: Sequence[int], logs: Sequence[list[Message]]) -> list[Message]:
    its = [iter(log) for log in logs]
    return [next(its[i]) for i in order]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rebuild_from_the_input_logs_in_any_order_reproduces_the_run(data: st.DataObject) -> None:
    # After a crash the worker reads its three inputs from the beginning, each at its own pace: order events
    # typically arrive long before the step that sent their intent is evaluated again.
    p = open_thresholds(config().profiles[PID], 0.05, 0.05)
    first, plans, market, events = _recorded_run(p)
    assert len(buys(first)) >= 3 and len(events) >= 6  # the scenario trades, fills and rejects
    msgs = data.draw(_interleavings(plans, market, events))
    state = fresh(p)
    again = feed(state, msgs)  # no responder: every outcome is already in the events log
    assert again == first  # same intents (ids and content), markers and halts, in the same order


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rebuild_with_decisions_on_their_own_topic_in_any_order_reproduces_the_run(
    data: st.DataObject,
) -> None:
    # Decisions travel on orders.decisions, the fills and order events on orders.events: a worker reads the
    # two logs at their own pace, so a decision may come before or after the outcomes of its intent.
    p = open_thresholds(config().profiles[PID], 0.05, 0.05)
    first, plans, market, outcomes = _recorded_run(p, approve=True)
    decisions = [m for m in outcomes if isinstance(m, OrderDecided)]
    events = [m for m in outcomes if not isinstance(m, OrderDecided)]
    assert {d.verdict for d in decisions} == {"approved", "rejected"} and len(events) >= 6
    state = fresh(p)
    assert feed(state, data.draw(_interleavings(plans, market, decisions, events))) == first
    assert not state.held and not state.awaiting and take_refused(state) == []


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_rebuild_applies_an_approved_manual_fill_at_the_same_step(data: st.DataObject) -> None:
    p = open_thresholds(config().profiles[PID], 0.05, 0.05)
    base = _recorded_run(p)[0]
    # After the run's first intent: from there on no step runs before the events log is read up to the
    # manual order (a foreign fill read late is applied late, as for any input: nothing gates steps on it).
    at = int(of_type(base, PlaceOrder)[0].event_time.timestamp()) + 2 * HOUR + 7
    manual = manual_fill(PID, "buy", product="ETH/USDC", size="3", price="50", fee="0.3", at=at)
    first, plans, market, events = _recorded_run(p, manual=manual)
    assert first != base  # the manual position changes what the run does
    state = fresh(p)
    assert feed(state, data.draw(_interleavings(plans, market, events))) == first
    assert state.fills == len(of_type(events, OrderFilled)) and take_refused(state) == []


def test_rebuild_with_the_events_read_first_ends_in_the_same_state() -> None:
    p = open_thresholds(config().profiles[PID], 0.05, 0.05)
    first, plans, market, events = _recorded_run(p)
    a = fresh(p)
    feed(a, [*plans, *market, *events])  # outcomes last: they wait for nothing
    b = fresh(p)
    assert feed(b, [*events, *plans, *market]) == first
    for s in (a, b):
        assert not s.held and not s.pending
    assert (b.cash, b.fees, b.realized_pnl) != (D(0), D(0), D(0))
    ref = fresh(p)
    feed(
        ref, [*plans, *market], lambda i: [m for m in events if getattr(m, "intent_id", None) == i.intent_id]
    )
    assert (b.cash, b.fees, b.realized_pnl, b.positions) == (
        ref.cash,
        ref.fees,
        ref.realized_pnl,
        ref.positions,
    )


# ------------------------------------------------------------------------------------------ shared indicators
def test_profiles_sharing_market_signals_decide_as_with_their_own(cfg: AppConfig) -> None:
    n = 80
    pids = ("profile_a", "profile_b")
    profiles = {pid: open_thresholds(cfg.profiles[pid], 0.05, 0.05) for pid in pids}
    plans = {
        pid: plans_for(profiles[pid], T0, n, pid=pid, strategy=s, products=("BTC/USDC", "ETH/USDC"))
        for pid, s in zip(
            pids, ("quantum_strategy_calculator", "volume_weighted_hash_oscillator"), strict=True
        )
    }
    candles = [*path_candles("BTC/USDC", zigzag(n)), *path_candles("ETH/USDC", zigzag(n, 50.0, 1.004, 0.997))]
    alone = {
        pid: feed(fresh(profiles[pid], pid), [*plans[pid], *step_messages(candles)], fill) for pid in pids
    }
    assert all(buys(out) for out in alone.values())

    market = MarketSignals()
    shared = {pid: new_state(pid, profiles[pid], "USDC", frozenset({0}), market=market) for pid in pids}
    together: dict[str, list[Message]] = {pid: feed(shared[pid], plans[pid]) for pid in pids}
    by_time: dict[int, list[CandleClosed]] = {}
    for c in candles:
        by_time.setdefault(int(c.open_time.timestamp()), []).append(c)
    for t in sorted(by_time):  # lockstep: every profile evaluates a step before the next one is fed
        step = Step(t, HOUR, tuple(sorted(by_time[t], key=lambda c: c.product)))
        for pid in pids:
            produced = on_step(shared[pid], step)
            together[pid] += produced
            for i in of_type(produced, PlaceOrder):
                together[pid] += feed(shared[pid], fill(i))
    assert together == alone


def test_shared_market_signals_refuse_a_step_older_than_what_they_have_seen() -> None:
    market = MarketSignals()
    c0, c1 = path_candles("BTC/USDC", [100, 101])
    market.update(Step(T0 + HOUR, HOUR, (c1,)))
    market.update(Step(T0 + HOUR, HOUR, (c1,)))  # the same step again: another profile's turn, a no-op
    with pytest.raises(RuntimeError, match="lockstep"):
        market.update(Step(T0, HOUR, (c0,)))


# ------------------------------------------------------------------------------------------ operator commands
def test_flatten_command_sells_every_position_at_the_next_step_and_pause_blocks_entries(
    profile: Profile,
) -> None:
    from shared.commands import new_command
    from tests.unit.builders import dt

    key = b"k" * 32
    state = fresh(open_thresholds(profile, 0.0, 0.0))
    feed(state, [*plans_for(profile, T0, 4), *hold("BTC/USDC", "1.5", 200)])
    feed(
        state,
        [new_command("flatten", "all", key=key, now=dt(T0)), new_command("pause", PID, key=key, now=dt(T0))],
    )
    out = feed(state, step_messages(path_candles("BTC/USDC", [200, 201])))
    sells = [i for i in of_type(out, PlaceOrder) if i.side == "sell"]
    assert [(i.product, i.reason, i.size) for i in sells] == [("BTC/USDC", "flatten", D("1.5"))]
    assert buys(out) == [] and state.paused is not None
    feed(state, [new_command("resume", "all", key=key, now=dt(T0))])
    assert state.paused is None and state.halted is None


def test_command_for_another_profile_changes_nothing(profile: Profile) -> None:
    from shared.commands import new_command
    from tests.unit.builders import dt

    state = fresh(profile)
    feed(state, [new_command("kill", "profile_b", key=b"k" * 32, now=dt(T0))])
    assert state.paused is None and not state.flatten and not state.flatten_requested


# ------------------------------------------------------------------------------------------ early rotation (rotate)
def _timed(msgs: Sequence[Message]) -> list[tuple[Message, int | None]]:
    """Market data with Kafka times: step h (hours after T0) published at (h + 1) s; other messages untimed."""
    out: list[tuple[Message, int | None]] = []
    for m in msgs:
        t = getattr(m, "open_time", None)
        out.append((m, None if t is None else ((int(t.timestamp()) - T0) // HOUR + 1) * 1000))
    return out


def _feed_timed(state: StrategyState, msgs: Sequence[tuple[Message, int | None]]) -> list[Message]:
    out: list[Message] = []
    for m, ms in msgs:
        produced = decide(state, m, 0, ms)
        out.extend(produced)
        for i in of_type(produced, PlaceOrder):
            for r in fill(i):
                out.extend(decide(state, r, 0))
    return out


def _rotated(scheduled: PlanPublished, start: int, command_id: str) -> PlanPublished:
    from tests.unit.builders import dt

    return scheduled.model_copy(
        update={
            "id": "rotated",
            "epoch_start": dt(start),
            "rotation": 1,
            "rotation_commands": [command_id],
            "fingerprint": "cd" * 32,
        }
    )


def _rotate_setup() -> tuple[Profile, list[PlanPublished], Message, list[Message]]:
    from shared.commands import new_command
    from tests.unit.builders import dt

    p = tune(config().profiles["profile_b"])  # 4-hour epochs: hours 0-3 are one epoch
    plans = plans_covering("profile_b", T0, T0 + 4 * HOUR, 4 * HOUR)
    cmd = new_command("rotate", "profile_b", key=b"k" * 32, now=dt(T0))
    market = step_messages(path_candles("BTC/USDC", [100] * 4))  # flat: only a rotation sells
    held = manual_fill("profile_b", "buy", product="BTC/USDC", size=2, price=100, at=T0 - DAY)
    return p, plans, cmd, [*held, *market]


def test_rotate_command_holds_its_step_until_the_rotated_plan_and_close_sells_there() -> None:
    p, plans, cmd, rest = _rotate_setup()
    state = new_state("profile_b", p, "USDC", frozenset({0}), on_rotation="close")
    timed = _timed(rest)
    out = _feed_timed(state, [(pl, None) for pl in plans] + [(cmd, 2500)] + timed)
    # Appended at 2.5 s: hours 0 and 1 (published at 1 s, 2 s) use the scheduled plan; hour 2 waits.
    assert steps_done(out) == [T0, T0 + HOUR] and of_type(out, PlaceOrder) == []
    out = _feed_timed(state, [(_rotated(plans[0], T0 + 2 * HOUR, cmd.id), None)])
    assert steps_done(out) == [T0 + 2 * HOUR, T0 + 3 * HOUR]
    sells = of_type(out, PlaceOrder)
    assert [(i.reason, i.step_time.timestamp(), i.plan_rotation, i.fingerprint) for i in sells] == [
        ("flatten", T0 + 2 * HOUR, 1, "cd" * 32)
    ]
    assert state.rotations_waiting == {}


def test_rebuild_with_the_rotated_plan_read_first_switches_at_the_same_step() -> None:
    p, plans, cmd, rest = _rotate_setup()
    first = new_state("profile_b", p, "USDC", frozenset({0}), on_rotation="close")
    run = _feed_timed(first, [(pl, None) for pl in plans] + [(cmd, 2500)] + _timed(rest))
    run += _feed_timed(first, [(_rotated(plans[0], T0 + 2 * HOUR, cmd.id), None)])
    rebuilt = new_state("profile_b", p, "USDC", frozenset({0}), on_rotation="close")
    # A restarted worker reads the small topics first: both plans and the command before any candle.
    again = _feed_timed(
        rebuilt,
        [(pl, None) for pl in plans]
        + [(_rotated(plans[0], T0 + 2 * HOUR, cmd.id), None), (cmd, 2500)]
        + _timed(rest),
    )
    assert of_type(again, PlaceOrder) == of_type(run, PlaceOrder) and len(of_type(run, PlaceOrder)) == 1
    assert steps_done(again) == steps_done(run)


def test_rotate_command_for_another_profile_holds_no_step() -> None:
    from shared.commands import new_command
    from tests.unit.builders import dt

    p, plans, _, rest = _rotate_setup()
    state = new_state("profile_b", p, "USDC", frozenset({0}), on_rotation="close")
    other = new_command("rotate", "profile_a", key=b"k" * 32, now=dt(T0))
    out = _feed_timed(state, [(pl, None) for pl in plans] + [(other, 500)] + _timed(rest))
    assert steps_done(out) == [T0 + h * HOUR for h in range(4)] and of_type(out, PlaceOrder) == []


# ------------------------------------------------------------------------------------------ live feed gate
def _live(msgs: list[Message], lag_of: Callable[[int], float]) -> list[Message]:
    """The watermarks of a live feed: each step published `lag_of(step)` seconds after its close."""
    out: list[Message] = []
    for m in msgs:
        if isinstance(m, WatermarkAdvanced):
            close = int(m.step_time.timestamp()) + m.interval_s
            m = m.model_copy(update={"published_at": dt(close + lag_of(close))})
        out.append(m)
    return out


def _live_run(
    p: Profile, n: int, lag_of: Callable[[int], float], extra: Sequence[Message] = ()
) -> list[Message]:
    state = new_state(PID, p, "USDC", frozenset({0}), max_publish_lag_s=125.0)
    market = _live(step_messages(path_candles("BTC/USDC", zigzag(n))), lag_of)
    return feed(state, [*plans_for(p, T0, n), *extra, *market], fill)


def test_live_steps_published_on_time_open_entries_as_a_replay_does(profile: Profile) -> None:
    p = open_thresholds(profile, 0.1, 0.1)
    replay = buys(_trend_run(p, 60))
    assert replay
    live = buys(_live_run(p, 60, lambda close: 3.0))
    assert [(i.step_time, i.size) for i in live] == [(i.step_time, i.size) for i in replay]


def test_history_steps_feed_the_models_but_open_nothing(profile: Profile) -> None:
    p = open_thresholds(profile, 0.1, 0.1)
    replay_entries = buys(_trend_run(p, 60))
    first_entry = int(replay_entries[0].step_time.timestamp())
    # Every step up to and including the first entry's is a backfill published hours after it closed.
    cutoff = first_entry + HOUR
    out = _live_run(p, 60, lambda close: 6 * HOUR if close <= cutoff else 3.0)
    entries = buys(out)
    assert entries and all(int(i.step_time.timestamp()) > first_entry for i in entries)
    assert len(steps_done(out)) == 60  # every step was still evaluated (models warmed up, exits checked)


def test_stale_feed_blocks_entries_until_fresh_and_exits_still_act(profile: Profile) -> None:
    p = open_thresholds(profile, 0.1, 0.1)
    state = new_state(PID, p, "USDC", frozenset({0}), max_publish_lag_s=125.0)
    n = 60
    market = _live(step_messages(path_candles("BTC/USDC", zigzag(n))), lambda close: 3.0)
    stale = FeedStateChanged(
        id="stale-1",
        event_time=dt(T0),
        correlation_id="feed",
        state="stale",
        reason="no websocket frame for 6 s",
    )
    out = feed(state, [*plans_for(p, T0, n), stale, *market], fill)
    assert buys(out) == [] and len(steps_done(out)) == n
    assert state.history_steps == n
    fresh_again = stale.model_copy(update={"id": "fresh-1", "state": "fresh", "reason": "frames flowing"})
    more = _live(
        step_messages(path_candles("BTC/USDC", zigzag(n + 20)[n:], start=T0 + n * HOUR)), lambda c: 3.0
    )
    out = feed(state, [*plans_for(p, T0 + n * HOUR, 20), fresh_again, *more], fill)
    assert buys(out)


def test_stale_feed_still_lets_a_stop_loss_exit(profile: Profile) -> None:
    p = open_thresholds(profile, 0.99, 0.99)
    state = new_state(PID, p, "USDC", frozenset({0}), max_publish_lag_s=125.0)
    stale = FeedStateChanged(id="s", event_time=dt(T0), correlation_id="feed", state="stale", reason="silent")
    crash = [100, 100, 90]  # -10 %: below the stop loss
    market = _live(step_messages(path_candles("BTC/USDC", crash)), lambda close: 3.0)
    out = feed(state, [*plans_for(p, T0, 3), *hold("BTC/USDC", "1", 100), stale, *market], fill)
    sells = [i for i in of_type(out, PlaceOrder) if i.side == "sell"]
    assert [i.reason for i in sells] == ["stop_loss"]


def test_live_warm_up_before_the_registrys_first_epoch_is_learnt_from_not_waited_for(
    profile: Profile,
) -> None:
    """A live start publishes history from before the first epoch the registry plans (it plans live epochs on
    the exchange's clock, never past ones): those steps warm the models up instead of blocking the worker."""
    p = open_thresholds(profile, 0.1, 0.1)
    n, live_from = 60, 40
    state = new_state(PID, p, "USDC", frozenset({0}), max_publish_lag_s=125.0)
    cutoff = T0 + live_from * HOUR
    market = _live(
        step_messages(path_candles("BTC/USDC", zigzag(n))), lambda c: 6 * HOUR if c <= cutoff else 3.0
    )
    out = feed(state, [*plans_for(p, cutoff, n - live_from), *market], fill)
    assert steps_done(out) == [T0 + i * HOUR for i in range(n)]  # every step marked, none waits forever
    assert all(int(i.step_time.timestamp()) >= cutoff for i in of_type(out, PlaceOrder))
    # Warmed up: the first live steps trade as a replay with plans all along does at those steps.
    replay = [i for i in buys(_trend_run(p, n)) if int(i.step_time.timestamp()) >= cutoff]
    assert [(i.step_time, i.signal) for i in buys(out)][:1] == [(i.step_time, i.signal) for i in replay][:1]


def test_a_replay_step_without_its_plan_still_waits_for_it(profile: Profile) -> None:
    state = fresh(profile)
    feed(state, [plan(PID, (T0 + 2 * HOUR) // HOUR)])
    assert steps_done(feed(state, step_messages(path_candles("BTC/USDC", [100, 101, 102])))) == []
