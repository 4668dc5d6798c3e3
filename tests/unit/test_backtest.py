"""`mpctl backtest` (mpctl/backtest.py): the services' cores in one process. What is checked here, without
Kafka: the fast paths give exactly the result of the services' delivery, the routing follows the services'
subscriptions and partitioner, the in-memory claims answer as the Redis script does, and the output files
carry the demo's invariants. The comparison with the demo itself is tests/e2e/test_backtest_parity.py."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from mpctl import backtest
from mpctl.backtest import Backtest, MemoryRegistry, load_schedule, run_backtest, subscriptions
from services.arbiter import bootstrap as arbiter_bootstrap
from services.execution import bootstrap as execution_bootstrap
from services.ingest.domain import build_schedule
from services.monitor.domain import decision_records, fill_records, order_records, plan_records
from services.registry.domain import ClaimOutcome
from services.strategy import bootstrap as strategy_bootstrap
from shared.bus import KafkaAccess
from shared.candles import load_products
from shared.config import AppConfig, load_config, parse_config
from shared.messages import PlaceOrder, StepCompleted
from shared.runtime import ServiceSettings
from shared.topics import Topics
from tests.e2e.test_demo import check_invariants, jsonl

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "market"
THREE = ROOT / "config" / "examples" / "three_profiles.yaml"


@pytest.fixture(scope="module")
def three() -> AppConfig:
    return load_config(THREE)


def records(data: Any) -> dict[str, list[dict[str, Any]]]:
    return {
        "orders": order_records(data),
        "fills": fill_records(data),
        "decisions": decision_records(data),
        "plans": plan_records(data),
    }


# ------------------------------------------------------------------------------------------ exactness
def test_fast_paths_give_the_result_of_the_services_delivery(three: AppConfig) -> None:
    # exact: every step marker reaches the arbiter and every candle every paper exchange, as over Kafka;
    # the default run coalesces markers and feeds exchanges only the candles an order can fill at.
    steps = load_schedule(three, DATA, hours=500)
    fast, fast_stats = run_backtest(three, steps)
    exact, exact_stats = run_backtest(three, steps, exact=True)
    assert fast.intents, "the slice trades"
    assert records(fast) == records(exact)
    assert [i.model_dump() for i in fast.intents] == [i.model_dump() for i in exact.intents]
    assert fast.halts == exact.halts
    assert fast_stats.evaluations == exact_stats.evaluations == 3 * sum(len(s.candles) for s in steps)
    assert fast_stats.messages < exact_stats.messages


def test_rotation_close_policy_runs_through_the_whole_pipeline(three: AppConfig) -> None:
    registry = three.system.registry.model_copy(update={"on_rotation": "close"})
    cfg = three.model_copy(update={"system": three.system.model_copy(update={"registry": registry})})
    steps = load_schedule(cfg, DATA, hours=400)
    data, _ = run_backtest(cfg, steps)
    flattens = [i for i in data.intents if i.reason == "flatten"]
    assert flattens and all(i.side == "sell" for i in flattens)
    keep, _ = run_backtest(three, steps)
    assert not [i for i in keep.intents if i.reason == "flatten"]


def test_schedule_trimmed_before_building_equals_build_schedule(three: AppConfig) -> None:
    files = load_products(DATA, three.all_products())
    cases: list[dict[str, Any]] = [
        {"hours": 100},
        {"start": datetime(2021, 8, 10, tzinfo=UTC), "end": datetime(2021, 8, 12, 5, tzinfo=UTC)},
        {"start": datetime(2021, 8, 10, 3), "hours": 30.5},  # naive: UTC
        {"end": datetime(2021, 8, 3, tzinfo=UTC)},
    ]
    for kw in cases:
        assert load_schedule(three, DATA, **kw) == build_schedule(files, **kw), kw


# ------------------------------------------------------------------------------------------ routing
def test_intent_partitions_are_aiokafkas_default_partitioner(three: AppConfig) -> None:
    bt = Backtest(three, load_schedule(three, DATA, hours=2))
    partitions = list(range(3))
    for product in [*three.all_products(), "X/Y", "BTC-USD"]:
        key = product.encode()
        assert bt._key_partition(key, 3) == DefaultPartitioner()(key, partitions, partitions)


def test_subscriptions_cover_what_the_services_read(three: AppConfig) -> None:
    t = Topics(three.system.kafka.namespace)
    subs = subscriptions(t, list(three.enabled_profiles()))
    readers: dict[str, set[tuple[str, str]]] = {topic: set(r) for topic, r in subs.items()}
    settings = ServiceSettings(kafka=KafkaAccess(servers="unused:0"))
    # The arbiter reads intents, plans and candles (services/arbiter/bootstrap.py); a service built on
    # StateMachineService says what it reads itself.
    arbiter = arbiter_bootstrap.bootstrap(settings, overrides={"config": three})
    for topic in [t.intents, t.plans, t.candles, *_reads(arbiter)]:
        assert ("arbiter", "") in readers.get(topic, set()), topic
    for pid in three.enabled_profiles():
        ex = execution_bootstrap.bootstrap(
            settings.model_copy(update={"profile": pid}), overrides={"config": three}
        )
        # Operator commands have no place in a backtest: the one topic a backtest does not route.
        for topic in [t.candles, t.approved(pid), *(r for r in _reads(ex) if r != t.commands)]:
            assert ("execution", pid) in readers.get(topic, set()), topic
        for topic in strategy_bootstrap.input_topics(t):
            if topic not in (t.candles, t.commands):  # candles reach strategies as lockstep steps
                assert ("strategy", pid) in readers.get(topic, set()), topic
    assert ("registry", "") in readers[t.candles]


def _reads(service: Any) -> list[str]:
    runner = getattr(service, "runner", None)
    return list(getattr(runner, "_client_args", {}).get("topics", []))


def test_strategy_routes_markers_to_every_intents_partition_and_intents_by_product() -> None:
    t = Topics("x")
    out = strategy_bootstrap.Outputs.of(t, 3, "profile_a")
    now = datetime(2024, 1, 1, tzinfo=UTC)
    marker = StepCompleted(
        id="m", event_time=now, correlation_id="c", profile="profile_a", step_time=now, intents=0
    )
    assert list(strategy_bootstrap.routes(marker, out)) == [(t.intents, None, p) for p in range(3)]
    intent = PlaceOrder(
        id="i",
        event_time=now,
        correlation_id="c",
        intent_id="i",
        profile="profile_a",
        product="BTC/USDC",
        side="buy",
        size=Decimal(1),
        reference_price=Decimal(1),
        reason="entry",
        fingerprint="f",
        epoch=1,
        step_time=now,
    )
    assert list(strategy_bootstrap.routes(intent, out)) == [
        (t.intents, b"BTC/USDC", None),
        (t.audit, b"profile_a", None),
    ]


# ------------------------------------------------------------------------------------------ claims in memory
def test_memory_claims_follow_the_redis_scripts_rules() -> None:
    m = MemoryRegistry(grace_s=300)
    ok = ClaimOutcome.OK
    assert m.claim_interval("a", 0, 3600, "h1", "f1", "ADA").outcome is ok
    assert m.claim_interval("a", 0, 3600, "h1", "f1", "ADA").outcome is ok  # re-entrant for the same profile
    r = m.claim_interval("b", 1800, 5400, "h1", "f2", "DOT")  # overlapping: the hash is checked first
    assert (r.outcome, r.holder, r.holder_start_s, r.holder_end_s) == (ClaimOutcome.HASH_TAKEN, "a", 0, 3600)
    assert m.claim_interval("b", 1800, 5400, "h2", "f1", "DOT").outcome is ClaimOutcome.FP_TAKEN
    assert m.claim_interval("b", 1800, 5400, "h2", "f2", "ADA").outcome is ClaimOutcome.ASSET_TAKEN
    assert m.claim_interval("b", 1800, 5400, "h2", "f2", None).outcome is ok  # no asset claimed
    assert (
        m.claim_interval("c", 3600, 7200, "h1", "f1", "ADA").outcome is ok
    )  # half-open: touching is no overlap
    # A member that ended more than grace_s before a claim's start is pruned from the keys that claim checks.
    assert ("a", 0, 3600) in m.holds[("hash", "h1")]
    assert m.claim_interval("d", 3600 + 301 + 3600, 3600 * 4, "h1", "f9", None).outcome is ok
    assert ("a", 0, 3600) not in m.holds[("hash", "h1")]


def test_memory_claims_refuse_whatever_overlaps_in_random_sequences() -> None:
    rnd = random.Random(7)
    m = MemoryRegistry(grace_s=0)
    held: list[tuple[str, str, int, int]] = []  # (key, profile, start, end) of every successful claim
    # Starts never go back (as epochs): a pruned member then never overlaps a later claim. Claims in any
    # order are compared with the Redis script itself in tests/e2e/test_backtest_parity.py.
    for s in sorted(rnd.randrange(0, 40) * 900 for _ in range(3000)):
        p = rnd.choice("abcd")
        e = s + rnd.choice((900, 1800, 3600))
        h, f, a = f"h{rnd.randrange(6)}", f"f{rnd.randrange(6)}", rnd.choice([None, "X", "Y", "Z"])
        keys = [("hash", h), ("fp", f)] + ([("asset", a)] if a else [])
        conflict = next(
            (
                (i, q, s2, e2)
                for i, k in enumerate(keys)
                for key, q, s2, e2 in held
                if key == f"{k[0]}:{k[1]}" and q != p and s2 < e and s < e2
            ),
            None,
        )
        r = m.claim_interval(p, s, e, h, f, a)
        if r.ok:
            held += [(f"{k[0]}:{k[1]}", p, s, e) for k in keys]
        assert r.ok == (conflict is None), (p, s, e, keys, r, conflict)


# ------------------------------------------------------------------------------------------ command
def test_command_writes_the_demo_files_with_their_invariants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bt"
    assert (
        backtest.main(["--config", str(THREE), "--data", str(DATA), "--out", str(out), "--hours", "300"]) == 0
    )
    summary = orjson.loads((out / "summary.json").read_bytes())
    check_invariants(out, summary, config=THREE, data=DATA)
    assert set(summary["profiles"]) == {"profile_a", "profile_b", "profile_c"}
    assert summary["counters"]["intents"] > 0
    assert len(jsonl(out / "plans.jsonl")) > 0
    assert "profile-candle evaluations" in capsys.readouterr().out


def test_command_refuses_bad_input(tmp_path: Path) -> None:
    assert (
        backtest.main(["--config", str(THREE), "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 1
    )
    assert (
        backtest.main(["--config", str(THREE), "--data", str(DATA), "--out", str(tmp_path), "--start", "bad"])
        == 1
    )
    later = ["--start", "2030-01-01"]
    assert backtest.main(["--config", str(THREE), "--data", str(DATA), "--out", str(tmp_path), *later]) == 1


def test_backtest_needs_a_schedule() -> None:
    cfg = parse_config(orjson.loads(orjson.dumps({"profiles": _minimal_profiles()})))
    with pytest.raises(ValueError, match="nothing to replay"):
        Backtest(cfg, [])


def _minimal_profiles() -> dict[str, Any]:
    import yaml

    data: dict[str, Any] = yaml.safe_load(THREE.read_text())["profiles"]
    return {"profile_a": data["profile_a"]}
