"""`mpctl selftest`: a short paper run over the real stack, the invariant checks, and its two output files."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from mpctl import selftest
from mpctl.infra import Endpoints
from shared.kafka import list_topics


@pytest.mark.timeout(900)
async def test_selftest_passes_and_writes_results(
    infra: Endpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", infra.kafka.servers)
    monkeypatch.setenv("REDIS_URL", infra.redis_url)
    monkeypatch.setenv("CI", "true")
    parser = argparse.ArgumentParser()
    selftest.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["selftest", "--out", str(tmp_path)])
    code = await asyncio.to_thread(args.handler, args)  # it runs its own event loops
    results = json.loads((tmp_path / "multi_profile_test_results.json").read_text())
    log = (tmp_path / "multi_profile_test.log").read_text()
    assert code == 0, json.dumps(results["tests"], indent=1)
    assert results["passed"] is True and results["summary"] == {"total": 9, "passed": 9, "failed": 0}
    assert [t["name"] for t in results["tests"]] == [
        "system_initialization",
        "integration",
        "profile_management",
        "strategy_generation",
        "trade_execution",
        "cross_profile_arbitrage",
        "mathematical_separation",
        "performance_monitoring",
        "paper_truth",
    ]
    assert results["invariants"]["ok"] and results["counters"]["intents"] > 0
    assert results["audit"]["ok"], results["audit"]  # mpctl audit: issue #14's rules hold on the run
    assert set(results["profiles"]) == {"profile_a", "profile_b"}
    assert "mpctl.cli demo" in log and "PASSED" in log
    assert "selftest passed: 9/9" in capsys.readouterr().out
    # The run's topics, kept for the monitor, are gone again.
    ns = results["namespace"]
    assert not [t for t in await list_topics(infra.kafka) if t.startswith(ns + ".")]


def test_selftest_reports_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles: {}\n")
    parser = argparse.ArgumentParser()
    selftest.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["selftest", "--out", str(tmp_path), "--config", str(bad)])
    assert args.handler(args) == 1
    results = json.loads((tmp_path / "multi_profile_test_results.json").read_text())
    assert (
        results["tests"][0]["name"] == "system_initialization" and results["tests"][0]["status"] == "failed"
    )
    assert "profiles" in results["tests"][0]["details"][0]
