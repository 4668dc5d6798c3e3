"""A strategy worker's Prometheus endpoint after a short replay through the whole pipeline (every service in its
own process, real Kafka and Redis): its numbers equal the run's output (summary.json, the topics)."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mpctl.commands_demo import Stack, expected_finishers, wait_finished
from mpctl.infra import Endpoints
from services.monitor.collect import collect_run
from shared.config import AppConfig, load_config
from shared.kafka import delete_topics, read_topics
from shared.messages import PlaceOrder
from shared.topics import Topics, declared_topics
from tests.bus import create_namespace
from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config" / "examples" / "three_profiles.yaml"
DATA = ROOT / "data" / "market"
HOURS = 240  # the signal models need about five days of look-back before the first intent
PID = "profile_a"


def _config(ns: str) -> AppConfig:
    cfg = load_config(CONFIG)
    kafka = cfg.system.kafka.model_copy(update={"namespace": ns})
    return cfg.model_copy(update={"system": cfg.system.model_copy(update={"kafka": kafka})})


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shared_loop", [False, True], ids=["a-process-each", "one-shared-loop"])
async def test_strategy_metrics_equal_the_runs_output(
    infra: Endpoints, tmp_path: Path, namespace: str, shared_loop: bool
) -> None:
    """With `shared_loop`, the three profiles' strategy workers run as tasks of one process
    (`--profile a,b,c --shared-loop`, shared/loophost.py): the same run, the same numbers."""
    cfg = _config(namespace)
    t = Topics(namespace)
    specs = declared_topics(cfg, namespace)
    await create_namespace(infra.kafka, cfg, namespace)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    common = [
        "--bootstrap",
        infra.kafka.servers,
        "--redis-url",
        infra.redis_url,
        "--source",
        "replay",
        "--namespace",
        namespace,
        "--config",
        str(CONFIG),
    ]
    pids = list(cfg.enabled_profiles())
    first = free_ports(len(pids), consecutive=True)[0]
    port = first + pids.index(PID)
    stack = Stack(bus=infra.bus)
    started = time.monotonic()
    try:
        stack.start("registry", ["services.registry", *common], log_dir)
        stack.start("arbiter", ["services.arbiter", *common], log_dir)
        for pid in pids:
            stack.start(f"execution.{pid}", ["services.execution", *common, "--profile", pid], log_dir)
            if not shared_loop:
                extra = ["--metrics-port", str(port)] if pid == PID else []
                stack.start(
                    f"strategy.{pid}", ["services.strategy", *common, "--profile", pid, *extra], log_dir
                )
        if shared_loop:
            # The i-th profile serves its metrics on port + i (shared/forkhost.py argv_for).
            every = ["--profile", ",".join(pids), "--shared-loop", "--metrics-port", str(first)]
            stack.start("strategy.host", ["services.strategy", *common, *every], log_dir)
        stack.start(
            "ingest", ["services.ingest", *common, "--data", str(DATA), "--hours", str(HOURS)], log_dir
        )
        await wait_finished(infra.kafka, t.status, expected_finishers(cfg), stack, 240, started)
        got = scrape(port)  # the worker still runs: finished means every step and every fill was applied
    finally:
        stack.stop()
    summary = await collect_run(cfg, infra.kafka, tmp_path / "run")
    raw, _ = await read_topics(infra.kafka, [t.intents, t.candles])
    await delete_topics(infra.kafka, [s.name for s in specs])

    def g(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted({"profile": PID, **labels}.items())))]

    want = summary["profiles"][PID]
    assert want["trades"] > 0, "the run made no trade: nothing to compare"
    assert g("mp_strategy_trades") == want["trades"]
    assert g("mp_strategy_closed_trades") == want["closed_trades"]
    assert g("mp_strategy_wins") == want["wins"]
    assert g("mp_strategy_win_rate") == pytest.approx(want["win_rate"], abs=1e-4)
    assert g("mp_strategy_realized_pnl") == pytest.approx(float(want["realized_pnl"]), abs=1e-6)
    assert g("mp_strategy_fees") == pytest.approx(float(want["fees"]), abs=1e-6)
    assert g("mp_strategy_equity") == pytest.approx(float(want["final_equity"]), abs=1e-6)
    assert g("mp_strategy_open_positions") == len(want["open_positions"])
    # Drawdown is the worker's own risk view (equity as each step is evaluated, before that step's fills), the
    # summary's is sampled at step closes after them: the same order of size, not the same number.
    assert (
        0
        <= g("mp_strategy_drawdown_pct")
        <= g("mp_strategy_max_drawdown_pct")
        < 2 * want["max_drawdown_pct"] + 1
    )
    assert g("mp_strategy_halts", kind="drawdown") + g("mp_strategy_halts", kind="daily_loss") == len(
        want["halts"]
    )
    intents = {m.intent_id for m in raw if isinstance(m, PlaceOrder) and m.profile == PID}
    assert g("mp_strategy_intents") == len(intents)
    candle_records = sum(1 for _ in raw) - sum(
        1 for m in raw if isinstance(m, PlaceOrder) or m.type == "StepCompleted"
    )
    assert g("mp_strategy_events_total", topic="md.candles") == candle_records
    assert g("mp_strategy_steps") == HOURS
    assert g("mp_strategy_errors_total", kind="dead_lettered") == 0
