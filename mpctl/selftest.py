"""`mpctl selftest`: the self-test the original description promised, over the real stack.

It runs a short paper run (`mpctl demo` in a subprocess, into a temporary directory), drains the run's topics
through the monitor (audit file, alerts), writes the HTML report, checks DESIGN.md invariants 1 to 4 and the
books from the run's files, and writes two files into `--out` (default: the current directory):

- `multi_profile_test_results.json`: one entry per area of the original test list (system initialisation,
  profile management, strategy generation, trade execution, cross-profile arbitrage, mathematical separation,
  performance monitoring, integration), each `passed` or `failed` with its duration and details;
- `multi_profile_test.log`: what was run and what it printed.

Exit status 0 when every entry passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from mpctl.audit import audit_run
from mpctl.bus import BusSecrets, admin_access
from mpctl.infra import access_from_env
from mpctl.invariants import RunCheck, check_run
from mpctl.progress import Progress
from mpctl.stack import bus_args
from services.monitor.report_html import write_report
from shared.config import DEFAULT_CONFIG, LOCAL_CONFIG, config_warnings, load_config

# 240 hours, not fewer: the signal models need their look-back windows filled before the first entry, and
# on the bundled data the first intents come after about five days; a shorter run would test no trade.
DEFAULT_HOURS = 240.0
ROOT = Path(__file__).resolve().parents[1]


def register(sub: Any) -> None:
    p = sub.add_parser(
        "selftest", help="short paper run + invariant checks; writes multi_profile_test_results.json"
    )
    p.add_argument("--out", type=Path, default=Path("."), help="where the results and log go (default: .)")
    p.add_argument(
        "--hours",
        type=float,
        default=DEFAULT_HOURS,
        help=f"hours of data to replay (default {DEFAULT_HOURS:g})",
    )
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--data", type=Path, default=None, help="candle folder (default: the bundled data/market)")
    p.add_argument(
        "--keep-run", action="store_true", help="keep the run directory (its path is in the results)"
    )
    p.add_argument("--timeout", type=float, default=900.0)
    p.set_defaults(handler=run_selftest)


_progress = Progress("selftest")  # terminal only, quiet in CI and pipes (mpctl/progress.py)


@dataclass
class Entry:
    name: str
    status: str = "passed"
    duration_s: float = 0.0
    details: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.status = "failed"
        self.details.append(why)


@dataclass
class Session:
    log: TextIO
    entries: list[Entry] = field(default_factory=list)

    def say(self, msg: str) -> None:
        self.log.write(f"{datetime.now(UTC).isoformat(timespec='seconds')} {msg}\n")
        self.log.flush()
        _progress(msg)

    def entry(self, name: str, body: Callable[[Entry], None]) -> Entry:
        e = Entry(name)
        t0 = time.monotonic()
        try:
            body(e)
        except Exception as err:  # a check that crashes is a failed check, with its reason in the results
            e.fail(f"{type(err).__name__}: {err}")
        e.duration_s = round(time.monotonic() - t0, 3)
        self.entries.append(e)
        self.say(
            f"{e.status.upper():6} {name} ({e.duration_s:.1f} s){': ' + '; '.join(e.details) if e.details else ''}"
        )
        return e


def _run(
    cmd: list[str], session: Session, timeout: float, *, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    session.say("$ " + " ".join(cmd))  # a password is never in it: it goes to standard input
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ), input=stdin
    )
    for stream, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        if text.strip():
            session.log.write(f"--- {stream}\n{text.rstrip()}\n---\n")
    session.say(f"exit code {proc.returncode}")
    return proc


def _by_prefix(check: RunCheck, *prefixes: str) -> list[str]:
    return [f"[{v.check}] {v.message}" for v in check.violations if v.check.startswith(prefixes)]


def run_selftest(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "multi_profile_test.log"
    results_path = out / "multi_profile_test_results.json"
    started = datetime.now(UTC)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mpctl-selftest-"))
    run_dir = work / "run"
    state: dict[str, Any] = {}
    with log_path.open("w", encoding="utf-8") as log:
        s = Session(log)
        s.say(f"mpctl selftest: {args.hours:g} hours of paper trading into {run_dir}")

        # The demo runs in the project's directory; its default config is the project's, wherever we run.
        config_path = (
            args.config.resolve()
            if args.config
            else (ROOT / LOCAL_CONFIG if (ROOT / LOCAL_CONFIG).exists() else ROOT / DEFAULT_CONFIG)
        )
        args.config = config_path

        def init(e: Entry) -> None:
            cfg = load_config(config_path)
            e.details.append(f"config {config_path}")
            state["cfg"] = cfg
            e.details += [f"warning: {w}" for w in config_warnings(cfg)]
            if cfg.system.mode != "paper":
                e.fail("system.mode is not paper: the self-test trades on paper only")

        s.entry("system_initialization", init)
        if "cfg" not in state:
            return _finish(s, results_path, started, t0, run_dir, work, args, {})
        cfg = state["cfg"]

        def integration(e: Entry) -> None:
            cmd = [
                sys.executable,
                "-m",
                "mpctl.cli",
                "demo",
                "--out",
                str(run_dir),
                "--hours",
                f"{args.hours:g}",
                "--keep-topics",
            ]
            if args.config:
                cmd += ["--config", str(args.config.resolve())]
            if args.data:
                cmd += ["--data", str(args.data.resolve())]
            try:
                proc = _run(cmd, s, args.timeout)
            finally:
                if (run_dir / "run.json").exists():
                    state["run"] = json.loads((run_dir / "run.json").read_text())
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or [""])[-1]
                e.fail(f"mpctl demo exited {proc.returncode}: {last}")
                return
            state["summary"] = json.loads((run_dir / "summary.json").read_text())
            e.details.append(f"namespace {state['run']['namespace']}, every service finished the replay")

        try:
            s.entry("integration", integration)
            if "summary" not in state:
                return _finish(s, results_path, started, t0, run_dir, work, args, {})
            return _checks(s, state, cfg, run_dir, args, results_path, started, t0, work)
        finally:
            if "run" in state:
                # The run's topics were kept for the monitor; they are of no use after the self-test.
                _delete_topics(state["run"], cfg)


def _checks(
    s: Session,
    state: dict[str, Any],
    cfg: Any,
    run_dir: Path,
    args: argparse.Namespace,
    results_path: Path,
    started: datetime,
    t0: float,
    work: Path,
) -> int:
    summary = state["summary"]
    check = check_run(run_dir, summary)
    s.say(f"invariant checks: {dict(check.checked)}; {len(check.violations)} violation(s)")

    def profiles(e: Entry) -> None:
        want = set(cfg.enabled_profiles())
        have = set(summary["profiles"])
        if want != have:
            e.fail(f"profiles in the run {sorted(have)}, enabled in the config {sorted(want)}")
        e.details.append(f"{len(have)} profile(s): {', '.join(sorted(have))}")

    def strategies(e: Entry) -> None:
        plans = [json.loads(x) for x in (run_dir / "plans.jsonl").read_text().splitlines() if x.strip()]
        for pid, prof in cfg.enabled_profiles().items():
            mine = [p for p in plans if p["profile"] == pid]
            if not mine:
                e.fail(f"{pid} got no plan")
            weights = prof.strategy_config.strategy_weights
            bad = {p["strategy"] for p in mine if weights.get(p["strategy"], 0) <= 0}
            if bad:
                e.fail(f"{pid} ran strategies with no weight: {sorted(bad)}")
            e.details.append(f"{pid}: {len(mine)} plans, {len({p['strategy'] for p in mine})} strategies")

    def separation(e: Entry) -> None:
        for v in _by_prefix(check, "1-", "2-"):
            e.fail(v)
        e.details.append(
            f"{check.checked['plan pairs']} overlapping plan pairs checked; "
            f"{summary['counters']['collisions_resolved']} collision(s) resolved"
        )

    def arbitrage(e: Entry) -> None:
        for v in _by_prefix(check, "3-", "counters"):
            e.fail(v)
        c = summary["counters"]
        e.details.append(
            f"intents {c['intents']}: approved {c['approved']}, rejected {c['rejected']} "
            f"{c.get('rejected_by_rule', {})}"
        )

    def execution(e: Entry) -> None:
        for v in _by_prefix(check, "4-", "books", "fields"):
            e.fail(v)
        c = summary["counters"]
        if c["intents"] == 0:
            e.fail("no intent in the replayed window: nothing was executed (use more --hours)")
        trades = sum(p["trades"] for p in summary["profiles"].values())
        e.details.append(f"{trades} fill(s), {c.get('orders_filled', 0)} order(s) filled; books balance")

    def monitoring(e: Entry) -> None:
        ns = state["run"]["namespace"]
        bootstrap = state["run"]["kafka_bootstrap"]
        cmd = [
            "services.monitor",
            "--bootstrap",
            bootstrap,
            "--namespace",
            ns,
            "--drain",
            "--audit-file",
            str(run_dir / "audit.jsonl"),
            "--alerts-file",
            str(run_dir / "alerts.jsonl"),
            "--snapshot-file",
            str(run_dir / "monitor.json"),
        ]
        if args.config:
            cmd += ["--config", str(args.config.resolve())]
        # As the run's stack started its monitor: connected as the namespace's monitor principal.
        argv, password = bus_args(_run_bus(state["run"]), cmd)
        proc = _run([sys.executable, "-m", *argv], s, 300, stdin=password)
        if proc.returncode != 0:
            e.fail(f"monitor exited {proc.returncode}")
            return
        audit_lines = sum(1 for x in (run_dir / "audit.jsonl").read_text().splitlines() if x.strip())
        if audit_lines == 0:
            e.fail("the audit file is empty")
        snap = json.loads((run_dir / "monitor.json").read_text())
        for pid, p in summary["profiles"].items():
            live = Decimal(snap["profiles"][pid]["equity"])
            if abs(live - Decimal(p["final_equity"])) > Decimal("0.000001"):
                e.fail(f"{pid}: monitor equity {live} != summary {p['final_equity']}")
        report = write_report(run_dir)
        e.details.append(
            f"audit {audit_lines} line(s); monitor equity = summary; report {report.name} "
            f"{report.stat().st_size // 1024} KiB"
        )

    data_dir = args.data.resolve() if args.data else Path(__file__).resolve().parents[1] / "data" / "market"
    audit = audit_run(run_dir, data_dir, cfg)
    s.say(
        f"paper-truth audit: {sum(audit.checked.values())} checked; {sum(audit.counts.values())} violation(s)"
    )

    def paper_truth(e: Entry) -> None:
        for check_name, n in sorted(audit.counts.items()):
            e.fail(f"{check_name}: {n} ({'; '.join(audit.examples.get(check_name, [])[:2])})")
        exits = audit.info.get("exits_by_reason", {})
        e.details.append(
            f"mpctl audit: fills in their candle, protective exits, no look-ahead; exits {exits}"
        )

    for name, body in (
        ("profile_management", profiles),
        ("strategy_generation", strategies),
        ("trade_execution", execution),
        ("cross_profile_arbitrage", arbitrage),
        ("mathematical_separation", separation),
        ("performance_monitoring", monitoring),
        ("paper_truth", paper_truth),
    ):
        s.entry(name, body)
    extra = {
        "namespace": state["run"]["namespace"],
        "profiles": {
            pid: {
                k: p[k]
                for k in (
                    "strategy",
                    "trades",
                    "win_rate",
                    "realized_pnl",
                    "final_equity",
                    "max_drawdown_pct",
                )
            }
            for pid, p in summary["profiles"].items()
        },
        "counters": summary["counters"],
        "invariants": check.to_json(),
        "audit": audit.to_json(),
    }
    return _finish(s, results_path, started, t0, run_dir, work, args, extra)


def _run_bus(run: dict[str, Any]) -> BusSecrets | None:
    """The broker's secrets the run recorded (run.json `bus_dir`), if any."""
    return BusSecrets(Path(run["bus_dir"])) if run.get("bus_dir") else None


def _delete_topics(run: dict[str, Any], cfg: Any) -> None:
    import asyncio

    from shared.kafka import delete_topics
    from shared.topics import declared_topics

    bus, servers = _run_bus(run), str(run["kafka_bootstrap"])
    admin = admin_access(servers, bus) if bus is not None else access_from_env(servers, os.environ)
    asyncio.run(delete_topics(admin, [t.name for t in declared_topics(cfg, run["namespace"])]))


def _finish(
    s: Session,
    results_path: Path,
    started: datetime,
    t0: float,
    run_dir: Path,
    work: Path,
    args: argparse.Namespace,
    extra: dict[str, Any],
) -> int:
    failed = [e for e in s.entries if e.status != "passed"]
    results = {
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 2),
        "hours": args.hours,
        "passed": not failed,
        "summary": {"total": len(s.entries), "passed": len(s.entries) - len(failed), "failed": len(failed)},
        "tests": [
            {"name": e.name, "status": e.status, "duration_s": e.duration_s, "details": e.details}
            for e in s.entries
        ],
        "run_dir": str(run_dir) if args.keep_run else None,
        **extra,
    }
    results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    s.say(f"{'PASSED' if not failed else 'FAILED'}: {results['summary']}; results in {results_path}")
    if not args.keep_run:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"selftest {'passed' if not failed else 'FAILED'}: {results['summary']['passed']}/{results['summary']['total']} "
        f"in {results['duration_s']:.1f} s; {results_path}"
    )
    return 0 if not failed else 1
