"""A small, consistent run directory written by hand (the files `mpctl demo --out` writes), for report and
invariant tests that need no broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

T0 = datetime(2021, 8, 1, tzinfo=UTC)
EXIT_REASONS = ("exit_signal", "stop_loss", "take_profit", "flatten", "halt", "manual")
FP = {"profile_a": "a" * 64, "profile_b": "b" * 64}


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def fill(
    pid: str,
    product: str,
    side: str,
    size: str,
    price: str,
    fee: str,
    hour: int,
    n: int,
    reason: str = "entry",
) -> dict[str, Any]:
    return {
        "profile": pid,
        "product": product,
        "side": side,
        "size": size,
        "price": price,
        "fee": fee,
        "fill_id": f"f-{pid}-{n}",
        "client_order_id": f"c-{pid}-{n}",
        "intent_id": f"i-{pid}-{n}",
        "event_time": iso(T0 + timedelta(hours=hour)),
        "internal": False,
        "intent_reason": reason,
    }


def build_run(out: Path, *, hours: int = 48) -> dict[str, Any]:
    """Two profiles, a few round trips each, one rejected intent; the books balance."""
    out.mkdir(parents=True, exist_ok=True)
    fills = [
        fill("profile_a", "BTC/USDC", "buy", "0.01", "40000", "2.4", 5, 1),
        fill("profile_a", "BTC/USDC", "sell", "0.01", "41000", "2.46", 12, 2, "take_profit"),
        fill("profile_a", "ETH/USDC", "buy", "0.2", "2500", "3", 20, 3),
        fill("profile_b", "SOL/USDC", "buy", "10", "30", "1.8", 6, 1),
        fill("profile_b", "SOL/USDC", "sell", "10", "29", "1.74", 18, 2, "exit_signal"),
    ]
    orders = []
    for f in fills:
        for status in ("submitted", "filled"):
            orders.append(
                {
                    **{
                        k: f[k]
                        for k in (
                            "profile",
                            "product",
                            "side",
                            "size",
                            "client_order_id",
                            "intent_id",
                            "event_time",
                            "intent_reason",
                        )
                    },
                    "price": f["price"] if status == "filled" else None,
                    "fee": f["fee"] if status == "filled" else "0",
                    "status": status,
                    "reason": "",
                    "internal": False,
                }
            )
    decisions = [
        {
            "intent_id": f["intent_id"],
            "profile": f["profile"],
            "product": f["product"],
            "side": f["side"],
            "size": f["size"],
            "verdict": "approved",
            "rule": "approved",
            "reason": "no conflict",
            "conflicting_profile": None,
            "event_time": f["event_time"],
        }
        for f in fills
    ]
    decisions.append(
        {
            "intent_id": "i-profile_b-x",
            "profile": "profile_b",
            "product": "BTC/USDC",
            "side": "buy",
            "size": "0.01",
            "verdict": "rejected",
            "rule": "opposite_side",
            "reason": "profile_b buy BTC/USDC conflicts with <profile_a> sell",
            "conflicting_profile": "profile_a",
            "event_time": iso(T0 + timedelta(hours=12)),
        }
    )
    plans = []
    for pid, period, strategies in (("profile_a", 1, ["alpha", "beta"]), ("profile_b", 4, ["gamma", "beta"])):
        for i in range(hours // period):
            start = T0 + timedelta(hours=i * period)
            plans.append(
                {
                    "epoch": i,
                    "profile": pid,
                    "epoch_start": iso(start),
                    "epoch_end": iso(start + timedelta(hours=period)),
                    "hash": f"{pid[-1]}{i:063x}",
                    "nonce": 0,
                    "strategy": strategies[i % 2],
                    "parameters": {"w": 0.5},
                    "assets": ["BTC", "ETH"],
                    "random_asset": "ADA" if pid == "profile_a" else "DOT",
                    "fingerprint": f"{pid[-1]}{i:063x}",
                    "collisions": 1 if i == 3 else 0,
                }
            )
    # Equity curves from the fills with fixed marks: a moves with BTC/ETH, b with SOL.
    curves: dict[str, list[list[Any]]] = {"profile_a": [], "profile_b": []}
    for h in range(1, hours + 1):
        t = T0 + timedelta(hours=h)
        a = 10000.0 + (10 if h >= 12 else 0) - (2.4 if h >= 5 else 0) - (2.46 if h >= 12 else 0)
        if 5 <= h < 12:
            a += 0.01 * (40000 + 100 * (h - 5)) - 400
        if h >= 20:
            a += 0.2 * (2500 + 5 * ((h * 7) % 11)) - 500 - 3
        b = 10000.0 - (1.8 if h >= 6 else 0) - (1.74 if h >= 18 else 0) - (10 if h >= 18 else 0)
        if 6 <= h < 18:
            b += 10 * (30 - 0.1 * ((h * 3) % 7)) - 300
        curves["profile_a"].append([iso(t), a])
        curves["profile_b"].append([iso(t), b])

    def books(pid: str, marks: dict[str, str]) -> dict[str, Any]:
        mine = [f for f in fills if f["profile"] == pid]
        buys = sum((Decimal(f["size"]) * Decimal(f["price"]) for f in mine if f["side"] == "buy"), Decimal(0))
        sells = sum(
            (Decimal(f["size"]) * Decimal(f["price"]) for f in mine if f["side"] == "sell"), Decimal(0)
        )
        fees = sum((Decimal(f["fee"]) for f in mine), Decimal(0))
        pos: dict[str, Decimal] = {}
        for f in mine:
            pos[f["product"]] = pos.get(f["product"], Decimal(0)) + Decimal(f["size"]) * (
                1 if f["side"] == "buy" else -1
            )
        open_pos = {k: v for k, v in pos.items() if v}
        final = (
            Decimal(10000)
            + sells
            - buys
            - fees
            + sum((v * Decimal(marks[k]) for k, v in open_pos.items()), Decimal(0))
        )
        return {
            "buys": buys,
            "sells": sells,
            "fees": fees,
            "open": open_pos,
            "final": final,
            "trades": len(mine),
        }

    def exits(reason: str) -> dict[str, int]:
        return {r: int(r == reason) for r in EXIT_REASONS}

    ba = books("profile_a", {"ETH/USDC": "2510"})
    bb = books("profile_b", {})
    summary = {
        "profiles": {
            "profile_a": {
                "name": "A",
                "strategy": "alpha",
                "trades": ba["trades"],
                "closed_trades": 1,
                "wins": 1,
                "win_rate": 1.0,
                "realized_pnl": "10",
                "fees": str(ba["fees"]),
                "initial_equity": "10000",
                "final_equity": str(ba["final"]),
                "return_pct": 0.1,
                "max_drawdown_pct": 0.05,
                "open_positions": {k: str(v) for k, v in ba["open"].items()},
                "mark_prices": {"ETH/USDC": "2510"},
                "halts": [],
                "exits_by_reason": exits("take_profit"),
                "orders_timed_out": 0,
                "equity_curve": curves["profile_a"],
            },
            "profile_b": {
                "name": "B",
                "strategy": "gamma",
                "trades": bb["trades"],
                "closed_trades": 1,
                "wins": 0,
                "win_rate": 0.0,
                "realized_pnl": "-10",
                "fees": str(bb["fees"]),
                "initial_equity": "10000",
                "final_equity": str(bb["final"]),
                "return_pct": -0.13,
                "max_drawdown_pct": 0.2,
                "open_positions": {},
                "mark_prices": {},
                "halts": [
                    {
                        "reason": "daily loss 5.10% >= max_daily_loss_pct 5",
                        "event_time": iso(T0 + timedelta(hours=30)),
                        "at": iso(T0 + timedelta(hours=30)),
                        "until": iso(T0 + timedelta(hours=48)),
                        "kind": "daily_loss",
                    }
                ],
                "exits_by_reason": exits("exit_signal"),
                "orders_timed_out": 1,
                "equity_curve": curves["profile_b"],
            },
        },
        "counters": {
            "intents": 6,
            "approved": 5,
            "rejected": 1,
            "rejected_by_rule": {"opposite_side": 1},
            "collisions_resolved": 2,
            "plans": len(plans),
            "halts": 1,
        },
        "settings": {"conflict_window_s": 300.0, "mode": "paper", "quote_asset": "USDC"},
        "span": {"first_candle": iso(T0), "last_close": iso(T0 + timedelta(hours=hours)), "steps": hours},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, rows in (("fills", fills), ("orders", orders), ("decisions", decisions), ("plans", plans)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "run.json").write_text(
        json.dumps(
            {"namespace": "synthetic", "kafka_bootstrap": "127.0.0.1:1", "redis_url": "redis://127.0.0.1:1/0"}
        )
    )
    (out / "alerts.jsonl").write_text(
        json.dumps(
            {
                "kind": "halt",
                "severity": "critical",
                "summary": "profile_b halted",
                "event_time": iso(T0 + timedelta(hours=30)),
            }
        )
        + "\n"
    )
    return summary
