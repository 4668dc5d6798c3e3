"""The paper exchange (services/execution/domain.py): fill price, fees, de-sync, idempotence, balances."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.execution.domain import PaperState, decide, new_state
from shared.config import AppConfig, ExecutionSettings, Profile
from shared.messages import CandleClosed, Message, OrderFilled, OrderUpdated, WorkerFinished
from shared.orders import desync_delay_ms
from tests.unit import builders
from tests.unit.builders import (
    HOUR,
    T0,
    D,
    config,
    dt,
    execute_order,
    of_type,
    replay_finished,
    step_messages,
    tune,
)

PID = "profile_a"
EIGHT = Decimal("0.00000001")


def candle(
    product: str, open_time: int, *ohlc: Any, volume: Any = 1000, interval: int = HOUR
) -> CandleClosed:
    """A candle with ample volume unless the test is about volume: an order takes at most 10 % of it."""
    return builders.candle(product, open_time, *ohlc, volume=volume, interval=interval)


@pytest.fixture(scope="module")
def cfg() -> AppConfig:
    return config()


def paper(
    cfg: AppConfig, profile: Profile | None = None, settings_: ExecutionSettings | None = None
) -> PaperState:
    return new_state(PID, profile or cfg.profiles[PID], settings_ or cfg.system.execution, frozenset({0}))


def run(state: PaperState, msgs: list[Message]) -> list[Message]:
    out: list[Message] = []
    for m in msgs:
        out.extend(decide(state, m, 0))
    return out


def market(candles: list[CandleClosed]) -> list[Message]:
    return step_messages(candles)


def slip_of(c: CandleClosed, tol: Decimal) -> Decimal:
    return min(tol, (c.high - c.low) / c.open * Decimal("0.1"))


def tolerance(cfg: AppConfig) -> Decimal:
    return D(cfg.profiles[PID].trading_params.slippage_tolerance)


def taker(cfg: AppConfig) -> Decimal:
    return D(cfg.system.execution.taker_fee_rate)


# ------------------------------------------------------------------------------------------ price and fee
def test_buy_fills_at_next_candle_open_plus_slippage_and_pays_taker_fee(cfg: AppConfig) -> None:
    state = paper(cfg)
    decision = T0 + HOUR  # decided at the close of step T0
    order = execute_order(PID, "buy", size="2", not_before=decision)
    run(state, [order])
    nxt = candle("BTC/USDC", decision, 100, 102, 99, 101)
    out = run(state, market([candle("BTC/USDC", T0, 90, 95, 85, 100), nxt]))
    (fill,) = of_type(out, OrderFilled)
    tol = tolerance(cfg)
    expected = nxt.open * (1 + slip_of(nxt, tol))
    assert abs(fill.price - expected) <= EIGHT
    assert nxt.open < fill.price <= nxt.open * (1 + tol)
    assert abs(fill.fee - fill.price * fill.size * taker(cfg)) <= EIGHT
    (filled,) = [u for u in of_type(out, OrderUpdated) if u.status == "filled"]
    assert filled.price == fill.price and filled.fee == fill.fee and filled.filled_size == order.size
    assert fill.client_order_id == order.client_order_id


def test_sell_fills_below_open_by_the_slippage(cfg: AppConfig) -> None:
    state = paper(cfg)
    run(state, [execute_order(PID, "buy", size="1", not_before=T0)])
    run(state, market([candle("BTC/USDC", T0, 100, 100, 100, 100)]))
    run(state, [execute_order(PID, "sell", size="1", not_before=T0 + HOUR)])
    nxt = candle("BTC/USDC", T0 + HOUR, 200, 201, 199.5, 200)  # narrow range: slippage below the tolerance
    (fill,) = of_type(run(state, market([nxt])), OrderFilled)
    slip = slip_of(nxt, tolerance(cfg))
    assert slip < tolerance(cfg)
    assert abs(fill.price - nxt.open * (1 - slip)) <= EIGHT
    assert nxt.open * (1 - tolerance(cfg)) <= fill.price < nxt.open


prices = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("5000"), places=8, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    open_=prices,
    up=st.decimals(min_value=0, max_value=Decimal("0.2"), places=6),
    down=st.decimals(min_value=0, max_value=Decimal("0.2"), places=6),
    size=st.decimals(min_value=Decimal("0.001"), max_value=Decimal("1"), places=8),
    side=st.sampled_from(["buy", "sell"]),
    tol=st.sampled_from([0.0, 0.0005, 0.0015, 0.002, 0.1]),
)
def test_slippage_is_against_the_trader_and_bounded_by_the_tolerance(
    open_: Decimal, up: Decimal, down: Decimal, size: Decimal, side: str, tol: float
) -> None:
    cfg = config()
    profile = tune(cfg.profiles[PID], trading_params={"slippage_tolerance": tol})
    state = paper(cfg, profile)
    if side == "sell":  # hold the position first
        run(state, [execute_order(PID, "buy", size=size, not_before=T0 - HOUR)])
        run(state, market([candle("BTC/USDC", T0 - HOUR, 1, 1, 1, 1)]))
    c = candle(
        "BTC/USDC",
        T0,
        open_,
        (open_ * (1 + up)).quantize(EIGHT),
        max(EIGHT, (open_ * (1 - down)).quantize(EIGHT)),
    )
    out = run(state, [execute_order(PID, side, size=size, not_before=T0), *market([c])])
    (fill,) = of_type(out, OrderFilled)
    t = D(tol)
    assert c.low <= fill.price <= c.high  # no fill outside its candle's range
    if side == "buy":
        assert c.open <= fill.price <= c.open * (1 + t)
        assert abs(fill.price - min(c.high, c.open * (1 + slip_of(c, t)))) <= EIGHT
    else:
        assert c.open * (1 - t) <= fill.price <= c.open
        assert abs(fill.price - max(c.low, c.open * (1 - slip_of(c, t)))) <= EIGHT
    assert abs(fill.fee - fill.price * size * taker(cfg)) <= EIGHT / 2


def test_order_arriving_after_market_ran_ahead_fills_at_the_candle_after_its_decision(cfg: AppConfig) -> None:
    state = paper(cfg)
    candles = [candle("BTC/USDC", T0 + i * HOUR, 100 + i, 100 + i, 100 + i, 100 + i) for i in range(40)]
    run(state, market(candles))  # a replay publishes everything long before the orders come
    decision = T0 + 10 * HOUR
    out = run(state, [execute_order(PID, "buy", size="1", not_before=decision)])
    (fill,) = of_type(out, OrderFilled)
    assert fill.price == candles[10].open  # zero range: no slippage; candle 10 opens at the decision
    assert fill.event_time >= candles[10].open_time
    assert fill.event_time < candles[11].open_time


def test_order_waits_for_its_candle_and_its_step_watermark(cfg: AppConfig) -> None:
    state = paper(cfg)
    order = execute_order(PID, "buy", size="1", not_before=T0 + HOUR)
    out = run(state, [order])
    assert [u.status for u in of_type(out, OrderUpdated)] == ["submitted"]
    assert run(state, market([candle("BTC/USDC", T0, 50, 50, 50, 50)])) == []
    nxt = candle("BTC/USDC", T0 + HOUR, 60, 60, 60, 60)
    assert run(state, [nxt]) == []  # the step is not complete before its watermark
    out = run(state, market([nxt]))
    assert [f.price for f in of_type(out, OrderFilled)] == [nxt.open]


def test_candle_of_another_product_does_not_fill_the_order(cfg: AppConfig) -> None:
    state = paper(cfg)
    run(state, [execute_order(PID, "buy", product="ETH/USDC", size="1", not_before=T0)])
    assert of_type(run(state, market([candle("BTC/USDC", T0)])), OrderFilled) == []
    assert len(of_type(run(state, market([candle("ETH/USDC", T0 + HOUR)])), OrderFilled)) == 1


# ------------------------------------------------------------------------------------------ idempotence
def test_duplicate_execute_order_produces_nothing(cfg: AppConfig) -> None:
    state = paper(cfg)
    order = execute_order(PID, "buy", size="1", not_before=T0)
    first = run(state, [order, *market([candle("BTC/USDC", T0)])])
    assert len(of_type(first, OrderFilled)) == 1
    cash, positions = state.cash, dict(state.positions)
    assert run(state, [order]) == []
    # A retry with a new message id but the same client order id is the same order too.
    retry = order.model_copy(update={"id": "retry-1"})
    assert run(state, [retry]) == []
    assert run(state, market([candle("BTC/USDC", T0 + HOUR)])) == []
    assert (state.cash, state.positions) == (cash, positions)


def test_duplicate_of_a_waiting_order_is_not_filled_twice(cfg: AppConfig) -> None:
    state = paper(cfg)
    order = execute_order(PID, "buy", size="1", not_before=T0)
    run(state, [order])
    assert run(state, [order]) == []
    assert len(of_type(run(state, market([candle("BTC/USDC", T0)])), OrderFilled)) == 1


def test_order_of_another_profile_is_ignored(cfg: AppConfig) -> None:
    state = paper(cfg)
    assert run(state, [execute_order("profile_b", "buy", not_before=T0)]) == []
    assert state.orders == {}


# ------------------------------------------------------------------------------------------ de-sync
@settings(max_examples=300, deadline=None)
@given(
    st.text(min_size=1, max_size=20),
    st.text(min_size=1, max_size=40),
    st.integers(0, 600_000),
    st.integers(0, 5000),
)
def test_desync_delay_is_within_bounds_and_deterministic(seed: str, intent: str, lo: int, width: int) -> None:
    hi = lo + width
    d = desync_delay_ms(seed, intent, lo, hi)
    assert lo <= d <= hi
    assert desync_delay_ms(seed, intent, lo, hi) == d


def test_desync_delay_spreads_over_the_range_and_differs_by_seed() -> None:
    delays = [desync_delay_ms("seed", f"intent-{i}", 50, 1500) for i in range(200)]
    assert len(set(delays)) > 50
    assert min(delays) < 300 and max(delays) > 1250
    other = [desync_delay_ms("another", f"intent-{i}", 50, 1500) for i in range(200)]
    assert other != delays


def test_submitted_order_is_sent_after_its_desync_delay(cfg: AppConfig) -> None:
    s = cfg.system.execution
    state = paper(cfg)
    order = execute_order(PID, "buy", size="1", not_before=T0)
    (sub,) = of_type(run(state, [order]), OrderUpdated)
    delay = desync_delay_ms(
        cfg.profiles[PID].profile_hash.base_hash, order.intent_id, s.desync_min_ms, s.desync_max_ms
    )
    assert s.desync_min_ms <= delay <= s.desync_max_ms
    assert sub.status == "submitted"
    assert sub.event_time == order.not_before + timedelta(milliseconds=delay)
    assert str(delay) in sub.reason
    (fill,) = of_type(run(state, market([candle("BTC/USDC", T0)])), OrderFilled)
    assert fill.event_time == sub.event_time  # sent after the delay, at the candle's open price


def test_equal_desync_bounds_give_that_delay(cfg: AppConfig) -> None:
    settings_ = ExecutionSettings(desync_min_ms=250, desync_max_ms=250)
    state = paper(cfg, settings_=settings_)
    order = execute_order(PID, "buy", not_before=T0)
    (sub,) = of_type(run(state, [order]), OrderUpdated)
    assert sub.event_time == order.not_before + timedelta(milliseconds=250)


# ------------------------------------------------------------------------------------------ balances
def test_buy_beyond_cash_is_rejected_with_the_reason(cfg: AppConfig) -> None:
    state = paper(cfg)
    cash = state.cash
    out = run(
        state, [execute_order(PID, "buy", size="1000", not_before=T0), *market([candle("BTC/USDC", T0)])]
    )
    assert of_type(out, OrderFilled) == []
    (rej,) = [u for u in of_type(out, OrderUpdated) if u.status == "rejected"]
    assert "insufficient funds" in rej.reason
    assert state.cash == cash and state.positions == {}


def test_sell_without_position_is_rejected_with_the_reason(cfg: AppConfig) -> None:
    state = paper(cfg)
    out = run(state, [execute_order(PID, "sell", size="1", not_before=T0), *market([candle("BTC/USDC", T0)])])
    assert of_type(out, OrderFilled) == []
    (rej,) = [u for u in of_type(out, OrderUpdated) if u.status == "rejected"]
    assert "insufficient position" in rej.reason


def test_sell_beyond_position_is_rejected(cfg: AppConfig) -> None:
    state = paper(cfg)
    run(state, [execute_order(PID, "buy", size="1", not_before=T0), *market([candle("BTC/USDC", T0)])])
    out = run(
        state,
        [
            execute_order(PID, "sell", size="1.5", not_before=T0 + HOUR),
            *market([candle("BTC/USDC", T0 + HOUR)]),
        ],
    )
    assert [u.status for u in of_type(out, OrderUpdated)] == ["submitted", "rejected"]
    assert state.positions == {"BTC/USDC": Decimal("1")}


def test_balances_after_buy_and_sell(cfg: AppConfig) -> None:
    state = paper(cfg)
    initial = state.cash
    buy = of_type(
        run(
            state,
            [
                execute_order(PID, "buy", size="3", not_before=T0),
                *market([candle("BTC/USDC", T0, 100, 103, 99, 102)]),
            ],
        ),
        OrderFilled,
    )[0]
    assert state.positions == {"BTC/USDC": Decimal("3")}
    assert state.cash == initial - buy.price * buy.size - buy.fee
    part = of_type(
        run(
            state,
            [
                execute_order(PID, "sell", size="1", not_before=T0 + HOUR),
                *market([candle("BTC/USDC", T0 + HOUR, 110, 111, 108, 109)]),
            ],
        ),
        OrderFilled,
    )[0]
    assert state.positions == {"BTC/USDC": Decimal("2")}
    rest = of_type(
        run(
            state,
            [
                execute_order(PID, "sell", size="2", not_before=T0 + 2 * HOUR),
                *market([candle("BTC/USDC", T0 + 2 * HOUR, 90, 92, 85, 91)]),
            ],
        ),
        OrderFilled,
    )[0]
    assert state.positions == {}
    expected = initial - (buy.price * 3 + buy.fee) + (part.price * 1 - part.fee) + (rest.price * 2 - rest.fee)
    assert state.cash == expected


# ------------------------------------------------------------------------------------------ end of replay
def test_end_of_replay_cancels_waiting_orders_then_finishes_once(cfg: AppConfig) -> None:
    state = paper(cfg)
    run(state, market([candle("BTC/USDC", T0)]))
    order = execute_order(PID, "buy", size="1", not_before=T0 + HOUR)  # the next candle never comes
    run(state, [order])
    out = run(state, [replay_finished(T0, 1)])
    assert [type(m).__name__ for m in out] == ["OrderUpdated", "WorkerFinished"]
    (cancel,) = of_type(out, OrderUpdated)
    assert cancel.status == "cancelled" and cancel.client_order_id == order.client_order_id
    assert cancel.reason
    assert of_type(run(state, [replay_finished(T0, 1)]), WorkerFinished) == []
    # An order arriving after the end is cancelled at once, without a second WorkerFinished.
    late = execute_order(PID, "sell", size="1", not_before=T0 + 2 * HOUR)
    statuses = [u.status for u in of_type(run(state, [late]), OrderUpdated)]
    assert statuses == ["submitted", "cancelled"]


def test_end_of_replay_still_fills_orders_whose_candle_is_known(cfg: AppConfig) -> None:
    state = paper(cfg)
    run(state, market([candle("BTC/USDC", T0 + i * HOUR) for i in range(3)]))
    run(state, [replay_finished(T0 + 2 * HOUR, 3)])
    out = run(state, [execute_order(PID, "buy", size="1", not_before=T0 + HOUR)])
    assert len(of_type(out, OrderFilled)) == 1
    assert "cancelled" not in [u.status for u in of_type(out, OrderUpdated)]


# ------------------------------------------------------------------------------------------ issue 5
def test_delay_is_seeded_from_the_plan_hash_the_order_carries(cfg: AppConfig) -> None:
    s = cfg.system.execution
    state = paper(cfg)
    h = "cd" * 32
    order = execute_order(PID, "buy", not_before=T0, profile_hash=h)
    (sub,) = of_type(run(state, [order]), OrderUpdated)
    delay = desync_delay_ms(h, order.intent_id, s.desync_min_ms, s.desync_max_ms)
    assert sub.event_time == order.not_before + timedelta(milliseconds=delay)


def test_delayed_order_is_sent_at_not_before_plus_delay_and_trades_at_its_decisions_candle(
    cfg: AppConfig,
) -> None:
    state = paper(cfg, settings_=ExecutionSettings(desync_min_ms=100, desync_max_ms=100))
    decision = T0 + HOUR
    order = execute_order(PID, "buy", size="1", decided_at=decision, not_before=decision + 0.7)  # +700 ms
    (sub,) = of_type(run(state, [order]), OrderUpdated)
    assert sub.event_time == dt(decision) + timedelta(milliseconds=800)
    c = candle("BTC/USDC", decision, 50, 50, 50, 50)
    out = run(
        state, market([candle("BTC/USDC", T0, 40, 40, 40, 40), c, candle("BTC/USDC", decision + HOUR, 70)])
    )
    (fill,) = of_type(out, OrderFilled)
    assert fill.price == c.open and fill.event_time == sub.event_time


def test_internal_only_order_settles_at_the_mid_without_fee_or_delay(cfg: AppConfig) -> None:
    state = paper(cfg)
    run(
        state,
        [execute_order(PID, "buy", size="1", not_before=T0 - HOUR), *market([candle("BTC/USDC", T0 - HOUR)])],
    )
    cash = state.cash
    order = execute_order(
        PID, "sell", size="1", not_before=T0, internal_size="1", counterparties=["profile_b"]
    )
    c = candle("BTC/USDC", T0, 100, 120, 90, 110)
    out = run(state, [order, *market([c])])
    (fill,) = of_type(out, OrderFilled)
    assert (fill.internal, fill.price, fill.fee, fill.event_time) == (True, c.open, 0, order.not_before)
    ups = of_type(out, OrderUpdated)
    assert [(u.status, u.internal) for u in ups] == [("submitted", True), ("filled", True)]
    assert ups[0].event_time == order.not_before and "profile_b" in ups[0].reason
    assert state.cash == cash + c.open and state.positions == {}


def test_partly_internal_order_has_an_internal_leg_and_an_exchange_leg(cfg: AppConfig) -> None:
    state = paper(cfg)
    order = execute_order(
        PID, "buy", size="0.5", not_before=T0, internal_size="0.3", counterparties=["profile_b"]
    )
    c = candle("BTC/USDC", T0, 100, 110, 95, 105)
    out = run(state, [order, *market([c])])
    internal, exchange = of_type(out, OrderFilled)
    assert (internal.internal, internal.size, internal.price, internal.fee) == (True, D("0.3"), c.open, 0)
    assert (exchange.internal, exchange.size) == (False, D("0.2"))
    assert exchange.price > c.open and exchange.fee == (exchange.price * D("0.2") * taker(cfg)).quantize(
        EIGHT
    )
    assert internal.fill_id != exchange.fill_id
    ups = of_type(out, OrderUpdated)
    assert [(u.status, u.internal) for u in ups] == [
        ("submitted", False),
        ("partially_filled", True),
        ("filled", False),
    ]
    assert ups[1].filled_size == D("0.3") and ups[2].filled_size == D("0.5")
    assert state.positions == {"BTC/USDC": D("0.5")}
    assert (
        state.cash
        == D(cfg.profiles[PID].paper.initial_quote_balance)
        - D("30")
        - exchange.price * D("0.2")
        - exchange.fee
    )


# ------------------------------------------------------------------------------------------ operator commands
def test_kill_cancels_waiting_orders_and_refuses_new_ones_until_resume(cfg: AppConfig) -> None:
    from shared.commands import new_command

    key = b"k" * 32
    state = paper(cfg)
    run(state, [execute_order(PID, "buy", size="1", not_before=T0, intent_id="i-waiting")])
    out = run(state, [new_command("kill", "all", key=key, now=T0)])
    assert [(u.intent_id, u.status) for u in of_type(out, OrderUpdated)] == [("i-waiting", "cancelled")]
    refused = run(state, [execute_order(PID, "buy", size="1", not_before=T0, intent_id="i-new")])
    assert [
        (u.status, u.reason.startswith("killed by operator command")) for u in of_type(refused, OrderUpdated)
    ] == [("rejected", True)]
    assert run(state, [new_command("kill", "profile_b", key=key, now=T0)]) == []  # another profile's kill
    run(state, [new_command("resume", PID, key=key, now=T0)])
    out = run(state, [execute_order(PID, "buy", size="1", not_before=T0, intent_id="i-after")])
    assert [u.status for u in of_type(out, OrderUpdated)] == ["submitted"]
