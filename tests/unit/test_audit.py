"""`mpctl audit` (mpctl/audit.py): each rule holds on tiny hand-built records and breaks when it should, and the
audit finds every rule's violations in the fixture of today's outputs (tests/fixtures/audit/README.md)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from mpctl.audit import (
    US,
    AuditReport,
    CandleBar,
    Candles,
    Fill,
    Limits,
    Order,
    OrderEvent,
    Run,
    audit,
    audit_run,
    check_fills_in_candle,
    check_halts,
    check_liquidity,
    check_no_look_ahead,
    check_reasons,
    check_stops,
    check_wash_trades,
)
from mpctl.cli import main
from shared.config import load_config

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "audit"
DATA = ROOT / "data" / "market"

D = Decimal
T0 = 1_627_776_000 * US  # 2021-08-01T00:00:00Z
H = 3600 * US
S = US
P = "BTC/USDC"


def bar(i: int, o: float, h: float, lo: float, c: float, v: float = 1000) -> CandleBar:
    return CandleBar(T0 + i * H, H, D(str(o)), D(str(h)), D(str(lo)), D(str(c)), D(str(v)))


def flat(n: int, price: float = 100, v: float = 1000) -> list[CandleBar]:
    """n quiet candles: the range stays within 0.2 % of the price."""
    return [bar(i, price, price * 1.001, price * 0.999, price, v) for i in range(n)]


def fill(
    profile: str,
    side: str,
    size: float,
    price: float,
    t: int,
    coid: str,
    *,
    product: str = P,
    reason: str | None = "entry",
    internal: bool = False,
) -> Fill:
    return Fill(
        profile,
        product,
        side,
        D(str(size)),
        D(str(price)),
        D(0),
        t,
        coid,
        f"intent-{coid}",
        internal=internal,
        intent_reason=reason,
        fill_id=f"fill-{coid}-{t}",
    )


def order(
    coid: str,
    profile: str,
    side: str,
    events: Sequence[tuple[str, int]],
    *,
    product: str = P,
    reason: str | None = "entry",
    cancel_reason: str = "",
) -> Order:
    o = Order(coid, profile, product, side, f"intent-{coid}")
    for status, t in events:
        o.events.append(
            OrderEvent(status, t, reason=cancel_reason if status == "cancelled" else "", intent_reason=reason)
        )
    return o


LIM = Limits(
    stop_loss_pct=D(1),
    take_profit_pct=D(2),
    slippage_tolerance=D("0.001"),
    max_open_positions=2,
    max_drawdown_pct=D(5),
    max_daily_loss_pct=D(50),
)


def make_run(
    fills: Sequence[Fill] = (),
    orders: Sequence[Order] = (),
    candles: dict[str, list[CandleBar]] | None = None,
    summary: dict[str, Any] | None = None,
    decided: Sequence[str] | None = None,
    limits: Limits = LIM,
) -> Run:
    os_ = {o.client_order_id: o for o in orders}
    return Run(
        orders=os_,
        fills=sorted(fills, key=lambda f: f.t),
        decided_intents=set(decided if decided is not None else (o.intent_id for o in orders)),
        summary=summary or {"profiles": {}},
        candles=Candles(candles if candles is not None else {P: flat(6)}),
        limits={"a": limits, "b": limits},
        max_volume_participation=D("0.1"),
        conflict_window_us=300 * S,
    )


def run_check(check: Any, run: Run) -> AuditReport:
    r = AuditReport()
    check(run, r)
    return r


# ------------------------------------------------------------------------------------------ rule 1
def test_rule1_fill_inside_the_candle_holds() -> None:
    r = run_check(check_fills_in_candle, make_run([fill("a", "buy", 1, 100.05, T0 + S, "o1")]))
    assert r.ok and r.checked["fills"] == 1


def test_rule1_fill_above_the_high_or_without_candle_breaks() -> None:
    fills = [
        fill("a", "buy", 1, 100.15, T0 + S, "o1"),  # high is 100.1
        fill("a", "buy", 1, 100, T0 + 10 * H, "o2"),  # no candle then
        fill("b", "sell", 1, 99.8, T0 + H + S, "o3", internal=True),  # low 99.9: internal fills too
    ]
    r = run_check(check_fills_in_candle, make_run(fills))
    assert r.counts["1-fill-in-candle"] == 3
    assert "priced 100.15 outside the candle" in r.examples["1-fill-in-candle"][0]


# ------------------------------------------------------------------------------------------ rule 2
def _stop_candles() -> dict[str, list[CandleBar]]:
    # Entry candle quiet; candle 1 reaches the stop (99) only; candle 2 quiet; candle 3 reaches both levels.
    return {
        P: [
            bar(0, 100, 100.1, 99.9, 100),
            bar(1, 100, 100.2, 98.5, 99),
            bar(2, 99, 99.1, 98.9, 99),
            bar(3, 100, 102.5, 98.0, 100),
        ]
    }


def test_rule2_stop_acting_on_the_candle_that_reaches_it_holds() -> None:
    fills = [
        fill("a", "buy", 1, 100, T0 + S, "o1"),
        fill("a", "sell", 1, 98.95, T0 + H + S, "o2", reason="stop_loss"),
    ]
    r = run_check(check_stops, make_run(fills, candles=_stop_candles()))
    assert r.ok and r.checked["stop/take-profit triggers"] == 1
    assert r.info["stop_exits"]["a"]["stop_exits"] == 1
    assert r.info["stop_exits"]["a"]["beyond_stop_and_slippage"] == 0


def test_rule2_exit_a_candle_late_breaks() -> None:
    fills = [
        fill("a", "buy", 1, 100, T0 + S, "o1"),
        fill("a", "sell", 1, 99, T0 + 2 * H + S, "o2", reason=None),
    ]
    r = run_check(check_stops, make_run(fills, candles=_stop_candles()))
    assert r.counts["2-stop-in-candle"] == 1
    assert "reached the stop level 99" in r.examples["2-stop-in-candle"][0]


def test_rule2_stop_filled_below_its_bound_breaks() -> None:
    # Bound: min(99, open 100) * (1 - 0.001) = 98.901; 98.6 is inside the candle but too far.
    fills = [
        fill("a", "buy", 1, 100, T0 + S, "o1"),
        fill("a", "sell", 1, 98.6, T0 + H + S, "o2", reason="stop_loss"),
    ]
    r = run_check(check_stops, make_run(fills, candles=_stop_candles()))
    assert r.counts["2-stop-price"] == 1
    assert r.info["stop_exits"]["a"]["beyond_stop_and_slippage"] == 1


def test_rule2_both_levels_on_one_candle_the_stop_must_act() -> None:
    candles = {P: [bar(0, 100, 100.1, 99.9, 100), bar(1, 100, 102.5, 98.0, 100)]}
    tp = [
        fill("a", "buy", 1, 100, T0 + S, "o1"),
        fill("a", "sell", 1, 102, T0 + H + S, "o2", reason="take_profit"),
    ]
    sl = [
        fill("a", "buy", 1, 100, T0 + S, "o1"),
        fill("a", "sell", 1, 99, T0 + H + S, "o2", reason="stop_loss"),
    ]
    assert run_check(check_stops, make_run(tp, candles=candles)).counts["2-stop-first"] == 1
    assert run_check(check_stops, make_run(sl, candles=candles)).ok


# ------------------------------------------------------------------------------------------ rule 3
def test_rule3_orders_one_after_the_other_hold() -> None:
    orders = [
        order("o1", "a", "buy", [("submitted", T0 + S), ("filled", T0 + S)]),
        order("o2", "a", "sell", [("submitted", T0 + H + S), ("filled", T0 + H + S)], reason="exit_signal"),
    ]
    fills = [fill("a", "buy", 1, 100, T0 + S, "o1"), fill("a", "sell", 1, 100, T0 + H + S, "o2")]
    r = run_check(check_no_look_ahead, make_run(fills, orders))
    assert r.ok and r.checked["orders"] == 2


def test_rule3_order_submitted_while_another_works_breaks() -> None:
    orders = [
        order(
            "o1", "a", "buy", [("submitted", T0 + S), ("partially_filled", T0 + S), ("cancelled", T0 + 2 * H)]
        ),
        order("o2", "a", "sell", [("submitted", T0 + H + S), ("filled", T0 + H + S)]),
        order("o3", "b", "buy", [("submitted", T0 + H), ("filled", T0 + H)]),  # another profile: no matter
    ]
    r = run_check(check_no_look_ahead, make_run([], orders))
    assert r.counts["3-self-overlap"] == 1
    assert "order o2 (sell) submitted" in r.examples["3-self-overlap"][0]


def test_rule3_protective_order_works_from_its_first_fill() -> None:
    # A resting stop ("open" first) placed with the entry does not overlap it; it works once it fills.
    orders = [
        order("o1", "a", "buy", [("submitted", T0 + S), ("filled", T0 + S)]),
        order("p1", "a", "sell", [("open", T0 + S), ("filled", T0 + H + S)], reason="stop_loss"),
    ]
    fills = [
        fill("a", "buy", 1, 100, T0 + S, "o1"),
        fill("a", "sell", 1, 99, T0 + H + S, "p1", reason="stop_loss"),
    ]
    assert run_check(check_no_look_ahead, make_run(fills, orders, decided=["intent-o1"])).ok


def test_rule3_sell_beyond_the_position_and_buy_while_held_break() -> None:
    fills = [
        fill("a", "buy", 1, 100, T0 + S, "o1"),
        fill("a", "buy", 1, 100, T0 + H, "o1"),  # the same order's second part: fine
        fill("a", "buy", 1, 100, T0 + 2 * H, "o2"),  # a new entry while held
        fill("a", "sell", 4, 100, T0 + 3 * H, "o3"),  # holds 3
    ]
    r = run_check(check_no_look_ahead, make_run(fills))
    assert r.counts["3-buy-while-held"] == 1
    assert r.counts["3-sell-beyond-position"] == 1
    assert "sells 4 but holds 3" in r.examples["3-sell-beyond-position"][0]


def test_position_limit() -> None:
    products = ["BTC/USDC", "ETH/USDC", "SOL/USDC"]
    candles = {p: flat(3) for p in products}
    two = [fill("a", "buy", 1, 100, T0 + S, f"o{i}", product=p) for i, p in enumerate(products[:2])]
    third = fill("a", "buy", 1, 100, T0 + 2 * S, "o9", product=products[2])
    assert run_check(check_no_look_ahead, make_run(two, candles=candles)).ok
    r = run_check(check_no_look_ahead, make_run([*two, third], candles=candles))
    assert r.counts["position-limit"] == 1


# ------------------------------------------------------------------------------------------ rule 4
def _wash(b_time: int, *, internal: bool = False, a_reason: str = "entry", decided: bool = True) -> Run:
    first = "open" if a_reason == "stop_loss" else "submitted"
    a = order("oa", "a", "buy", [(first, T0 + S), ("filled", T0 + S)], reason=a_reason)
    b = order("ob", "b", "sell", [("submitted", b_time), ("filled", b_time)])
    fills = [
        fill("a", "buy", 1, 100, T0 + S, "oa", reason=a_reason),
        fill("b", "sell", 1, 100, b_time, "ob", internal=internal),
    ]
    return make_run(fills, [a, b], decided=["intent-oa", "intent-ob"] if decided else ["intent-ob"])


def test_rule4_opposite_fill_after_the_window_holds() -> None:
    r = run_check(check_wash_trades, _wash(T0 + S + 301 * S))
    assert r.ok and r.info["opposite_side_pairs"] == 0


def test_rule4_opposite_fill_inside_the_window_breaks_unless_internal() -> None:
    r = run_check(check_wash_trades, _wash(T0 + 100 * S))
    assert r.counts["4-wash-trade"] == 1 and r.info["opposite_side_pairs"] == 1
    assert run_check(check_wash_trades, _wash(T0 + 100 * S, internal=True)).ok


def test_rule4_protective_pairs_are_information_not_violations() -> None:
    r = run_check(check_wash_trades, _wash(T0 + 100 * S, a_reason="stop_loss", decided=False))
    assert r.ok and r.info["protective_opposite_pairs"] == 1


def test_rule4_summary_count_must_match_the_fills() -> None:
    run = _wash(T0 + 100 * S)
    run.summary = {"profiles": {}, "desync": {"opposite_side_pairs_within_window": 0}}
    assert run_check(check_wash_trades, run).counts["4-summary-count"] == 1
    run.summary["desync"]["opposite_side_pairs_within_window"] = 1
    assert "4-summary-count" not in run_check(check_wash_trades, run).counts


# ------------------------------------------------------------------------------------------ rule 5
def test_rule5_liquidity_is_shared_by_all_orders_and_profiles() -> None:
    # Volume 1000, participation 0.1: 100 per candle for everybody together.
    ok = [fill("a", "buy", 60, 100, T0 + S, "o1"), fill("b", "buy", 40, 100, T0 + 2 * S, "o2")]
    assert run_check(check_liquidity, make_run(ok)).ok
    internal = fill("b", "sell", 50, 100, T0 + 3 * S, "o3", internal=True)
    assert run_check(check_liquidity, make_run([*ok, internal])).ok
    over = [*ok, fill("a", "buy", 1, 100, T0 + 3 * S, "o4")]
    r = run_check(check_liquidity, make_run(over))
    assert r.counts["5-liquidity"] == 1
    assert "fills of 101 over 3 fills" in r.examples["5-liquidity"][0]


# ------------------------------------------------------------------------------------------ rule 6
def _halt_run(at: int, extra_fills: Sequence[Fill] = (), extra_orders: Sequence[Order] = ()) -> Run:
    # 10 bought at 100 (cash 9000); candle 2 closes at 40: equity 9400 at its close (T0 + 3H), a 6 % drawdown.
    candles = {P: [bar(0, 100, 100, 100, 100), bar(1, 100, 100, 100, 100), bar(2, 100, 100, 40, 40)]}
    candles[P] += [bar(i, 40, 40, 40, 40) for i in range(3, 6)]
    summary = {"profiles": {"a": {"halts": [{"reason": "drawdown 6.00% >= max_drawdown_pct 5", "at": at}]}}}
    fills = [fill("a", "buy", 10, 100, T0 + S, "o1"), *extra_fills]
    run = make_run(fills, extra_orders, candles=candles, summary=summary)
    run.summary["profiles"]["a"]["halts"][0]["at"] = _iso_of(at)
    return run


def _iso_of(us: int) -> str:
    from mpctl.audit import _iso

    return _iso(us)


def test_rule6_halt_at_the_close_that_breached_then_positions_closed_holds() -> None:
    sold = fill("a", "sell", 10, 40, T0 + 3 * H + S, "o2", reason="halt")
    r = run_check(check_halts, _halt_run(T0 + 3 * H, [sold]))
    assert r.ok and r.checked["halts"] == 1


def test_rule6_halt_stamped_at_the_open_breaks() -> None:
    sold = fill("a", "sell", 10, 40, T0 + 2 * H + S, "o2", reason="halt")
    r = run_check(check_halts, _halt_run(T0 + 2 * H, [sold]))
    assert r.counts["6-halt-stamp"] == 1
    assert "stamped at the open" in r.examples["6-halt-stamp"][0]


def test_rule6_position_kept_and_entry_after_the_halt_break() -> None:
    entry = order("o3", "a", "buy", [("submitted", T0 + 4 * H + S), ("filled", T0 + 4 * H + S)])
    fills = [fill("a", "sell", 10, 40, T0 + 5 * H + S, "o2"), fill("a", "buy", 1, 40, T0 + 4 * H + S, "o3")]
    r = run_check(check_halts, _halt_run(T0 + 3 * H, fills, [entry]))
    assert r.counts["6-halt-close"] == 1
    assert r.counts["6-halt-entry"] == 1


def test_rule6_close_on_halt_false_keeps_positions() -> None:
    run = _halt_run(T0 + 3 * H)
    run.limits["a"] = Limits(**{**LIM.__dict__, "close_on_halt": False})
    assert run_check(check_halts, run).ok


# ------------------------------------------------------------------------------------------ rule 7
def _reason_run(with_reasons: bool, summary_profile: dict[str, Any]) -> Run:
    reason = "stop_loss" if with_reasons else None
    orders = [
        order(
            "o1",
            "a",
            "buy",
            [("submitted", T0 + S), ("filled", T0 + S)],
            reason="entry" if with_reasons else None,
        ),
        order("o2", "a", "sell", [("submitted", T0 + H + S), ("filled", T0 + H + S)], reason=reason),
        order(
            "o3",
            "a",
            "buy",
            [("submitted", T0 + 2 * H), ("cancelled", T0 + 4 * H)],
            reason="entry" if with_reasons else None,
            cancel_reason="order_timeout 7200s reached: filled 0 of 1",
        ),
    ]
    run = make_run([], orders, summary={"profiles": {"a": summary_profile}})
    run.order_lines = [
        {
            "profile": "a",
            "client_order_id": o.client_order_id,
            **({"intent_reason": e.intent_reason} if e.intent_reason else {}),
        }
        for o in orders
        for e in o.events
    ]
    run.fills = [
        fill("a", "buy", 1, 100, T0 + S, "o1", reason=reason),
        fill("a", "sell", 1, 99, T0 + H + S, "o2", reason=reason),
    ]
    run.fill_lines = [{"intent_reason": f.intent_reason} if f.intent_reason else {} for f in run.fills]
    return run


def test_rule7_reasons_and_summary_counts_hold() -> None:
    r = run_check(
        check_reasons, _reason_run(True, {"exits_by_reason": {"stop_loss": 1}, "orders_timed_out": 1})
    )
    assert r.ok, r.text()
    assert r.info["exits_by_reason"] == {"a": {"stop_loss": 1}}


def test_rule7_missing_reasons_and_counts_break() -> None:
    r = run_check(check_reasons, _reason_run(False, {}))
    assert r.counts["7-intent-reason"] == 8  # 6 order events and 2 fills
    assert r.counts["7-exits-by-reason"] == 1 and r.counts["7-orders-timed-out"] == 1
    wrong = run_check(
        check_reasons, _reason_run(True, {"exits_by_reason": {"exit_signal": 1}, "orders_timed_out": 0})
    )
    assert wrong.counts["7-exits-by-reason"] == 1 and wrong.counts["7-orders-timed-out"] == 1


def test_an_empty_run_passes_every_rule() -> None:
    assert audit(make_run()).ok


# ------------------------------------------------------------------------------------------ the fixture
@pytest.fixture(scope="module")
def today() -> AuditReport:
    return audit_run(FIXTURE / "today", DATA, load_config(FIXTURE / "config.yaml"))


@pytest.mark.parametrize(
    "check",
    [
        "1-fill-in-candle",
        "2-stop-in-candle",
        "3-self-overlap",
        "3-buy-while-held",
        "4-wash-trade",
        "4-summary-count",
        "5-liquidity",
        "6-halt-stamp",
        # (6-halt-close: today's positions were all sold by their stops within the time a halt's sale is due)
        "7-intent-reason",
        "7-exits-by-reason",
        "7-orders-timed-out",
    ],
)
def test_the_audit_finds_todays_violations(today: AuditReport, check: str) -> None:
    assert today.counts[check] > 0, today.text()


def test_the_fixture_books_balance(today: AuditReport) -> None:
    # The books were right before the fixes: what the audit finds is the paper model's, not the accounting's.
    broken = [c for c in today.counts if c.startswith("invariants:") and c != "invariants:3-opposite-side"]
    assert not broken, today.text()  # (3-opposite-side: the wash trades of rule 4, found by both)
    assert today.checked["fills"] == 105 and today.checked["halts"] == 3


def test_cli_exit_codes_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = [
        "audit",
        "--run",
        str(FIXTURE / "today"),
        "--data",
        str(DATA),
        "--config",
        str(FIXTURE / "config.yaml"),
    ]
    assert main([*args, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["violations"]["5-liquidity"]["count"] > 0

    broken = tmp_path / "run"
    shutil.copytree(FIXTURE / "today", broken)
    lines = (broken / "fills.jsonl").read_text().splitlines()
    lines[2] = '{"profile": "profile_a",'
    (broken / "fills.jsonl").write_text("\n".join(lines) + "\n")
    assert main([*args[:1], "--run", str(broken), *args[3:]]) == 2
    err = capsys.readouterr().err
    assert f"{broken / 'fills.jsonl'}:3: not JSON" in err and "Traceback" not in err

    assert main(["audit", "--run", str(tmp_path / "nowhere"), "--config", str(FIXTURE / "config.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
