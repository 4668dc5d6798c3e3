"""Where a strategy worker publishes each output: pure, shared by the worker (bootstrap.py) and `mpctl backtest`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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

__all__ = ["Destination", "ForeignKeys", "Outputs", "routes"]

# One destination of an output: topic, key (None: no key) and partition (None: the key's partition).
Destination = tuple[str, bytes | None, int | None]


@dataclass(frozen=True)
class ForeignKeys:
    """The input records of another profile: on the plans, order events and decisions topics, keyed by that
    profile's id (the registry, the execution workers, the strategies and the arbiter all key them so). A worker's
    domain acts only on its own profile's plans and outcomes there, so it need not decode another's: each
    worker then does per record of another profile a set lookup instead of a decode and a judgement (the part
    of its work that grew with the profile count). A record without a key, or keyed by no other profile, is
    decoded as before, so a malformed record is dead-lettered by the worker of the profile it names, or by
    every worker when it names none."""

    topics: frozenset[str]
    keys: frozenset[bytes]

    @staticmethod
    def of(topics: Topics, profiles: Iterable[str], own: str) -> ForeignKeys:
        return ForeignKeys(
            frozenset({topics.plans, topics.events, topics.decisions}),
            frozenset(p.encode() for p in profiles if p != own),
        )

    def skips(self, topic: str, key: bytes | None) -> bool:
        return key is not None and key in self.keys and topic in self.topics


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
