"""Never twice with a zombie worker (issue #19 item 1): two live execution workers of one profile in one consumer
group, real processes on a real broker against the Coinbase peer through real ccxt. The one that takes the order
first is stopped with SIGSTOP at a point of its send; the group gives the partition to the other, which sends the
order; the paused one is then resumed.

- Paused after the look-up of the client order id (before its ownership check): the check finds the partition
  gone and nothing is sent, on both APIs: one order at the exchange.
- Paused after the ownership check (the window no check closes): Advanced Trade de-duplicates the client id (one
  order); the Exchange API takes a second order, which the resumed worker finds right after its send: booked
  (OrderFilled.duplicate_of, outside the intent) and reported (DuplicateOrderDetected, alert duplicate_order).

Always: at most one order per client id stays open, and the books (the account at start plus every fill on
orders.events) equal the peer's balances at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from services.execution.live import protective_client_id
from services.execution.reconcile import KnownOrder, order_update
from services.monitor.alerts import alerts_from_message
from services.monitor.health import GroupInfo, describe_groups
from shared.bus import KafkaAccess
from shared.kafka import Publisher, read_topics
from shared.messages import (
    AccountSnapshotted,
    DuplicateOrderDetected,
    Message,
    OrderFilled,
    OrderUpdated,
)
from shared.topics import Topics
from tests.bus import create_namespace, service_env
from tests.integration import test_exchange_adapters as adapters
from tests.integration.test_exchange_adapters import adapter, creds_for, execute, live, of
from tests.integration.test_live_wiring import store_profile_a
from tests.integration.zombie_worker import PID, zombie_config
from tests.peer.coinbase_peer import CoinbasePeer, PeerOrder
from tests.unit.builders import T0, candle

no_secret_in_logs = adapters.no_secret_in_logs
D = Decimal
REPO = Path(__file__).resolve().parents[2]


async def wait_for(what: str, cond: Callable[[], Awaitable[bool]], timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.3)


@contextlib.asynccontextmanager
async def workers(
    n: int, args: list[str], env: dict[str, str], logs: Path
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    procs: list[asyncio.subprocess.Process] = []
    try:
        for i in range(n):
            out = (logs / f"worker{i}.log").open("wb")
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "tests.integration.zombie_worker",
                    *args,
                    cwd=REPO,
                    env=env,
                    stdout=out,
                    stderr=out,
                )
            )
        yield procs
    finally:
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGCONT)
                    p.terminate()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 20)
            except TimeoutError:
                p.kill()
                await p.wait()


async def describe_group(access: KafkaAccess, group: str) -> dict[str, GroupInfo]:
    admin = AIOKafkaAdminClient(**access.client_options(), request_timeout_ms=15_000)
    await admin.start()
    try:
        return await describe_groups(admin, [group])
    finally:
        await admin.close()


def books(start: AccountSnapshotted, events: list[Message]) -> dict[str, Decimal]:
    """The account at start plus every fill of the profile on orders.events (each fill id once)."""
    held = {a: b.total for a, b in start.balances.items()}
    fills = {m.fill_id: m for m in events if isinstance(m, OrderFilled) and m.profile == PID}
    for f in fills.values():
        base, quote = f.product.split("/")
        sign = 1 if f.side == "buy" else -1
        held[base] = held.get(base, D(0)) + sign * f.size
        held[quote] = held.get(quote, D(0)) - sign * f.size * f.price - f.fee
    return held


@pytest.mark.parametrize("stage", ["after_lookup", "after_fence"])
@pytest.mark.parametrize("api", ["coinbase", "coinbaseexchange"])
async def test_a_paused_worker_never_leaves_a_second_order_unbooked(
    peer: CoinbasePeer,
    api: str,
    stage: str,
    kafka_bootstrap: KafkaAccess,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = zombie_config(namespace)
    t = Topics(namespace)
    await create_namespace(kafka_bootstrap, cfg, namespace)
    store_profile_a(peer, api, tmp_path, monkeypatch)
    env = {
        **os.environ,
        "MPCTL_CREDENTIALS_STORE": str(tmp_path / "c.enc"),
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        # The worker connects as profile_a's execution principal (tests/bus.py), as mpctl would start it.
        **service_env(kafka_bootstrap, ["services.execution", "--namespace", namespace, "--profile", PID]),
    }
    markers = tmp_path / "markers"
    markers.mkdir()
    order = execute(PID, f"zombie-{api}-{stage}", price=str(peer.price("BTC-USDC")))
    coid = order.client_order_id

    async def events() -> list[Message]:
        msgs, _ = await read_topics(kafka_bootstrap, [t.events])
        return [m for m in msgs if getattr(m, "profile", None) == PID]

    async def starts() -> list[AccountSnapshotted]:
        return [m for m in await events() if isinstance(m, AccountSnapshotted) and m.trigger == "start"]

    def sent() -> list[PeerOrder]:
        return sorted((o for o in peer.orders_of(PID) if o.client_id == coid), key=lambda o: o.created)

    args = [namespace, kafka_bootstrap.servers, peer.base_url, str(markers), stage]
    async with workers(2, args, env, tmp_path) as procs:

        async def both_started() -> bool:
            assert all(p.returncode is None for p in procs), "a worker exited early"
            return len(await starts()) >= 2

        await wait_for("both workers' start snapshots", both_started)
        group = t.group("execution", PID)

        async def group_settled() -> bool:
            # Both members in and the partitions assigned. An order published during the second join's
            # rebalance can reach the other worker while the first is paused, at once rather than after a
            # session: correct (its ownership check is the one that holds), but not the case set up here.
            info = (await describe_group(kafka_bootstrap, group)).get(group)
            return info is not None and info.state == "Stable" and len(info.members) == 2

        await wait_for("the execution group to settle with both workers", group_settled)
        pub = Publisher(kafka_bootstrap, client_id="test")
        await pub.start()
        try:  # the market's close first (the price band's reference), then the approved order
            await pub.send(t.candles, candle("BTC/USDC", T0, 60000, close=60000), key="BTC/USDC")
            await pub.send(t.approved(PID), order, key=order.product)
            await pub.flush()
        finally:
            await pub.stop()

        async def paused() -> bool:
            return (markers / "paused").exists()

        await wait_for("a worker to pause before its send", paused)
        zombie = int((markers / "paused").read_text().split()[0])
        assert zombie in {p.pid for p in procs}
        assert sent() == []  # paused before anything was sent

        async def other_sent() -> bool:
            return len(sent()) == 1

        # Its session (6 s) runs out, the group gives the partition to the other worker, which sends the order.
        await wait_for("the other worker to send the order", other_sent)
        os.kill(zombie, signal.SIGCONT)

        async def settled() -> bool:
            evs = await events()
            filled = any(
                isinstance(m, OrderUpdated) and m.client_order_id == coid and m.status == "filled"
                for m in evs
            )
            protected = any(o.client_id == protective_client_id(coid) for o in peer.orders_of(PID))
            log = (tmp_path / f"worker{[p.pid for p in procs].index(zombie)}.log").read_text()
            after = log.partition("RESUMED after the pause")[2]
            # The resumed worker's last act on the order: its send refused, or (sent) its protective order
            # refused, found or placed.
            done = "not sent:" in after if stage == "after_lookup" else "protective" in after
            return filled and protected and done

        await wait_for("the order to settle and the resumed worker to finish with it", settled)
        await asyncio.sleep(2.0)  # anything more either worker would do with it
        evs = await events()

    orders = sent()
    # At most one order per client id stays open (the entry's and its protective order's).
    for client_id in (coid, protective_client_id(coid)):
        still_open = [o for o in peer.orders_of(PID) if o.client_id == client_id and o.status == "OPEN"]
        assert len(still_open) <= 1, (client_id, still_open)
    duplicates = [m for m in evs if isinstance(m, DuplicateOrderDetected)]
    dup_fills = [m for m in evs if isinstance(m, OrderFilled) and m.duplicate_of is not None]
    if stage == "after_fence" and api == "coinbaseexchange":
        # The window no check closes: a second order, found right after the send, booked and alerted.
        assert len(orders) == 2, orders
        first, second = orders
        assert second.filled > 0
        assert {d.duplicate for d in duplicates} == {second.order_id}
        assert {d.original for d in duplicates} == {first.order_id}
        assert sum((f.size for f in {f.fill_id: f for f in dup_fills}.values()), D(0)) == second.filled
        assert {f.duplicate_of for f in dup_fills} == {first.order_id}
        alerts = [a for d in duplicates for a in alerts_from_message(d) if a.kind == "duplicate_order"]
        assert alerts and all(first.order_id in a.summary and second.order_id in a.summary for a in alerts)
    else:
        # The ownership check refused the resumed worker's send, or the exchange de-duplicated it.
        assert len(orders) == 1, orders
        assert duplicates == [] and dup_fills == []
    # The intent's own fills are the first order's, once.
    own = {m.fill_id: m for m in evs if isinstance(m, OrderFilled) and m.duplicate_of is None}
    assert sum((f.size for f in own.values()), D(0)) == orders[0].filled
    # The books equal the exchange.
    start = next(m for m in evs if isinstance(m, AccountSnapshotted) and m.trigger == "start")
    have = books(start, evs)
    acct = peer.account_of(PID).balances
    for asset in ("BTC", "USDC"):
        assert have[asset] == acct[asset], (asset, have[asset], acct[asset])


@pytest.mark.parametrize("second_fills", [True, False], ids=["filled", "open"])
async def test_reconciliation_on_start_finds_a_second_order_under_a_known_client_id(
    peer: CoinbasePeer, second_fills: bool, no_secret_in_logs: list[str]
) -> None:
    """Exchange API, a worker restarted after two sends of one client id (the zombie died before it looked): the
    first order is the intent's; the second is cancelled if still open, its fills booked, and reported."""
    port = await adapter(peer, creds_for(peer, "coinbaseexchange", PID, no_secret_in_logs))
    msg = execute(PID, f"restart-{second_fills}", price=str(peer.price("BTC-USDC")))
    try:
        port.lookup_before_send = False  # stands for two workers that both looked before either sent
        first = await port.create_order(
            msg.client_order_id, msg.product, msg.side, msg.size, limit_price=msg.reference_price * D("1.001")
        )
        peer.fill_plan = [D(1)] if second_fills else []
        await asyncio.sleep(0.01)  # created after the first: the exchange's order of creation decides
        second = await port.create_order(
            msg.client_order_id, msg.product, msg.side, msg.size, limit_price=msg.reference_price * D("1.001")
        )
        port.lookup_before_send = True
        restarted = live(PID, port)
        restarted.apply(order_update(KnownOrder.from_execute(msg), "submitted", datetime.now(UTC)))
        events = await restarted.reconcile()
        again = await restarted.reconcile()  # nothing new the second time
    finally:
        await port.close()
    (report,) = of(events, DuplicateOrderDetected)
    assert (report.original, report.duplicate) == (first.exchange_order_id, second.exchange_order_id)
    dup_fills = [f for f in of(events, OrderFilled) if f.duplicate_of is not None]
    own_fills = [f for f in of(events, OrderFilled) if f.duplicate_of is None]
    peer_second = next(o for o in peer.orders if o.order_id == second.exchange_order_id)
    assert sum((f.size for f in own_fills), D(0)) == msg.size  # the intent's order, once
    assert [u.status for u in of(events, OrderUpdated)] == ["filled"]
    if second_fills:
        assert sum((f.size for f in dup_fills), D(0)) == peer_second.filled == msg.size
        assert {f.duplicate_of for f in dup_fills} == {first.exchange_order_id}
        assert not report.cancelled
    else:
        assert dup_fills == [] and report.cancelled and peer_second.status == "CANCELLED"
    assert [o for o in peer.orders if o.client_id == msg.client_order_id and o.status == "OPEN"] == []
    assert again == []
