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
import yaml

from mpctl.audit import audit_run
from mpctl.infra import Endpoints
from mpctl.invariants import pool_allows, random_asset_pools
from shared.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def audit_files(out: Path, config: str | Path, data: Path | None = None) -> None:
    """`mpctl audit` on a run's files: every rule holds (the report lists what broke)."""
    report = audit_run(out, data or ROOT / "data" / "market", load_config(ROOT / config))
    assert report.ok, report.text()


DATA = ROOT / "data" / "market"


def run_demo(endpoints: Endpoints, out: Path, *args: str, timeout: float = 600) -> dict[str, Any]:
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=endpoints.kafka.servers,
        REDIS_URL=endpoints.redis_url,
        CI="true",
    )
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


def check_invariants(
    out: Path, summary: dict[str, Any], *, config: str | Path | None = None, data: Path | None = None
) -> None:
    """DESIGN.md's invariants on a run's files; with `config`, also `mpctl audit` (issue #14's rules: fills in
    their candle, protective exits within it, no look-ahead, no wash trade while an order works, shared
    liquidity, halts, reasons) against the candle files in `data` (default: the bundled ones)."""
    if config is not None:
        audit_files(out, config, data)
    plans = jsonl(out / "plans.jsonl")
    orders = jsonl(out / "orders.jsonl")
    fills = jsonl(out / "fills.jsonl")
    decisions = jsonl(out / "decisions.jsonl")
    window = timedelta(seconds=summary["settings"]["conflict_window_s"])

    # Invariant 1: no two profiles hold the same fingerprint (or hash) over overlapping epochs.
    # Invariant 2: their random assets differ too, while the pool has at least as many assets as profiles
    # (scripts/bench_scale.py's 100 profiles over a pool of 8 share by design).
    shared = []
    for a, b in itertools.combinations(plans, 2):
        if a["profile"] == b["profile"]:
            continue
        overlap = ts(a["epoch_start"]) < ts(b["epoch_end"]) and ts(b["epoch_start"]) < ts(a["epoch_end"])
        if not overlap:
            continue
        assert a["fingerprint"] != b["fingerprint"], f"fingerprint held twice: {a} / {b}"
        assert a["hash"] != b["hash"], f"hash held twice: {a} / {b}"
        if a["random_asset"] and a["random_asset"] == b["random_asset"]:
            shared.append((a, b))
    if pool_allows(plans, random_asset_pools(out, summary["settings"].get("quote_asset"))):
        assert not shared, f"random asset shared while the pool has an asset for every profile: {shared[:3]}"
    per_profile_epochs = Counter((p["profile"], p["epoch"]) for p in plans)
    assert all(n == 1 for n in per_profile_epochs.values()), "a profile got two plans for one epoch"

    # Invariant 3: no two profiles with opposite-side orders on one product within the conflict window.
    # Internal legs (netted between two profiles' balances) never reach the exchange: not orders there.
    sent = [o for o in orders if o["status"] == "submitted"]
    exchange = [o for o in sent if not o.get("internal")]
    by_product: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for o in exchange:
        by_product[o["product"]].append(o)
    min_gap = timedelta(milliseconds=summary["settings"]["min_cross_profile_gap_ms"])
    for product, os_ in by_product.items():
        for a, b in itertools.combinations(os_, 2):
            if a["profile"] != b["profile"]:
                gap = abs(ts(a["event_time"]) - ts(b["event_time"]))
                # De-synced execution: different profiles' orders on a product keep the minimum gap.
                assert gap >= min_gap, f"orders on {product} {gap} apart (< {min_gap}): {a} / {b}"
                protective = {a.get("intent_reason"), b.get("intent_reason")} & {"stop_loss", "take_profit"}
                if a["side"] != b["side"] and not protective:  # a protective exit is a trigger order
                    assert gap >= window, f"opposite-side orders on {product} {gap} apart: {a} / {b}"
    d = summary["desync"]
    assert d["below_min"] == 0 and d["opposite_side_pairs_within_window"] == 0, d

    # Invariant 4: no order sent twice; one client order id per intent and at most one full fill per order.
    coids = Counter(o["client_order_id"] for o in sent)
    assert all(n == 1 for n in coids.values()), f"order submitted twice: {coids.most_common(3)}"
    intent_to_coid: dict[str, set[str]] = defaultdict(set)
    for o in orders:
        intent_to_coid[o["intent_id"]].add(o["client_order_id"])
    assert all(len(v) == 1 for v in intent_to_coid.values())
    fill_ids = Counter(f["fill_id"] for f in fills)
    assert all(n == 1 for n in fill_ids.values())
    approved = {d["intent_id"] for d in decisions if d["verdict"] in ("approved", "delayed")}
    assert {o["intent_id"] for o in sent} <= approved, "an order reached the exchange without approval"
    for d_ in decisions:  # every decision says which rule decided and with what numbers
        assert d_["rule"] and d_["reason"] and isinstance(d_["details"], dict)
        if d_["verdict"] == "delayed":
            assert d_["not_before"] and d_["details"]["crowding"]["pushed_ms"] > 0
        if d_["rule"] == "opposite_side":
            assert d_["conflicting_profile"] and d_["conflicting_profile"] != d_["profile"]
    # Internal legs pair up: per product and step, what one profile bought internally another sold.
    legs: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for f in fills:
        if f["internal"]:
            legs[(f["product"], f["event_time"])] += Decimal(f["size"]) * (1 if f["side"] == "buy" else -1)
    assert all(v == 0 for v in legs.values()), legs

    # Output fields the issue names.
    for o in orders:
        assert set(o) >= {
            "profile",
            "product",
            "side",
            "size",
            "price",
            "fee",
            "status",
            "client_order_id",
            "intent_id",
            "event_time",
        }
        assert o["side"] in ("buy", "sell")
        assert o["status"] in ("submitted", "open", "partially_filled", "filled", "cancelled", "rejected")
    for p in plans:
        assert set(p) >= {
            "epoch",
            "profile",
            "hash",
            "nonce",
            "strategy",
            "parameters",
            "assets",
            "fingerprint",
        }

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
        assert abs(Decimal(prof["final_equity"]) - expected) < Decimal("0.0000001"), (
            pid,
            prof["final_equity"],
            expected,
        )
        assert prof["trades"] == sum(1 for f in fills if f["profile"] == pid)
        for key in ("strategy", "wins", "win_rate", "realized_pnl", "fees", "max_drawdown_pct"):
            assert key in prof
    c = summary["counters"]
    assert c["intents"] == c["approved"] + c["rejected"] + c["delayed"]
    assert c["approved"] + c["delayed"] == len(approved)
    assert c["rejected"] == sum(c["rejected_by_rule"].values())
    crosses = jsonl(out / "internal_crosses.jsonl")
    assert c["internal_cross_opportunities"] == len(crosses)
    total = sum((Decimal(x["saving"]) for x in crosses), Decimal(0))
    assert Decimal(c["internal_cross_savings"]["total"]) == total
    rejected = {d["intent_id"] for d in decisions if d["verdict"] == "rejected"}
    for x in crosses:  # each opportunity answers an opposite-side rejection (report mode) or a netting
        assert x["executed"] or {x["buy_intent_id"], x["sell_intent_id"]} & rejected


@pytest.mark.timeout(900)
def test_demo_on_bundled_data_trades_and_keeps_invariants(infra: Endpoints, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = run_demo(infra, out, "--hours", "240")
    check_invariants(out, summary, config=ROOT / "config" / "coinbase_profiles.yaml")
    assert set(summary["profiles"]) == {"profile_a", "profile_b"}
    assert summary["counters"]["intents"] > 0, "ten days of real candles produced no intent at all"
    assert sum(p["trades"] for p in summary["profiles"].values()) > 0
    assert summary["settings"]["conflict_window_s"] == 300.0
    assert "profile_a" in summary["_stdout"] and "final_equity" in summary["_stdout"]
    plans = jsonl(out / "plans.jsonl")
    assert len({p["epoch"] for p in plans if p["profile"] == "profile_a"}) == 240  # hourly rotation
    assert len({p["epoch"] for p in plans if p["profile"] == "profile_b"}) == 60  # 4-hourly rotation


@pytest.mark.timeout(600)
def test_demo_leaves_nothing_in_the_working_directory_nor_in_the_temporary_one(
    infra: Endpoints, tmp_path: Path
) -> None:
    """Issue #19, item 7: no service leaves a file behind, in the working directory or the temporary one (the
    strategy workers, on faust until issue 16, once left one "<namespace>.strategy.<profile>-data" folder each)."""
    cwd, tmp, out = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "out"
    cwd.mkdir()
    tmp.mkdir()
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=infra.kafka.servers,
        REDIS_URL=infra.redis_url,
        CI="true",
        PYTHONPATH=str(ROOT),
        TMPDIR=str(tmp),  # the run's own temporary folder, to see what is left in it
    )
    proc = subprocess.run(
        [
            sys.executable, "-m", "mpctl.cli", "demo", "--out", str(out), "--hours", "24",
            "--config", str(ROOT / "config" / "coinbase_profiles.yaml"), "--data", str(DATA),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert (out / "summary.json").exists()
    assert sorted(p.name for p in cwd.iterdir()) == []
    assert sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")) == []


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


def _three_profiles(tmp: Path, *, signal_exits: bool = False, **arbiter: Any) -> Path:
    """config/examples/three_profiles.yaml (the default two profiles plus profile_c on profile_a's products),
    with some arbiter settings. `signal_exits`: low entry thresholds and a 5 % stop, so that exits by signal
    (which the wash rule arbitrates, unlike protective exits) meet other profiles' entries."""
    data = yaml.safe_load((ROOT / "config" / "examples" / "three_profiles.yaml").read_text())
    if arbiter:
        data["system"] = {"arbiter": arbiter}
    if signal_exits:
        for p in data["profiles"].values():
            p["risk_management"].update(stop_loss_pct=5.0, take_profit_pct=10.0)
            p["strategy_config"].update(signal_strength_threshold=0.05, confidence_threshold=0.05)
    path = tmp / "three.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _figures(summary: dict[str, Any]) -> str:
    c, d = summary["counters"], summary["desync"]
    return (
        f"intents {c['intents']} approved {c['approved']} delayed {c['delayed']} rejected_by_rule "
        f"{c['rejected_by_rule']} internal-cross {c['internal_cross_opportunities']} saving "
        f"{c['internal_cross_savings']} gaps {d['gaps']} within-window {d['gaps_within_window']} "
        f"below_min {d['below_min']} opposite pairs {d['opposite_side_pairs_within_window']}"
    )


@pytest.mark.timeout(900)
def test_three_profiles_on_the_bundled_data_keep_apart_and_report_internal_crosses(
    infra: Endpoints, tmp_path: Path
) -> None:
    """The issue's scenario: zero opposite-side pairs inside the window, zero gaps below the minimum, the
    internal-cross report present (with the default 300 s window, opposite intents can only meet inside one
    hourly step, which the bundled data never gives)."""
    out = tmp_path / "three"
    summary = run_demo(infra, out, "--config", str(_three_profiles(tmp_path)))
    check_invariants(out, summary)
    print(_figures(summary))
    assert set(summary["profiles"]) == {"profile_a", "profile_b", "profile_c"}
    d, c = summary["desync"], summary["counters"]
    assert d["opposite_side_pairs_within_window"] == 0 and d["below_min"] == 0
    assert d["gaps"]["min_ms"] >= summary["settings"]["min_cross_profile_gap_ms"]
    assert c["delayed"] > 0, "profiles a and c share products: some orders must have been spaced"
    assert set(c["internal_cross_savings"]) == {"fees", "slippage", "total"}
    assert (
        "internal-cross opportunities" in summary["_stdout"]
        and "cross-profile order gaps" in summary["_stdout"]
    )


@pytest.mark.timeout(900)
def test_three_profiles_with_an_hour_window_block_washes_and_price_the_internal_crosses(
    infra: Endpoints, tmp_path: Path
) -> None:
    """With conflict_window_s = 1 h, an order of the previous step is a recent fill: opposite intents of
    profiles a and c (same products) meet, are rejected, and each is priced as an internal cross."""
    out = tmp_path / "three_wide"
    config = _three_profiles(tmp_path, signal_exits=True, conflict_window_s=3600)
    summary = run_demo(infra, out, "--config", str(config), "--hours", "240")
    check_invariants(out, summary, config=config)
    print(_figures(summary))
    c = summary["counters"]
    assert c["rejected_by_rule"].get("opposite_side", 0) >= 1
    assert c["internal_cross_opportunities"] >= 1
    assert Decimal(c["internal_cross_savings"]["total"]) > 0
    assert summary["desync"]["opposite_side_pairs_within_window"] == 0
