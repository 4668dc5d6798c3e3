"""The main job end to end: `mpctl demo` over real Kafka and Redis, every service in its own process, then
DESIGN.md invariants 1 to 4 and the books checked from the output files alone."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from mpctl.infra import Endpoints

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "market"


def run_demo(endpoints: Endpoints, out: Path, *args: str, timeout: float = 600) -> dict[str, Any]:
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=endpoints.kafka_bootstrap, REDIS_URL=endpoints.redis_url, CI="true")
    proc = subprocess.run(
        [sys.executable, "-m", "mpctl.cli", "demo", "--out", str(out), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["_stdout"] = proc.stdout
    return summary


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def check_invariants(out: Path, summary: dict[str, Any]) -> None:
    plans = jsonl(out / "plans.jsonl")
    orders = jsonl(out / "orders.jsonl")
    fills = jsonl(out / "fills.jsonl")
    decisions = jsonl(out / "decisions.jsonl")
    window = timedelta(seconds=summary["settings"]["conflict_window_s"])

    # Invariant 1: no two profiles hold the same fingerprint (or hash) over overlapping epochs.
    # Invariant 2: their random assets differ too (the pools here are larger than the number of profiles).
    for a, b in itertools.combinations(plans, 2):
        if a["profile"] == b["profile"]:
            continue
        overlap = ts(a["epoch_start"]) < ts(b["epoch_end"]) and ts(b["epoch_start"]) < ts(a["epoch_end"])
        if not overlap:
            continue
        assert a["fingerprint"] != b["fingerprint"], f"fingerprint held twice: {a} / {b}"
        assert a["hash"] != b["hash"], f"hash held twice: {a} / {b}"
        if a["random_asset"] and b["random_asset"]:
            assert a["random_asset"] != b["random_asset"], f"random asset shared: {a} / {b}"
    per_profile_epochs = Counter((p["profile"], p["epoch"]) for p in plans)
    assert all(n == 1 for n in per_profile_epochs.values()), "a profile got two plans for one epoch"

    # Invariant 3: no two profiles with opposite-side orders on one product within the conflict window.
    sent = [o for o in orders if o["status"] == "submitted"]
    by_product: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in sent:
        by_product[o["product"]].append(o)
    for product, os_ in by_product.items():
        for a, b in itertools.combinations(os_, 2):
            if a["profile"] != b["profile"] and a["side"] != b["side"]:
                gap = abs(ts(a["event_time"]) - ts(b["event_time"]))
                assert gap >= window, f"opposite-side orders on {product} {gap} apart: {a} / {b}"

    # Invariant 4: no order sent twice; one client order id per intent and at most one full fill per order.
    coids = Counter(o["client_order_id"] for o in sent)
    assert all(n == 1 for n in coids.values()), f"order submitted twice: {coids.most_common(3)}"
    intent_to_coid: dict[str, set[str]] = defaultdict(set)
    for o in orders:
        intent_to_coid[o["intent_id"]].add(o["client_order_id"])
    assert all(len(v) == 1 for v in intent_to_coid.values())
    fill_ids = Counter(f["fill_id"] for f in fills)
    assert all(n == 1 for n in fill_ids.values())
    approved = {d["intent_id"] for d in decisions if d["verdict"] == "approved"}
    assert {o["intent_id"] for o in sent} <= approved, "an order reached the exchange without approval"

    # Output fields the issue names.
    for o in orders:
        assert set(o) >= {"profile", "product", "side", "size", "price", "fee", "status", "client_order_id",
                          "intent_id", "event_time"}
        assert o["side"] in ("buy", "sell")
        assert o["status"] in ("submitted", "open", "partially_filled", "filled", "cancelled", "rejected")
    for p in plans:
        assert set(p) >= {"epoch", "profile", "hash", "nonce", "strategy", "parameters", "assets", "fingerprint"}

    # The books balance, recomputed here from fills.jsonl alone.
    for pid, prof in summary["profiles"].items():
        initial = Decimal(prof["initial_equity"])
        buys = sells = fees = Decimal(0)
        pos: dict[str, Decimal] = defaultdict(Decimal)
        for f in (f for f in fills if f["profile"] == pid):
            n = Decimal(f["size"]) * Decimal(f["price"])
            fees += Decimal(f["fee"])
            if f["side"] == "buy":
                buys += n
                pos[f["product"]] += Decimal(f["size"])
            else:
                sells += n
                pos[f["product"]] -= Decimal(f["size"])
        open_pos = {k: v for k, v in pos.items() if v}
        assert {k: Decimal(v) for k, v in prof["open_positions"].items()} == open_pos
        marked = sum((v * Decimal(prof["mark_prices"][k]) for k, v in open_pos.items()), Decimal(0))
        expected = initial + sells - buys - fees + marked
        assert abs(Decimal(prof["final_equity"]) - expected) < Decimal("0.0000001"), (pid, prof["final_equity"], expected)
        assert prof["trades"] == sum(1 for f in fills if f["profile"] == pid)
        for key in ("strategy", "wins", "win_rate", "realized_pnl", "fees", "max_drawdown_pct"):
            assert key in prof
    c = summary["counters"]
    assert c["intents"] == c["approved"] + c["rejected"]
    assert c["approved"] == len(approved)


@pytest.mark.timeout(900)
def test_demo_on_bundled_data_trades_and_keeps_invariants(infra: Endpoints, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = run_demo(infra, out, "--hours", "240")
    check_invariants(out, summary)
    assert set(summary["profiles"]) == {"profile_a", "profile_b"}
    assert summary["counters"]["intents"] > 0, "ten days of real candles produced no intent at all"
    assert sum(p["trades"] for p in summary["profiles"].values()) > 0
    assert summary["settings"]["conflict_window_s"] == 300.0
    assert "profile_a" in summary["_stdout"] and "final_equity" in summary["_stdout"]
    plans = jsonl(out / "plans.jsonl")
    assert len({p["epoch"] for p in plans if p["profile"] == "profile_a"}) == 240  # hourly rotation
    assert len({p["epoch"] for p in plans if p["profile"] == "profile_b"}) == 60  # 4-hourly rotation


@pytest.mark.timeout(900)
def test_demo_resolves_collision_when_profiles_share_hash_settings(infra: Endpoints, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    summary = run_demo(infra, out, "--config", "config/examples/shared_hash.yaml", "--hours", "96")
    check_invariants(out, summary)
    assert summary["counters"]["collisions_resolved"] > 0
    plans = jsonl(out / "plans.jsonl")
    assert any(p["nonce"] > 0 for p in plans)


def _aggregate(src: Path, dst: Path, hours: int) -> None:
    """Real hourly candles of the bundled data, aggregated into `hours`-hour candles (another interval)."""
    rows = [line.split(",") for line in gzip.decompress(src.read_bytes()).decode().splitlines()[1:]]
    period = hours * 3600 * 1000
    out = ["timestamp_ms,open,high,low,close,volume"]
    groups: dict[int, list[list[str]]] = defaultdict(list)
    for r in rows:
        groups[int(r[0]) // period * period].append(r)
    for t in sorted(groups):
        g = groups[t]
        out.append(
            f"{t},{g[0][1]},{max(Decimal(x[2]) for x in g)},{min(Decimal(x[3]) for x in g)},{g[-1][4]},"
            f"{sum(Decimal(x[5]) for x in g)}"
        )
    dst.write_bytes(gzip.compress(("\n".join(out) + "\n").encode()))


@pytest.mark.timeout(900)
def test_demo_runs_on_four_hour_candles(infra: Endpoints, tmp_path: Path) -> None:
    data = tmp_path / "data4h"
    data.mkdir()
    for src in sorted(DATA.glob("binance_*_1h.csv.gz")):
        _aggregate(src, data / src.name.replace("_1h.", "_4h."), 4)
    out = tmp_path / "demo4h"
    summary = run_demo(infra, out, "--data", str(data))
    check_invariants(out, summary)
    assert summary["span"]["steps"] == 366  # 61 days of 4-hour candles
    plans = jsonl(out / "plans.jsonl")
    # profile_a rotates hourly: with 4-hour candles it gets one plan per candle (the epoch of each step).
    assert len([p for p in plans if p["profile"] == "profile_a"]) == 366
