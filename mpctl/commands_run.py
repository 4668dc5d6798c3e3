"""`mpctl run`: the forward test. A long-running paper run of every enabled profile on the live market
(`system.market_data.source: coinbase`), or on a replay at a pace (`--source replay`), every service in its own
process over real Kafka and Redis, until Ctrl-C or SIGTERM (or `--max-steps N`, for trials and tests).

The run directory (`--out`, default reports/run) holds `run.json` (namespace, broker, Redis, profiles file,
market-data source and interval), `logs/`, and once the run stops the files of `mpctl demo` (orders, fills,
decisions, plans, summary.json, report.html), collected from the topics, which are kept. Run the same command
again with the same `--out` and it resumes: same namespace, the services rebuild their state from the topics and
the ingest backfills the steps it missed. `mpctl status|lag|report|send --run DIR` work on a running run.

With `system.mode: live` the execution workers trade for real (on the exchange, or `--exchange-api-base`). Going
live is explicit: a live config starts only with `--live`, and only after the pre-flight (`mpctl live check`,
run here in-process before anything starts) passes; the run then prints what trades with which account. A live
run on replayed candles is refused (shared.config.live_source_problem)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, get_args

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from mpctl import infra
from mpctl.commands_config import load_for_command
from mpctl.commands_demo import print_table
from mpctl.progress import Progress, progress_enabled
from mpctl.stack import (
    Stack,
    collect,
    common_args,
    create_topics,
    dead_service_error,
    read_run_json,
    start_services,
    with_namespace,
    write_run_json,
)
from services.monitor.lag import fetch_lag
from services.monitor.metrics import PerformanceTracker
from shared.bus import KafkaAccess
from shared.codec import DecodeError, decode
from shared.config import (
    AppConfig,
    Interval,
    MarketDataSettings,
    live_source_problem,
)
from shared.messages import FeedStateChanged, WatermarkAdvanced
from shared.topics import Topics

DEFAULT_OUT = Path("reports/run")
REPLAY_SPEED = 60.0  # a replay's default pace: 60 x real time
DRAIN_TIMEOUT_S = 300.0  # after the last step: how long every group may take to process it

_progress = Progress("run")  # terminal only, quiet in CI and pipes (mpctl/progress.py)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="forward test: paper-trade every enabled profile on the live market until Ctrl-C; run again to resume",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"run directory (default {DEFAULT_OUT}); resumed when it has a run.json",
    )
    p.add_argument(
        "--config", type=Path, default=None, help="profiles file (default: local file, else template)"
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        metavar="N",
        help="stop by itself once N new steps were published after this start and every consumer group processed them",
    )
    p.add_argument(
        "--namespace",
        default=None,
        help="topic/group namespace of a new run (default: a new one; a resumed run keeps its own)",
    )
    p.add_argument(
        "--source",
        choices=("coinbase", "replay"),
        default=None,
        help="market data (default: system.market_data.source)",
    )
    p.add_argument(
        "--rest-url", default=None, help="Coinbase REST base URL (default: system.market_data.rest_url)"
    )
    p.add_argument(
        "--ws-url", default=None, help="Coinbase websocket URL (default: system.market_data.ws_url)"
    )
    p.add_argument(
        "--interval",
        choices=get_args(Interval),
        default=None,
        help="candle interval (default: system.market_data.interval)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="replay: folder of candle files (default: system.market_data.data_dir)",
    )
    p.add_argument(
        "--speed",
        type=float,
        default=None,
        help=f"replay: pace, N x real time (default {REPLAY_SPEED:g}; 0: as fast as possible)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="stop after S seconds (with --max-steps: fail when the steps are not processed by then)",
    )
    p.add_argument(
        "--exchange-api-base",
        default=None,
        help="system.mode: live only: send the execution workers' exchange calls to this URL instead of Coinbase's",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="trade for real (system.mode: live): runs the pre-flight (`mpctl live check`) first, starts only "
        "when it passes",
    )
    p.set_defaults(handler=run_forward)


# ------------------------------------------------------------------------------------------ settings
class RunError(ValueError):
    """A run that must not start; the message says why."""


@dataclass(frozen=True)
class RunSettings:
    """The market-data settings of this start: flags over `system.market_data.*` of the profiles file."""

    source: str
    interval: str
    rest_url: str
    ws_url: str
    data_dir: Path
    speed: float
    flags: dict[str, str] = field(
        default_factory=dict
    )  # the ones given on the command line (passed to the ingest)


def resolve_settings(args: argparse.Namespace, cfg: AppConfig) -> RunSettings:
    md = cfg.system.market_data
    given = {
        k: v
        for k, v in (
            ("source", args.source),
            ("interval", args.interval),
            ("rest_url", args.rest_url),
            ("ws_url", args.ws_url),
            ("data_dir", args.data),
        )
        if v is not None
    }
    try:
        eff = MarketDataSettings.model_validate({**md.model_dump(), **given})
    except ValidationError as err:
        first = err.errors()[0]
        raise RunError(f"{first['msg']}") from err
    if args.max_steps is not None and args.max_steps < 1:
        raise RunError("--max-steps must be at least 1")
    speed = REPLAY_SPEED if args.speed is None else float(args.speed)
    if speed < 0:
        raise RunError("--speed must be 0 or more")
    return RunSettings(
        source=eff.source,
        interval=eff.interval,
        rest_url=eff.rest_url,
        ws_url=eff.ws_url,
        data_dir=eff.data_dir,
        speed=speed,
        flags={k: str(v) for k, v in given.items()},
    )


@dataclass(frozen=True)
class StartPlan:
    namespace: str
    resumed: bool
    previous: dict[str, Any] | None


def plan_start(args: argparse.Namespace, settings: RunSettings, *, now: datetime | None = None) -> StartPlan:
    """A new run, or the resumption of the one in `--out` (its run.json): same namespace, source and interval."""
    info = read_run_json(args.out)
    if info is None:
        ns = args.namespace or "run" + (now or datetime.now(UTC)).strftime("%Y%m%d%H%M%S")
        return StartPlan(ns, False, None)
    ns = str(info.get("namespace") or "")
    if not ns:
        raise RunError(f"{args.out / 'run.json'} names no namespace; use another --out")
    if args.namespace and args.namespace != ns:
        raise RunError(
            f"{args.out} is the run of namespace {ns!r}; --namespace {args.namespace} wants another --out"
        )
    for key in ("source", "interval"):
        was = info.get(key)
        if was is not None and was != getattr(settings, key):
            raise RunError(
                f"{args.out} ran with {key} {was!r}, this start asks for {getattr(settings, key)!r}: one run keeps "
                f"one {key} (its candles are on one topic); use another --out"
            )
    return StartPlan(ns, True, info)


def ingest_args(settings: RunSettings) -> list[str]:
    """The ingest's flags: the live source with the endpoint and interval flags given, or the replay."""
    if settings.source == "coinbase":
        out: list[str] = []
        for key, flag in (("rest_url", "--rest-url"), ("ws_url", "--ws-url"), ("interval", "--interval")):
            if key in settings.flags:
                out += [flag, settings.flags[key]]
        return out
    return ["--data", str(settings.data_dir), "--speed", f"{settings.speed:g}"]


def check_start(args: argparse.Namespace, cfg: AppConfig, settings: RunSettings) -> None:
    problem = live_source_problem(cfg, source=settings.source, exchange_url=args.exchange_api_base)
    if problem:
        raise RunError(problem)
    if args.exchange_api_base is not None and cfg.system.mode != "live":
        raise RunError("--exchange-api-base runs execution in live mode: set system.mode: live")
    live = bool(getattr(args, "live", False))
    if cfg.system.mode == "live" and not live:
        # A config flag alone must not move real money: the start itself says so, after the pre-flight.
        raise RunError(
            "system.mode: live trades real money and starts only with `mpctl run --live`, which runs the "
            "pre-flight (`mpctl live check`) first and starts nothing unless it passes; run `mpctl live check` "
            "to see what it checks, then `mpctl run --live`"
        )
    if live and cfg.system.mode != "live":
        raise RunError(
            f"--live trades for real, but system.mode is {cfg.system.mode!r}: set system.mode: live"
        )
    if settings.source == "replay" and not settings.data_dir.is_dir():
        raise RunError(f"replay data folder {settings.data_dir} is not a folder (--data)")


def run_forward(args: argparse.Namespace) -> int:
    cfg = load_for_command(args.config)
    if cfg is None:
        return 1
    try:
        settings = resolve_settings(args, cfg)
        check_start(args, cfg, settings)
        plan = plan_start(args, settings)
    except RunError as err:
        print(f"mpctl run: {err}", file=sys.stderr)
        return 1
    if cfg.system.mode == "live" and not live_preflight(args, cfg):
        return 1
    return asyncio.run(run_pipeline(args, cfg, settings, plan))


def live_preflight(args: argparse.Namespace, cfg: AppConfig) -> bool:
    """`mpctl live check` in-process, with the credentials the execution workers will read (the default store,
    no plaintext); on success, what will trade with which account. False: print why, start nothing."""
    from mpctl.commands_exchange import load_store
    from mpctl.commands_live import PreflightError, preflight, print_going_live, print_preflight
    from services.execution.credentials import CredentialsError

    try:
        result = asyncio.run(preflight(cfg, store=load_store(None), api_base=args.exchange_api_base))
    except (PreflightError, CredentialsError) as err:
        print(f"mpctl run: pre-flight: {err}; nothing was started", file=sys.stderr)
        return False
    print_preflight(result)
    if not result.ok:
        print("mpctl run: the pre-flight failed (above); nothing was started", file=sys.stderr)
        return False
    print_going_live(result, args.exchange_api_base or "Coinbase")
    return True


# ------------------------------------------------------------------------------------------ the run
@dataclass
class RunView:
    """What the watchers saw since this start."""

    new_steps: set[float] = field(default_factory=set)
    last_step: datetime | None = None
    last_step_seen: float | None = None  # monotonic time the last new step arrived
    feed_state: str | None = None
    equity: dict[str, Decimal] = field(default_factory=dict)


async def candle_end_offset(bootstrap: KafkaAccess, topic: str) -> int:
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def watch_steps(bootstrap: KafkaAccess, topic: str, start_offset: int, seen: RunView) -> None:
    """Watermarks and feed states on partition 0 of the candles topic after `start_offset` (this start's)."""
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, start_offset)
        while True:
            for rec in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                try:
                    msg = decode(rec.value)
                except DecodeError:
                    continue
                if isinstance(msg, WatermarkAdvanced):
                    seen.new_steps.add(msg.step_time.timestamp())
                    seen.last_step = msg.step_time
                    seen.last_step_seen = time.monotonic()
                elif isinstance(msg, FeedStateChanged):
                    seen.feed_state = msg.state
    finally:
        await consumer.stop()


async def watch_equity(bootstrap: KafkaAccess, cfg: AppConfig, seen: RunView) -> None:
    """Each profile's equity, from the candles and order events since the run began (for the status line)."""
    t = Topics(cfg.system.kafka.namespace)
    tracker = PerformanceTracker(
        {pid: Decimal(str(p.paper.initial_quote_balance)) for pid, p in cfg.enabled_profiles().items()}
    )
    consumer = AIOKafkaConsumer(
        t.candles,
        t.events,
        t.decisions,
        **bootstrap.client_options(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        while True:
            changed = False
            for recs in (await consumer.getmany(timeout_ms=1000, max_records=5000)).values():
                for rec in recs:
                    with contextlib.suppress(DecodeError):
                        changed |= tracker.add(decode(rec.value))
            if changed:
                seen.equity = {
                    pid: Decimal(str(tracker.profile_view(pid)["equity"])) for pid in sorted(tracker.books)
                }
    finally:
        await consumer.stop()


def status_line(seen: RunView, started: float, source: str) -> str:
    step = seen.last_step.strftime("%Y-%m-%d %H:%M") if seen.last_step else "-"
    if seen.feed_state is not None:
        feed = f"feed {seen.feed_state}"
    elif seen.last_step_seen is not None:
        feed = f"last step {time.monotonic() - seen.last_step_seen:.0f}s ago"
    else:
        feed = "waiting for the first step"
    eq = " ".join(f"{pid} {float(v):,.2f}" for pid, v in seen.equity.items()) or "-"
    return f"[run {time.monotonic() - started:6.0f}s] {source}: step {step} (+{len(seen.new_steps)}), {feed}; equity {eq}"


async def show_status(seen: RunView, started: float, source: str, stream: IO[str]) -> None:
    """One line, redrawn in place on a terminal (never in CI or a pipe)."""
    try:
        while True:
            stream.write("\r\x1b[K" + status_line(seen, started, source))
            stream.flush()
            await asyncio.sleep(1.0)
    finally:
        stream.write("\r\x1b[K")
        stream.flush()


async def candles_drained(bootstrap: KafkaAccess, cfg: AppConfig) -> tuple[bool, str]:
    """Whether every consumer group of the namespace has processed md.candles to its end (lag 0 on every
    partition), the strategy group of every enabled profile among them; what is behind."""
    ns = cfg.system.kafka.namespace
    t = Topics(ns)
    report = await fetch_lag(bootstrap, ns)
    need = {t.group("strategy", pid) for pid in cfg.enabled_profiles()}
    behind: list[str] = []
    for g in report.groups:
        rows = [p for p in g.partitions if p.topic == t.candles]
        if not rows:
            continue
        need.discard(g.group)
        if len(rows) < cfg.system.kafka.candle_partitions or any(p.lag != 0 for p in rows):
            behind.append(
                f"{g.group}: " + ",".join(f"{p.partition}={'-' if p.lag is None else p.lag}" for p in rows)
            )
    behind += [f"{g}: no offsets yet" for g in sorted(need)]
    return not behind, "; ".join(behind)


async def run_pipeline(
    args: argparse.Namespace,
    cfg: AppConfig,
    settings: RunSettings,
    plan: StartPlan,
    *,
    endpoints: infra.Endpoints | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    started = time.monotonic()
    if endpoints is None:
        endpoints = await asyncio.to_thread(infra.resolve_endpoints, None, _progress)
    if plan.previous and plan.previous.get("kafka_bootstrap") not in (None, endpoints.kafka.servers):
        print(
            f"mpctl run: {args.out} ran on Kafka {plan.previous['kafka_bootstrap']}, this start would use "
            f"{endpoints.kafka.servers}; set KAFKA_BOOTSTRAP_SERVERS to the run's broker",
            file=sys.stderr,
        )
        return 1
    ns = plan.namespace
    cfg = with_namespace(cfg, ns)
    topics = Topics(ns)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    specs = await create_topics(endpoints, cfg, ns)
    base = await candle_end_offset(endpoints.kafka, topics.candles)
    starts = list((plan.previous or {}).get("starts", []))
    starts.append(datetime.now(UTC).isoformat(timespec="seconds"))
    extra = {
        "kind": "run",
        "mode": cfg.system.mode,
        "source": settings.source,
        "interval": settings.interval,
        "starts": starts,
    }
    if settings.source == "coinbase":
        extra.update(rest_url=settings.rest_url, ws_url=settings.ws_url)
    write_run_json(out, ns, endpoints, args.config, extra)
    say = "resuming" if plan.resumed else "new run"
    _progress(f"{say}: namespace {ns}, {len(specs)} topics on {endpoints.kafka}, Redis {endpoints.redis_url}")
    if cfg.system.mode == "live":
        print(
            f"system.mode: live: the execution workers send real orders to {args.exchange_api_base or 'Coinbase'}"
        )

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    seen = RunView()
    stack = Stack(bus=endpoints.bus)
    tasks: list[asyncio.Task[None]] = []
    outcome = "stopped"
    try:
        log_dir = start_services(
            stack,
            cfg,
            common_args(endpoints, ns, args.config, settings.source),
            out,
            ingest_args=ingest_args(settings),
            exchange_api_base=args.exchange_api_base,
            append_logs=plan.resumed,
            live=cfg.system.mode == "live",  # only reached with --live after the pre-flight (check_start)
        )
        _progress(f"started {len(stack.procs)} service processes; logs in {log_dir}")
        tasks.append(asyncio.create_task(watch_steps(endpoints.kafka, topics.candles, base, seen)))
        if progress_enabled():
            tasks.append(asyncio.create_task(watch_equity(endpoints.kafka, cfg, seen)))
            tasks.append(asyncio.create_task(show_status(seen, started, settings.source, sys.stderr)))
        outcome = await supervise(args, cfg, endpoints.kafka, stack, seen, stop, started)
    except (RuntimeError, TimeoutError) as err:
        print(f"run failed: {err}", file=sys.stderr)
        return 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        stack.stop()
    if seen.last_step is None and await candle_end_offset(endpoints.kafka, topics.candles) == 0:
        # Stopped before the market's first step reached the topic: no candle, so no run to report yet.
        print(
            f"{outcome} before the first step: nothing to report yet; topics of namespace {ns} kept: "
            f"`mpctl run --out {out}` resumes ({time.monotonic() - started:.1f} s)"
        )
        return 0
    _progress(f"{outcome}; collecting the run")
    summary = await collect(cfg, endpoints.kafka, out)
    print_table(summary)
    print(
        f"{outcome}: {len(seen.new_steps)} new step(s) this start, last {seen.last_step.isoformat() if seen.last_step else '-'}; "
        f"outputs in {out}; topics of namespace {ns} kept: `mpctl run --out {out}` resumes "
        f"({time.monotonic() - started:.1f} s)"
    )
    return 0


async def supervise(
    args: argparse.Namespace,
    cfg: AppConfig,
    bootstrap: KafkaAccess,
    stack: Stack,
    seen: RunView,
    stop: asyncio.Event,
    started: float,
) -> str:
    """Watch the run until it should stop; what stopped it. Raises when a service dies or --max-steps times out."""
    timeout: float | None = args.timeout
    while True:
        if stop.is_set():
            return "interrupted"
        err = dead_service_error(stack)
        if err is not None:
            raise err
        ingest = stack.get("ingest")
        if ingest is not None and ingest.popen.poll() == 0:
            _progress("the ingest finished (end of the replay)")
            break
        if args.max_steps is not None and len(seen.new_steps) >= args.max_steps:
            _progress(f"{len(seen.new_steps)} new steps published; stopping the ingest")
            stack.stop_one("ingest")
            break
        if timeout is not None and time.monotonic() - started > timeout:
            if args.max_steps is not None:
                raise TimeoutError(
                    f"{len(seen.new_steps)} of {args.max_steps} new steps after {timeout:.0f} s"
                )
            return f"stopped after --timeout {timeout:g} s"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    # Every step published is processed by every consumer group before the services stop.
    deadline = time.monotonic() + (
        max(10.0, timeout - (time.monotonic() - started)) if timeout is not None else DRAIN_TIMEOUT_S
    )
    why = ""
    while time.monotonic() < deadline:
        if stop.is_set():
            return "interrupted"
        err = dead_service_error(stack)
        if err is not None:
            raise err
        done, why = await candles_drained(bootstrap, cfg)
        if done:
            return "every step processed by every consumer group"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    raise TimeoutError(f"the consumer groups did not process every step in time: {why}")
