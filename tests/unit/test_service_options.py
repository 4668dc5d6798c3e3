"""Typed settings (issue #18 item 5): what every service shares is ServiceSettings; what one service takes is its own
options model. A typo or a bad value fails at start, naming the option and the value; nothing is parsed from
strings inside a bootstrap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.execution.bootstrap import ExecutionOptions
from services.ingest.bootstrap import LiveSourceOptions
from services.registry.bootstrap import RegistryOptions
from shared.bus import KafkaAccess
from shared.runtime import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]


def test_settings_and_options_refuse_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ServiceSettings(kafka=KafkaAccess(servers="b:1"), extra={"metrics_port": "1"})  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="less than or equal to 65535"):
        ServiceSettings(kafka=KafkaAccess(servers="b:1"), metrics_port=70000)
    with pytest.raises(ValidationError, match="publish_lease_s"):
        RegistryOptions(publish_lease_s=0)
    with pytest.raises(ValidationError, match="clock"):
        RegistryOptions(clock="sundial")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="exchange_api_bas"):
        ExecutionOptions(exchange_api_bas="http://x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="ws_uri"):
        LiveSourceOptions(ws_uri="ws://x")  # type: ignore[call-arg]
    assert ExecutionOptions().allow_plaintext_credentials is False
    assert RegistryOptions().publish_lease_s == 10.0


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["services.ingest", "--source", "replay", "--hours", "abc"], "--hours: not a number: 'abc'"),
        (["services.ingest", "--source", "replay", "--hours", "-5"], "must be a number above 0"),
        (["services.ingest", "--source", "replay", "--start", "yesterday"], "not an ISO time"),
        (["services.ingest", "--source", "replay", "--speed", "inf"], "--speed: must be a number above 0"),
        (["services.registry", "--publish-lease-s", "0"], "--publish-lease-s"),
        (["services.registry", "--clock", "sundial"], "invalid choice: 'sundial'"),
    ],
)
def test_a_bad_option_fails_at_start_in_one_line(argv: list[str], says: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *argv, "--bootstrap", "127.0.0.1:1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
