"""Signed commands: every refusal case, key loading, and the same verdicts when a service re-reads the log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.codec import decode, encode
from shared.commands import CommandGate, CommandKeyError, CommandVerifier, load_command_key, new_command, sign

KEY = b"k" * 32
T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


def verifier(max_age_s: float = 60) -> CommandVerifier:
    return CommandVerifier(KEY, timedelta(seconds=max_age_s))


def test_signed_command_is_accepted_and_survives_the_codec() -> None:
    cmd = decode(encode(new_command("pause", "profile_a", key=KEY, now=T0)))
    assert verifier().verify(cmd, T0 + timedelta(seconds=5)) is None  # type: ignore[arg-type]


def test_unsigned_command_is_refused() -> None:
    cmd = new_command("kill", "all", key=KEY, now=T0).model_copy(update={"signature": None})
    assert verifier().verify(cmd, T0) == "unsigned command"


@pytest.mark.parametrize("field,value", [("target", "profile_b"), ("action", "resume"), ("nonce", "f" * 32)])
def test_command_altered_after_signing_is_refused(field: str, value: str) -> None:
    cmd = new_command("pause", "profile_a", key=KEY, now=T0).model_copy(update={field: value})
    assert verifier().verify(cmd, T0) == "bad signature"


def test_command_signed_with_another_key_is_refused() -> None:
    cmd = new_command("pause", "profile_a", key=b"x" * 32, now=T0)
    assert verifier().verify(cmd, T0) == "bad signature"


def test_stale_command_is_refused_with_its_age() -> None:
    cmd = new_command("flatten", "profile_a", key=KEY, now=T0)
    reason = verifier(60).verify(cmd, T0 + timedelta(seconds=61))
    assert reason is not None and reason.startswith("stale: issued 61 s ago, max age 60 s")


def test_command_from_the_future_is_refused() -> None:
    cmd = new_command("pause", "profile_a", key=KEY, now=T0 + timedelta(minutes=5))
    reason = verifier().verify(cmd, T0)
    assert reason is not None and "future" in reason


def test_replayed_command_is_refused_the_second_time() -> None:
    v = verifier()
    cmd = new_command("resume", "profile_a", key=KEY, now=T0)
    assert v.verify(cmd, T0) is None
    reason = v.verify(cmd, T0 + timedelta(seconds=1))
    assert reason is not None and reason.startswith("replayed nonce")


def test_gate_gives_the_same_verdicts_when_the_log_is_read_again() -> None:
    good = new_command("pause", "profile_a", key=KEY, now=T0)
    log = [
        (good, T0),
        (good, T0 + timedelta(seconds=2)),
        (sign(good, b"y" * 32), T0),
        (good, T0 + timedelta(hours=1)),
    ]

    def verdicts() -> list[tuple[bool, str]]:
        gate = CommandGate(verifier(), "strategy.profile_a")
        return [(h.accepted, h.reason.split(":")[0]) for h in (gate.check(c, t) for c, t in log)]

    first = verdicts()
    assert first == verdicts()  # a restarted service that re-reads the topic decides the same
    assert [a for a, _ in first] == [True, False, False, False]


def test_key_is_loaded_from_env_or_file_and_errors_never_show_it(tmp_path: Path) -> None:
    f = tmp_path / "key"
    f.write_text("s3cret-command-key-from-file\n")
    assert load_command_key({"MPCTL_COMMAND_KEY_FILE": str(f)}) == b"s3cret-command-key-from-file"
    assert load_command_key({"MPCTL_COMMAND_KEY": "s3cret-command-key-env"}) == b"s3cret-command-key-env"
    with pytest.raises(CommandKeyError, match="no command key"):
        load_command_key({})
    with pytest.raises(CommandKeyError) as err:
        load_command_key({"MPCTL_COMMAND_KEY": "shortsecret"})
    assert "shortsecret" not in str(err.value) and "too short" in str(err.value)
    with pytest.raises(CommandKeyError, match="cannot read"):
        load_command_key({"MPCTL_COMMAND_KEY_FILE": str(tmp_path / "missing")})
