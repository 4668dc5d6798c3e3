"""A containerised live deployment, without Docker: the user exports one profile's entry of a passphrase store
(`mpctl secrets export`), and the real execution worker process is started with only what its container gets
(the compose secrets / Kubernetes Secret: the export and its key, MPCTL_CREDENTIALS_STORE, no passphrase, a YAML
of placeholders). It authenticates to the Coinbase peer as its profile, the order it places is signed with that
profile's key, and no secret value appears in anything it or the export command printed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml
from pydantic import SecretStr

from mpctl.bus import redis_password_rule
from services.execution.bootstrap import LIVE_ENV
from services.execution.credentials import (
    ENV_KEY_FILE,
    ENV_PASSPHRASE,
    ENV_STORE,
    CredentialStore,
    KeySource,
    ScryptParams,
    StoredCredentials,
)
from shared.bus import ENV_PASSWORD_FILE
from shared.config import parse_config
from shared.kafka import Publisher
from shared.snapshots import KEY_FILE_ENV as STATE_KEY_FILE_ENV
from shared.topics import Topics
from tests.bus import create_namespace, service_env
from tests.integration.test_exchange_adapters import execute
from tests.peer.coinbase_peer import CoinbasePeer
from tests.unit.builders import candle

ROOT = Path(__file__).resolve().parents[2]
PID = "profile_a"


def live_config(path: Path) -> Path:
    """The template in live mode against the peer; credentials stay placeholders, as in a container's ConfigMap."""
    data = yaml.safe_load((ROOT / "config" / "coinbase_profiles.yaml").read_text())
    data.setdefault("system", {})["mode"] = "live"
    for pid, p in data["profiles"].items():
        assert p["api_credentials"]["api_key"].startswith("YOUR_"), pid
        p["api_credentials"].update(source="store", sandbox=False, exchange="coinbase")
        p["trading_params"].update(order_timeout=30.0, slippage_tolerance=0.001)
    path.write_text(yaml.safe_dump(data))
    return path


async def test_worker_given_only_its_containers_secrets_trades_as_its_profile_and_prints_no_secret(
    peer: CoinbasePeer, kafka_bootstrap: str, namespace: str, tmp_path: Path
) -> None:
    a = peer.add_advanced_profile(PID)
    b = peer.add_exchange_profile("profile_b")
    # The user's store: a passphrase, both profiles.
    passphrase = "user store passphrase for the container test 3d91"
    user_store = tmp_path / "user" / "credentials.enc"
    s = CredentialStore.create(
        user_store, KeySource.from_passphrase(passphrase), scrypt=ScryptParams(n=2**10)
    )
    s.put(PID, StoredCredentials(SecretStr(a.key_name), SecretStr(a.private_pem)))
    s.put(
        "profile_b", StoredCredentials(SecretStr(b.api_key), SecretStr(b.secret_b64), SecretStr(b.passphrase))
    )
    s.save()

    # The export, through the command the user runs (the passphrase from the environment, as in a script).
    secrets_dir = tmp_path / "secrets"
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path / "home"),
        "PYTHONUNBUFFERED": "1",
    }
    export = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mpctl.cli",
        "secrets",
        "export",
        PID,
        "--out",
        str(secrets_dir),
        "--store",
        str(user_store),
        cwd=ROOT,
        env={**base_env, ENV_PASSPHRASE: passphrase},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    export_out = (await asyncio.wait_for(export.communicate(), 60))[0].decode(errors="replace")
    assert export.returncode == 0, export_out
    enc, key = secrets_dir / f"{PID}.enc", secrets_dir / f"{PID}.key"
    assert json.loads(enc.read_text())["entries"].keys() == {PID}

    cfg_path = live_config(tmp_path / "profiles.yaml")
    cfg = parse_config(yaml.safe_load(cfg_path.read_text()))
    t = Topics(namespace)
    await create_namespace(kafka_bootstrap, cfg, namespace)  # the `topics` service's job
    order = execute(PID, "container-credentials")
    pub = Publisher(kafka_bootstrap, client_id="test")
    await pub.start()
    try:
        # The market as the ingest reports it: the worker's price band needs the product's latest close.
        hour = int(order.event_time.timestamp()) // 3600 * 3600 - 3600
        close = order.reference_price
        await pub.send(t.candles, candle(order.product, hour, close, close=close), key=order.product)
        await pub.send(t.approved(PID), order, key=order.product)
        await pub.flush()
    finally:
        await pub.stop()

    # Only what the container has: the two mounted files, the store's path, no passphrase, no user store.
    # MPCTL_LIVE=1: the explicit go-live setting a live config's container gets (`MPCTL_LIVE=1 docker compose up`).
    # Its bus principal as a container gets it: a mounted password file (tests/bus.py).
    bus_env = service_env(kafka_bootstrap, ["services.execution", "--namespace", namespace, "--profile", PID])
    container_env = {**base_env, **bus_env, ENV_STORE: str(enc), ENV_KEY_FILE: str(key), LIVE_ENV: "1"}
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.execution",
        "--profile",
        PID,
        "--config",
        str(cfg_path),
        "--source",
        "replay",
        "--bootstrap",
        kafka_bootstrap.servers,
        "--namespace",
        namespace,
        "--exchange-api-base",
        peer.base_url,
        # DEBUG: the most verbose output the worker can give (aiokafka, ccxt, aiohttp) is what the scan reads;
        # at INFO a healthy worker may print nothing at all.
        "--log-level",
        "DEBUG",
        cwd=ROOT,
        env=container_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not peer.orders and worker.returncode is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
        try:
            worker_out = (await asyncio.wait_for(worker.communicate(), 20))[0].decode(errors="replace")
        except TimeoutError:
            worker.kill()
            worker_out = (await worker.communicate())[0].decode(errors="replace")

    # It authenticated as profile_a, and its order is signed with profile_a's key.
    assert peer.orders, f"no order reached the peer; worker output:\n{worker_out}"
    # The order the worker was given; once filled, its position's stop rests at the peer too (issue #13).
    (placed,) = [o for o in peer.orders if not o.protective]
    assert all(o.profile == placed.profile and o.side == "sell" for o in peer.orders if o.protective)
    assert (placed.client_id, placed.profile, placed.signed_by) == (order.client_order_id, PID, a.key_name)
    signed = [r for r in peer.requests if r.key_id is not None]
    assert signed and {(r.profile, r.key_id) for r in signed} == {(PID, a.key_name)}
    assert peer.rejected_auth == []
    assert "Traceback" not in worker_out and worker_out.strip()  # the scan below reads real output

    # No secret value in anything printed: the export command's output or the worker's.
    pem_lines = [ln for ln in a.private_pem.splitlines() if ln and "-----" not in ln]
    secrets_ = [
        a.key_name,
        a.private_pem,
        *pem_lines,
        b.api_key,
        b.secret_b64,
        b.passphrase,
        passphrase,
        key.read_text().strip(),
        # The worker's bus password (its Redis password too), and the broker admin's (which it never has),
        # and the digests Redis keeps of them.
        *(bus_password := [Path(bus_env[ENV_PASSWORD_FILE]).read_text().strip()] if bus_env else []),
        *(
            admin_password := [kafka_bootstrap.password.get_secret_value()]
            if kafka_bootstrap.password
            else []
        ),
        *(redis_password_rule(SecretStr(v))[1:] for v in [*bus_password, *admin_password]),
        # The snapshot key the worker was given as a file (tests/bus.py, as mpctl gives it).
        *([Path(bus_env[STATE_KEY_FILE_ENV]).read_text().strip()] if STATE_KEY_FILE_ENV in bus_env else []),
    ]
    for where, text in (("export", export_out), ("worker", worker_out)):
        assert [v[:8] for v in secrets_ if v in text] == [], f"secret values in the {where} output"
