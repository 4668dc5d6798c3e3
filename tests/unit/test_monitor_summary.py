"""The run summary (services/monitor/domain.py): the books balance, copies count once, wins, drawdown."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from decimal import ROUND_DOWN, Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.monitor.domain import RunData, fill_records, summarize
from shared.config import AppConfig
from shared.messages import InternalCrossOpportunity, Message, OrderUpdated
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


def test_opposite_side_pairs_inside_the_window_are_counted(cfg: AppConfig) -> None:
    window_ms = int(cfg.system.arbiter.conflict_window_s * 1000)
    msgs: list[Message] = [
        _submitted("profile_a", "buy", 0),
        _submitted("profile_b", "sell", window_ms - 1),
        _submitted("profile_b", "sell", window_ms + 5_000),  # outside a's window
    ]
    assert summary(cfg, msgs)["desync"]["opposite_side_pairs_within_window"] == 1


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
