"""Who may do what on the bus: one principal per service instance kind, and the ACLs each one gets.

Generated here, in one place, from the profiles file and the namespace; `mpctl infra up`/`demo`/`run` (through
mpctl/bus.py), the compose topic job and the k8s render apply this same set. The broker's standard authorizer
denies everything no ACL allows (`allow.everyone.if.no.acl.found=false`), so this table is the whole of what each
service can do:

- `orders.approved.<profile>` is written only by the arbiter and read only by that profile's execution worker:
  nobody else can hand the worker an order to send with the profile's key.
- the arbiter's decisions (`orders.decisions`) are written only by the arbiter: a forged decision is refused by
  the broker. Order events and fills are written by the execution workers, and the strategies' halts share that
  topic today (no other principal writes it); plans only by the registry; candles, trades and the exchange clock
  only by the ingest; commands only by the operator (`mpctl`).
- each consumer group is used only by its owner; each state topic is read and written only by its owner.

Pure: names and rules, no client. A principal's name starts with the namespace, so two namespaces on one broker
(a demo beside a live system, two test runs) get disjoint rights.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from shared.config import AppConfig
from shared.topics import Topics

Resource = Literal["topic", "group"]
Operation = Literal["read", "write", "describe"]
Pattern = Literal["literal", "prefixed"]

# Services with one instance kind for the whole system, and those with one per profile.
SYSTEM_SERVICES = ("ingest", "registry", "arbiter", "monitor")
PROFILE_SERVICES = ("strategy", "execution")
# The services that keep signed snapshots of their state (shared/snapshots.py): only they get the state key.
STATEFUL_SERVICES = ("arbiter", "monitor", "strategy", "execution")
OPERATOR = "operator"
# The broker's own super user (topics, SCRAM users, ACLs); never a service's principal.
ADMIN = "admin"


@dataclass(frozen=True, order=True)
class Acl:
    """ALLOW `operation` on a resource (its name, or every name starting with it when `pattern` is "prefixed") to
    one principal (a SCRAM user name)."""

    principal: str
    resource: Resource
    name: str
    operation: Operation
    pattern: Pattern = "literal"


def principal(namespace: str, service: str, profile: str | None = None) -> str:
    """The SCRAM user name of a service instance kind: `<ns>.<service>` or `<ns>.<service>.<profile>`."""
    return f"{namespace}.{service}.{profile}" if profile else f"{namespace}.{service}"


def principals(cfg: AppConfig, namespace: str) -> list[str]:
    """Every principal of a namespace: the system services, the per-profile workers, and the operator."""
    out = [principal(namespace, s) for s in SYSTEM_SERVICES]
    out += [principal(namespace, s, p) for s in PROFILE_SERVICES for p in cfg.profiles]
    out.append(principal(namespace, OPERATOR))
    return out


def acls(cfg: AppConfig, namespace: str) -> list[Acl]:
    """The whole ACL set of a namespace, sorted and without duplicates."""
    t = Topics(namespace)
    profiles = list(cfg.profiles)
    out: set[Acl] = set()

    def allow(
        who: str, ops: Iterable[Operation], topics: Iterable[str], resource: Resource = "topic"
    ) -> None:
        for name in topics:
            for op in ops:
                out.add(Acl(who, resource, name, op))

    # What every service does: report itself and what it refused.
    shared_writes = [t.audit, t.status, t.dead_letter, t.heartbeats]
    for who in [principal(namespace, s) for s in SYSTEM_SERVICES] + [
        principal(namespace, s, p) for s in PROFILE_SERVICES for p in profiles
    ]:
        allow(who, ["write"], shared_writes)

    ingest = principal(namespace, "ingest")
    # The ingest reads its own candles back to resume where it stopped (services/ingest/live.py).
    allow(ingest, ["read", "write"], [t.candles, t.trades, t.clock])

    registry = principal(namespace, "registry")
    allow(registry, ["read"], [t.candles, t.commands, t.clock])
    allow(registry, ["read", "write"], [t.plans])  # reads its own plans back on start

    arbiter = principal(namespace, "arbiter")
    allow(arbiter, ["read"], [t.intents, t.plans, t.candles, t.decisions])
    # Decisions are the only thing it writes besides approvals: it has no right on orders.events.
    allow(arbiter, ["write"], [t.decisions] + [t.approved(p) for p in profiles])
    allow(arbiter, ["read"], [t.group("arbiter")], "group")
    allow(arbiter, ["read", "write"], [t.state("arbiter")])

    for p in profiles:
        strategy = principal(namespace, "strategy", p)
        allow(strategy, ["read"], [t.candles, t.plans, t.events, t.decisions, t.commands, t.intents])
        # Its halts and account mismatches go on orders.events today: until they move to a topic of their own,
        # a strategy principal can write that topic (never orders.decisions).
        allow(strategy, ["write"], [t.intents, t.events])
        allow(strategy, ["read"], [t.group("strategy", p)], "group")
        allow(strategy, ["read", "write"], [t.state("strategy", p)])

        execution = principal(namespace, "execution", p)
        allow(execution, ["read"], [t.approved(p), t.candles, t.commands, t.clock, t.events])
        allow(execution, ["write"], [t.events])
        allow(execution, ["read"], [t.group("execution", p)], "group")
        allow(execution, ["read", "write"], [t.state("execution", p)])

    monitor = principal(namespace, "monitor")
    watched = [
        t.candles,
        t.plans,
        t.intents,
        t.events,
        t.decisions,
        t.audit,
        t.status,
        t.dead_letter,
        t.heartbeats,
    ]
    allow(monitor, ["read"], watched + [t.commands])
    allow(monitor, ["read"], [t.group("monitor")], "group")
    allow(monitor, ["read", "write"], [t.state("monitor")])
    # Consumer lag and health: every group and topic of the namespace, described (offsets, members and
    # metadata; Describe reads no record).
    watch_all = [
        Acl(who, kind, f"{namespace}.", "describe", "prefixed")
        for who in (monitor, principal(namespace, OPERATOR))
        for kind in ("topic", "group")
    ]
    out.update(watch_all)

    operator = principal(namespace, OPERATOR)
    # Commands are the operator's alone; a manual signal through the router (mpctl/router.py) is an intent like
    # a strategy's, which the arbiter judges like any other.
    allow(operator, ["write"], [t.commands, t.intents, t.audit])
    # Reports, status and lag read what the monitor reads; never an approval or a state snapshot.
    allow(operator, ["read"], watched + [t.commands, t.trades, t.clock])
    return sorted(out)


# ------------------------------------------------------------------------------------------------ Redis

# What the registry runs on Redis (services/registry/claims.py, ledger.py, recovery.py): its commands, the ones
# its Lua scripts call (Redis checks a script's calls against the caller's rights too), and loading those
# scripts. INFO (the server's run id: a restart that lost every key) and SCAN (only its own prefix is asked for;
# a key name is not a value) are the two without a key.
REGISTRY_REDIS_COMMANDS = (
    "ping", "info", "scan", "evalsha", "eval", "script|load", "script|exists",
    "get", "set", "del", "expire", "pexpire", "pttl",
    "hget", "hmget", "hset",
    "sadd", "srem", "smembers",
    "zadd", "zrem", "zrange", "zrangebyscore",
)  # fmt: skip


@dataclass(frozen=True)
class RedisUser:
    """A Redis ACL user: the principal's name (and password), the commands and key patterns it may use."""

    name: str
    commands: tuple[str, ...]
    keys: tuple[str, ...]

    def rules(self) -> list[str]:
        """`ACL SETUSER name <rules>` without the password: everything it had before is reset."""
        # Not CLIENT SETINFO (what redis-py says about itself on connecting, Redis 7.2+): it ignores a refusal.
        cmds = [f"+{c}" for c in self.commands]
        return ["reset", "resetchannels", *[f"~{k}" for k in self.keys], "-@all", *cmds]


def registry_key_prefix(namespace: str) -> str:
    """Every key the registry keeps in Redis starts with this."""
    return f"{namespace}:reg:"


def redis_users(cfg: AppConfig, namespace: str) -> list[RedisUser]:
    """Who may use Redis, and for what: the registry its own prefix, nobody else (the other services keep no
    state in Redis: their snapshot key is given to them, shared/snapshots.py). The set does not depend on the
    profiles in `cfg`."""
    prefix = _redis_glob_escape(registry_key_prefix(namespace))
    return [RedisUser(principal(namespace, "registry"), REGISTRY_REDIS_COMMANDS, (f"{prefix}*",))]


def _redis_glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
