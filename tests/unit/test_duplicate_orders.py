"""Never twice with a zombie worker (issue #19 item 1), the pure parts and the send guard: which of two orders
under one client order id is the intent's, how a second one is booked and reported (reconcile.py), how the books
and the report take it (outside the intent's size), the alert naming both exchange ids, and the guard that runs
between the look-up and the send (live.py) refusing a send when the worker no longer holds its partition."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from aiokafka import TopicPartition

from services.execution.errors import NotOwnerError
from services.execution.live import LiveExecution, PauseStage
from services.execution.ports import ExchangeFill, ExchangeOrder, SendGuard
from services.execution.reconcile import (
    KnownOrder,
    apply_event,
    duplicate_events,
    fill_event_id,
    reconcile,
    split_duplicates,
)
from services.monitor.alerts import alerts_from_message
from services.monitor.domain import RunData, fill_records, verified_fills
from services.strategy.domain import take_refused
from shared.bus import KafkaAccess
from shared.kafka import ConsumeLoop, Publisher
from shared.messages import DuplicateOrderDetected, ExecuteOrder, OrderFilled, OrderUpdated
from tests.unit.builders import T0, approval_of, config, execute_order, fill_for, order_filled
from tests.unit.test_strategy_domain import _flat_steps, _next_step, _stop_loss_pending, _waiting, feed

D = Decimal
PID = "profile_a"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def known(**kw: Any) -> KnownOrder:
    base: dict[str, Any] = {
        "client_order_id": "c1",
        "intent_id": "i1",
        "profile": PID,
        "product": "BTC/USDC",
        "side": "buy",
        "size": D("0.5"),
        "correlation_id": "corr",
    }
    return KnownOrder(**{**base, **kw})


def xorder(oid: str, *, at: int | None, status: str = "filled", filled: str = "0.5") -> ExchangeOrder:
    created = NOW + timedelta(seconds=at) if at is not None else None
    return ExchangeOrder(
        oid, "c1", "BTC/USDC", "buy", D("0.5"), D(filled), status, D("100"), created_at=created
    )  # type: ignore[arg-type]


def xfill(fid: str, size: str, oid: str) -> ExchangeFill:
    return ExchangeFill(fid, oid, "BTC/USDC", "buy", D(size), D("100"), D("0.3"), NOW, client_order_id="c1")


# ------------------------------------------------------------------------------------------ which is the intent's
def test_the_first_order_the_exchange_took_is_the_intents_whoever_asks() -> None:
    a, b, c = xorder("b-late", at=5), xorder("z-first", at=1), xorder("a-tie", at=5)
    for orders in ([a, b, c], [c, b, a], [b, a, c]):
        original, dups = split_duplicates(orders)
        assert original is b and [d.exchange_order_id for d in dups] == ["a-tie", "b-late"]
    # No creation time: the newest (a create's answer without a time never displaces a listed order).
    undated = xorder("0-undated", at=None)
    assert split_duplicates([undated, a]) == (a, [undated])
    assert split_duplicates([]) == (None, [])
    assert split_duplicates([a, a]) == (a, [])  # one order listed twice is one order


# ------------------------------------------------------------------------------------------ booking a duplicate
def test_a_filled_duplicate_is_booked_outside_the_intent_and_reported_once() -> None:
    state = {"c1": known()}
    first, second = xorder("x-first", at=0), xorder("x-second", at=2)
    fills = [xfill("t1", "0.2", "x-second"), xfill("t2", "0.3", "x-second"), xfill("t0", "0.5", "x-first")]
    events = duplicate_events(PID, state["c1"], first, second, fills, NOW)
    booked = [e for e in events if isinstance(e, OrderFilled)]
    (report,) = [e for e in events if isinstance(e, DuplicateOrderDetected)]
    assert [f.size for f in booked] == [D("0.2"), D("0.3")]  # the second order's fills only
    assert {f.duplicate_of for f in booked} == {"x-first"}
    assert [f.fill_id for f in booked] == [fill_event_id(PID, fills[0]), fill_event_id(PID, fills[1])]
    assert (report.original, report.duplicate, report.filled_size) == ("x-first", "x-second", D("0.5"))
    assert "x-first" in report.reason and "x-second" in report.reason
    for e in events:
        apply_event(state, e, PID)
    k = state["c1"]
    # Folded apart: the intent's order has filled nothing yet, and nothing is reported or booked twice.
    assert k.filled_from_fills == 0 and k.fill_ids == frozenset()
    assert duplicate_events(PID, k, first, second, fills, NOW + timedelta(minutes=1)) == []
    # The intent's own order then settles as if the duplicate did not exist.
    rec = reconcile(PID, state, {"c1": first}, [fills[2]], NOW)
    (update,) = [e for e in rec.events if isinstance(e, OrderUpdated)]
    assert (update.status, update.filled_size) == ("filled", D("0.5"))


def test_an_open_duplicate_cancelled_unfilled_is_reported_without_fills() -> None:
    cancelled = xorder("x-second", at=2, status="cancelled", filled="0")
    (report,) = duplicate_events(PID, known(), xorder("x-first", at=0), cancelled, [], NOW, cancelled=True)
    assert isinstance(report, DuplicateOrderDetected)
    assert report.cancelled and report.status == "cancelled" and report.filled_size == 0
    assert "cancelled it" in report.reason


def test_the_alert_names_both_exchange_ids() -> None:
    (report,) = duplicate_events(PID, known(), xorder("x-first", at=0), xorder("x-second", at=1), [], NOW)
    (alert,) = alerts_from_message(report)
    assert (alert.kind, alert.severity, alert.profile) == ("duplicate_order", "critical", PID)
    assert "x-first" in alert.summary and "x-second" in alert.summary
    assert alert.details["original"] == "x-first" and alert.details["duplicate"] == "x-second"


# ------------------------------------------------------------------------------------------ the books
def test_strategy_books_a_duplicates_fill_beyond_the_intents_size() -> None:
    profile = config().profiles[PID]
    state, intent = _stop_loss_pending(profile)  # sells the 10 BTC held at 100
    cash, fills = state.cash, state.fills
    f, done = fill_for(intent)
    assert isinstance(f, OrderFilled)
    extra = f.model_copy(update={"id": "dup-fill", "fill_id": "dup-fill", "size": D(1)})
    feed(state, [f, extra.model_copy(update={"duplicate_of": "x-first"}), done])
    _next_step(state)
    assert take_refused(state) == []
    assert state.cash == cash + 11 * intent.reference_price
    assert state.fills == fills + 2
    # The control: the same extra fill without `duplicate_of` is refused (it exceeds the intent).
    state, intent = _stop_loss_pending(profile)
    f, done = fill_for(intent)
    feed(state, [f, extra, done])
    _next_step(state)
    (refusal,) = take_refused(state)
    assert "exceed the intent's size" in refusal.reason


def test_strategy_books_a_duplicate_of_an_approved_order_it_did_not_send() -> None:
    profile = config().profiles[PID]
    state = _waiting(profile)
    first = order_filled(PID, "buy", size="1", price="100", at=T0, intent_id="m1", fill_id="f1")
    dup = order_filled(PID, "buy", size="1", price="100", at=T0 + 1, intent_id="m1", fill_id="f2")
    feed(state, [approval_of(first), first, dup.model_copy(update={"duplicate_of": "x-first"})])
    _flat_steps(state, profile, T0, 1)
    assert take_refused(state) == [] and state.positions["BTC/USDC"].size == 2


def test_the_report_counts_a_duplicates_fill_as_verified() -> None:
    first = order_filled(PID, "buy", size="1", price="100", at=T0, intent_id="m1", fill_id="f1")
    dup = order_filled(PID, "buy", size="1", price="100", at=T0 + 1, intent_id="m1", fill_id="f2")
    data = RunData()
    data.add_all([approval_of(first), first, dup.model_copy(update={"duplicate_of": "x-first"})])
    ok, refused = verified_fills(data)
    assert [f.fill_id for f in ok] == ["f1", "f2"] and refused == []
    records = fill_records(data)
    assert "duplicate_of" not in records[0] and records[1]["duplicate_of"] == "x-first"
    # Without the mark the second fill exceeds the approved size: unverified.
    plain = RunData()
    plain.add_all([approval_of(first), first, dup])
    assert [f.fill_id for f, _ in verified_fills(plain)[1]] == ["f2"]


# ------------------------------------------------------------------------------------------ the send guard
class GuardedPort:
    """Stands for the adapter: the look-up, then the guard, then the send (recorded)."""

    dedups_client_ids = True

    def __init__(self) -> None:
        self.steps: list[str] = []

    async def create_order(
        self, client_order_id: str, *args: Any, guard: SendGuard | None = None, **kw: Any
    ) -> Any:
        self.steps.append("lookup")
        assert guard is not None
        await guard()
        self.steps.append("send")
        return ExchangeOrder("x1", client_order_id, "BTC/USDC", "buy", D("0.01"), D(0), "rejected")

    async def fetch_order_by_client_id(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def fetch_fills(self, *args: Any, **kwargs: Any) -> list[ExchangeFill]:
        return []


def _guarded(owner: str | None) -> tuple[LiveExecution, GuardedPort, list[tuple[int, float]]]:
    port = GuardedPort()
    live = LiveExecution(
        PID, config().profiles[PID], port, clock=lambda: NOW, protect=False, request_timeout_s=7.0
    )  # type: ignore[arg-type]
    asked: list[tuple[int, float]] = []

    async def fence(partition: int, within_s: float) -> str | None:
        asked.append((partition, within_s))
        port.steps.append("fence")
        return owner

    async def pause(coid: str, at: PauseStage) -> None:
        port.steps.append(at)

    live.fence = fence
    live.pause_before_send = pause
    return live, port, asked


def _order() -> ExecuteOrder:
    return execute_order(PID, "buy", size="0.01", not_before=T0, intent_id="guarded")  # due before NOW


def test_the_guard_checks_ownership_between_the_lookup_and_the_send() -> None:
    live, port, asked = _guarded(None)
    live.price_band = None
    out = asyncio.run(live.handle(_order(), partition=3))
    assert port.steps == ["lookup", "after_lookup", "fence", "after_fence", "send"]
    assert asked == [(3, 7.0)]  # the order's partition, and the time a request may take
    assert [m.status for m in out if isinstance(m, OrderUpdated)][0] == "submitted"


def test_a_worker_that_lost_its_partition_sends_nothing_and_publishes_no_outcome() -> None:
    live, port, _ = _guarded("group execution.profile_a took orders.approved.profile_a[0] from this member")
    live.price_band = None
    out = asyncio.run(live.handle(_order()))
    assert port.steps == ["lookup", "after_lookup", "fence"]  # refused before the send
    assert [m.status for m in out if isinstance(m, OrderUpdated)] == ["submitted"]  # the owner settles it
    k = live.known[_order().client_order_id]
    assert not k.terminal


def test_not_owner_error_carries_the_reason() -> None:
    assert NotOwnerError("lost it").reason == "lost it"


async def test_the_fence_refuses_a_session_too_short_for_a_request() -> None:
    pub = Publisher(KafkaAccess(servers="127.0.0.1:1"), client_id="t")
    loop = ConsumeLoop(
        bootstrap=KafkaAccess(servers="127.0.0.1:1"),
        topics=["t"],
        group_id="g",
        publisher=pub,
        dead_letter_topic="dlq",
        service="s",
        clock=lambda: NOW,
        session_timeout_ms=10_000,
    )
    with pytest.raises(ValueError, match="session of 10 s leaves no time for a request of 9 s"):
        await loop.holds(TopicPartition("t", 0), 9.0)
    # Not assigned to this member (never joined): refused without asking the coordinator, and disowned.
    tp = TopicPartition("t", 0)
    why = await loop.holds(tp, 2.0)
    assert why is not None and "no longer assigned" in why and tp in loop.disowned
