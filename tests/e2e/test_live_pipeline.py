"""The whole pipeline with live execution: `mpctl demo --exchange-api-base` runs ingest, registry, strategies,
arbiter, monitor and two execution workers in live mode, each in its own process, through real ccxt against the
local Coinbase peer (tests/peer/coinbase_peer.py) on loopback. profile_a trades on Advanced Trade (ES256 JWT),
profile_b on the Exchange API (HMAC with passphrase); both keys come from the encrypted store, opened with a
passphrase. Then: every order reached the peer once, signed by its own profile's key, its fills are in the run's
output once, and no secret appears in any log file, output file, or message of any topic of the run."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer

from mpctl.infra import Endpoints
from services.execution.live import protective_client_id
from shared.kafka import partitions_of
from tests.peer.coinbase_peer import CoinbasePeer

ROOT = Path(__file__).resolve().parents[2]
# A slice of the bundled data in which both default profiles trade (after their indicators' warm-up).
HOURS = "168"


async def run(
    cmd: list[str], env: dict[str, str], *, stdin: bytes | None = None, timeout: float = 120
) -> tuple[int, str]:
    """A subprocess that does not block the event loop the peer answers on."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def topic_bytes(bootstrap: str, namespace: str) -> tuple[list[bytes], int]:
    """Every record (key and value, raw bytes) of every topic of the namespace, and how many topics."""
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False)
    await consumer.start()
    blobs: list[bytes] = []
    try:
        names = sorted(t for t in await consumer.topics() if t.startswith(f"{namespace}."))
        tps = await partitions_of(consumer, names, bootstrap)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        left = {tp for tp in tps if ends[tp] > 0}
        while left:
            for tp, recs in (await consumer.getmany(timeout_ms=1000)).items():
                for rec in recs:
                    blobs += [rec.value or b"", rec.key or b""]
                    if rec.offset + 1 >= ends[tp]:
                        left.discard(tp)
        return blobs, len(names)
    finally:
        await consumer.stop()


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_live_pipeline_signs_each_profiles_orders_with_its_own_key_once_and_leaks_no_secret(
    infra: Endpoints, peer: CoinbasePeer, tmp_path: Path
) -> None:
    adv = peer.add_advanced_profile("profile_a")
    exc = peer.add_exchange_profile("profile_b")
    store_passphrase = "store passphrase for the live pipeline test 7f3c"
    store = tmp_path / "secrets" / "credentials.enc"
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=infra.kafka.servers,
        REDIS_URL=infra.redis_url,
        CI="true",
        MPCTL_CREDENTIALS_STORE=str(store),
        MPCTL_SECRETS_PASSPHRASE=store_passphrase,
    )
    env.pop("MPCTL_SECRETS_KEY_FILE", None)
    # The credentials go into the encrypted store through the command a user runs; the YAML keeps placeholders.
    outputs: list[str] = []
    for profile, values, api in (
        ("profile_a", {"api_key": adv.key_name, "secret": adv.private_pem}, "coinbase"),
        (
            "profile_b",
            {"api_key": exc.api_key, "secret": exc.secret_b64, "passphrase": exc.passphrase},
            "coinbaseexchange",
        ),
    ):
        code, text = await run(
            [sys.executable, "-m", "mpctl.cli", "secrets", "set", profile, "--exchange", api],
            env,
            stdin=json.dumps(values).encode(),
        )
        assert code == 0, text
        outputs.append(text)
    cfg = yaml.safe_load((ROOT / "config" / "coinbase_profiles.yaml").read_text())
    cfg.setdefault("system", {})["mode"] = "live"
    for pid, api in (("profile_a", "coinbase"), ("profile_b", "coinbaseexchange")):
        c = cfg["profiles"][pid]["api_credentials"]
        c.update(source="store", exchange=api, sandbox=False)
        assert c["api_key"].startswith("YOUR_")
    cfg_path = tmp_path / "live.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    out = tmp_path / "run"
    namespace = f"live{os.getpid()}"
    code, text = await run(
        [
            sys.executable,
            "-m",
            "mpctl.cli",
            "demo",
            "--config",
            str(cfg_path),
            "--out",
            str(out),
            "--hours",
            HOURS,
            "--exchange-api-base",
            peer.base_url,
            "--namespace",
            namespace,
            "--keep-topics",
            "--timeout",
            "100",
        ],
        env,
        timeout=150,
    )
    outputs.append(text)
    assert code == 0, text

    # Orders reached the peer, both profiles', each signed with its own profile's key, each client order id once.
    orders, fills = jsonl(out / "orders.jsonl"), jsonl(out / "fills.jsonl")
    profile_of = {o["client_order_id"]: o["profile"] for o in orders}
    key_of = {"profile_a": adv.key_name, "profile_b": exc.api_key}
    assert {o.profile for o in peer.orders} == {"profile_a", "profile_b"}, [o.profile for o in peer.orders]
    # Each filled entry left its stop resting at the exchange (issue #13), under an id derived from the entry's.
    entries = {o["client_order_id"] for o in orders if o["side"] == "buy" and o["status"] == "filled"}
    protective_of = {protective_client_id(c): c for c in entries}
    resting = [o for o in peer.orders if o.order_type in ("stop_limit", "bracket")]
    assert resting, "no protective order rested at the exchange"
    for o in resting:
        assert o.client_id in protective_of, (
            f"protective order {o.client_id} at the peer has no entry in the run"
        )
        profile_of[o.client_id] = profile_of[protective_of[o.client_id]]
    for o in peer.orders:
        assert o.client_id in profile_of, f"order {o.client_id} at the peer is not in the run's output"
        assert o.profile == profile_of[o.client_id] and o.signed_by == key_of[o.profile]
    assert all(n == 1 for n in Counter(o.client_id for o in peer.orders).values())
    sent = {o["client_order_id"] for o in orders if o["status"] == "submitted"}
    assert {o["client_order_id"] for o in orders if o["status"] == "filled"} <= {
        o.client_id for o in peer.orders
    }
    assert {o.client_id for o in peer.orders if o not in resting} <= sent
    # No market moved through a stop here: each protective order was cancelled by its position's sale, or rests.
    assert all(not o.fills for o in resting), [
        (o.client_id, o.order_type, o.status, o.fills, o.stop_price) for o in resting if o.fills
    ]

    # Each fill at the peer is in the output once, with its size.
    assert all(n == 1 for n in Counter(f["fill_id"] for f in fills).values())
    peer_fills = sum(len(o.fills) for o in peer.orders)
    assert peer_fills > 0 and len(fills) == peer_fills
    filled: dict[str, Decimal] = defaultdict(Decimal)
    for f in fills:
        filled[f["client_order_id"]] += Decimal(str(f["size"]))
    assert {o.client_id: o.filled for o in peer.orders if o.fills} == dict(filled)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["mode"] == "live"

    # No secret anywhere: log files, output files, the commands' output, every record of every topic of the run.
    pem_body = [ln for ln in adv.private_pem.splitlines() if ln and "-----" not in ln]
    secrets_ = [adv.private_pem, *pem_body, exc.secret_b64, exc.passphrase, store_passphrase]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in files) and (out / "fills.jsonl") in files
    texts = {str(p): p.read_bytes() for p in files}
    texts |= {f"command output {i}": t.encode() for i, t in enumerate(outputs)}
    blobs, n_topics = await topic_bytes(infra.kafka, namespace)
    assert n_topics >= 10 and len(blobs) > 1000
    texts["topics"] = b"\n".join(blobs)
    # The scan reads the run's messages (a protective order's id is derived from its entry's, never published).
    assert all(o.client_id.encode() in texts["topics"] for o in peer.orders if o not in resting)
    print(
        f"peer orders {len(peer.orders)}, fills {peer_fills}, topics {n_topics}, records {len(blobs) // 2}, files {len(files)}"
    )
    leaks = [(where, s[:12]) for where, data in texts.items() for s in secrets_ if s.encode() in data]
    assert leaks == [], f"secret values found in: {sorted({w for w, _ in leaks})}"
