"""Where an execution worker publishes each output: pure, shared by the service (bootstrap.py) and
`mpctl backtest`."""

from __future__ import annotations

from shared.messages import (
    AccountSnapshotted,
    DuplicateOrderDetected,
    Message,
    OrderFilled,
    OrderUpdated,
    ProfileHalted,
    WorkerFinished,
)
from shared.topics import Route, Topics

__all__ = ["route"]


def route(msg: Message, topics: Topics, profile: str) -> list[Route]:
    """Order outcomes and halts to the order events (the strategies read them) and the audit
    log; ``profile`` is the worker's own, naming its finish marker on the status topic."""
    t = topics
    if isinstance(msg, OrderUpdated | OrderFilled | ProfileHalted | DuplicateOrderDetected):
        return [(t.events, msg.profile, False), (t.audit, msg.profile, False)]
    if isinstance(msg, AccountSnapshotted):
        # Amounts only; not an action, so not audited (the audit trail and the run's files stay as they were).
        return [(t.events, msg.profile, False)]
    if isinstance(msg, WorkerFinished):
        return [(t.status, f"execution.{profile}", False)]
    return [(t.audit, None, False)]
