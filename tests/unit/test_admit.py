"""The one admit step and dead-letter rule every service uses (shared/admit.py, #18 item 1), and a structural
check that no service decodes, time-checks or dead-letters its records its own way."""

from __future__ import annotations

import ast
import base64
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from shared.admit import MAX_ERROR_CHARS, Admission, Admitted, Refused, admit, dead_letter
from shared.codec import encode
from shared.commands import CommandGate, CommandVerifier, new_command
from shared.messages import CommandHandled
from tests.unit.builders import T0, candle, dt

ROOT = Path(__file__).resolve().parents[2]
KEY = b"k" * 32
NOW = dt(T0 + 86400 * 30)


@dataclass(frozen=True)
class Rec:
    value: bytes | None
    topic: str = "ns.market.candles"
    partition: int = 2
    offset: int = 41
    key: bytes | None = b"BTC-USD"
    timestamp: int = int((T0 + 86400 * 30) * 1000)


def gate() -> CommandGate:
    return CommandGate(CommandVerifier(KEY, timedelta(seconds=60)), "execution.a")


def test_a_valid_message_is_admitted_as_decoded() -> None:
    c = candle("BTC-USD", T0)
    got = admit(Rec(encode(c)), now=NOW)
    assert got == Admitted(c) and got.act


def test_undecodable_bytes_are_refused_with_the_codec_error() -> None:
    got = admit(Rec(b"\xff not json"), now=NOW)
    assert isinstance(got, Refused) and "not JSON" in got.reason
    missing = admit(Rec(b'{"type": "CandleClosed", "id": "x"}'), now=NOW)
    assert isinstance(missing, Refused) and "event_time" in missing.reason


def test_a_time_far_ahead_of_the_clock_is_refused_naming_the_field() -> None:
    c = candle("BTC-USD", T0 + 86400 * 40)  # ten days after NOW
    got = admit(Rec(encode(c)), now=NOW)
    assert isinstance(got, Refused)
    assert got.reason.startswith("CandleClosed: ") and "event_time" in got.reason


def test_the_admission_judges_times_against_the_later_of_its_clock_and_the_machines() -> None:
    # A replay clock in the past must not refuse a message of today: the machine's clock is later.
    past = Admission("registry", lambda: dt(T0))
    c = candle("BTC-USD", T0 + 86400 * 40)
    assert isinstance(past.admit(Rec(encode(c))), Admitted)


def test_a_signed_command_is_admitted_with_an_accepted_verdict_judged_at_the_append_time() -> None:
    cmd = new_command("pause", "a", key=KEY, now=NOW)
    got = admit(Rec(encode(cmd), topic="ns.commands"), now=NOW, commands=gate())
    assert isinstance(got, Admitted) and isinstance(got.verdict, CommandHandled)
    assert got.verdict.accepted and got.act and got.verdict.event_time == NOW


def test_a_refused_command_is_admitted_with_its_verdict_but_not_acted_on() -> None:
    stale = new_command("pause", "a", key=KEY, now=NOW - timedelta(minutes=5))
    got = admit(Rec(encode(stale), topic="ns.commands"), now=NOW, commands=gate())
    assert isinstance(got, Admitted) and got.verdict is not None
    assert not got.verdict.accepted and "stale" in got.verdict.reason and not got.act


def test_commands_the_service_does_not_judge_get_no_verdict() -> None:
    cmd = new_command("pause", "a", key=KEY, now=NOW)
    got = admit(Rec(encode(cmd)), now=NOW, commands=gate(), judges=lambda c: c.action == "rotate")
    assert isinstance(got, Admitted) and got.verdict is None
    assert admit(Rec(encode(cmd)), now=NOW) == Admitted(cmd)  # no gate: no verdict


def test_the_dead_letter_keeps_the_record_and_reason_under_one_derived_id() -> None:
    rec = Rec(b"\xff bad")
    d = dead_letter(rec, "x" * (MAX_ERROR_CHARS + 50), service="arbiter", now=NOW)
    assert (d.source_topic, d.partition, d.offset, d.key) == (rec.topic, 2, 41, "BTC-USD")
    assert base64.b64decode(d.payload_b64) == b"\xff bad" and len(d.error) == MAX_ERROR_CHARS
    assert d.service == "arbiter" and d.correlation_id == f"{rec.topic}:2:41"
    # Redelivered or re-read: the same id; another service refusing the same record: another id.
    assert dead_letter(rec, "again", service="arbiter", now=NOW).id == d.id
    assert dead_letter(rec, "x", service="monitor", now=NOW).id != d.id
    assert dead_letter(Rec(b"", offset=42), "x", service="arbiter", now=NOW).id != d.id


def _calls(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def test_no_service_decodes_time_checks_or_dead_letters_its_records_its_own_way() -> None:
    """The plumbing once: the time check and the dead-letter event are built in shared/admit.py only, and no
    service module decodes a consumed record itself."""
    offenders = []
    for path in sorted([*(ROOT / "services").rglob("*.py"), *(ROOT / "shared").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in {"shared/admit.py", "shared/codec.py"}:
            continue
        calls = _calls(path)
        for name in ("implausible_time", "DeadLettered"):
            if name in calls:
                offenders.append(f"{rel} calls {name}")
        if rel.startswith("services/") and rel.endswith("bootstrap.py") and "decode" in calls:
            offenders.append(f"{rel} decodes records itself")
    assert offenders == []
