"""`mpctl plans`: the current plan of every profile (hash prefix, nonce, strategy, key parameters, assets,
fingerprint prefix, epoch end), as a table or JSON.

Sources, in order: the plans topic of a namespace (`--namespace NS --bootstrap B`, or the namespace a run
directory's `run.json` names: a running demo, or a finished one kept with `--keep-topics`); then, when that
topic is gone or Kafka does not answer, the run directory's `plans.jsonl`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mpctl.infra import operator_access
from services.registry.recovery import read_plans
from shared.bus import KafkaAccess
from shared.codec import to_jsonable
from shared.strategy_catalog import CATALOG
from shared.topics import Topics

HASH_PREFIX = 12


def register(sub: Any) -> None:
    p = sub.add_parser("plans", help="show the current plan of every profile (registry)")
    p.add_argument("--run", type=Path, default=None, help="a demo's output folder (default: reports/demo)")
    p.add_argument("--namespace", default=None, help="read the plans topic of this namespace")
    p.add_argument(
        "--bootstrap",
        default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092"),
        help="Kafka bootstrap servers (with --namespace)",
    )
    p.add_argument("--profile", action="append", default=None, help="only this profile (repeatable)")
    p.add_argument("--all", action="store_true", help="every epoch's plan, not only the current one")
    p.add_argument("--json", action="store_true", help="JSON (full hashes and parameters) instead of a table")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for Kafka")
    p.set_defaults(handler=run_plans)


# ------------------------------------------------------------------------------------------ rows
def _iso(v: Any) -> str:
    if isinstance(v, datetime):
        return v.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(v)


def _num(x: float) -> str:
    return f"{x:.4g}"


def plan_row(plan: Mapping[str, Any]) -> dict[str, Any]:
    """One plan (a PlanPublished as JSON, or a line of plans.jsonl) as a row of the table / JSON output."""
    strategy = str(plan["strategy"])
    params: dict[str, float] = {k: float(v) for k, v in dict(plan.get("parameters") or {}).items()}
    spec = CATALOG.get(strategy)
    # The drifted (tunable) parameters are what tells two plans of one strategy apart.
    key = {k: params[k] for k in (spec.tunable if spec else params) if k in params}
    return {
        "profile": str(plan["profile"]),
        "epoch": int(plan["epoch"]),
        "hash": str(plan["hash"]),
        "nonce": int(plan["nonce"]),
        "strategy": strategy,
        "key_parameters": key,
        "parameters": params,
        "assets": list(plan.get("assets") or []),
        "random_asset": plan.get("random_asset"),
        "fingerprint": str(plan["fingerprint"]),
        "epoch_start": _iso(plan.get("epoch_start", "")),
        "epoch_end": _iso(plan.get("epoch_end", "")),
        "collisions": int(plan.get("collisions") or 0),
    }


def select(
    rows: Iterable[dict[str, Any]], *, every: bool = False, profiles: list[str] | None = None
) -> list[dict[str, Any]]:
    """The current (latest epoch) plan per profile, or every epoch's, sorted by profile then epoch."""
    rows = [r for r in rows if not profiles or r["profile"] in profiles]
    if every:
        uniq = {(r["profile"], r["epoch"]): r for r in rows}
        return [uniq[k] for k in sorted(uniq)]
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:
        cur = latest.get(r["profile"])
        if cur is None or r["epoch_start"] > cur["epoch_start"]:
            latest[r["profile"]] = r
    return [latest[p] for p in sorted(latest)]


def plans_table(rows: list[dict[str, Any]]) -> str:
    cols = [
        "profile",
        "epoch",
        "hash",
        "nonce",
        "strategy",
        "key parameters",
        "assets",
        "fingerprint",
        "epoch end",
    ]
    table = [
        [
            r["profile"],
            str(r["epoch"]),
            r["hash"][:HASH_PREFIX],
            str(r["nonce"]),
            r["strategy"],
            " ".join(f"{k}={_num(v)}" for k, v in r["key_parameters"].items()),
            ",".join(a for a in r["assets"] if a != r["random_asset"])
            + (f" +{r['random_asset']}" if r["random_asset"] else ""),
            r["fingerprint"][:HASH_PREFIX],
            r["epoch_end"],
        ]
        for r in rows
    ]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)).rstrip() for t in table]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ sources
async def topic_rows(namespace: str, bootstrap: KafkaAccess) -> list[dict[str, Any]] | None:
    """Rows of every plan on the namespace's plans topic; None when the topic does not exist."""
    plans = await read_plans(bootstrap, Topics(namespace).plans)
    if plans is None:
        return None
    return [plan_row(to_jsonable(p)) for p in plans]


async def current_plans(*, namespace: str, bootstrap: KafkaAccess) -> list[dict[str, Any]]:
    rows = await topic_rows(namespace, bootstrap)
    if rows is None:
        raise LookupError(f"no plans topic {Topics(namespace).plans!r} on {bootstrap}")
    return select(rows)


def jsonl_rows(path: Path) -> list[dict[str, Any]]:
    return [plan_row(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


async def _load(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    if args.namespace:
        try:
            access = operator_access(args.bootstrap, args.namespace)
            rows = await asyncio.wait_for(topic_rows(args.namespace, access), args.timeout)
        except (TimeoutError, OSError) as err:
            raise LookupError(f"Kafka at {args.bootstrap} did not answer ({err or 'timeout'})") from None
        if rows is None:
            raise LookupError(f"no plans topic {Topics(args.namespace).plans!r} on {args.bootstrap}")
        return rows, f"topic {Topics(args.namespace).plans} on {args.bootstrap}"
    run_dir: Path = args.run or Path("reports/demo")
    meta_path = run_dir / "run.json"
    why = f"{meta_path} not found"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        ns, bootstrap = str(meta["namespace"]), str(meta["kafka_bootstrap"])
        access = operator_access(bootstrap, ns, bus_dir=meta.get("bus_dir"))
        try:
            rows = await asyncio.wait_for(topic_rows(ns, access), args.timeout)
        except (TimeoutError, OSError) as err:
            rows, why = None, f"Kafka at {bootstrap} did not answer ({err or 'timeout'})"
        else:
            why = f"topic {Topics(ns).plans} is gone (the demo deletes its topics unless --keep-topics)"
        if rows is not None:
            return rows, f"topic {Topics(ns).plans} on {bootstrap}"
    jsonl = run_dir / "plans.jsonl"
    if jsonl.is_file():
        return jsonl_rows(jsonl), f"{jsonl} ({why})"
    raise LookupError(f"no plans for {run_dir}: {why}, and no {jsonl}")


def run_plans(args: argparse.Namespace) -> int:
    try:
        rows, source = asyncio.run(_load(args))
    except LookupError as err:
        print(f"mpctl plans: {err}", file=sys.stderr)
        return 1
    shown = select(rows, every=args.all, profiles=args.profile)
    if args.json:
        print(json.dumps({"source": source, "plans": shown}, indent=2, sort_keys=True))
    else:
        print(f"# {source}")
        print(plans_table(shown) if shown else "(no plans yet)")
    return 0
