"""Pure parts of live execution: order rounding and minimums (ccxt_adapter.prepare_order) and reconciliation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.execution.ccxt_adapter import RateLimit, RateLimiter, market_from_ccxt, prepare_order
from services.execution.errors import RejectedError
from services.execution.ports import ExchangeFill, ExchangeOrder, MarketInfo
from services.execution.reconcile import KnownOrder, fill_event_id, known_from_events, reconcile
from shared.messages import OrderFilled, OrderUpdated

D = Decimal
NOW = datetime(2024, 3, 10, 12, tzinfo=UTC)
BTC = MarketInfo(
    "BTC/USDC", "BTC-USDC", "BTC", "USDC", D("0.01"), D("0.00000001"), D("0.00001"), D("1"), D("10000")
)


# ------------------------------------------------------------------------------------------ rounding
def test_size_rounds_down_and_prices_round_in_our_favour() -> None:
    assert prepare_order(BTC, "buy", D("0.0123456789"), D("60000.129")) == (D("0.01234567"), D("60000.12"))
    assert prepare_order(BTC, "sell", D("0.0123456789"), D("60000.121")) == (D("0.01234567"), D("60000.13"))
    assert prepare_order(BTC, "sell", D("0.5"), None) == (D("0.5"), None)


@pytest.mark.parametrize(
    ("size", "price", "match"),
    [
        (D("0.000009"), D("60000"), r"below minimum: size 0.000009 BTC .* minimum is 0.00001 BTC; not sent"),
        (D("0.000000001"), D("60000"), "below minimum"),
        (D("0.00001"), D("50"), r"below minimum: notional .* under BTC/USDC minimum 1 USDC"),
        (D("20000"), D("60000"), "above maximum"),
        (D("0"), D("60000"), "size must be positive"),
        (D("0.1"), D("0.001"), "rounds to 0"),
    ],
)
def test_rejections_are_explained(size: Decimal, price: Decimal, match: str) -> None:
    with pytest.raises(RejectedError, match=match):
        prepare_order(BTC, "buy", size, price)


def test_inactive_market_rejected() -> None:
    from dataclasses import replace

    with pytest.raises(RejectedError, match="not trading"):
        prepare_order(replace(BTC, active=False), "buy", D("1"), D("1"))


def test_market_from_ccxt_prefers_exact_strings() -> None:
    mk = {
        "symbol": "SOL/USDC",
        "id": "SOL-USDC",
        "base": "SOL",
        "quote": "USDC",
        "active": True,
        "precision": {"amount": 0.001, "price": 0.01},
        "limits": {"amount": {"min": 0.01}, "cost": {"min": 1.0}},
        "info": {
            "base_increment": "0.001",
            "quote_increment": "0.01",
            "base_min_size": "0.01",
            "quote_min_size": "1",
        },
    }
    m = market_from_ccxt(mk)
    assert (m.size_increment, m.price_increment, m.min_size, m.min_notional) == (
        D("0.001"),
        D("0.01"),
        D("0.01"),
        D("1"),
    )
    exchange_api = dict(
        mk, info={"base_increment": "0.001", "quote_increment": "0.01", "min_market_funds": "5"}, limits={}
    )
    m2 = market_from_ccxt(exchange_api)
    assert m2.min_size is None and m2.min_notional == D("5")


# ------------------------------------------------------------------------------------------ rate limiter
async def test_rate_limiter_bounds_any_one_second_window() -> None:
    now = [0.0]
    stamps: list[float] = []

    async def fake_sleep(s: float) -> None:
        now[0] += s

    lim = RateLimiter(RateLimit(rate=10, burst=5), monotonic=lambda: now[0], sleep=fake_sleep)
    for _ in range(100):
        await lim.acquire()
        stamps.append(now[0])
    for i, t in enumerate(stamps):
        in_window = sum(1 for u in stamps[i:] if u < t + 1.0)
        assert in_window <= 10 + 5
    assert stamps[-1] == pytest.approx((100 - 5) / 10, rel=1e-6)


# ------------------------------------------------------------------------------------------ reconciliation
def known(status: str = "submitted", **kw: object) -> KnownOrder:
    base = dict(
        client_order_id="c1",
        intent_id="i1",
        profile="profile_a",
        product="BTC/USDC",
        side="buy",
        size=D("0.5"),
        correlation_id="corr",
        status=status,
    )
    base.update(kw)
    return KnownOrder(**base)  # type: ignore[arg-type]


def xorder(status: str = "filled", filled: str = "0.5", oid: str = "x1") -> ExchangeOrder:
    return ExchangeOrder(oid, "c1", "BTC/USDC", "buy", D("0.5"), D(filled), status, D("100"))  # type: ignore[arg-type]


def xfill(fid: str, size: str, t: int = 0, oid: str = "x1") -> ExchangeFill:
    return ExchangeFill(fid, oid, "BTC/USDC", "buy", D(size), D("100"), D("0.3"), NOW + timedelta(seconds=t))


def test_fill_while_down_is_emitted_once() -> None:
    k = {"c1": known()}
    rec = reconcile("profile_a", k, {"c1": xorder()}, [xfill("f1", "0.2", 1), xfill("f2", "0.3", 2)], NOW)
    fills = [e for e in rec.events if isinstance(e, OrderFilled)]
    updates = [e for e in rec.events if isinstance(e, OrderUpdated)]
    assert [f.size for f in fills] == [D("0.2"), D("0.3")]
    assert (
        rec.events[-1] is updates[-1]
        and updates[-1].status == "filled"
        and updates[-1].filled_size == D("0.5")
    )
    assert updates[-1].price == D("100") and updates[-1].fee == D("0.6")
    # Second pass over the state rebuilt from those events: nothing new.
    k2 = known_from_events("profile_a", [*rec.events])
    k2["c1"] = k2["c1"]
    rec2 = reconcile("profile_a", k2, {"c1": xorder()}, [xfill("f1", "0.2", 1), xfill("f2", "0.3", 2)], NOW)
    assert rec2.events == []


def test_fill_ids_are_stable_across_runs() -> None:
    f = xfill("f1", "0.2")
    assert fill_event_id("profile_a", f) == fill_event_id("profile_a", f)
    assert fill_event_id("profile_a", f) != fill_event_id("profile_b", f)


def test_terminal_status_waits_for_all_fills() -> None:
    rec = reconcile("profile_a", {"c1": known()}, {"c1": xorder()}, [xfill("f1", "0.2")], NOW)
    upd = [e for e in rec.events if isinstance(e, OrderUpdated)]
    assert upd[-1].status == "partially_filled" and upd[-1].filled_size == D("0.2")
    assert any("waiting for the rest" in n for n in rec.notes)


def test_cancelled_on_the_exchange_site() -> None:
    rec = reconcile("profile_a", {"c1": known("open")}, {"c1": xorder("cancelled", "0")}, [], NOW)
    assert [(e.status, e.filled_size) for e in rec.events if isinstance(e, OrderUpdated)] == [
        ("cancelled", D("0"))
    ]


def test_partly_filled_then_cancelled() -> None:
    rec = reconcile(
        "profile_a", {"c1": known("open")}, {"c1": xorder("cancelled", "0.2")}, [xfill("f1", "0.2")], NOW
    )
    kinds = [(type(e).__name__, getattr(e, "status", None)) for e in rec.events]
    assert kinds == [("OrderFilled", None), ("OrderUpdated", "cancelled")]


def test_never_reached_the_exchange() -> None:
    rec = reconcile("profile_a", {"c1": known()}, {"c1": None}, [], NOW)
    (u,) = rec.events
    assert isinstance(u, OrderUpdated) and u.status == "rejected" and "never got there" in u.reason


def test_not_looked_up_and_finished_orders_are_left_alone() -> None:
    k = {"c1": known("filled", filled_size=D("0.5"))}
    assert reconcile("profile_a", k, {"c1": xorder()}, [], NOW).events == []
    assert reconcile("profile_a", {"c1": known()}, {}, [], NOW).events == []


def test_unknown_orders_are_reported_not_adopted() -> None:
    stranger = ExchangeOrder("x9", "by-hand", "BTC/USDC", "sell", D("1"), D("0"), "open")
    rec = reconcile("profile_a", {}, {}, [], NOW, open_orders=[stranger])
    assert rec.events == [] and rec.unknown_orders == [stranger]
    assert any("not one of this worker's orders" in n for n in rec.notes)


def test_update_ids_are_deterministic() -> None:
    a = reconcile("profile_a", {"c1": known()}, {"c1": xorder()}, [xfill("f1", "0.5")], NOW)
    b = reconcile(
        "profile_a", {"c1": known()}, {"c1": xorder()}, [xfill("f1", "0.5")], NOW + timedelta(hours=1)
    )
    assert [e.id for e in a.events] == [e.id for e in b.events]
