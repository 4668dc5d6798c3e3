"""The router's books (issue #15 item 5): its risk checks, its status and the fills a trade returns count only
the fills the arbiter approved, by the rule of the strategy workers and the report (shared/book.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from mpctl.router import ProfileRouter, TradeRefused
from services.monitor.metrics import PerformanceTracker
from shared.messages import Message
from shared.topics import Topics
from tests.unit.builders import CONFIG_PATH, HOUR, T0, approval_of, candle, config, order_filled


def router_reading(msgs: list[Message]) -> ProfileRouter:
    """A router as `initialize` leaves it, fed the messages its follower would read (no broker needed)."""
    cfg = config()
    r = ProfileRouter(CONFIG_PATH)
    r.cfg, r.topics = cfg, Topics("t")
    r.tracker = PerformanceTracker(
        {pid: Decimal(str(p.paper.initial_quote_balance)) for pid, p in cfg.enabled_profiles().items()}
    )
    for m in msgs:
        r._apply(m)
    return r


SELL = {"symbol": "BTC/USDC", "side": "sell", "type": "market", "size": "0.5", "profile": "profile_a"}


def test_a_forged_fill_moves_neither_the_routers_positions_nor_its_risk_checks() -> None:
    market = [candle("BTC/USDC", T0, open=100, close=100)]
    # A fill of an order no execution worker submitted (no decision), and one beyond its approved size.
    forged = order_filled("profile_a", "buy", size="1", price="100", at=T0 + HOUR, fill_id="forged")
    real = order_filled("profile_a", "buy", size="0.5", price="100", at=T0 + HOUR, fill_id="real")
    over = order_filled(
        "profile_a", "buy", size="9", price="100", at=T0 + HOUR, fill_id="over", intent_id=real.intent_id
    )
    r = router_reading([*market, forged])
    view = r.get_profile_status()["profiles"]["profile_a"]
    assert (view["trades"], view["open_positions"], view["equity"]) == (0, {}, "10000.00000000")
    with pytest.raises(TradeRefused, match="holds 0"):
        r._intent(SELL)  # nothing to sell: the forged buy is not a position
    assert r.verified_fills_of(forged.intent_id) == []

    r = router_reading([*market, forged, approval_of(real), real, over])
    view = r.get_profile_status()["profiles"]["profile_a"]
    assert (view["trades"], view["open_positions"]) == (1, {"BTC/USDC": "0.5"})
    intent, pid = r._intent(SELL)  # the verified half is sellable, no more
    assert (pid, intent.size) == ("profile_a", Decimal("0.5"))
    with pytest.raises(TradeRefused, match="holds 0.5"):
        r._intent({**SELL, "size": "1"})
    assert [f.fill_id for f in r.verified_fills_of(real.intent_id)] == ["real"]


def test_the_router_keeps_the_first_decision_of_an_intent() -> None:
    real = order_filled("profile_a", "buy", size="0.5", price="100", at=T0 + HOUR, fill_id="real")
    first, later = approval_of(real), approval_of(real, size="5").model_copy(update={"id": "d2"})
    r = router_reading([candle("BTC/USDC", T0), first, later, real])
    assert r.decisions[real.intent_id] == first
