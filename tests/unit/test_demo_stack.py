"""mpctl.commands_demo.Stack's fault injection: SIGKILL a named process and start it again with its arguments."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from mpctl.commands_demo import Stack

# A module that runs long and prints nothing: `python -m timeit` timing one 60 s sleep.
SLEEPER = ["timeit", "-n", "1", "-r", "1", "import time; time.sleep(60)"]


def test_sigkill_and_restart_replaces_the_process_with_the_same_arguments(tmp_path: Path) -> None:
    stack = Stack()
    try:
        first = stack.start("svc", SLEEPER, tmp_path)
        second = stack.sigkill_and_restart("svc")
        assert first.popen.returncode == -signal.SIGKILL
        assert second.popen.pid != first.popen.pid and second.popen.poll() is None
        assert second.args == first.args == SLEEPER and second.restarts == 1
        assert stack.procs == [second] and stack.dead() == []  # killed on purpose: not a crash
        assert "SIGKILLed by fault injection (restart 1)" in (tmp_path / "svc.log").read_text()
        third = stack.sigkill_and_restart("svc")
        assert third.restarts == 2 and third.log == first.log
    finally:
        stack.stop(grace=5)


def test_sigkill_and_restart_of_an_unknown_service_names_it(tmp_path: Path) -> None:
    stack = Stack()
    try:
        stack.start("svc", SLEEPER, tmp_path)
        with pytest.raises(RuntimeError, match="'arbiter'"):
            stack.sigkill_and_restart("arbiter")
    finally:
        stack.stop(grace=5)
