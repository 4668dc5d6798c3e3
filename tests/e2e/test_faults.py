"""Fault suite (DESIGN.md section 5, invariants 4 and 5): the demo's pipeline over a slice of the bundled data,
once uninterrupted, then once per fault: each kind of service SIGKILLed mid-run and started again with the
same arguments, the Kafka broker stopped and started again (same data dir, same port), Redis flushed and
restarted. After each, the run completes, the invariants hold (mpctl/invariants.py), no order is sent twice,
no fill is lost or counted twice, and the outputs (orders, fills, decisions, plans and the summary with every
profile's balances and positions) equal the uninterrupted run's byte for byte.

Each fault fires at a progress point of the run: a share of the baseline's records on orders.events (what
the fault run has published there, duplicates included), so it lands while the pipeline is trading; the
replay is paced so that every service is still at work then. Each run has its own namespace; the service
faults run PARALLEL at a time (most of a run is waiting: the replay's pace, a dead member's session), the
broker and Redis faults alone, last (they touch everything on the servers).

MPCTL_FAULTS=label,label runs only those faults (the others are skipped), for working on one.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from mpctl import commands_demo
from mpctl.commands_demo import Fault, Stack, demo_pipeline, sigkill_and_restart
from mpctl.infra import Endpoints, LocalInfra
from mpctl.invariants import check_run
from shared.broker_noise import LIBRARY_LOGGERS, is_connection_noise
from shared.config import load_config
from shared.kafka import delete_topics, read_topics
from shared.messages import Message, OrderFilled, OrderUpdated
from shared.topics import Topics, declared_topics
from tests.conftest import InfraSession

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "examples" / "three_profiles.yaml"
DATA = ROOT / "data" / "market"
HOURS = 240
# 240 hourly steps in about 12 s: the replay (and so every service) is still at work while orders flow.
SPEED = 72_000.0
RUN_TIMEOUT_S = 180.0
PARALLEL = 2
REDIS_DOWN_S = 3.0
COMPARED = ("orders.jsonl", "fills.jsonl", "decisions.jsonl", "plans.jsonl", "summary.json")
# What a service may log about the broker across its restart: the outage told in a few lines
# (shared/broker_noise.py) and the Kafka libraries' other news (a coordinator marked dead, a rejoin); unfiltered,
# each service would log several failed attempts a second for as long as the broker is away.
BROKER_LINES_MAX = 25
# A service log line: "<date> <time> <LEVEL> <service> <logger>: <message>" (shared.runtime.setup_logging).
LOG_LINE = re.compile(r"^\S+ \S+ [A-Z]+ \S+ ([\w.]+): (.*)$")

pytestmark = pytest.mark.timeout(900)  # the first test builds every run (module fixture); about 4 min idle


@dataclass(frozen=True)
class FaultCase:
    label: str
    share: float  # of the baseline's orders.events records (candle records for `on="candles"`) when it fires
    victim: str | None  # the stack process killed and restarted, if a service
    needs: str | None = None  # "kafka" / "redis": a server this session started itself
    # The ingest runs ahead of the pipeline (on a loaded machine by more than the whole replay), so its fault
    # follows the replay's own progress, the candle records, not the order events that trail it. So does the
    # paper execution worker's and the registry's: they follow the candles too and finish with the replay (a CI
    # run once killed the registry after its WorkerFinished, at 20 % of the order events), while the strategies'
    # order events may still trail far behind.
    on: str = "events"


# How each victim's WorkerFinished is named (a prefix): it must not have finished its work when killed.
FINISHER = {
    "execution.profile_a": "execution:profile_a",
    "strategy.profile_c": "strategy:profile_c",
    "arbiter": "arbiter:",
    "registry": "registry:",
    "ingest": "ingest:",
}

SERVICE_FAULTS = [
    FaultCase("kill-execution", 0.60, "execution.profile_a", on="candles"),
    FaultCase("kill-strategy", 0.35, "strategy.profile_c"),
    FaultCase("kill-arbiter", 0.45, "arbiter"),
    FaultCase("kill-registry", 0.20, "registry", on="candles"),
    FaultCase("kill-ingest", 0.30, "ingest", on="candles"),
    FaultCase("kill-monitor", 0.50, "monitor"),
]
CASES = [
    *SERVICE_FAULTS,
    FaultCase("restart-kafka", 0.40, None, needs="kafka"),
    # Redis serves the registry alone, which follows the candles: a flush timed on order events could land after
    # the registry's last claim (a CI run: the claims were all made, and nothing noticed the empty Redis).
    FaultCase("flush-and-restart-redis", 0.40, None, needs="redis", on="candles"),
]


@dataclass
class RunResult:
    out: Path
    rc: int
    stderr: str
    seconds: float
    stack_logs: Path
    # orders.decisions and orders.events as published, copies included
    events: list[Message] = field(default_factory=list)
    records: int = 0
    candle_records: int = 0  # on the candles topic (candles and watermarks)
    fault: Fault | None = None
    marks: dict[str, int] = field(default_factory=dict)  # service -> its log's size when the fault fired


def _args(out: Path, ns: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands_demo.register(parser.add_subparsers())
    return parser.parse_args(
        [
            "demo",
            "--config",
            str(CONFIG),
            "--data",
            str(DATA),
            "--out",
            str(out),
            "--hours",
            str(HOURS),
            "--speed",
            str(SPEED),
            "--timeout",
            str(RUN_TIMEOUT_S),
            "--namespace",
            ns,
            "--keep-topics",
        ]
    )


async def _run(
    endpoints: Endpoints, out: Path, ns: str, fault: Fault | None, marks: dict[str, int] | None = None
) -> RunResult:
    cfg = load_config(CONFIG)
    started = time.monotonic()
    err = io.StringIO()
    rc = await demo_pipeline(
        _args(out, ns), cfg, endpoints=endpoints, faults=[fault] if fault else [], errors=err
    )
    result = RunResult(
        out,
        rc,
        err.getvalue(),
        time.monotonic() - started,
        out / "logs",
        fault=fault,
        marks=marks if marks is not None else {},
    )
    t = Topics(ns)
    try:
        result.events, _ = await read_topics(endpoints.kafka, [t.decisions, t.events])
        candles, _ = await read_topics(endpoints.kafka, [t.candles])
        result.candle_records = len(candles)
    finally:
        await delete_topics(endpoints.kafka, [s.name for s in declared_topics(cfg, ns)])
    result.records = len(result.events)
    return result


def _action(case: FaultCase, local: LocalInfra | None, marks: dict[str, int]) -> commands_demo.FaultAction:
    """The fault's harm; first notes how far each service's log got (`marks`), to read what came after."""
    kill = sigkill_and_restart(case.victim) if case.victim is not None else None

    async def act(stack: Stack) -> str:
        marks.update({p.name: p.log.stat().st_size for p in stack.procs})
        if kill is not None:
            return await kill(stack)
        assert local is not None and case.needs is not None
        t0 = time.monotonic()
        before = local.status()[case.needs]["pid"]
        # On this (the main) thread, blocking the loop meanwhile: the new server's parent-death signal follows
        # the thread that starts it, and a worker thread's end would stop it (LocalInfra(detach=False)).
        if case.needs == "kafka":
            local.restart_kafka()
        else:
            # Down long enough that the registry's next Redis command surely meets the closed port.
            local.restart_redis(flush=True, down_s=REDIS_DOWN_S)
        after = local.status()[case.needs]["pid"]
        if after is None or after == before:
            raise RuntimeError(f"{case.needs} was not restarted: pid {before} before, {after} after")
        return f"{case.needs} pid {before} stopped, pid {after} ready {time.monotonic() - t0:.1f} s later"

    return act


def _after_fault(r: RunResult, service: str) -> str:
    """What the service logged after the fault fired."""
    with (r.stack_logs / f"{service}.log").open("rb") as fh:
        fh.seek(r.marks.get(service, 0))
        return fh.read().decode(errors="replace")


def _broker_lines(r: RunResult) -> dict[str, list[tuple[str, str]]]:
    """Per service, (logger, message) of what it logged after the fault from the Kafka libraries' loggers or
    about a broker outage (shared.broker_noise)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name in r.marks:
        found = (LOG_LINE.match(line) for line in _after_fault(r, name).splitlines())
        out[name] = [
            (m[1], m[2])
            for m in found
            if m is not None and (m[1].split(".")[0] in LIBRARY_LOGGERS or m[1] == "shared.broker_noise")
        ]
    return out


def _skip_reason(case: FaultCase, session: InfraSession) -> str | None:
    if case.needs == "kafka" and os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return "KAFKA_BOOTSTRAP_SERVERS points at an external broker: this suite restarts only a broker it started"
    if case.needs == "redis" and os.environ.get("REDIS_URL"):
        return (
            "REDIS_URL points at an external Redis: this suite flushes and restarts only a Redis it started"
        )
    if case.needs and session.local is None:
        return f"{case.needs} runs in a container here, not under LocalInfra: no restart available"
    only = [x.strip() for x in os.environ.get("MPCTL_FAULTS", "").split(",") if x.strip()]
    if only and case.label not in only:
        return f"MPCTL_FAULTS={','.join(only)}"
    return None


@dataclass
class Runs:
    baseline: RunResult
    faults: dict[str, RunResult]
    skipped: dict[str, str]


@pytest.fixture(scope="module")
def runs(infra_session: InfraSession, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    tmp = tmp_path_factory.mktemp("faults")
    endpoints = infra_session.endpoints
    tag = f"f{os.getpid()}{int(time.time()) % 100000}"

    async def all_runs() -> Runs:
        baseline = await _run(endpoints, tmp / "baseline", f"{tag}base", None)
        assert baseline.rc == 0, f"the uninterrupted run failed:\n{baseline.stderr}"
        done: dict[str, RunResult] = {}
        skipped = {c.label: r for c in CASES if (r := _skip_reason(c, infra_session))}
        slots = asyncio.Semaphore(PARALLEL)

        async def one(case: FaultCase) -> None:
            marks: dict[str, int] = {}
            action = _action(case, infra_session.local, marks)
            if case.on == "candles":
                fault = Fault(
                    case.label, 0, action, after_candles=max(1, int(baseline.candle_records * case.share))
                )
            else:
                fault = Fault(case.label, max(1, int(baseline.records * case.share)), action)
            async with slots:
                done[case.label] = await _run(
                    endpoints, tmp / case.label, f"{tag}{case.label.replace('-', '')}", fault, marks
                )

        await asyncio.gather(*(one(c) for c in CASES if c.victim and c.label not in skipped))
        for case in CASES:
            if not case.victim and case.label not in skipped:
                await one(case)
        return Runs(baseline, done, skipped)

    yield asyncio.run(all_runs())


def test_restarted_servers_still_run_after_the_fault_runs(runs: Runs, infra_session: InfraSession) -> None:
    """The later tests of the session use the same broker and Redis: the restarted ones must have stayed up."""
    restarted = [c.needs for c in CASES if c.needs and c.label in runs.faults]
    if not restarted or infra_session.local is None:
        pytest.skip("no server was restarted in this session")
    status = infra_session.local.status()
    assert all(status[name]["state"] == "running" for name in restarted), status
    client = redis.Redis.from_url(
        infra_session.endpoints.redis_url, socket_timeout=5, **infra_session.endpoints.redis_credentials()
    )
    try:
        assert client.ping()
    finally:
        client.close()


def _faulted(runs: Runs, label: str) -> RunResult:
    if label in runs.skipped:
        pytest.skip(runs.skipped[label])
    r = runs.faults[label]
    assert r.rc == 0, f"the run with fault {label} did not complete:\n{r.stderr[-3000:]}"
    return r


def _audit_entries(path: Path) -> Counter[str]:
    """(type, id) of each complete line of an audit file (a line torn by a SIGKILL is not a message)."""
    out: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        out[f"{d['type']}:{d['id']}"] += 1
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


LABELS = [pytest.param(c.label, id=c.label) for c in CASES]
VICTIMS = {c.label: c.victim for c in CASES}


# ------------------------------------------------------------------------------------------ the tests
def test_uninterrupted_run_trades_and_keeps_the_invariants(runs: Runs) -> None:
    b = runs.baseline
    check = check_run(b.out)
    assert check.ok, check.violations
    fills = _jsonl(b.out / "fills.jsonl")
    assert len({f["profile"] for f in fills}) >= 2, "too few profiles traded for the comparison to prove much"
    assert b.records >= 20, f"only {b.records} order events: the faults would have no middle to land in"


@pytest.mark.parametrize("label", LABELS)
def test_fault_lands_mid_run_and_the_run_completes(runs: Runs, label: str) -> None:
    r = _faulted(runs, label)
    f = r.fault
    assert f is not None and f.fired_after is not None, f
    # Mid-run: orders were flowing before it and after it (the baseline's count, since a restart republishes).
    assert f.fired_after >= f.after_order_events
    assert f.fired_after < runs.baseline.records, (f.fired_after, runs.baseline.records)
    assert f.fired_after_candles is not None and f.fired_after_candles >= f.after_candles
    victim = VICTIMS[label]
    if victim in FINISHER:
        early = [x for x in f.finished_before if x.startswith(FINISHER[victim])]
        assert not early, f"{victim} had finished its work before the kill: {early}"
    if victim is not None:
        after = _after_fault(r, victim)
        assert after.lstrip().startswith("--- SIGKILLed by fault injection"), after[:2000]
        if victim == "ingest":
            # Killed mid-replay: the restarted ingest resumed after the last step on md.candles.
            assert "resuming after step" in after, after[-2000:]
    if victim == "monitor":
        # The restarted monitor re-read audit.log from its start: its file holds each message once, all of them.
        got, want = _audit_entries(r.out / "audit.jsonl"), _audit_entries(runs.baseline.out / "audit.jsonl")
        twice = [k for k, n in got.items() if n > 1]
        assert not twice, f"audit lines written twice: {twice[:5]}"
        assert len(got) == len(want), (len(got), len(want))
    if label == "flush-and-restart-redis":
        # The registry noticed the empty Redis and rebuilt its claims from the plans topic, plans included.
        rebuilt = re.findall(r"rebuilt the claim set from (\d+) plan", _after_fault(r, "registry"))
        assert rebuilt and int(rebuilt[-1]) > 0, _after_fault(r, "registry")[-3000:]
    if label == "restart-kafka":
        for name, lines in _broker_lines(r).items():
            noise = [line for logger, line in lines if is_connection_noise(logger, line)]
            assert not noise, f"{name} logged connection errors one by one: {noise[:5]}"
            assert len(lines) <= BROKER_LINES_MAX, (
                f"{name}: {len(lines)} lines about the broker: {lines[:40]}"
            )
    # No service met an error it did not survive (a crash would also have failed the run).
    for name in r.marks:
        assert "Traceback" not in _after_fault(r, name), f"{name}:\n{_after_fault(r, name)[-3000:]}"


@pytest.mark.parametrize("label", LABELS)
def test_invariants_hold_after_the_fault(runs: Runs, label: str) -> None:
    r = _faulted(runs, label)
    check = check_run(r.out)
    assert check.ok, "\n".join(f"[{v.check}] {v.message}" for v in check.violations)
    assert check.checked["orders sent"] > 0


@pytest.mark.parametrize("label", LABELS)
def test_no_order_sent_twice_and_no_fill_lost_or_counted_twice(runs: Runs, label: str) -> None:
    """On the raw topic, copies included: a republished event repeats its id (consumers drop it); a second
    `submitted` or a fill under a new id for one client order id would be a second order or a double count."""
    r = _faulted(runs, label)
    submitted: dict[str, set[str]] = defaultdict(set)
    sizes: dict[str, Decimal] = {}
    fills: dict[str, dict[str, Decimal]] = defaultdict(dict)
    for m in r.events:
        if isinstance(m, OrderUpdated) and m.status == "submitted":
            submitted[m.client_order_id].add(m.id)
            sizes[m.client_order_id] = m.size
        elif isinstance(m, OrderFilled):
            fills[m.client_order_id][m.fill_id] = m.size
    twice = {c: ids for c, ids in submitted.items() if len(ids) != 1}
    assert not twice, f"orders submitted under several event ids: {twice}"
    over = {c: sum(f.values()) for c, f in fills.items() if sum(f.values()) > sizes.get(c, Decimal(0))}
    assert not over, f"filled beyond the order size (double-counted fills): {over}"
    base_fills = {
        (m.client_order_id, m.fill_id, m.size, m.price)
        for m in runs.baseline.events
        if isinstance(m, OrderFilled)
    }
    got_fills = {
        (m.client_order_id, m.fill_id, m.size, m.price) for m in r.events if isinstance(m, OrderFilled)
    }
    assert got_fills == base_fills, f"lost {base_fills - got_fills}, extra {got_fills - base_fills}"


@pytest.mark.parametrize("label", LABELS)
def test_final_books_equal_the_uninterrupted_run(runs: Runs, label: str) -> None:
    r = _faulted(runs, label)
    for name in COMPARED:
        got, want = (r.out / name).read_bytes(), (runs.baseline.out / name).read_bytes()
        if name == "summary.json" and got != want:
            g, w = json.loads(got), json.loads(want)
            diff = {
                pid: (g["profiles"].get(pid), p)
                for pid, p in w["profiles"].items()
                if g["profiles"].get(pid) != p
            }
            raise AssertionError(
                f"summary differs; profiles (fault, baseline): {diff}; counters "
                f"{g['counters']} vs {w['counters']}"
            )
        assert got == want, f"{name} differs from the uninterrupted run's"


def test_fault_figures_for_the_report(runs: Runs) -> None:
    """Prints what each fault met (`pytest -s` shows it); asserts only that the faults that ran fired."""

    def figures(r: RunResult) -> dict[str, Any]:
        ids = {f"{type(m).__name__}:{m.id}" for m in r.events}
        orders = _jsonl(r.out / "orders.jsonl") if (r.out / "orders.jsonl").exists() else []
        same = [
            n
            for n in COMPARED
            if (r.out / n).exists() and (r.out / n).read_bytes() == (runs.baseline.out / n).read_bytes()
        ]
        return {
            "rc": r.rc,
            "seconds": round(r.seconds, 1),
            "events_records": r.records,
            "republished_copies": r.records - len(ids),
            "orders_submitted": sum(1 for o in orders if o["status"] == "submitted"),
            "fills": len({m.fill_id for m in r.events if isinstance(m, OrderFilled)}),
            "files_equal_to_baseline": len(same),
            "broker_lines_after_fault": {k: len(v) for k, v in _broker_lines(r).items() if v},
            "fault": None
            if r.fault is None
            else {
                "after": r.fault.after_order_events,
                "fired_after": r.fault.fired_after,
                "at_s": r.fault.fired_at_s and round(r.fault.fired_at_s, 1),
                "outcome": r.fault.outcome,
                "finished_before": r.fault.finished_before,
            },
        }

    print(
        json.dumps(
            {
                "baseline": figures(runs.baseline),
                **{k: figures(v) for k, v in runs.faults.items()},
                "skipped": runs.skipped,
            },
            indent=2,
        )
    )
    assert all(
        r.fault is not None and r.fault.fired_after is not None for r in runs.faults.values() if r.rc == 0
    )
