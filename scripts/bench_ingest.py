"""Benchmark: the live ingest against the Coinbase market-data peer, on a real Kafka broker.

    .venv/bin/python scripts/bench_ingest.py [--bootstrap HOST:PORT] [--speed 10] [--steps 30] [--outage-s 60]

Two runs of `services.ingest` (in this process) against `tests/peer/coinbase_md_peer.py` on loopback:

- ``lag``: the peer's clock at `--speed` x real time, 1 m candles of three products; after a short history,
  `--steps` live steps. Finalisation lag = bucket end to the publication of its step's watermark, in exchange
  seconds (what the grace and the REST round trip cost) and in real seconds. Baseline in the same run: one REST
  candles round trip to the same peer and the configured grace; the ratio is lag p50 / (grace + round trip).
- ``outage``: the peer at 1 x real time; once the ingest publishes live steps, the peer's websocket and REST go
  down for `--outage-s` real seconds. Reconnect-to-caught-up = from the outage's end until the ingest has
  published every bucket that closed (plus grace) by then, and until the feed is fresh again.

Prints one JSON document (figures, ratios, the machine); the topics it creates are in their own namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpctl import infra  # noqa: E402
from services.ingest.bootstrap import LiveSourceOptions, bootstrap_live  # noqa: E402
from services.ingest.live import LiveIngest  # noqa: E402
from shared.bus import KafkaAccess  # noqa: E402
from shared.config import AppConfig  # noqa: E402
from shared.kafka import ensure_topics  # noqa: E402
from shared.runtime import ServiceSettings  # noqa: E402
from shared.topics import declared_topics  # noqa: E402
from tests.peer.coinbase_md_peer import CoinbaseMdPeer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IV = 60
GRACE = 2.0


def config(path: Path, namespace: str, history: int) -> AppConfig:
    raw: dict[str, Any] = yaml.safe_load((ROOT / "config" / "coinbase_profiles.yaml").read_text())
    first, *others = list(raw["profiles"])
    for pid in others:
        raw["profiles"][pid]["enabled"] = False
    p = raw["profiles"][first]
    p["trading_params"]["trading_pairs"] = ["BTC/USDC", "ETH/USDC"]
    p["strategy_config"]["base_assets"] = ["BTC", "ETH", "USDC"]
    p["strategy_config"]["random_asset_pool"] = ["SOL"]
    raw.setdefault("system", {})["market_data"] = {
        "source": "coinbase",
        "interval": "1m",
        "grace_s": GRACE,
        "history_steps": history,
    }
    raw["system"].setdefault("kafka", {})["namespace"] = namespace
    path.write_text(yaml.safe_dump(raw))
    return AppConfig.model_validate(raw)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


async def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        await asyncio.sleep(0.02)


async def start(
    bootstrap: KafkaAccess, peer: CoinbaseMdPeer, tmp: Path, history: int
) -> tuple[LiveIngest, asyncio.Task[int], asyncio.Event]:
    ns = "benchingest" + uuid.uuid4().hex[:8]
    cfg = config(tmp / f"{ns}.yaml", ns, history)
    await ensure_topics(bootstrap, declared_topics(cfg, ns))
    settings = ServiceSettings(config_path=tmp / f"{ns}.yaml", kafka=bootstrap, namespace=ns)
    svc = bootstrap_live(
        settings, LiveSourceOptions(rest_url=peer.base_url, ws_url=peer.ws_url), overrides={"config": cfg}
    )
    stop = asyncio.Event()
    return svc, asyncio.create_task(svc.run(stop)), stop


async def rest_round_trip(peer: CoinbaseMdPeer, n: int = 50) -> float:
    """Median real seconds of one REST candles request for 10 buckets (the baseline)."""
    now = int(peer.now_s()) // IV * IV
    url = f"{peer.base_url}/api/v3/brokerage/market/products/BTC-USDC/candles"
    params = {"start": str(now - 10 * IV), "end": str(now), "granularity": "ONE_MINUTE"}
    times = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            t0 = time.perf_counter()
            async with http.get(url, params=params) as r:
                await r.read()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def bench_lag(bootstrap: KafkaAccess, tmp: Path, speed: float, steps: int) -> dict[str, Any]:
    history = 10
    async with CoinbaseMdPeer(("BTC-USD", "ETH-USD", "SOL-USD"), speed=speed, granularity_s=IV) as peer:
        rtt = await rest_round_trip(peer)
        svc, task, stop = await start(bootstrap, peer, tmp, history)
        try:
            await wait_for(
                lambda: len(svc.lags) >= history + steps + 1, (steps + 5) * IV / speed + 30, "live steps"
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    live = svc.lags[history + 1 :]  # the first live step may carry the start's own catch-up
    ex = [x for x, _ in live]
    real = [x / speed for x in ex]
    return {
        "speed": speed,
        "steps": len(live),
        "lag_exchange_s": {
            "p50": round(pct(ex, 0.5), 3),
            "p99": round(pct(ex, 0.99), 3),
            "max": round(max(ex), 3),
        },
        "lag_real_s": {"p50": round(pct(real, 0.5), 4), "p99": round(pct(real, 0.99), 4)},
        "baseline": {"grace_s": GRACE, "rest_round_trip_real_s": round(rtt, 5)},
        # Exchange seconds the lag costs beyond what it must (the grace, plus one REST round trip in peer time).
        "ratio_p50_to_grace_plus_rtt": round(pct(ex, 0.5) / (GRACE + rtt * speed), 3),
    }


async def bench_outage(bootstrap: KafkaAccess, tmp: Path, outage_s: float) -> dict[str, Any]:
    async with CoinbaseMdPeer(("BTC-USD", "ETH-USD", "SOL-USD"), speed=1.0, granularity_s=IV) as peer:
        svc, task, stop = await start(bootstrap, peer, tmp, 5)
        try:
            await wait_for(lambda: len(svc.lags) >= 6, IV + 30, "the first live step")
            reconnects = svc.reconnect_count
            peer.outage(outage_s)
            t_out = time.monotonic()
            await asyncio.sleep(outage_s)
            t_end = time.monotonic()
            due = peer.now_s()  # every bucket closed (plus grace) by now must be published

            def caught_up() -> bool:
                return svc.book is not None and svc.book.next_step + IV + GRACE > due

            await wait_for(caught_up, 120, "catch-up")
            t_caught = time.monotonic()
            await wait_for(lambda: svc.monitor.state == "fresh", 120, "fresh")
            t_fresh = time.monotonic()
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    return {
        "outage_s": round(t_end - t_out, 2),
        "reconnect_to_caught_up_s": round(t_caught - t_end, 3),
        "outage_end_to_fresh_s": round(t_fresh - t_end, 3),
        "reconnects": svc.reconnect_count - reconnects,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--bootstrap",
        default=None,
        help="HOST:PORT, reached with the environment's credentials (MPCTL_BUS_DIR as `mpctl infra up` prints it, "
        "or KAFKA_USERNAME...); default: KAFKA_BOOTSTRAP_SERVERS, else the local broker (started if needed)",
    )
    ap.add_argument("--speed", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--outage-s", type=float, default=60.0)
    args = ap.parse_args()
    # The bus authenticates every client: as its admin (MPCTL_BUS_DIR or the local broker's state), not by name.
    if args.bootstrap:
        bootstrap = infra.access_from_env(args.bootstrap, os.environ)
    else:
        bootstrap = (
            await asyncio.to_thread(infra.resolve_endpoints, None, lambda m: print(m, file=sys.stderr))
        ).kafka
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lag = await bench_lag(bootstrap, tmp, args.speed, args.steps)
        outage = await bench_outage(bootstrap, tmp, args.outage_s)
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                },
                "finalisation": lag,
                "outage": outage,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
