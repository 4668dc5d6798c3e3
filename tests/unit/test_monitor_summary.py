"""The run summary (services/monitor/domain.py): the books balance, copies count once, wins, drawdown."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.monitor.domain import (
    EXIT_REASONS,
    RunData,
    fill_records,
    opposite_side_pairs,
    order_records,
    summarize,
    working_orders,
)
from shared.config import AppConfig
from shared.messages import InternalCrossOpportunity, Message, OrderFilled, OrderUpdated, ProfileHalted
from tests.unit.builders import (
    HOUR,
    T0,
    D,
    approval_of,
    candle,
    config,
    decided,
    dt,
    manual_fill,
    order_filled,
    order_updated,
    place_order,
)

PID = "profile_a"
EIGHT = Decimal("0.00000001")


@pytest.fixture(scope="module")
def cfg() -> AppConfig:
    return config()


def summary(cfg: AppConfig, msgs: list[Message]) -> dict[str, Any]:
    data = RunData()
    data.add_all(msgs)
    return summarize(cfg, data)


def closes_path(product: str, closes: list[Any]) -> list[Message]:
    return [candle(product, T0 + i * HOUR, c, c, c, c) for i, c in enumerate(closes)]


# ------------------------------------------------------------------------------------------ accounting
ops = st.lists(
    st.tuples(
        st.sampled_from(["BTC/USDC", "ETH/USDC"]),
        st.booleans(),  # buy?
        # the size of a buy, or a sell's share of the position (amount / 5)
        st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("5"), places=8),
        st.decimals(min_value=Decimal("0.01"), max_value=Decimal("70000"), places=8),  # price
        st.decimals(min_value=Decimal(0), max_value=Decimal("50"), places=8),  # fee
    ),
    max_size=25,
)
closes = st.lists(
    st.decimals(min_value=Decimal("0.01"), max_value=Decimal("70000"), places=8), min_size=1, max_size=8
)


@settings(max_examples=200, deadline=None)
@given(ops, closes, closes)
def test_books_balance_for_any_fill_sequence(
    operations: list[tuple[str, bool, Decimal, Decimal, Decimal]], btc: list[Decimal], eth: list[Decimal]
) -> None:
    cfg = config()
    initial = D(cfg.profiles[PID].paper.initial_quote_balance)
    msgs: list[Message] = [*closes_path("BTC/USDC", btc), *closes_path("ETH/USDC", eth)]
    pos: dict[str, Decimal] = defaultdict(Decimal)
    avg: dict[str, Decimal] = defaultdict(Decimal)
    buys = sells = fees = realized = Decimal(0)
    n = 0
    for i, (product, is_buy, amount, price, fee) in enumerate(operations):
        if is_buy:
            size = amount
            avg[product] = (avg[product] * pos[product] + size * price) / (pos[product] + size)
            pos[product] += size
            buys += size * price
        else:
            share = min(Decimal(1), amount / 5)  # a sell never exceeds the position
            size = (pos[product] * share).quantize(EIGHT, rounding=ROUND_DOWN)
            if size <= 0:
                continue
            realized += (price - avg[product]) * size
            pos[product] -= size
            sells += size * price
        fees += fee
        n += 1
        at = T0 + i * 1000 + 7  # fills between and after the candle closes, in order
        msgs.extend(
            manual_fill(
                PID, "buy" if is_buy else "sell", product=product, size=size, price=price, fee=fee, at=at
            )
        )
    marks = {"BTC/USDC": btc[-1], "ETH/USDC": eth[-1]}
    # The mark is the last close at or before the end of the run: the longer series' last, or the shorter's.
    open_value = sum((pos[p] * marks[p] for p in pos if pos[p]), Decimal(0))
    expected_final = initial + sells - buys - fees + open_value

    s = summary(cfg, msgs)["profiles"][PID]
    assert s["trades"] == n
    assert D(s["buy_costs"]) == buys
    assert D(s["sell_proceeds"]) == sells
    assert D(s["fees"]) == fees
    assert {k: D(v) for k, v in s["open_positions"].items()} == {p: q for p, q in pos.items() if q}
    assert {k: D(v) for k, v in s["mark_prices"].items()} == {p: marks[p] for p in pos if pos[p]}
    assert D(s["final_equity"]) == expected_final.quantize(EIGHT)
    assert D(s["realized_pnl"]) == realized.quantize(EIGHT)
    assert len(s["equity_curve"]) == max(len(btc), len(eth))  # one point per step close
    assert s["closed_trades"] == sum(1 for o in operations if not o[1]) - (len(operations) - n)


def test_final_equity_values_open_positions_at_the_last_close(cfg: AppConfig) -> None:
    msgs: list[Message] = [
        *closes_path("BTC/USDC", [100, 110, 120]),
        *manual_fill(PID, "buy", size="2", price="100.5", fee="1.25", at=T0 + 10),
    ]
    s = summary(cfg, msgs)["profiles"][PID]
    initial = D(cfg.profiles[PID].paper.initial_quote_balance)
    assert D(s["final_equity"]) == initial - D("201") - D("1.25") + 2 * D(120)
    assert s["mark_prices"] == {"BTC/USDC": "120"}


def test_profile_without_fills_ends_at_its_initial_equity(cfg: AppConfig) -> None:
    s = summary(cfg, closes_path("BTC/USDC", [100, 90]))["profiles"]
    for pid, p in cfg.enabled_profiles().items():
        assert D(s[pid]["final_equity"]) == D(p.paper.initial_quote_balance)
        assert s[pid]["trades"] == 0 and s[pid]["max_drawdown_pct"] == 0.0


# ------------------------------------------------------------------------------------------ de-duplication
def test_redelivered_messages_count_once(cfg: AppConfig) -> None:
    buy = manual_fill(PID, "buy", size="1", price="100", fee="0.6", at=T0 + 10)
    sell = manual_fill(PID, "sell", size="1", price="110", fee="0.66", at=T0 + HOUR + 10)
    intent = place_order(PID, "buy", step=T0)
    candles = closes_path("BTC/USDC", [100, 110])
    once = summary(cfg, [*candles, *buy, *sell, intent])
    twice = summary(cfg, [*candles, *buy, *sell, intent, *buy, *candles, *sell, intent])
    assert twice == once
    assert once["profiles"][PID]["trades"] == 2
    assert once["counters"]["intents"] == 1
    assert D(once["profiles"][PID]["fees"]) == D("1.26")


def test_deduplication_is_by_type_and_id_not_by_content(cfg: AppConfig) -> None:
    a = manual_fill(PID, "buy", size="1", price="100", at=T0 + 10, fill_id="f1")
    b = manual_fill(PID, "buy", size="1", price="100", at=T0 + 20, fill_id="f2")  # same content, new id
    s = summary(cfg, [*closes_path("BTC/USDC", [100]), *a, *b])["profiles"][PID]
    assert s["trades"] == 2
    assert s["open_positions"] == {"BTC/USDC": "2"}


# ------------------------------------------------------------------------------------------ unapproved fills
def test_fill_without_an_approving_decision_moves_no_books_and_is_counted(cfg: AppConfig) -> None:
    candles = closes_path("BTC/USDC", [100, 110])
    real = manual_fill(PID, "buy", size="1", price="100", fee="0.6", at=T0 + 10)
    forged = order_filled(PID, "buy", size="5", price="100", at=T0 + 20, intent_id="forged-intent")
    on_rejected = manual_fill(PID, "buy", size="2", price="100", at=T0 + 30)
    rejected = on_rejected[0].model_copy(update={"verdict": "rejected"})
    honest = summary(cfg, [*candles, *real])
    s = summary(cfg, [*candles, *real, forged, rejected, on_rejected[1]])
    assert s["profiles"] == honest["profiles"]
    assert (s["counters"]["unverified_fills"], honest["counters"]["unverified_fills"]) == (2, 0)
    data = RunData()
    data.add_all([*real, forged])
    assert [r["fill_id"] for r in fill_records(data)] == [real[1].id]


def test_fills_beyond_the_approved_size_or_of_another_product_are_left_out(cfg: AppConfig) -> None:
    first = order_filled(PID, "buy", size="1", price="100", at=T0 + 10, intent_id="i1", fill_id="f1")
    extra = order_filled(PID, "buy", size="1", price="100", at=T0 + 20, intent_id="i1", fill_id="f2")
    other = order_filled(
        PID, "buy", product="ETH/USDC", size="1", price="50", at=T0 + 30, intent_id="i1", fill_id="f3"
    )
    s = summary(cfg, [*closes_path("BTC/USDC", [100]), approval_of(first, size="1.5"), first, extra, other])
    assert s["profiles"][PID]["open_positions"] == {"BTC/USDC": "1"}
    assert s["counters"]["unverified_fills"] == 2


# ------------------------------------------------------------------------------------------ wins
def test_win_needs_the_gain_to_exceed_both_legs_fees(cfg: AppConfig) -> None:
    msgs: list[Message] = [
        *closes_path("BTC/USDC", [100, 100, 100]),
        # BTC: gain 3 > fees 1 + 1: a win.
        *manual_fill(PID, "buy", product="BTC/USDC", size="1", price="100", fee="1", at=T0 + 1),
        *manual_fill(PID, "sell", product="BTC/USDC", size="1", price="103", fee="1", at=T0 + 2),
        # ETH: gain 1 == fees 0.5 + 0.5: not a win.
        *manual_fill(PID, "buy", product="ETH/USDC", size="1", price="50", fee="0.5", at=T0 + 3),
        *manual_fill(PID, "sell", product="ETH/USDC", size="1", price="51", fee="0.5", at=T0 + 4),
        # SOL: a loss.
        *manual_fill(PID, "buy", product="SOL/USDC", size="1", price="10", fee="0", at=T0 + 5),
        *manual_fill(PID, "sell", product="SOL/USDC", size="1", price="9", fee="0", at=T0 + 6),
    ]
    s = summary(cfg, msgs)["profiles"][PID]
    assert (s["closed_trades"], s["wins"]) == (3, 1)
    assert s["win_rate"] == round(1 / 3, 4)
    assert D(s["realized_pnl"]) == D(3) + D(1) - D(1)


def test_partial_sells_share_the_entry_fee(cfg: AppConfig) -> None:
    msgs: list[Message] = [
        *closes_path("BTC/USDC", [100]),
        *manual_fill(PID, "buy", size="2", price="100", fee="2", at=T0 + 1),
        # gain 2, half the entry fee 1, own fee 1: not a win
        *manual_fill(PID, "sell", size="1", price="102", fee="1", at=T0 + 2),
        # gain 4, the other half 1, own fee 1: a win
        *manual_fill(PID, "sell", size="1", price="104", fee="1", at=T0 + 3),
    ]
    s = summary(cfg, msgs)["profiles"][PID]
    assert (s["closed_trades"], s["wins"]) == (2, 1)
    assert s["open_positions"] == {}


# ------------------------------------------------------------------------------------------ drawdown
def test_max_drawdown_on_a_hand_checked_equity_path(cfg: AppConfig) -> None:
    # 10 BTC bought at 100 without fee from 10 000: equity = 9 000 + 10 * close.
    path = [100, 120, 90, 130, 110]
    msgs: list[Message] = [
        *closes_path("BTC/USDC", path),
        *manual_fill(PID, "buy", size="10", price="100", at=T0 + 10),
    ]
    s = summary(cfg, msgs)["profiles"][PID]
    assert [e for _, e in s["equity_curve"]] == [10000.0, 10200.0, 9900.0, 10300.0, 10100.0]
    # Worst fall: from the 10 200 peak to 9 900, i.e. 300 / 10 200.
    assert s["max_drawdown_pct"] == float(round(Decimal(300) / Decimal(10200) * 100, 4))
    assert D(s["final_equity"]) == D(10100)
    assert s["return_pct"] == 1.0


def test_drawdown_measured_from_the_initial_equity_when_it_never_rises(cfg: AppConfig) -> None:
    msgs: list[Message] = [
        *closes_path("BTC/USDC", [95, 80, 90]),
        *manual_fill(PID, "buy", size="10", price="100", at=T0 + 10),
    ]
    s = summary(cfg, msgs)["profiles"][PID]
    # Equity 9 950, 9 800, 9 900 against the initial 10 000: the worst is 200 / 10 000.
    assert s["max_drawdown_pct"] == 2.0


# ------------------------------------------------------------------------------------------ arbitration
def _submitted(
    profile: str, side: str, at_ms: int, *, product: str = "BTC/USDC", internal: bool = False
) -> OrderUpdated:
    i = place_order(profile, side, product=product, intent_id=f"{profile}-{side}-{product}-{at_ms}")
    return order_updated(i, "submitted", at=T0).model_copy(
        update={
            "event_time": dt(T0) + timedelta(milliseconds=at_ms),
            "internal": internal,
            "id": f"u-{i.intent_id}",
            "client_order_id": f"c-{i.intent_id}",
        }
    )


def test_desync_report_measures_gaps_between_profiles_orders_on_a_product(cfg: AppConfig) -> None:
    msgs: list[Message] = [
        _submitted("profile_a", "buy", 0),
        _submitted("profile_a", "buy", 100),  # same profile: no gap counted
        _submitted("profile_b", "buy", 700),  # 600 ms after a's last
        _submitted("profile_a", "buy", 1000),  # 300 ms: below the 500 ms default
        _submitted("profile_b", "buy", 900, product="ETH/USDC"),  # alone on its product
        _submitted("profile_b", "sell", 1200, internal=True),  # an internal leg is not an exchange order
    ]
    d = summary(cfg, msgs)["desync"]
    assert d["gaps"] == {"pairs": 2, "min_ms": 300.0, "median_ms": 450.0, "p95_ms": 600.0}
    assert d["below_min"] == 1 and d["min_cross_profile_gap_ms"] == 500
    assert d["opposite_side_pairs_within_window"] == 0


def _traded(
    profile: str,
    side: str,
    at: int,
    fills_at: list[int],
    *,
    product: str = "BTC/USDC",
    internal: bool = False,
    reason: str = "entry",
) -> list[Message]:
    """An arbitrated order: intent, approval, `submitted` at T0 + at, then a fill at each T0 + fills_at
    (the parts of one order of size 1), carrying the intent's reason."""
    iid = f"{profile}-{side}-{product}-{at}"
    i = place_order(profile, side, product=product, intent_id=iid, reason=reason, size="1")
    u = order_updated(i, "submitted", at=T0 + at).model_copy(update={"internal": internal})
    fills = [
        order_filled(
            profile,
            side,
            product=product,
            size=D(1) / len(fills_at),
            at=T0 + t,
            intent_id=iid,
            fill_id=f"f-{iid}-{k}",
        ).model_copy(update={"internal": internal, "intent_reason": reason})
        for k, t in enumerate(fills_at)
    ]
    return [i, decided(i, "approved", "approved"), u, *fills]


def _desync(cfg: AppConfig, *orders: list[Message]) -> dict[str, Any]:
    d: dict[str, Any] = summary(cfg, [m for o in orders for m in o])["desync"]
    return d


def test_opposite_side_fill_inside_an_orders_working_life_is_a_pair(cfg: AppConfig) -> None:
    # A's buy is sent at 0 and fills part by part until 2 h; B's sell fills at 1.5 h. The sends are 90 min
    # apart (far beyond the 300 s window), but B traded while A's order was still filling.
    a = _traded("profile_a", "buy", 0, [0, 2 * HOUR])
    b = _traded("profile_b", "sell", 90 * 60, [90 * 60])
    d = _desync(cfg, a, b)
    assert d["opposite_side_pairs_within_window"] == 1
    assert d["protective_opposite_pairs_within_window"] == 0


def test_working_life_ends_a_window_after_the_last_fill(cfg: AppConfig) -> None:
    window = int(cfg.system.arbiter.conflict_window_s)
    a = _traded("profile_a", "buy", 0, [0, HOUR])
    inside = _traded("profile_b", "sell", HOUR + window - 1, [HOUR + window - 1])
    outside = _traded("profile_b", "sell", HOUR + window, [HOUR + window])
    assert _desync(cfg, a, inside)["opposite_side_pairs_within_window"] == 1
    assert _desync(cfg, a, outside)["opposite_side_pairs_within_window"] == 0


def test_a_pair_of_orders_counts_once_and_same_side_or_profile_or_product_not_at_all(cfg: AppConfig) -> None:
    a = _traded("profile_a", "buy", 0, [0, 60, 120])
    b = _traded("profile_b", "sell", 30, [30, 90])  # each fills inside the other's working life
    same_side = _traded("profile_b", "buy", 40, [40])
    other_product = _traded("profile_b", "sell", 70, [70], product="ETH/USDC")
    assert _desync(cfg, a, b, same_side, other_product)["opposite_side_pairs_within_window"] == 1
    same_profile = _traded("profile_a", "sell", 50, [50])
    assert _desync(cfg, a, same_profile)["opposite_side_pairs_within_window"] == 0


def test_internal_fills_are_exempt_from_the_opposite_side_count(cfg: AppConfig) -> None:
    a = _traded("profile_a", "buy", 0, [0])
    b = _traded("profile_b", "sell", 60, [60], internal=True)  # netted at the mid price: no exchange trade
    assert _desync(cfg, a, b)["opposite_side_pairs_within_window"] == 0


def test_an_order_without_fills_is_no_side_of_a_pair(cfg: AppConfig) -> None:
    a = _traded("profile_a", "buy", 0, [])  # sent, never filled (e.g. rejected for funds)
    b = _traded("profile_b", "sell", 60, [60])
    assert _desync(cfg, a, b)["opposite_side_pairs_within_window"] == 0


def _row(coid: str, profile: str, side: str, at: int, **kw: Any) -> dict[str, Any]:
    return {
        "client_order_id": coid,
        "intent_id": f"i-{coid}",
        "profile": profile,
        "product": "BTC/USDC",
        "side": side,
        "event_time": dt(T0 + at).isoformat().replace("+00:00", "Z"),
        "internal": False,
        **kw,
    }


def test_protective_orders_are_counted_apart() -> None:
    # A's buy works from its send at 0 until 60 s; B's stop loss rests at the exchange (first event `open`, no
    # arbiter decision) and fills at 30 s; C's sell, arbitrated, fills at 45 s.
    orders = [
        _row("a", "profile_a", "buy", 0, status="submitted", intent_reason="entry"),
        _row("b", "profile_b", "sell", -HOUR, status="open", intent_reason="stop_loss"),
        _row("c", "profile_c", "sell", 40, status="submitted", intent_reason="exit_signal"),
    ]
    fills = [
        _row("a", "profile_a", "buy", 0, intent_reason="entry"),
        _row("a", "profile_a", "buy", 60, intent_reason="entry"),
        _row("b", "profile_b", "sell", 30, intent_reason="stop_loss"),
        _row("c", "profile_c", "sell", 45, intent_reason="exit_signal"),
    ]
    working = {o.client_order_id: o for o in working_orders(orders, fills)}
    assert [working[k].protective for k in "abc"] == [False, True, False]
    assert working["b"].start_us == working["b"].fills_us[0]  # a protective order's life starts at its fill
    pairs = opposite_side_pairs(list(working.values()), 300 * 1_000_000)
    assert {(p.client_order_id, q.client_order_id) for p, q in pairs} == {("a", "b"), ("a", "c")}


def test_counters_of_decisions_and_internal_crosses(cfg: AppConfig) -> None:
    a = place_order("profile_a", "buy")
    b = place_order("profile_b", "sell")
    c = place_order("profile_b", "buy", product="ETH/USDC")
    opp = InternalCrossOpportunity(
        id="x1",
        event_time=dt(T0 + HOUR),
        correlation_id="s",
        intent_id=b.intent_id,
        profile="profile_b",
        product="BTC/USDC",
        buyer="profile_a",
        seller="profile_b",
        buy_intent_id=a.intent_id,
        sell_intent_id=b.intent_id,
        size=D("0.1"),
        price=D("100"),
        fee_saving=D("0.12"),
        slippage_saving=D("0.035"),
        saving=D("0.155"),
        executed=False,
        step_time=dt(T0),
    )
    msgs: list[Message] = [
        a,
        b,
        c,
        decided(a, "approved", "approved"),
        decided(b, "rejected", "opposite_side"),
        decided(c, "delayed", "crowding"),
        opp,
        opp,
    ]
    counters = summary(cfg, msgs)["counters"]
    assert (counters["intents"], counters["approved"], counters["rejected"], counters["delayed"]) == (
        3,
        1,
        1,
        1,
    )
    assert counters["rejected_by_rule"] == {"opposite_side": 1}
    assert counters["decisions_by_rule"] == {
        "approved": {"approved": 1},
        "delayed": {"crowding": 1},
        "rejected": {"opposite_side": 1},
    }
    assert counters["internal_cross_opportunities"] == 1 and counters["internal_cross_executed"] == 0
    assert counters["internal_cross_savings"] == {"fees": "0.12", "slippage": "0.035", "total": "0.155"}


# ------------------------------------------------------------------------------------------ exits, timeouts
def test_exits_by_reason_count_sell_orders_with_a_verified_fill(cfg: AppConfig) -> None:
    msgs: list[Message] = [
        *_traded(PID, "buy", 0, [0]),  # an entry: not an exit
        *_traded(PID, "sell", 100, [100, 200], reason="exit_signal"),  # two fills, one order
        *_traded(PID, "sell", 300, [300], reason="stop_loss"),
        *_traded(PID, "sell", 400, [400], reason="stop_loss"),
        *_traded(PID, "sell", 500, [500], reason="flatten", internal=True),  # internal legs count alike
        *_traded(PID, "sell", 600, [], reason="take_profit"),  # never filled
        *_traded("profile_b", "sell", 700, [700], reason="halt"),
        order_filled(PID, "sell", at=T0 + 800, intent_id="forged"),  # no approving decision: not verified
    ]
    s = summary(cfg, msgs)
    a, b = s["profiles"][PID]["exits_by_reason"], s["profiles"]["profile_b"]["exits_by_reason"]
    assert list(a) == list(EXIT_REASONS)
    assert a == {
        "exit_signal": 1,
        "stop_loss": 2,
        "take_profit": 0,
        "flatten": 1,
        "halt": 0,
        "manual": 0,
    }
    assert b == {r: int(r == "halt") for r in EXIT_REASONS}
    assert s["counters"]["exits_by_reason"] == {**a, "halt": 1}


def test_exit_of_an_old_message_without_a_reason_takes_its_intents_or_is_unknown(cfg: AppConfig) -> None:
    old = [
        m.model_copy(update={"intent_reason": None}) if isinstance(m, OrderFilled) else m
        for m in _traded(PID, "sell", 100, [100], reason="take_profit")
    ]
    lost = order_filled(PID, "sell", at=T0 + 200, intent_id="no-intent")
    s = summary(cfg, [*old, approval_of(lost), lost])["profiles"][PID]["exits_by_reason"]
    assert s["take_profit"] == 1 and s["unknown"] == 1


def test_orders_cancelled_at_order_timeout_are_counted(cfg: AppConfig) -> None:
    i = place_order(PID, "buy", intent_id="i1")
    j = place_order(PID, "buy", intent_id="i2")
    k = place_order("profile_b", "buy", intent_id="i3")
    timeout = order_updated(i, "cancelled").model_copy(
        update={
            "reason": "order_timeout 45s reached: filled 0.2 of 1 (at most 10% of a candle's volume per candle)"
        }
    )
    funds = order_updated(j, "cancelled").model_copy(update={"reason": "insufficient funds for the rest"})
    other = order_updated(k, "cancelled").model_copy(
        update={"reason": "order_timeout 60s reached: filled 0 of 1"}
    )
    s = summary(cfg, [i, j, k, timeout, funds, other, timeout.model_copy(update={"id": "again"})])
    assert s["profiles"][PID]["orders_timed_out"] == 1
    assert s["profiles"]["profile_b"]["orders_timed_out"] == 1
    assert s["counters"]["orders_timed_out"] == 2


# ------------------------------------------------------------------------------------------ intent reasons
def test_order_and_fill_records_carry_the_intent_reason(cfg: AppConfig) -> None:
    carried = _traded(PID, "sell", 100, [100], reason="stop_loss")
    # Old messages: no intent_reason on the events; the intent (PlaceOrder) of the run has it.
    old = [
        m.model_copy(update={"intent_reason": None}) if isinstance(m, OrderFilled | OrderUpdated) else m
        for m in _traded(PID, "sell", 200, [200], reason="exit_signal")
    ]
    # Neither the events nor the run know it.
    lost = order_filled(PID, "buy", at=T0 + 300, intent_id="no-intent")
    data = RunData()
    data.add_all([*carried, *old, approval_of(lost), lost])
    orders = {r["intent_id"]: r for r in order_records(data)}
    fills = {r["intent_id"]: r for r in fill_records(data)}
    assert all("intent_reason" in r for r in [*orders.values(), *fills.values()])
    first, second = (f"{PID}-sell-BTC/USDC-{t}" for t in (100, 200))
    assert orders[first]["intent_reason"] == "stop_loss" and fills[first]["intent_reason"] == "stop_loss"
    assert (
        orders[second]["intent_reason"] == "exit_signal" and fills[second]["intent_reason"] == "exit_signal"
    )
    assert fills["no-intent"]["intent_reason"] is None


def test_halts_say_when_why_until_and_which_kind(cfg: AppConfig) -> None:
    def halt(n: int, reason: str, until: int | None) -> ProfileHalted:
        return ProfileHalted(
            id=f"h{n}",
            event_time=dt(T0 + n * HOUR),
            correlation_id="c",
            profile=PID,
            reason=reason,
            until=dt(until) if until is not None else None,
        )

    msgs: list[Message] = [
        halt(3, "execution halted: key revoked", None),
        halt(1, "drawdown 25.10% >= max_drawdown_pct 25", None),
        halt(2, "daily loss 5.20% >= max_daily_loss_pct 5", T0 + 24 * HOUR),
    ]
    halts = summary(cfg, msgs)["profiles"][PID]["halts"]
    assert [(h["kind"], h["event_time"], h["until"]) for h in halts] == [
        ("drawdown", "2024-03-10T01:00:00Z", None),
        ("daily_loss", "2024-03-10T02:00:00Z", "2024-03-11T00:00:00Z"),
        ("other", "2024-03-10T03:00:00Z", None),
    ]
    assert halts[0]["reason"].startswith("drawdown") and halts[0]["at"] == halts[0]["event_time"]
