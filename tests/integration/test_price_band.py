"""The live execution worker's price band (issue #19, item 3), through real ccxt against the local Coinbase peer:
an approval whose limit lies far from the market (a forged one, 1,000,000 for BTC) is refused with a reason and
never reaches the exchange, on both APIs; the safe side (a buy below the market, a sell above it) is never
refused; an order for a product no candle was seen of is refused unless md.candles' tail gives its close, read
from a real broker; the monitor raises a critical `price_band` alert from the refusal."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.execution.live import LiveExecution
from services.execution.live_wiring import latest_closes
from services.monitor.alerts import alerts_from_message
from shared.kafka import Publisher, ensure_topics
from shared.messages import Message, OrderUpdated
from shared.topics import Topics, TopicSpec
from tests.integration import test_exchange_adapters as adapters
from tests.integration.test_exchange_adapters import adapter, app_config, creds_for, execute, posts
from tests.peer.coinbase_peer import CoinbasePeer
from tests.unit.builders import candle

no_secret_in_logs = adapters.no_secret_in_logs

D = Decimal
PID = "profile_a"
T = 1_767_225_600  # 2026-01-01T00:00Z, on the hour


@contextlib.asynccontextmanager
async def banded(
    peer: CoinbasePeer,
    api: str,
    secrets_used: list[str],
    lookup: Callable[[str], Awaitable[tuple[datetime, Decimal] | None]] | None = None,
) -> AsyncIterator[LiveExecution]:
    port = await adapter(peer, creds_for(peer, api, PID, secrets_used))
    try:
        yield LiveExecution(
            PID,
            app_config().profiles[PID],
            port,
            clock=lambda: datetime.now(UTC),
            poll_interval_s=0.05,
            protect=False,
            price_band_pct=D(10),
            reference_lookup=lookup,
        )
    finally:
        await port.close()


def outcome(msgs: Sequence[Message]) -> OrderUpdated:
    return [m for m in msgs if isinstance(m, OrderUpdated)][-1]


@pytest.mark.parametrize("api", ["coinbase", "coinbaseexchange"])
async def test_an_order_priced_far_from_the_market_is_refused_and_never_sent(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    async with banded(peer, api, no_secret_in_logs) as ex:
        await ex.handle(candle("BTC/USDC", T, 60000, close=60000))
        sent = posts(peer)
        forged = await ex.handle(execute(PID, "forged", price="1000000"))
        refused = outcome(forged)
        assert refused.status == "rejected", refused
        assert refused.reason.startswith(
            "price band: buy limit"
        ) and "above the latest BTC/USDC close 60000" in (refused.reason), refused.reason
        assert posts(peer) == sent  # nothing reached the exchange
        (alert,) = alerts_from_message(refused)
        assert (alert.kind, alert.severity, alert.profile) == ("price_band", "critical", PID)
        # A sale far below the market is refused the same way (dumping a position at 1).
        dump = outcome(await ex.handle(execute(PID, "dump", side="sell", price="1")))
        assert dump.status == "rejected" and "below the latest BTC/USDC close" in dump.reason
        # Within the band, and on the safe side however far: sent.
        ok = outcome(await ex.handle(execute(PID, "near", price="61000")))
        assert ok.status == "filled", ok
        cheap = outcome(await ex.handle(execute(PID, "cheap", price="30000")))
        assert cheap.status != "rejected" or not cheap.reason.startswith("price band"), cheap
        assert posts(peer) > sent


async def test_without_any_close_of_the_product_the_order_is_refused(
    peer: CoinbasePeer, no_secret_in_logs: list[str]
) -> None:
    async with banded(peer, "coinbase", no_secret_in_logs) as ex:
        sent = posts(peer)
        refused = outcome(await ex.handle(execute(PID, "blind", price="60000")))
        assert refused.status == "rejected" and "no market price of BTC/USDC known yet" in refused.reason
        assert posts(peer) == sent


async def test_the_reference_comes_from_md_candles_tail_on_a_real_broker(
    peer: CoinbasePeer, no_secret_in_logs: list[str], kafka_bootstrap: str, namespace: str
) -> None:
    topics = Topics(namespace)
    await ensure_topics(kafka_bootstrap, [TopicSpec(topics.candles, 3)])
    pub = Publisher(kafka_bootstrap, client_id="test-band")
    await pub.start()
    try:
        for i, close in enumerate((58000, 59000, 60000)):  # the last one is the reference
            await pub.send(
                topics.candles, candle("BTC/USDC", T + i * 3600, close, close=close), key="BTC/USDC"
            )
        await pub.send(topics.candles, candle("ETH/USDC", T, 3000, close=3000), key="ETH/USDC")
        await pub.flush()
    finally:
        await pub.stop()
    closes = await latest_closes(kafka_bootstrap, topics.candles)
    assert {p: c for p, (_, c) in closes.items()} == {"BTC/USDC": D(60000), "ETH/USDC": D(3000)}

    async def lookup(product: str) -> tuple[datetime, Decimal] | None:
        return (await latest_closes(kafka_bootstrap, topics.candles)).get(product)

    async with banded(peer, "coinbase", no_secret_in_logs, lookup) as ex:
        refused = outcome(await ex.handle(execute(PID, "far", price="100000")))
        assert refused.status == "rejected" and "close 60000" in refused.reason, refused.reason
        assert outcome(await ex.handle(execute(PID, "near", price="60500"))).status == "filled"


async def test_a_stops_sale_after_a_crash_is_judged_on_the_crash_candle_not_an_older_close(
    peer: CoinbasePeer, no_secret_in_logs: list[str], kafka_bootstrap: str, namespace: str
) -> None:
    """The strategy sells on a crash candle this worker has not read yet (another topic): the band takes the
    close from md.candles' tail, newer than its own, instead of refusing the sale as a dump of 25 %."""
    topics = Topics(namespace)
    await ensure_topics(kafka_bootstrap, [TopicSpec(topics.candles, 3)])
    crash_open = T + 3600
    pub = Publisher(kafka_bootstrap, client_id="test-band-crash")
    await pub.start()
    try:
        await pub.send(
            topics.candles, candle("BTC/USDC", crash_open, 60000, low=45000, close=45000), key="BTC/USDC"
        )
        await pub.flush()
    finally:
        await pub.stop()

    async def lookup(product: str) -> tuple[datetime, Decimal] | None:
        return (await latest_closes(kafka_bootstrap, topics.candles)).get(product)

    async with banded(peer, "coinbase", no_secret_in_logs, lookup) as ex:
        await ex.handle(candle("BTC/USDC", T, 60000, close=60000))  # all this worker has read itself
        step = datetime.fromtimestamp(crash_open, UTC)
        stop_sale = execute(PID, "stop-after-crash", side="sell", size="0.01", price="45000").model_copy(
            update={
                "step_time": step,
                "trigger_price": D(45000),
                "trigger_candle": step,
                "intent_reason": "stop_loss",
            }
        )
        done = outcome(await ex.handle(stop_sale))
        assert not done.reason.startswith("price band"), done.reason
        assert ex.references["BTC/USDC"] == (step, D(45000))
