"""Alerts: the pure message-to-alert mapping, the once-per-crossing gate, and delivery to a real local HTTP
receiver (aiohttp on 127.0.0.1); a dead or failing webhook never raises and never blocks."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from services.monitor.alerts import (
    KINDS,
    AlertDispatcher,
    AlertGate,
    LogSink,
    WebhookSink,
    alerts_from_message,
    build_sinks,
    correlation_alerts,
    lag_alerts,
    redact_url,
)
from shared.messages import DeadLettered, FeedStateChanged, ProfileHalted
from tests.unit.builders import T0, decided, dt, order_filled, place_order, plan, watermark

NOW = datetime(2024, 3, 10, tzinfo=UTC)


def kinds(msg: Any) -> list[str]:
    return [a.kind for a in alerts_from_message(msg, "ns")]


def test_message_mapping() -> None:
    assert kinds(plan("profile_a", 1)) == []
    assert kinds(plan("profile_a", 1).model_copy(update={"collisions": 2, "nonce": 2})) == ["collision"]
    buy = place_order("profile_b", "buy")
    assert kinds(decided(buy, "approved", "approved")) == []
    wash = decided(buy, "rejected", "opposite_side").model_copy(update={"conflicting_profile": "profile_a"})
    [a] = alerts_from_message(wash, "ns")
    assert (a.kind, a.severity, a.profile, a.product) == (
        "wash_trade_rejection",
        "warning",
        "profile_b",
        "BTC/USDC",
    )
    assert "profile_a" in a.summary and a.details["conflicting_profile"] == "profile_a"
    assert kinds(decided(buy, "rejected", "duplicate_intent")) == ["duplication_prevented"]
    assert kinds(decided(buy, "rejected", "plan_echo")) == ["duplication_prevented"]
    assert kinds(decided(buy, "approved", "internal_cross")) == ["internal_cross_opportunity"]
    internal = order_filled("profile_a", "buy", at=T0).model_copy(update={"internal": True})
    assert kinds(internal) == ["internal_cross_opportunity"]
    assert kinds(order_filled("profile_a", "buy", at=T0)) == []
    halt = ProfileHalted(
        id="h1", event_time=dt(T0), correlation_id="c", profile="profile_a", reason="drawdown 12%"
    )
    [h] = alerts_from_message(halt, "ns")
    assert (h.kind, h.severity, h.namespace) == ("halt", "critical", "ns")
    dead = DeadLettered(
        id="d1",
        event_time=dt(T0),
        correlation_id="c",
        source_topic="ns.orders.intents",
        partition=1,
        offset=7,
        key=None,
        payload_b64=base64.b64encode(b"secret-ish bytes").decode(),
        error="not JSON",
        service="arbiter",
    )
    [d] = alerts_from_message(dead, "ns")
    assert d.kind == "dead_letter" and "payload_b64" not in d.to_json()["details"]
    assert "secret-ish" not in str(d.to_json())


def test_live_feed_alerts_on_a_stale_feed_and_a_missing_bucket_only() -> None:
    stale = FeedStateChanged(
        id="feed-stale-1",
        event_time=dt(T0),
        correlation_id="feed",
        state="stale",
        reason="no websocket frame for 6.0 s",
    )
    (alert,) = alerts_from_message(stale, "ns")
    assert alert.kind == "feed_stale" and alert.severity == "critical" and "6.0 s" in alert.summary
    assert kinds(stale.model_copy(update={"state": "fresh"})) == []
    assert kinds(watermark(T0)) == []
    (missing,) = alerts_from_message(watermark(T0).model_copy(update={"missing": ["ETH/USDC"]}), "ns")
    assert missing.kind == "missing_bucket" and "ETH/USDC" in missing.summary
    assert {"feed_stale", "missing_bucket"} <= set(KINDS)


def test_alert_json_and_ids_are_stable() -> None:
    halt = ProfileHalted(id="h1", event_time=dt(T0), correlation_id="c", profile="profile_a", reason="x")
    a, b = alerts_from_message(halt), alerts_from_message(halt)
    assert a[0].id == b[0].id  # a redelivered message maps to the same alert id
    j = a[0].to_json()
    assert j["text"].startswith("[critical] halt:") and j["event_time"] == "2024-03-10T00:00:00Z"
    assert set(KINDS) >= {
        "collision",
        "duplication_prevented",
        "halt",
        "wash_trade_rejection",
        "correlation_breach",
        "lag_above_threshold",
        "internal_cross_opportunity",
    }


def test_gate_fires_once_per_crossing() -> None:
    gate = AlertGate()
    seq = [lag_alerts({"g": lag}, 100, gate, now=NOW) for lag in (5, 150, 300, 50, 120)]
    assert [len(x) for x in seq] == [0, 1, 0, 0, 1]
    assert seq[1][0].details == {"group": "g", "lag": 150, "threshold": 100}
    cg = AlertGate()
    c1 = correlation_alerts({("a", "b"): 0.95, ("a", "c"): None}, 0.9, cg, now=NOW, window=48)
    c2 = correlation_alerts({("a", "b"): 0.97, ("a", "c"): 0.1}, 0.9, cg, now=NOW, window=48)
    assert [a.kind for a in c1] == ["correlation_breach"] and c2 == []


def test_redact_url_hides_the_token() -> None:
    assert (
        redact_url("https://hooks.slack.com/services/T000/B000/XXXXSECRET?x=1")
        == "https://hooks.slack.com/..."
    )
    assert redact_url("http://127.0.0.1:8080/bot123:ABC/send") == "http://127.0.0.1:8080/..."
    with pytest.raises(ValueError, match="only http and https"):
        WebhookSink("ftp://example.invalid/x")


class Receiver:
    def __init__(self, status: int = 200, delay: float = 0.0) -> None:
        self.status, self.delay = status, delay
        self.bodies: list[dict[str, Any]] = []
        self.content_types: list[str] = []
        self.hits = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.content_types.append(request.content_type)
        self.bodies.append(await request.json())
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=self.status, text="ok")


async def _serve(rec: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post("/hook/{token}", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.url = f"http://127.0.0.1:{port}/hook/T0KEN"
    try:
        yield rec
    finally:
        await runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async for r in _serve(Receiver()):
        yield r


@pytest.fixture
async def failing_receiver() -> AsyncIterator[Receiver]:
    async for r in _serve(Receiver(status=500)):
        yield r


@pytest.fixture
async def slow_receiver() -> AsyncIterator[Receiver]:
    async for r in _serve(Receiver(delay=1.0)):
        yield r


def _halt(i: int = 1) -> Any:
    return alerts_from_message(
        ProfileHalted(
            id=f"h{i}", event_time=dt(T0), correlation_id="c", profile="profile_a", reason=f"loss {i}"
        ),
        "ns",
    )


async def test_webhook_receives_plain_json(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    d = AlertDispatcher(build_sinks([receiver.url]))
    d.start()
    assert len(d.emit(_halt(1))) == 1
    assert d.emit(_halt(1)) == []  # the same alert again (a redelivery): not sent twice
    assert len(d.emit(_halt(2))) == 1
    assert await d.drain(5)
    await d.close()
    assert receiver.hits == 2
    assert receiver.content_types == ["application/json", "application/json"]
    body = receiver.bodies[0]
    assert body["kind"] == "halt" and body["profile"] == "profile_a" and body["namespace"] == "ns"
    assert body["text"] == "[critical] halt: profile_a halted: loss 1"
    assert sorted(d.sent.values()) == [2, 2] and not d.failed
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("monitor"))
    assert "ALERT critical halt" in ours
    assert "T0KEN" not in ours and all(
        "T0KEN" not in name for name in d.sent
    )  # the receiver's own log has it


async def test_dead_webhook_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = WebhookSink(f"http://127.0.0.1:{port}/hook/SECRET", attempts=2, timeout_s=1.0, backoff_s=0.05)
    d = AlertDispatcher([LogSink(), sink])
    d.start()
    t0 = time.monotonic()
    d.emit(_halt())
    assert time.monotonic() - t0 < 0.05  # emit only queues
    assert await d.drain(10)
    await d.close()
    assert d.failed == {sink.name: 1} and d.sent == {"log": 1}
    assert "attempt 2/2" in caplog.text and "SECRET" not in caplog.text


async def test_failing_webhook_is_retried_a_bounded_number_of_times(failing_receiver: Receiver) -> None:
    sink = WebhookSink(failing_receiver.url, attempts=3, timeout_s=1.0, backoff_s=0.01)
    assert await sink.send(_halt()[0]) is False
    await sink.close()
    assert failing_receiver.hits == 3


async def test_slow_webhook_does_not_block_emit(slow_receiver: Receiver) -> None:
    d = AlertDispatcher(build_sinks([slow_receiver.url], timeout_s=5.0))
    d.start()
    t0 = time.monotonic()
    for i in range(20):
        d.emit(_halt(i))
    assert time.monotonic() - t0 < 0.1
    await d.close(timeout=0.2)  # gives up waiting: undelivered alerts are logged, nothing raises
    assert slow_receiver.hits >= 1


async def test_full_queue_drops_instead_of_blocking() -> None:
    d = AlertDispatcher([LogSink()], queue_size=2)  # not started: nothing drains the queue
    assert len(d.emit([a for i in range(5) for a in _halt(i)])) == 2
    assert d.dropped == 3
