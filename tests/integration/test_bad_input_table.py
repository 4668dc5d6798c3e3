"""Bad input files on the command line, table-driven (issue #19, item 6).

Each case runs a real command as its own process (`python -m mpctl.cli ...`, or a service's module) on a broken
profiles file or credentials store and requires: a non-zero exit, no traceback, exactly one line of output that
names the file and the problem, and nothing written: no output folder, nothing in the working directory, no
topic of the run's namespace on the broker, the store's bytes unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr

from mpctl.infra import Endpoints
from services.execution.credentials import CredentialStore, KeySource, ScryptParams, StoredCredentials
from shared.kafka import list_topics

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "config" / "coinbase_profiles.yaml"
DATA = ROOT / "data" / "market"
PASSPHRASE = "bad-input table passphrase 5521"
# Values `mpctl secrets set` is given: they must never be echoed, whatever fails.
SET_KEY = "badinputkey9f3e1c"
SET_SECRET = base64.b64encode(b"bad-input-secret-" + b"z" * 31).decode()
SET_PASS = "badinputpass77"

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------------------ bad files
def gzipped_config(folder: Path) -> Path:
    """A binary file given as the config: the template, gzipped (its second byte is 0x8b)."""
    path = folder / "profiles.yaml.gz"
    path.write_bytes(gzip.compress(TEMPLATE.read_bytes(), mtime=0))
    return path


def control_char_config(folder: Path) -> Path:
    path = folder / "profiles.yaml"
    path.write_bytes(TEMPLATE.read_bytes().replace(b"profiles:", b"profiles:\x00", 1))
    return path


def huge_timeout_config(folder: Path) -> Path:
    path = folder / "profiles.yaml"
    text = TEMPLATE.read_text(encoding="utf-8")
    assert "order_timeout: 45\n" in text
    path.write_text(text.replace("order_timeout: 45\n", "order_timeout: 1e308\n", 1), encoding="utf-8")
    return path


def _store(folder: Path) -> Path:
    """A valid passphrase store holding profile_a (scrypt cost lowered for speed, inside the bounds)."""
    path = folder / "credentials.enc"
    store = CredentialStore.create(path, KeySource.from_passphrase(PASSPHRASE), scrypt=ScryptParams(n=2**10))
    store.put("profile_a", StoredCredentials(SecretStr(SET_KEY), SecretStr(SET_SECRET), SecretStr(SET_PASS)))
    store.save()
    return path


def store_with_a_bad_byte(folder: Path) -> Path:
    path = _store(folder)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"mpctl-credentials")] = 0xE9  # a Latin-1 'é' where UTF-8 was expected
    path.write_bytes(bytes(raw))
    return path


def store_with_scrypt_cost_2_40(folder: Path) -> Path:
    path = _store(folder)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["kdf"]["n"] = 2**40  # 128 TiB of scrypt memory: a MemoryError before the bound
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def store_with_scrypt_p_2_31(folder: Path) -> Path:
    path = _store(folder)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["kdf"]["p"] = 2**31  # hours of derivation
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@dataclass(frozen=True)
class BadFile:
    make: Callable[[Path], Path]
    problem: tuple[str, ...]  # fragments the one line must hold besides the file's path


GZIPPED = BadFile(gzipped_config, ("not a YAML text file", "byte 0x8b at offset 1"))
CONTROL_CHAR = BadFile(control_char_config, ("not valid YAML", "control character"))
HUGE_TIMEOUT = BadFile(
    huge_timeout_config,
    ("profiles.profile_a.trading_params.order_timeout", "less than or equal to 2592000", "1e308"),
)
BAD_BYTE_STORE = BadFile(store_with_a_bad_byte, ("not a credentials store", "byte 0xe9", "not UTF-8"))
SCRYPT_N_STORE = BadFile(store_with_scrypt_cost_2_40, ("scrypt n = 1099511627776", "out of bounds"))
SCRYPT_P_STORE = BadFile(store_with_scrypt_p_2_31, ("scrypt p = 2147483648", "out of bounds"))


# ------------------------------------------------------------------------------------------ commands
@dataclass(frozen=True)
class Command:
    """argv after `python`, with {file}, {out} and {ns} filled in; `stdin` is fed to the process."""

    argv: tuple[str, ...]
    stdin: str = ""

    def args(self, file: Path, out: Path, ns: str) -> list[str]:
        return [a.format(file=file, out=out, ns=ns, data=DATA, template=TEMPLATE) for a in self.argv]

    @property
    def uses_broker(self) -> bool:
        return any("{ns}" in a for a in self.argv)


def mpctl(*argv: str, stdin: str = "") -> Command:
    return Command(("-m", "mpctl.cli", *argv), stdin)


CONFIG_COMMANDS = {
    "config-validate": mpctl("config", "validate", "{file}"),
    "backtest": mpctl(
        "backtest", "--config", "{file}", "--data", "{data}", "--out", "{out}", "--hours", "48"
    ),
    "demo": mpctl(
        "demo",
        "--config",
        "{file}",
        "--data",
        "{data}",
        "--out",
        "{out}",
        "--hours",
        "24",
        "--namespace",
        "{ns}",
    ),
    "run": mpctl(
        "run",
        "--config",
        "{file}",
        "--source",
        "replay",
        "--data",
        "{data}",
        "--out",
        "{out}",
        "--namespace",
        "{ns}",
    ),
    "compose-render": mpctl("compose", "render", "--config", "{file}", "--out", "{out}/docker-compose.yml"),
    "k8s-render": mpctl("k8s", "render", "--config", "{file}", "--out", "{out}"),
    "exchange-check": mpctl("exchange", "check", "profile_a", "--config", "{file}"),
    "registry-service": Command(("-m", "services.registry", "--config", "{file}", "--namespace", "{ns}")),
}
SET_VALUES = json.dumps({"api_key": SET_KEY, "secret": SET_SECRET, "passphrase": SET_PASS})
STORE_COMMANDS = {
    "secrets-list": mpctl("secrets", "list", "--store", "{file}"),
    "secrets-set": mpctl("secrets", "set", "profile_b", "--store", "{file}", stdin=SET_VALUES),
    "secrets-remove": mpctl("secrets", "remove", "profile_a", "--store", "{file}"),
    "secrets-export": mpctl("secrets", "export", "profile_a", "--store", "{file}", "--out", "{out}"),
    "exchange-check": mpctl("exchange", "check", "profile_a", "--config", "{template}", "--store", "{file}"),
}


def _table() -> list[object]:
    rows: list[object] = []

    def add(file_id: str, bad: BadFile, commands: dict[str, Command], names: list[str] | None = None) -> None:
        for name in names or list(commands):
            rows.append(pytest.param(bad, commands[name], id=f"{file_id}-{name}"))

    add("binary-config", GZIPPED, CONFIG_COMMANDS)  # every command that loads a profiles file
    add("control-char-config", CONTROL_CHAR, CONFIG_COMMANDS, ["config-validate", "backtest", "demo"])
    add("order-timeout-1e308", HUGE_TIMEOUT, CONFIG_COMMANDS, ["config-validate", "backtest", "demo", "run"])
    add("store-non-utf8-byte", BAD_BYTE_STORE, STORE_COMMANDS)
    add("store-scrypt-n-2^40", SCRYPT_N_STORE, STORE_COMMANDS)
    add("store-scrypt-p-2^31", SCRYPT_P_STORE, STORE_COMMANDS, ["secrets-list", "secrets-set"])
    return rows


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in folder.rglob("*")}


@pytest.mark.parametrize(("bad", "command"), _table())
def test_bad_input_gives_one_line_naming_file_and_problem_and_writes_nothing(
    tmp_path: Path, infra: Endpoints, bad: BadFile, command: Command
) -> None:
    inputs, cwd, home = tmp_path / "inputs", tmp_path / "cwd", tmp_path / "home"
    for folder in (inputs, cwd, home):
        folder.mkdir()
    file = bad.make(inputs)
    before = _listing(inputs)
    out = tmp_path / "out"
    ns = f"bad{uuid.uuid4().hex[:10]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MPCTL_")},
        "PYTHONPATH": str(ROOT),
        "KAFKA_BOOTSTRAP_SERVERS": infra.kafka.servers,
        "REDIS_URL": infra.redis_url,
        "CI": "true",
        "HOME": str(home),  # no default store or config of the user's is read
        "XDG_CONFIG_HOME": str(home / ".config"),
        "MPCTL_SECRETS_PASSPHRASE": PASSPHRASE,  # so that a command gets as far as opening the store
    }
    proc = subprocess.run(
        [sys.executable, *command.args(file, out, ns)],
        cwd=cwd,
        env=env,
        input=command.stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    lines = [line for line in output.splitlines() if line.strip()]

    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    assert len(lines) == 1, output
    assert str(file) in lines[0], output
    for fragment in bad.problem:
        assert fragment in lines[0], (fragment, output)
    for secret in (SET_KEY, SET_SECRET, SET_PASS, PASSPHRASE):
        assert secret not in output

    assert not out.exists(), sorted(_listing(out))
    assert not any(cwd.iterdir()), sorted(_listing(cwd))
    assert _listing(inputs) == before  # the bad file itself is untouched, and nothing was added beside it
    if command.uses_broker:
        topics = asyncio.run(list_topics(infra.kafka))
        assert not [t for t in topics if t.startswith(ns)]
