"""The monitor's tracker agrees with the run report's accounting (services/monitor/domain.py) whatever the
order the topics are read in; the Prometheus registry exports it; the audit file de-duplicates and survives a
torn line."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

import orjson
from prometheus_client import generate_latest

from services.monitor.audit_sink import AuditFileSink
from services.monitor.domain import RunData, summarize
from services.monitor.health import ExpectedService, GroupInfo, MemberInfo, service_health
from services.monitor.lag import build_report
from services.monitor.metrics import MonitorMetrics, PerformanceTracker
from shared.messages import Message, ProfileHalted
from tests.unit.builders import (
    HOUR,
    T0,
    approval_of,
    candle,
    config,
    decided,
    dt,
    order_filled,
    place_order,
    plan,
)


def run_messages() -> list[Message]:
    msgs: list[Message] = []
    btc = [100, 104, 101, 97, 95, 99, 106, 110, 108, 103, 100, 102]
    eth = [50, 49, 52, 54, 53, 50, 47, 48, 51, 55, 56, 54]
    for i, (b, e) in enumerate(zip(btc, eth, strict=True)):
        msgs.append(candle("BTC/USDC", T0 + i * HOUR, open=b, close=b + 1))
        msgs.append(candle("ETH/USDC", T0 + i * HOUR, open=e, close=e - 1))
    fills = [
        order_filled("profile_a", "buy", size="10", price="104", fee="0.6", at=T0 + 1 * HOUR),
        order_filled("profile_a", "sell", size="4", price="97", fee="0.2", at=T0 + 3 * HOUR),
        order_filled("profile_a", "sell", size="6", price="106", fee="0.3", at=T0 + 6 * HOUR),
        order_filled(
            "profile_b", "buy", product="ETH/USDC", size="20", price="52", fee="0.5", at=T0 + 2 * HOUR
        ),
        order_filled(
            "profile_b", "buy", product="BTC/USDC", size="5", price="99", fee="0.2", at=T0 + 5 * HOUR
        ),
        order_filled(
            "profile_b", "sell", product="ETH/USDC", size="20", price="55", fee="0.5", at=T0 + 9 * HOUR
        ),
    ]
    # Approved by the arbiter: the report counts only such fills (the tracker books every fill it reads).
    msgs += [*(approval_of(f) for f in fills), *fills]
    intent = place_order("profile_a", "buy")
    msgs += [
        plan("profile_a", T0 // HOUR),
        decided(intent, "approved", "approved"),
        decided(place_order("profile_b", "sell"), "rejected", "opposite_side"),
    ]
    msgs.append(
        ProfileHalted(
            id="h", event_time=dt(T0 + 7 * HOUR), correlation_id="c", profile="profile_b", reason="x"
        )
    )
    return msgs


def tracker_for(msgs: list[Message]) -> PerformanceTracker:
    cfg = config()
    t = PerformanceTracker(
        {pid: Decimal(str(p.paper.initial_quote_balance)) for pid, p in cfg.enabled_profiles().items()}
    )
    t.add_all(msgs)
    return t


def test_tracker_matches_the_report_in_any_reading_order() -> None:
    cfg = config()
    msgs = run_messages()
    data = RunData()
    data.add_all(msgs)
    summary = summarize(cfg, data)
    for seed in range(5):
        shuffled = list(msgs)
        random.Random(seed).shuffle(shuffled)
        t = tracker_for(shuffled + shuffled[:10])  # and some redelivered copies
        for pid, p in summary["profiles"].items():
            v = t.profile_view(pid)
            assert v["trades"] == p["trades"]
            assert v["wins"] == p["wins"] and v["win_rate"] == p["win_rate"]
            assert Decimal(v["realized_pnl"]) == Decimal(p["realized_pnl"])
            assert Decimal(v["equity"]) == Decimal(p["final_equity"])
            assert v["max_drawdown_pct"] == p["max_drawdown_pct"]
            assert {k: Decimal(x) for k, x in v["open_positions"].items()} == {
                k: Decimal(x) for k, x in p["open_positions"].items()
            }
            curve = [float(e) for _, e in t.curves()[pid]]
            assert curve == [e for _, e in p["equity_curve"]]
    t = tracker_for(msgs)
    assert t.profile_view("profile_b")["halts"] == 1
    assert t.decisions[("rejected", "opposite_side")] == 1
    assert t.profile_view("profile_a")["plan"]["strategy"] == "zygot_zalgo_entropy_dual_key_gate"
    rho = t.correlations()[("profile_a", "profile_b")]
    assert rho is not None and -1.0 <= rho <= 1.0


def test_prometheus_exposition() -> None:
    t = tracker_for(run_messages())
    m = MonitorMetrics("ns1")
    m.update_performance(t)
    report = build_report(
        namespace="ns1",
        bootstrap="b",
        taken_at=0,
        committed={"ns1.arbiter": {("ns1.orders.intents", 0): 5, ("ns1.orders.intents", 1): 7}},
        ends={("ns1.orders.intents", 0): 9, ("ns1.orders.intents", 1): 7},
        infos={"ns1.arbiter": GroupInfo("ns1.arbiter", "Stable", "consumer", (MemberInfo("m", "c", "/h"),))},
    )
    m.update_lag(report)
    m.update_health(
        service_health(
            [ExpectedService("arbiter", "ns1.arbiter"), ExpectedService("ingest", None)],
            {"ns1.arbiter": report_group_info()},
        )
    )
    text = generate_latest(m.registry).decode()
    assert 'mp_consumer_lag{group="ns1.arbiter",partition="0",topic="ns1.orders.intents"} 4.0' in text
    assert 'mp_consumer_group_lag{group="ns1.arbiter"} 4.0' in text
    assert 'mp_service_up{service="arbiter"} 1.0' in text and 'service="ingest"' not in text
    assert 'mp_profile_trades{profile="profile_a"} 3.0' in text
    assert 'mp_profile_halts{profile="profile_b"} 1.0' in text
    assert 'mp_arbiter_decisions{rule="opposite_side",verdict="rejected"} 1.0' in text
    assert 'mp_monitor_info{namespace="ns1"} 1.0' in text
    for name in (
        "mp_profile_win_rate",
        "mp_profile_realized_pnl",
        "mp_profile_equity",
        "mp_profile_drawdown_pct",
        "mp_profile_return_correlation",
    ):
        assert name + "{" in text
    # A group that went away loses its series instead of keeping its last value.
    m.update_lag(build_report(namespace="ns1", bootstrap="b", committed={}, ends={}, infos={}, taken_at=0))
    assert "mp_consumer_lag{" not in generate_latest(m.registry).decode()


def report_group_info() -> GroupInfo:
    return GroupInfo("ns1.arbiter", "Stable", "consumer", (MemberInfo("m", "c", "/h"),))


def test_audit_sink_dedups_and_survives_restart_and_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    msgs = run_messages()
    sink = AuditFileSink(path)
    sink.open()
    assert sum(sink.write(m) for m in msgs + msgs[:5]) == len(msgs)
    sink.close()
    with path.open("ab") as fh:
        fh.write(b'{"id": "torn", "type": "Orde')  # a crash in the middle of a line
    again = AuditFileSink(path)
    again.open()
    assert not any(again.write(m) for m in msgs)  # every id is known from the file
    extra = ProfileHalted(id="h2", event_time=dt(T0), correlation_id="c", profile="profile_a", reason="y")
    assert again.write(extra)
    again.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) == len(msgs) + 2  # the torn line stays, ended; the new message has its own line
    assert orjson.loads(lines[-1])["id"] == "h2"
    ids = [orjson.loads(x)["id"] for x in lines if x != b'{"id": "torn", "type": "Orde']
    assert len(ids) == len(set(ids))


def test_health_states() -> None:
    exp = [
        ExpectedService("arbiter", "g.arbiter"),
        ExpectedService("strategy.a", "g.strategy.a"),
        ExpectedService("execution.a", "g.execution.a"),
        ExpectedService("registry", "g.registry", "no group", group_optional=True),
        ExpectedService("ingest", None, "x"),
    ]
    groups = {
        "g.arbiter": GroupInfo("g.arbiter", "Stable", "consumer", (MemberInfo("m1", "arb", "/127.0.0.1"),)),
        "g.strategy.a": GroupInfo("g.strategy.a", "Empty", "consumer", ()),
    }
    states = {h.name: h.state for h in service_health(exp, groups)}
    assert states == {
        "arbiter": "up",
        "strategy.a": "down",
        "execution.a": "never-ran",
        "registry": "not-observable",
        "ingest": "not-observable",
    }


def test_unverified_fills_move_neither_the_tracker_nor_prometheus() -> None:
    """Issue #15 item 5: the dashboards book only the fills the arbiter approved (shared/book.py's rule)."""
    honest = run_messages()
    real = order_filled(
        "profile_a", "buy", size="2", price="100", fee="0.1", at=T0 + 10 * HOUR, fill_id="real"
    )
    forged = [
        # No decision: an order the execution worker never submitted.
        order_filled("profile_a", "buy", size="7", price="1", at=T0 + 10 * HOUR, fill_id="nodecision"),
        # Beyond the approved size of a real intent, or on the other side of it.
        order_filled(
            "profile_a",
            "buy",
            size="1",
            price="1",
            at=T0 + 11 * HOUR,
            fill_id="over",
            intent_id=real.intent_id,
        ),
        order_filled(
            "profile_a",
            "sell",
            size="1",
            price="900",
            at=T0 + 11 * HOUR,
            fill_id="side",
            intent_id=real.intent_id,
        ),
        # Another profile's fill under an intent approved for profile_a.
        order_filled(
            "profile_b",
            "buy",
            size="1",
            price="1",
            at=T0 + 11 * HOUR,
            fill_id="other",
            intent_id=real.intent_id,
        ),
        # A profile no config has: no books, no series.
        order_filled("mallory", "buy", size="1", price="1", at=T0 + 11 * HOUR, fill_id="mallory"),
    ]
    base = tracker_for(honest)
    before = {pid: base.profile_view(pid) for pid in ("profile_a", "profile_b")}
    t = tracker_for([*honest, *forged])
    assert {pid: t.profile_view(pid) for pid in ("profile_a", "profile_b")} == before
    assert sorted(f.fill_id for fs in t.unverified.values() for f, _ in fs) == sorted(
        f.fill_id for f in forged
    )
    m = MonitorMetrics("ns1")
    m.update_performance(t)
    text = generate_latest(m.registry).decode()
    assert 'mp_profile_trades{profile="profile_a"} 3.0' in text
    assert "mallory" not in text and "mallory" not in t.books

    # The real fill read before its decision counts once the decision is read (the forged ones still do not).
    t.add(real)
    assert t.profile_view("profile_a") == before["profile_a"]
    t.add(approval_of(real))
    view = t.profile_view("profile_a")
    assert view["trades"] == 4 and view["open_positions"] == {"BTC/USDC": "2"}
    m.update_performance(t)
    assert 'mp_profile_trades{profile="profile_a"} 4.0' in generate_latest(m.registry).decode()
    assert t.profile_view("profile_b") == before["profile_b"]
