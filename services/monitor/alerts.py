"""Alerts: what deserves a human's attention, raised to the log and to configurable webhooks.

Kinds (`KINDS`): collision, duplication_prevented, halt, wash_trade_rejection, correlation_breach,
lag_above_threshold, internal_cross_opportunity, dead_letter, feed_stale, missing_bucket, account_mismatch,
price_band, duplicate_order.

`alerts_from_message` maps one message to its alerts, purely:

| message | alert |
|---|---|
| PlanPublished with collisions > 0 | collision (the registry bumped the nonce that many times) |
| OrderDecided rejected, rule `opposite_side` | wash_trade_rejection (two profiles on opposite sides of a product) |
| OrderDecided rejected, rule naming a duplicate (`duplicate*`, `*echo*`) | duplication_prevented |
| OrderDecided with rule `internal_cross*`, an internal fill, a message type `*InternalCross*` | internal_cross_opportunity |
| ProfileHalted | halt |
| DeadLettered | dead_letter |
| FeedStateChanged stale (the live feed: no websocket frame, or the last step too old) | feed_stale |
| WatermarkAdvanced with `missing` products (a bucket still missing at the deadline) | missing_bucket |
| AccountMismatchDetected mismatch (a live profile's books and exchange account differ beyond dust) | account_mismatch |
| OrderUpdated rejected with a reason starting `price band` (a live order priced far from the market) | price_band |
| DuplicateOrderDetected (a second order under one client order id at the exchange: both exchange ids) | duplicate_order |

Lag and correlation alerts come from measurements (`lag_alerts`, `correlation_alerts`) and fire once when a
value crosses its threshold, again only after it went back below (`AlertGate`).

Sinks never block the pipeline: `AlertDispatcher.emit` only queues; webhooks are posted by a background task,
each with a bounded number of attempts and a timeout, and a failure is logged, never raised. Webhook URLs
often carry a token in their path (Slack, Telegram), so logs show only their scheme and host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson

from shared.clock import derived_id
from shared.messages import (
    PRICE_BAND_REASON,
    AccountMismatchDetected,
    CorrelationAlert,
    DeadLettered,
    DuplicateOrderDetected,
    FeedStateChanged,
    Message,
    OrderDecided,
    OrderFilled,
    OrderUpdated,
    PlanPublished,
    ProfileHalted,
    WatermarkAdvanced,
)

log = logging.getLogger("monitor.alerts")

Severity = Literal["info", "warning", "critical"]
KINDS: tuple[str, ...] = (
    "collision",
    "duplication_prevented",
    "halt",
    "wash_trade_rejection",
    "correlation_breach",
    "lag_above_threshold",
    "internal_cross_opportunity",
    "dead_letter",
    "feed_stale",
    "missing_bucket",
    "account_mismatch",
    "price_band",
    "duplicate_order",
)
WASH_TRADE_RULES = frozenset({"opposite_side"})


@dataclass(frozen=True)
class Alert:
    kind: str
    severity: Severity
    summary: str
    event_time: datetime
    key: str  # what the alert is about; with the kind, it makes the id (a redelivered message: same id)
    profile: str | None = None
    product: str | None = None
    namespace: str | None = None
    correlation_id: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return derived_id("alert", self.kind, self.key)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "severity": self.severity,
            # `text` is what Slack-style incoming webhooks display; the other fields are for scripts.
            "text": f"[{self.severity}] {self.kind}: {self.summary}",
            "summary": self.summary,
            "event_time": self.event_time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "profile": self.profile,
            "product": self.product,
            "namespace": self.namespace,
            "correlation_id": self.correlation_id,
            "details": dict(self.details),
        }


def _rule_is_duplicate(rule: str) -> bool:
    r = rule.lower()
    return r.startswith("duplicate") or "echo" in r


def alerts_from_message(msg: Message, namespace: str | None = None) -> list[Alert]:
    """The alerts one message raises (most raise none)."""
    base: dict[str, Any] = {
        "event_time": msg.event_time,
        "namespace": namespace,
        "correlation_id": msg.correlation_id,
    }
    if isinstance(msg, PlanPublished):
        if msg.collisions > 0:
            return [
                Alert(
                    "collision",
                    "warning",
                    f"{msg.profile}: {msg.collisions} collision(s) resolved in epoch {msg.epoch}, nonce now {msg.nonce}",
                    key=msg.id,
                    profile=msg.profile,
                    details={
                        "epoch": msg.epoch,
                        "nonce": msg.nonce,
                        "collisions": msg.collisions,
                        "strategy": msg.strategy,
                    },
                    **base,
                )
            ]
        return []
    if isinstance(msg, OrderDecided):
        out = []
        details = {
            "intent_id": msg.intent_id,
            "side": msg.side,
            "size": str(msg.size),
            "verdict": msg.verdict,
            "rule": msg.rule,
            "reason": msg.reason,
            "conflicting_profile": msg.conflicting_profile,
        }
        if msg.verdict == "rejected" and msg.rule in WASH_TRADE_RULES:
            out.append(
                Alert(
                    "wash_trade_rejection",
                    "warning",
                    f"{msg.profile} {msg.side} {msg.product} rejected: opposite to {msg.conflicting_profile or 'another profile'}",
                    key=msg.id,
                    profile=msg.profile,
                    product=msg.product,
                    details=details,
                    **base,
                )
            )
        if msg.verdict == "rejected" and _rule_is_duplicate(msg.rule):
            out.append(
                Alert(
                    "duplication_prevented",
                    "info",
                    f"{msg.profile} {msg.side} {msg.product}: {msg.reason}",
                    key=msg.id,
                    profile=msg.profile,
                    product=msg.product,
                    details=details,
                    **base,
                )
            )
        if msg.rule.lower().startswith("internal_cross"):
            out.append(
                Alert(
                    "internal_cross_opportunity",
                    "info",
                    f"{msg.profile} {msg.side} {msg.product} could be netted with "
                    f"{msg.conflicting_profile or 'another profile'}: {msg.reason}",
                    key=msg.id,
                    profile=msg.profile,
                    product=msg.product,
                    details=details,
                    **base,
                )
            )
        return out
    if (
        isinstance(msg, OrderUpdated)
        and msg.status == "rejected"
        and msg.reason.startswith(PRICE_BAND_REASON)
    ):
        return [
            Alert(
                "price_band",
                "critical",
                f"{msg.profile} {msg.side} {msg.product} not sent: {msg.reason}",
                key=msg.id,
                profile=msg.profile,
                product=msg.product,
                details={"client_order_id": msg.client_order_id, "reason": msg.reason},
                **base,
            )
        ]
    if isinstance(msg, OrderFilled | OrderUpdated):
        if msg.internal and (isinstance(msg, OrderFilled) or msg.status == "filled"):
            return [
                Alert(
                    "internal_cross_opportunity",
                    "info",
                    f"{msg.profile} {msg.side} {msg.product} filled internally (netted against another profile)",
                    key=msg.client_order_id,
                    profile=msg.profile,
                    product=msg.product,
                    details={"client_order_id": msg.client_order_id, "size": str(msg.size)},
                    **base,
                )
            ]
        return []
    if isinstance(msg, ProfileHalted):
        until = msg.until.isoformat() if msg.until else None
        return [
            Alert(
                "halt",
                "critical",
                f"{msg.profile} halted: {msg.reason}" + (f" (until {until})" if until else ""),
                key=msg.id,
                profile=msg.profile,
                details={"reason": msg.reason, "until": until},
                **base,
            )
        ]
    if isinstance(msg, DeadLettered):
        # The payload is left out: it is whatever bytes were refused, possibly large, possibly anything.
        return [
            Alert(
                "dead_letter",
                "warning",
                f"{msg.service} dead-lettered {msg.source_topic}[{msg.partition}]@{msg.offset}: {msg.error[:200]}",
                key=msg.id,
                details={
                    "source_topic": msg.source_topic,
                    "partition": msg.partition,
                    "offset": msg.offset,
                    "service": msg.service,
                    "error": msg.error[:500],
                },
                **base,
            )
        ]
    if isinstance(msg, CorrelationAlert):
        if msg.state != "breach":
            return []
        return [
            Alert(
                "correlation_breach",
                "warning",
                f"returns of {msg.other_profile} and {msg.profile} correlate at {msg.correlation} "
                f"(threshold {msg.threshold}); {msg.profile}'s buys scaled by {msg.size_scale}",
                key=msg.id,
                details={
                    "profiles": [msg.other_profile, msg.profile],
                    "correlation": msg.correlation,
                    "threshold": msg.threshold,
                    "size_scale": msg.size_scale,
                },
                **base,
            )
        ]
    if isinstance(msg, FeedStateChanged):
        if msg.state != "stale":
            return []
        # Every candle partition carries a copy: one id, one alert.
        return [
            Alert(
                "feed_stale",
                "critical",
                f"market feed stale: {msg.reason}; no new entries until it is fresh again",
                key=msg.id,
                details={
                    "reason": msg.reason,
                    "last_frame_age_s": msg.last_frame_age_s,
                    "last_step_time": msg.last_step_time.isoformat() if msg.last_step_time else None,
                },
                **base,
            )
        ]
    if isinstance(msg, WatermarkAdvanced):
        if not msg.missing:
            return []
        return [
            Alert(
                "missing_bucket",
                "warning",
                f"step {msg.step_time.isoformat()} went out without {', '.join(msg.missing)}: no final candle by the deadline",
                key=msg.id,
                details={"step_time": msg.step_time.isoformat(), "missing": list(msg.missing)},
                **base,
            )
        ]
    if isinstance(msg, DuplicateOrderDetected):
        return [
            Alert(
                "duplicate_order",
                "critical",
                f"{msg.profile} {msg.side} {msg.product}: two orders at the exchange under client order id "
                f"{msg.client_order_id}: {msg.original} and {msg.duplicate} (the second {msg.status}, "
                f"{msg.filled_size.normalize():f} filled{', cancelled by the worker' if msg.cancelled else ''})",
                key=msg.id,
                profile=msg.profile,
                product=msg.product,
                details={
                    "client_order_id": msg.client_order_id,
                    "original": msg.original,
                    "duplicate": msg.duplicate,
                    "status": msg.status,
                    "filled_size": str(msg.filled_size),
                    "cancelled": msg.cancelled,
                    "reason": msg.reason,
                },
                **base,
            )
        ]
    if isinstance(msg, AccountMismatchDetected):
        if msg.state != "mismatch":
            return []
        return [
            Alert(
                "account_mismatch",
                "critical",
                f"{msg.profile}: {msg.reason}",
                key=msg.id,
                profile=msg.profile,
                details={"snapshot_id": msg.snapshot_id, "differences": dict(msg.differences)},
                **base,
            )
        ]
    mtype = str(getattr(msg, "type", type(msg).__name__))
    if "InternalCross" in mtype:
        # A message type the arbiter may add for this (issue 5): read the usual fields when present.
        return [
            Alert(
                "internal_cross_opportunity",
                "info",
                f"internal cross opportunity ({mtype})",
                key=msg.id,
                profile=getattr(msg, "profile", None),
                product=getattr(msg, "product", None),
                details={
                    k: str(v) for k, v in msg.model_dump(mode="json").items() if k not in ("id", "type")
                },
                **base,
            )
        ]
    return []


class AlertGate:
    """Fires once when a condition starts to hold, and again only after it stopped holding."""

    def __init__(self) -> None:
        self.firing: set[str] = set()

    def update(self, key: str, holds: bool) -> bool:
        if holds and key not in self.firing:
            self.firing.add(key)
            return True
        if not holds:
            self.firing.discard(key)
        return False


def lag_alerts(
    group_lags: Mapping[str, int],
    threshold: int,
    gate: AlertGate,
    *,
    now: datetime,
    namespace: str | None = None,
) -> list[Alert]:
    """One alert per consumer group whose total lag rises above `threshold` messages."""
    out = []
    for group, lag in sorted(group_lags.items()):
        if gate.update(f"lag:{group}", lag > threshold):
            out.append(
                Alert(
                    "lag_above_threshold",
                    "warning",
                    f"consumer group {group} is {lag} message(s) behind (threshold {threshold})",
                    event_time=now,
                    key=f"{group}:{now.isoformat()}",
                    namespace=namespace,
                    details={"group": group, "lag": lag, "threshold": threshold},
                )
            )
    return out


def correlation_alerts(
    correlations: Mapping[tuple[str, str], float | None],
    threshold: float,
    gate: AlertGate,
    *,
    now: datetime,
    window: int,
    namespace: str | None = None,
) -> list[Alert]:
    """One alert per pair of profiles whose rolling return correlation rises to `threshold` or above:
    profiles meant to be different are moving together."""
    out = []
    for (a, b), rho in sorted(correlations.items()):
        holds = rho is not None and math.isfinite(rho) and rho >= threshold
        if gate.update(f"corr:{a}:{b}", holds):
            assert rho is not None
            out.append(
                Alert(
                    "correlation_breach",
                    "warning",
                    f"returns of {a} and {b} correlate at {rho:.2f} over the last {window} steps (threshold {threshold:.2f})",
                    event_time=now,
                    key=f"{a}:{b}:{now.isoformat()}",
                    namespace=namespace,
                    details={
                        "profiles": [a, b],
                        "correlation": rho,
                        "threshold": threshold,
                        "window": window,
                    },
                )
            )
    return out


# ------------------------------------------------------------------------------------------ sinks
class AlertSink(Protocol):
    name: str

    async def send(self, alert: Alert) -> bool: ...

    async def close(self) -> None: ...


def redact_url(url: str) -> str:
    """scheme://host[:port]/... : enough to tell webhooks apart in a log, without the token in the path."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/..."


class LogSink:
    name = "log"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log

    async def send(self, alert: Alert) -> bool:
        level = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.ERROR}[alert.severity]
        self._log.log(level, "ALERT %s %s: %s", alert.severity, alert.kind, alert.summary)
        return True

    async def close(self) -> None:
        return None


class FileSink:
    """Alerts as JSON lines (the run directory keeps them next to the audit file)."""

    def __init__(self, path: Path) -> None:
        self.name = f"file:{path}"
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()  # an empty file says "no alert", a missing one "no monitor ran"

    async def send(self, alert: Alert) -> bool:
        with self._path.open("ab") as fh:
            fh.write(orjson.dumps(alert.to_json()) + b"\n")
        return True

    async def close(self) -> None:
        return None


class WebhookSink:
    """Plain JSON POST of `Alert.to_json()`; a 2xx answer is success. Bounded: `attempts` tries, each within
    `timeout_s`, with a doubling pause between them."""

    def __init__(
        self, url: str, *, attempts: int = 3, timeout_s: float = 3.0, backoff_s: float = 0.5
    ) -> None:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"webhook {redact_url(url)}: only http and https URLs are supported")
        self._url = url
        self.name = f"webhook:{redact_url(url)}"
        self._attempts = max(1, attempts)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._backoff = backoff_s
        self._session: aiohttp.ClientSession | None = None

    async def send(self, alert: Alert) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body = orjson.dumps(alert.to_json())
        for attempt in range(1, self._attempts + 1):
            try:
                async with self._session.post(
                    self._url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    if 200 <= resp.status < 300:
                        return True
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as err:
                problem = type(err).__name__
            log.warning(
                "%s: attempt %d/%d for alert %s failed: %s",
                self.name,
                attempt,
                self._attempts,
                alert.kind,
                problem,
            )
            if attempt < self._attempts:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
        return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class AlertDispatcher:
    """Queues alerts and hands them to every sink from a background task; `emit` never waits.

    An alert id is dispatched once per process, so a redelivered message does not alert twice.
    """

    def __init__(self, sinks: Sequence[AlertSink], *, queue_size: int = 1000) -> None:
        self.sinks = list(sinks)
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._seen: set[str] = set()
        self.sent: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.dropped = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="alert-dispatcher")

    def emit(self, alerts: Iterable[Alert]) -> list[Alert]:
        """Queue the alerts not seen before; returns those queued."""
        queued = []
        for a in alerts:
            if a.id in self._seen:
                continue
            self._seen.add(a.id)
            try:
                self._queue.put_nowait(a)
                queued.append(a)
            except asyncio.QueueFull:
                self.dropped += 1
                log.warning("alert queue full: dropped %s alert %s", a.kind, a.summary)
        return queued

    async def _run(self) -> None:
        while True:
            alert = await self._queue.get()
            try:
                results = await asyncio.gather(*(s.send(alert) for s in self.sinks), return_exceptions=True)
                for sink, ok in zip(self.sinks, results, strict=True):
                    if ok is True:
                        self.sent[sink.name] = self.sent.get(sink.name, 0) + 1
                    else:
                        if isinstance(ok, BaseException):
                            log.warning("%s raised %s for alert %s", sink.name, type(ok).__name__, alert.kind)
                        self.failed[sink.name] = self.failed.get(sink.name, 0) + 1
            finally:
                self._queue.task_done()

    async def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued alert went through its sinks (True) or the timeout passed (False)."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self, timeout: float = 10.0) -> None:
        if self._task is not None:
            if not await self.drain(timeout):
                log.warning("%d alert(s) not delivered before shutdown", self._queue.qsize())
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for s in self.sinks:
            await s.close()


def build_sinks(
    webhooks: Sequence[str], *, alerts_file: Path | None = None, attempts: int = 3, timeout_s: float = 3.0
) -> list[AlertSink]:
    sinks: list[AlertSink] = [LogSink()]
    if alerts_file is not None:
        sinks.append(FileSink(alerts_file))
    sinks += [WebhookSink(u, attempts=attempts, timeout_s=timeout_s) for u in webhooks if u.strip()]
    return sinks
