"""mpctl/progress.py: progress on a terminal (a pseudo-terminal here), nothing with CI=true or on a pipe; the long
commands all use it."""

from __future__ import annotations

import os
import pty

import pytest

from mpctl import backtest, commands_demo, commands_ops, infra, selftest
from mpctl.progress import Progress, progress_enabled


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 4096):
            out += chunk
    except (BlockingIOError, OSError):
        pass
    return out


def test_writes_on_a_pseudo_terminal() -> None:
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty:
        Progress("demo", stream=tty, env={})("started 9 service processes")
        assert progress_enabled(tty, {})
    text = _read_all(master).decode()
    os.close(master)
    assert "[demo" in text and "started 9 service processes" in text


def test_writes_nothing_in_ci_even_on_a_terminal() -> None:
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty:
        Progress("demo", stream=tty, env={"CI": "true"})("started")
        assert not progress_enabled(tty, {"CI": "true"})
    assert _read_all(master) == b""
    os.close(master)


def test_writes_nothing_on_a_pipe() -> None:
    r, w = os.pipe()
    with os.fdopen(w, "w") as pipe:
        Progress("backtest", stream=pipe, env={})("loading")
        assert not progress_enabled(pipe, {})
    with os.fdopen(r, "rb") as reader:
        assert reader.read() == b""


def test_default_stream_is_looked_up_at_each_call(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    p = Progress("status")
    p("reading")  # pytest's capture is not a terminal
    assert capsys.readouterr().err == ""


def test_the_long_commands_share_the_helper() -> None:
    assert isinstance(commands_demo._progress, Progress)
    assert isinstance(commands_ops.progress, Progress)
    assert isinstance(selftest._progress, Progress)
    assert isinstance(infra._cli_progress(), Progress)
    assert backtest.Progress is Progress
