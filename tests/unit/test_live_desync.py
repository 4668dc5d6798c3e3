"""Live execution sends an order at `not_before` plus the profile's de-sync delay, as the paper exchange does:
two profiles' orders on one product never leave in lock-step. Clock and sleep are injected; the port is a
stand-in that records when each create request arrives and refuses the order (the outcome is not the point)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from services.execution.errors import RejectedError
from services.execution.live import LiveExecution
from services.execution.ports import Balance
from shared.orders import desync_delay_ms
from tests.unit.builders import T0, config, dt, execute_order


class VirtualTime:
    def __init__(self, start: datetime) -> None:
        self.now = start
        self.slept: list[float] = []

    def clock(self) -> datetime:
        return self.now

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += timedelta(seconds=s)


class RecordingPort:
    def __init__(self, time: VirtualTime) -> None:
        self.time = time
        self.sent: list[tuple[str, datetime]] = []

    async def create_order(self, client_order_id: str, *args: Any, **kwargs: Any) -> Any:
        self.sent.append((client_order_id, self.time.now))
        raise RejectedError("stand-in port: refused after recording the send time")

    async def balances(self) -> dict[str, Balance]:
        # What a sale checks first (never more than the account holds): enough BTC.
        return {"BTC": Balance("BTC", Decimal(10), Decimal(0), Decimal(10))}

    async def fetch_order_by_client_id(self, *args: Any, **kwargs: Any) -> None:
        return None  # no resting protective order to cancel before a sale


def _live(
    profile: str, time: VirtualTime, port: RecordingPort, lo: int = 50, hi: int = 1500
) -> LiveExecution:
    cfg = config()
    return LiveExecution(
        profile,
        cfg.profiles[profile],
        port,
        clock=time.clock,
        sleep=time.sleep,  # type: ignore[arg-type]
        desync_ms=(lo, hi),
    )


def test_live_order_waits_for_not_before_plus_the_profiles_desync_delay() -> None:
    time = VirtualTime(dt(T0))
    port = RecordingPort(time)
    live = _live("profile_a", time, port)
    order = execute_order("profile_a", "buy", not_before=T0 + 2)
    out = asyncio.run(live.handle(order))
    delay = desync_delay_ms(config().profiles["profile_a"].profile_hash.base_hash, order.intent_id, 50, 1500)
    assert 50 <= delay <= 1500
    assert port.sent == [(order.client_order_id, dt(T0 + 2) + timedelta(milliseconds=delay))]
    assert [m.status for m in out] == ["submitted", "rejected"]  # type: ignore[attr-defined]


def test_two_profiles_same_product_same_not_before_are_sent_apart() -> None:
    sent: dict[str, datetime] = {}
    for profile in ("profile_a", "profile_b"):
        time = VirtualTime(dt(T0))
        port = RecordingPort(time)
        order = execute_order(profile, "buy", not_before=T0, intent_id=f"intent-{profile}")
        asyncio.run(_live(profile, time, port).handle(order))
        sent[profile] = port.sent[0][1]
    assert sent["profile_a"] != sent["profile_b"]
    assert abs((sent["profile_a"] - sent["profile_b"]).total_seconds()) <= 1.45


def test_order_whose_send_time_has_passed_goes_at_once() -> None:
    time = VirtualTime(dt(T0 + 3600))  # a replay or a redelivery: not_before is an hour ago
    port = RecordingPort(time)
    order = execute_order("profile_a", "sell", not_before=T0, size=Decimal("0.5"))
    asyncio.run(_live("profile_a", time, port).handle(order))
    assert time.slept == []
    assert port.sent[0][1] == dt(T0 + 3600)
