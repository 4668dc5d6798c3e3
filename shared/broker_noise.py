"""Broker outages in the logs: one line when the broker goes, a summary every minute, one line when it is back.

aiokafka logs every failed connection, metadata refresh, fetch, heartbeat and produce attempt
of every client, at ERROR or WARNING, several times a second per client: an 8-minute outage wrote 358,335 lines
(46 MB) to a demo's logs (issue 19). `OutageLog` (pure, its clock injected) decides what an operator reads
instead; `BrokerNoiseFilter` applies it to a logging handler, and `shared.runtime.setup_logging` (every service)
and `mpctl.cli` (the operator's terminal) install it. Other lines, the libraries' others included, pass
unchanged. docs/operations.md, "Logs during a broker outage".
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "LIBRARY_LOGGERS",
    "QUIET_S",
    "SUMMARY_EVERY_S",
    "BrokerNoiseFilter",
    "OutageLog",
    "install_broker_noise_filter",
    "is_connection_noise",
]

log = logging.getLogger(__name__)

SUMMARY_EVERY_S = 60.0
# The broker counts as back once no connection error came for this long. During an outage the clients of one
# process fail several times a second (a 16 s outage: 1,543 lines, never 0.3 s apart), so 5 s of silence means
# they reach it again; the line then comes those 5 s late.
QUIET_S = 5.0
TEXT_MAX = 300  # of the first error quoted in the outage line

# The Kafka client libraries: only their records are judged.
LIBRARY_LOGGERS = ("aiokafka", "kafka")
# A failed connection as these libraries word it (aiokafka 0.14: client.py, consumer/fetcher.py,
# consumer/group_coordinator.py, producer/sender.py). Narrow on purpose:
# a rebalance or an expired session ("Heartbeat failed ... rebalancing", "Heartbeat session expired") or a
# refused request is news and passes, even while the broker is away.
_CONNECTION_ERROR = re.compile(
    r"Unable connect to"
    r"|Unable to (?:update|request) metadata"
    r"|NodeNotReadyError"
    r"|KafkaConnectionError"
    r"|Connect call failed"
    r"|Connection refused"
    r"|ConnectionResetError"
)


def is_connection_noise(logger_name: str, message: str) -> bool:
    """A Kafka client library's line about failing to reach the broker."""
    top = logger_name.split(".", 1)[0]
    return top in LIBRARY_LOGGERS and _CONNECTION_ERROR.search(message) is not None


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


@dataclass
class OutageLog:
    """What a stream of connection errors is told as: `error` for each error, `tick` now and then (at least
    every second while `down`); both return the lines to log, usually none.

    - the first error of an outage: one line quoting it;
    - while errors go on: every `summary_every_s`, one line with how many came in that time;
    - `quiet_s` after the last error: one line saying the broker answers again, with the outage's total.
    """

    clock: Callable[[], float]
    summary_every_s: float = SUMMARY_EVERY_S
    quiet_s: float = QUIET_S
    down_since: float | None = None
    last_error: float = 0.0
    window_start: float = 0.0
    in_window: int = 0  # errors since the last line
    total: int = 0  # errors of this outage

    def __post_init__(self) -> None:
        if not self.summary_every_s > 0:
            raise ValueError(f"summary_every_s must be > 0, got {self.summary_every_s}")
        if not self.quiet_s > 0:
            raise ValueError(f"quiet_s must be > 0, got {self.quiet_s}")

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def error(self, text: str) -> list[str]:
        now = self.clock()
        lines = self._back(now)  # a gap no tick saw: that outage ended, this is a new one
        if self.down_since is None:
            self.down_since = self.window_start = self.last_error = now
            self.total, self.in_window = 1, 0
            quoted = text if len(text) <= TEXT_MAX else text[:TEXT_MAX] + "..."
            lines.append(
                f"Kafka broker unreachable: {quoted} (further connection errors are counted: a summary every "
                f"{self.summary_every_s:.0f} s, one line when it answers again)"
            )
            return lines
        self.last_error = now
        self.total += 1
        self.in_window += 1
        if now - self.window_start >= self.summary_every_s:
            lines.append(
                f"{self.in_window} connection errors to the broker in the last {now - self.window_start:.0f} s "
                f"(unreachable for {_duration(now - self.down_since)})"
            )
            self.window_start, self.in_window = now, 0
        return lines

    def tick(self) -> list[str]:
        return self._back(self.clock())

    def _back(self, now: float) -> list[str]:
        if self.down_since is None or now - self.last_error < self.quiet_s:
            return []
        line = (
            f"Kafka broker reachable again (no connection error for {self.quiet_s:.0f} s): unreachable for "
            f"{_duration(self.last_error - self.down_since)}, {self.total} connection errors in all"
        )
        self.down_since = None
        self.total = self.in_window = 0
        return [line]


class BrokerNoiseFilter(logging.Filter):
    """A handler's filter: drops the Kafka libraries' connection errors and logs `OutageLog`'s lines instead
    (on this module's logger, so through the same handlers). Thread-safe: a service's heartbeat thread has its
    own Kafka client.

    With `ticker`, a daemon thread calls `tick` every second while the broker is down, so the line that it is
    back comes even when nothing else is logged; without it (tests), the caller ticks.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        summary_every_s: float = SUMMARY_EVERY_S,
        quiet_s: float = QUIET_S,
        ticker: bool = True,
    ) -> None:
        super().__init__()
        self.outage = OutageLog(clock, summary_every_s=summary_every_s, quiet_s=quiet_s)
        self.dropped = 0
        self._ticker = ticker
        self._ticking: threading.Thread | None = None
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(LIBRARY_LOGGERS):  # cheap: most records are the service's own
            return True
        message = record.getMessage()
        if not is_connection_noise(record.name, message):
            return True
        with self._lock:
            self.dropped += 1
            lines = self.outage.error(message)
            if self._ticker and self.outage.down and (self._ticking is None or not self._ticking.is_alive()):
                self._ticking = threading.Thread(
                    target=self._tick_while_down, name="broker-noise", daemon=True
                )
                self._ticking.start()
        self._emit(lines)  # outside the lock: these lines come back through this filter
        return False

    def tick(self) -> None:
        with self._lock:
            lines = self.outage.tick()
        self._emit(lines)

    def _tick_while_down(self) -> None:
        while True:
            time.sleep(1.0)
            self.tick()
            with self._lock:
                if not self.outage.down:
                    return

    @staticmethod
    def _emit(lines: list[str]) -> None:
        for line in lines:
            log.warning("%s", line)


def install_broker_noise_filter(handler: logging.Handler) -> BrokerNoiseFilter:
    """Add the filter to `handler` once (a second call returns the one installed). One handler per process:
    each filter would tell the outage on its own."""
    for f in handler.filters:
        if isinstance(f, BrokerNoiseFilter):
            return f
    f = BrokerNoiseFilter()
    handler.addFilter(f)
    return f
