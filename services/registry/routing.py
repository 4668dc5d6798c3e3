"""Where the registry publishes each output: pure, shared by the service (bootstrap.py) and `mpctl backtest`."""

from __future__ import annotations

from shared.messages import CommandHandled, Message, PlanPublished, WorkerFinished
from shared.topics import Route, Topics

__all__ = ["route"]


def route(msg: Message, topics: Topics) -> list[Route]:
    """Plans to the plans topic (keyed by profile: one partition holds a profile's plans in order) and the audit
    log; finish markers to the status topic; verdicts on commands and the rest to the audit log."""
    t = topics
    if isinstance(msg, PlanPublished):
        return [(t.plans, msg.profile, False), (t.audit, msg.profile, False)]
    if isinstance(msg, WorkerFinished):
        return [(t.status, "registry", False)]
    if isinstance(msg, CommandHandled):
        return [(t.audit, msg.target, False)]
    return [(t.audit, None, False)]
