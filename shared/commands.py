"""Signed operator commands (pause, resume, flatten, kill, rotate, acknowledge) and their verification.

A command is signed with HMAC-SHA256 over a canonical byte string of its fields, with a key shared by the
operator and the services (env `MPCTL_COMMAND_KEY`, or a file named by `MPCTL_COMMAND_KEY_FILE`, e.g. a
mounted secret). A service refuses a command that is unsigned, badly signed, older than `max_age_s`
(or issued too far in the future), or whose nonce it has already accepted (a replay). Pure: no Kafka.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from shared.clock import derived_id
from shared.messages import CommandHandled, ControlCommand

KEY_ENV = "MPCTL_COMMAND_KEY"
KEY_FILE_ENV = "MPCTL_COMMAND_KEY_FILE"
MIN_KEY_BYTES = 16


class CommandKeyError(RuntimeError):
    """No usable command key; the message says where one is looked for (never what it is)."""


def load_command_key(env: dict[str, str] | None = None) -> bytes:
    e = os.environ if env is None else env
    if e.get(KEY_FILE_ENV):
        path = Path(e[KEY_FILE_ENV])
        try:
            key = path.read_bytes().strip()
        except OSError as err:
            raise CommandKeyError(f"cannot read the command key file {path}: {err.strerror}") from None
    elif e.get(KEY_ENV):
        key = e[KEY_ENV].encode()
    else:
        raise CommandKeyError(
            f"no command key: set {KEY_ENV} or {KEY_FILE_ENV} (at least {MIN_KEY_BYTES} bytes)"
        )
    if len(key) < MIN_KEY_BYTES:
        raise CommandKeyError(
            f"the command key is too short ({len(key)} bytes); use at least {MIN_KEY_BYTES}"
        )
    return key


def signing_bytes(cmd: ControlCommand) -> bytes:
    """What is signed: every field that changes the command's meaning, in a fixed order."""
    return "|".join(
        [cmd.id, cmd.action, cmd.target, cmd.issued_at.isoformat(), cmd.nonce, cmd.issuer, cmd.reason]
    ).encode()


def sign(cmd: ControlCommand, key: bytes) -> ControlCommand:
    sig = hmac.new(key, signing_bytes(cmd), hashlib.sha256).hexdigest()
    return cmd.model_copy(update={"signature": sig})


def new_nonce() -> str:
    return secrets.token_hex(16)


@dataclass
class CommandVerifier:
    """Verifies commands for one service instance; remembers accepted nonces for the freshness window."""

    key: bytes | None  # None: this service has no key, so every command is refused (and audited)
    max_age: timedelta
    max_future: timedelta = timedelta(seconds=30)
    _seen: OrderedDict[str, datetime] = field(default_factory=OrderedDict)

    def verify(self, cmd: ControlCommand, now: datetime) -> str | None:
        """None when the command is accepted, else the reason it is refused (for the audit trail)."""
        if not cmd.signature:
            return "unsigned command"
        if self.key is None:
            return f"this service has no command key ({KEY_ENV} or {KEY_FILE_ENV})"
        expected = hmac.new(self.key, signing_bytes(cmd), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, cmd.signature):
            return "bad signature"
        age = now - cmd.issued_at
        if age > self.max_age:
            return (
                f"stale: issued {age.total_seconds():.0f} s ago, max age {self.max_age.total_seconds():.0f} s"
            )
        if -age > self.max_future:
            return f"issued {-age.total_seconds():.0f} s in the future (clock skew?)"
        # Forget nonces older than the window: a replay of those is refused as stale anyway.
        while self._seen and next(iter(self._seen.values())) < now - self.max_age - self.max_future:
            self._seen.popitem(last=False)
        if cmd.nonce in self._seen:
            return f"replayed nonce {cmd.nonce[:8]}..."
        self._seen[cmd.nonce] = now
        return None


@dataclass
class CommandGate:
    """One service's door for commands: verifies each against the time the broker appended it.

    The commands topic uses broker LogAppendTime, so "now" is a time the sender cannot forge, and a service
    that rebuilds its state by re-reading the topic reaches the same verdicts: a command applied before a
    restart is applied again, a replay of it is refused again.
    """

    verifier: CommandVerifier
    service: str

    def check(self, cmd: ControlCommand, appended_at: datetime) -> CommandHandled:
        reason = self.verifier.verify(cmd, appended_at)
        return CommandHandled(
            id=derived_id("command-handled", cmd.id, self.service),
            event_time=appended_at,
            correlation_id=cmd.correlation_id,
            causation_id=cmd.id,
            command_id=cmd.id,
            action=cmd.action,
            target=cmd.target,
            service=self.service,
            accepted=reason is None,
            reason=reason or "",
        )


def new_command(
    action: str, target: str, *, key: bytes, now: datetime, reason: str = "", issuer: str = "mpctl"
) -> ControlCommand:
    nonce = new_nonce()
    cmd = ControlCommand(
        id=derived_id("command", nonce),
        event_time=now,
        correlation_id=f"command:{nonce[:12]}",
        action=action,
        target=target,
        issued_at=now,
        nonce=nonce,
        issuer=issuer,
        reason=reason,
    )
    return sign(cmd, key)


def gate_for(service: str, max_age_s: float, env: dict[str, str] | None = None) -> CommandGate:
    """The gate of a service process; without a configured key it refuses every command, saying why."""
    try:
        key: bytes | None = load_command_key(env)
    except CommandKeyError:
        key = None
    return CommandGate(CommandVerifier(key, timedelta(seconds=max_age_s)), service)
