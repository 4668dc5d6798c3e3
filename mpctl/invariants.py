"""DESIGN.md invariants 1 to 4 and the books, checked from a run directory's files alone (the library form of
the end-to-end test's checks, also used by `mpctl selftest`).

`check_run(dir)` returns every violation found (an empty list: all hold), each with the invariant it breaks;
`assert_run(dir)` raises AssertionError listing them.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from services.monitor.domain import opposite_side_pairs, working_orders

ORDER_FIELDS = {
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
PLAN_FIELDS = {"epoch", "profile", "hash", "nonce", "strategy", "parameters", "assets", "fingerprint"}
STATUSES = {"submitted", "open", "partially_filled", "filled", "cancelled", "rejected"}
PROFILE_KEYS = ("strategy", "wins", "win_rate", "realized_pnl", "fees", "max_drawdown_pct")
MAX_EXAMPLES = 5  # per check: a broken run would otherwise list thousands of pairs


@dataclass(frozen=True)
class Violation:
    check: str  # "1-fingerprint", "3-opposite-side", "books", ...
    message: str


@dataclass
class RunCheck:
    violations: list[Violation] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, check: str, message: str) -> None:
        if sum(1 for v in self.violations if v.check == check) < MAX_EXAMPLES:
            self.violations.append(Violation(check, message))
        elif not any(v.check == check and v.message.startswith("more ") for v in self.violations):
            self.violations.append(Violation(check, "more violations of this check not listed"))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": dict(self.checked),
            "violations": [{"check": v.check, "message": v.message} for v in self.violations],
        }


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def random_asset_pools(out: Path, quote: str | None = None) -> dict[str, set[str]] | None:
    """Each profile's random-asset candidates (its `random_asset_pool` minus its base assets and the quote), from
    the profiles file the run's run.json names; None when it cannot be read (every shared asset then counts)."""
    try:
        config = Path(json.loads((out / "run.json").read_text())["config"])
        profiles = yaml.safe_load(config.read_text(encoding="utf-8"))["profiles"]
        return {
            pid: set(p["strategy_config"].get("random_asset_pool", []))
            - set(p["strategy_config"]["base_assets"])
            - {quote}
            for pid, p in profiles.items()
        }
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def pool_allows(plans: list[dict[str, Any]], pools: dict[str, set[str]] | None) -> bool:
    """Whether invariant 2 applies to the run: "random assets differ between profiles while the pool has at
    least as many assets as profiles" (DESIGN.md section 5), i.e. every profile of the run has at least as many
    random-asset candidates as the run has profiles, so that a free one is always left for it. Without the
    pools (no profiles file) it applies: every shared asset counts."""
    if pools is None:
        return True
    profiles = {p["profile"] for p in plans}
    return all(len(pools.get(pid, set())) >= len(profiles) for pid in profiles)


def check_run(out: Path, summary: dict[str, Any] | None = None) -> RunCheck:
    r = RunCheck()
    if summary is None:
        path = out / "summary.json"
        if not path.exists():
            r.fail("files", f"{path} is missing")
            return r
        summary = json.loads(path.read_text())
    plans = _jsonl(out / "plans.jsonl")
    orders = _jsonl(out / "orders.jsonl")
    fills = _jsonl(out / "fills.jsonl")
    decisions = _jsonl(out / "decisions.jsonl")
    window = timedelta(seconds=float(summary["settings"]["conflict_window_s"]))

    # 1 and 2: no fingerprint, hash or (while the pool allows) random asset held twice over overlapping epochs.
    pools = random_asset_pools(out, summary.get("settings", {}).get("quote_asset"))
    shared: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for a, b in itertools.combinations(plans, 2):
        if a["profile"] == b["profile"]:
            continue
        if not (_ts(a["epoch_start"]) < _ts(b["epoch_end"]) and _ts(b["epoch_start"]) < _ts(a["epoch_end"])):
            continue
        r.checked["plan pairs"] += 1
        if a["fingerprint"] == b["fingerprint"]:
            r.fail(
                "1-fingerprint",
                f"{a['profile']} and {b['profile']} hold fingerprint {a['fingerprint'][:12]} "
                f"in epochs starting {a['epoch_start']} / {b['epoch_start']}",
            )
        if a["hash"] == b["hash"]:
            r.fail("1-hash", f"{a['profile']} and {b['profile']} hold hash {a['hash'][:12]}")
        if a.get("random_asset") and a.get("random_asset") == b.get("random_asset"):
            shared.append((a, b))
    if pool_allows(plans, pools):
        for a, b in shared:
            r.fail(
                "2-random-asset",
                f"{a['profile']} and {b['profile']} share random asset {a['random_asset']} "
                f"in epochs starting {a['epoch_start']} / {b['epoch_start']}",
            )
    else:
        # More profiles than candidates (scripts/bench_scale.py's 100 over a pool of 8): sharing is by design.
        r.checked["random assets shared, the pool smaller than the profiles"] += len(shared)
    for (pid, epoch), n in Counter((p["profile"], p["epoch"]) for p in plans).items():
        if n != 1:
            r.fail("1-one-plan-per-epoch", f"{pid} has {n} plans for epoch {epoch}")

    # 3: no wash trade between profiles, from the fills: no fill of one profile on a product inside the working
    # life (first exchange event to last fill + conflict_window_s) of another profile's opposite order (the
    # summary's desync.opposite_side_pairs_within_window, services/monitor/domain.py). Internal legs (netted at
    # the mid price) never reach the exchange; protective orders (stop loss / take profit: trigger orders
    # that take liquidity) are reported apart in the summary, not flagged here.
    sent = [o for o in orders if o["status"] == "submitted"]
    working = working_orders(orders, fills)
    r.checked["working orders"] = len(working)
    for x, y in opposite_side_pairs(working, int(window / timedelta(microseconds=1))):
        if x.protective or y.protective:
            r.checked["protective opposite-side pairs"] += 1
            continue
        r.fail(
            "3-opposite-side",
            f"{x.product}: {x.profile} {x.side} {x.client_order_id} and {y.profile} {y.side} "
            f"{y.client_order_id} traded within each other's working life + {window}",
        )

    # 4: nothing sent twice; one client order id per intent; one fill per fill id; nothing unapproved sent.
    for coid, n in Counter(o["client_order_id"] for o in sent).items():
        if n != 1:
            r.fail("4-sent-twice", f"client order id {coid} submitted {n} times")
    intent_to_coid: dict[str, set[str]] = defaultdict(set)
    for o in orders:
        intent_to_coid[o["intent_id"]].add(o["client_order_id"])
    for intent, coids in intent_to_coid.items():
        if len(coids) != 1:
            r.fail("4-client-order-id", f"intent {intent} maps to {len(coids)} client order ids")
    for fid, n in Counter(f["fill_id"] for f in fills).items():
        if n != 1:
            r.fail("4-fill-twice", f"fill {fid} appears {n} times")
    # A delayed intent is approved with a later not_before (crowding rule): it may be sent.
    approved = {d["intent_id"] for d in decisions if d["verdict"] in ("approved", "delayed")}
    for o in sent:
        if o["intent_id"] not in approved:
            r.fail("4-unapproved", f"order {o['client_order_id']} reached the exchange without approval")
    r.checked["orders sent"] = len(sent)
    r.checked["fills"] = len(fills)

    for o in orders:
        missing = ORDER_FIELDS - set(o)
        if missing:
            r.fail("fields", f"order event without {sorted(missing)}")
        if o.get("side") not in ("buy", "sell") or o.get("status") not in STATUSES:
            r.fail("fields", f"order event with side {o.get('side')!r} status {o.get('status')!r}")
    for p in plans:
        missing = PLAN_FIELDS - set(p)
        if missing:
            r.fail("fields", f"plan without {sorted(missing)}")

    # The books: final equity = initial + sells - buys - fees + open positions at their marks, from fills alone.
    for pid, prof in summary["profiles"].items():
        r.checked["profiles"] += 1
        buys = sells = fees = Decimal(0)
        pos: dict[str, Decimal] = defaultdict(Decimal)
        mine = [f for f in fills if f["profile"] == pid]
        for f in mine:
            notional = Decimal(f["size"]) * Decimal(f["price"])
            fees += Decimal(f["fee"])
            if f["side"] == "buy":
                buys += notional
                pos[f["product"]] += Decimal(f["size"])
            else:
                sells += notional
                pos[f["product"]] -= Decimal(f["size"])
        open_pos = {k: v for k, v in pos.items() if v}
        if {k: Decimal(v) for k, v in prof["open_positions"].items()} != open_pos:
            r.fail("books", f"{pid}: open positions {prof['open_positions']} but the fills give {open_pos}")
            continue
        marks = prof.get("mark_prices", {})
        if any(k not in marks for k in open_pos):
            r.fail("books", f"{pid}: no mark price for {sorted(set(open_pos) - set(marks))}")
            continue
        marked = sum((v * Decimal(marks[k]) for k, v in open_pos.items()), Decimal(0))
        expected = Decimal(prof["initial_equity"]) + sells - buys - fees + marked
        if abs(Decimal(prof["final_equity"]) - expected) >= Decimal("0.0000001"):
            r.fail("books", f"{pid}: final equity {prof['final_equity']} but the fills give {expected}")
        if prof["trades"] != len(mine):
            r.fail("books", f"{pid}: {prof['trades']} trades in the summary, {len(mine)} fills")
        for key in PROFILE_KEYS:
            if key not in prof:
                r.fail("fields", f"{pid}: summary has no {key!r}")
    c = summary["counters"]
    delayed = c.get("delayed", 0)
    if c["intents"] != c["approved"] + c["rejected"] + delayed:
        r.fail(
            "counters",
            f"intents {c['intents']} != approved {c['approved']} + rejected {c['rejected']} "
            f"+ delayed {delayed}",
        )
    if c["approved"] + delayed != len(approved):
        r.fail("counters", f"approved {c['approved']} in the summary, {len(approved)} in decisions.jsonl")
    return r


def assert_run(out: Path, summary: dict[str, Any] | None = None) -> RunCheck:
    r = check_run(out, summary)
    if not r.ok:
        raise AssertionError(
            "invariants broken in "
            + str(out)
            + ":\n"
            + "\n".join(f"  [{v.check}] {v.message}" for v in r.violations)
        )
    return r
