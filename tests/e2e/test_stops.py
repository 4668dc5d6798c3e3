"""Stopping a run from outside (issue #19, item 4): SIGTERM and SIGHUP stop `mpctl demo` and `mpctl run` as Ctrl-C
does, and SIGKILL of the command takes its services with it (Linux's parent-death signal): no process of the run
survives any of them. A service that exits while the demo waits, even cleanly with 0 after a SIGTERM from
outside, fails the demo at once (not at its timeout), and the service's log says which signal stopped it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpctl.commands_run import candle_end_offset
from mpctl.infra import Endpoints
from shared.topics import Topics
from tests.e2e.test_run import DATA, ROOT, env_for

SERVICES = 8  # ingest, registry, arbiter, monitor, a strategy and an execution worker per default profile
SLOW = ["--data", str(DATA), "--speed", "3600"]  # one hourly step a second: minutes of work


def children(pid: int) -> set[int]:
    """The live direct children of `pid`, from /proc."""
    out: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry.name))
    return out


def alive(pids: set[int]) -> set[int]:
    """Which of `pids` still run (a zombie awaiting its reaper does not)."""
    out = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(p)
    return out


def start(command: str, infra: Endpoints, out: Path) -> tuple[subprocess.Popen[str], set[int]]:
    """`mpctl <command>` on a slow replay, once all its services run; returns it and their pids."""
    args = [sys.executable, "-m", "mpctl.cli", command, *SLOW, "--out", str(out), "--timeout", "600"]
    args += ["--source", "replay", "--max-steps", "400"] if command == "run" else ["--hours", "400"]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env_for(infra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 90
    kids: set[int] = set()
    while time.monotonic() < deadline and len(kids) < SERVICES:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        kids = children(proc.pid)
        time.sleep(0.2)
    assert len(kids) >= SERVICES, kids
    # Past their start (each has logged), so each has its signal handling in place.
    logs = out / "logs"
    while time.monotonic() < deadline and not (
        len(list(logs.glob("*.log"))) >= SERVICES and all(p.stat().st_size > 0 for p in logs.glob("*.log"))
    ):
        time.sleep(0.2)
    if command == "run":
        # A run stopped before its first candle has nothing to collect (it says so); this test wants a run with
        # steps, so it waits for the first candle on the topic (seen once: SIGTERM won that race under load).
        ns = json.loads((out / "run.json").read_text())["namespace"]
        while time.monotonic() < deadline and not asyncio.run(
            candle_end_offset(infra.kafka, Topics(ns).candles)
        ):
            time.sleep(0.2)
    return proc, children(proc.pid)


@pytest.mark.parametrize("command", ["demo", "run"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name)
def test_a_signal_to_the_command_leaves_no_process_of_the_run(
    infra: Endpoints, tmp_path: Path, command: str, sig: signal.Signals
) -> None:
    proc, kids = start(command, infra, tmp_path / "out")
    try:
        os.kill(proc.pid, sig)
        text = proc.communicate(timeout=90)[0]
        deadline = time.monotonic() + 20
        while alive(kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(kids) == set(), f"{len(alive(kids))} service(s) survived {sig.name} of mpctl {command}"
        # The services were stopped with SIGTERM (by the command, or by Linux when it died) and said so.
        arbiter_log = (tmp_path / "out" / "logs" / "arbiter.log").read_text()
        assert "SIGTERM received: stopping" in arbiter_log, arbiter_log[-2000:]
        if sig is signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            return
        assert "Traceback" not in text, text[-3000:]
        if command == "demo":
            assert proc.returncode == 130 and "interrupted" in text, (proc.returncode, text[-2000:])
        else:  # a run stops cleanly, collects, and can be resumed
            assert proc.returncode == 0 and "interrupted" in text, (proc.returncode, text[-2000:])
            assert (tmp_path / "out" / "summary.json").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in alive(kids):
            os.kill(p, signal.SIGKILL)


def test_a_service_stopped_from_outside_fails_the_demo_at_once(infra: Endpoints, tmp_path: Path) -> None:
    proc, _ = start("demo", infra, tmp_path / "out")
    try:
        arbiter = next(
            p for p in children(proc.pid) if "services.arbiter" in Path(f"/proc/{p}/cmdline").read_text()
        )
        os.kill(arbiter, signal.SIGTERM)
        t0 = time.monotonic()
        text = proc.communicate(timeout=60)[0]
        assert time.monotonic() - t0 < 20, "the demo waited instead of noticing the stopped service"
        assert proc.returncode == 1 and "service arbiter exited with code 0" in text, text[-2000:]
        assert "SIGTERM received: stopping" in (tmp_path / "out" / "logs" / "arbiter.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
