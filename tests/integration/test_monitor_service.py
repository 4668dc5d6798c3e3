"""The monitor service on a real broker: audit file, alerts to a local webhook, Prometheus metrics on
127.0.0.1, and a restart that neither re-alerts nor re-writes what the first run handled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from mpctl.infra import Endpoints
from services.monitor.bootstrap import MonitorOptions, MonitorService
from shared.messages import ProfileHalted
from shared.runtime import ServiceSettings
from tests.integration.ops_stack import TEMPLATE, create_topics, eventually, ns_config, publish
from tests.unit.builders import HOUR, T0, approval_of, candle, decided, dt, order_filled, place_order, plan


@pytest.fixture
async def hook() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    got: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/alerts", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/alerts", got
    finally:
        await runner.cleanup()


def _service(b: str, namespace: str, tmp: Path, url: str) -> MonitorService:
    settings = ServiceSettings(config_path=TEMPLATE, kafka=b, namespace=namespace)
    opts = MonitorOptions(
        audit_file=tmp / "audit.jsonl",
        alerts_file=tmp / "alerts.jsonl",
        webhooks=(url,),
        metrics_port=0,
        lag_interval_s=0.5,
        lag_threshold=10_000,
    )
    return MonitorService(ns_config(namespace), settings, opts)


def _halt(i: int) -> ProfileHalted:
    return ProfileHalted(
        id=f"halt-{i}",
        event_time=dt(T0 + i * HOUR),
        correlation_id=f"step:{T0}",
        profile="profile_b",
        reason=f"max_daily_loss_pct reached ({i})",
    )


async def test_monitor_audits_alerts_and_exports(
    infra: Endpoints, namespace: str, tmp_path: Path, hook: tuple[str, list[dict[str, Any]]]
) -> None:
    b = infra.kafka
    url, got = hook
    cfg = ns_config(namespace)
    await create_topics(b, cfg)
    from shared.topics import Topics

    t = Topics(namespace)
    collided = plan("profile_a", T0 // HOUR).model_copy(update={"collisions": 1, "nonce": 1})
    buy = place_order("profile_b", "buy")
    wash = decided(buy, "rejected", "opposite_side").model_copy(update={"conflicting_profile": "profile_a"})
    fill = order_filled("profile_a", "buy", size="1", price="100", fee="0.6", at=T0 + 60)
    approved = approval_of(fill)  # the dashboards book only the fills the arbiter approved (shared/book.py)
    audit_msgs = [collided, buy, wash, approved, fill, _halt(1)]
    await publish(b, [(t.audit, m, None) for m in audit_msgs + audit_msgs[:2]])  # with two redelivered copies
    await publish(
        b,
        [
            (t.plans, collided, "profile_a"),
            (t.decisions, wash, "profile_b"),
            (t.decisions, approved, "profile_a"),
            (t.events, fill, "profile_a"),
            (t.events, _halt(1), "profile_b"),
            (t.candles, candle("BTC/USDC", T0, open=100, close=105), None),
        ],
    )

    svc = _service(b, namespace, tmp_path, url)
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    try:

        async def alerted() -> bool:
            return len(got) >= 3

        await eventually(alerted, what="three alerts at the webhook")
        assert sorted(a["kind"] for a in got) == ["collision", "halt", "wash_trade_rejection"]
        halt = next(a for a in got if a["kind"] == "halt")
        assert (
            halt["profile"] == "profile_b"
            and halt["namespace"] == namespace
            and halt["severity"] == "critical"
        )

        async def scraped() -> bool:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{svc.metrics_bound}/metrics") as r,
            ):
                text = await r.text()
            # Up once its consumer group is stable (it runs in-process here, so no heartbeat): polled again each
            # lag interval, so a first poll during the group's join is not the last word.
            return (
                f'mp_consumer_group_lag{{group="{namespace}.monitor"}}' in text
                and 'mp_service_up{service="monitor"} 1.0' in text
            )

        await eventually(scraped, what="lag and health metrics")
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{svc.metrics_bound}/metrics") as r:
            text = await r.text()
        assert 'mp_profile_halts{profile="profile_b"} 1.0' in text
        assert 'mp_profile_collisions{profile="profile_a"} 1.0' in text
        assert 'mp_profile_trades{profile="profile_a"} 1.0' in text
        assert 'mp_profile_equity{profile="profile_a"} 10004.4' in text  # 10000 - 100 - 0.6 + 1 * 105
        assert 'mp_arbiter_decisions{rule="opposite_side",verdict="rejected"} 1.0' in text
        assert 'mp_alerts_total{kind="halt"} 1.0' in text
        assert 'mp_service_up{service="monitor"} 1.0' in text
        assert f'mp_monitor_info{{namespace="{namespace}"}} 1.0' in text
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0

    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    assert [orjson.loads(x)["id"] for x in lines] == [m.id for m in audit_msgs]  # once each, in topic order
    assert len((tmp_path / "alerts.jsonl").read_bytes().splitlines()) == 3

    # A restart re-reads everything (to rebuild its numbers) but alerts and audits only what is new.
    await publish(b, [(t.audit, _halt(2), "profile_b"), (t.events, _halt(2), "profile_b")])
    svc2 = _service(b, namespace, tmp_path, url)
    stop2 = asyncio.Event()
    task2 = asyncio.create_task(svc2.run(stop2))
    try:

        async def second_halt() -> bool:
            return len(got) >= 4

        await eventually(second_halt, what="the new halt's alert")
        await asyncio.sleep(1.5)  # time for any wrongly repeated alert to arrive
        assert [a["kind"] for a in got[3:]] == ["halt"] and "(2)" in got[3]["summary"]
        assert svc2.tracker.profile_view("profile_b")["halts"] == 2  # the state was rebuilt from the start
    finally:
        stop2.set()
        assert await asyncio.wait_for(task2, 30) == 0
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    assert [orjson.loads(x)["id"] for x in lines] == [m.id for m in audit_msgs] + ["halt-2"]
