"""Every topic name, declared once, with partitions and retention.

Names are prefixed with the run's namespace (`system.kafka.namespace`), so a demo run and a live system,
or two test runs, never read each other's messages on one broker.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import AppConfig

CANDLES = "md.candles"
TRADES = "md.trades"
CLOCK = "md.clock"
PLANS = "registry.plans"
INTENTS = "orders.intents"
APPROVED_PREFIX = "orders.approved."
EVENTS = "orders.events"
# The arbiter's decisions, on a topic only the arbiter may write (shared/principals.py).
DECISIONS = "orders.decisions"
COMMANDS = "control.commands"
AUDIT = "audit.log"
STATUS = "services.status"
DEAD_LETTER = "dead.letter"
HEARTBEATS = "services.heartbeats"
STATE_PREFIX = "state."

# Where one output goes: topic, key (None: no key), broadcast to every partition. The services' pure `route`
# functions answer these (services/*/routing.py); shared/kafka.py publishes them.
Route = tuple[str, str | None, bool]

WEEK_MS = 7 * 24 * 3600 * 1000
DAY_MS = 24 * 3600 * 1000
# A state snapshot is one record (shared/snapshots.py): the topic accepts records this large.
STATE_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Compaction never touches the active segment: rolling every 10 minutes lets old snapshots go.
STATE_SEGMENT_MS = 10 * 60 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    compacted: bool = False
    retention_ms: int = WEEK_MS
    # Broker time on every record: commands are judged fresh against a time their sender cannot set.
    log_append_time: bool = False
    max_message_bytes: int | None = None
    segment_ms: int | None = None

    def configs(self) -> dict[str, str]:
        out = (
            {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
            if self.compacted
            else {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}
        )
        if self.log_append_time:
            out["message.timestamp.type"] = "LogAppendTime"
        if self.max_message_bytes is not None:
            out["max.message.bytes"] = str(self.max_message_bytes)
        if self.segment_ms is not None:
            out["segment.ms"] = str(self.segment_ms)
        return out


class Topics:
    """Topic names of one namespace."""

    def __init__(self, namespace: str) -> None:
        self.ns = namespace

    def _n(self, base: str) -> str:
        return f"{self.ns}.{base}"

    @property
    def candles(self) -> str:
        return self._n(CANDLES)

    @property
    def trades(self) -> str:
        return self._n(TRADES)

    @property
    def clock(self) -> str:
        return self._n(CLOCK)

    @property
    def plans(self) -> str:
        return self._n(PLANS)

    @property
    def intents(self) -> str:
        return self._n(INTENTS)

    @property
    def events(self) -> str:
        return self._n(EVENTS)

    @property
    def decisions(self) -> str:
        return self._n(DECISIONS)

    @property
    def commands(self) -> str:
        return self._n(COMMANDS)

    @property
    def audit(self) -> str:
        return self._n(AUDIT)

    @property
    def status(self) -> str:
        return self._n(STATUS)

    @property
    def dead_letter(self) -> str:
        return self._n(DEAD_LETTER)

    @property
    def heartbeats(self) -> str:
        return self._n(HEARTBEATS)

    def approved(self, profile: str) -> str:
        return self._n(APPROVED_PREFIX + profile)

    def state(self, service: str, instance: str | None = None) -> str:
        """The compacted topic holding the latest state snapshot of one stateful service instance."""
        return self._n(STATE_PREFIX + (f"{service}.{instance}" if instance else service))

    def group(self, service: str, instance: str | None = None) -> str:
        """Consumer group id: one per service, or per (service, profile) for per-profile workers."""
        return self._n(f"{service}.{instance}" if instance else service)


def declared_topics(cfg: AppConfig, namespace: str | None = None) -> list[TopicSpec]:
    t = Topics(namespace or cfg.system.kafka.namespace)
    k = cfg.system.kafka
    specs = [
        TopicSpec(t.candles, k.candle_partitions),
        TopicSpec(t.trades, k.candle_partitions),
        # Only the latest observation matters to a reader: a day covers any restart.
        TopicSpec(t.clock, 1, retention_ms=DAY_MS),
        TopicSpec(t.plans, 1, compacted=True),
        TopicSpec(t.intents, k.intent_partitions),
        TopicSpec(t.events, 1),
        TopicSpec(t.decisions, 1),
        TopicSpec(t.commands, 1, log_append_time=True),
        TopicSpec(t.audit, 1),
        TopicSpec(t.status, 1),
        TopicSpec(t.dead_letter, 1),
        # Keyed by service and instance; compacted: the latest beat of each process is all `status` reads.
        TopicSpec(t.heartbeats, 1, compacted=True),
    ]
    specs += [TopicSpec(t.approved(pid), 1) for pid in cfg.profiles]
    specs += [state_spec(t.state(s, pid)) for pid in cfg.profiles for s in PER_PROFILE_STATE]
    specs += [state_spec(t.state(s)) for s in SHARED_STATE]
    return specs


# Stateful services that keep snapshots (shared/snapshots.py): one per profile, and one for the whole system.
PER_PROFILE_STATE = ("strategy", "execution")
SHARED_STATE = ("arbiter", "monitor")


def state_spec(name: str) -> TopicSpec:
    """Compacted, one partition, one key: the newest snapshot is the last record."""
    return TopicSpec(
        name, 1, compacted=True, max_message_bytes=STATE_MAX_MESSAGE_BYTES, segment_ms=STATE_SEGMENT_MS
    )
