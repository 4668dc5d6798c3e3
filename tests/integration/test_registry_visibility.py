"""Visibility of the registry (issue 3): Prometheus metrics of a registry process, and `mpctl plans`."""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mpctl import commands_plans
from mpctl.infra import Endpoints
from services.monitor.domain import RunData, plan_records
from tests.conftest import free_ports
from tests.integration.test_registry_harness import ProfileSpec, Run, schedule, write_config

HOURS = 8
SPECS = {
    "alpha": ProfileSpec("shared_trading_hash"),
    "bravo": ProfileSpec("shared_trading_hash"),  # identical hash settings: collides every epoch
    "hotel": ProfileSpec("hotel_hash", seed=0.3, interval=14400),
}


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def parse_plans_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands_plans.register(parser.add_subparsers())
    return parser.parse_args(["plans", *argv])


@pytest.mark.timeout(90)
async def test_metrics_and_mpctl_plans(
    infra: Endpoints, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Run(
        infra, f"vis{uuid.uuid4().hex[:8]}", write_config(tmp_path / "vis.yaml", SPECS), tmp_path / "logs"
    )
    (port,) = free_ports(1)
    try:
        await run.setup()
        run.start_registry("0", "--metrics-port", str(port))
        steps = schedule(run.cfg, HOURS)
        await run.publish(steps, finish_with=steps)
        await run.wait_finished(["0"])
        plans = await run.plans()

        # ---- metrics, scraped from the running process
        m = scrape(port)
        for pid in SPECS:
            n = sum(1 for p in plans if p.profile == pid)
            assert m[("mp_registry_plans_published_total", (("profile", pid),))] == n
            assert m[("mp_registry_current_epoch", (("profile", pid),))] == max(
                p.epoch for p in plans if p.profile == pid
            )
        bravo_bumps = sum(p.collisions for p in plans if p.profile == "bravo")
        assert bravo_bumps >= HOURS  # once per hourly epoch at least
        assert m[("mp_registry_collisions_resolved_total", (("profile", "bravo"),))] == bravo_bumps
        assert (
            "mp_registry_collisions_resolved_total",
            (("profile", "alpha"),),
        ) not in m  # the first never bumps
        assert (
            m[("mp_registry_claims_refused_total", (("outcome", "HASH_TAKEN"), ("profile", "bravo")))]
            >= HOURS
        )
        assert m[("mp_registry_instance_info", (("instance", "0"),))] == 1

        # ---- mpctl plans on the running namespace (run.json as the demo writes it)
        run_dir = tmp_path / "demo"
        run_dir.mkdir()
        (run_dir / "run.json").write_text(
            json.dumps(
                {"namespace": run.ns, "kafka_bootstrap": infra.kafka.servers, "redis_url": infra.redis_url}
            )
        )
        assert (
            await asyncio.to_thread(
                commands_plans.run_plans, parse_plans_args("--run", str(run_dir), "--json")
            )
            == 0
        )
        shown: dict[str, Any] = json.loads(capsys.readouterr().out)
        assert shown["source"].startswith(f"topic {run.ns}.registry.plans")
        current = {r["profile"]: r for r in shown["plans"]}
        assert set(current) == set(SPECS)
        for pid, row in current.items():
            latest = max((p for p in plans if p.profile == pid), key=lambda p: p.epoch)
            assert (row["hash"], row["nonce"], row["fingerprint"], row["epoch"]) == (
                latest.hash,
                latest.nonce,
                latest.fingerprint,
                latest.epoch,
            )
            assert set(row["key_parameters"]) <= set(row["parameters"]) and row["key_parameters"]
        assert (
            await asyncio.to_thread(
                commands_plans.run_plans,
                parse_plans_args("--namespace", run.ns, "--bootstrap", infra.kafka.servers),
            )
            == 0
        )
        table = capsys.readouterr().out
        header = table.splitlines()[1]
        for col in (
            "profile",
            "hash",
            "nonce",
            "strategy",
            "key parameters",
            "assets",
            "fingerprint",
            "epoch end",
        ):
            assert col in header
        assert all(pid in table for pid in SPECS)

        # ---- a finished run whose topics are gone: plans.jsonl of the run folder
        data = RunData()
        data.add_all(plans)
        with (run_dir / "plans.jsonl").open("w") as fh:  # as the demo's collector writes it
            for rec in plan_records(data):
                fh.write(json.dumps(rec) + "\n")
    finally:
        await run.close()
    assert (
        await asyncio.to_thread(commands_plans.run_plans, parse_plans_args("--run", str(run_dir), "--json"))
        == 0
    )
    fallback: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert fallback["source"].startswith(str(run_dir / "plans.jsonl"))
    assert fallback["plans"] == shown["plans"]
    # nothing at all: a clear error, exit 1
    assert (
        await asyncio.to_thread(
            commands_plans.run_plans, parse_plans_args("--run", str(tmp_path / "nothing"))
        )
        == 1
    )
    assert "no plans" in capsys.readouterr().err
