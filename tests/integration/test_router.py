"""ProfileRouter over real services: a manual trade goes through the router's risk checks, the real arbiter
and the profile's real execution worker (paper exchange), and its outcome comes back."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from mpctl.infra import Endpoints
from mpctl.router import ProfileRouter
from tests.integration.ops_stack import TEMPLATE, create_topics, eventually, ns_config, publish, running
from tests.unit.builders import HOUR, T0, candle, step_completed, watermark


async def test_manual_trade_through_arbiter_and_execution(infra: Endpoints, namespace: str) -> None:
    b = infra.kafka
    await create_topics(b, ns_config(namespace))
    async with running(b, namespace, executions=("profile_a",)) as t:
        await publish(
            b, [(t.candles, candle("BTC/USDC", T0, open=100, high=103, low=99, close=102), "BTC/USDC")]
        )
        await publish(b, [(t.candles, watermark(T0), None)], broadcast=True)
        # Both profiles' strategy workers completed step T0 (what they would have sent).
        await publish(
            b, [(t.intents, step_completed(p, T0), None) for p in ("profile_a", "profile_b")], broadcast=True
        )

        router = ProfileRouter(
            TEMPLATE, bootstrap=b, namespace=namespace, decision_timeout_s=30, fill_timeout_s=30
        )
        await router.initialize()
        try:
            status = router.get_profile_status()
            assert status["profile_router"]["active_profiles"] == 2
            assert status["profile_router"]["namespace"] == namespace

            async def execution_up() -> bool:
                s = await router.refresh_status()
                return bool(s["profiles"]["profile_a"]["execution_service"] == "up")

            await eventually(execution_up, what="execution.profile_a seen up")
            with pytest.raises(RuntimeError, match="strategy.profile_a"):
                await router.start_trading()  # no strategy worker runs in this test

            refused = [
                {"symbol": "BTC/USDC", "side": "buy", "type": "limit", "size": 0.1},
                {"symbol": "BTC/USDC", "side": "buy", "type": "market", "size": 100},  # 10 200 > 8% of 10 000
                {"symbol": "BTC/USDC", "side": "sell", "type": "market", "size": 0.1},  # holds nothing
                {"symbol": "DOGE/USDC", "side": "buy", "type": "market", "size": 1},
                {"symbol": "BTC/USDC", "side": "buy", "type": "market", "size": -1},
            ]
            reasons = []
            for order in refused:
                r = await router.execute_unified_trade(order)
                assert r["status"] == "refused", r
                reasons.append(r["reason"])
            assert "only market orders" in reasons[0] and "max_position_size_pct" in reasons[1]
            assert "holds 0" in reasons[2] and "no enabled profile trades DOGE/USDC" in reasons[3]

            trade = asyncio.create_task(
                router.execute_unified_trade(
                    {"symbol": "BTC-USDC", "side": "buy", "type": "market", "size": 0.5}
                )
            )

            async def decided() -> bool:
                return bool(router.decisions) or trade.done()

            await eventually(decided, what="the arbiter's decision")
            # The next candle: the paper exchange fills a market order at its open.
            await publish(
                b,
                [
                    (
                        t.candles,
                        candle("BTC/USDC", T0 + HOUR, open=105, high=106, low=104, close=105),
                        "BTC/USDC",
                    )
                ],
            )
            await publish(b, [(t.candles, watermark(T0 + HOUR), None)], broadcast=True)
            result = await asyncio.wait_for(trade, 60)
        finally:
            await router.close()
    assert result["status"] == "filled", result
    assert result["profile"] == "profile_a"  # the highest-priority profile trading BTC/USDC
    assert result["decision"]["verdict"] == "approved"
    assert result["symbol"] == "BTC/USDC" and result["size"] == "0.5"
    [fill] = result["fills"]
    assert Decimal(fill["size"]) == Decimal("0.5")
    assert (
        Decimal("105") <= Decimal(fill["price"]) <= Decimal("105") * Decimal("1.0015")
    )  # open plus slippage
    view = router.get_profile_status()["profiles"]["profile_a"]
    assert view["open_positions"] == {"BTC/USDC": "0.5"} and view["trades"] == 1


async def test_router_without_topics_says_what_to_do(infra: Endpoints, namespace: str) -> None:
    router = ProfileRouter(TEMPLATE, bootstrap=infra.kafka, namespace=namespace)
    with pytest.raises(RuntimeError, match="start the stack first"):
        await router.initialize()
    with pytest.raises(RuntimeError, match="initialize"):
        router.get_profile_status()
