"""Internal cross, executed (paper mode, `internal_cross: execute`), over real Kafka with the real arbiter and
two real execution workers: two profiles on opposite sides of one product in one step are netted at the mid
price between their balances, both legs marked internal in the order log, the rest goes to the exchange; and
the run report counts the opportunity, its savings and the internal fills, with the books balanced."""

from __future__ import annotations

import asyncio
from decimal import Decimal

from mpctl.infra import Endpoints
from services.arbiter.bootstrap import bootstrap as arbiter_bootstrap
from services.execution.bootstrap import bootstrap as execution_bootstrap
from services.monitor.domain import RunData, summarize
from shared.kafka import Publisher, read_topics
from shared.messages import InternalCrossOpportunity, Message, OrderDecided, OrderFilled, OrderUpdated
from shared.runtime import ServiceSettings
from shared.topics import Topics
from tests.bus import create_namespace
from tests.integration.ops_stack import TEMPLATE, eventually, ns_config
from tests.unit.builders import HOUR, T0, candle, place_order, plan, step_completed, watermark

A, B = "profile_a", "profile_b"


async def test_opposite_intents_of_one_step_settle_internally_at_the_mid(
    infra: Endpoints, namespace: str
) -> None:
    cfg = ns_config(namespace)
    arbiter = cfg.system.arbiter.model_copy(update={"internal_cross": "execute"})
    cfg = cfg.model_copy(update={"system": cfg.system.model_copy(update={"arbiter": arbiter})})
    b = infra.kafka
    t = Topics(namespace)
    await create_namespace(b, cfg)
    settings = ServiceSettings(config_path=TEMPLATE, kafka=b, namespace=namespace)
    stop = asyncio.Event()
    mains = [arbiter_bootstrap(settings, overrides={"config": cfg}).run]
    mains += [
        execution_bootstrap(settings.model_copy(update={"profile": p}), overrides={"config": cfg}).run
        for p in (A, B)
    ]
    tasks = [asyncio.create_task(m(stop)) for m in mains]

    t1, t2 = T0 - HOUR, T0
    rot_b = cfg.profiles[B].profile_hash.hash_rotation_interval
    first = place_order(B, "buy", step=t1, size="1", price="100", epoch=t1 // rot_b)  # B holds 1 BTC first
    buy = place_order(A, "buy", step=t2, size="0.5", price="102", epoch=t2 // HOUR)
    sell = place_order(B, "sell", step=t2, size="0.3", price="102", epoch=t2 // rot_b)
    msgs: list[tuple[str, Message, str | None, bool]] = [
        (t.plans, plan(A, t1 // HOUR), A, False),
        (t.plans, plan(A, t2 // HOUR), A, False),
        (t.plans, plan(B, t1 // rot_b, interval=rot_b), B, False),
        (t.plans, plan(B, t2 // rot_b, interval=rot_b), B, False),
    ]
    for k, (o, c) in enumerate([(100, 101), (101, 102), (104, 103)]):
        tk = t1 + k * HOUR
        msgs += [
            # Volume for whole fills: each of the two profiles takes at most 5 % of a candle (10 % shared).
            (t.candles, candle("BTC/USDC", tk, o, o + 2, o - 2, c, volume=100), "BTC/USDC", False),
            (t.candles, watermark(tk), None, True),
        ]
    msgs += [(t.intents, first, "BTC/USDC", False)]
    msgs += [(t.intents, step_completed(p, t1), None, True) for p in (A, B)]
    msgs += [(t.intents, buy, "BTC/USDC", False), (t.intents, sell, "BTC/USDC", False)]
    msgs += [(t.intents, step_completed(p, t2), None, True) for p in (A, B)]
    pub = Publisher(b, client_id="internal-cross-test")
    await pub.start()
    try:
        for topic, m, key, broadcast in msgs:
            if broadcast:
                await pub.send_to_all_partitions(topic, m)
            else:
                await pub.send(topic, m, key=key)
        await pub.flush()

        async def settled() -> bool:
            got, _ = await read_topics(b, [t.events])
            return sum(1 for m in got if isinstance(m, OrderUpdated) and m.status == "filled") >= 3

        await eventually(settled, timeout=60, what="three filled orders")
    finally:
        await pub.stop()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)

    events, _ = await read_topics(b, [t.events, t.decisions, t.audit, t.candles, t.intents])
    decisions = {
        m.profile: m
        for m in events
        if isinstance(m, OrderDecided) and m.intent_id in (buy.intent_id, sell.intent_id)
    }
    assert decisions[A].rule == decisions[B].rule == "internal_cross"
    fills = [
        m for m in events if isinstance(m, OrderFilled) and m.intent_id in (buy.intent_id, sell.intent_id)
    ]
    internal = sorted((f for f in {f.id: f for f in fills}.values() if f.internal), key=lambda f: f.side)
    assert [(f.profile, f.side, f.size, f.fee) for f in internal] == [
        (A, "buy", Decimal("0.3"), Decimal(0)),
        (B, "sell", Decimal("0.3"), Decimal(0)),
    ]
    assert (
        internal[0].price == internal[1].price == Decimal("104")
    )  # the open of the candle after the decision
    (exchange,) = [f for f in {f.id: f for f in fills}.values() if not f.internal]
    assert (exchange.profile, exchange.size) == (A, Decimal("0.2")) and exchange.price > Decimal("104")
    lines = {
        (m.profile, m.status, m.internal)
        for m in events
        if isinstance(m, OrderUpdated) and m.intent_id in (buy.intent_id, sell.intent_id)
    }
    assert lines == {
        (A, "submitted", False),
        (A, "partially_filled", True),
        (A, "filled", False),
        (B, "submitted", True),
        (B, "filled", True),
    }
    assert [o.executed for o in events if isinstance(o, InternalCrossOpportunity)] == [True]

    data = RunData()
    data.add_all(events)
    summary = summarize(cfg, data)
    c = summary["counters"]
    assert (c["internal_cross_opportunities"], c["internal_cross_executed"], c["internal_fills"]) == (1, 1, 2)
    assert Decimal(c["internal_cross_savings"]["total"]) > 0
    assert summary["desync"]["opposite_side_pairs_within_window"] == 0
    assert summary["profiles"][B]["open_positions"] == {"BTC/USDC": "0.7"}
    assert summary["profiles"][A]["open_positions"] == {"BTC/USDC": "0.5"}
