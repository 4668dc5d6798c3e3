"""Service heartbeats: every service process publishes a `ServiceHeartbeat` every N seconds on
`<ns>.services.heartbeats` (keyed by service and instance), so `mpctl status` and the monitor see services that
join no consumer group (the ingest, the registry) and notice a killed process within a few beats.

The beat runs in a daemon thread with its own event loop and producer, started by `shared.runtime.main_entry`
for every service: it needs nothing from the service's
code, it stops beating when the process dies, and on a clean exit it sends a last beat with `stopping=True`.
A failure to publish is logged (once per outage) and never stops the service.

`heartbeat_state` (pure) judges a beat: up while its age is within the threshold (by default 3 intervals).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from aiokafka import AIOKafkaProducer

from shared.bus import KafkaAccess
from shared.clock import derived_id, system_clock
from shared.codec import encode
from shared.messages import ServiceHeartbeat

__all__ = [
    "INTERVAL_ENV",
    "Beat",
    "HeartbeatThread",
    "heartbeat_interval",
    "heartbeat_state",
    "start_heartbeat",
]

INTERVAL_ENV = "MPCTL_HEARTBEAT_S"
DEFAULT_INTERVAL_S = 5.0
MISSED_BEATS = 3  # a service is down once this many beats are missing

log = logging.getLogger("heartbeat")


def heartbeat_interval(env: Mapping[str, str] | None = None) -> float:
    """Seconds between beats from ``MPCTL_HEARTBEAT_S`` (default 5; 0 turns beats off)."""
    raw = (os.environ if env is None else env).get(INTERVAL_ENV, "")
    if raw == "":
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds (0: off), got {raw!r}") from None
    if not (value == 0 or 0.05 <= value <= 3600):
        raise ValueError(f"{INTERVAL_ENV} must be 0 (off) or between 0.05 and 3600 seconds, got {raw!r}")
    return value


@dataclass(frozen=True)
class Beat:
    """What status shows of one service's latest beat."""

    state: str  # "up" or "down"
    age_s: float
    instance: str
    stopping: bool


def heartbeat_state(beat: ServiceHeartbeat, now: datetime, threshold_s: float | None = None) -> Beat:
    """Up while the beat is younger than ``threshold_s`` (default: MISSED_BEATS intervals) and not a stop."""
    age = max(0.0, (now - beat.event_time).total_seconds())
    limit = threshold_s if threshold_s is not None else MISSED_BEATS * beat.interval_s
    up = age <= limit and not beat.stopping
    return Beat("up" if up else "down", age, beat.instance, beat.stopping)


class HeartbeatThread(threading.Thread):
    def __init__(
        self, bootstrap: KafkaAccess, topic: str, service: str, instance: str, interval_s: float
    ) -> None:
        super().__init__(name=f"heartbeat-{service}", daemon=True)
        self.bootstrap = bootstrap
        self.topic = topic
        self.service = service
        self.instance = instance
        self.interval_s = interval_s
        self.started_at = system_clock()
        self.beats = 0
        # Not `_stop`: threading.Thread.join() calls its own `_stop()` method, which that name would shadow.
        self._stopping = threading.Event()
        # The thread's loop and what wakes it from its wait between beats (set by stop(), thread-safely).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._key = f"{service}|{instance}".encode()

    def _beat(self, *, stopping: bool = False) -> ServiceHeartbeat:
        now = system_clock()
        return ServiceHeartbeat(
            id=derived_id("heartbeat", self.service, self.instance, now.isoformat(), stopping),
            event_time=now,
            correlation_id=f"heartbeat:{self.service}:{self.instance}",
            service=self.service,
            instance=self.instance,
            started_at=self.started_at,
            interval_s=self.interval_s,
            pid=os.getpid(),
            host=socket.gethostname(),
            stopping=stopping,
        )

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()  # after _wake: stop() reads _loop first
        producer = AIOKafkaProducer(**self.bootstrap.client_options(), acks=1, request_timeout_ms=10_000)
        failing = False
        started = False
        try:
            while not self._stopping.is_set():
                try:
                    if not started:
                        await producer.start()
                        started = True
                    await producer.send_and_wait(self.topic, encode(self._beat()), key=self._key)
                    self.beats += 1
                    if failing:
                        log.info("heartbeats to %s resumed", self.topic)
                    failing = False
                except Exception as err:  # the broker is away: keep the service running, try again later
                    if not failing:
                        log.warning(
                            "heartbeat to %s failed (%s: %s); retrying", self.topic, type(err).__name__, err
                        )
                    failing = True
                # Woken by stop(), not polled (a 50 ms poll was 20 wake-ups a second in every process: 0.2 cores
                # at 100 profiles), nor an executor wait (at interpreter exit no executor takes new work).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval_s)
            if started:
                # Best effort: without it, status sees the service down a few beats later.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        producer.send_and_wait(self.topic, encode(self._beat(stopping=True)), key=self._key),
                        3.0,
                    )
        finally:
            if started:
                await producer.stop()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        # A loop that started after the set sees _stopping before it waits; one already waiting is woken.
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop has closed: the thread is ending anyway
                loop.call_soon_threadsafe(wake.set)
        self.join(timeout)


def start_heartbeat(
    bootstrap: KafkaAccess, topic: str, service: str, instance: str, *, interval_s: float | None = None
) -> HeartbeatThread | None:
    """Start beating (None when beats are off); the last beat is sent at interpreter exit."""
    interval = heartbeat_interval() if interval_s is None else interval_s
    if interval <= 0:
        return None
    thread = HeartbeatThread(bootstrap, topic, service, instance, interval)
    thread.start()
    atexit.register(thread.stop)
    return thread
