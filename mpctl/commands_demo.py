"""`mpctl demo`: a paper-trading run of every enabled profile over recorded candles, with every service in its
own process over real Kafka and Redis, then the run's output files and a table per profile.

With `--exchange-api-base URL` (a local test peer only) the execution workers run in live mode through ccxt
against that URL, with the profiles' credentials from the encrypted store: the whole pipeline, signed orders
included, without Coinbase (tests/e2e/test_live_pipeline.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from aiokafka import AIOKafkaConsumer

from mpctl import infra
from mpctl.audit import audit_summary_line
from mpctl.commands_config import load_for_command
from mpctl.stack import (
    OUTPUT_FILES,
    SECRET_ENV,
    Proc,
    Stack,
    _progress,
    collect,
    common_args,
    create_topics,
    expected_finishers,
    start_services,
    tail,
    wait_audit_drained,
    wait_finished,
    with_namespace,
    write_run_json,
)
from services.monitor.domain import exit_reason_order
from shared.bus import KafkaAccess
from shared.codec import DecodeError, decode
from shared.config import AppConfig
from shared.kafka import delete_topics
from shared.messages import WorkerFinished
from shared.topics import Topics

# Shared with `mpctl run` (mpctl/stack.py); importable from here as before.
__all__ = [
    "SECRET_ENV",
    "Fault",
    "FaultAction",
    "Proc",
    "Stack",
    "demo_pipeline",
    "expected_finishers",
    "register",
    "run_demo",
    "sigkill_and_restart",
    "tail",
    "wait_finished",
]


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="paper-trade every enabled profile over recorded candles (the main job)")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--data", type=Path, default=Path("data/market"))
    p.add_argument("--out", type=Path, default=Path("reports/demo"))
    p.add_argument("--hours", type=float, default=None, help="replay only the first N hours of the data")
    p.add_argument("--start", default=None, help="ISO time, first candle open (UTC)")
    p.add_argument("--end", default=None, help="ISO time, replay candles opening before this")
    p.add_argument(
        "--speed", type=float, default=0.0, help="0: as fast as consumers keep up; N: N x real time"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is declared stuck")
    p.add_argument("--namespace", default=None, help="topic/group namespace (default: a new one per run)")
    p.add_argument(
        "--keep-topics", action="store_true", help="keep the run's topics (for `mpctl lag` afterwards)"
    )
    p.add_argument(
        "--exchange-api-base",
        default=None,
        help="run execution in live mode against this exchange API on loopback (a test peer; needs system.mode: live)",
    )
    p.set_defaults(handler=run_demo)


FaultAction = Callable[[Stack], Awaitable[str]]  # does the harm, returns what it did


@dataclass
class Fault:
    """Harm done once to a running demo, when `after_order_events` records are on orders.decisions and
    orders.events together (decisions, order updates, fills: the run's progress) and `after_candles` on the
    candles topic (the replay's own progress, for harm to the ingest, which runs ahead of the pipeline). The demo
    fails if the run completes before it fired."""

    label: str
    after_order_events: int
    action: FaultAction
    after_candles: int = 0
    fired_after: int | None = None  # records on orders.decisions and orders.events when it fired
    fired_after_candles: int | None = None  # records on the candles topic when it fired
    fired_at_s: float | None = None  # seconds into the run
    finished_before: list[str] = field(default_factory=list)  # services whose WorkerFinished was out by then
    outcome: str = ""


def sigkill_and_restart(service: str) -> FaultAction:
    """A fault action: SIGKILL the stack's process `service` (e.g. "arbiter", "strategy.profile_a") and
    start it again with the same arguments."""

    async def act(stack: Stack) -> str:
        proc = stack.sigkill_and_restart(service)
        return f"SIGKILLed {service}; restarted as pid {proc.popen.pid}"

    return act


async def inject_faults(
    bootstrap: KafkaAccess, topics: Topics, faults: Sequence[Fault], stack: Stack, started: float
) -> None:
    """Fire each fault once its progress point is reached (returns when all fired)."""
    pending = list(faults)
    consumer = AIOKafkaConsumer(
        topics.events,
        topics.decisions,
        topics.status,
        topics.candles,
        **bootstrap.client_options(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen = candles = 0
    finished: set[str] = set()
    try:
        while pending:
            for tp, recs in (await consumer.getmany(timeout_ms=200)).items():
                if tp.topic in (topics.events, topics.decisions):
                    seen += len(recs)
                    continue
                if tp.topic == topics.candles:
                    candles += len(recs)
                    continue
                for rec in recs:
                    with contextlib.suppress(DecodeError):
                        msg = decode(rec.value)
                        if isinstance(msg, WorkerFinished):
                            finished.add(f"{msg.service}:{msg.instance}")
            for fault in [f for f in pending if seen >= f.after_order_events and candles >= f.after_candles]:
                pending.remove(fault)
                fault.fired_after, fault.fired_at_s = seen, time.monotonic() - started
                fault.fired_after_candles = candles
                fault.finished_before = sorted(finished)
                _progress(f"fault {fault.label} after {seen} order events, {candles} candle records")
                fault.outcome = await fault.action(stack)
    finally:
        await consumer.stop()


async def wait_finished_with_faults(
    bootstrap: KafkaAccess,
    topics: Topics,
    expected: set[str],
    stack: Stack,
    timeout: float,
    started: float,
    faults: Sequence[Fault],
) -> set[str]:
    """`wait_finished`, with `faults` injected meanwhile; an error of either ends the wait."""
    waiter = asyncio.create_task(wait_finished(bootstrap, topics.status, expected, stack, timeout, started))
    tasks: set[asyncio.Task[Any]] = {waiter}
    if faults:
        tasks.add(asyncio.create_task(inject_faults(bootstrap, topics, faults, stack, started)))
    try:
        while not waiter.done():
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what failed
            tasks -= done
        unfired = [f"{f.label} (after {f.after_order_events})" for f in faults if f.fired_after is None]
        if unfired:
            raise RuntimeError(f"the run completed before these faults fired: {unfired}")
        return waiter.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def print_table(summary: dict[str, Any]) -> None:
    cols = [
        "profile",
        "strategy",
        "trades",
        "win_rate",
        "realized_pnl",
        "fees",
        "final_equity",
        "return_%",
        "max_dd_%",
    ]
    rows = []
    for pid, p in summary["profiles"].items():
        rows.append(
            [
                pid,
                str(p["strategy"]),
                str(p["trades"]),
                f"{p['win_rate']:.2%}",
                f"{float(p['realized_pnl']):.2f}",
                f"{float(p['fees']):.2f}",
                f"{float(p['final_equity']):.2f}",
                f"{p['return_pct']:.2f}",
                f"{p['max_drawdown_pct']:.2f}",
            ]
        )
    _print_rows(cols, rows)
    # Why each exit happened: sell orders with a fill, by the intent's reason; orders cancelled at order_timeout.
    exits = {pid: p["exits_by_reason"] for pid, p in summary["profiles"].items() if "exits_by_reason" in p}
    if exits:
        reasons = exit_reason_order(r for e in exits.values() for r in e)
        _print_rows(
            ["exits by reason", *reasons, "timed_out"],
            [
                [
                    pid,
                    *(str(e.get(r, 0)) for r in reasons),
                    str(summary["profiles"][pid].get("orders_timed_out", 0)),
                ]
                for pid, e in exits.items()
            ],
        )
    c = summary["counters"]
    print(
        f"intents {c['intents']}, approved {c['approved']}, delayed {c.get('delayed', 0)}, rejected {c['rejected']} "
        f"{c['rejected_by_rule']}, collisions resolved {c['collisions_resolved']}, plans {c['plans']}"
    )
    if "internal_cross_savings" in c:
        s = c["internal_cross_savings"]
        print(
            f"internal-cross opportunities {c['internal_cross_opportunities']} (executed {c['internal_cross_executed']}): "
            f"netting would save {s['total']} (fees {s['fees']}, slippage {s['slippage']})"
        )
    d = summary.get("desync")
    if d:
        g = d["gaps"]
        print(
            f"cross-profile order gaps per product: {g['pairs']} pairs, min {g['min_ms']} ms, median {g['median_ms']} ms, "
            f"p95 {g['p95_ms']} ms; below {d['min_cross_profile_gap_ms']} ms: {d['below_min']}; "
            f"opposite-side pairs (from the fills: inside an order's working life + window): "
            f"{d['opposite_side_pairs_within_window']}"
            + (
                f" (protective exits, reported apart: {d['protective_opposite_pairs_within_window']})"
                if d.get("protective_opposite_pairs_within_window")
                else ""
            )
        )


def _print_rows(cols: list[str], rows: list[list[str]]) -> None:
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def run_demo(args: argparse.Namespace) -> int:
    cfg = load_for_command(args.config)
    if cfg is None:
        return 1
    if args.exchange_api_base is None and cfg.system.mode != "paper":
        print("mpctl demo runs in paper mode only; set system.mode: paper", file=sys.stderr)
        return 1
    if args.exchange_api_base is not None:
        host = urlparse(args.exchange_api_base).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            # A replay sends years-old prices: never to a real exchange.
            print(f"--exchange-api-base must be a loopback test peer, got host {host!r}", file=sys.stderr)
            return 1
        if cfg.system.mode != "live":
            print("--exchange-api-base runs execution in live mode: set system.mode: live", file=sys.stderr)
            return 1
    if not args.data.is_dir():
        print(f"--data {args.data} is not a folder", file=sys.stderr)
        return 1
    return asyncio.run(demo_pipeline(args, cfg))


async def demo_pipeline(
    args: argparse.Namespace,
    cfg: AppConfig,
    *,
    endpoints: infra.Endpoints | None = None,
    faults: Sequence[Fault] = (),
    errors: IO[str] | None = None,
) -> int:
    """The demo run; `faults` are injected while it runs (the fault suite), `endpoints` skip the lookup, a
    failure is told on `errors` (default stderr: several runs side by side each keep their own)."""
    started = time.monotonic()
    if endpoints is None:
        endpoints = await asyncio.to_thread(infra.resolve_endpoints, None, _progress)
    ns = args.namespace or "demo" + datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    cfg = with_namespace(cfg, ns)
    topics = Topics(ns)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for stale in OUTPUT_FILES:
        (out / stale).unlink(missing_ok=True)
    specs = await create_topics(endpoints, cfg, ns)
    write_run_json(out, ns, endpoints, args.config)
    _progress(f"namespace {ns}: {len(specs)} topics on {endpoints.kafka}, Redis {endpoints.redis_url}")
    stack = Stack(bus=endpoints.bus)
    try:
        replay = ["--data", str(args.data), "--speed", str(args.speed)]
        for flag in ("hours", "start", "end"):
            if getattr(args, flag) is not None:
                replay += [f"--{flag}", str(getattr(args, flag))]
        # A replay runs in event time, also when execution is live.
        log_dir = start_services(
            stack,
            cfg,
            common_args(endpoints, ns, args.config, "replay"),
            out,
            ingest_args=replay,
            exchange_api_base=args.exchange_api_base,
            # --exchange-api-base (a loopback test peer only, checked in run_demo) is the explicit live start.
            live=args.exchange_api_base is not None,
        )
        _progress(f"started {len(stack.procs)} service processes; logs in {log_dir}")
        await wait_finished_with_faults(
            endpoints.kafka, topics, expected_finishers(cfg), stack, args.timeout, started, faults
        )
        if not await wait_audit_drained(endpoints.kafka, topics):
            _progress(
                "the monitor had not written the whole audit topic within 60 s; audit.jsonl may be short"
            )
    except (RuntimeError, TimeoutError) as err:
        print(f"demo failed: {err}", file=errors or sys.stderr)
        return 1
    finally:
        stack.stop()
    _progress("replay fully processed; collecting the run")
    summary = await collect(cfg, endpoints.kafka, out)
    if not args.keep_topics:
        await delete_topics(endpoints.kafka, [s.name for s in specs])
    print_table(summary)
    print(f"outputs in {out} ({time.monotonic() - started:.1f} s)")
    if args.exchange_api_base is not None:
        # Live execution against an exchange peer: its fills are the exchange's, not the paper model's.
        print("audit: skipped (live execution: the fills are the exchange's, not the paper model's)")
        return 0
    ok, line = audit_summary_line(out, args.data, cfg)
    print(line)
    return 0 if ok else 1
