"""Which services are up, read from Kafka's consumer-group membership (no heartbeat in the services needed).

Every consuming service joins a consumer group named by `Topics.group` (arbiter, strategy.<profile>,
execution.<profile>, monitor): a group with members is a running service, a group without members (state
Empty) is a stopped one, and no group at all is a service that never ran in this namespace. The registry
(assigned partitions, group_id None) and the ingest (producer only) join no group: they are reported as not
observable this way, with the reason.

Pure: `expected_services`, `service_health`, `health_rows`. I/O: `describe_groups`, `fetch_health`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from shared.config import AppConfig
from shared.topics import Topics

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
            "registry", t.group("registry"), "reads its partitions without a consumer group", group_optional=True
        ),
        ExpectedService("arbiter", t.group("arbiter")),
    ]
    for pid in cfg.enabled_profiles():
        out.append(ExpectedService(f"strategy.{pid}", t.group("strategy", pid)))
        out.append(ExpectedService(f"execution.{pid}", t.group("execution", pid)))
    out.append(ExpectedService("monitor", t.group("monitor")))
    return out


def service_health(expected: Sequence[ExpectedService], groups: dict[str, GroupInfo]) -> list[ServiceHealth]:
    out = []
    for svc in expected:
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


def health_rows(health: Iterable[ServiceHealth]) -> list[list[str]]:
    return [
        [
            h.name,
            h.state,
            "-" if h.state == "not-observable" else str(h.members),
            h.group_state or "-",
            h.note or ", ".join(h.clients) or "-",
        ]
        for h in health
    ]


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
                        MemberInfo(str(m[0]), str(m[1]), str(m[2]), _assignment(bytes(m[4] or b""))) for m in members
                    ),
                )
    return out


async def list_namespace_groups(admin: AIOKafkaAdminClient, namespace: str | None) -> list[str]:
    groups = [str(g[0]) for g in await admin.list_consumer_groups()]
    if namespace:
        groups = [g for g in groups if g.startswith(namespace + ".")]
    return sorted(groups)


async def fetch_health(bootstrap: str, cfg: AppConfig, namespace: str | None = None) -> list[ServiceHealth]:
    ns = namespace or cfg.system.kafka.namespace
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15_000)
    await admin.start()
    try:
        present = set(await list_namespace_groups(admin, ns))
        expected = expected_services(cfg, ns)
        wanted = [s.group for s in expected if s.group is not None and s.group in present]
        return service_health(expected, await describe_groups(admin, wanted))
    finally:
        await admin.close()
