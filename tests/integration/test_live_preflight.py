"""The pre-flight (`mpctl live check`) and the explicit go-live (`mpctl run --live`, MPCTL_LIVE) against the local
Coinbase peer through real ccxt, with credentials in an encrypted store opened with a key file, as a user has them.

Each refusal is asserted on its exit code and its text, which names the profile; every run's output is scanned
for the credentials. No Kafka or Redis is needed: nothing may start before the pre-flight passes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from mpctl import commands_run
from mpctl.cli import build_parser
from services.execution.bootstrap import LIVE_ENV
from services.execution.credentials import (
    ENV_KEY_FILE,
    ENV_PASSPHRASE,
    ENV_STORE,
    CredentialStore,
    KeySource,
    StoredCredentials,
    new_key_file,
)
from tests.peer.coinbase_peer import CoinbasePeer

REPO = Path(__file__).resolve().parents[2]
D = Decimal
APIS = ["coinbase", "coinbaseexchange"]
PROFILES = ("profile_a", "profile_b")


@dataclass
class Setup:
    """A live config of two profiles, their keys at the peer and in an encrypted store."""

    config: Path
    store: Path
    key_file: Path
    secrets: list[str]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in (ENV_PASSPHRASE, LIVE_ENV)}
        env.update({ENV_KEY_FILE: str(self.key_file), ENV_STORE: str(self.store), "PYTHONPATH": str(REPO)})
        return env


def live_config(path: Path, api: str, **system: Any) -> Path:
    doc = yaml.safe_load((REPO / "config" / "coinbase_profiles.yaml").read_text())
    doc.setdefault("system", {}).update({"mode": "live", **system})
    for p in doc["profiles"].values():
        # Placeholders in the YAML, the keys in the store: as a user who ran `mpctl secrets set` has it.
        p["api_credentials"].update(source="store", exchange=api, sandbox=False)
    path.write_text(yaml.safe_dump(doc))
    return path


def setup(
    peer: CoinbasePeer,
    tmp_path: Path,
    api: str,
    *,
    keys: dict[str, dict[str, Any]] | None = None,
    same_key: bool = False,
) -> Setup:
    """Each profile's key registered at the peer (`keys[profile]`: add_*_profile options) and stored encrypted."""
    kf = tmp_path / "store.key"
    new_key_file(kf)
    store = CredentialStore.create(tmp_path / "credentials.enc", KeySource.from_key_file(kf))
    secrets: list[str] = []
    first: StoredCredentials | None = None
    for pid in PROFILES:
        opts = (keys or {}).get(pid, {})
        if same_key and first is not None:
            store.put(pid, first)
            continue
        if api == "coinbase":
            a = peer.add_advanced_profile(pid, **opts)
            stored = StoredCredentials(SecretStr(a.key_name), SecretStr(a.private_pem))
            secrets += [a.key_name, a.private_pem]
        else:
            e = peer.add_exchange_profile(pid, **opts)
            stored = StoredCredentials(SecretStr(e.api_key), SecretStr(e.secret_b64), SecretStr(e.passphrase))
            secrets += [e.api_key, e.secret_b64, e.passphrase]
        first = first or stored
        store.put(pid, stored)
    store.save()
    return Setup(live_config(tmp_path / "live.yaml", api), tmp_path / "credentials.enc", kf, secrets)


def assert_no_secret(s: Setup, text: str) -> None:
    for v in s.secrets:
        pieces = [v] + [line for line in v.splitlines() if len(line) > 20 and "-----" not in line]
        for piece in pieces:
            assert piece not in text, "a credential appeared in the output"


async def mpctl(s: Setup, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mpctl.cli",
        *argv,
        cwd=REPO,
        env=env or s.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode() + err.decode()
    assert_no_secret(s, text)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def live_check(peer: CoinbasePeer, s: Setup, *extra: str) -> tuple[int, str]:
    code, out, err = await mpctl(
        s,
        "live",
        "check",
        "--config",
        str(s.config),
        "--store",
        str(s.store),
        "--api-base",
        peer.base_url,
        "--timeout",
        "5",
        *extra,
    )
    return code, out + err


def failure_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("FAIL ")]


# ------------------------------------------------------------------------------------------ mpctl live check
@pytest.mark.parametrize("api", APIS)
async def test_a_good_two_profile_setup_passes(peer: CoinbasePeer, tmp_path: Path, api: str) -> None:
    s = setup(peer, tmp_path, api)
    code, text = await live_check(peer, s)
    assert code == 0, text
    assert "pre-flight passed: 2 profile(s)" in text
    assert not failure_lines(text)
    for pid in PROFILES:
        # A table per profile: what it trades with, and each check.
        assert f"{pid}: {'Advanced Trade' if api == 'coinbase' else 'Exchange API'}, key ..." in text
        assert f"portfolio portfolio-{pid}" in text
    for check in ("clock", "key", "permissions", "account", "products", "balance"):
        assert f"  {check} " in text
    assert "balance rule: the free USDC must cover the largest entry" in text
    if api == "coinbaseexchange":  # the Exchange API cannot say whether the key can transfer: a warning
        assert "warn profile_a permissions: not reported by the Exchange API" in text
    else:
        assert "view yes, trade yes, transfer no" in text
    assert not any(r.method == "POST" for r in peer.requests), "the pre-flight placed something"


async def test_a_key_that_can_transfer_is_refused(peer: CoinbasePeer, tmp_path: Path) -> None:
    s = setup(peer, tmp_path, "coinbase", keys={"profile_b": {"can_transfer": True}})
    code, text = await live_check(peer, s)
    assert code == 1, text
    (line,) = failure_lines(text)
    assert line.startswith(
        "FAIL profile_b permissions: view yes, trade yes, transfer yes: the key can move funds"
    )
    assert "a trading key must not be able to move funds" in line and "mpctl secrets set profile_b" in line


@pytest.mark.parametrize("api", APIS)
async def test_two_profiles_on_one_portfolio_are_refused(
    peer: CoinbasePeer, tmp_path: Path, api: str
) -> None:
    shared = {"portfolio": "portfolio-shared"}
    s = setup(peer, tmp_path, api, keys={"profile_a": shared, "profile_b": shared})
    code, text = await live_check(peer, s)
    assert code == 1, text
    lines = failure_lines(text)
    assert len(lines) == 2, text
    for pid, other in (("profile_a", "profile_b"), ("profile_b", "profile_a")):
        assert any(
            line.startswith(
                f"FAIL {pid} account: {pid} and {other} trade the same portfolio portfolio-shared"
            )
            and "two profiles on one account are not independent" in line
            and "give each profile its own portfolio" in line
            for line in lines
        ), text


async def test_two_profiles_with_one_key_are_refused(peer: CoinbasePeer, tmp_path: Path) -> None:
    s = setup(peer, tmp_path, "coinbase", same_key=True)
    code, text = await live_check(peer, s)
    assert code == 1, text
    assert any(
        line.startswith("FAIL profile_a account: profile_a and profile_b use the same API key")
        for line in failure_lines(text)
    ), text


@pytest.mark.parametrize("api", APIS)
async def test_a_clock_30_s_off_is_refused(peer: CoinbasePeer, tmp_path: Path, api: str) -> None:
    s = setup(peer, tmp_path, api)
    peer.clock_offset_s = 30.0
    code, text = await live_check(peer, s)
    assert code == 1, text
    for pid in PROFILES:
        assert any(
            re.match(
                rf"FAIL {pid} clock: the local clock is -(29|30)\.\d s off the exchange's \(limit 5 s\)", line
            )
            and "synchronise the clock (NTP" in line
            for line in failure_lines(text)
        ), text
    # The limit is a flag: 60 s accepts it on Advanced Trade (a JWT lives 120 s; the Exchange API refuses a
    # signature 30 s old, and says why).
    if api == "coinbase":
        code, text = await live_check(peer, s, "--max-clock-skew", "60")
        assert code == 0, text


@pytest.mark.parametrize("api", APIS)
async def test_a_cancel_only_product_is_refused(peer: CoinbasePeer, tmp_path: Path, api: str) -> None:
    s = setup(peer, tmp_path, api)
    peer.set_status("ETH/USDC", "cancel_only")  # both profiles trade ETH
    peer.set_status("LINK/USDC", "disabled")  # profile_b's base asset, profile_a's random pool
    code, text = await live_check(peer, s, "--profile", "profile_a")
    assert code == 1, text
    lines = failure_lines(text)
    assert any(
        line.startswith("FAIL profile_a products: ETH/USDC is cancel-only at the exchange, not online")
        and "remove it from the profile's trading_pairs" in line
        for line in lines
    ), text
    assert any(line.startswith("FAIL profile_a products: LINK/USDC is disabled") for line in lines), text
    assert "profile_b" not in text  # --profile: only the profile asked for


async def test_a_quote_balance_too_small_is_refused(peer: CoinbasePeer, tmp_path: Path) -> None:
    s = setup(peer, tmp_path, "coinbase")
    peer.account_of("profile_b").balances["USDC"] = D("0.5")
    code, text = await live_check(peer, s)
    assert code == 1, text
    (line,) = failure_lines(text)
    # profile_b: equity 0.5, the USDC alone: the 1 BTC, 10 ETH and 100 SOL the account holds were not traded by
    # the system (risk_management.sell_untracked is off), so they are not its equity and do not size its entries.
    # Its largest minimum order (LTC/USDC: 0.1 x 80 = 8 USDC) is more than it has.
    assert line.startswith("FAIL profile_b balance: USDC free 0.5 < 8 needed"), line
    assert "equity 0.5 x" in line and "largest minimum order 8 (LTC/USDC)" in line
    assert "add at least" in line and "lower strategy_config.max_position_size_pct" in line


async def test_a_missing_store_entry_is_a_failure_with_the_command_to_run(
    peer: CoinbasePeer, tmp_path: Path
) -> None:
    s = setup(peer, tmp_path, "coinbase")
    store = CredentialStore.load(s.store)
    store.unlock(KeySource.from_key_file(s.key_file))
    store.remove("profile_b")
    store.save()
    code, text = await live_check(peer, s)
    assert code == 1, text
    assert any(
        line.startswith("FAIL profile_b key: no usable credentials") and "mpctl secrets set profile_b" in line
        for line in failure_lines(text)
    ), text


# ------------------------------------------------------------------------------------------ going live
def run_args(s: Setup, peer: CoinbasePeer, out: Path, *extra: str) -> argparse.Namespace:
    return build_parser("run").parse_args(
        ["run", "--config", str(s.config), "--out", str(out), "--exchange-api-base", peer.base_url, *extra]
    )


async def test_mpctl_run_refuses_a_live_config_without_live(peer: CoinbasePeer, tmp_path: Path) -> None:
    s = setup(peer, tmp_path, "coinbase")
    out = tmp_path / "run"
    code, stdout, stderr = await mpctl(s, "run", "--config", str(s.config), "--out", str(out))
    assert code == 1, stdout + stderr
    assert "starts only with `mpctl run --live`" in stderr and "mpctl live check" in stderr
    assert not out.exists(), "something was started"
    assert not peer.requests, "the exchange was called"


async def test_mpctl_run_live_runs_the_preflight_and_starts_nothing_when_it_fails(
    peer: CoinbasePeer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup(peer, tmp_path, "coinbase")
    for k, v in s.env().items():
        monkeypatch.setenv(k, v)
    started: list[str] = []

    async def no_pipeline(args: argparse.Namespace, *_: Any, **__: Any) -> int:
        started.append(str(args.out))
        return 0

    monkeypatch.setattr(commands_run, "run_pipeline", no_pipeline)
    peer.set_status("SOL/USDC", "cancel_only")
    run: Callable[[argparse.Namespace], int] = commands_run.run_forward
    # In a thread: the pre-flight runs its own event loop, the peer answers on this one.
    code = await asyncio.to_thread(run, run_args(s, peer, tmp_path / "run", "--live"))
    text = capsys.readouterr()
    assert code == 1, text.out + text.err
    assert "FAIL profile_a products: SOL/USDC is cancel-only" in text.out
    assert "the pre-flight failed (above); nothing was started" in text.err
    assert started == [] and not (tmp_path / "run").exists()

    # Online again: the pre-flight passes, the run prints what trades with which account, then starts.
    peer.set_status("SOL/USDC", "online")
    code = await asyncio.to_thread(run, run_args(s, peer, tmp_path / "run", "--live"))
    text = capsys.readouterr()
    assert code == 0, text.out + text.err
    assert started == [str(tmp_path / "run")]
    assert f"going live: real orders to {peer.base_url}" in text.out
    table = text.out.split("going live:", 1)[1]
    for pid in PROFILES:
        row = next(line for line in table.splitlines() if line.strip().startswith(pid))
        assert "Advanced Trade (coinbase)" in row and f"portfolio-{pid}" in row and "BTC/USDC" in row
    assert_no_secret(s, text.out + text.err)


async def test_the_execution_worker_refuses_live_mode_without_mpctl_live(
    peer: CoinbasePeer, tmp_path: Path
) -> None:
    s = setup(peer, tmp_path, "coinbase")
    for value in (None, "0", "yes"):
        env = s.env()
        if value is not None:
            env[LIVE_ENV] = value
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.execution",
            "--profile",
            "profile_a",
            "--config",
            str(s.config),
            "--bootstrap",
            "127.0.0.1:1",  # never reached: the worker refuses before any connection
            "--exchange-api-base",
            peer.base_url,
            cwd=REPO,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        text = out.decode() + err.decode()
        assert proc.returncode == 2, text
        assert f"starts live only with {LIVE_ENV}=1" in text and "mpctl run --live" in text
        assert_no_secret(s, text)
    assert not peer.requests, "the worker called the exchange"
