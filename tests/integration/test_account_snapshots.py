"""Account snapshots of the live execution worker on a real broker, against the local Coinbase peer through real
ccxt (both APIs): one at start (after reconciliation), one after an order reaches its final state, and one every
interval; each carries the peer account's balances of the quote and every traded base asset, and nothing
credential-like (the message bytes are scanned for the key id, the secret, the passphrase and the account ids)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from services.execution.domain import traded_base_assets
from services.execution.live_wiring import LiveHandler, WriteAhead, open_live_execution, start_live
from shared.codec import encode
from shared.config import AppConfig
from shared.kafka import read_topics
from shared.messages import AccountSnapshotted, OrderFilled, OrderUpdated
from shared.topics import Topics
from tests.bus import create_namespace
from tests.integration.test_exchange_adapters import app_config, execute
from tests.integration.test_live_wiring import route_for, secret_pieces, store_profile_a
from tests.peer.coinbase_peer import CoinbasePeer
from tests.unit.builders import candle

D = Decimal


@pytest.mark.parametrize("api", ["coinbase", "coinbaseexchange"])
async def test_live_worker_publishes_account_snapshots_with_the_peers_balances_and_no_secret(
    peer: CoinbasePeer,
    api: str,
    kafka_bootstrap: str,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg: AppConfig = app_config(order_timeout=30.0)
    t = Topics(namespace)
    await create_namespace(kafka_bootstrap, cfg, namespace)
    stored = store_profile_a(peer, api, tmp_path, monkeypatch)
    acct = peer.account_of("profile_a")
    acct.balances = {"USDC": D("12345.67"), "BTC": D("0.75"), "LINK": D("2.5"), "DOGE": D("99")}

    live = await open_live_execution(
        "profile_a",
        cfg,
        clock=lambda: datetime.now(UTC),
        store_path=tmp_path / "c.enc",
        api_base=peer.base_url,
    )
    route = route_for(t)
    wal = await WriteAhead.started(kafka_bootstrap, route, "execution.profile_a.wal")
    handler = LiveHandler(live, write_ahead=wal, account_every_s=0.5)
    stop = asyncio.Event()
    try:
        started = await start_live(
            live, bootstrap=kafka_bootstrap, topics=t, route=route, client_id="execution.profile_a"
        )
        (start,) = [m for m in started if isinstance(m, AccountSnapshotted)]
        # An order fills at the peer: its final state is followed by a snapshot with the new balances. (The
        # market's close first, as md.candles gives it: the worker's price band needs it.)
        await handler.handle(candle("BTC/USDC", 1_767_225_600, 60000, close=60000))
        out = await handler.handle(execute("profile_a", f"snap-{api}", size="0.01", price="60000"))
        assert [u.status for u in out if isinstance(u, OrderUpdated)][-1] == "filled"
        (after,) = [m for m in out if isinstance(m, AccountSnapshotted)]
        for topic_msg in out:
            await wal([topic_msg])
        # Periodic snapshots, published through the write-ahead publisher while no message arrives.
        loop = asyncio.create_task(handler.account_loop(stop, wal))
        await asyncio.sleep(1.3)
        stop.set()
        await loop
    finally:
        await handler.close()

    quote = cfg.system.quote_asset
    assets = {quote, *traded_base_assets(cfg.profiles["profile_a"], quote)}
    assert start.trigger == "start" and start.source == "exchange" and start.quote == quote
    assert set(start.balances) == assets  # the quote and every traded base asset; DOGE is not the profile's
    assert start.balances["USDC"].total == D("12345.67") and start.balances["USDC"].used == 0
    assert start.balances["BTC"].total == D("0.75") and start.balances["BTC"].free == D("0.75")
    assert start.balances["LINK"].total == D("2.5")
    assert start.balances["ETH"].total == 0  # listed by the profile, not held
    assert start.balances["BTC"].size_increment == live.port.market("BTC/USDC").size_increment
    fills = [m for m in out if isinstance(m, OrderFilled)]
    bought = sum((f.size for f in fills), D(0))
    cost = sum((f.size * f.price + f.fee for f in fills), D(0))
    assert after.trigger == "order_final"
    assert after.balances["BTC"].total == D("0.75") + bought == acct.balances["BTC"]
    assert after.balances["USDC"].total == D("12345.67") - cost == acct.balances["USDC"]

    published, bad = await read_topics(kafka_bootstrap, [t.events, t.audit])
    assert bad == 0
    snaps = [m for m in published if isinstance(m, AccountSnapshotted)]
    assert {s.trigger for s in snaps} == {"start", "order_final", "periodic"}
    periodic = [s for s in snaps if s.trigger == "periodic"]
    assert periodic and all(s.balances == after.balances for s in periodic)
    # No credential, and no account id of the exchange, in any message on the topics.
    pieces = secret_pieces(stored)
    pieces += [str(uuid.uuid5(uuid.NAMESPACE_DNS, acct.key_id + c)) for c in acct.balances]
    for s in snaps:
        blob = encode(s).decode()
        assert not [p for p in pieces if p in blob]
    blob = b"\n".join(encode(m) for m in published).decode()
    assert not [p for p in pieces if p in blob]
