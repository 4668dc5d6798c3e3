"""The backtest is the demo without Kafka: on one slice, `mpctl demo` (every service in its own process over
real Kafka and Redis) and `mpctl backtest` (the same cores in one process) write the same files, byte for
byte. And the backtest's in-memory claims answer every claim as the Redis script does."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from mpctl.backtest import MemoryRegistry
from mpctl.infra import Endpoints
from services.registry.claims import RedisClaims
from tests.e2e.test_demo import check_invariants, jsonl, run_demo

ROOT = Path(__file__).resolve().parents[2]
FILES = ("orders.jsonl", "fills.jsonl", "decisions.jsonl", "plans.jsonl", "summary.json")


def run_backtest(out: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "mpctl.backtest", "--out", str(out), *args],
        cwd=ROOT,
        env=dict(os.environ, CI="true"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"backtest failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("config", "hours"),
    [("config/examples/three_profiles.yaml", "200"), ("config/examples/shared_hash.yaml", "96")],
    ids=["three-profiles-200h", "shared-hash-96h"],
)
def test_backtest_writes_the_demos_files(infra: Endpoints, tmp_path: Path, config: str, hours: str) -> None:
    demo, bt = tmp_path / "demo", tmp_path / "backtest"
    summary = run_demo(infra, demo, "--config", config, "--hours", hours)
    check_invariants(demo, summary, config=config)
    run_backtest(bt, "--config", config, "--hours", hours)
    assert summary["counters"]["plans"] > 0
    if "three" in config:
        assert summary["counters"]["intents"] > 0 and (demo / "fills.jsonl").read_text().strip()
    for name in FILES:
        assert (bt / name).read_bytes() == (demo / name).read_bytes(), f"{name} differs"


@pytest.mark.timeout(900)
def test_backtest_writes_the_demos_files_with_rejections_and_delays(infra: Endpoints, tmp_path: Path) -> None:
    # An hour's conflict window: profiles a and c (same products) meet on opposite sides and one is rejected;
    # orders of different profiles on one product are spaced (delayed). Low entry thresholds and a 5 % stop,
    # so that exits by signal (which the wash rule arbitrates, unlike protective exits) meet others' entries.
    data = yaml.safe_load((ROOT / "config" / "examples" / "three_profiles.yaml").read_text())
    data.setdefault("system", {}).setdefault("arbiter", {})["conflict_window_s"] = 3600
    for p in data["profiles"].values():
        p["risk_management"].update(stop_loss_pct=5.0, take_profit_pct=10.0)
        p["strategy_config"].update(signal_strength_threshold=0.05, confidence_threshold=0.05)
    config = tmp_path / "three_wide.yaml"
    config.write_text(yaml.safe_dump(data))
    demo, bt = tmp_path / "demo", tmp_path / "backtest"
    summary = run_demo(infra, demo, "--config", str(config), "--hours", "200")
    check_invariants(demo, summary, config=config)
    run_backtest(bt, "--config", str(config), "--hours", "200")
    verdicts = {(d["verdict"], d["rule"]) for d in jsonl(demo / "decisions.jsonl")}
    assert ("rejected", "opposite_side") in verdicts, verdicts
    assert summary["counters"]["intents"] > 0
    for name in FILES:
        assert (bt / name).read_bytes() == (demo / name).read_bytes(), f"{name} differs"


@pytest.mark.timeout(120)
async def test_memory_claims_answer_as_the_redis_script(redis_url: str, redis_admin: dict[str, Any]) -> None:
    # Claims in any time order (a replica lagging behind, a restart), with pruning: same outcome and holder.
    rnd = random.Random(11)
    client = aioredis.Redis.from_url(redis_url, **redis_admin)
    ns = f"t{uuid.uuid4().hex[:8]}"
    redis_claims = RedisClaims(client, ns, grace_s=600)
    memory = MemoryRegistry(grace_s=600)
    try:
        for _ in range(1500):
            profile = rnd.choice(["a", "b", "c", "d"])
            start = rnd.randrange(0, 60) * 900
            end = start + rnd.choice((900, 1800, 3600, 14400))
            h, f = f"{rnd.randrange(5):064x}", f"{rnd.randrange(5):064x}"
            asset = rnd.choice([None, "ADA", "DOT", "LINK"])
            want = await redis_claims.claim_interval(
                profile, start, end, hash_hex=h, fingerprint=f, asset=asset
            )
            got = memory.claim_interval(profile, start, end, h, f, asset)
            assert got == want, (profile, start, end, h[-1], f[-1], asset)
    finally:
        keys = [k async for k in client.scan_iter(match=f"{ns}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.mark.timeout(900)
def test_orders_working_across_candles_keep_the_paper_rules_over_kafka(
    infra: Endpoints, tmp_path: Path
) -> None:
    # Issue #14 on the real pipeline: an order_timeout of two hours on hourly candles and a tiny volume share,
    # so orders fill part by part over several candles while the strategies go on; two profiles on the same
    # products with tight stops, take-profits and loss limits. The Kafka run writes the backtest's files, and
    # both pass the audit (fills in their candle, protective exits within it, no look-ahead, no wash trade
    # while an order works, shared liquidity, halts, reasons).
    config = "tests/fixtures/audit/config.yaml"
    demo, bt = tmp_path / "demo", tmp_path / "backtest"
    summary = run_demo(infra, demo, "--config", config, "--hours", "120")
    check_invariants(demo, summary, config=config)
    run_backtest(bt, "--config", config, "--hours", "120")
    updates = jsonl(demo / "orders.jsonl")
    assert any(u["status"] == "partially_filled" for u in updates), "no order filled over several candles"
    assert sum(summary["counters"]["exits_by_reason"].values()) > 0, summary["counters"]
    for name in FILES:
        assert (bt / name).read_bytes() == (demo / name).read_bytes(), f"{name} differs"
