"""Protective orders resting at the exchange, through real ccxt against the local Coinbase peer.

A stop loss (Advanced Trade: stop-limit or bracket; Exchange API: stop-limit) is placed by the adapter, rests
while the market stays on the right side, and fills at the peer when `peer.trade(...)` prints through it: at the
print when the triggered limit is marketable, at its limit when it rested first (tests/peer/coinbase_peer.py,
PROTECTIVE ORDERS). The balances move by exactly that fill. No Kafka or Redis is needed.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from services.execution.ccxt_adapter import CcxtExchange
from services.execution.errors import RejectedError
from services.execution.ports import ExchangeOrder
from tests.integration import test_exchange_adapters as adapters
from tests.integration.test_exchange_adapters import adapter, coid, creds_for, orders_with, posts
from tests.peer.coinbase_peer import STOP_DOWN, CoinbasePeer, PeerOrder

# The autouse fixture scanning every log and output for the credentials: these tests run under it too.
no_secret_in_logs = adapters.no_secret_in_logs

D = Decimal
APIS = ["coinbase", "coinbaseexchange"]
FEE = D("0.006")  # the peer's taker fee


async def open_port(peer: CoinbasePeer, api: str, secrets_used: list[str]) -> CcxtExchange:
    return await adapter(peer, creds_for(peer, api, "profile_a", secrets_used))


def sent_orders(peer: CoinbasePeer) -> list[dict[str, Any]]:
    """The bodies of the order creations ccxt sent, in order."""
    return [
        json.loads(r.body)
        for r in peer.requests
        if r.method == "POST" and r.path in ("/orders", "/api/v3/brokerage/orders")
    ]


def balances(peer: CoinbasePeer) -> tuple[Decimal, Decimal]:
    b = peer.account_of("profile_a").balances
    return b["BTC"], b["USDC"]


def fee(size: Decimal, price: Decimal) -> Decimal:
    return (size * price * FEE).quantize(D("0.00000001"))


def only(peer: CoinbasePeer, client_id: str) -> PeerOrder:
    (po,) = orders_with(peer, client_id)
    return po


# ------------------------------------------------------------------------------------------ placing
@pytest.mark.parametrize("api", APIS)
async def test_stop_is_placed_with_the_right_configuration_and_rounding(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await open_port(peer, api, no_secret_in_logs)
    try:
        o = await port.create_protective(
            coid("sl"), "BTC/USDC", D("0.0123456789"), D("57000.123"), stop_limit_price=D("56000.129")
        )
        listed = await port.fetch_open_orders("BTC/USDC")
        found = await port.fetch_order_by_client_id(coid("sl"), "BTC/USDC")
        peer.trade("BTC-USDC", D("58000"))  # above the stop: it keeps resting
        after = await port.fetch_open_orders()
    finally:
        await port.close()
    # Size down (never above what was asked), the stop up (triggers no later), its limit down (fills sooner).
    (body,) = sent_orders(peer)
    if api == "coinbase":
        assert body["client_order_id"] == coid("sl") and body["side"] == "SELL"
        assert body["order_configuration"] == {
            "stop_limit_stop_limit_gtc": {
                "base_size": "0.01234567",
                "limit_price": "56000.12",
                "stop_price": "57000.13",
                "stop_direction": "STOP_DIRECTION_STOP_DOWN",
            }
        }
    else:
        assert (body["type"], body["side"], body["stop"]) == ("limit", "sell", "loss")
        assert (body["size"], body["price"], body["stop_price"]) == ("0.01234567", "56000.12", "57000.13")
        assert body["client_oid"] == coid("sl")
    po = only(peer, coid("sl"))
    assert po.status == "OPEN" and po.fills == [] and po.stop_direction == STOP_DOWN
    assert (o.kind, o.side, o.size, o.stop_price, o.limit_price, o.status) == (
        "stop",
        "sell",
        D("0.01234567"),
        D("57000.13"),
        D("56000.12"),
        "open",
    )
    assert o.exchange_order_id == po.order_id
    for seen in (listed, after):
        (lo,) = seen
        assert (lo.kind, lo.stop_price, lo.limit_price, lo.size, lo.status, lo.client_order_id) == (
            "stop",
            D("57000.13"),
            D("56000.12"),
            D("0.01234567"),
            "open",
            coid("sl"),
        )
    assert found is not None and found.kind == "stop" and found.stop_price == D("57000.13")
    assert balances(peer) == (D("1"), D("100000"))  # resting moves nothing


async def test_ccxt_alone_drops_the_take_profit_so_the_bracket_goes_in_params(
    peer: CoinbasePeer, no_secret_in_logs: list[str]
) -> None:
    """The fact behind the adapter's bracket: given stopLossPrice and takeProfitPrice, ccxt sends a plain
    stop-limit on the stop loss and nothing of the take profit."""
    port = await open_port(peer, "coinbase", no_secret_in_logs)
    try:
        await port._ex.create_order(
            "BTC/USDC",
            "limit",
            "sell",
            0.01,
            55000.0,
            {"client_order_id": coid("raw"), "stopLossPrice": 57000.0, "takeProfitPrice": 63000.0},
        )
    finally:
        await port.close()
    (body,) = sent_orders(peer)
    assert list(body["order_configuration"]) == ["stop_limit_stop_limit_gtc"]
    cfg = body["order_configuration"]["stop_limit_stop_limit_gtc"]
    assert cfg["stop_price"] == "57000" and cfg["stop_direction"] == STOP_DOWN
    assert "63000" not in json.dumps(body)


async def test_bracket_is_placed_as_one_trigger_bracket_order(
    peer: CoinbasePeer, no_secret_in_logs: list[str]
) -> None:
    port = await open_port(peer, "coinbase", no_secret_in_logs)
    try:
        o = await port.create_protective(
            coid("br"), "BTC/USDC", D("0.01"), D("57000.001"), take_profit_price=D("63000.019")
        )
        (listed,) = await port.fetch_open_orders()
    finally:
        await port.close()
    (body,) = sent_orders(peer)
    assert body["order_configuration"] == {
        "trigger_bracket_gtc": {
            "base_size": "0.01",
            "limit_price": "63000.01",
            "stop_trigger_price": "57000.01",
        }
    }
    assert body["client_order_id"] == coid("br")
    for x in (o, listed):
        assert (x.kind, x.size, x.limit_price, x.stop_price, x.status) == (
            "bracket",
            D("0.01"),
            D("63000.01"),
            D("57000.01"),
            "open",
        )
    assert only(peer, coid("br")).order_type == "bracket"


# ------------------------------------------------------------------------------------------ triggering
@pytest.mark.parametrize("api", APIS)
async def test_stop_fills_once_at_the_print_when_the_market_trades_through(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await open_port(peer, api, no_secret_in_logs)
    try:
        o = await port.create_protective(coid("sl"), "BTC/USDC", D("0.5"), D("57000"))
        assert o.limit_price == D("54150")  # the default limit: 5% under the stop
        assert peer.trade("BTC/USDC", D("57000.01")) == []  # a cent above: nothing
        first = peer.trade("BTC/USDC", D("56900"))
        again = peer.trade("BTC/USDC", D("56000"))
        done = await port.fetch_order(o)
        fills = await port.fetch_fills(order=done)
        bal = await port.balances()
        still_open = await port.fetch_open_orders()
    finally:
        await port.close()
    assert [(f.size, f.price) for f in first] == [(D("0.5"), D("56900"))] and again == []
    assert (done.status, done.filled_size, done.kind) == ("filled", D("0.5"), "stop")
    assert [(f.size, f.price, f.side) for f in fills] == [(D("0.5"), D("56900"), "sell")]
    assert fills[0].fee == fee(D("0.5"), D("56900"))
    btc, usdc = balances(peer)
    assert btc == D("0.5") and usdc == D("100000") + D("0.5") * D("56900") - fee(D("0.5"), D("56900"))
    assert bal["BTC"].total == btc and bal["USDC"].total == usdc  # what the exchange reports through ccxt
    assert still_open == [] and peer.price("BTC-USDC") == D("56000")


@pytest.mark.parametrize("api", APIS)
async def test_a_gap_through_the_limit_rests_then_fills_at_the_limit(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await open_port(peer, api, no_secret_in_logs)
    try:
        o = await port.create_protective(
            coid("gap"), "BTC/USDC", D("0.2"), D("57000"), stop_limit_price=D("56500")
        )
        gapped = peer.trade("BTC/USDC", D("56000"))  # through the stop and its limit at once
        resting = await port.fetch_order(o)
        below = peer.trade("BTC/USDC", D("56499.99"))
        back = peer.trade("BTC/USDC", D("56800"))
        done = await port.fetch_order(o)
    finally:
        await port.close()
    assert gapped == [] and below == []
    assert resting.status == "open" and resting.filled_size == 0
    assert only(peer, coid("gap")).triggered
    assert [(f.size, f.price) for f in back] == [(D("0.2"), D("56500"))]  # resting: its own limit
    assert done.status == "filled" and done.average_price in (None, D("56500"))
    assert balances(peer) == (
        D("0.8"),
        D("100000") + D("0.2") * D("56500") - fee(D("0.2"), D("56500")),
    )


@pytest.mark.parametrize("side", ["take_profit", "stop"])
async def test_bracket_fills_on_one_side_and_the_other_is_gone(
    peer: CoinbasePeer, side: str, no_secret_in_logs: list[str]
) -> None:
    port = await open_port(peer, "coinbase", no_secret_in_logs)
    try:
        o = await port.create_protective(
            coid("br"), "BTC/USDC", D("0.3"), D("57000"), take_profit_price=D("63000")
        )
        assert peer.trade("BTC/USDC", D("62999.99")) == [] and peer.trade("BTC/USDC", D("57000.01")) == []
        first = peer.trade("BTC/USDC", D("63500") if side == "take_profit" else D("56800"))
        other = peer.trade("BTC/USDC", D("56000") if side == "take_profit" else D("64000"))
        done = await port.fetch_order(o)
        still_open = await port.fetch_open_orders()
    finally:
        await port.close()
    # Take profit: a resting limit lifted by the market, at its limit. Stop: triggered, its limit 5% under
    # (54150) is marketable at the print, so it fills at the print.
    px = D("63000") if side == "take_profit" else D("56800")
    assert [(f.size, f.price) for f in first] == [(D("0.3"), px)]
    assert other == [] and still_open == []
    assert (done.status, done.filled_size, done.kind) == ("filled", D("0.3"), "bracket")
    assert balances(peer) == (D("0.7"), D("100000") + D("0.3") * px - fee(D("0.3"), px))


async def test_a_thin_print_fills_part_and_the_rest_rests_at_its_limit(
    peer: CoinbasePeer, no_secret_in_logs: list[str]
) -> None:
    port = await open_port(peer, "coinbase", no_secret_in_logs)
    try:
        o = await port.create_protective(coid("thin"), "BTC/USDC", D("0.5"), D("57000"))
        first = peer.trade("BTC/USDC", D("56900"), size=D("0.2"))  # only 0.2 BTC traded at this print
        part = await port.fetch_order(o)
        rest = peer.trade("BTC/USDC", D("56000"))  # the remainder rests at its limit 54150: reached
        done = await port.fetch_order(o)
        fills = await port.fetch_fills(order=o)
    finally:
        await port.close()
    assert [(f.size, f.price) for f in first] == [(D("0.2"), D("56900"))]
    assert (part.status, part.filled_size) == ("open", D("0.2"))
    assert [(f.size, f.price) for f in rest] == [(D("0.3"), D("54150"))]
    assert (done.status, done.filled_size) == ("filled", D("0.5"))
    assert sorted((f.size, f.price) for f in fills) == [(D("0.2"), D("56900")), (D("0.3"), D("54150"))]
    got = (
        D("0.2") * D("56900") + D("0.3") * D("54150") - fee(D("0.2"), D("56900")) - fee(D("0.3"), D("54150"))
    )
    assert balances(peer) == (D("0.5"), D("100000") + got)


def test_the_peer_refuses_a_print_it_cannot_be() -> None:
    peer = CoinbasePeer()
    with pytest.raises(ValueError, match="got '-1'"):
        peer.trade("BTC-USDC", "-1")
    with pytest.raises(ValueError, match="unknown product 'DOGE/USDC'"):
        peer.price("DOGE/USDC")
    assert peer.price("BTC/USDC") == D("60000")


# ------------------------------------------------------------------------------------------ cancel, never twice
@pytest.mark.parametrize("api", APIS)
async def test_cancelled_protective_order_fills_nothing(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await open_port(peer, api, no_secret_in_logs)
    try:
        o = await port.create_protective(coid("cx"), "BTC/USDC", D("0.4"), D("57000"))
        cancelled = await port.cancel(o)
        through = peer.trade("BTC/USDC", D("55000"))
        left = await port.fetch_open_orders()
    finally:
        await port.close()
    assert cancelled.status == "cancelled" and only(peer, coid("cx")).status == "CANCELLED"
    assert through == [] and left == [] and only(peer, coid("cx")).fills == []
    assert balances(peer) == (D("1"), D("100000"))
    if api == "coinbase":
        assert any(r.path == "/api/v3/brokerage/orders/batch_cancel" for r in peer.requests)


@pytest.mark.parametrize("api", APIS)
async def test_protective_order_placed_twice_is_one_order(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await open_port(peer, api, no_secret_in_logs)
    try:
        first = await port.create_protective(coid("twice"), "BTC/USDC", D("0.1"), D("57000"))
        again = await port.create_protective(coid("twice"), "BTC/USDC", D("0.1"), D("57000"))
        fills = peer.trade("BTC/USDC", D("56000"))
    finally:
        await port.close()
    assert first.exchange_order_id == again.exchange_order_id
    assert len(orders_with(peer, coid("twice"))) == 1 and len(fills) == 1
    # Advanced Trade de-duplicates the resent client_order_id; on the Exchange API the lookup stops the resend.
    assert posts(peer) == (2 if api == "coinbase" else 1)
    assert again.kind == "stop" and again.stop_price == D("57000")


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"stop_price": D("0")}, "stop price must be positive, got 0"),
        ({"stop_limit_price": D("57500")}, "stop limit price 57500 is above the stop 57000"),
        ({"take_profit_price": D("56000")}, "take profit 56000 is not above the stop 57000"),
        ({"size": D("0.000001")}, "below minimum"),
    ],
)
async def test_bad_protective_orders_are_refused_before_sending(
    peer: CoinbasePeer, kw: dict[str, Any], match: str, no_secret_in_logs: list[str]
) -> None:
    port = await open_port(peer, "coinbase", no_secret_in_logs)
    args: dict[str, Any] = {"size": D("0.1"), "stop_price": D("57000")} | kw
    try:
        with pytest.raises(RejectedError, match=match):
            await port.create_protective(
                coid("bad"),
                "BTC/USDC",
                args.pop("size"),
                args.pop("stop_price"),
                **args,
            )
    finally:
        await port.close()
    assert posts(peer) == 0 and peer.orders == []


async def test_exchange_api_refuses_a_take_profit_before_sending(
    peer: CoinbasePeer, no_secret_in_logs: list[str]
) -> None:
    port = await open_port(peer, "coinbaseexchange", no_secret_in_logs)
    try:
        with pytest.raises(RejectedError, match="no order carrying both") as ei:
            await port.create_protective(
                coid("xtp"), "BTC/USDC", D("0.1"), D("57000"), take_profit_price=D("63000")
            )
    finally:
        await port.close()
    assert ei.value.kind == "unsupported" and posts(peer) == 0


@pytest.mark.parametrize("api", APIS)
async def test_the_peer_refuses_a_stop_above_the_market_and_a_sale_beyond_the_holding(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await open_port(peer, api, no_secret_in_logs)
    try:
        with pytest.raises(RejectedError) as above:
            await port.create_protective(coid("above"), "BTC/USDC", D("0.1"), D("61000"))
        await port.create_protective(coid("held"), "BTC/USDC", D("0.7"), D("57000"))
        with pytest.raises(RejectedError) as beyond:  # 0.7 of the 1 BTC is held by the first stop
            await port.create_protective(coid("beyond"), "BTC/USDC", D("0.4"), D("56000"))
    finally:
        await port.close()
    assert "61000" in above.value.reason and "60000" in above.value.reason
    assert beyond.value.kind == "insufficient_funds"
    assert [o.client_id for o in peer.orders] == [coid("held")]


def test_exchange_order_defaults_keep_old_callers_working() -> None:
    o = ExchangeOrder("x", "c", "BTC/USDC", "buy", D("1"), D("0"), "open", D("100"))
    assert (o.kind, o.stop_price, o.protective) == ("limit", None, False)
