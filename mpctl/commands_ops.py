"""Operating commands: `mpctl lag`, `mpctl status`, `mpctl report`.

Which run they look at: `--run DIR` reads the run's `run.json` (namespace and Kafka bootstrap, written by
`mpctl demo`); otherwise `--namespace` (default: the config's `system.kafka.namespace`) and `--bootstrap`
(default: $KAFKA_BOOTSTRAP_SERVERS, else the local broker's 127.0.0.1:19092).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from mpctl.infra import operator_access
from mpctl.progress import Progress
from services.monitor.health import HEALTH_HEADER, ServiceHealth, fetch_health, health_rows
from services.monitor.lag import LagReport, fetch_lag, format_table, summary_line, to_json
from services.monitor.metrics import PerformanceTracker
from services.monitor.report_html import write_report
from shared.bus import KafkaAccess
from shared.config import AppConfig, ConfigError, load_config
from shared.kafka import list_topics, read_topics
from shared.topics import Topics

DEFAULT_BOOTSTRAP = "127.0.0.1:19092"


progress = Progress("status")  # terminal only, quiet in CI and pipes (mpctl/progress.py)


@dataclass(frozen=True)
class Target:
    bootstrap: KafkaAccess
    namespace: str
    run_dir: Path | None
    config_path: Path | None


def resolve_target(args: argparse.Namespace) -> Target:
    run_dir: Path | None = getattr(args, "run", None)
    info: dict[str, Any] = {}
    if run_dir is not None:
        rj = run_dir / "run.json"
        if not rj.exists():
            raise ValueError(f"{rj} not found: --run wants a directory written by `mpctl demo --out`")
        info = orjson.loads(rj.read_bytes())
    config_path = getattr(args, "config", None) or (Path(info["config"]) if info.get("config") else None)
    bootstrap = (
        getattr(args, "bootstrap", None)
        or info.get("kafka_bootstrap")
        or os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
        or DEFAULT_BOOTSTRAP
    )
    namespace = getattr(args, "namespace", None) or info.get("namespace")
    if not namespace:
        try:
            namespace = load_config(config_path).system.kafka.namespace
        except ConfigError:
            namespace = "mp"
    access = operator_access(str(bootstrap), str(namespace), bus_dir=info.get("bus_dir"))
    return Target(access, str(namespace), run_dir, config_path)


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, default=None, help="a run directory (reads its run.json)")
    p.add_argument(
        "--namespace", default=None, help="topic/group namespace (default: the run's, else the config's)"
    )
    p.add_argument(
        "--bootstrap",
        default=None,
        help="Kafka bootstrap (default: $KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:19092)",
    )
    p.add_argument(
        "--config", type=Path, default=None, help="profiles file (default: local file, else template)"
    )


def register(sub: Any) -> None:
    lag = sub.add_parser("lag", help="consumer lag per group, topic and partition")
    _add_target(lag)
    lag.add_argument("--json", action="store_true", help="one JSON document per snapshot")
    lag.add_argument(
        "--watch", type=float, default=None, metavar="S", help="refresh every S seconds until Ctrl-C"
    )
    lag.add_argument(
        "--fail-above", type=int, default=None, metavar="N", help="exit 3 when the total lag exceeds N"
    )
    lag.set_defaults(handler=cmd_lag)

    status = sub.add_parser(
        "status", help="services up/down, each profile's plan, positions, equity, halts, lag"
    )
    _add_target(status)
    status.add_argument("--json", action="store_true")
    status.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=None,
        metavar="S",
        help="a service is down when its last heartbeat is older than S seconds (default: 3 of its intervals)",
    )
    status.set_defaults(handler=cmd_status)

    report = sub.add_parser("report", help="write a run's self-contained HTML report")
    report.add_argument("--run", type=Path, required=True, help="run directory (mpctl demo --out)")
    report.add_argument("--out", type=Path, default=None, help="output file (default: <run>/report.html)")
    report.set_defaults(handler=cmd_report)


# ------------------------------------------------------------------------------------------ lag
def cmd_lag(args: argparse.Namespace) -> int:
    try:
        target = resolve_target(args)
    except ValueError as err:
        print(f"mpctl lag: {err}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_lag(args, target))
    except KeyboardInterrupt:
        return 0
    except Exception as err:  # an unreachable broker gives aiokafka errors of several kinds
        print(
            f"mpctl lag: cannot read lag from {target.bootstrap}: {type(err).__name__}: {err}",
            file=sys.stderr,
        )
        return 1


async def _lag(args: argparse.Namespace, target: Target) -> int:
    tty = sys.stdout.isatty()
    while True:
        report = await fetch_lag(target.bootstrap, target.namespace)
        if args.json:
            sys.stdout.write(orjson.dumps(to_json(report), option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            if args.watch and tty:
                sys.stdout.write("\x1b[H\x1b[2J")  # redraw in place at a terminal
            sys.stdout.write(format_table(report))
        sys.stdout.flush()
        if not args.watch:
            break
        if not tty and not args.json:
            sys.stdout.write("\n")
        await asyncio.sleep(args.watch)
    if args.fail_above is not None and report.total > args.fail_above:
        return 3
    return 0


# ------------------------------------------------------------------------------------------ status
async def gather_status(
    target: Target, cfg: AppConfig, *, heartbeat_timeout: float | None = None
) -> dict[str, Any]:
    t = Topics(target.namespace)
    existing = set(await list_topics(target.bootstrap))
    wanted = [t.candles, t.audit, t.events, t.decisions, t.plans]
    source = "topics"
    profiles: dict[str, Any] = {}
    if all(name in existing for name in wanted):
        progress(f"reading {target.namespace} topics from {target.bootstrap} ...")
        msgs, _bad = await read_topics(target.bootstrap, wanted)
        tracker = PerformanceTracker(
            {pid: Decimal(str(p.paper.initial_quote_balance)) for pid, p in cfg.enabled_profiles().items()}
        )
        tracker.add_all(msgs)
        profiles = {pid: tracker.profile_view(pid) for pid in sorted(tracker.books)}
    elif target.run_dir is not None and (target.run_dir / "summary.json").exists():
        source = f"files in {target.run_dir} (the run's topics are gone)"
        profiles = _profiles_from_files(target.run_dir)
    else:
        source = "none: the namespace's topics do not exist"
    health: list[ServiceHealth] = await fetch_health(
        target.bootstrap, cfg, target.namespace, threshold_s=heartbeat_timeout
    )
    lag: LagReport = await fetch_lag(target.bootstrap, target.namespace)
    return {
        "namespace": target.namespace,
        "bootstrap": target.bootstrap.servers,
        "source": source,
        "services": [h.to_json() for h in health],
        "profiles": profiles,
        "lag": {
            "total": lag.total,
            "summary": summary_line(lag),
            "groups": {g.group: g.total for g in lag.groups},
        },
    }


def _profiles_from_files(run_dir: Path) -> dict[str, Any]:
    summary = orjson.loads((run_dir / "summary.json").read_bytes())
    latest: dict[str, dict[str, Any]] = {}
    plans = run_dir / "plans.jsonl"
    if plans.exists():
        for line in plans.read_bytes().splitlines():
            if line.strip():
                p = orjson.loads(line)
                if p["profile"] not in latest or p["epoch_start"] >= latest[p["profile"]]["epoch_start"]:
                    latest[p["profile"]] = p
    out = {}
    for pid, p in summary["profiles"].items():
        plan = latest.get(pid)
        out[pid] = {
            "trades": p["trades"],
            "win_rate": p["win_rate"],
            "realized_pnl": p["realized_pnl"],
            "equity": p["final_equity"],
            "max_drawdown_pct": p["max_drawdown_pct"],
            "open_positions": p["open_positions"],
            # Live: what the account holds that the system did not trade (never sold by it unless configured).
            "untracked_holdings": p.get("untracked_holdings", {}),
            "halts": len(p.get("halts", [])),
            "last_halt": p["halts"][-1]["reason"] if p.get("halts") else None,
            "plan": None
            if plan is None
            else {
                "epoch": plan["epoch"],
                "epoch_start": plan["epoch_start"],
                "strategy": plan["strategy"],
                "assets": plan["assets"],
                "random_asset": plan.get("random_asset"),
                "nonce": plan["nonce"],
                "fingerprint": plan["fingerprint"][:12],
            },
        }
    return out


def _columns(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]
    )


def _positions_cell(p: dict[str, Any]) -> str:
    held = [f"{k}={v}" for k, v in p.get("open_positions", {}).items()]
    held += [f"{k}={v} (untracked)" for k, v in p.get("untracked_holdings", {}).items()]
    return " ".join(held) or "-"


def format_status(st: dict[str, Any]) -> str:
    lines = [f"namespace {st['namespace']} on {st['bootstrap']}", "", "SERVICES"]
    health = [ServiceHealth(**{**h, "clients": tuple(h["clients"])}) for h in st["services"]]
    lines.append(_columns(HEALTH_HEADER, health_rows(health)))
    lines += ["", f"PROFILES (from {st['source']})"]
    rows = []
    for pid, p in st["profiles"].items():
        plan = p.get("plan") or {}
        rows.append(
            [
                pid,
                str(plan.get("strategy", "-")),
                f"{plan.get('epoch', '-')} @ {plan.get('epoch_start', '-')}",
                ",".join(plan.get("assets", [])) or "-",
                str(plan.get("nonce", "-")),
                str(p["trades"]),
                f"{float(p['equity']):,.2f}",
                f"{float(p['realized_pnl']):,.2f}",
                _positions_cell(p),
                f"{p['halts']}" + (f" ({p['last_halt']})" if p.get("last_halt") else ""),
            ]
        )
    lines.append(
        _columns(
            [
                "PROFILE",
                "STRATEGY",
                "EPOCH",
                "ASSETS",
                "NONCE",
                "TRADES",
                "EQUITY",
                "REALISED",
                "POSITIONS",
                "HALTS",
            ],
            rows,
        )
        if rows
        else "no profile data"
    )
    lines += ["", st["lag"]["summary"]]
    for g, total in sorted(st["lag"]["groups"].items()):
        short = g[len(st["namespace"]) + 1 :] if g.startswith(st["namespace"] + ".") else g
        lines.append(f"  {short}: {total}")
    return "\n".join(lines) + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    try:
        target = resolve_target(args)
        cfg = load_config(target.config_path)
    except (ValueError, ConfigError) as err:
        print(f"mpctl status: {err}", file=sys.stderr)
        return 2
    try:
        st = asyncio.run(
            gather_status(target, cfg, heartbeat_timeout=getattr(args, "heartbeat_timeout", None))
        )
    except Exception as err:
        print(f"mpctl status: cannot reach {target.bootstrap}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(format_status(st))
    return 0


# ------------------------------------------------------------------------------------------ report
def cmd_report(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        path = write_report(args.run, args.out)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"mpctl report: {err}", file=sys.stderr)
        return 1
    print(f"report written to {path} ({path.stat().st_size // 1024} KiB, {time.monotonic() - started:.1f} s)")
    return 0
