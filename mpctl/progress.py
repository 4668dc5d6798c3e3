"""Progress lines for a person watching a terminal; nothing in CI logs or pipes.

One rule for every long command (`mpctl demo`, `backtest`, `selftest`, `infra up`, `status`): progress goes to
stderr only when stderr is a terminal and the `CI` environment variable is unset (CI systems set it). Results and
errors are printed as before; only the running commentary is suppressed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

__all__ = ["Progress", "progress_enabled"]


def progress_enabled(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    s = sys.stderr if stream is None else stream
    e = os.environ if env is None else env
    try:
        tty = s.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
    return tty and not e.get("CI")


class Progress:
    """``Progress("demo")("message")`` prints ``[demo   3.2s] message`` to a terminal, nothing elsewhere.

    The stream and environment are looked up at each call unless given, so a module-level instance follows
    redirections (tests capturing stderr, a daemonised process)."""

    def __init__(
        self, label: str, *, stream: TextIO | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        self.label = label
        self._stream = stream
        self._env = env
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        stream = sys.stderr if self._stream is None else self._stream
        if not progress_enabled(stream, self._env):
            return
        elapsed = time.monotonic() - self.started
        stream.write(f"[{self.label} {elapsed:5.1f}s] {message}\n")
        stream.flush()
