"""Where the arbiter publishes each output: pure, shared by the service (bootstrap.py) and `mpctl backtest`."""

from __future__ import annotations

from shared.messages import (
    CorrelationAlert,
    ExecuteOrder,
    InternalCrossOpportunity,
    Message,
    OrderDecided,
    WorkerFinished,
)
from shared.topics import Route, Topics

__all__ = ["route"]


def route(msg: Message, topics: Topics) -> list[Route]:
    """Decisions to their own topic (only the arbiter may write it; the strategies and the reports read it) and
    the audit log; approved orders to their profile's execution topic, keyed by product (one partition keeps a
    product's orders in order)."""
    t = topics
    if isinstance(msg, OrderDecided):
        return [(t.decisions, msg.profile, False), (t.audit, msg.profile, False)]
    if isinstance(msg, ExecuteOrder):
        return [(t.approved(msg.profile), msg.product, False)]
    if isinstance(msg, InternalCrossOpportunity | CorrelationAlert):
        return [(t.audit, msg.profile, False)]
    if isinstance(msg, WorkerFinished):
        return [(t.status, "arbiter", False)]
    return [(t.audit, None, False)]
