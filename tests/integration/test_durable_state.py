"""Runs that outlive retention: the stateful services (strategy workers, paper execution, arbiter) stopped in
the middle of a replay, every input record their snapshots cover deleted from the topics (what retention
does to a run longer than 7 days), the services started again: the run's books, orders, fills, decisions and
halts equal those of an uninterrupted run (docs/architecture.md, "Durable state").

Without the snapshots the restarted services would rebuild from what is left of the topics, and the outputs
would differ (the strategy would start with its initial cash and no position, the paper exchange would not
know its orders). Every service takes `--source replay`, as in tests/integration/test_strategy_restart.py.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from mpctl.commands_demo import Stack, expected_finishers, wait_finished
from mpctl.infra import Endpoints
from services.monitor.collect import write_outputs
from services.monitor.domain import RunData
from services.strategy.bootstrap import input_topics
from shared.codec import DecodeError, decode
from shared.config import AppConfig
from shared.kafka import delete_topics, read_topics
from shared.messages import Message, OrderFilled, StepCompleted
from shared.topics import Topics, declared_topics
from tests.bus import create_namespace
from tests.integration.test_strategy_restart import CONFIG, DATA, _config

HOURS = 360
SPEED = 90_000.0  # 40 ms of replay per hourly step
STOP_AFTER_STEPS = 120
STOP_AFTER_FILLS = 4
SNAPSHOT_INTERVAL_S = 1.0
# Stopped with SIGKILL (they resume from their last periodic snapshot); the others with SIGTERM (final one).
KILLED = ("strategy.profile_a", "execution.profile_b")
FILES = ("orders.jsonl", "fills.jsonl", "decisions.jsonl", "plans.jsonl", "summary.json")


def _config_file(out: Path) -> Path:
    """The three-profile example with a snapshot every second: the stop finds periodic snapshots too."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw.setdefault("system", {})["state"] = {"snapshot_interval_s": SNAPSHOT_INTERVAL_S}
    path = out / "profiles.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _common(endpoints: Endpoints, ns: str, config: Path) -> list[str]:
    return [
        "--bootstrap",
        endpoints.kafka.servers,
        "--redis-url",
        endpoints.redis_url,
        "--source",
        "replay",
        "--namespace",
        ns,
        "--config",
        str(config),
    ]


def _stateful(cfg: AppConfig, common: list[str]) -> list[tuple[str, list[str]]]:
    out = [("arbiter", ["services.arbiter", *common])]
    for pid in cfg.enabled_profiles():
        out.append((f"execution.{pid}", ["services.execution", *common, "--profile", pid]))
        out.append((f"strategy.{pid}", ["services.strategy", *common, "--profile", pid]))
    return out


async def _wait_progress(bootstrap: str, cfg: AppConfig, steps: int, fills: int) -> None:
    """Until every profile has completed `steps` steps (markers on intents partition 0) and `fills` fills are
    out: the books the restart must keep are not empty."""
    t = Topics(cfg.system.kafka.namespace)
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t.intents, 0), TopicPartition(t.events, 0)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        done = {pid: 0 for pid in cfg.enabled_profiles()}
        filled = 0
        deadline = time.monotonic() + 90
        while min(done.values()) < steps or filled < fills:
            assert time.monotonic() < deadline, f"steps completed: {done}, fills {filled}"
            for recs in (await consumer.getmany(*tps, timeout_ms=200)).values():
                for rec in recs:
                    try:
                        msg = decode(rec.value)
                    except DecodeError:
                        continue
                    if isinstance(msg, StepCompleted) and not msg.final and rec.topic == t.intents:
                        done[msg.profile] += 1
                    elif isinstance(msg, OrderFilled):
                        filled += 1
    finally:
        await consumer.stop()


async def _snapshot_headers(bootstrap: str, topics: list[str]) -> dict[str, dict[str, Any]]:
    """The header of the last snapshot on each state topic (JSON after the MAC: readable without the key)."""
    consumer = AIOKafkaConsumer(
        **bootstrap.client_options(),
        enable_auto_commit=False,
        max_partition_fetch_bytes=64 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    await consumer.start()
    out: dict[str, dict[str, Any]] = {}
    try:
        for topic in topics:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            end = (await consumer.end_offsets([tp]))[tp]
            assert end > 0, f"no snapshot on {topic}"
            consumer.seek(tp, end - 1)
            value = None
            while value is None:
                for recs in (await consumer.getmany(tp, timeout_ms=1000)).values():
                    value = recs[-1].value
            assert value is not None
            (n,) = struct.unpack(">I", value[36:40])
            out[topic] = orjson.loads(value[40 : 40 + n]) | {"bytes": len(value)}
    finally:
        await consumer.stop()
    return out


async def _delete_covered(
    bootstrap: str, cfg: AppConfig, headers: dict[str, dict[str, Any]]
) -> dict[str, int]:
    """Delete, on every non-compacted input partition, the records every snapshot reading it covers."""
    compacted = {s.name for s in declared_topics(cfg) if s.compacted}
    covered: dict[tuple[str, int], int] = {}
    for head in headers.values():
        for topic, part, offset in head["positions"]:
            key = (topic, part)
            covered[key] = min(covered.get(key, offset), offset)
    targets = {TopicPartition(t, p): off for (t, p), off in covered.items() if t not in compacted and off > 0}
    admin = AIOKafkaAdminClient(**bootstrap.client_options())
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(off) for tp, off in targets.items()})
    finally:
        await admin.close()
    return {f"{tp.topic}[{tp.partition}]": off for tp, off in targets.items()}


async def _begins(bootstrap: str, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        return dict(await consumer.beginning_offsets(tps))
    finally:
        await consumer.stop()


async def _run(endpoints: Endpoints, out: Path, ns: str, *, interrupt: bool) -> dict[str, Any]:
    cfg = _config(ns)
    t = Topics(ns)
    specs = declared_topics(cfg, ns)
    await create_namespace(endpoints.kafka, cfg, ns)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True)
    common = _common(endpoints, ns, _config_file(out))
    replay = ["--data", str(DATA), "--hours", str(HOURS), "--speed", str(SPEED if interrupt else 0.0)]
    stack = Stack(bus=endpoints.bus)
    started = time.monotonic()
    info: dict[str, Any] = {}
    collected = [t.candles, t.audit, t.intents, t.events, t.decisions]
    before: list[Message] = []
    try:
        stack.start("registry", ["services.registry", *common], log_dir)
        for name, args in _stateful(cfg, common):
            stack.start(name, args, log_dir)
        stack.start("ingest", ["services.ingest", *common, *replay], log_dir)
        if interrupt:
            await _wait_progress(endpoints.kafka, cfg, STOP_AFTER_STEPS, STOP_AFTER_FILLS)
            names = {name for name, _ in _stateful(cfg, common)}
            victims = [p for p in stack.procs if p.name in names]
            for p in victims:
                os.kill(p.popen.pid, signal.SIGKILL if p.name in KILLED else signal.SIGTERM)
            for p in victims:
                code = p.popen.wait(timeout=30)
                assert code == (-signal.SIGKILL if p.name in KILLED else 0), f"{p.name} exited with {code}"
                p.fh.close()
                stack.procs.remove(p)
            # What the stopped services wrote, before it is deleted: the report is built from all of it.
            before, _ = await read_topics(endpoints.kafka, collected)
            state_topics = [t.state("arbiter")] + [
                t.state(s, pid) for pid in cfg.enabled_profiles() for s in ("strategy", "execution")
            ]
            headers = await _snapshot_headers(endpoints.kafka, state_topics)
            info["snapshot_bytes"] = {k: h["bytes"] for k, h in headers.items()}
            info["positions"] = {k: h["positions"] for k, h in headers.items()}
            info["deleted"] = await _delete_covered(endpoints.kafka, cfg, headers)
            probe = [TopicPartition(tp, 0) for tp in (t.candles, t.events)]
            info["begins"] = {tp.topic: off for tp, off in (await _begins(endpoints.kafka, probe)).items()}
            for name, args in _stateful(cfg, common):
                stack.start(f"{name}.restarted", args, log_dir)
        await wait_finished(endpoints.kafka, t.status, expected_finishers(cfg), stack, 240, started)
    finally:
        stack.stop()
    after, _ = await read_topics(endpoints.kafka, collected)
    data = RunData()
    data.add_all(before + after)
    write_outputs(cfg, data, out)
    info["restored"] = [
        p.name for p in log_dir.glob("*.restarted.log") if b"restored the snapshot" in p.read_bytes()
    ]
    await delete_topics(endpoints.kafka, [s.name for s in specs])
    info["seconds"] = time.monotonic() - started
    return info


@pytest.mark.timeout(300)
async def test_restart_after_retention_deleted_the_inputs_gives_the_uninterrupted_run(
    infra: Endpoints, tmp_path: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPCTL_STATE_KEY", "durable-state-test-key-0123456789")
    whole = await _run(infra, tmp_path / "whole", f"{namespace}w", interrupt=False)
    cut = await _run(infra, tmp_path / "cut", f"{namespace}c", interrupt=True)
    cfg = _config(f"{namespace}c")
    t = Topics(cfg.system.kafka.namespace)

    # Retention's work was done: the inputs the stopped services had read are gone from the topics.
    assert cut["begins"][t.candles] > 0 and cut["begins"][t.events] > 0, (cut["begins"], cut["positions"])
    assert set(input_topics(t)) - {t.plans} >= {k.rsplit("[", 1)[0] for k in cut["deleted"]} - {t.intents} - {
        t.approved(p) for p in cfg.profiles
    }
    for name in FILES:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # Every restarted service resumed from its snapshot.
    assert len(cut["restored"]) == 1 + 2 * len(cfg.enabled_profiles()), cut["restored"]
    summary = orjson.loads((tmp_path / "whole" / "summary.json").read_bytes())
    assert summary, "the run reports"
    print(
        f"whole {whole['seconds']:.1f} s, interrupted {cut['seconds']:.1f} s, snapshots {cut['snapshot_bytes']}"
    )


@pytest.mark.timeout(120)
async def test_monitor_keeps_its_numbers_after_retention_deleted_its_inputs(
    infra: Endpoints, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from services.monitor.bootstrap import MonitorOptions, MonitorService
    from shared.runtime import ServiceSettings
    from tests.integration.ops_stack import TEMPLATE, create_topics, eventually, ns_config, publish
    from tests.unit.builders import HOUR, T0, approval_of, candle, order_filled

    monkeypatch.setenv("MPCTL_STATE_KEY", "durable-state-test-key-0123456789")
    b = infra.kafka
    cfg = ns_config(namespace)
    await create_topics(b, cfg)
    t = Topics(namespace)
    fills = [
        order_filled("profile_a", "buy", size="1", price="100", fee="0.6", at=T0 + 60),
        order_filled("profile_a", "sell", size="1", price="110", fee="0.6", at=T0 + HOUR + 60),
    ]
    await publish(
        b,
        # Approved by the arbiter: the monitor books only verified fills (shared/book.py).
        [(t.decisions, approval_of(f), "profile_a") for f in fills]
        + [(t.events, f, "profile_a") for f in fills]
        + [(t.candles, candle("BTC/USDC", T0 + i * HOUR, open=100, close=105 + i), None) for i in range(2)],
    )

    async def run_monitor() -> dict[str, Any]:
        settings = ServiceSettings(
            config_path=TEMPLATE,
            kafka=b,
            namespace=namespace,
            redis_url=infra.redis_url,
        )
        svc = MonitorService(cfg, settings, MonitorOptions(audit_file=tmp_path / "audit.jsonl", drain=True))
        assert await asyncio.wait_for(svc.run(asyncio.Event()), 60) == 0
        return svc.tracker.profile_view("profile_a")

    first = await run_monitor()
    assert first["trades"] == 2, first
    # Retention deletes everything the monitor read; a restart keeps the numbers.
    targets = {
        TopicPartition(t.events, 0): 2,
        TopicPartition(t.decisions, 0): 2,
        TopicPartition(t.candles, 0): 2,
    }
    admin = AIOKafkaAdminClient(**b.client_options())
    await admin.start()
    try:
        await admin.delete_records({tp: RecordsToDelete(off) for tp, off in targets.items()})
    finally:
        await admin.close()

    async def deleted() -> bool:
        return await _begins(b, list(targets)) == targets

    await eventually(deleted, what="records deleted")
    assert await run_monitor() == first
    await delete_topics(b, [s.name for s in declared_topics(cfg)])
