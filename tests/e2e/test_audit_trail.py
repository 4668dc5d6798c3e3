"""The audit trail of a whole demo run: the monitor drains the run's audit topic into a JSON-lines file, a
trade can be followed from its candle step to its fill by correlation id, and no configured secret appears in
any topic, output file, log or report (DESIGN.md invariant 7)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

from mpctl.bus import redis_password_rule
from mpctl.infra import Endpoints
from services.monitor.report_html import write_report
from shared.config import load_config
from shared.kafka import delete_topics, list_topics
from shared.principals import ADMIN, principals
from tests.bus import service_env

ROOT = Path(__file__).resolve().parents[2]


def secret_config(path: Path) -> list[str]:
    """The template with distinctive credentials: every one of them must stay out of every output."""
    data = yaml.safe_load((ROOT / "config" / "coinbase_profiles.yaml").read_text())
    values = []
    for pid, prof in data["profiles"].items():
        for key in ("api_key", "secret", "passphrase"):
            v = f"AUDITSCAN-{pid}-{key}-{secrets.token_hex(12)}"
            prof["api_credentials"][key] = v
            values.append(v)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return values


async def raw_records(bootstrap: str, prefix: str) -> list[bytes]:
    topics = [t for t in await list_topics(bootstrap) if t.startswith(prefix + ".")]
    c = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False, group_id=None)
    await c.start()
    out: list[bytes] = []
    try:
        tps = []
        for t in topics:
            await c._client.force_metadata_update()  # noqa: SLF001 - a fresh consumer lacks the metadata
            tps += [TopicPartition(t, p) for p in sorted(c.partitions_for_topic(t) or set())]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        while any([await c.position(tp) < ends[tp] for tp in tps]):
            for recs in (await c.getmany(timeout_ms=500)).values():
                out += [(r.key or b"") + b"\n" + (r.value or b"") for r in recs]
    finally:
        await c.stop()
    return out


@pytest.mark.timeout(900)
def test_audit_file_follows_trades_and_holds_no_secret(infra: Endpoints, tmp_path: Path) -> None:
    cfg_path = tmp_path / "profiles.yaml"
    secret_values = secret_config(cfg_path)
    out = tmp_path / "run"
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=infra.kafka.servers, REDIS_URL=infra.redis_url, CI="true")
    demo = subprocess.run(
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
            "240",
            "--keep-topics",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stderr
    ns = json.loads((out / "run.json").read_text())["namespace"]
    try:
        monitor = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.monitor",
                "--config",
                str(cfg_path),
                "--bootstrap",
                infra.kafka.servers,
                "--namespace",
                ns,
                "--drain",
                "--audit-file",
                str(out / "audit.jsonl"),
                "--alerts-file",
                str(out / "alerts.jsonl"),
                "--snapshot-file",
                str(out / "monitor.json"),
            ],
            cwd=ROOT,
            env=dict(env, **service_env(infra, ["services.monitor", "--namespace", ns])),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert monitor.returncode == 0, monitor.stderr
        records = asyncio.run(raw_records(infra.kafka, ns))
    finally:
        asyncio.run(
            delete_topics(
                infra.kafka,
                [t for t in asyncio.run(list_topics(infra.kafka)) if t.startswith(ns + ".")],
            )
        )
    write_report(out)

    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    ids = Counter((a["type"], a["id"]) for a in audit)
    assert ids and max(ids.values()) == 1, "an audit line written twice"
    types = Counter(a["type"] for a in audit)
    assert {"PlanPublished", "PlaceOrder", "OrderDecided", "OrderUpdated", "OrderFilled"} <= set(types)
    summary = json.loads((out / "summary.json").read_text())
    assert types["PlaceOrder"] == summary["counters"]["intents"] > 0
    assert types["OrderFilled"] == sum(p["trades"] for p in summary["profiles"].values())
    assert types["PlanPublished"] == summary["counters"]["plans"]

    # Follow every fill back to its intent and the candle step that caused it, by correlation id.
    intents = {a["intent_id"]: a for a in audit if a["type"] == "PlaceOrder"}
    decisions = {a["intent_id"]: a for a in audit if a["type"] == "OrderDecided"}
    candle_steps = {
        json.loads(r.split(b"\n", 1)[1])["correlation_id"] for r in records if b'"CandleClosed"' in r
    }
    for f in (a for a in audit if a["type"] == "OrderFilled"):
        intent = intents[f["intent_id"]]
        assert f["correlation_id"] == intent["correlation_id"] == decisions[f["intent_id"]]["correlation_id"]
        assert intent["correlation_id"] in candle_steps  # "step:<open time>" of the candles that led to it
        assert decisions[f["intent_id"]]["causation_id"] == intent["id"]

    # The scan: no configured secret in any topic record, output file, log or the report.
    haystacks: dict[str, bytes] = {f"topic record {i}": r for i, r in enumerate(records)}
    for p in out.rglob("*"):
        if p.is_file():
            haystacks[str(p.relative_to(out))] = p.read_bytes()
    for name, text in (
        ("demo stdout", demo.stdout),
        ("demo stderr", demo.stderr),
        ("monitor stderr", monitor.stderr),
        ("monitor stdout", monitor.stdout),
    ):
        haystacks[name] = text.encode()
    assert {"audit.jsonl", "report.html", "summary.json", "alerts.jsonl"} <= set(haystacks)
    assert any(k.startswith("logs/") for k in haystacks)
    # The bus's and Redis's credentials too: every principal's password of the run (the same one on the broker
    # and on Redis), the admin's, the digests Redis keeps of them, and the snapshot key.
    if infra.bus is not None:
        run_cfg = load_config(cfg_path)
        passwords = [infra.bus.password(p) for p in [*principals(run_cfg, ns), ADMIN]]
        secret_values += [pw.get_secret_value() for pw in passwords]
        secret_values += [redis_password_rule(pw)[1:] for pw in passwords]
        # The namespace's snapshot key the stateful services were given (as a file's path, never its value).
        secret_values.append(infra.bus.state_key_file(ns).read_text())
    for v in secret_values:
        leaks = [name for name, data in haystacks.items() if v.encode() in data]
        assert not leaks, f"a configured credential appears in {leaks}"
    # The scan itself finds a secret where there is one (the config file we wrote).
    assert secret_values[0].encode() in cfg_path.read_bytes()
