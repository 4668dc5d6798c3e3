"""Live execution keeps each position's stop loss resting at the exchange (issue #13), through real ccxt against
the local Coinbase peer: an entry leaves a protective order at the peer; the market trading through it fills it
there (our process plays no part: a crash would change nothing); the strategy's exit then books those fills
once, without a second sale; an exit before that cancels the protective order first; a kill cancels every
resting order of the profile at the exchange."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.execution.live import LiveExecution, protective_client_id
from shared import protective
from shared.clock import derived_id
from shared.messages import CommandHandled, ControlCommand, ExecuteOrder, Message, OrderFilled, OrderUpdated
from tests.integration import test_exchange_adapters as adapters
from tests.integration.test_exchange_adapters import adapter, app_config, creds_for, execute, posts
from tests.peer.coinbase_peer import CoinbasePeer
from tests.unit.builders import candle

no_secret_in_logs = adapters.no_secret_in_logs

D = Decimal
APIS = ["coinbase", "coinbaseexchange"]
PID = "profile_a"


@contextlib.asynccontextmanager
async def live_on(peer: CoinbasePeer, api: str, secrets_used: list[str]) -> AsyncIterator[LiveExecution]:
    """profile_a's live execution (protective orders on, as in production) on the peer through real ccxt."""
    port = await adapter(peer, creds_for(peer, api, PID, secrets_used))
    try:
        yield LiveExecution(
            PID, app_config().profiles[PID], port, clock=lambda: datetime.now(UTC), poll_interval_s=0.05
        )
    finally:
        await port.close()


def updates(msgs: list[Message]) -> list[str]:
    return [m.status for m in msgs if isinstance(m, OrderUpdated)]


def fills(msgs: list[Message]) -> list[OrderFilled]:
    return [m for m in msgs if isinstance(m, OrderFilled)]


def sale(tag: str, size: Decimal, reason: str = "stop_loss") -> ExecuteOrder:
    o = execute(PID, tag, side="sell", size=str(size), price="57000")
    return o.model_copy(update={"intent_reason": reason})


async def enter(ex: LiveExecution, peer: CoinbasePeer) -> tuple[Decimal, Decimal, Decimal]:
    """Buy 0.01 BTC at the peer's price; returns (filled size, stop, take profit) of the position."""
    out = await ex.handle(execute(PID, "entry", size="0.01", price=str(peer.price("BTC-USDC"))))
    assert updates(out)[-1] == "filled", out
    (f,) = fills(out)
    rm = app_config().profiles[PID].risk_management
    stop, take = protective.levels(f.price, D(str(rm.stop_loss_pct)), D(str(rm.take_profit_pct)))
    return f.size, stop, take


@pytest.mark.parametrize("api", APIS)
async def test_the_stop_rests_at_the_exchange_fills_there_and_is_booked_once_by_the_exit(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    async with live_on(peer, api, no_secret_in_logs) as ex:
        btc0 = peer.account_of(PID).balances["BTC"]
        size, stop, take = await enter(ex, peer)
        entry_coid = execute(PID, "entry").client_order_id
        (resting,) = [o for o in await ex.port.fetch_open_orders("BTC/USDC")]
        assert resting.client_order_id == protective_client_id(entry_coid)
        assert resting.kind == ("bracket" if api == "coinbase" else "stop")
        assert resting.stop_price == stop and resting.size == size
        assert peer.account_of(PID).balances["BTC"] == btc0 + size
        await ex.reconcile()  # the resting protective order is known as ours, not reported as a stranger's
        assert ex.last_reconciliation is not None and ex.last_reconciliation.unknown_orders == []

        # The market falls through the stop while our system does nothing: the exchange sells.
        sent = posts(peer)
        made = peer.trade("BTC-USDC", stop - D("10"))
        assert sum((f.size for f in made), D(0)) == size
        assert peer.account_of(PID).balances["BTC"] == btc0

        # The strategy's stop-loss exit (at the candle's close) books those fills; nothing else is sold.
        out = await ex.handle(sale("stop", size))
        assert updates(out) == ["submitted", "filled"], out
        assert sum((f.size for f in fills(out)), D(0)) == size
        assert posts(peer) == sent  # no second sale reached the exchange
        again = await ex.handle(sale("stop", size))  # a redelivery produces nothing
        assert again == []
        assert peer.account_of(PID).balances["BTC"] == btc0


@pytest.mark.parametrize("api", APIS)
async def test_an_exit_cancels_the_resting_protective_order_before_it_sells(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    async with live_on(peer, api, no_secret_in_logs) as ex:
        btc0 = peer.account_of(PID).balances["BTC"]
        size, stop, _ = await enter(ex, peer)
        out = await ex.handle(sale("signal", size, reason="exit_signal"))
        assert updates(out)[-1] == "filled" and sum((f.size for f in fills(out)), D(0)) == size
        assert await ex.port.fetch_open_orders("BTC/USDC") == []  # the protective order went first
        assert peer.trade("BTC-USDC", stop - D("10")) == []  # and cannot sell a second time
        assert peer.account_of(PID).balances["BTC"] == btc0


async def test_kill_cancels_every_resting_order_at_the_exchange_and_refuses_entries(
    peer: CoinbasePeer, no_secret_in_logs: list[str]
) -> None:
    async with live_on(peer, "coinbase", no_secret_in_logs) as ex:
        await enter(ex, peer)
        assert len(await ex.port.fetch_open_orders()) == 1
        now = datetime.now(UTC)
        # What reaches the worker after the command gate verified its signature (shared/commands.py).
        kill = ControlCommand(
            id=derived_id("cmd", "kill"),
            event_time=now,
            correlation_id="cmd",
            target=PID,
            action="kill",
            issued_at=now,
            nonce="0123456789abcdef",
        )
        (handled,) = await ex.handle(kill)
        assert isinstance(handled, CommandHandled) and handled.accepted
        assert "cancelled 1 of 1 open order(s)" in handled.reason and "bracket sell" in handled.reason
        assert await ex.port.fetch_open_orders() == []
        sent = posts(peer)
        refused = await ex.handle(execute(PID, "after-kill", size="0.01", price="60000"))
        assert updates(refused) == ["submitted", "rejected"] and posts(peer) == sent
        resume = kill.model_copy(update={"id": derived_id("cmd", "resume"), "action": "resume"})
        await ex.handle(resume)
        ok = await ex.handle(execute(PID, "after-resume", size="0.01", price="60000"))
        assert updates(ok)[-1] == "filled"


@pytest.mark.parametrize("api", APIS)
async def test_a_product_switched_to_cancel_only_gets_no_new_order(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    async with live_on(peer, api, no_secret_in_logs) as ex:
        await enter(ex, peer)  # markets loaded while BTC-USDC is online
        peer.set_status("BTC-USDC", "cancel_only")
        await ex.refresh_markets()  # what each reconciliation period does
        sent = posts(peer)
        out = await ex.handle(execute(PID, "while-cancel-only", size="0.01", price="60000"))
        (rejected,) = [m for m in out if isinstance(m, OrderUpdated) and m.status == "rejected"]
        assert "cancel" in rejected.reason and "no order is sent" in rejected.reason, rejected.reason
        assert posts(peer) == sent


async def test_a_sale_never_asks_for_more_than_the_account_holds(
    peer: CoinbasePeer, no_secret_in_logs: list[str]
) -> None:
    async with live_on(peer, "coinbase", no_secret_in_logs) as ex:
        held = peer.account_of(PID).balances["BTC"]
        out = await ex.handle(sale("too-much", held + D("0.5"), reason="exit_signal"))
        assert updates(out)[-1] == "filled"
        assert sum((f.size for f in fills(out)), D(0)) == held  # the whole holding, not a refusal
        assert peer.account_of(PID).balances["BTC"] == 0


async def test_a_refused_sale_does_not_end_the_position_so_the_next_one_books_the_stops_fills(
    peer: CoinbasePeer, no_secret_in_logs: list[str]
) -> None:
    """A sale refused before it reached the exchange (here by the price band) sold nothing: the position and its
    protective order are still the entry's, so the next sale books what the stop sold, and sends nothing."""
    port = await adapter(peer, creds_for(peer, "coinbase", PID, no_secret_in_logs))
    try:
        ex = LiveExecution(
            PID,
            app_config().profiles[PID],
            port,
            clock=lambda: datetime.now(UTC),
            poll_interval_s=0.05,
            price_band_pct=D(10),
        )
        await ex.handle(candle("BTC/USDC", 1_767_225_600, 60000, close=60000))
        btc0 = peer.account_of(PID).balances["BTC"]
        size, stop, _ = await enter(ex, peer)
        made = peer.trade("BTC-USDC", stop - D("10"))  # the stop sells at the exchange
        assert sum((f.size for f in made), D(0)) == size
        refused = await ex.handle(sale("dump", size).model_copy(update={"reference_price": D(1)}))
        assert updates(refused)[-1] == "rejected" and "price band" in refused[-1].reason  # type: ignore[attr-defined]
        sent = posts(peer)
        out = await ex.handle(sale("stop", size))
        assert updates(out) == ["submitted", "filled"], out
        assert sum((f.size for f in fills(out)), D(0)) == size
        assert posts(peer) == sent  # nothing sent: the stop had sold it
        assert peer.account_of(PID).balances["BTC"] == btc0  # the account's own BTC untouched
    finally:
        await port.close()
