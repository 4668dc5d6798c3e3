"""Heartbeats (issue 7, status): real service processes beat on the namespace's heartbeat topic; `mpctl status`
shows the registry (which joins no consumer group) up while it runs, down once it is killed and its beats are
older than the threshold, and a cleanly stopped arbiter down at once."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mpctl import commands_ops
from mpctl.infra import Endpoints
from services.monitor.health import ServiceHealth, fetch_health
from shared.bus import KafkaAccess
from shared.heartbeat import INTERVAL_ENV
from tests.bus import service_env
from tests.integration.ops_stack import TEMPLATE, create_topics, eventually, ns_config

ROOT = Path(__file__).resolve().parents[2]
BEAT_S = 0.3
# Judged with thresholds far above the interval: on a loaded CI machine a process may stall for seconds, and
# "up" must not flicker to "down" there; "down" is then awaited, not assumed.
UP_THRESHOLD_S = 15.0
DOWN_THRESHOLD_S = 2.0


def _start(module: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    bus = service_env(KafkaAccess(servers=args[args.index("--bootstrap") + 1]), [module, *args])
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{INTERVAL_ENV: str(BEAT_S)}, **bus)
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


async def _health(b: str, ns: str, threshold_s: float) -> dict[str, ServiceHealth]:
    return {h.name: h for h in await fetch_health(b, ns_config(ns), ns, threshold_s=threshold_s)}


@pytest.mark.timeout(120)
async def test_registry_and_arbiter_up_by_heartbeat_then_down_when_killed_or_stopped(
    infra: Endpoints, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = infra.kafka
    await create_topics(b, ns_config(namespace))
    common = [
        "--bootstrap",
        b.servers,
        "--redis-url",
        infra.redis_url,
        "--namespace",
        namespace,
        "--config",
        str(TEMPLATE),
        "--source",
        "replay",
    ]
    registry = _start("services.registry", common, tmp_path / "registry.log")
    arbiter = _start("services.arbiter", common, tmp_path / "arbiter.log")
    try:

        async def both_up() -> bool:
            h = await _health(b, namespace, UP_THRESHOLD_S)
            return h["registry"].state == "up" and h["arbiter"].state == "up"

        await eventually(both_up, what="registry and arbiter up by heartbeat")
        h = await _health(b, namespace, UP_THRESHOLD_S)
        assert h["registry"].beat_age_s is not None and h["registry"].instances_up == 1
        assert h["ingest"].state == "not-observable"  # never started: no beat, no group

        parser = argparse.ArgumentParser()
        commands_ops.register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(
            [
                "status",
                "--namespace",
                namespace,
                "--bootstrap",
                b.servers,
                "--config",
                str(TEMPLATE),
                "--heartbeat-timeout",
                str(UP_THRESHOLD_S),
            ]
        )
        for _ in range(20):  # a fresh broker may answer GroupLoadInProgress while it loads the offsets topic
            if await asyncio.to_thread(args.handler, args) == 0:
                break
            await asyncio.sleep(0.5)
        out = capsys.readouterr().out
        print(out)  # an example for the docs (pytest -s)
        row = next(ln.split() for ln in out.splitlines() if ln.startswith("registry "))
        assert row[1] == "up" and row[2].endswith("s") and "LAST BEAT" in out

        registry.send_signal(signal.SIGKILL)
        registry.wait(10)
        arbiter.send_signal(signal.SIGTERM)
        arbiter.wait(20)

        async def both_down() -> bool:
            h = await _health(b, namespace, DOWN_THRESHOLD_S)
            return h["registry"].state == "down" and h["arbiter"].state == "down"

        await eventually(both_down, what="registry and arbiter down")
        h = await _health(b, namespace, DOWN_THRESHOLD_S)
        assert h["registry"].beat_age_s is not None and h["registry"].beat_age_s > DOWN_THRESHOLD_S
        assert h["registry"].note.startswith("no beat for")
        assert h["arbiter"].note.startswith("stopped cleanly")
    finally:
        for proc in (registry, arbiter):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
