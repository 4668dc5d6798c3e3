"""The market-data peer over loopback with a real aiohttp client: REST candles and time, the websocket protocol,
every fault, and the CLI. No Kafka or Redis is needed (the directory marks these `integration` anyway)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.peer.coinbase_md_peer import CoinbaseMdPeer, Trade, aggregate

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2026, 4, 7, 14, 30, tzinfo=UTC)
START_S = int(START.timestamp())
G = 60
CANDLES = "/api/v3/brokerage/market/products/{}/candles"
KEYS = {"start", "low", "high", "open", "close", "volume"}


class FakeMono:
    """A monotonic clock the test moves by hand: REST answers become exact."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def get(
    s: aiohttp.ClientSession,
    peer: CoinbaseMdPeer,
    product: str,
    start: int,
    end: int,
    gran: str = "ONE_MINUTE",
) -> tuple[int, Any, aiohttp.ClientResponse]:
    params = {"start": str(start), "end": str(end), "granularity": gran}
    async with s.get(peer.base_url + CANDLES.format(product), params=params) as r:
        return r.status, await r.json(), r


async def collect(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> list[dict[str, Any]]:
    """Every text message for `seconds` (or until the socket ends)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await ws.receive(timeout=left)
        except TimeoutError:
            break
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        out.append(json.loads(msg.data))
    return out


async def subscribe(ws: aiohttp.ClientWebSocketResponse, channel: str, products: list[str]) -> None:
    await ws.send_json({"type": "subscribe", "product_ids": products, "channel": channel})


def trades_of(msgs: list[dict[str, Any]], kind: str | None = None) -> list[dict[str, str]]:
    return [
        t
        for m in msgs
        if m.get("channel") == "market_trades"
        for e in m["events"]
        if kind is None or e["type"] == kind
        for t in e["trades"]
    ]


def of(msgs: list[dict[str, Any]], channel: str) -> list[dict[str, Any]]:
    return [m for m in msgs if m.get("channel") == channel]


# ---------------------------------------------------------------------------------------------- REST
async def test_candles_shape_newest_first_open_bucket_included_empty_left_out(
    session: aiohttp.ClientSession,
) -> None:
    mono = FakeMono()
    empty = START_S - 3 * G
    async with CoinbaseMdPeer(
        ["BTC-USD", "ETH-USD"], start=START, speed=1, monotonic=mono, empty={("BTC-USD", empty)}
    ) as peer:
        mono.t += 30.5  # half-way into the 14:30 bucket
        status, body, _ = await get(session, peer, "BTC-USD", START_S - 10 * G, START_S + 10 * G)
        assert status == 200
        candles = body["candles"]
        assert all(set(c) == KEYS and all(isinstance(v, str) for v in c.values()) for c in candles)
        starts = [int(c["start"]) for c in candles]
        assert starts == sorted(starts, reverse=True)  # newest first
        assert starts[0] == START_S  # the open bucket; no future bucket
        assert empty not in starts and len(starts) == 10  # 10 closed buckets + the open one - the empty one
        now_us = START_S * 1_000_000 + 30_500_000
        partial = aggregate(
            START_S, [t for t in peer.trades("BTC-USD", START_S, START_S + G) if t.time_us <= now_us]
        )
        assert partial is not None and candles[0] == partial.to_json()
        assert candles[1:][::-1] == peer.final_candles("BTC-USD", START_S - 10 * G, START_S)
        # -USDC is accepted on REST and is the same book
        _, body_usdc, _ = await get(session, peer, "BTC-USDC", START_S - 10 * G, START_S + 10 * G)
        assert body_usdc == body


async def test_candles_argument_errors(session: aiohttp.ClientSession) -> None:
    mono = FakeMono()
    async with CoinbaseMdPeer(["BTC-USD"], start=START, monotonic=mono) as peer:
        status, body, _ = await get(session, peer, "BTC-USD", START_S - 301 * G, START_S)
        assert (
            status == 400
            and body["error"] == "INVALID_ARGUMENT"
            and {"error_details", "message"} <= set(body)
        )
        mono.t += 30  # the open bucket has trades by now
        status, body, _ = await get(session, peer, "BTC-USD", START_S - 300 * G, START_S)
        assert status == 200 and len(body["candles"]) == 301  # start <= s <= end: 300 spans, 301 buckets
        status, body, _ = await get(session, peer, "BTC-USD", START_S - 600, START_S, "TEN_MINUTE")
        assert status == 400 and body["error"] == "INVALID_ARGUMENT"
        status, body, _ = await get(session, peer, "DOGE-USD", START_S - 600, START_S)
        assert status == 404 and body["error"] == "NOT_FOUND"
        async with session.get(
            peer.base_url + CANDLES.format("BTC-USD"), params={"granularity": "ONE_MINUTE"}
        ) as r:
            assert r.status == 400
        async with session.get(peer.base_url + "/api/v3/brokerage/market/products") as r:
            assert r.status == 404  # not served by this peer
        history = START_S - 1200 * G  # history goes back as far as asked
        status, body, _ = await get(session, peer, "BTC-USD", history, history + 299 * G)
        assert status == 200 and len(body["candles"]) == 300
        assert body["candles"][::-1] == peer.final_candles("BTC-USD", history, history + 300 * G)
        statuses = [r.status for r in peer.requests]
        assert statuses == [400, 200, 400, 404, 400, 404, 200]
        assert (
            peer.requests[0].params["granularity"] == "ONE_MINUTE" and peer.requests[0].peer_time_s == START_S
        )
        assert (
            peer.requests[1].path == CANDLES.format("BTC-USD")
            and peer.requests[1].peer_time_s == START_S + 30
        )


async def test_coarser_granularity_is_aggregated(session: aiohttp.ClientSession) -> None:
    mono = FakeMono()
    async with CoinbaseMdPeer(["ETH-USD"], start=START, monotonic=mono, quiet_every={"ETH-USD": 7}) as peer:
        mono.t += 3600
        status, body, _ = await get(session, peer, "ETH-USD", START_S, START_S + 3600 - 1, "FIVE_MINUTE")
        assert status == 200
        assert body["candles"][::-1] == peer.final_candles(
            "ETH-USD", START_S, START_S + 3600, granularity_s=300
        )
        one = peer.final_candles("ETH-USD", START_S, START_S + 300)
        five = body["candles"][-1]
        assert five["open"] == one[0]["open"] and five["close"] == one[-1]["close"]
        assert Decimal(five["volume"]) == sum(Decimal(c["volume"]) for c in one)


async def test_rest_429_fault_and_rate_limit(session: aiohttp.ClientSession) -> None:
    async with CoinbaseMdPeer(["BTC-USD"], start=START) as peer:
        peer.rest_429(2, retry_after_s=1)
        for _ in range(2):
            status, body, r = await get(session, peer, "BTC-USD", START_S - 600, START_S)
            assert (
                status == 429 and r.headers["Retry-After"] == "1" and body["error"] == "rate_limit_exceeded"
            )
        status, _, _ = await get(session, peer, "BTC-USD", START_S - 600, START_S)
        assert status == 200
        peer.set_rate_limit(2)  # a token bucket: 2 at once, then one every 0.5 s
        got = [(await get(session, peer, "BTC-USD", START_S - 600, START_S))[0] for _ in range(6)]
        assert got[:2] == [200] * 2 and got.count(429) >= 3
        await asyncio.sleep(0.55)  # one token back
        assert (await get(session, peer, "BTC-USD", START_S - 600, START_S))[0] == 200


async def test_late_bucket_appears_only_after_its_delay(session: aiohttp.ClientSession) -> None:
    mono = FakeMono()
    async with CoinbaseMdPeer(["BTC-USD"], start=START, monotonic=mono) as peer:
        late = START_S + G
        peer.late_bucket("BTC-USDC", late, 30)

        async def starts() -> list[int]:
            _, body, _ = await get(session, peer, "BTC-USD", START_S, START_S + 10 * G)
            return [int(c["start"]) for c in body["candles"]]

        mono.t += 2 * G + 29  # the late bucket ended 29 s ago
        assert await starts() == [START_S + 2 * G, START_S]
        mono.t += 1
        assert await starts() == [START_S + 2 * G, late, START_S]
        peer.set_rest_lag(20)  # now every bucket is 20 s late: the open one and the one that closed 30 s ago
        assert await starts() == [late, START_S]
        mono.t += 49  # 14:33:19: the 14:32 bucket closed 19 s ago, still hidden
        assert await starts() == [late, START_S]
        mono.t += 1
        assert await starts() == [START_S + 2 * G, late, START_S]


async def test_server_time_follows_the_fast_clock(session: aiohttp.ClientSession) -> None:
    async def server_ms() -> tuple[dict[str, str], int, float, float]:
        before = time.monotonic()
        async with session.get(peer.base_url + "/api/v3/brokerage/time") as r:
            body = await r.json()
        return body, int(body["epochMillis"]), before, time.monotonic()

    async with CoinbaseMdPeer(["BTC-USD"], start=START, speed=120) as peer:
        t1, ms1, a1, b1 = await server_ms()
        await asyncio.sleep(0.5)
        t2, ms2, a2, b2 = await server_ms()
        assert all(isinstance(v, str) for v in (*t1.values(), *t2.values()))
        assert t1["iso"].endswith("Z") and t1["iso"].startswith("2026-04-07T14:30:")
        assert datetime.fromisoformat(t1["iso"].replace("Z", "+00:00")).timestamp() == ms1 / 1000
        assert int(t1["epochSeconds"]) == ms1 // 1000
        # 120 peer ms per real ms, whatever the load: bounded by the real time between the two requests
        assert 120_000 * (a2 - b1) - 5 <= ms2 - ms1 <= 120_000 * (b2 - a1) + 5
        await peer.fault("set_speed", speed=1)
        _, ms3, a3, b3 = await server_ms()
        await asyncio.sleep(0.3)
        _, ms4, a4, b4 = await server_ms()
        assert ms3 >= ms2  # continuous
        assert 1000 * (a4 - b3) - 5 <= ms4 - ms3 <= 1000 * (b4 - a3) + 5


# ---------------------------------------------------------------------------------------------- websocket
async def test_subscribe_heartbeats_and_trades_with_contiguous_sequence(
    session: aiohttp.ClientSession,
) -> None:
    async with (
        CoinbaseMdPeer(["BTC-USD", "ETH-USD"], start=START, speed=60, heartbeat_interval_s=0.25) as peer,
        session.ws_connect(peer.ws_url) as ws,
    ):
        await subscribe(ws, "heartbeats", ["BTC-USD"])
        await subscribe(ws, "market_trades", ["BTC-USDC", "ETH-USD"])
        msgs = await collect(ws, 1.6)
        assert [m["sequence_num"] for m in msgs] == list(range(len(msgs)))
        assert all(set(m) == {"channel", "timestamp", "sequence_num", "events"} for m in msgs)
        assert all(
            m["timestamp"].endswith("Z") and m["timestamp"].startswith("2026-04-07T14:3") for m in msgs
        )
        subs = of(msgs, "subscriptions")
        assert subs[0]["events"] == [{"subscriptions": {"heartbeats": ["BTC-USD"]}}]
        assert subs[1]["events"] == [
            {"subscriptions": {"heartbeats": ["BTC-USD"], "market_trades": ["BTC-USD", "ETH-USD"]}}
        ]
        assert msgs[2]["channel"] == "market_trades" and msgs[2]["events"][0]["type"] == "snapshot"
        snap = trades_of(msgs, "snapshot")
        assert len(snap) == 100 and {t["product_id"] for t in snap} == {"BTC-USD", "ETH-USD"}
        assert [t["time"] for t in snap] == sorted((t["time"] for t in snap), reverse=True)
        updates = trades_of(msgs, "update")
        assert len(updates) >= 5 and all(
            set(t) == {"trade_id", "product_id", "price", "size", "side", "time"} for t in updates
        )
        assert {t["trade_id"] for t in updates}.isdisjoint({t["trade_id"] for t in snap})
        assert min(t["time"] for t in updates) > max(t["time"] for t in snap)
        hbs = of(msgs, "heartbeats")
        assert len(hbs) >= 4
        counters = [m["events"][0]["heartbeat_counter"] for m in hbs]
        assert counters == sorted(set(counters))
        ct = hbs[-1]["events"][0]["current_time"]
        assert ct.startswith("2026-04-07 14:3") and " +0000 UTC m=+" in ct
        assert peer.stats.connections == 1 and peer.stats.subscribes == 2
        assert peer.stats.messages_sent == len(msgs)


async def test_bad_subscribes_get_an_error_and_unsubscribe_works(session: aiohttp.ClientSession) -> None:
    async with (
        CoinbaseMdPeer(["BTC-USD"], start=START, speed=60) as peer,
        session.ws_connect(peer.ws_url) as ws,
    ):
        await subscribe(ws, "level3", ["BTC-USD"])
        await subscribe(ws, "market_trades", ["NOPE-USD"])
        await ws.send_str("{not json")
        await ws.send_json({"type": "subscribe", "channel": "market_trades"})
        msgs = await collect(ws, 0.3)
        assert msgs == [{"type": "error", "message": "failure to subscribe"}] * 4
        await subscribe(ws, "market_trades", ["BTC-USD"])
        assert len(await collect(ws, 0.5)) >= 3
        await ws.send_json({"type": "unsubscribe", "product_ids": ["BTC-USD"], "channel": "market_trades"})
        msgs = await collect(ws, 0.6)
        assert msgs[0]["channel"] == "subscriptions" and msgs[0]["events"] == [{"subscriptions": {}}]
        assert not trades_of(msgs)
        assert peer.stats.bad_subscribes == 4 and peer.stats.unsubscribes == 1


async def test_no_subscribe_is_closed_after_the_timeout(session: aiohttp.ClientSession) -> None:
    async with CoinbaseMdPeer(["BTC-USD"], start=START, subscribe_timeout_s=0.4) as peer:
        t0 = time.monotonic()
        async with session.ws_connect(peer.ws_url) as ws:
            msg = await ws.receive(timeout=3)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert 0.35 <= time.monotonic() - t0 < 2
        async with session.ws_connect(peer.ws_url) as ws:
            await subscribe(ws, "heartbeats", [])
            await asyncio.sleep(0.7)
            assert not ws.closed


async def test_close_is_a_clean_1000(session: aiohttp.ClientSession) -> None:
    async with (
        CoinbaseMdPeer(["BTC-USD"], start=START, speed=60) as peer,
        session.ws_connect(peer.ws_url) as ws,
    ):
        await subscribe(ws, "market_trades", ["BTC-USD"])
        await collect(ws, 0.2)
        task = asyncio.create_task(peer.close(1000))
        while (msg := await ws.receive(timeout=3)).type == aiohttp.WSMsgType.TEXT:
            pass
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1000
        await asyncio.wait_for(task, 3)


async def test_abort_is_seen_as_1006(session: aiohttp.ClientSession) -> None:
    async with (
        CoinbaseMdPeer(["BTC-USD"], start=START, speed=60) as peer,
        session.ws_connect(peer.ws_url) as ws,
    ):
        await subscribe(ws, "market_trades", ["BTC-USD"])
        await collect(ws, 0.2)
        peer.abort()
        while (msg := await ws.receive(timeout=3)).type == aiohttp.WSMsgType.TEXT:
            pass
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE)
        assert ws.close_code == 1006


async def test_silence_then_data_again(session: aiohttp.ClientSession) -> None:
    async with (
        CoinbaseMdPeer(["BTC-USD"], start=START, speed=120, heartbeat_interval_s=0.2) as peer,
        session.ws_connect(peer.ws_url) as ws,
    ):
        await subscribe(ws, "heartbeats", [])
        await subscribe(ws, "market_trades", ["BTC-USD"])
        before = await collect(ws, 0.3)
        peer.silence(0.8)
        t0 = time.monotonic()
        first = await ws.receive(timeout=3)
        assert time.monotonic() - t0 >= 0.7 and first.type == aiohttp.WSMsgType.TEXT
        assert json.loads(first.data)["sequence_num"] == before[-1]["sequence_num"] + 1
        assert not ws.closed


async def test_stop_heartbeats_while_trades_flow(session: aiohttp.ClientSession) -> None:
    async with (
        CoinbaseMdPeer(["BTC-USD"], start=START, speed=60, heartbeat_interval_s=0.1) as peer,
        session.ws_connect(peer.ws_url) as ws,
    ):
        await subscribe(ws, "heartbeats", [])
        await subscribe(ws, "market_trades", ["BTC-USD"])
        await collect(ws, 0.3)
        peer.stop_heartbeats(0.8)
        during = await collect(ws, 0.6)
        assert not of(during, "heartbeats") and trades_of(during, "update")
        after = await collect(ws, 0.5)
        assert of(after, "heartbeats")
        seqs = [m["sequence_num"] for m in during + after]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_sequence_jump_over_http_fault(session: aiohttp.ClientSession) -> None:
    async with (
        CoinbaseMdPeer(["BTC-USD"], start=START, speed=60, heartbeat_interval_s=0.1) as peer,
        session.ws_connect(peer.ws_url) as ws,
    ):
        await subscribe(ws, "heartbeats", [])
        before = await collect(ws, 0.3)
        async with session.post(peer.base_url + "/_peer/fault", json={"kind": "sequence_jump", "k": 5}) as r:
            assert r.status == 200
        after = await collect(ws, 0.3)
        seqs = [m["sequence_num"] for m in before + after]
        steps = [b - a for a, b in zip(seqs, seqs[1:], strict=False)]
        assert sorted(steps) == [1] * (len(steps) - 1) + [6]
        async with session.post(peer.base_url + "/_peer/fault", json={"kind": "meteor"}) as r:
            assert r.status == 400
        async with session.get(peer.base_url + "/_peer/stats") as r:
            stats = await r.json()
        assert stats["connections"] == 1 and stats["by_channel"]["heartbeats"] >= 4


async def test_resubscribe_repeats_snapshot_trades(session: aiohttp.ClientSession) -> None:
    async with CoinbaseMdPeer(["BTC-USD"], start=START, speed=30) as peer:
        async with session.ws_connect(peer.ws_url) as ws:
            await subscribe(ws, "market_trades", ["BTC-USD"])
            first = trades_of(await collect(ws, 0.5))
        async with session.ws_connect(peer.ws_url) as ws:
            await subscribe(ws, "market_trades", ["BTC-USD"])
            again = await collect(ws, 0.3)
            assert again[0]["sequence_num"] == 0
            second = trades_of(again, "snapshot")
            await subscribe(ws, "market_trades", ["BTC-USD"])  # on the same connection too
            third = trades_of(await collect(ws, 0.3), "snapshot")
        seen = {t["trade_id"] for t in first}
        assert len(seen & {t["trade_id"] for t in second}) >= 40
        assert len({t["trade_id"] for t in second} & {t["trade_id"] for t in third}) >= 40


async def test_outage_aborts_refuses_and_503s_then_recovers(session: aiohttp.ClientSession) -> None:
    async with CoinbaseMdPeer(["BTC-USD"], start=START, speed=60) as peer:
        async with session.ws_connect(peer.ws_url) as ws:
            await subscribe(ws, "market_trades", ["BTC-USD"])
            await collect(ws, 0.2)
            async with session.post(
                peer.base_url + "/_peer/fault", json={"kind": "outage", "seconds": 0.8}
            ) as r:
                assert r.status == 200
            while (await ws.receive(timeout=3)).type == aiohttp.WSMsgType.TEXT:
                pass
            assert ws.close_code == 1006
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await session.ws_connect(peer.ws_url)
        assert err.value.status == 503
        assert (await get(session, peer, "BTC-USD", START_S - 600, START_S))[0] == 503
        await asyncio.sleep(0.9)
        assert (await get(session, peer, "BTC-USD", START_S - 600, START_S))[0] == 200
        async with session.ws_connect(peer.ws_url) as ws:
            await subscribe(ws, "market_trades", ["BTC-USD"])
            assert trades_of(await collect(ws, 0.3), "snapshot")
        assert peer.stats.refused_connections == 1


async def test_streamed_trades_aggregate_to_the_rest_candles(session: aiohttp.ClientSession) -> None:
    start = datetime(2026, 4, 7, 14, 29, 58, tzinfo=UTC)
    async with (
        CoinbaseMdPeer(
            ["BTC-USD", "ETH-USD"],
            start=start,
            speed=60,
            quiet_every={"ETH-USD": 2},
            heartbeat_interval_s=0.1,
        ) as peer,
        session.ws_connect(peer.ws_url) as ws,
    ):
        await subscribe(ws, "heartbeats", [])
        await subscribe(ws, "market_trades", ["BTC-USD", "ETH-USD"])
        msgs: list[dict[str, Any]] = []
        # Until buckets 14:30, 14:31 and 14:32 have passed entirely (3 real seconds at speed 60): a message
        # stamped after 14:33:05 comes after every trade of 14:32, on both products.
        while not msgs or msgs[-1]["timestamp"] < "2026-04-07T14:33:05":
            batch = await collect(ws, 0.5)
            assert batch, "the stream stopped"
            msgs += batch
        # De-duplicated by trade_id (the snapshot and the first update may overlap on a real exchange).
        by_id = {(t["product_id"], t["trade_id"]): t for t in trades_of(msgs)}
        for product in ("BTC-USD", "ETH-USD"):
            _, body, _ = await get(session, peer, product, START_S, START_S + 2 * G)
            rest = {c["start"]: c for c in body["candles"]}
            for s in range(START_S, START_S + 3 * G, G):
                mine = sorted(
                    (
                        Trade(int(t["trade_id"]), p, Decimal(t["price"]), Decimal(t["size"]), t["side"], 0)
                        for (p, _), t in by_id.items()
                        if p == product and s <= datetime.fromisoformat(t["time"]).timestamp() < s + G
                    ),
                    key=lambda t: t.trade_id,
                )
                c = aggregate(s, mine)
                if product == "ETH-USD" and (s // G) % 2 == 0:
                    assert c is None and str(s) not in rest  # quiet: no trades, left out of REST
                else:
                    assert c is not None and c.to_json() == rest[str(s)]


# ---------------------------------------------------------------------------------------------- CLI
async def test_cli_prints_ready_and_stops_on_sigterm(session: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.peer.coinbase_md_peer",
        "--port",
        "0",
        "--speed",
        "120",
        "--start",
        "2026-04-07T14:30:00Z",
        "--granularity",
        "60",
        "--products",
        "BTC-USD,ETH-USD",
        "--quiet-every",
        "ETH-USD=3",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        word, http, ws_url = line.split(" ")
        assert (
            word == "ready"
            and http.startswith("http://127.0.0.1:")
            and ws_url == http.replace("http", "ws") + "/ws"
        )
        async with session.get(http + "/api/v3/brokerage/time") as r:
            assert (await r.json())["iso"].startswith("2026-04-07T14:3")
        async with session.ws_connect(ws_url) as ws:
            await subscribe(ws, "market_trades", ["ETH-USDC"])
            assert trades_of(await collect(ws, 0.3), "snapshot")[0]["product_id"] == "ETH-USD"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_close_over_http_fault_with_another_code(session: aiohttp.ClientSession) -> None:
    async with (
        CoinbaseMdPeer(["BTC-USD"], start=START, speed=60) as peer,
        session.ws_connect(peer.ws_url) as ws,
    ):
        await subscribe(ws, "heartbeats", [])
        async with session.post(peer.base_url + "/_peer/fault", json={"kind": "close", "code": 1001}) as r:
            assert r.status == 200
        while (await ws.receive(timeout=3)).type == aiohttp.WSMsgType.TEXT:
            pass
        assert ws.close_code == 1001
