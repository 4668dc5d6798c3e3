"""`mpctl bus acls|apply|rotate`: the principals and ACLs of a namespace on a broker mpctl runs.

- `acls` prints the ACL set the profiles file gives (shared/principals.py), without touching a broker.
- `apply` gives the broker the namespace's principals and ACLs (what `mpctl demo`/`run` do before starting the
  services): after a profile is added to the profiles file, its two principals and their rights exist.
- `rotate PRINCIPAL` gives a principal a new password: the broker gets the new verifier at once, so the old
  password stops working; restart the service (mpctl hands it the new one on its next start).

The broker's secrets come from MPCTL_BUS_DIR or the local broker's state dir (`mpctl infra up`). Nothing here
prints a password.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mpctl.bus import BusError, BusSecrets, admin_access, apply_bus, apply_redis, set_users
from mpctl.infra import ENV_BUS_DIR, LocalInfra
from shared.config import ConfigError, load_config
from shared.principals import acls, principals


def _bus(args: argparse.Namespace) -> tuple[BusSecrets, str]:
    """The broker's secrets and servers: MPCTL_BUS_DIR with KAFKA_BOOTSTRAP_SERVERS, else the local broker."""
    folder = os.environ.get(ENV_BUS_DIR, "").strip()
    servers = args.bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    local = LocalInfra(verbose=False)
    bus = BusSecrets(Path(folder).expanduser()) if folder else local.bus
    if not bus.exists():
        raise BusError(
            f"no bus secrets in {bus.folder}: start the broker with `mpctl infra up` (or set {ENV_BUS_DIR})"
        )
    return bus, servers or local.endpoints.kafka.servers


def _cmd_acls(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    ns = args.namespace or cfg.system.kafka.namespace
    rules = acls(cfg, ns)
    if args.json:
        print(json.dumps([r.__dict__ for r in rules], indent=1))
        return 0
    width = max(len(r.principal) for r in rules)
    for r in rules:
        print(f"{r.principal:<{width}}  {r.operation:<8}  {r.resource:<5}  {r.name}")
    print(f"{len(principals(cfg, ns))} principals, {len(rules)} ACLs in namespace {ns}", file=sys.stderr)
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    ns = args.namespace or cfg.system.kafka.namespace
    bus, servers = _bus(args)
    done = apply_bus(admin_access(servers, bus), bus, cfg, ns)
    print(f"namespace {ns} on {servers}: {done.users} principals, {done.acls} ACLs")
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    ns = args.namespace or cfg.system.kafka.namespace
    known = principals(cfg, ns)
    if args.principal not in known:
        print(f"unknown principal {args.principal!r}; namespace {ns} has {', '.join(known)}", file=sys.stderr)
        return 2
    bus, servers = _bus(args)
    generation = bus.rotate(args.principal)
    set_users(admin_access(servers, bus), bus, [args.principal])
    if bus.redis_address() is not None:  # its Redis user (if it has one) authenticates with the same password
        apply_redis(bus, cfg, ns, only=[args.principal])
    print(
        f"{args.principal}: new password (generation {generation}) given to the broker on {servers}; "
        "the old one no longer authenticates: restart the service"
    )
    return 0


def _run(handler: argparse.Namespace) -> int:
    try:
        code: int = handler.bus_handler(handler)
    except (ConfigError, BusError) as err:
        print(f"mpctl bus: {err}", file=sys.stderr)
        return 1
    return code


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bus = subparsers.add_parser("bus", help="the bus's principals and ACLs (authenticated Kafka)")
    actions = bus.add_subparsers(dest="bus_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=None, help="profiles file")
        p.add_argument("--namespace", default=None, help="default: system.kafka.namespace")

    def broker(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--bootstrap", default=None, help="default: KAFKA_BOOTSTRAP_SERVERS or the local broker"
        )

    p = actions.add_parser("acls", help="print the ACL set of the profiles file (no broker)")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_run, bus_handler=_cmd_acls)
    p = actions.add_parser("apply", help="give the broker the namespace's principals and ACLs")
    common(p)
    broker(p)
    p.set_defaults(handler=_run, bus_handler=_cmd_apply)
    p = actions.add_parser("rotate", help="give a principal a new password")
    p.add_argument("principal", help="e.g. mp.execution.profile_a (see `mpctl bus acls`)")
    common(p)
    broker(p)
    p.set_defaults(handler=_run, bus_handler=_cmd_rotate)
