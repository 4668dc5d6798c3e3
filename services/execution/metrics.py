"""Prometheus metrics of one profile's execution worker, served on 127.0.0.1 when a metrics port is given (0: off).

- `mp_execution_order_latency_seconds{profile,exchange}`: wall-clock seconds from the arbiter's publication of the
  approved order (the Kafka timestamp of the ExecuteOrder record) to the exchange's answer to the create request
  (live: an accepted order; a refused one counts in the errors instead) or the paper exchange's acceptance
  (paper: transport and queueing only). The intent's event time is not
  the start: it is market time (a replay's is years old), and the wait for the arbiter's decision is the arbiter's.
  Orders published before this process started (a rebuild after a restart) are not observed.
- `mp_execution_orders{profile,status}`: order events by status, each event id once.
- `mp_execution_fills{profile,liquidity}`, `mp_execution_fees{profile}`: fills (each fill id once) and their fees.
- `mp_execution_errors{profile,outcome,kind}`: exchange errors through the table of ccxt_errors.py (live), each retry
  counted; outcome is retry, reject or halt.
- `mp_execution_events_processed{profile,topic}`: input messages handled, by topic.

Counters start at zero with the process; after a restart the paper worker re-reads its input log, so its counters
describe the whole log again (ids are counted once per process).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from services.execution.errors import ExecutionError
from shared.messages import ExecuteOrder, Message, OrderFilled, OrderUpdated
from shared.metrics import MetricsEndpoint

__all__ = ["ExecutionMetrics", "LATENCY_BUCKETS"]

# From a local paper exchange (milliseconds) to a slow exchange answer with retries (tens of seconds).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ExecutionMetrics(MetricsEndpoint):
    log_name = "execution.metrics"

    def __init__(self, profile: str, exchange: str, *, started_at: float) -> None:
        super().__init__()
        self.profile = profile
        self.exchange = exchange
        self.started_at = started_at
        r = self.registry
        self.latency = Histogram(
            "mp_execution_order_latency_seconds",
            "Seconds from the approved order's publication (Kafka timestamp) to the exchange's acknowledgement",
            ["profile", "exchange"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.orders = Counter(
            "mp_execution_orders", "Order events by status", ["profile", "status"], registry=r
        )
        self.fills = Counter(
            "mp_execution_fills", "Fills, by liquidity (maker, taker)", ["profile", "liquidity"], registry=r
        )
        self.fees = Counter(
            "mp_execution_fees", "Fees paid on fills (quote currency)", ["profile"], registry=r
        )
        self.errors = Counter(
            "mp_execution_errors",
            "Exchange errors by outcome (retry, reject, halt) and kind",
            ["profile", "outcome", "kind"],
            registry=r,
        )
        self.processed = Counter(
            "mp_execution_events_processed",
            "Input messages handled, by topic",
            ["profile", "topic"],
            registry=r,
        )
        self._sent_at: dict[str, float] = {}  # client order id -> Kafka timestamp of its ExecuteOrder (s)
        self._seen: set[str] = set()  # ids of order events and fills already counted

    def received(self, msg: Message, topic: str, kafka_ts_ms: int | None) -> None:
        """An input message read from `topic`; ExecuteOrders start their latency clock."""
        self.processed.labels(profile=self.profile, topic=topic).inc()
        if isinstance(msg, ExecuteOrder) and kafka_ts_ms is not None and kafka_ts_ms > 0:
            ts = kafka_ts_ms / 1000
            if ts >= self.started_at and msg.client_order_id not in self._sent_at:
                self._sent_at[msg.client_order_id] = ts

    def acknowledged(self, client_order_id: str, now: float) -> None:
        """The exchange answered the order's create request (or the paper exchange accepted it)."""
        ts = self._sent_at.pop(client_order_id, None)
        if ts is not None:
            self.latency.labels(profile=self.profile, exchange=self.exchange).observe(max(0.0, now - ts))

    def forget(self, client_order_id: str) -> None:
        """The order is handled without an acknowledgement (refused, or its state unknown): no latency."""
        self._sent_at.pop(client_order_id, None)

    def error(self, err: ExecutionError) -> None:
        self.errors.labels(
            profile=self.profile, outcome=err.outcome, kind=err.kind or type(err).__name__
        ).inc()

    def observe(self, msg: Message) -> None:
        """An output of the worker (published, or republished with the same id)."""
        if isinstance(msg, OrderFilled):
            if msg.fill_id in self._seen:
                return
            self._seen.add(msg.fill_id)
            self.fills.labels(profile=self.profile, liquidity=msg.liquidity).inc()
            self.fees.labels(profile=self.profile).inc(float(msg.fee))
        elif isinstance(msg, OrderUpdated):
            if msg.id in self._seen:
                return
            self._seen.add(msg.id)
            self.orders.labels(profile=self.profile, status=msg.status).inc()
