"""Service health from consumer-group membership, with the real arbiter and execution workers running in this
process; `mpctl status` over the namespace's topics, and over a run directory whose topics are gone."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from mpctl import commands_ops
from mpctl.infra import Endpoints
from services.monitor.health import fetch_health
from tests.bus import create_principals
from tests.integration.ops_stack import TEMPLATE, create_topics, eventually, ns_config, publish, running
from tests.unit.builders import HOUR, T0, approval_of, candle, order_filled, plan
from tests.unit.synthetic_run import build_run


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    commands_ops.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(list(argv))


async def _states(bootstrap: str, namespace: str) -> dict[str, str]:
    return {h.name: h.state for h in await fetch_health(bootstrap, ns_config(namespace), namespace)}


async def test_services_up_then_down(
    infra: Endpoints, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    b = infra.kafka
    cfg = ns_config(namespace)
    await create_topics(b, cfg)
    assert set((await _states(b, namespace)).values()) == {"never-ran", "not-observable"}
    t_plan = plan("profile_a", T0 // HOUR, products=("BTC/USDC", "ETH/USDC"))
    async with running(b, namespace) as topics:

        async def up() -> bool:
            s = await _states(b, namespace)
            return s["arbiter"] == "up" and s["execution.profile_a"] == "up"

        await eventually(up, what="arbiter and execution.profile_a up")
        states = await _states(b, namespace)
        assert states == {
            "ingest": "not-observable",
            "registry": "not-observable",
            "arbiter": "up",
            "strategy.profile_a": "never-ran",
            "execution.profile_a": "up",
            "strategy.profile_b": "never-ran",
            "execution.profile_b": "never-ran",
            "monitor": "never-ran",
        }
        fill = order_filled("profile_a", "buy", size="2", price="100", fee="0.1", at=T0 + 60)
        await publish(
            b,
            [
                (topics.plans, t_plan, "profile_a"),
                (topics.audit, t_plan, "profile_a"),
                (topics.candles, candle("BTC/USDC", T0, open=100, close=110), "BTC/USDC"),
                # Approved by the arbiter: status books only verified fills (shared/book.py).
                *((topics.events, m, "profile_a") for m in (approval_of(fill), fill)),
            ],
        )
        args = _cli(
            "status", "--namespace", namespace, "--bootstrap", b.servers, "--config", str(TEMPLATE), "--json"
        )
        assert await asyncio.to_thread(args.handler, args) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["source"] == "topics"
        assert {s["name"]: s["state"] for s in st["services"]}["arbiter"] == "up"
        a = st["profiles"]["profile_a"]
        assert a["plan"]["strategy"] == t_plan.strategy and a["plan"]["epoch"] == t_plan.epoch
        assert a["open_positions"] == {"BTC/USDC": "2"} and a["trades"] == 1
        assert float(a["equity"]) == pytest.approx(10000 - 200 - 0.1 + 2 * 110)
        assert "total" in st["lag"]["summary"]

    async def down() -> bool:
        s = await _states(b, namespace)
        return s["arbiter"] == "down" and s["execution.profile_a"] == "down"

    await eventually(down, what="services down after stopping")
    args = _cli("status", "--namespace", namespace, "--bootstrap", b.servers, "--config", str(TEMPLATE))
    assert await asyncio.to_thread(args.handler, args) == 0
    out = capsys.readouterr().out
    assert [ln.split()[:2] for ln in out.splitlines() if ln.startswith("arbiter")] == [["arbiter", "down"]]
    assert "PROFILES (from topics)" in out and t_plan.strategy in out
    assert "lag: total 0" in out


async def test_status_from_run_files_when_topics_are_gone(
    infra: Endpoints, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    build_run(run)
    await create_principals(infra.kafka, ns_config(namespace), namespace)  # as the run's demo left them
    (run / "run.json").write_text(
        json.dumps({"namespace": namespace, "kafka_bootstrap": infra.kafka.servers})
    )
    args = _cli("status", "--run", str(run), "--config", str(TEMPLATE))
    assert await asyncio.to_thread(args.handler, args) == 0
    out = capsys.readouterr().out
    assert f"PROFILES (from files in {run}" in out
    assert "profile_b" in out and "daily loss" in out  # its halt, from summary.json
    assert "lag: no consumer group" in out
