"""The paper exchange's volume bound, partial fills, order_timeout and maker fees (services/execution/domain.py),
and the strategy's accounting of partly filled orders (services/strategy/domain.py)."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.execution.domain import PaperState, decide, new_state
from services.strategy import domain as strategy
from shared.config import ExecutionSettings, Profile
from shared.messages import CandleClosed, ExecuteOrder, Message, OrderFilled, OrderUpdated, PlaceOrder
from tests.unit import builders
from tests.unit.builders import (
    HOUR,
    T0,
    D,
    config,
    execute_order,
    manual_fill,
    of_type,
    path_candles,
    plans_covering,
    replay_finished,
    step_messages,
    tune,
)

PID = "profile_a"
EIGHT = Decimal("0.00000001")
CFG = config()
TERMINAL = ("filled", "cancelled", "rejected")


def paper(
    *, timeout: float = 45, participation: float = 0.1, cash: Any = None, slippage: float | None = None
) -> PaperState:
    p = CFG.profiles[PID]
    tp: dict[str, Any] = {"order_timeout": timeout}
    if slippage is not None:
        tp["slippage_tolerance"] = slippage
    p = tune(p, trading_params=tp)
    if cash is not None:
        p = tune(p, paper={"initial_quote_balance": cash})
    settings_ = CFG.system.execution.model_copy(update={"max_volume_participation": participation})
    return new_state(PID, p, settings_, frozenset({0}))


def candle(t: int, open_: Any, high: Any = None, low: Any = None, *, volume: Any) -> CandleClosed:
    return builders.candle("BTC/USDC", t, open_, high, low, volume=volume)


def run(state: PaperState, msgs: list[Message]) -> list[Message]:
    out: list[Message] = []
    for m in msgs:
        out.extend(decide(state, m, 0))
    return out


def statuses(out: list[Message]) -> list[str]:
    return [u.status for u in of_type(out, OrderUpdated)]


def limit_order(side: str, size: Any, limit: Any, at: int) -> ExecuteOrder:
    o = execute_order(PID, side, size=size, price=limit, not_before=at)
    return o.model_copy(update={"order_type": "limit", "limit_price": D(limit)})


def taker_rate() -> Decimal:
    return D(CFG.system.execution.taker_fee_rate)


def maker_rate() -> Decimal:
    return D(CFG.system.execution.maker_fee_rate)


# ------------------------------------------------------------------------------------------ volume bound
def test_order_larger_than_its_share_of_a_thin_candle_fills_partly_and_the_rest_is_cancelled_at_order_timeout() -> (
    None
):
    state = paper(timeout=45)  # hourly candles: the next one opens long after the timeout
    cash0 = state.cash
    order = execute_order(PID, "buy", size="3", not_before=T0)
    out = run(state, [order, *step_messages([candle(T0, 100, volume=10)])])
    (fill,) = of_type(out, OrderFilled)
    assert fill.size == D(1)  # 10 % of the candle's 10 BTC
    assert statuses(out) == ["submitted", "partially_filled", "cancelled"]
    cancelled = of_type(out, OrderUpdated)[-1]
    assert cancelled.filled_size == D(1) and cancelled.fee == fill.fee and cancelled.price == fill.price
    assert "order_timeout 45s" in cancelled.reason and "filled 1 of 3" in cancelled.reason
    assert cancelled.event_time == state.orders[order.client_order_id].deadline
    assert state.cash == cash0 - fill.price * fill.size - fill.fee
    assert state.positions == {"BTC/USDC": D(1)}
    assert state.waiting == []


def test_rest_of_a_partial_order_continues_on_the_next_candles_until_filled() -> None:
    state = paper(timeout=4 * HOUR)
    cash0 = state.cash
    order = execute_order(PID, "buy", size="2.5", not_before=T0)
    market = [
        candle(T0, 100, volume=10),
        candle(T0 + HOUR, 110, volume=10),
        candle(T0 + 2 * HOUR, 120, volume=10),
    ]
    out = run(state, [order, *step_messages(market)])
    fills = of_type(out, OrderFilled)
    assert [f.size for f in fills] == [D(1), D(1), D("0.5")]
    assert [f.event_time for f in fills] == [
        max(state.orders[order.client_order_id].send_time, market[0].open_time),
        market[1].open_time,
        market[2].open_time,
    ]
    assert len({f.fill_id for f in fills}) == 3
    assert statuses(out) == ["submitted", "partially_filled", "partially_filled", "filled"]
    updates = of_type(out, OrderUpdated)
    assert len({u.id for u in updates}) == len(updates)  # each partial update is its own event
    assert [u.filled_size for u in updates[1:]] == [D(1), D(2), D("2.5")]
    for f in fills:  # each fill pays the taker fee on its own notional
        assert abs(f.fee - f.price * f.size * taker_rate()) <= EIGHT and f.liquidity == "taker"
    done = updates[-1]
    assert done.fee == sum(f.fee for f in fills)
    assert (
        done.price is not None and abs(done.price - sum(f.price * f.size for f in fills) / D("2.5")) <= EIGHT
    )
    assert state.cash == cash0 - sum(f.price * f.size + f.fee for f in fills)
    assert state.positions == {"BTC/USDC": D("2.5")}


def test_rest_still_open_at_order_timeout_is_cancelled_after_continuing() -> None:
    state = paper(timeout=1.5 * HOUR)  # trades on the first two candles, not the third
    order = execute_order(PID, "buy", size="5", not_before=T0)
    market = [candle(T0 + i * HOUR, 100, volume=10) for i in range(3)]
    out = run(state, [order, *step_messages(market)])
    assert [f.size for f in of_type(out, OrderFilled)] == [D(1), D(1)]
    cancelled = of_type(out, OrderUpdated)[-1]
    assert (cancelled.status, cancelled.filled_size) == ("cancelled", D(2))
    assert cancelled.event_time == state.orders[order.client_order_id].deadline
    assert state.positions == {"BTC/USDC": D(2)}


def test_candle_without_volume_fills_nothing_and_the_order_waits_for_the_next() -> None:
    state = paper(timeout=3 * HOUR)
    order = execute_order(PID, "sell", size="1", not_before=T0 + HOUR)
    state.positions["BTC/USDC"] = D(1)
    out = run(state, [order, *step_messages([candle(T0 + HOUR, 100, volume=0)])])
    assert of_type(out, OrderFilled) == [] and statuses(out) == ["submitted"]
    out = run(state, step_messages([candle(T0 + 2 * HOUR, 101, volume=50)]))
    (fill,) = of_type(out, OrderFilled)
    assert fill.size == D(1) and statuses(out) == ["filled"]
    assert state.positions == {}


def test_end_of_replay_cancels_the_rest_of_a_partly_filled_order_with_its_fills() -> None:
    state = paper(timeout=10 * HOUR)
    run(
        state,
        [execute_order(PID, "buy", size="3", not_before=T0), *step_messages([candle(T0, 100, volume=10)])],
    )
    out = run(state, [replay_finished(T0, 1)])
    (cancelled,) = of_type(out, OrderUpdated)
    assert (
        cancelled.status == "cancelled"
        and cancelled.filled_size == D(1)
        and "replay ended" in cancelled.reason
    )


def test_participation_setting_bounds_each_fill() -> None:
    state = paper(participation=0.5)
    out = run(
        state,
        [execute_order(PID, "buy", size="9", not_before=T0), *step_messages([candle(T0, 100, volume=10)])],
    )
    assert [f.size for f in of_type(out, OrderFilled)] == [D(5)]


def test_max_volume_participation_out_of_range_is_refused_naming_the_key() -> None:
    with pytest.raises(ValidationError, match="max_volume_participation"):
        ExecutionSettings(max_volume_participation=1.5)
    with pytest.raises(ValidationError, match="max_volume_participation"):
        ExecutionSettings(max_volume_participation=0)


# ------------------------------------------------------------------------------------------ maker vs taker
def test_resting_limit_buy_fills_at_its_limit_as_maker_and_pays_the_maker_fee() -> None:
    state = paper()
    order = limit_order("buy", "1", 98, T0)
    out = run(state, [order, *step_messages([candle(T0, 100, 101, 97, volume=100)])])  # trades through 98
    (fill,) = of_type(out, OrderFilled)
    assert (fill.price, fill.liquidity) == (D(98), "maker")
    assert fill.fee == (D(98) * maker_rate()).quantize(EIGHT)
    assert maker_rate() < taker_rate()
    assert statuses(out)[-1] == "filled"


def test_marketable_limit_buy_takes_liquidity_at_most_at_its_limit_and_pays_the_taker_fee() -> None:
    state = paper(slippage=0.01)
    order = limit_order("buy", "1", "100.05", T0)  # above the open: marketable on arrival
    out = run(state, [order, *step_messages([candle(T0, 100, 110, 99, volume=100)])])
    (fill,) = of_type(out, OrderFilled)
    assert fill.liquidity == "taker" and D(100) <= fill.price <= D("100.05")
    assert fill.price == D("100.05")  # the slippage (1 % of a wide candle) is capped by the limit
    assert fill.fee == (fill.price * taker_rate()).quantize(EIGHT)


def test_limit_sell_the_market_never_reaches_is_cancelled_unfilled_at_order_timeout() -> None:
    state = paper(timeout=2.5 * HOUR)
    state.positions["BTC/USDC"] = D(1)
    cash0 = state.cash
    order = limit_order("sell", "1", 120, T0)
    out = run(
        state, [order, *step_messages([candle(T0 + i * HOUR, 100, 119, 99, volume=100) for i in range(4)])]
    )
    assert of_type(out, OrderFilled) == []
    cancelled = of_type(out, OrderUpdated)[-1]
    assert (cancelled.status, cancelled.filled_size, cancelled.price) == ("cancelled", D(0), None)
    assert state.cash == cash0 and state.positions == {"BTC/USDC": D(1)}


def test_limit_order_needs_a_limit_price_and_a_market_order_takes_none() -> None:
    o = execute_order(PID, "buy", size="1", not_before=T0)
    with pytest.raises(ValidationError, match="limit_price"):
        ExecuteOrder.model_validate({**o.model_dump(), "order_type": "limit"})
    with pytest.raises(ValidationError, match="limit_price"):
        ExecuteOrder.model_validate({**o.model_dump(), "limit_price": D(1)})


# ------------------------------------------------------------------------------------------ properties
order_spec = st.tuples(
    st.integers(min_value=0, max_value=5),  # step it is decided at
    st.sampled_from(["buy", "sell"]),
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal("30"), places=4),
    st.sampled_from(["market", "market", "limit"]),
    st.decimals(min_value=Decimal("-0.05"), max_value=Decimal("0.05"), places=3),  # limit offset from 100
    st.sampled_from([Decimal(0), Decimal("0.5")]),  # internal share
)
candle_spec = st.tuples(
    st.decimals(min_value=Decimal("80"), max_value=Decimal("120"), places=2),
    st.decimals(min_value=0, max_value=Decimal("0.05"), places=3),
    st.decimals(min_value=0, max_value=Decimal("0.05"), places=3),
    st.decimals(min_value=0, max_value=Decimal("40"), places=3),
)


@settings(max_examples=150, deadline=None)
@given(
    orders=st.lists(order_spec, min_size=1, max_size=6),
    candles=st.lists(candle_spec, min_size=6, max_size=8),
    timeout=st.sampled_from([45.0, 1.5 * HOUR, 3 * HOUR, 20 * HOUR]),
    participation=st.sampled_from([0.05, 0.1, 0.5, 1.0]),
    held=st.decimals(min_value=0, max_value=Decimal("20"), places=3),
)
def test_fills_never_exceed_the_order_and_cash_and_positions_are_conserved(
    orders: list[tuple[int, str, Decimal, str, Decimal, Decimal]],
    candles: list[tuple[Decimal, Decimal, Decimal, Decimal]],
    timeout: float,
    participation: float,
    held: Decimal,
) -> None:
    state = paper(timeout=timeout, participation=participation, cash=3000)
    if held:
        state.positions["BTC/USDC"] = held
    cash0, pos0 = state.cash, held
    out: list[Message] = []
    for i, (open_, up, down, volume) in enumerate(candles):
        t = T0 + i * HOUR
        for k, (at, side, size, kind, offset, internal) in enumerate(orders):
            if at != i:
                continue
            o = execute_order(
                PID, side, size=size, not_before=t, intent_id=f"intent-{k}", internal_size=size * internal
            )
            if kind == "limit":
                o = o.model_copy(update={"order_type": "limit", "limit_price": D(100) * (1 + offset)})
            out += run(state, [o])
        c = candle(t, open_, open_ * (1 + up), open_ * (1 - down), volume=volume)
        out += run(state, step_messages([c]))
        assert state.cash >= 0 and all(v > 0 for v in state.positions.values())
    out += run(state, [replay_finished(T0 + (len(candles) - 1) * HOUR, len(candles))])

    fills = of_type(out, OrderFilled)
    assert len({f.fill_id for f in fills}) == len(fills)
    by_order: dict[str, list[OrderFilled]] = defaultdict(list)
    for f in fills:
        by_order[f.client_order_id].append(f)
    finals = [u for u in of_type(out, OrderUpdated) if u.status in TERMINAL]
    assert len(finals) == len(
        {u.client_order_id for u in of_type(out, OrderUpdated)}
    )  # every order ends, once
    for u in finals:
        got = sum((f.size for f in by_order[u.client_order_id]), Decimal(0))
        assert got <= u.size
        assert u.filled_size == got  # the final event tells exactly what filled
        assert u.fee == sum((f.fee for f in by_order[u.client_order_id]), Decimal(0))
        assert (u.status == "filled") == (got == u.size)
    spent = sum((f.price * f.size + f.fee for f in fills if f.side == "buy"), Decimal(0))
    received = sum((f.price * f.size - f.fee for f in fills if f.side == "sell"), Decimal(0))
    assert state.cash == cash0 - spent + received
    bought = sum((f.size for f in fills if f.side == "buy"), Decimal(0))
    sold = sum((f.size for f in fills if f.side == "sell"), Decimal(0))
    assert state.positions.get("BTC/USDC", Decimal(0)) == pos0 + bought - sold


# ------------------------------------------------------------------------------------------ strategy accounting
def test_strategy_accounts_a_partly_filled_then_cancelled_order_exactly_as_the_exchange() -> None:
    profile: Profile = CFG.profiles[PID]
    st_ = strategy.new_state(PID, profile, "USDC", frozenset({0}))
    hold = manual_fill(PID, "buy", product="BTC/USDC", size=10, price=100, at=T0 - 10 * 24 * HOUR)
    for m in [*plans_covering(PID, T0, T0 + 6 * HOUR, profile.profile_hash.hash_rotation_interval), *hold]:
        strategy.decide(st_, m, 0)
    ex = paper(timeout=45)
    ex.positions["BTC/USDC"] = D(10)
    out: list[Message] = []
    for m in step_messages(path_candles("BTC/USDC", [100, 97])):
        out += strategy.decide(st_, m, 0)
    cash_before = st_.cash  # the held position is applied by now
    assert st_.positions["BTC/USDC"].size == D(10)
    (intent,) = of_type(out, PlaceOrder)  # the stop loss sells the 10 BTC held
    assert (intent.side, intent.size) == ("sell", D(10))
    decision = int(intent.event_time.timestamp())
    order = execute_order(
        PID,
        "sell",
        size=intent.size,
        price=intent.reference_price,
        not_before=decision,
        intent_id=intent.intent_id,
    )
    thin = candle(decision, 97, volume=30)  # 10 % of 30: 3 of the 10 sell
    events = run(ex, [order, *step_messages([thin])])
    assert statuses(events)[-1] == "cancelled"
    (fill,) = of_type(events, OrderFilled)
    for m in [*events, *events, *step_messages([thin])]:  # redelivered: counted once
        strategy.decide(st_, m, 0)  # applied by the next step evaluated (closing after them)
    assert st_.positions["BTC/USDC"].size == ex.positions["BTC/USDC"] == D(7)
    assert st_.cash == cash_before + fill.price * fill.size - fill.fee
    assert st_.cash - cash_before == ex.cash - paper(timeout=45).cash
    assert st_.realized_pnl == (fill.price - 100) * fill.size
    assert intent.intent_id not in st_.pending  # the cancel ends the intent: the strategy goes on
