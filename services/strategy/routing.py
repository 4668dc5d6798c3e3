"""Where a strategy worker publishes each output: pure, shared by the worker (bootstrap.py) and `mpctl backtest`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.messages import (
    AccountMismatchDetected,
    Message,
    PlaceOrder,
    ProfileHalted,
    StepCompleted,
    WorkerFinished,
)
from shared.topics import Topics

__all__ = ["Destination", "Outputs", "routes"]

# One destination of an output: topic, key (None: no key) and partition (None: the key's partition).
Destination = tuple[str, bytes | None, int | None]


@dataclass(frozen=True)
class Outputs:
    """The topics a strategy worker publishes to (names computed once: routing runs per message)."""

    intents: str
    events: str
    audit: str
    status: str
    intent_partitions: int
    profile: str
    markers: tuple[Destination, ...]

    @staticmethod
    def of(topics: Topics, intent_partitions: int, profile: str) -> Outputs:
        return Outputs(
            topics.intents,
            topics.events,
            topics.audit,
            topics.status,
            intent_partitions,
            profile,
            tuple((topics.intents, None, p) for p in range(intent_partitions)),
        )


def routes(msg: Message, out: Outputs) -> Sequence[Destination]:
    """Where the worker publishes one output (the backtest routes with the same function)."""
    if isinstance(msg, StepCompleted):
        # Every partition: the arbiter releases a step only once every profile marked it on each of them.
        return out.markers
    if isinstance(msg, PlaceOrder):
        # Keyed by product: one arbiter partition sees every intent of a product, in order.
        return [(out.intents, msg.product.encode(), None), (out.audit, msg.profile.encode(), None)]
    if isinstance(msg, ProfileHalted | AccountMismatchDetected):
        return [(out.events, msg.profile.encode(), None), (out.audit, msg.profile.encode(), None)]
    if isinstance(msg, WorkerFinished):
        return [(out.status, f"strategy.{out.profile}".encode(), None)]
    return [(out.audit, None, None)]
