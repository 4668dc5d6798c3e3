"""Prometheus metrics of the live ingest (docs/ingest.md), served when `--metrics-port` is given (0: off).

Its own CollectorRegistry: several services in one interpreter (tests) never share series.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import MetricsEndpoint

__all__ = ["IngestMetrics"]

# Bucket end to publication, exchange seconds: grace (2 s by default) up to the deadline (120 s) and past it.
LAG_BUCKETS = (1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


class IngestMetrics(MetricsEndpoint):
    log_name = "ingest.metrics"

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.feed_age = Gauge(
            "mp_ingest_feed_age_seconds", "Real seconds since the last websocket frame", registry=r
        )
        self.reconnects = Counter("mp_ingest_ws_reconnects", "Websocket reconnects", registry=r)
        self.sequence_gaps = Counter(
            "mp_ingest_ws_sequence_gaps", "sequence_num steps other than +1", registry=r
        )
        self.backfill_requests = Counter(
            "mp_ingest_rest_requests",
            "REST requests sent, by endpoint (candles, time)",
            ["endpoint"],
            registry=r,
        )
        self.rest_errors = Counter(
            "mp_ingest_errors",
            "REST and websocket errors, by kind (http_429, http_5xx, bad_row, ...)",
            ["kind"],
            registry=r,
        )
        self.candles = Counter(
            "mp_ingest_candles_published",
            "CandleClosed published, by synthetic (empty bucket)",
            ["synthetic"],
            registry=r,
        )
        self.missing = Counter(
            "mp_ingest_missing_buckets",
            "Buckets still undecided at the deadline (their step went out without them)",
            registry=r,
        )
        self.steps = Counter("mp_ingest_steps_published", "Watermarks published (steps)", registry=r)
        self.finalisation_lag = Histogram(
            "mp_ingest_finalisation_lag_seconds",
            "Bucket end to its step's publication, exchange seconds",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.clock_skew = Gauge(
            "mp_ingest_clock_skew_seconds", "Exchange time minus the machine's clock", registry=r
        )
        self.clock_rate = Gauge(
            "mp_ingest_clock_rate", "Exchange seconds per local second (estimate)", registry=r
        )
        self.trades = Counter(
            "mp_ingest_trades_published", "TradeObserved published (after de-duplication)", registry=r
        )
        self.feed_stale = Gauge("mp_ingest_feed_stale", "1 while the feed is stale", registry=r)
