"""The admit step every service runs on a consumed record before its own decisions, and the one dead-letter rule.

A record is admitted when its bytes decode to a message (shared/codec.py), its times are plausible (not far ahead
of the clock: a forged or corrupt time would move event time past every real message), and, for a command the
service judges, after the signed-command gate's verdict (shared/commands.py). Everything else is refused with the
reason, and the consumer that owns the record dead-letters it with `dead_letter`.

Pure: no Kafka client here. A record is anything with the fields of a consumed Kafka record (`Record`): aiokafka's
ConsumerRecord is one, and so is the strategy's HeldRecord (an outcome's record kept until judged). The services
differ only in what they do with the verdict (which topics they dead-letter, what they act on), never in how it
is reached.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from shared.clock import Clock, derived_id, system_clock
from shared.codec import DecodeError, decode, implausible_time
from shared.commands import CommandGate
from shared.messages import CommandHandled, ControlCommand, DeadLettered, Message

log = logging.getLogger(__name__)

# The dead-letter event keeps the error text up to here: enough for a stack of validation errors, bounded.
MAX_ERROR_CHARS = 2000


class Record(Protocol):
    """What the admit step and the dead-letter event read of a consumed record. `timestamp`: the Kafka
    timestamp in milliseconds (the broker's append time on the commands topic)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Admitted:
    """A decoded message with plausible times; for a command the service judges, its verdict."""

    msg: Message
    verdict: CommandHandled | None = None

    @property
    def act(self) -> bool:
        """Whether the service acts on the message: anything but a command its gate refused."""
        return self.verdict is None or self.verdict.accepted


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a record is not a message the service may act on (undecodable, or an implausible time)."""

    reason: str


def dead_letter_id(service: str, rec: Record) -> str:
    """The one id rule: derived from the service and the record's place, so a redelivered or re-read record is
    dead-lettered under the same id (consumers de-duplicate), and two services refusing one record do not
    collide."""
    return derived_id("dead-letter", service, rec.topic, rec.partition, rec.offset)


def dead_letter(rec: Record, reason: str, *, service: str, now: datetime) -> DeadLettered:
    """The dead-letter event for a consumed record: where it came from, its raw bytes, and why (cut to
    MAX_ERROR_CHARS). Every service builds it here, so the topic reads the same whoever wrote it."""
    log.warning("%s dead-lettered %s[%d]@%d: %s", service, rec.topic, rec.partition, rec.offset, reason)
    return DeadLettered(
        id=dead_letter_id(service, rec),
        event_time=now,
        correlation_id=f"{rec.topic}:{rec.partition}:{rec.offset}",
        source_topic=rec.topic,
        partition=rec.partition,
        offset=rec.offset,
        key=rec.key.decode("utf-8", "replace") if rec.key is not None else None,
        payload_b64=base64.b64encode(rec.value or b"").decode(),
        error=reason[:MAX_ERROR_CHARS],
        service=service,
    )


def _every_command(cmd: ControlCommand) -> bool:
    return True


def admit(
    rec: Record,
    *,
    now: datetime,
    commands: CommandGate | None = None,
    judges: Callable[[ControlCommand], bool] = _every_command,
) -> Admitted | Refused:
    """The admit step: decode, times no later than `now` plus codec.MAX_FUTURE, then (a command `judges` picks,
    when there is a gate) the gate's verdict. A refused command is admitted with its verdict: the service
    publishes the verdict and does not act on the command."""
    try:
        msg = decode(rec.value)
    except DecodeError as err:
        return Refused(str(err))
    bad_time = implausible_time(msg, now)
    if bad_time is not None:
        return Refused(f"{type(msg).__name__}: {bad_time}")
    if commands is not None and isinstance(msg, ControlCommand) and judges(msg):
        # Judged against the broker's append time (LogAppendTime on the commands topic): unforgeable, and the
        # same verdict when the log is re-read after a restart.
        verdict = commands.check(msg, datetime.fromtimestamp(rec.timestamp / 1000, UTC))
        if not verdict.accepted:
            log.warning(
                "%s refused command %s %s: %s", commands.service, msg.action, msg.target, verdict.reason
            )
        return Admitted(msg, verdict)
    return Admitted(msg)


class Admission:
    """One service's admit step: `admit(rec)` decides, `dead_letter(rec, reason)` writes the refusal.

    `clock` is the service's injected clock; times are judged against the later of it and the machine's clock
    (the exchange's time live, the machine's for commands mpctl stamps). `commands`: the service's gate, or
    None when it acts on no command; `judges` picks the commands it answers (the registry answers `rotate` only;
    the others are judged by the services they are for).
    """

    def __init__(
        self,
        service: str,
        clock: Clock,
        commands: CommandGate | None = None,
        *,
        judges: Callable[[ControlCommand], bool] = _every_command,
    ) -> None:
        self.service = service
        self._clock = clock
        self._commands = commands
        self._judges = judges

    def admit(self, rec: Record) -> Admitted | Refused:
        return admit(
            rec, now=max(self._clock(), system_clock()), commands=self._commands, judges=self._judges
        )

    def dead_letter(self, rec: Record, reason: str) -> DeadLettered:
        return dead_letter(rec, reason, service=self.service, now=self._clock())
