"""The shared book (shared/book.py): average-cost accounting against an exact reference, the verified-fill rule,
and the correlation with each caller's floor; and the report, the dashboards' tracker and a strategy worker
booking the same fills to the same numbers."""

from __future__ import annotations

import math
import random
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.monitor.domain import RunData, summarize
from services.monitor.metrics import PerformanceTracker
from services.strategy import domain as strategy
from shared import book
from shared.messages import OrderFilled
from tests.unit.builders import HOUR, T0, D, approval_of, candle, config, order_filled

SIZES = st.integers(1, 5000).map(lambda n: Decimal(n) / 100)
PRICES = st.integers(1, 200_000).map(lambda n: Decimal(n) / 100)
FEES = st.integers(0, 300).map(lambda n: Decimal(n) / 100)
FILLS = st.lists(st.tuples(st.sampled_from(["buy", "sell"]), SIZES, PRICES, FEES), max_size=30)


def fills_of(
    legs: list[tuple[str, Decimal, Decimal, Decimal]], profile: str = "profile_a"
) -> list[OrderFilled]:
    return [
        order_filled(profile, side, size=size, price=price, fee=fee, at=T0 + i * HOUR, fill_id=f"f{i}")
        for i, (side, size, price, fee) in enumerate(legs)
    ]


@settings(max_examples=200, deadline=None)
@given(FILLS)
def test_book_matches_an_exact_average_cost_reference(
    legs: list[tuple[str, Decimal, Decimal, Decimal]],
) -> None:
    b = book.Book.starting(D(1000))
    # The reference in exact fractions: size held, total cost of it, realised gain, cash.
    held, cost, realized, cash, closed = Fraction(0), Fraction(0), Fraction(0), Fraction(1000), 0
    for f in fills_of(legs):
        b.apply(f)
        size, price, fee = Fraction(f.size), Fraction(f.price), Fraction(f.fee)
        if f.side == "buy":
            held, cost, cash = held + size, cost + size * price, cash - size * price - fee
        else:
            sold = min(size, held)
            avg = cost / held if held else Fraction(0)
            realized += (price - avg) * sold
            held, cost, cash = held - sold, cost - avg * sold, cash + size * price - fee
            closed += 1
        assert b.positions.get("BTC/USDC", D(0)) == held
        assert b.cash == cash
        assert b.closed == closed
        assert math.isclose(float(b.realized), float(realized), rel_tol=1e-12, abs_tol=1e-9)
        if held:
            assert math.isclose(float(b.avg_price("BTC/USDC")), float(cost / held), rel_tol=1e-12)
    assert b.trades == len(legs)
    assert b.fees == sum((f for *_, f in legs), D(0))
    # The report's identity: cash is the initial balance plus proceeds minus costs and fees.
    assert b.cash == b.initial + b.sells - b.buys - b.fees


def test_book_fill_wins_charge_both_legs_fees_and_a_flat_sell_moves_cash_only() -> None:
    first = book.book_fill(None, "buy", D(2), D(100), D(1))
    assert first.holding == book.Holding(D(2), D(100), D(1)) and first.cash == D(-201)
    half = book.book_fill(first.holding, "sell", D(1), D("101.2"), D("0.5"))
    # Gain 1.2 against half the entry fee (0.5) plus its own fee (0.5): a win.
    assert (half.gain, half.sold, half.win) == (D("1.2"), D(1), True)
    assert half.holding == book.Holding(D(1), D(100), D("0.5"))
    rest = book.book_fill(half.holding, "sell", D(3), D("100.9"), D("0.5"))
    assert (rest.sold, rest.holding, rest.win) == (D(1), book.Holding(D(0), D(100), D(0)), False)  # 0.9 < 1
    flat = book.book_fill(None, "sell", D(1), D(50), D("0.1"))
    assert (flat.holding, flat.cash, flat.gain, flat.win) == (None, D("49.9"), D(0), False)
    with pytest.raises(ValueError, match="'short'"):
        book.book_fill(None, "short", D(1), D(1), D(0))


# ------------------------------------------------------------------------------------------ verified fills
def test_only_fills_an_approving_decision_covers_count() -> None:
    ok = order_filled("profile_a", "buy", size="1", fill_id="ok", at=T0)
    rest = order_filled("profile_a", "buy", size="1", fill_id="rest", at=T0 + 1, intent_id=ok.intent_id)
    over = order_filled("profile_a", "buy", size="1", fill_id="over", at=T0 + 2, intent_id=ok.intent_id)
    dup = over.model_copy(update={"fill_id": "dup", "id": "dup", "duplicate_of": "coid-2"})
    side = order_filled("profile_a", "sell", size="1", fill_id="side", at=T0 + 3, intent_id=ok.intent_id)
    forged = order_filled("profile_a", "buy", size="1", fill_id="forged", at=T0 + 4)  # no decision at all
    other = order_filled("profile_b", "buy", size="1", fill_id="other", at=T0 + 5, intent_id=ok.intent_id)
    rejected_fill = order_filled("profile_a", "buy", size="1", fill_id="rej", at=T0 + 6)
    decisions = book.first_decisions(
        [
            approval_of(ok, size="2"),
            approval_of(ok, size="100"),  # a later copy changes nothing: the first decision holds
            approval_of(rejected_fill, verdict="rejected"),
        ]
    )
    fills = [other, forged, side, dup, over, rest, ok, rejected_fill]
    counted, refused = book.verified_fills(fills, decisions)
    assert [f.fill_id for f in counted] == ["ok", "rest", "dup"]
    why = {f.fill_id: reason for f, reason in refused}
    assert set(why) == {"over", "side", "forged", "other", "rej"}
    assert "exceed the approved size 2" in why["over"]
    assert "sell BTC/USDC does not match the approved buy BTC/USDC" in why["side"]
    assert f"no approving decision of profile_a for intent {forged.intent_id}" == why["forged"]
    assert "no approving decision of profile_b" in why["other"]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), SIZES, st.booleans()), min_size=1, max_size=20), st.randoms())
def test_verified_fills_do_not_depend_on_reading_order(
    legs: list[tuple[int, Decimal, bool]], rnd: random.Random
) -> None:
    fills = [
        order_filled("profile_a", "buy", size=size, at=T0 + i, intent_id=f"i{k}", fill_id=f"f{i}")
        for i, (k, size, _) in enumerate(legs)
    ]
    decisions = [approval_of(f, size="10") for f in fills]
    counted, _ = book.verified_fills(fills, book.first_decisions(decisions))
    shuffled = fills[:]
    rnd.shuffle(shuffled)
    rnd.shuffle(decisions)
    again, _ = book.verified_fills(shuffled, book.first_decisions(decisions))
    assert [f.fill_id for f in again] == [f.fill_id for f in counted]
    for k in range(4):
        assert sum((f.size for f in counted if f.intent_id == f"i{k}"), D(0)) <= 10


def test_check_fill_counts_towards_the_order_and_leaves_duplicates_out() -> None:
    f = order_filled("profile_a", "buy", size="0.4")
    order = book.Order("BTC/USDC", "buy", D("1"))
    assert book.check_fill(f, order, D("0.5")) == ("counted", D("0.9"))
    assert book.check_fill(f, order, D("0.7")) == ("over_size", D("1.1"))
    assert book.check_fill(f.model_copy(update={"duplicate_of": "x"}), order, D(1)) == ("duplicate", D(1))
    assert book.check_fill(f, book.Order("ETH/USDC", "buy", D(1)), D(0))[0] == "mismatch"


# ------------------------------------------------------------------------------------------ correlation
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-0.1, 0.1), min_size=3, max_size=40),
    st.floats(0.5, 4),
    st.floats(-0.01, 0.01),
)
def test_pearson_is_symmetric_bounded_and_scale_free(xs: list[float], a: float, c: float) -> None:
    ys = [a * x + c for x in xs]
    r = book.pearson(xs, ys, floor=book.STEP_PNL_FLOOR)
    assert r == book.pearson(ys, xs, floor=book.STEP_PNL_FLOOR)
    if r is not None:
        assert -1.0 <= r <= 1.0
        assert r == pytest.approx(1.0, abs=1e-6)


def test_pearson_floors_and_alignment() -> None:
    assert book.pearson([1, 2], [1, 2], floor=0) is None
    assert book.pearson([1, 1, 1], [1, 2, 3], floor=0) is None
    # The last n points of each series when the lengths differ.
    assert book.pearson([9, 1, 2, 3], [2, 4, 6], floor=0) == pytest.approx(1.0)
    # A dust wiggle: real to the arbiter's guard, "never moved" to the dashboards.
    tiny = [1e-11, -1e-11, 2e-11, 0.0]
    assert book.pearson(tiny, tiny, floor=book.STEP_PNL_FLOOR) == pytest.approx(1.0)
    assert book.pearson(tiny, tiny, floor=book.EQUITY_RETURN_FLOOR) is None
    assert book.simple_returns([100.0, 110.0, 0.0, 5.0]) == pytest.approx([0.1, -1.0, 0.0])


# ------------------------------------------------------------------------------------------ one book
def test_the_report_the_tracker_and_a_strategy_worker_book_the_same_fills_alike() -> None:
    rnd = random.Random(7)
    legs: list[tuple[str, Any, Any, Any]] = []
    for _ in range(40):
        legs.append(
            (
                rnd.choice(["buy", "buy", "sell"]),
                D(rnd.randint(1, 400)) / 100,
                D(rnd.randint(9000, 11000)) / 100,
                D(rnd.randint(0, 50)) / 100,
            )
        )
    fills = fills_of(legs)
    forged = order_filled("profile_a", "buy", size="3", price="1", at=T0 + 5 * HOUR, fill_id="forged")
    msgs = [
        *(candle("BTC/USDC", T0 + i * HOUR, open=100, close=100 + i % 3) for i in range(len(legs) + 1)),
        *(approval_of(f) for f in fills),
        *fills,
        forged,
    ]
    cfg = config()
    data = RunData()
    data.add_all(msgs)
    report = summarize(cfg, data)["profiles"]["profile_a"]
    tracker = PerformanceTracker(
        {pid: D(str(p.paper.initial_quote_balance)) for pid, p in cfg.profiles.items()}
    )
    tracker.add_all(msgs)
    view = tracker.profile_view("profile_a")
    state = strategy.new_state("profile_a", cfg.profiles["profile_a"], "USDC", frozenset({0}))
    for f in fills:  # the worker refuses the forged fill before it books (test_strategy_domain)
        strategy._apply_fill(state, f)
    assert report["trades"] == view["trades"] == state.fills == len(fills)
    assert report["closed_trades"] == view["closed_trades"] == state.closed_trades
    assert report["wins"] == view["wins"] == state.wins
    assert D(report["realized_pnl"]) == D(view["realized_pnl"]) == state.realized_pnl.quantize(D("1e-8"))
    assert report["open_positions"] == view["open_positions"]
    assert {p: pos.size for p, pos in state.positions.items()} == {
        p: D(s) for p, s in report["open_positions"].items()
    }
    assert len(tracker.unverified["profile_a"]) == 1
