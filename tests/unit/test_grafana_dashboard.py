"""deploy/grafana/dashboard.json: valid Grafana JSON whose every query names a metric a service exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from services.execution.metrics import ExecutionMetrics
from services.ingest.metrics import IngestMetrics
from services.monitor.metrics import MonitorMetrics
from services.registry.metrics import RegistryMetrics
from services.strategy.metrics import StrategyMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboard.json"


def exported_names() -> set[str]:
    names: set[str] = set()
    execution = ExecutionMetrics("p", "paper", started_at=0.0)
    strategy = StrategyMetrics("p")
    registries = (
        MonitorMetrics("ns").registry,
        RegistryMetrics().registry,
        execution.registry,
        strategy.registry,
        IngestMetrics().registry,
    )
    for registry in registries:
        for metric in registry.collect():
            names.add(metric.name)
            if metric.type == "counter":
                names.add(metric.name + "_total")
            if metric.type == "histogram":
                names.update(metric.name + s for s in ("_bucket", "_sum", "_count"))
    return names


def test_dashboard_queries_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = {m for e in exprs for m in re.findall(r"\bmp_[a-z_]+", e)}
    assert used <= exported_names(), used - exported_names()
    for required in (
        "mp_consumer_lag",
        "mp_consumer_group_lag",
        "mp_profile_equity",
        "mp_profile_drawdown_pct",
        "mp_profile_trades",
        "mp_profile_win_rate",
        "mp_profile_realized_pnl",
        "mp_profile_halts",
        "mp_service_up",
        "mp_arbiter_decisions",
        "mp_alerts_total",
        "mp_execution_order_latency_seconds_bucket",
        "mp_strategy_equity",
        "mp_strategy_win_rate",
        "mp_strategy_halts",
        "mp_strategy_events_total",
        "mp_strategy_errors_total",
        "mp_ingest_feed_stale",
        "mp_ingest_feed_age_seconds",
        "mp_ingest_finalisation_lag_seconds_bucket",
        "mp_ingest_ws_reconnects_total",
        "mp_ingest_ws_sequence_gaps_total",
        "mp_ingest_clock_skew_seconds",
    ):
        assert required in used
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] < 24 and g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"  # chosen at import, no hard-wired data source


def test_prometheus_rules_alert_on_a_stale_feed_with_exported_metrics() -> None:
    import yaml

    rules = yaml.safe_load((DASHBOARD.parents[1] / "prometheus-rules.yml").read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert by_name["MarketFeedStale"]["expr"].startswith("mp_ingest_feed_stale")
    assert by_name["MarketFeedStale"]["labels"]["severity"] == "critical"
    used = {m for r in by_name.values() for m in re.findall(r"\bmp_[a-z_]+", r["expr"])}
    assert used <= exported_names(), used - exported_names()
