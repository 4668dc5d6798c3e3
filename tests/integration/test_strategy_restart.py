"""A strategy worker killed with SIGKILL in the middle of a replay and started again: the run's orders equal
those of an uninterrupted run on the same data. Same intents (ids and content), no order sent twice, none
missing. The restarted worker rebuilds its state by reading its inputs from the beginning (docs/backtest.md,
"State that survives a crash"); what it sends again carries the first run's ids, which downstream ignores.

Both runs are the demo's pipeline (every service in its own process, real Kafka and Redis), each in its own
namespace; the interrupted one replays slowly enough to be killed mid-way.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from mpctl.commands_demo import Stack, expected_finishers, wait_finished
from mpctl.infra import Endpoints
from services.monitor.collect import collect_run
from shared.codec import DecodeError, decode
from shared.config import AppConfig, load_config
from shared.kafka import delete_topics, read_topics
from shared.messages import OrderUpdated, PlaceOrder, StepCompleted
from shared.topics import Topics, declared_topics
from tests.bus import create_namespace

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "examples" / "three_profiles.yaml"
DATA = ROOT / "data" / "market"
HOURS = 360
VICTIM = "profile_a"
KILL_AFTER_STEPS = 120  # the victim's completed steps before the kill (of HOURS)
SPEED = 90_000.0  # 40 ms of replay per hourly step: the victim is killed while the replay still runs


def _config(ns: str) -> AppConfig:
    cfg = load_config(CONFIG)
    kafka = cfg.system.kafka.model_copy(update={"namespace": ns})
    return cfg.model_copy(update={"system": cfg.system.model_copy(update={"kafka": kafka})})


async def _kill_mid_replay(
    endpoints: Endpoints, cfg: AppConfig, stack: Stack, log_dir: Path, args: list[str]
) -> int:
    """SIGKILL the victim's strategy worker once it completed KILL_AFTER_STEPS steps (with an intent among
    them), start it again; returns how many steps it had completed."""
    t = Topics(cfg.system.kafka.namespace)
    consumer = AIOKafkaConsumer(**endpoints.kafka.client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(t.intents, 0)  # step markers go to every partition; intents to theirs
        tps = [TopicPartition(t.intents, p) for p in range(cfg.system.kafka.intent_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        steps, intents = 0, 0
        deadline = time.monotonic() + 60
        while steps < KILL_AFTER_STEPS or not intents:
            assert time.monotonic() < deadline, f"the victim completed only {steps} steps, {intents} intents"
            batch = await consumer.getmany(timeout_ms=200)
            for part, recs in batch.items():
                for rec in recs:
                    try:
                        msg = decode(rec.value)
                    except DecodeError:
                        continue
                    if getattr(msg, "profile", None) != VICTIM:
                        continue
                    if isinstance(msg, StepCompleted) and part == tp and not msg.final:
                        steps += 1
                    elif isinstance(msg, PlaceOrder):
                        intents += 1
    finally:
        await consumer.stop()
    victim = next(p for p in stack.procs if p.name == f"strategy.{VICTIM}")
    os.kill(victim.popen.pid, signal.SIGKILL)
    victim.popen.wait()
    victim.fh.close()
    stack.procs.remove(victim)  # a process killed on purpose is not a failed service
    stack.start(f"strategy.{VICTIM}.restarted", ["services.strategy", *args, "--profile", VICTIM], log_dir)
    return steps


async def _run(endpoints: Endpoints, out: Path, ns: str, *, kill: bool) -> dict[str, Any]:
    cfg = _config(ns)
    t = Topics(ns)
    specs = declared_topics(cfg, ns)
    await create_namespace(endpoints.kafka, cfg, ns)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True)
    common = [
        "--bootstrap",
        endpoints.kafka.servers,
        "--redis-url",
        endpoints.redis_url,
        "--source",
        "replay",
        "--namespace",
        ns,
        "--config",
        str(CONFIG),
    ]
    replay = ["--data", str(DATA), "--hours", str(HOURS), "--speed", str(SPEED if kill else 0.0)]
    stack = Stack(bus=endpoints.bus)
    started = time.monotonic()
    killed_at = None
    try:
        stack.start("registry", ["services.registry", *common], log_dir)
        stack.start("arbiter", ["services.arbiter", *common], log_dir)
        for pid in cfg.enabled_profiles():
            stack.start(f"execution.{pid}", ["services.execution", *common, "--profile", pid], log_dir)
            stack.start(f"strategy.{pid}", ["services.strategy", *common, "--profile", pid], log_dir)
        stack.start("ingest", ["services.ingest", *common, *replay], log_dir)
        if kill:
            killed_at = await _kill_mid_replay(endpoints, cfg, stack, log_dir, common)
        await wait_finished(endpoints.kafka, t.status, expected_finishers(cfg), stack, 240, started)
    finally:
        stack.stop()
    await collect_run(cfg, endpoints.kafka, out)
    raw, _ = await read_topics(endpoints.kafka, [t.intents, t.events])
    await delete_topics(endpoints.kafka, [s.name for s in specs])
    return {"raw": raw, "killed_at": killed_at, "seconds": time.monotonic() - started}


@pytest.mark.timeout(300)
async def test_strategy_killed_mid_replay_gives_the_orders_of_an_uninterrupted_run(
    infra: Endpoints, tmp_path: Path, namespace: str
) -> None:
    whole = await _run(infra, tmp_path / "whole", f"{namespace}w", kill=False)
    broken = await _run(infra, tmp_path / "killed", f"{namespace}k", kill=True)
    assert broken["killed_at"] is not None and broken["killed_at"] < HOURS, (
        "killed before the end of the replay"
    )

    # The output files (orders, fills, decisions, plans, summary) are identical.
    for name in ("orders.jsonl", "fills.jsonl", "decisions.jsonl", "plans.jsonl", "summary.json"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name

    # Same intents, by id and content; the restarted worker sent the victim's early ones again (same ids).
    def intents(raw: list[Any]) -> dict[str, dict[str, Any]]:
        return {m.intent_id: m.model_dump(mode="json") for m in raw if isinstance(m, PlaceOrder)}

    assert intents(broken["raw"]) == intents(whole["raw"])
    assert any(i["profile"] == VICTIM for i in intents(whole["raw"]).values())
    sent = Counter(m.intent_id for m in broken["raw"] if isinstance(m, PlaceOrder) and m.profile == VICTIM)
    assert max(sent.values()) >= 2, "the rebuild re-sent the intents evaluated before the kill"
    markers = Counter(
        int(m.step_time.timestamp())
        for m in broken["raw"]
        if isinstance(m, StepCompleted) and m.profile == VICTIM
    )
    assert max(markers.values()) > min(markers.values()), "steps before the kill were marked again"

    # No order sent twice, none missing: one `submitted` per client order id, the same ids as the whole run.
    def submitted(raw: list[Any]) -> Counter[str]:
        return Counter(
            m.client_order_id for m in raw if isinstance(m, OrderUpdated) and m.status == "submitted"
        )

    assert submitted(broken["raw"]) == submitted(whole["raw"])
    assert set(submitted(broken["raw"]).values()) == {1}


def test_restart_test_parameters_leave_time_to_kill() -> None:
    assert KILL_AFTER_STEPS < HOURS / 2
    assert 3600 / SPEED * (HOURS - KILL_AFTER_STEPS) > 5  # seconds of replay left when the victim dies
