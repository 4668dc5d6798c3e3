"""Prometheus metrics of one arbiter process, served on 127.0.0.1 when `--metrics-port` is given (0: off).

Every arbiter process computes every decision (docs/arbiter.md), but counts only what it publishes (the
partitions it owns, from their committed offset on), so the sum over processes counts each decision once,
also across a rebuild after a restart. Its own CollectorRegistry: several services in one interpreter (tests)
never share series.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from shared.messages import CorrelationAlert, InternalCrossOpportunity, Message, OrderDecided
from shared.metrics import MetricsEndpoint

__all__ = ["ArbiterMetrics"]


class ArbiterMetrics(MetricsEndpoint):
    log_name = "arbiter.metrics"

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.decided = Counter(
            "mp_arbiter_decided",
            "Decisions this process published, by rule and verdict",
            ["rule", "verdict"],
            registry=r,
        )
        self.opportunities = Counter(
            "mp_arbiter_internal_cross_opportunities",
            "Internal-cross opportunities (two profiles on opposite sides of a product within the window)",
            ["executed"],
            registry=r,
        )
        self.savings = Counter(
            "mp_arbiter_internal_cross_savings",
            "What netting the opportunities saves (quote currency), by kind (fees, slippage)",
            ["kind"],
            registry=r,
        )
        self.correlation_alerts = Counter(
            "mp_arbiter_correlation_alerts",
            "Correlation guard alerts, by state (breach, clear)",
            ["state"],
            registry=r,
        )
        self.owned = Gauge(
            "mp_arbiter_partitions_owned", "Intents partitions this process publishes for", registry=r
        )
        self.held = Gauge(
            "mp_arbiter_intents_held", "Intents waiting for their step, market data or plan", registry=r
        )

    def observe(self, msg: Message) -> None:
        if isinstance(msg, OrderDecided):
            self.decided.labels(rule=msg.rule, verdict=msg.verdict).inc()
        elif isinstance(msg, InternalCrossOpportunity):
            self.opportunities.labels(executed=str(msg.executed).lower()).inc()
            self.savings.labels(kind="fees").inc(float(msg.fee_saving))
            self.savings.labels(kind="slippage").inc(float(msg.slippage_saving))
        elif isinstance(msg, CorrelationAlert):
            self.correlation_alerts.labels(state=msg.state).inc()
