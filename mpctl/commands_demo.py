"""`mpctl demo`: a paper-trading run of every enabled profile over recorded candles, with every service in its
own process over real Kafka and Redis, then the run's output files and a table per profile.

With `--exchange-api-base URL` (a local test peer only) the execution workers run in live mode through ccxt
against that URL, with the profiles' credentials from the encrypted store: the whole pipeline, signed orders
included, without Coinbase (tests/e2e/test_live_pipeline.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import orjson
from aiokafka import AIOKafkaConsumer

from mpctl import infra
from mpctl.progress import Progress
from services.monitor.collect import collect_run
from services.monitor.report_html import write_report
from shared.codec import DecodeError, decode
from shared.config import AppConfig, ConfigError, config_warnings, load_config
from shared.kafka import delete_topics, ensure_topics
from shared.messages import WorkerFinished
from shared.topics import Topics, declared_topics


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="paper-trade every enabled profile over recorded candles (the main job)")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--data", type=Path, default=Path("data/market"))
    p.add_argument("--out", type=Path, default=Path("reports/demo"))
    p.add_argument("--hours", type=float, default=None, help="replay only the first N hours of the data")
    p.add_argument("--start", default=None, help="ISO time, first candle open (UTC)")
    p.add_argument("--end", default=None, help="ISO time, replay candles opening before this")
    p.add_argument("--speed", type=float, default=0.0, help="0: as fast as consumers keep up; N: N x real time")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is declared stuck")
    p.add_argument("--namespace", default=None, help="topic/group namespace (default: a new one per run)")
    p.add_argument("--keep-topics", action="store_true", help="keep the run's topics (for `mpctl lag` afterwards)")
    p.add_argument(
        "--exchange-api-base",
        default=None,
        help="run execution in live mode against this exchange API on loopback (a test peer; needs system.mode: live)",
    )
    p.set_defaults(handler=run_demo)


_progress = Progress("demo")  # terminal only, quiet in CI and pipes (mpctl/progress.py)


SECRET_ENV = ("MPCTL_SECRETS_PASSPHRASE", "MPCTL_SECRETS_KEY_FILE")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    fh: IO[bytes]
    args: list[str] = field(default_factory=list)
    restarts: int = 0


@dataclass
class Stack:
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, args: list[str], log_dir: Path) -> Proc:
        return self._spawn(name, args, log_dir / f"{name}.log", "wb")

    def _spawn(self, name: str, args: list[str], log: Path, mode: str) -> Proc:
        fh = log.open(mode)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if not name.startswith("execution."):
            for k in SECRET_ENV:  # only execution workers open the credentials store
                env.pop(k, None)
        popen = subprocess.Popen([sys.executable, "-m", *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
        proc = Proc(name, popen, log, fh, list(args))
        self.procs.append(proc)
        return proc

    def sigkill_and_restart(self, name: str) -> Proc:
        """SIGKILL the running service `name` and start it again with the same arguments, its log continued.

        Synchronous on purpose: with no await between kill and restart, `wait_finished` (same event loop)
        never sees the victim dead, so a fault injected on purpose is not reported as a crash."""
        old = next((p for p in self.procs if p.name == name and p.popen.poll() is None), None)
        if old is None:
            states = {p.name: p.popen.poll() for p in self.procs}
            raise RuntimeError(f"no running service {name!r} to kill (exit codes, None = running: {states})")
        old.popen.kill()
        old.popen.wait()
        old.fh.write(f"\n--- SIGKILLed by fault injection (restart {old.restarts + 1}) ---\n".encode())
        old.fh.close()
        self.procs.remove(old)
        new = self._spawn(name, old.args, old.log, "ab")
        new.restarts = old.restarts + 1
        return new

    def dead(self) -> list[Proc]:
        return [p for p in self.procs if p.popen.poll() not in (None, 0)]

    def stop(self, grace: float = 10.0) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
            p.fh.close()


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def expected_finishers(cfg: AppConfig) -> set[str]:
    names = {"ingest:0", "registry:0"}
    names |= {f"arbiter:partition-{p}" for p in range(cfg.system.kafka.intent_partitions)}
    names |= {f"strategy:{pid}" for pid in cfg.enabled_profiles()}
    return names


async def wait_finished(
    bootstrap: str, topic: str, expected: set[str], stack: Stack, timeout: float, started: float
) -> set[str]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    seen: set[str] = set()
    last_report = 0.0
    try:
        while not expected <= seen:
            dead = stack.dead()
            if dead:
                d = dead[0]
                raise RuntimeError(
                    f"service {d.name} exited with code {d.popen.returncode}; last lines of {d.log}:\n{tail(d.log)}"
                )
            if time.monotonic() - started > timeout:
                missing = sorted(expected - seen)
                raise TimeoutError(f"run not complete after {timeout:.0f} s; still waiting for {missing}")
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                for rec in recs:
                    try:
                        msg = decode(rec.value)
                    except DecodeError:
                        continue
                    if isinstance(msg, WorkerFinished):
                        seen.add(f"{msg.service}:{msg.instance}")
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                _progress(f"{time.monotonic() - started:.0f}s: finished {sorted(seen)}")
        return seen
    finally:
        await consumer.stop()


FaultAction = Callable[[Stack], Awaitable[str]]  # does the harm, returns what it did


@dataclass
class Fault:
    """Harm done once to a running demo, when `after_order_events` records are on orders.events (decisions,
    order updates, fills: the run's progress) and `after_candles` on the candles topic (the replay's own progress,
    for harm to the ingest, which runs ahead of the pipeline). The demo fails if the run completes before it fired."""

    label: str
    after_order_events: int
    action: FaultAction
    after_candles: int = 0
    fired_after: int | None = None  # records on orders.events when it fired
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


async def inject_faults(bootstrap: str, topics: Topics, faults: Sequence[Fault], stack: Stack, started: float) -> None:
    """Fire each fault once its progress point is reached (returns when all fired)."""
    pending = list(faults)
    consumer = AIOKafkaConsumer(
        topics.events, topics.status, topics.candles,
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
    )
    await consumer.start()
    seen = candles = 0
    finished: set[str] = set()
    try:
        while pending:
            for tp, recs in (await consumer.getmany(timeout_ms=200)).items():
                if tp.topic == topics.events:
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
    bootstrap: str, topics: Topics, expected: set[str], stack: Stack, timeout: float, started: float,
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
    cols = ["profile", "strategy", "trades", "win_rate", "realized_pnl", "fees", "final_equity", "return_%", "max_dd_%"]
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
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
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
            f"opposite-side pairs within the window: {d['opposite_side_pairs_within_window']}"
        )


def run_demo(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    for w in config_warnings(cfg):
        print(f"warning: {w}", file=sys.stderr)
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
    kafka = cfg.system.kafka.model_copy(update={"namespace": ns})
    cfg = cfg.model_copy(update={"system": cfg.system.model_copy(update={"kafka": kafka})})
    topics = Topics(ns)
    out: Path = args.out
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for stale in (
        "orders.jsonl", "fills.jsonl", "decisions.jsonl", "plans.jsonl", "summary.json",
        "report.html", "audit.jsonl", "alerts.jsonl", "monitor.json",
    ):
        (out / stale).unlink(missing_ok=True)
    specs = declared_topics(cfg, ns)
    await ensure_topics(endpoints.kafka_bootstrap, specs, replication_factor=cfg.system.kafka.replication_factor)
    (out / "run.json").write_bytes(
        orjson.dumps(
            {
                "namespace": ns,
                "kafka_bootstrap": endpoints.kafka_bootstrap,
                "redis_url": endpoints.redis_url,
                "config": str(args.config) if args.config else None,
            },
            option=orjson.OPT_INDENT_2,
        )
    )
    _progress(f"namespace {ns}: {len(specs)} topics on {endpoints.kafka_bootstrap}, Redis {endpoints.redis_url}")
    common = ["--bootstrap", endpoints.kafka_bootstrap, "--redis-url", endpoints.redis_url, "--namespace", ns]
    if args.config:
        common += ["--config", str(args.config)]
    stack = Stack()
    try:
        # A replay runs in event time, also when execution is live.
        stack.start("registry", ["services.registry", *common, "--clock", "event"], log_dir)
        stack.start("arbiter", ["services.arbiter", *common], log_dir)
        for pid in cfg.enabled_profiles():
            live = ["--exchange-api-base", args.exchange_api_base] if args.exchange_api_base else []
            stack.start(f"execution.{pid}", ["services.execution", *common, "--profile", pid, *live], log_dir)
            stack.start(f"strategy.{pid}", ["services.strategy", *common, "--profile", pid], log_dir)
        stack.start(
            "monitor",
            ["services.monitor", *common, "--audit-file", str(out / "audit.jsonl"), "--alerts-file", str(out / "alerts.jsonl")],
            log_dir,
        )
        replay = ["--data", str(args.data), "--speed", str(args.speed)]
        for flag in ("hours", "start", "end"):
            if getattr(args, flag) is not None:
                replay += [f"--{flag}", str(getattr(args, flag))]
        stack.start("ingest", ["services.ingest", *common, *replay], log_dir)
        _progress(f"started {len(stack.procs)} service processes; logs in {log_dir}")
        await wait_finished_with_faults(
            endpoints.kafka_bootstrap, topics, expected_finishers(cfg), stack, args.timeout, started, faults
        )
    except (RuntimeError, TimeoutError) as err:
        print(f"demo failed: {err}", file=errors or sys.stderr)
        return 1
    finally:
        stack.stop()
    _progress("replay fully processed; collecting the run")
    summary = await collect_run(cfg, endpoints.kafka_bootstrap, out)
    write_report(out)
    if not args.keep_topics:
        await delete_topics(endpoints.kafka_bootstrap, [s.name for s in specs])
    print_table(summary)
    print(f"outputs in {out} ({time.monotonic() - started:.1f} s)")
    return 0
