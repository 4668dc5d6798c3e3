"""What `mpctl demo` and `mpctl run` share: the service processes of one run (`Stack`), the command lines they
are started with, the run directory (`run.json`, logs), topic set-up, waiting for the services, collecting.

Each service is its own process (`python -m services.<name>`), its output in `<out>/logs/<name>.log`. Only the
execution workers keep the credential store's environment variables (SECRET_ENV)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from aiokafka import AIOKafkaConsumer

from mpctl import infra
from mpctl.bus import BusSecrets, apply_bus
from mpctl.progress import Progress
from services.execution.bootstrap import LIVE_ENV
from services.monitor.collect import collect_run
from services.monitor.report_html import write_report
from shared.bus import ENV_PASSWORD_FILE, ENV_USER, KafkaAccess
from shared.codec import DecodeError, decode
from shared.config import AppConfig
from shared.kafka import ensure_topics
from shared.messages import WorkerFinished
from shared.principals import PROFILE_SERVICES, STATEFUL_SERVICES, principal
from shared.snapshots import KEY_ENV as STATE_KEY_ENV
from shared.snapshots import KEY_FILE_ENV as STATE_KEY_FILE_ENV
from shared.topics import Topics, TopicSpec, declared_topics

SECRET_ENV = ("MPCTL_SECRETS_PASSPHRASE", "MPCTL_SECRETS_KEY_FILE")

# The files a run's collection writes (stale ones are removed before a new demo).
OUTPUT_FILES = (
    "orders.jsonl",
    "fills.jsonl",
    "decisions.jsonl",
    "plans.jsonl",
    "summary.json",
    "report.html",
    "audit.jsonl",
    "alerts.jsonl",
    "monitor.json",
)

_progress = Progress("demo")  # terminal only, quiet in CI and pipes (mpctl/progress.py)

Say = Callable[[str], None]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    fh: IO[bytes]
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # set for this service only (kept on a restart)
    restarts: int = 0
    stopped: bool = False  # stopped on purpose (Stack.stop_one): its exit code is no crash


@dataclass
class Stack:
    """The service processes of one run. With `bus` (the secrets of a broker mpctl runs), each process connects
    as its own principal (shared/principals.py): its user name and CA on the command line, its password on
    standard input, read once at start (never in its arguments, environment, or a file)."""

    procs: list[Proc] = field(default_factory=list)
    bus: BusSecrets | None = None

    def start(
        self,
        name: str,
        args: list[str],
        log_dir: Path,
        *,
        append: bool = False,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """Start `python -m <args>` as service `name` (`env` added to its environment); `append` continues its
        log (a resumed run)."""
        return self._spawn(name, args, log_dir / f"{name}.log", "ab" if append else "wb", env or {})

    def _spawn(self, name: str, args: list[str], log: Path, mode: str, extra: dict[str, str]) -> Proc:
        fh = log.open(mode)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if not name.startswith("execution."):
            for k in SECRET_ENV:  # only execution workers open the credentials store
                env.pop(k, None)
        env.pop(LIVE_ENV, None)  # live only when this start says so, never inherited from the shell
        env.update(extra)
        for k in (ENV_USER, ENV_PASSWORD_FILE):
            env.pop(k, None)  # a process connects as its own principal, never as the shell's
        env.update(state_key_env(self.bus, args, env))
        argv, password = bus_args(self.bus, args)
        popen = subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdin=subprocess.PIPE if password is not None else subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with(os.getpid()),  # noqa: PLW1509 - only prctl and getppid run in the child
        )
        if popen.stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # died at once: its exit is noticed like any other
                popen.stdin.write(password.encode() if password is not None else b"")
            with contextlib.suppress(BrokenPipeError):
                popen.stdin.close()
        proc = Proc(name, popen, log, fh, list(args), dict(extra))
        self.procs.append(proc)
        return proc

    def get(self, name: str) -> Proc | None:
        return next((p for p in self.procs if p.name == name), None)

    def sigkill_and_restart(self, name: str) -> Proc:
        """SIGKILL the running service `name` and start it again with the same arguments, its log continued.

        Synchronous on purpose: with no await between kill and restart, `wait_finished` (same event loop)
        never sees the victim dead, so a fault injected on purpose is not reported as a crash."""
        old = next((p for p in self.procs if p.name == name and p.popen.poll() is None), None)
        if old is None:
            states = {p.name: p.popen.poll() for p in self.procs}
            raise RuntimeError(f"no running service {name!r} to kill (exit codes, None = running: {states})")
        old.popen.kill()
        old.popen.wait()
        old.fh.write(f"\n--- SIGKILLed by fault injection (restart {old.restarts + 1}) ---\n".encode())
        old.fh.close()
        self.procs.remove(old)
        new = self._spawn(name, old.args, old.log, "ab", old.env)
        new.restarts = old.restarts + 1
        return new

    def dead(self) -> list[Proc]:
        """Services that exited while nobody stopped them. Only the ingest may end by itself (exit 0 at the end
        of a replay); any other exit, 0 included (a SIGTERM from outside stops a service cleanly), is noticed."""
        out = []
        for p in self.procs:
            rc = p.popen.poll()
            if rc is None or p.stopped or (rc == 0 and p.name == "ingest"):
                continue
            out.append(p)
        return out

    def stop_one(self, name: str, grace: float = 10.0) -> int | None:
        """SIGTERM the service `name` and wait for it (SIGKILL after `grace`); its exit code."""
        p = self.get(name)
        if p is None:
            return None
        p.stopped = True
        if p.popen.poll() is None:
            p.popen.send_signal(signal.SIGTERM)
            try:
                p.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        return p.popen.returncode

    def stop(self, grace: float = 10.0) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
            p.fh.close()


def bus_args(bus: BusSecrets | None, args: list[str]) -> tuple[list[str], str | None]:
    """A service's `args` with its principal's user name and CA added, and the password to write to its standard
    input (None: no bus secrets, the access its environment gives)."""
    if bus is None or "--bootstrap" not in args:
        return list(args), None
    # A host of several profiles' workers (`--profile a,b`): each worker's principal, in the profiles' order,
    # a password per line; the host hands each forked worker its own (shared/runtime.py).
    who = process_principals(args)
    extra = ["--kafka-user", ",".join(who), "--kafka-password-file", "-"]
    extra += ["--kafka-ca-file", str(bus.ca_file)]
    if args[0] == "services.registry" and "--redis-url" in args and "--redis-auth" not in args:
        url = args[args.index("--redis-url") + 1] if args.index("--redis-url") + 1 < len(args) else ""
        if bus.owns_redis(url):
            extra.append("--redis-auth")  # the bus's own Redis: as the same principal, with the same password
    return [*args, *extra], "\n".join(bus.password(w).get_secret_value() for w in who)


def state_key_env(bus: BusSecrets | None, args: Sequence[str], env: Mapping[str, str]) -> dict[str, str]:
    """Where a stateful service finds its namespace's snapshot key (the file mpctl derives from the bus's
    master key, mpctl/bus.py state_key_file), unless the environment already names one (the operator's own)."""
    stateful = bool(args) and args[0] in {f"services.{s}" for s in STATEFUL_SERVICES}
    if bus is None or not stateful or "--namespace" not in args:
        return {}
    if env.get(STATE_KEY_FILE_ENV) or env.get(STATE_KEY_ENV):
        return {}
    i = list(args).index("--namespace") + 1
    if i >= len(args):
        return {}
    return {STATE_KEY_FILE_ENV: str(bus.state_key_file(args[i]))}


def process_principals(args: Sequence[str]) -> list[str]:
    """The principal of each worker a process started with `args` runs (`--profile a,b`: a host of two)."""
    if "--profile" not in args:
        return [process_principal(args)]
    i = list(args).index("--profile") + 1
    profiles = [p for p in (args[i] if i < len(args) else "").split(",") if p]
    return [process_principal([*args[:i], p, *args[i + 1 :]]) for p in profiles]


def process_principal(args: Sequence[str]) -> str:
    """The principal of a service started with `args` (`services.<name> ... --namespace NS [--profile P]`)."""
    module = args[0] if args else ""
    service = module.removeprefix("services.")
    if not module.startswith("services.") or "." in service:
        raise ValueError(f"not a service module: {module!r}")

    def value(flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None

    ns = value("--namespace")
    if ns is None:
        raise ValueError(f"{module} started without --namespace: its principal is unknown")
    return principal(ns, service, value("--profile") if service in PROFILE_SERVICES else None)


def _die_with(parent: int) -> Callable[[], None] | None:
    """A service process ends with the command that started it, even when that one is SIGKILLed: Linux sends the
    child SIGTERM when its parent dies (PR_SET_PDEATHSIG), and a child whose parent already died is stopped at
    once. Elsewhere None (no such call): the command's own signal handling still stops its services."""
    if not sys.platform.startswith("linux"):
        return None

    # Resolved here, in the parent: between fork and exec the child only calls it.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def dead_service_error(stack: Stack) -> RuntimeError | None:
    dead = stack.dead()
    if not dead:
        return None
    d = dead[0]
    return RuntimeError(
        f"service {d.name} exited with code {d.popen.returncode}; last lines of {d.log}:\n{tail(d.log)}"
    )


def expected_finishers(cfg: AppConfig) -> set[str]:
    names = {"ingest:0", "registry:0"}
    names |= {f"arbiter:partition-{p}" for p in range(cfg.system.kafka.intent_partitions)}
    names |= {f"strategy:{pid}" for pid in cfg.enabled_profiles()}
    return names


async def wait_finished(
    bootstrap: KafkaAccess,
    topic: str,
    expected: set[str],
    stack: Stack,
    timeout: float,
    started: float,
    *,
    say: Say | None = None,
) -> set[str]:
    """Wait until every `expected` service:instance announced WorkerFinished on `topic` (the end of a replay)."""
    say = say or _progress
    consumer = AIOKafkaConsumer(
        topic, **bootstrap.client_options(), auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    seen: set[str] = set()
    last_report = 0.0
    try:
        while not expected <= seen:
            err = dead_service_error(stack)
            if err is not None:
                raise err
            if time.monotonic() - started > timeout:
                missing = sorted(expected - seen)
                raise TimeoutError(f"run not complete after {timeout:.0f} s; still waiting for {missing}")
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                for rec in recs:
                    try:
                        msg = decode(rec.value)
                    except DecodeError:
                        continue
                    if isinstance(msg, WorkerFinished):
                        seen.add(f"{msg.service}:{msg.instance}")
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                say(f"{time.monotonic() - started:.0f}s: finished {sorted(seen)}")
        return seen
    finally:
        await consumer.stop()


async def wait_audit_drained(bootstrap: KafkaAccess, topics: Topics, timeout: float = 60.0) -> bool:
    """Wait (at most `timeout` s) until the monitor has written the whole audit topic to its file: its group's
    committed offset (committed only after the file is flushed) is at the topic's end. A monitor restarted
    late in a run re-reads the topic from its start and may still be writing when the other services finish."""
    from services.monitor.lag import fetch_lag  # the admin client only where a run needs it

    group = topics.group("monitor")
    deadline = time.monotonic() + timeout
    while True:
        report = await fetch_lag(bootstrap, None, groups=[group])
        rows = [r for r in report.rows() if r.topic == topics.audit]
        if rows and all(r.lag == 0 or (r.committed is None and r.end == 0) for r in rows):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)


# ------------------------------------------------------------------------------------------ run directory
def with_namespace(cfg: AppConfig, ns: str) -> AppConfig:
    kafka = cfg.system.kafka.model_copy(update={"namespace": ns})
    return cfg.model_copy(update={"system": cfg.system.model_copy(update={"kafka": kafka})})


def read_run_json(out: Path) -> dict[str, Any] | None:
    """The run directory's run.json, or None when there is none (a new run)."""
    path = out / "run.json"
    if not path.exists():
        return None
    info: dict[str, Any] = orjson.loads(path.read_bytes())
    return info


def write_run_json(
    out: Path, ns: str, endpoints: infra.Endpoints, config: Path | None, extra: dict[str, Any] | None = None
) -> None:
    """What `mpctl status|lag|report|send --run DIR` read: the namespace, the broker, Redis, the profiles file."""
    doc: dict[str, Any] = {
        "namespace": ns,
        "kafka_bootstrap": endpoints.kafka.servers,
        "redis_url": endpoints.redis_url,
        # Where the broker's secrets are (not a secret itself): `mpctl status|lag|send --run` connect as the
        # namespace's operator with them.
        "bus_dir": str(endpoints.bus.folder) if endpoints.bus is not None else None,
        "config": str(config) if config else None,
    }
    doc.update(extra or {})
    (out / "run.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


async def create_topics(endpoints: infra.Endpoints, cfg: AppConfig, ns: str) -> list[TopicSpec]:
    """The namespace's topics, and on a broker mpctl runs its principals and ACLs (mpctl/bus.py)."""
    specs = declared_topics(cfg, ns)
    await ensure_topics(endpoints.kafka, specs, replication_factor=cfg.system.kafka.replication_factor)
    if endpoints.bus is not None:
        await asyncio.to_thread(apply_bus, endpoints.kafka, endpoints.bus, cfg, ns)
    return specs


PROFILES_PER_PROCESS_ENV = "MPCTL_PROFILES_PER_PROCESS"


def profiles_per_process(env: dict[str, str] | None = None) -> int:
    """How many profiles' strategy (and execution) workers one started process hosts: MPCTL_PROFILES_PER_PROCESS,
    default 1 (a process per worker). Above 1, that many profiles share a host that forks a process per profile
    (shared/forkhost.py): each keeps its own consumer group, state and failure domain, and shares the host's
    loaded code (docs/scaling.md)."""
    raw = (os.environ if env is None else env).get(PROFILES_PER_PROCESS_ENV, "").strip() or "1"
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{PROFILES_PER_PROCESS_ENV} must be a whole number, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"{PROFILES_PER_PROCESS_ENV} must be at least 1, got {n}")
    return n


def profile_groups(profiles: Sequence[str], per_process: int) -> list[list[str]]:
    """The profiles in order, `per_process` to a group (the last may be shorter)."""
    ps = list(profiles)
    return [ps[i : i + per_process] for i in range(0, len(ps), per_process)]


def common_args(endpoints: infra.Endpoints, ns: str, config: Path | None, source: str) -> list[str]:
    """Flags every service of a run takes. `--source` chooses each service's clock: the exchange's (coinbase)
    or the candles' event time (replay)."""
    args = ["--bootstrap", endpoints.kafka.servers, "--redis-url", endpoints.redis_url, "--namespace", ns]
    if config:
        args += ["--config", str(config)]
    return [*args, "--source", source]


def start_services(
    stack: Stack,
    cfg: AppConfig,
    common: Sequence[str],
    out: Path,
    *,
    ingest_args: Sequence[str],
    exchange_api_base: str | None = None,
    append_logs: bool = False,
    live: bool = False,
) -> Path:
    """Start every service of the run, the ingest last (its candles find every consumer ready); the log folder.
    `live`: the execution workers may trade for real (MPCTL_LIVE=1); the caller has made the start explicit."""
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    c = list(common)
    # --clock auto: epochs on the exchange's clock (coinbase) or on event time (replay), from --source.
    stack.start("registry", ["services.registry", *c, "--clock", "auto"], log_dir, append=append_logs)
    stack.start("arbiter", ["services.arbiter", *c], log_dir, append=append_logs)
    api = ["--exchange-api-base", exchange_api_base] if exchange_api_base else []
    for group in profile_groups(list(cfg.enabled_profiles()), profiles_per_process()):
        # One profile: its own process, named after it; several: a host forking one process per profile.
        label = group[0] if len(group) == 1 else f"{group[0]}..{group[-1]}"
        profiles = ",".join(group)
        stack.start(
            f"execution.{label}",
            ["services.execution", *c, "--profile", profiles, *api],
            log_dir,
            append=append_logs,
            env={LIVE_ENV: "1"} if live else None,
        )
        stack.start(
            f"strategy.{label}", ["services.strategy", *c, "--profile", profiles], log_dir, append=append_logs
        )
    stack.start(
        "monitor",
        [
            "services.monitor",
            *c,
            "--audit-file",
            str(out / "audit.jsonl"),
            "--alerts-file",
            str(out / "alerts.jsonl"),
        ],
        log_dir,
        append=append_logs,
    )
    stack.start("ingest", ["services.ingest", *c, *ingest_args], log_dir, append=append_logs)
    return log_dir


async def collect(cfg: AppConfig, bootstrap: KafkaAccess, out: Path) -> dict[str, Any]:
    """The run's files from its topics (orders, fills, decisions, plans, summary), then report.html."""
    summary = await collect_run(cfg, bootstrap, out)
    write_report(out)
    return summary
