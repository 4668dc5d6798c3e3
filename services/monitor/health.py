"""Which services are up: from their heartbeats, else from Kafka's consumer-group membership.

Every service process publishes a `ServiceHeartbeat` every few seconds (shared/heartbeat.py). A service with a
beat younger than the threshold (3 intervals unless told) is `up`, one whose latest beat is older (killed,
hung) or was its clean-exit beat is `down`; the note says how long ago it beat. This covers the ingest (a
producer) and the registry (reads without a group) too.

A service that never beat (older builds, beats turned off) is judged by its consumer group as before: a group
with members is a running service, a group without members (state Empty) a stopped one, no group at all a
service that never ran in this namespace; the ingest and the registry are then `not-observable`.

Pure: `expected_services`, `service_health`, `health_rows`. I/O: `describe_groups`, `read_heartbeats`,
`fetch_health`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from shared.bus import KafkaAccess
from shared.clock import system_clock
from shared.config import AppConfig
from shared.heartbeat import heartbeat_state
from shared.kafka import read_topics
from shared.messages import ServiceHeartbeat
from shared.topics import Topics

# service name -> instance -> its latest beat
Beats = Mapping[str, Mapping[str, ServiceHeartbeat]]

ServiceState = Literal["up", "down", "never-ran", "not-observable"]


@dataclass(frozen=True)
class MemberInfo:
    member_id: str
    client_id: str
    host: str
    assignment: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class GroupInfo:
    group: str
    state: str  # Kafka's group state: Stable, PreparingRebalance, CompletingRebalance, Empty, Dead
    protocol_type: str
    members: tuple[MemberInfo, ...] = ()


@dataclass(frozen=True)
class ExpectedService:
    name: str  # "arbiter", "strategy.profile_a", ...
    group: str | None  # consumer group id, None when the service joins no group
    note: str = ""
    # The group may not exist even while the service runs (it reads without one): its absence means
    # "not observable", not "never ran".
    group_optional: bool = False


@dataclass(frozen=True)
class ServiceHealth:
    name: str
    state: ServiceState
    group: str | None
    members: int = 0
    group_state: str = ""
    clients: tuple[str, ...] = field(default=())
    note: str = ""
    beat_age_s: float | None = None  # age of the freshest beat (None: never beat)
    instances_up: int = 0  # instances whose beat is fresh

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["clients"] = list(self.clients)
        return d


def expected_services(cfg: AppConfig, namespace: str | None = None) -> list[ExpectedService]:
    """Every service a run of this config starts, with the consumer group it joins."""
    t = Topics(namespace or cfg.system.kafka.namespace)
    out = [
        ExpectedService("ingest", None, "producer only: joins no consumer group"),
        ExpectedService(
            "registry",
            t.group("registry"),
            "reads its partitions without a consumer group",
            group_optional=True,
        ),
        ExpectedService("arbiter", t.group("arbiter")),
    ]
    for pid in cfg.enabled_profiles():
        out.append(ExpectedService(f"strategy.{pid}", t.group("strategy", pid)))
        out.append(ExpectedService(f"execution.{pid}", t.group("execution", pid)))
    out.append(ExpectedService("monitor", t.group("monitor")))
    return out


def service_health(
    expected: Sequence[ExpectedService],
    groups: dict[str, GroupInfo],
    beats: Beats | None = None,
    *,
    now: datetime | None = None,
    threshold_s: float | None = None,
) -> list[ServiceHealth]:
    out = []
    for svc in expected:
        mine = (beats or {}).get(svc.name)
        if mine:
            out.append(_from_beats(svc, mine, groups.get(svc.group) if svc.group else None, now, threshold_s))
            continue
        if svc.group is None:
            out.append(ServiceHealth(svc.name, "not-observable", None, note=svc.note))
            continue
        info = groups.get(svc.group)
        if (info is None or info.state == "Dead") and svc.group_optional:
            out.append(ServiceHealth(svc.name, "not-observable", None, note=svc.note))
            continue
        if info is None or info.state == "Dead":
            out.append(ServiceHealth(svc.name, "never-ran", svc.group, note="no such consumer group"))
            continue
        up = len(info.members) > 0
        out.append(
            ServiceHealth(
                svc.name,
                "up" if up else "down",
                svc.group,
                members=len(info.members),
                group_state=info.state,
                clients=tuple(sorted({f"{m.client_id}@{m.host}" for m in info.members})),
            )
        )
    return out


def _from_beats(
    svc: ExpectedService,
    beats: Mapping[str, ServiceHeartbeat],
    info: GroupInfo | None,
    now: datetime | None,
    threshold_s: float | None,
) -> ServiceHealth:
    at = now or system_clock()
    judged = [heartbeat_state(b, at, threshold_s) for b in beats.values()]
    up = [j for j in judged if j.state == "up"]
    freshest = min(judged, key=lambda j: j.age_s)
    if up:
        note = f"{len(up)} instance(s) beating, last beat {freshest.age_s:.1f} s ago"
    elif freshest.stopping:
        note = f"stopped cleanly {freshest.age_s:.1f} s ago"
    else:
        note = f"no beat for {freshest.age_s:.1f} s (instance {freshest.instance})"
    live = info is not None and info.state != "Dead"
    return ServiceHealth(
        svc.name,
        "up" if up else "down",
        svc.group if live else None,
        members=len(info.members) if live and info is not None else 0,
        group_state=info.state if live and info is not None else "",
        clients=tuple(sorted({f"{m.client_id}@{m.host}" for m in info.members})) if live and info else (),
        note=note,
        beat_age_s=round(freshest.age_s, 3),
        instances_up=len(up),
    )


def health_rows(health: Iterable[ServiceHealth]) -> list[list[str]]:
    return [
        [
            h.name,
            h.state,
            "-" if h.beat_age_s is None else f"{h.beat_age_s:.1f}s",
            "-"
            if h.state == "not-observable" or (h.group is None and h.beat_age_s is not None)
            else str(h.members),
            h.group_state or "-",
            h.note or ", ".join(h.clients) or "-",
        ]
        for h in health
    ]


HEALTH_HEADER = ["SERVICE", "STATE", "LAST BEAT", "MEMBERS", "GROUP STATE", "DETAIL"]


async def read_heartbeats(bootstrap: KafkaAccess, topic: str) -> dict[str, dict[str, ServiceHeartbeat]]:
    """The latest beat of every (service, instance) on the heartbeat topic."""
    msgs, _bad = await read_topics(bootstrap, [topic])
    out: dict[str, dict[str, ServiceHeartbeat]] = {}
    for m in msgs:
        if isinstance(m, ServiceHeartbeat):
            cur = out.setdefault(m.service, {}).get(m.instance)
            if cur is None or m.event_time >= cur.event_time:
                out[m.service][m.instance] = m
    return out


def _assignment(raw: bytes) -> tuple[tuple[str, int], ...]:
    if not raw:
        return ()
    try:
        a = ConsumerProtocolMemberAssignment.decode(raw)
    except Exception:
        return ()  # a non-standard assignor's bytes: membership still counts, the partitions are unknown
    return tuple(sorted((str(topic), int(p)) for topic, parts in a.assignment for p in parts))


async def describe_groups(admin: AIOKafkaAdminClient, group_ids: Iterable[str]) -> dict[str, GroupInfo]:
    """Describe each group with its own request.

    One group per request on purpose: aiokafka 0.14 negotiates DescribeGroups v3 but decodes the answer with
    the v2 schema, which lacks the per-group `authorized_operations` field. With one group that field is the
    trailing bytes of the answer and is ignored; with several groups the decoding runs off the end.
    """
    out: dict[str, GroupInfo] = {}
    for gid in group_ids:
        responses = await admin.describe_consumer_groups([gid])
        for resp in responses:
            for g in resp.groups:
                error_code, group, state, protocol_type, _protocol, members = g[:6]
                if error_code:
                    continue
                out[str(group)] = GroupInfo(
                    group=str(group),
                    state=str(state),
                    protocol_type=str(protocol_type),
                    members=tuple(
                        MemberInfo(str(m[0]), str(m[1]), str(m[2]), _assignment(bytes(m[4] or b"")))
                        for m in members
                    ),
                )
    return out


async def list_namespace_groups(admin: AIOKafkaAdminClient, namespace: str | None) -> list[str]:
    groups = [str(g[0]) for g in await admin.list_consumer_groups()]
    if namespace:
        groups = [g for g in groups if g.startswith(namespace + ".")]
    return sorted(groups)


async def fetch_health(
    bootstrap: KafkaAccess, cfg: AppConfig, namespace: str | None = None, *, threshold_s: float | None = None
) -> list[ServiceHealth]:
    ns = namespace or cfg.system.kafka.namespace
    admin = AIOKafkaAdminClient(**bootstrap.client_options(), request_timeout_ms=15_000)
    await admin.start()
    try:
        present = set(await list_namespace_groups(admin, ns))
        expected = expected_services(cfg, ns)
        wanted = [s.group for s in expected if s.group is not None and s.group in present]
        groups = await describe_groups(admin, wanted)
        topic = Topics(ns).heartbeats
        has_beats = topic in set(await admin.list_topics())
    finally:
        await admin.close()
    beats = await read_heartbeats(bootstrap, topic) if has_beats else {}
    return service_health(expected, groups, beats, now=system_clock(), threshold_s=threshold_s)
