"""Live trading end to end against both local peers (issue #13): `mpctl run --live` of two profiles, each service its
own process, on the market-data peer's live candles (tests/peer/coinbase_md_peer.py, 60x clock, a subprocess)
with orders signed by real ccxt and sent to the order peer (tests/peer/coinbase_peer.py, in this process):
profile_a on Advanced Trade (brackets rest at the exchange), profile_b on the Exchange API (stop orders). A bridge
here prints every market-data trade at the order peer, so resting protective orders trigger on the same market
the candles come from.

1. A forward run until a protective order rests at the peer (its entry's fill published); then SIGKILL of every
   service (the whole process group) and, during the outage, the market falls through that stop (the md peer's
   `shock`): the stop fills at the peer while nothing of ours runs.
2. The same command again resumes (the strategies rebuild from their inputs: no state snapshot was written yet);
   a product switched to cancel-only gets no new order; once a position is open with its stop resting,
   `mpctl send kill all` cancels everything resting at the exchange and the strategies flatten; SIGTERM stops the
   run cleanly.
3. At the end: nothing rests and no position is left at the peer (the holdings the accounts had before, which the
   system did not trade, are untouched); the books in summary.json equal the peer's balances to the last
   increment (cash from the fills, positions none); every fill at the peer is in fills.jsonl once, the stop's
   sale of the outage among them, booked as the strategy's exit of that position; every order respects the product's increments
   and minimums; no account mismatch is left unresolved; no credential leaked.

The profiles' stop and take-profit levels are set wide, so that only the crash reaches one: a resting order the
market reaches while the strategy works another order in the product is not booked until the account check
finds it (issue #13 notes)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from mpctl.infra import Endpoints
from services.execution.live import protective_client_id
from shared.codec import DecodeError, decode
from shared.messages import AccountMismatchDetected, OrderFilled
from tests.e2e.test_live_pipeline import run, topic_bytes
from tests.e2e.test_run import HISTORY, ROOT, data_assets, low_threshold_config, md_peer_command
from tests.peer.coinbase_peer import CoinbasePeer, PeerOrder

PROFILES = ("profile_a", "profile_b")
SPEED = 60.0  # the market-data peer's clock: 60 of its seconds a real second
RECONCILE_S = 2.0  # real seconds: the product rules reload this often, so cancel-only is seen at once


async def start_md_peer() -> tuple[asyncio.subprocess.Process, str, str]:
    cmd = md_peer_command(SPEED)
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert proc.stdout is not None
    ready = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
    assert ready[:1] == ["ready"], ready
    return proc, ready[1], ready[2]


async def md_clock(rest_url: str) -> Callable[[], datetime]:
    """The market-data peer's clock, here: its server time taken once (at the middle of the request), run at its
    speed. The order peer's fills and orders are stamped with it, as Coinbase's are with the market's time."""
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.get(f"{rest_url}/api/v3/brokerage/time") as r:
            body = await r.json()
        mid = (t0 + time.monotonic()) / 2
    at = int(body["epochMillis"]) / 1000

    def now() -> datetime:
        return datetime.fromtimestamp(at + (time.monotonic() - mid) * SPEED, UTC)

    return now


async def bridge(ws_url: str, peer: CoinbasePeer, stop: asyncio.Event, printed: Counter[str]) -> None:
    """Every market-data trade, oldest first and once (re-subscribes repeat the snapshot), printed at the order
    peer: its last price moves and its resting protective orders react as Coinbase's do."""
    seen: dict[str, int] = {}
    products = [f"{a}-USD" for a in sorted(data_assets())]
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, ConnectionError):
                async with session.ws_connect(ws_url, heartbeat=None) as ws:
                    await ws.send_json(
                        {"type": "subscribe", "channel": "market_trades", "product_ids": products}
                    )
                    async for msg in ws:
                        if stop.is_set() or msg.type != aiohttp.WSMsgType.TEXT:
                            break
                        doc = json.loads(msg.data)
                        if doc.get("channel") != "market_trades":
                            continue
                        for ev in doc["events"]:
                            for t in reversed(ev["trades"]):  # newest first on the wire
                                pid = t["product_id"].replace("-USD", "-USDC")
                                tid = int(t["trade_id"])
                                if tid <= seen.get(pid, -1):
                                    continue
                                seen[pid] = tid
                                peer.trade(pid, Decimal(t["price"]))
                                printed[pid] += 1
            await asyncio.sleep(0.2)


def live_config(tmp_path: Path, rest_url: str, ws_url: str) -> Path:
    path = low_threshold_config(tmp_path, rest_url, ws_url)
    doc = yaml.safe_load(path.read_text())
    doc["system"]["mode"] = "live"
    ex = doc["system"].setdefault("execution", {})
    ex["reconcile_interval_s"] = RECONCILE_S
    ex["account_snapshot_interval_s"] = 5.0
    for pid, api in (("profile_a", "coinbase"), ("profile_b", "coinbaseexchange")):
        doc["profiles"][pid]["api_credentials"].update(source="store", exchange=api, sandbox=False)
        # The peer replays hourly candles as minutes (moves of a few % a bucket): levels this wide keep the market
        # from reaching them within the test, so every sale is the strategy's and the books can be compared.
        doc["profiles"][pid]["risk_management"].update(stop_loss_pct=20.0, take_profit_pct=60.0)
    for pid in list(doc["profiles"]):
        if pid not in PROFILES:
            doc["profiles"][pid]["enabled"] = False
    path.write_text(yaml.safe_dump(doc))
    return path


async def mpctl(env: dict[str, str], *argv: str, stdin: bytes | None = None, timeout: float = 120) -> str:
    code, text = await run([sys.executable, "-m", "mpctl.cli", *argv], env, stdin=stdin, timeout=timeout)
    assert code == 0, text
    return text


async def start_run(env: dict[str, str], *argv: str) -> asyncio.subprocess.Process:
    """`mpctl run` in its own process group: SIGKILL of the group kills it and every service it started."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mpctl.cli",
        "run",
        *argv,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )


async def until(cond: Any, timeout: float, what: str, proc: asyncio.subprocess.Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.returncode is not None:
            out = (await proc.stdout.read()).decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}:\n{out[-4000:]}")
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def resting_protective(peer: CoinbasePeer) -> list[PeerOrder]:
    return [o for o in peer.orders if o.protective and o.status == "OPEN" and not o.triggered]


def held(peer: CoinbasePeer, initial: dict[str, dict[str, Decimal]]) -> dict[str, dict[str, Decimal]]:
    """What each profile holds at the peer beyond its holdings before the run (its positions), by base asset."""
    out: dict[str, dict[str, Decimal]] = {}
    quote = "USDC"
    for pid in PROFILES:
        bal = peer.account_of(pid).balances
        extra = {a: b - initial[pid].get(a, Decimal(0)) for a, b in bal.items() if a != quote}
        out[pid] = {a: d for a, d in extra.items() if d != 0}
    return out


def on_increment(x: Decimal, inc: str) -> bool:
    q = x / Decimal(inc)
    return q == q.to_integral_value()


async def test_live_forward_run_survives_sigkill_of_everything_and_kill_all_leaves_nothing_resting(
    infra: Endpoints, peer: CoinbasePeer, tmp_path: Path
) -> None:
    md, rest_url, ws_url = await start_md_peer()
    peer.market_clock = await md_clock(rest_url)
    stop_bridge = asyncio.Event()
    printed: Counter[str] = Counter()
    bridge_task = asyncio.create_task(bridge(ws_url, peer, stop_bridge, printed))
    runs: list[asyncio.subprocess.Process] = []
    outputs: list[str] = []
    try:
        adv = peer.add_advanced_profile("profile_a")
        exc = peer.add_exchange_profile("profile_b")
        # Both accounts also hold BTC, ETH and SOL the system never traded: never sold, and out of the equity (the
        # peer's prices jump where its data wraps at its start: counted, they would halt a profile at once).
        initial = {pid: dict(peer.account_of(pid).balances) for pid in PROFILES}
        await until(lambda: len(printed) == len(data_assets()), 30, "the bridge's first prints")

        cfg = live_config(tmp_path, rest_url, ws_url)
        store_pass = "live forward store passphrase 2c9e"
        command_key = "live-forward-command-key-41d7a0"
        env = dict(
            os.environ,
            KAFKA_BOOTSTRAP_SERVERS=infra.kafka.servers,
            REDIS_URL=infra.redis_url,
            CI="true",
            MPCTL_CREDENTIALS_STORE=str(tmp_path / "secrets" / "credentials.enc"),
            MPCTL_SECRETS_PASSPHRASE=store_pass,
            MPCTL_COMMAND_KEY=command_key,
        )
        for k in ("MPCTL_SECRETS_KEY_FILE", "MPCTL_COMMAND_KEY_FILE"):
            env.pop(k, None)
        for pid, values, api in (
            ("profile_a", {"api_key": adv.key_name, "secret": adv.private_pem}, "coinbase"),
            (
                "profile_b",
                {"api_key": exc.api_key, "secret": exc.secret_b64, "passphrase": exc.passphrase},
                "coinbaseexchange",
            ),
        ):
            outputs.append(
                await mpctl(env, "secrets", "set", pid, "--exchange", api, stdin=json.dumps(values).encode())
            )
        out = tmp_path / "run"
        common = ("--config", str(cfg), "--out", str(out), "--live", "--exchange-api-base", peer.base_url)

        # 1. Forward until a protective order rests at the peer and its entry's fill is published, then SIGKILL
        # of everything. (An entry whose fill only the restart's reconciliation finds is stamped with the restart's
        # time, after the crash candles below: the strategy would not see its stop reached; issue #13 notes.)
        ns = ""
        published: set[str] = set()  # protective orders whose entry's fill is on the topics
        deadline = time.monotonic() + 240
        still: list[PeerOrder] = []
        # A sale the worker had just sent may still cancel the chosen stop after the kill (the peer answers it
        # then): the same command resumes the run, and the next resting stop is taken.
        for _attempt in range(3):
            first = await start_run(env, *common, "--max-steps", str(HISTORY + 400), "--timeout", "400")
            runs.append(first)
            candidates: list[PeerOrder] = []
            while not candidates:
                await until(
                    lambda: bool(resting_protective(peer)),
                    240,
                    "a protective order resting at the peer",
                    first,
                )
                assert time.monotonic() < deadline, "no protected entry's fill was published"
                ns = ns or json.loads((out / "run.json").read_text())["namespace"]
                watched = {o.client_id for o in resting_protective(peer)}
                for b in (await topic_bytes(infra.kafka, ns))[0]:
                    with contextlib.suppress(DecodeError, ValueError):
                        m = decode(b)
                        if isinstance(m, OrderFilled) and protective_client_id(m.client_order_id) in watched:
                            published.add(protective_client_id(m.client_order_id))
                # No await between the choice and the kill: the peer (this event loop) changes nothing meanwhile.
                candidates = [o for o in resting_protective(peer) if o.client_id in published]
            os.killpg(first.pid, signal.SIGKILL)
            assert first.stdout is not None
            outputs.append((await asyncio.wait_for(first.stdout.read(), 30)).decode(errors="replace"))
            await first.wait()
            still = [o for o in candidates if o.status == "OPEN" and not o.triggered]
            if still:
                break
        assert still, "every chosen stop was cancelled by a sale in flight at the kill, three times"
        victim = still[0]
        assert victim.stop_price is not None and victim.limit_price is not None
        # The market falls through the stop while nothing of ours runs: 2 % under it, above its limit (5 % under
        # it), for three buckets of the md peer, in its trades and candles alike.
        inc = Decimal(victim.product.quote_increment)
        crash = (victim.stop_price * Decimal("0.98") / inc).to_integral_value(ROUND_FLOOR) * inc
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{rest_url}/_peer/fault",
                json={"kind": "shock", "product": victim.product.id, "price": str(crash), "buckets": 3},
            ) as r,
        ):
            assert r.status == 200, await r.text()
        await until(lambda: victim.status == "FILLED", 30, f"the stop {victim.client_id} filling at the peer")
        assert {f.price for f in victim.fills} == {crash}

        # 2. The same command resumes.
        restarted = time.monotonic()
        second = await start_run(env, *common, "--max-steps", "200", "--timeout", "400")
        runs.append(second)
        await until(
            lambda: {r.profile for r in peer.requests if r.t >= restarted} >= set(PROFILES),
            90,
            "both execution workers at the peer again",
            second,
        )
        # The stop-loss exit books the protective fill: both profiles' positions in the product agree again.
        await asyncio.sleep(8)

        # A product no one holds or works on goes cancel-only: no order for it from then on.
        positions = held(peer, initial)
        busy = {o.product.id for o in peer.orders if o.status == "OPEN"} | {
            f"{a}-USDC" for h in positions.values() for a in h
        }
        traded = Counter(o.product.id for o in peer.orders)
        quiet = [p for p, _ in traded.most_common() if p not in busy] + sorted(
            f"{a}-USDC" for a in data_assets() if f"{a}-USDC" not in busy
        )
        halted = quiet[0]
        peer.set_status(halted, "cancel_only")
        # Orders are stamped with the market's (60x) time: the next reconciliation is this far ahead in it.
        effective = peer.market_time() + timedelta(seconds=(RECONCILE_S + 2.0) * SPEED)
        await asyncio.sleep(RECONCILE_S + 12.0)
        late = [o for o in peer.orders if o.product.id == halted and o.created > effective]
        assert late == [], [(o.client_id, o.side, o.created) for o in late]
        peer.set_status(halted, "online")

        # `kill all` once a position is open with its stop resting: every resting order is cancelled at the
        # exchange, and the strategies flatten.
        await until(
            lambda: bool(resting_protective(peer)) and any(held(peer, initial).values()),
            120,
            "an open position with its stop resting, to kill",
            second,
        )
        resting_at_kill = resting_protective(peer)
        outputs.append(
            await mpctl(
                env,
                "send",
                "kill",
                "all",
                "--run",
                str(out),
                "--config",
                str(cfg),
                "--reason",
                "end of the forward test",
            )
        )
        await until(
            lambda: (
                not [o for o in peer.orders if o.status == "OPEN"] and not any(held(peer, initial).values())
            ),
            90,
            "nothing resting and no position at the peer after kill all",
            second,
        )
        assert [o.status for o in resting_at_kill] == ["CANCELLED"] * len(resting_at_kill)
        # A clean stop (what Ctrl-C does): the services stop, the run's outputs are collected from the topics.
        # Every fill at the peer is on the topics (a worker publishes a sale's fill after its next poll of the
        # order) before the run is stopped and collects them.
        at_peer = sum(len(o.fills) for o in peer.orders)
        deadline = time.monotonic() + 60
        published_fills: set[str] = set()
        while len(published_fills) < at_peer and time.monotonic() < deadline:
            for b in (await topic_bytes(infra.kafka, ns))[0]:
                with contextlib.suppress(DecodeError, ValueError):
                    m = decode(b)
                    if isinstance(m, OrderFilled):
                        published_fills.add(m.fill_id)
            await asyncio.sleep(0.5)
        if len(published_fills) != at_peer:
            logs = out / "logs"
            raise AssertionError(
                f"{len(published_fills)} fills on the topics, {at_peer} at the peer: "
                + "; ".join(
                    f"{o.profile} {o.order_type} {o.side} {o.product.id} {o.client_id} {o.status} "
                    f"fills {[(f.size, f.price) for f in o.fills]}"
                    for o in peer.orders
                    if o.fills
                )
                + "\n"
                + "\n".join(
                    f"{p.name}: {p.read_text()[-3000:]}" for p in sorted(logs.glob("execution.*.log"))
                )
            )
        second.send_signal(signal.SIGTERM)
        assert second.stdout is not None
        text = (await asyncio.wait_for(second.stdout.read(), 120)).decode(errors="replace")
        outputs.append(text)
        assert await second.wait() == 0, text[-4000:]
        assert "Traceback" not in text and "interrupted" in text, text[-4000:]
    finally:
        for proc in runs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        stop_bridge.set()
        bridge_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bridge_task
        md.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(md.wait(), 10)
        except TimeoutError:
            md.kill()

    # 3. Nothing rests, no position, the untraded holdings untouched.
    assert [o.client_id for o in peer.orders if o.status == "OPEN"] == []
    for pid in PROFILES:
        bal = peer.account_of(pid).balances
        for asset, before in initial[pid].items():
            if asset != "USDC":
                assert bal.get(asset, Decimal(0)) == before, (pid, asset, bal.get(asset), before)
    # Every fill at the peer once in the run's output, by profile, product and side, to the last increment.
    fills = [json.loads(ln) for ln in (out / "fills.jsonl").read_text().splitlines() if ln.strip()]
    assert all(n == 1 for n in Counter(f["fill_id"] for f in fills).values())
    ours: dict[tuple[str, str, str], list[tuple[Decimal, Decimal]]] = defaultdict(list)
    for f in fills:
        key = (f["profile"], f["product"].replace("/", "-"), f["side"])
        ours[key].append((Decimal(str(f["size"])), Decimal(str(f["price"]))))
    theirs: dict[tuple[str, str, str], list[tuple[Decimal, Decimal]]] = defaultdict(list)
    for o in peer.orders:
        for pf in o.fills:
            theirs[(o.profile, o.product.id, o.side)].append((pf.size, pf.price))
    differ = {
        k: (sorted(ours[k]), sorted(theirs[k]))
        for k in set(ours) | set(theirs)
        if sorted(ours[k]) != sorted(theirs[k])
    }
    assert differ == {}, differ
    assert len(fills) == sum(len(o.fills) for o in peer.orders)
    # The books equal the exchange to the last increment.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["mode"] == "live"
    for pid in PROFILES:
        p = summary["profiles"][pid]
        assert p["initial_equity_source"] == "exchange account", p["initial_equity_source"]
        assert Decimal(p["initial_equity"]) == initial[pid]["USDC"]
        cash = (
            Decimal(p["initial_equity"])
            + Decimal(p["sell_proceeds"])
            - Decimal(p["buy_costs"])
            - Decimal(p["fees"])
        )
        assert cash == peer.account_of(pid).balances["USDC"], (
            pid,
            cash,
            peer.account_of(pid).balances["USDC"],
        )
        assert p["open_positions"] == {}, p["open_positions"]
    # The stop's sale during the outage, booked once, as the stop-loss exit of its position.
    booked = [
        f
        for f in fills
        if (f["profile"], f["product"].replace("/", "-"), f["side"])
        == (victim.profile, victim.product.id, "sell")
        and Decimal(str(f["price"])) == crash
    ]
    assert sum((Decimal(str(f["size"])) for f in booked), Decimal(0)) == victim.filled, booked
    # Booked as the strategy's exit of the position: its stop-loss on the crash candle, or an exit it had decided
    # on an earlier step that reached the worker after the restart (the stop had sold by then).
    assert {f["intent_reason"] for f in booked} <= {"stop_loss", "exit_signal", "flatten", "halt"}, booked
    # Every order on the product's increments and minimums.
    for o in peer.orders:
        pr = o.product
        assert on_increment(o.size, pr.base_increment) and o.size >= Decimal(pr.base_min_size), (
            o.client_id,
            o.size,
        )
        for px in (o.limit_price, o.stop_price):
            assert px is None or on_increment(px, pr.quote_increment), (o.client_id, px)
    # Any mismatch between books and account (the outage's sale) was resolved.
    blobs, _ = await topic_bytes(infra.kafka, json.loads((out / "run.json").read_text())["namespace"])
    last: dict[str, str] = {}
    for b in blobs:
        with contextlib.suppress(DecodeError, ValueError):
            m = decode(b)
            if isinstance(m, AccountMismatchDetected):
                last[m.profile] = m.state
    assert all(s == "resolved" for s in last.values()), last
    # No credential anywhere.
    secrets_ = [adv.private_pem, exc.secret_b64, exc.passphrase, store_pass, command_key]
    secrets_ += [ln for ln in adv.private_pem.splitlines() if ln and "-----" not in ln]
    texts = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    texts |= {f"command output {i}": t.encode() for i, t in enumerate(outputs)}
    texts["topics"] = b"\n".join(blobs)
    leaks = sorted({w for w, data in texts.items() for s in secrets_ if s.encode() in data})
    assert leaks == [], f"credentials found in: {leaks}"
    print(
        f"peer orders {len(peer.orders)}, fills {len(fills)}, protective at the peer "
        f"{sum(1 for o in peer.orders if o.protective)}, cancel-only {halted}, prints {sum(printed.values())}"
    )
