"""`mpctl send pause|resume|flatten|kill|rotate|acknowledge PROFILE|all`: a signed command on the commands topic.

`acknowledge`: a live profile whose books and exchange account differ beyond dust (AccountMismatchDetected)
takes the exchange's amounts as its books and resumes entries."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from mpctl.infra import operator_access
from shared.clock import system_clock
from shared.commands import CommandKeyError, load_command_key, new_command
from shared.config import ConfigError, load_config
from shared.kafka import Publisher
from shared.topics import Topics

ACTIONS = ("pause", "resume", "flatten", "kill", "rotate", "acknowledge")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "send", help="publish a signed command (key from MPCTL_COMMAND_KEY or MPCTL_COMMAND_KEY_FILE)"
    )
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("target", help="a profile id, or 'all'")
    p.add_argument(
        "--run", type=Path, default=None, help="a demo's output folder (its run.json names the namespace)"
    )
    p.add_argument("--namespace", default=None)
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--config", type=Path, default=None, help="profiles file, to check the target exists")
    p.add_argument("--reason", default="")
    p.set_defaults(handler=send)


def send(args: argparse.Namespace) -> int:
    ns, bootstrap, bus_dir = args.namespace, args.bootstrap, None
    if args.run is not None:
        try:
            run = orjson.loads((args.run / "run.json").read_bytes())
        except (OSError, orjson.JSONDecodeError) as err:
            print(f"cannot read {args.run / 'run.json'}: {err}", file=sys.stderr)
            return 1
        ns, bootstrap = ns or run["namespace"], bootstrap or run["kafka_bootstrap"]
        bus_dir = run.get("bus_dir")
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    if args.target != "all" and args.target not in cfg.profiles:
        print(f"unknown profile {args.target!r}; have {sorted(cfg.profiles)} or 'all'", file=sys.stderr)
        return 1
    try:
        key = load_command_key()
    except CommandKeyError as err:
        print(str(err), file=sys.stderr)
        return 1
    ns = ns or cfg.system.kafka.namespace
    bootstrap = bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    access = operator_access(bootstrap, ns, bus_dir=bus_dir)  # commands are the operator's alone
    cmd = new_command(args.action, args.target, key=key, now=system_clock(), reason=args.reason)

    async def publish() -> None:
        pub = Publisher(access, client_id="mpctl-send")
        await pub.start()
        try:
            await pub.send(Topics(ns).commands, cmd, key=args.target)
            await pub.flush()
        finally:
            await pub.stop()

    asyncio.run(publish())
    print(f"sent {cmd.action} {cmd.target} (command {cmd.id}) to {Topics(ns).commands}")
    return 0
