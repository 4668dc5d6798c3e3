"""The execution worker's Prometheus endpoint (services/execution/metrics.py), scraped over HTTP after a short run
on a real broker: its counts must equal what the worker published on orders.events."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from services.execution.bootstrap import ExecutionOptions, ExecutionService, bootstrap
from services.execution.credentials import (
    ENV_KEY_FILE,
    CredentialStore,
    KeySource,
    StoredCredentials,
    new_key_file,
)
from shared.config import AppConfig
from shared.kafka import Publisher, read_topics
from shared.messages import Message, OrderFilled, OrderUpdated
from shared.runtime import ServiceSettings
from shared.topics import Topics
from tests.bus import create_namespace
from tests.conftest import free_ports
from tests.integration.test_exchange_adapters import app_config, execute
from tests.peer.coinbase_peer import CoinbasePeer
from tests.unit.builders import HOUR, T0, candle, config, execute_order, watermark

PID = "profile_a"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def in_namespace(cfg: AppConfig, namespace: str, **system: object) -> AppConfig:
    """The config the worker runs with: the test's namespace, one candle partition (one watermark suffices)."""
    kafka = cfg.system.kafka.model_copy(update={"candle_partitions": 1, "namespace": namespace})
    return cfg.model_copy(update={"system": cfg.system.model_copy(update={"kafka": kafka, **system})})


async def scrape(port: int) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def run_until(
    svc: ExecutionService, done: Callable[[], Awaitable[bool]], timeout_s: float = 40.0
) -> Samples:
    """Run the worker until `done`, scrape its endpoint while it runs, then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not await done():
            assert not task.done(), "the worker stopped early"
            assert asyncio.get_running_loop().time() < deadline, (
                "the worker did not produce the expected events"
            )
            await asyncio.sleep(0.3)
        assert svc.metrics_bound is not None
        return await scrape(svc.metrics_bound)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)


async def events_of(bootstrap_: str, t: Topics) -> list[Message]:
    msgs, _ = await read_topics(bootstrap_, [t.events])
    return [m for m in msgs if getattr(m, "profile", None) == PID]


async def test_paper_worker_metrics_count_exactly_the_fills_fees_and_statuses_it_published(
    kafka_bootstrap: str, namespace: str
) -> None:
    cfg = in_namespace(config(), namespace)
    t = Topics(namespace)
    await create_namespace(kafka_bootstrap, cfg, namespace)
    (port,) = free_ports(1)
    settings = ServiceSettings(kafka=kafka_bootstrap, namespace=namespace, profile=PID)
    svc = bootstrap(settings, overrides={"config": cfg, "metrics_port": port})
    # Two orders: one fills whole, one is bounded by the thin candle and its rest is cancelled. The profile's
    # part of a candle is 10 % / 2 enabled profiles = 5 % of 40 = 2 for both orders: 0.5, then 1.5 of 3.
    small = execute_order(PID, "buy", size="0.5", not_before=T0, intent_id="metrics-small")
    big = execute_order(PID, "buy", size="3", not_before=T0, intent_id="metrics-big")
    market: list[Message] = [
        candle("BTC/USDC", T0, 100, volume=40),
        watermark(T0),
        candle("BTC/USDC", T0 + HOUR, 101, volume=40),
        watermark(T0 + HOUR),
    ]
    pub = Publisher(kafka_bootstrap, client_id="test")
    await pub.start()
    try:
        for m in market:
            await pub.send(t.candles, m, key="BTC/USDC")
        for o in (small, big):
            await pub.send(t.approved(PID), o, key=o.product)
        await pub.flush()
    finally:
        await pub.stop()

    async def settled() -> bool:
        return (
            sum(
                isinstance(m, OrderUpdated) and m.status in ("filled", "cancelled")
                for m in await events_of(kafka_bootstrap, t)
            )
            == 2
        )

    samples = await run_until(svc, settled)
    events = await events_of(kafka_bootstrap, t)
    fills = [m for m in events if isinstance(m, OrderFilled)]
    statuses = Counter(m.status for m in events if isinstance(m, OrderUpdated))
    assert len(fills) == 2 and statuses["partially_filled"] == 1 and statuses["cancelled"] == 1

    assert total(samples, "mp_execution_fills_total", profile=PID) == len(fills)
    assert total(samples, "mp_execution_fills_total", liquidity="taker") == len(fills)
    assert total(samples, "mp_execution_fees_total", profile=PID) == pytest.approx(
        float(sum(f.fee for f in fills))
    )
    for status, n in statuses.items():
        assert total(samples, "mp_execution_orders_total", status=status) == n, status
    assert total(samples, "mp_execution_events_processed_total", topic=t.candles) == len(market)
    assert total(samples, "mp_execution_events_processed_total", topic=t.approved(PID)) == 2
    # Each order acknowledged once, from its publication: a positive time, far below the run's length.
    assert total(samples, "mp_execution_order_latency_seconds_count", exchange="paper") == 2
    assert 0 < total(samples, "mp_execution_order_latency_seconds_sum") < 40
    assert total(samples, "mp_execution_errors_total") == 0


async def test_live_worker_metrics_count_retries_latency_and_fills_against_the_peer(
    peer: CoinbasePeer, kafka_bootstrap: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = app_config(order_timeout=30.0)
    # The test publishes the candles itself (a replay, event time): live orders go to the loopback peer.
    replay = base.system.market_data.model_copy(update={"source": "replay"})
    cfg = in_namespace(base, namespace, mode="live", market_data=replay)
    t = Topics(namespace)
    await create_namespace(kafka_bootstrap, cfg, namespace)
    a = peer.add_advanced_profile(PID)
    kf = tmp_path / "key"
    new_key_file(kf)
    store = CredentialStore.create(tmp_path / "c.enc", KeySource.from_key_file(kf))
    store.put(PID, StoredCredentials(SecretStr(a.key_name), SecretStr(a.private_pem)))
    store.save()
    monkeypatch.setenv(ENV_KEY_FILE, str(kf))
    monkeypatch.setenv("MPCTL_CREDENTIALS_STORE", str(tmp_path / "c.enc"))
    peer.inject(
        "POST", r"/api/v3/brokerage/orders$", 500, {"error": "INTERNAL", "message": "try again"}, times=1
    )

    (port,) = free_ports(1)
    settings = ServiceSettings(kafka=kafka_bootstrap, namespace=namespace, profile=PID)
    svc = bootstrap(
        settings,
        ExecutionOptions(exchange_api_base=peer.base_url),
        overrides={"config": cfg, "metrics_port": port},
    )
    orders = [execute(PID, f"metrics-{i}") for i in range(2)]

    async def publish_then_wait() -> bool:
        return (
            sum(
                isinstance(m, OrderUpdated) and m.status == "filled"
                for m in await events_of(kafka_bootstrap, t)
            )
            == 2
        )

    async def publish() -> None:
        await asyncio.sleep(1.0)  # after the worker's start (its start time bounds what the latency measures)
        pub = Publisher(kafka_bootstrap, client_id="test")
        await pub.start()
        try:
            # The market's close first, as the ingest publishes it: the worker's price band needs it.
            await pub.send(t.candles, candle("BTC/USDC", T0, 60000, close=60000), key="BTC/USDC")
            for o in orders:
                await pub.send(t.approved(PID), o, key=o.product)
            await pub.flush()
        finally:
            await pub.stop()

    sender = asyncio.create_task(publish())
    samples = await run_until(svc, publish_then_wait, timeout_s=60)
    await sender
    events = await events_of(kafka_bootstrap, t)
    fills = [m for m in events if isinstance(m, OrderFilled)]
    # The two orders sent (the protective stops their fills left resting at the peer are not among them).
    sent = [o for o in peer.orders_of(PID) if not o.protective]
    assert len(sent) == 2 and len(fills) == sum(len(o.fills) for o in sent)
    assert total(samples, "mp_execution_fills_total", profile=PID) == len(fills)
    assert total(samples, "mp_execution_fees_total") == pytest.approx(float(sum(f.fee for f in fills)))
    assert total(samples, "mp_execution_errors_total", outcome="retry") == 1  # the injected 500, retried once
    assert total(samples, "mp_execution_errors_total", outcome="halt") == 0
    assert total(samples, "mp_execution_order_latency_seconds_count", exchange="coinbase") == 2
    assert total(samples, "mp_execution_orders_total", status="filled") == 2
