"""Consumer lag per consumer group, topic and partition: end offset minus committed offset.

I/O (`fetch_lag`) asks the broker for the namespace's groups, their committed offsets (admin
`list_consumer_group_offsets`), their members' assignments (`describe_consumer_groups`) and the partitions'
end offsets (consumer `end_offsets`). Everything else here is pure: `compute_lag` turns those numbers into
rows, `format_table` and `to_json` render them.

A partition assigned to a member but never committed has no lag value ("-", as Kafka's own
kafka-consumer-groups tool shows it): where the consumer starts depends on its offset-reset policy.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.monitor.health import GroupInfo, describe_groups, list_namespace_groups
from shared.bus import KafkaAccess

TP = tuple[str, int]


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None
    end: int
    lag: int | None


@dataclass(frozen=True)
class GroupLag:
    group: str
    state: str
    members: int
    partitions: tuple[PartitionLag, ...]

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions if p.lag is not None)

    @property
    def max(self) -> int:
        return max((p.lag for p in self.partitions if p.lag is not None), default=0)


@dataclass(frozen=True)
class LagReport:
    namespace: str | None
    bootstrap: str  # the servers (shown and written in reports; never a credential)
    taken_at: float
    groups: tuple[GroupLag, ...]
    missing_topics: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups)

    def rows(self) -> list[PartitionLag]:
        return [p for g in self.groups for p in g.partitions]


def compute_lag(
    group: str,
    committed: Mapping[TP, int],
    ends: Mapping[TP, int],
    assigned: Iterable[TP] = (),
) -> list[PartitionLag]:
    """Rows of one group, sorted by topic and partition. Committed offsets of partitions without a known end
    (a deleted topic) are left out; a committed offset beyond the end (a truncated log) counts as lag 0."""
    out = []
    for tp in sorted(set(committed) | set(assigned)):
        if tp not in ends:
            continue
        end = ends[tp]
        c = committed.get(tp)
        if c is not None and c < 0:
            c = None  # the broker's "no offset" answer for an explicitly asked partition
        out.append(PartitionLag(group, tp[0], tp[1], c, end, None if c is None else max(0, end - c)))
    return out


def build_report(
    *,
    namespace: str | None,
    bootstrap: str,
    committed: Mapping[str, Mapping[TP, int]],
    ends: Mapping[TP, int],
    infos: Mapping[str, GroupInfo],
    taken_at: float | None = None,
    missing_topics: Iterable[str] = (),
) -> LagReport:
    groups = []
    for g in sorted(set(committed) | set(infos)):
        info = infos.get(g)
        assigned = [tp for m in info.members for tp in m.assignment] if info else []
        rows = compute_lag(g, committed.get(g, {}), ends, assigned)
        groups.append(GroupLag(g, info.state if info else "?", len(info.members) if info else 0, tuple(rows)))
    return LagReport(
        namespace=namespace,
        bootstrap=bootstrap,
        taken_at=time.time() if taken_at is None else taken_at,
        groups=tuple(groups),
        missing_topics=tuple(sorted(set(missing_topics))),
    )


def _short(name: str, namespace: str | None) -> str:
    # The namespace prefix is the same on every row; the table shows it once, in its title.
    return name[len(namespace) + 1 :] if namespace and name.startswith(namespace + ".") else name


def format_table(report: LagReport) -> str:
    head = ["GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "MEMBERS", "STATE"]
    rows: list[list[str]] = []
    for g in report.groups:
        for p in g.partitions:
            rows.append(
                [
                    _short(g.group, report.namespace),
                    _short(p.topic, report.namespace),
                    str(p.partition),
                    "-" if p.committed is None else str(p.committed),
                    str(p.end),
                    "-" if p.lag is None else str(p.lag),
                    str(g.members),
                    g.state,
                ]
            )
        if not g.partitions:
            rows.append([_short(g.group, report.namespace), "-", "-", "-", "-", "-", str(g.members), g.state])
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(report.taken_at))
    title = f"consumer lag, namespace {report.namespace or '(all)'} on {report.bootstrap} at {ts}"
    if not rows:
        return f"{title}\nno consumer group in this namespace\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    numeric = {2, 3, 4, 5, 6}
    lines = [title]
    for r in [head, *rows]:
        lines.append(
            "  ".join(
                v.rjust(w) if i in numeric else v.ljust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
    lines.append(f"total lag {report.total} over {len(report.groups)} group(s)")
    if report.missing_topics:
        lines.append(f"committed offsets on deleted topics (ignored): {', '.join(report.missing_topics)}")
    return "\n".join(lines) + "\n"


def to_json(report: LagReport) -> dict[str, Any]:
    return {
        "namespace": report.namespace,
        "bootstrap": report.bootstrap,
        "taken_at": report.taken_at,
        "total_lag": report.total,
        "groups": [
            {
                "group": g.group,
                "state": g.state,
                "members": g.members,
                "total_lag": g.total,
                "partitions": [
                    {
                        "topic": p.topic,
                        "partition": p.partition,
                        "committed": p.committed,
                        "end": p.end,
                        "lag": p.lag,
                    }
                    for p in g.partitions
                ],
            }
            for g in report.groups
        ],
        "missing_topics": list(report.missing_topics),
    }


def summary_line(report: LagReport) -> str:
    worst = max(report.groups, key=lambda g: g.total, default=None)
    if worst is None:
        return "lag: no consumer group"
    return (
        f"lag: total {report.total} over {len(report.groups)} group(s); "
        f"largest {_short(worst.group, report.namespace)} {worst.total}"
    )


async def fetch_lag(
    bootstrap: KafkaAccess, namespace: str | None, *, groups: Iterable[str] | None = None
) -> LagReport:
    """Lag of every consumer group of the namespace (or of the groups given) at this moment."""
    admin = AIOKafkaAdminClient(**bootstrap.client_options(), request_timeout_ms=15_000)
    await admin.start()
    try:
        ids = sorted(groups) if groups is not None else await list_namespace_groups(admin, namespace)
        committed: dict[str, dict[TP, int]] = {}
        for gid in ids:
            offsets = await admin.list_consumer_group_offsets(gid)
            committed[gid] = {(tp.topic, tp.partition): int(om.offset) for tp, om in offsets.items()}
        infos = await describe_groups(admin, ids)
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    wanted = {tp for c in committed.values() for tp in c}
    wanted |= {tp for info in infos.values() for m in info.members for tp in m.assignment}
    missing = {t for t, _ in wanted if t not in existing}
    tps = [TopicPartition(t, p) for t, p in sorted(wanted) if t in existing]
    ends: dict[TP, int] = {}
    if tps:
        consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False, group_id=None)
        await consumer.start()
        try:
            for tp, end in (await consumer.end_offsets(tps)).items():
                ends[(tp.topic, tp.partition)] = int(end)
        finally:
            await consumer.stop()
    return build_report(
        namespace=namespace,
        bootstrap=bootstrap.servers,
        committed=committed,
        ends=ends,
        infos=infos,
        missing_topics=missing,
    )
