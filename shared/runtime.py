"""What every service process shares: settings from the command line and environment, logging, and a
run loop that stops cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from shared.broker_noise import LIBRARY_LOGGERS, install_broker_noise_filter
from shared.bus import (
    ENV_CA_FILE,
    ENV_PASSWORD_FILE,
    ENV_SERVERS,
    ENV_USER,
    MAX_PASSWORD_BYTES,
    BusAccessError,
    KafkaAccess,
    read_password_file,
    redis_credentials,
)
from shared.config import AppConfig, ConfigError, load_config

# "1": the process authenticates to Redis as its principal (what `--redis-auth` says; compose/k8s/tests set it).
ENV_REDIS_AUTH = "REDIS_AUTH"


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    config_path: Path | None = None
    # The broker and this process's principal on it (shared/bus.py).
    kafka: KafkaAccess
    redis_url: str = "redis://127.0.0.1:16379/0"
    # Redis authenticates its clients (the bus's own Redis, `mpctl infra up`): connect as this process's
    # principal, with its bus password (mpctl/bus.py). False: a Redis the environment gave, used as given.
    redis_auth: bool = False
    namespace: str | None = None
    # The market-data source (coinbase | replay); None: the profiles file's system.market_data.source.
    source: str | None = None
    profile: str | None = None
    instance: str = "0"
    log_level: str = "INFO"
    # Prometheus metrics on metrics_addr:metrics_port (0: off); every service has them. What only one service
    # takes is its own typed options model, given to its bootstrap (e.g. services.registry.bootstrap.RegistryOptions).
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_addr: str = Field(default="127.0.0.1", min_length=1)

    def redis_credentials(self) -> dict[str, Any]:
        """redis-py's `username`/`password` (never in the URL): the principal's, when Redis authenticates."""
        return redis_credentials(self.kafka, self.redis_auth)

    def load(self) -> AppConfig:
        cfg = load_config(self.config_path)
        system = cfg.system
        if self.namespace:
            system = system.model_copy(
                update={"kafka": system.kafka.model_copy(update={"namespace": self.namespace})}
            )
        if self.source:
            md = system.market_data.model_copy(update={"source": self.source})
            system = system.model_copy(update={"market_data": md})
        return cfg.model_copy(update={"system": system}) if system is not cfg.system else cfg


def base_parser(service: str, *, needs_profile: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m services.{service}")
    p.add_argument(
        "--config", type=Path, default=None, help="profiles file (default: local file, else template)"
    )
    add_bus_args(p)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:16379/0"))
    p.add_argument(
        "--redis-auth",
        action="store_true",
        default=os.environ.get(ENV_REDIS_AUTH, "") == "1",
        help="authenticate to Redis as the bus principal, with its password (the bus's own Redis)",
    )
    p.add_argument(
        "--namespace", default=None, help="topic/group namespace (default: system.kafka.namespace)"
    )
    p.add_argument(
        "--source",
        choices=("coinbase", "replay"),
        default=None,
        help="market data: Coinbase in real time (the exchange's clock) or a replay (event time); "
        "default: system.market_data.source",
    )
    p.add_argument("--instance", default="0")
    p.add_argument("--log-level", default=os.environ.get("MPCTL_LOG_LEVEL", "INFO"))
    if needs_profile:
        p.add_argument("--profile", required=True)
    return p


def add_bus_args(p: argparse.ArgumentParser) -> None:
    """The broker and the principal a process connects as; the password never on the command line (shared/bus.py)."""
    env = os.environ
    p.add_argument(
        "--bootstrap", default=env.get(ENV_SERVERS, "127.0.0.1:19092"), help="the broker's servers"
    )
    p.add_argument("--kafka-user", default=env.get(ENV_USER) or None, help="the principal (SCRAM user name)")
    p.add_argument(
        "--kafka-password-file",
        default=env.get(ENV_PASSWORD_FILE) or None,
        help="file holding the principal's password (a mounted secret); '-': read it from standard input",
    )
    p.add_argument(
        "--kafka-ca-file",
        type=Path,
        default=Path(env[ENV_CA_FILE]) if env.get(ENV_CA_FILE) else None,
        help="CA certificate of the broker's TLS listener (default: the system's trust store)",
    )


# Passwords a host of several profiles' workers was handed on standard input (one per principal of its
# comma-separated --kafka-user, in order), for the workers it forks (shared/forkhost.py). A worker takes its own
# and forgets the others'.
_HANDED: dict[str, SecretStr] = {}


def take_bus_passwords(args: argparse.Namespace) -> None:
    """In a host started with `--kafka-user a,b,c --kafka-password-file -`: read the principals' passwords, one
    line each in that order, before forking its workers."""
    users = [u for u in (args.kafka_user or "").split(",") if u]
    if len(users) < 2 or args.kafka_password_file != "-":
        return
    lines = [ln.strip() for ln in sys.stdin.read(MAX_PASSWORD_BYTES * len(users)).splitlines() if ln.strip()]
    if len(lines) != len(users):
        raise SystemExit(f"--kafka-password-file -: {len(lines)} passwords for {len(users)} principals")
    _HANDED.update({u: SecretStr(pw) for u, pw in zip(users, lines, strict=True)})


def serve_hosted(
    service: str,
    parser: argparse.ArgumentParser,
    argv: list[str],
    main: Callable[[list[str]], int],
    preload: Sequence[str],
) -> int | None:
    """A start naming several profiles (`--profile a,b`, MPCTL_PROFILES_PER_PROCESS): run a host forking each
    profile's worker as `main(its own command line)` (shared/forkhost.py) and return its exit code; None for one
    profile (the caller runs the worker itself). A bad command line or profiles file is refused once, before any
    fork; each worker's bus password is read here and handed to that worker alone."""
    from shared.forkhost import argv_for, profile_arg, profiles_of, serve_forked

    profiles = profiles_of(profile_arg(argv) or "")
    if len(profiles) < 2:
        return None
    host = parser.parse_args(argv)
    take_bus_passwords(host)
    try:
        load_config(host.config)  # parsed once: the workers find it parsed (shared.config.load_config)
    except ConfigError as err:
        raise SystemExit(f"{service}: {err}") from None
    return serve_forked(
        profiles,
        lambda pid: main(argv_for(argv, pid, profiles, host.metrics_port)),
        name=service,
        preload=preload,
    )


def bus_access_from_args(args: argparse.Namespace) -> KafkaAccess:
    """The KafkaAccess of `add_bus_args`' options, read once per process (a password from standard input can
    be read only once). A missing or unreadable password exits with one line naming the option."""
    cached = getattr(args, "_bus_access", None)
    if isinstance(cached, KafkaAccess):
        return cached
    password = None
    if args.kafka_user:
        if not args.kafka_password_file:
            raise SystemExit(
                f"--kafka-user {args.kafka_user} needs --kafka-password-file (or ${ENV_PASSWORD_FILE})"
            )
        if args.kafka_password_file == "-" and args.kafka_user in _HANDED:
            password = _HANDED[args.kafka_user]  # a forked worker's own, handed to its host
            _HANDED.clear()
        else:
            try:
                password = read_password_file(args.kafka_password_file)
            except BusAccessError as err:
                raise SystemExit(f"--kafka-password-file: {err}") from None
    elif args.kafka_password_file:
        raise SystemExit(f"--kafka-password-file given without --kafka-user (or ${ENV_USER})")
    try:
        access = KafkaAccess(
            servers=args.bootstrap,
            username=args.kafka_user or None,
            password=password,
            ca_file=args.kafka_ca_file,
        )
    except ValueError as err:
        raise SystemExit(f"bus access: {err}") from None
    args._bus_access = access
    return access


def add_metrics_args(p: argparse.ArgumentParser, why_off: str = "0: off", *, default_port: int = 0) -> None:
    """--metrics-port / --metrics-addr, the same for every service: loopback unless a container needs 0.0.0.0."""
    p.add_argument(
        "--metrics-port",
        type=int,
        default=default_port,
        help=f"serve Prometheus metrics on ADDR:PORT ({why_off})",
    )
    p.add_argument(
        "--metrics-addr", default="127.0.0.1", help="address to serve metrics on (0.0.0.0 in a container)"
    )


def check_metrics_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.metrics_port <= 65535:
        p.error(f"--metrics-port must be 0..65535, got {args.metrics_port}")


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    """The settings every service shares, from `base_parser` (+ `add_metrics_args` where the service has them)."""
    return ServiceSettings(
        config_path=args.config,
        kafka=bus_access_from_args(args),
        redis_url=args.redis_url,
        redis_auth=bool(getattr(args, "redis_auth", False)),
        namespace=args.namespace,
        source=getattr(args, "source", None),
        profile=getattr(args, "profile", None),
        instance=args.instance,
        log_level=args.log_level,
        # A service whose parser has no metrics options (or leaves them unset) serves none through these.
        metrics_port=getattr(args, "metrics_port", None) or 0,
        metrics_addr=getattr(args, "metrics_addr", None) or "127.0.0.1",
    )


def setup_logging(service: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # A broker outage: one line when it goes, a summary a minute, one when it is back (shared/broker_noise.py).
    install_broker_noise_filter(handler)
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
        handlers=[handler],
    )
    # Libraries log connection chatter at INFO; keep the service's own lines readable.
    for noisy in LIBRARY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_service(main: Callable[[asyncio.Event], Awaitable[int]]) -> int:
    """Run `main(stop_event)` until it returns; SIGTERM/SIGINT/SIGHUP set the event so it can stop cleanly (and
    say so in the log)."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if not stop.is_set():
                logging.getLogger("service").info("%s received: stopping", sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, on_signal, sig)
        return await main(stop)

    return asyncio.run(runner())


def main_entry(
    argv: Sequence[str] | None,
    service: str,
    parser: argparse.ArgumentParser,
    *,
    process_setup: bool = True,
) -> argparse.Namespace:
    """Parse and check one worker's command line, set up the process (logging, the orphan watchdog; not again
    with `process_setup=False`: a second profile of a shared loop) and start the worker's heartbeat."""
    args = parser.parse_args(argv)
    if isinstance(getattr(args, "metrics_port", None), int):
        check_metrics_args(parser, args)  # before anything starts (the heartbeat below)
    try:
        load_config(args.config)
    except ConfigError as err:
        # Refused before anything starts, with the file and the problem and no traceback (every service loads it).
        raise SystemExit(f"{service}: {err}") from None
    if process_setup:
        setup_logging(service, args.log_level)
        start_orphan_watchdog()
    _heartbeat(service, args)
    return args


def add_shared_loop_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--shared-loop",
        action="store_true",
        default=os.environ.get(SHARED_LOOP_ENV, "").strip() == "1",
        help=(
            "with several profiles (--profile a,b): run them in this one process on one event loop, each with its "
            "own consumer group, state, principal, heartbeat and metrics, a failed one started again alone "
            f"(shared/loophost.py), instead of a forked process each; env {SHARED_LOOP_ENV}=1"
        ),
    )


# `--shared-loop` from the environment (mpctl demo / run pass it on to the strategy hosts they start).
SHARED_LOOP_ENV = "MPCTL_SHARED_LOOP"


def serve_shared_loop(
    service: str,
    parser: argparse.ArgumentParser,
    argv: list[str],
    build: Callable[[ServiceSettings], Callable[[asyncio.Event], Awaitable[int]]],
) -> int | None:
    """A start naming several profiles with `--shared-loop`: every profile's worker (`build(its settings)`, a
    fresh one at every start) as a task of this process (shared/loophost.py), and the exit code; None otherwise
    (the caller forks a host or runs one worker). Each profile's command line is checked and its heartbeat
    started before any runs."""
    from shared.forkhost import argv_for, profile_arg, profiles_of
    from shared.loophost import run_together

    profiles = profiles_of(profile_arg(argv) or "")
    if len(profiles) < 2:
        return None
    host = parser.parse_args(argv)
    if not host.shared_loop:
        return None
    if len(set(profiles)) != len(profiles):
        raise SystemExit(f"{service}: --profile {','.join(profiles)}: a profile named twice")
    take_bus_passwords(host)
    handed = dict(_HANDED)
    settings: dict[str, ServiceSettings] = {}
    for i, pid in enumerate(profiles):
        _HANDED.update(handed)  # each profile's worker takes its own principal's (and the map is cleared)
        args = main_entry(
            argv_for(argv, pid, profiles, host.metrics_port), service, parser, process_setup=i == 0
        )
        settings[pid] = settings_from_args(args)
    _HANDED.clear()
    handed.clear()

    def starter(s: ServiceSettings) -> Callable[[asyncio.Event], Awaitable[int]]:
        return lambda stop: build(s)(stop)

    return run_service(lambda stop: run_together({pid: starter(s) for pid, s in settings.items()}, stop))


# How long a service whose parent died (mpctl killed: its PR_SET_PDEATHSIG SIGTERM is on the way) may take to stop
# cleanly before it exits anyway. A clean stop takes a second or two (the final snapshot); a stop can hang, e.g.
# after CPython 3.11's asyncio SSL write race ("Fatal error on SSL protocol") during a client's shutdown.
ORPHAN_GRACE_S = 10.0


def start_orphan_watchdog(grace_s: float = ORPHAN_GRACE_S) -> threading.Thread | None:
    """A daemon thread that ends the process `grace_s` after its parent is gone, if it has not stopped by then: a
    service started by `mpctl` never outlives the run (a process whose parent is init or a container's PID 1
    from the start is left alone)."""
    parent = os.getppid()
    if parent <= 1:
        return None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        time.sleep(grace_s)
        logging.getLogger("service").error(
            "parent process %d gone %.0f s ago and this one has not stopped: exiting", parent, grace_s
        )
        logging.shutdown()
        os._exit(70)

    thread = threading.Thread(target=watch, name="orphan-watchdog", daemon=True)
    thread.start()
    return thread


def _heartbeat(service: str, args: argparse.Namespace) -> None:
    """Every service process beats on the namespace's heartbeat topic (shared/heartbeat.py)."""
    from shared.heartbeat import heartbeat_interval, start_heartbeat
    from shared.topics import Topics

    try:
        interval = heartbeat_interval()
    except ValueError as err:
        raise SystemExit(f"{service}: {err}") from None
    if interval <= 0:
        return
    namespace = args.namespace
    if not namespace:
        try:
            namespace = load_config(args.config).system.kafka.namespace
        except Exception:
            return  # the service reports the bad config itself, with its own message
    profile = getattr(args, "profile", None)
    name = f"{service}.{profile}" if profile else service
    start_heartbeat(
        bus_access_from_args(args),
        Topics(namespace).heartbeats,
        name,
        str(args.instance),
        interval_s=interval,
    )
