"""Local infrastructure without Docker: a real Apache Kafka broker (KRaft) and a real Redis server.

Kafka's jars come from Maven Central (resolved once with Maven into a cache outside the repository) and run
on the machine's Java 17; Redis is Debian's ``redis-server``. Both run as background processes whose pid
files, configuration, data and logs live in one state directory, so ``mpctl infra up`` can return while
they keep running and a later ``mpctl infra down``/``status`` finds them again.

Setting ``KAFKA_BOOTSTRAP_SERVERS`` and/or ``REDIS_URL`` points everything at existing servers instead
(see :func:`resolve_endpoints`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from mpctl.bus import CONTROLLER, BusSecrets, admin_access, redis_acl_file, write_private
from shared.bus import (
    ENV_CA_FILE,
    ENV_PASSWORD_FILE,
    ENV_USER,
    SASL_MECHANISM,
    KafkaAccess,
    read_password_file,
)
from shared.principals import ADMIN, OPERATOR, principal

__all__ = [
    "KAFKA_VERSION",
    "Endpoints",
    "InfraError",
    "LocalInfra",
    "Progress",
    "default_cache_dir",
    "default_state_dir",
    "ensure_kafka_jars",
    "ensure_redis_server",
    "register",
    "resolve_endpoints",
]

ENV_BUS_DIR = "MPCTL_BUS_DIR"

KAFKA_VERSION = "4.1.1"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_KAFKA_PORT = 19092
DEFAULT_CONTROLLER_PORT = 19093
DEFAULT_REDIS_PORT = 16379

# Modest on purpose: the broker shares two cores and the memory with tests and other work.
KAFKA_HEAP_OPTS = ["-Xms256m", "-Xmx512m"]
# Upstream bin/kafka-run-class.sh performance options.
KAFKA_JVM_OPTS = [
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
]
# Short-lived tool JVMs (StorageTool): start fast, stay small.
TOOL_JVM_OPTS = ["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true"]

KAFKA_READY_TIMEOUT_S = 120.0
REDIS_READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0

_KAFKA_DIR = Path(__file__).resolve().parent / "kafka"
POM_PATH = _KAFKA_DIR / "pom.xml"
LOG4J_CONFIG_PATH = _KAFKA_DIR / "log4j2.xml"

Progress = Callable[[str], None]
_T = TypeVar("_T")


class InfraError(RuntimeError):
    """Local infrastructure could not be prepared, started or stopped."""


@dataclass(frozen=True)
class Endpoints:
    """Where the servers are. `kafka`: the broker as its admin principal (topics, users, ACLs) when `bus` holds
    the broker's secrets (a broker `mpctl infra up` runs), else as the environment says (KAFKA_USERNAME, ...).
    A service is given `principal(...)`, never the admin."""

    kafka: KafkaAccess
    redis_url: str
    bus: BusSecrets | None = None

    def principal(self, name: str) -> KafkaAccess:
        """The broker as principal `name` (shared/principals.py); without the broker's secrets, the one access
        the environment gave (a broker this project does not run has its own principals)."""
        if self.bus is None:
            return self.kafka
        return self.bus.access(self.kafka.servers, name)

    @property
    def redis_secured(self) -> bool:
        """Whether Redis is the bus's own (`mpctl infra up`'s): its clients authenticate as their principal. A
        Redis the environment gave (REDIS_URL) is used as given."""
        return self.bus is not None and self.bus.owns_redis(self.redis_url)

    def redis_credentials(self, name: str = ADMIN) -> dict[str, Any]:
        """redis-py's `username`/`password` for principal `name` (default: the admin; tests and `mpctl` only);
        empty for a Redis used as given."""
        if self.bus is None or not self.redis_secured:
            return {}
        return {"username": name, "password": self.bus.password(name).get_secret_value()}


def _noop(_: str) -> None:
    pass


def default_state_dir() -> Path:
    """``${MPCTL_HOME:-~/.local/state/mpctl}/infra``: the known place for pid files, data and logs."""
    home = os.environ.get("MPCTL_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".local" / "state" / "mpctl"
    return base / "infra"


def default_cache_dir() -> Path:
    """``${MPCTL_CACHE:-~/.cache/mpctl}``: downloaded jars, kept outside the repository."""
    cache = os.environ.get("MPCTL_CACHE")
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "mpctl"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so concurrent `up`/`down` or first-run downloads do not race."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"(log {path} is empty)"


def _log_excerpt(path: Path, tail: int = 15) -> str:
    """The last ERROR/FATAL entries (with their exception line) and then the tail: the cause of a failed
    start is usually far above the shutdown noise that ends the log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    errors: list[str] = []
    for i, line in enumerate(lines):
        if re.match(r"^\[[^]]+\] (ERROR|FATAL) ", line):
            follow = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("[") else ""
            errors.append(line + ("\n    " + follow.strip() if follow else ""))
    head = ("errors:\n" + "\n".join(errors[-5:]) + "\n--- last lines:\n") if errors else ""
    return head + ("\n".join(lines[-tail:]) or f"(log {path} is empty)")


# --------------------------------------------------------------------------- process helpers


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    # Reap it first if it is our own exited child: a zombie still answers kill(pid, 0).
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    # State is the field after the parenthesised command name.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _read_pid(pid_file: Path) -> int | None:
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _set_parent_death_signal() -> None:
    """preexec_fn: let the kernel send SIGTERM to the child when the starting process dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _terminate(pid: int, timeout: float, group: bool) -> None:
    """SIGTERM (the process group when it leads one), wait, then SIGKILL."""

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group and os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    if not _pid_alive(pid):
        return
    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    send(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)
    if _pid_alive(pid):
        raise InfraError(f"process {pid} did not exit after SIGKILL")


def _run_blocking(make_coro: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion even when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(make_coro()))
        except BaseException as exc:  # handed back to the caller's thread below
            error.append(exc)

    thread = threading.Thread(target=target, name="mpctl-infra-probe")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


# --------------------------------------------------------------------------- system dependencies


def _find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(java_home) / "bin" / "java")] if java_home else []
    found = shutil.which("java")
    if found:
        candidates.append(found)
    for candidate in candidates:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            _check_java_version(candidate)
            return candidate
    raise InfraError("java not found (JAVA_HOME or PATH); Kafka 4.1.1 needs Java 17 or later")


def _check_java_version(java: str) -> None:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    text = out.stderr + out.stdout
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if not match:
        raise InfraError(f"cannot read the Java version from {java} -version: {text.strip()!r}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8" style
        major = int(match.group(2))
    if major < 17:
        raise InfraError(f"Kafka {KAFKA_VERSION} needs Java 17 or later; {java} is Java {major}")


def ensure_kafka_jars(progress: Progress | None = None, cache_dir: Path | None = None) -> Path:
    """Return the directory of Kafka's runtime jars, resolving them from Maven Central on first use.

    A marker written after a complete copy (holding the pom's hash) makes later calls free; a changed pom
    resolves again.
    """
    say = progress or _noop
    root = (cache_dir or default_cache_dir()) / f"kafka-{KAFKA_VERSION}"
    libs = root / "libs"
    marker = root / "libs.complete"
    pom_hash = hashlib.sha256(POM_PATH.read_bytes()).hexdigest()
    if marker.is_file() and marker.read_text().strip() == pom_hash and libs.is_dir():
        return libs
    with _file_lock(root / ".lock"):
        if marker.is_file() and marker.read_text().strip() == pom_hash and libs.is_dir():
            return libs  # another process finished while we waited
        mvn = shutil.which("mvn")
        if mvn is None:
            raise InfraError(
                "mvn not found on PATH; it is needed once to fetch the Kafka jars "
                "(Debian: apt-get install maven)"
            )
        _find_java()
        say(f"downloading Kafka {KAFKA_VERSION} jars from Maven Central into {libs} (first run only)...")
        started = time.monotonic()
        tmp = root / f"libs.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-f", str(POM_PATH),
            "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={tmp}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        jars = sorted(p.name for p in tmp.glob("*.jar")) if tmp.is_dir() else []
        if proc.returncode != 0 or not any(j.startswith(f"kafka_2.13-{KAFKA_VERSION}") for j in jars):
            shutil.rmtree(tmp, ignore_errors=True)
            output = (proc.stdout + proc.stderr).strip().splitlines()[-30:]
            raise InfraError(
                f"resolving Kafka {KAFKA_VERSION} with Maven failed (exit {proc.returncode}): "
                f"{' '.join(cmd)}\n" + "\n".join(output)
            )
        marker.unlink(missing_ok=True)
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        marker.write_text(pom_hash + "\n")
        say(f"fetched {len(jars)} jars in {time.monotonic() - started:.1f} s")
        return libs


_apt_updated = False


def ensure_redis_server(progress: Progress | None = None) -> str:
    """Path of ``redis-server``; installs Debian's package with apt-get when missing and we are root."""
    global _apt_updated
    say = progress or _noop
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise InfraError(
            "redis-server is not installed; install it with `apt-get install redis-server` "
            "(or set REDIS_URL to an existing Redis)"
        )
    with _file_lock(default_cache_dir() / "apt.lock"):
        if shutil.which("redis-server"):
            return shutil.which("redis-server") or "redis-server"
        say("installing redis-server with apt-get (first run only)...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        steps = ([] if _apt_updated else [["apt-get", "update"]]) + [
            ["apt-get", "install", "-y", "--no-install-recommends", "redis-server"]
        ]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
                raise InfraError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
            if cmd[1] == "update":
                _apt_updated = True
    found = shutil.which("redis-server")
    if not found:
        raise InfraError("apt-get installed redis-server but it is not on PATH")
    return found


# --------------------------------------------------------------------------- Kafka readiness probe


async def _kafka_metadata(bootstrap: KafkaAccess, timeout_s: float) -> dict[str, Any]:
    from aiokafka.admin import AIOKafkaAdminClient

    client = AIOKafkaAdminClient(
        **bootstrap.client_options(), request_timeout_ms=int(timeout_s * 1000), retry_backoff_ms=200
    )
    try:
        await asyncio.wait_for(client.start(), timeout_s)
        cluster: dict[str, Any] = await asyncio.wait_for(client.describe_cluster(), timeout_s)
        return cluster
    finally:
        with contextlib.suppress(Exception):
            await client.close()


# --------------------------------------------------------------------------- LocalInfra


class LocalInfra:
    """A single-node Kafka broker and a Redis server on the loopback interface.

    ``detach=True`` (the CLI) starts them in their own sessions so they outlive this process.
    ``detach=False`` (tests) ties them to this process: they get SIGTERM if it dies without ``down()``.
    """

    def __init__(
        self,
        state_dir: Path | str | None = None,
        kafka_port: int = DEFAULT_KAFKA_PORT,
        controller_port: int = DEFAULT_CONTROLLER_PORT,
        redis_port: int = DEFAULT_REDIS_PORT,
        *,
        host: str = DEFAULT_HOST,
        cache_dir: Path | str | None = None,
        detach: bool = True,
        verbose: bool = True,
        kafka_ready_timeout: float = KAFKA_READY_TIMEOUT_S,
    ) -> None:
        for name, port in (
            ("kafka_port", kafka_port),
            ("controller_port", controller_port),
            ("redis_port", redis_port),
        ):
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} must be 1..65535, got {port}")
        if len({kafka_port, controller_port, redis_port}) != 3:
            raise ValueError(
                f"ports must differ: kafka {kafka_port}, controller {controller_port}, redis {redis_port}"
            )
        self.state_dir = Path(state_dir).expanduser() if state_dir else default_state_dir()
        self.kafka_port = kafka_port
        self.controller_port = controller_port
        self.redis_port = redis_port
        self.host = host
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.detach = detach
        self.verbose = verbose
        self.kafka_ready_timeout = kafka_ready_timeout
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # ---- paths

    @property
    def kafka_dir(self) -> Path:
        return self.state_dir / "kafka"

    @property
    def kafka_data_dir(self) -> Path:
        return self.kafka_dir / "data"

    @property
    def kafka_pid_file(self) -> Path:
        return self.kafka_dir / "kafka.pid"

    @property
    def kafka_log(self) -> Path:
        return self.kafka_dir / "logs" / "server.log"

    @property
    def kafka_stdout_log(self) -> Path:
        return self.kafka_dir / "logs" / "kafka.out"

    @property
    def kafka_config(self) -> Path:
        return self.kafka_dir / "server.properties"

    @property
    def redis_dir(self) -> Path:
        return self.state_dir / "redis"

    @property
    def redis_pid_file(self) -> Path:
        return self.redis_dir / "redis.pid"

    @property
    def redis_log(self) -> Path:
        return self.redis_dir / "redis.log"

    @property
    def redis_acl_file(self) -> Path:
        return self.redis_dir / "users.acl"

    def _redis_admin(self) -> dict[str, Any]:
        """redis-py's credentials of this Redis's admin (none before the bus secrets exist)."""
        if not self.bus.exists():
            return {}
        return {"username": ADMIN, "password": self.bus.password(ADMIN).get_secret_value()}

    @property
    def bus_dir(self) -> Path:
        return self.kafka_dir / "bus"

    @property
    def bus(self) -> BusSecrets:
        return BusSecrets(self.bus_dir)

    @property
    def endpoints(self) -> Endpoints:
        servers = f"{self.host}:{self.kafka_port}"
        redis_url = f"redis://{self.host}:{self.redis_port}/0"
        bus = self.bus
        if not bus.exists():  # never started: nothing to connect with yet
            return Endpoints(kafka=KafkaAccess(servers=servers), redis_url=redis_url)
        return Endpoints(kafka=admin_access(servers, bus), redis_url=redis_url, bus=bus)

    # ---- public API

    def up(self, progress: Progress | None = None, *, kafka: bool = True, redis: bool = True) -> Endpoints:
        """Start what is not running yet and wait until it answers. Safe to call repeatedly."""
        say = progress or _noop
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.state_dir / ".lock"):
            # Check every port first so a conflict does not leave one server started and the other not.
            if redis and self._redis_pid() is None:
                self._check_port_free(self.redis_port, "redis", "--redis-port")
            if kafka and self._kafka_pid() is None:
                self._check_port_free(self.kafka_port, "kafka", "--kafka-port")
                self._check_port_free(self.controller_port, "kafka controller", "--controller-port")
            if redis:
                self._redis_up(say)
            if kafka:
                self._kafka_up(say)
        return self.endpoints

    def down(self, progress: Progress | None = None, *, purge: bool = False) -> None:
        """Stop both servers if they run; ``purge`` also deletes their data. Fine when nothing runs."""
        say = progress or _noop
        if not self.state_dir.exists():
            return
        with _file_lock(self.state_dir / ".lock"):
            for name, pid, pid_file in (
                ("kafka", self._kafka_pid(), self.kafka_pid_file),
                ("redis", self._redis_pid(), self.redis_pid_file),
            ):
                if pid is not None:
                    self._stop_server(name, pid, pid_file, say)
                pid_file.unlink(missing_ok=True)
            if purge:
                shutil.rmtree(self.kafka_dir, ignore_errors=True)
                shutil.rmtree(self.redis_dir, ignore_errors=True)

    def restart_kafka(self, progress: Progress | None = None, *, down_s: float = 0.0) -> None:
        """Stop the running broker (SIGTERM: a controlled shutdown), wait `down_s` seconds, and start it again on
        the same ports with the same data dir, waiting until it answers (the fault suite's broker restart; an
        outage of a chosen length).

        With ``detach=False``, call the restarts from a thread that lives as long as the servers should: the
        parent-death signal is sent when the *thread* that started a child ends (Linux prctl semantics)."""
        say = progress or _noop
        with _file_lock(self.state_dir / ".lock"):
            pid = self._kafka_pid()
            if pid is None:
                raise InfraError(f"kafka is not running from {self.state_dir}: nothing to restart")
            self._stop_server("kafka", pid, self.kafka_pid_file, say)
            time.sleep(down_s)
            self._kafka_up(say)

    def restart_redis(
        self, progress: Progress | None = None, *, flush: bool = False, down_s: float = 0.0
    ) -> None:
        """Stop the running Redis (after FLUSHALL when `flush`), wait `down_s` seconds, start it again on the
        same port. It keeps no data on disk (`--save ""`), so it comes back empty either way; its users (the ACL
        file, `apply_redis`) stay, and the flush is the admin's."""
        import redis

        say = progress or _noop
        with _file_lock(self.state_dir / ".lock"):
            pid = self._redis_pid()
            if pid is None:
                raise InfraError(f"redis is not running from {self.state_dir}: nothing to restart")
            if flush:
                client = redis.Redis(
                    host=self.host, port=self.redis_port, socket_timeout=5.0, **self._redis_admin()
                )
                try:
                    client.flushall()
                finally:
                    client.close()
            self._stop_server("redis", pid, self.redis_pid_file, say)
            time.sleep(down_s)
            self._redis_up(say)

    def _stop_server(self, name: str, pid: int, pid_file: Path, say: Progress) -> None:
        say(f"stopping {name} (pid {pid})...")
        _terminate(pid, STOP_TIMEOUT_S, group=self.detach)
        child = self._children.pop(name, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1)
        pid_file.unlink(missing_ok=True)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per component: state (running/starting/stopped), pid, port(s), log path, endpoint."""
        kafka_pid = self._kafka_pid()
        redis_pid = self._redis_pid()
        return {
            "kafka": {
                "state": self._state(kafka_pid, self.kafka_port),
                "pid": kafka_pid,
                "port": self.kafka_port,
                "controller_port": self.controller_port,
                "bootstrap": self.endpoints.kafka.servers,
                "log": str(self.kafka_log),
                "data": str(self.kafka_data_dir),
            },
            "redis": {
                "state": self._state(redis_pid, self.redis_port),
                "pid": redis_pid,
                "port": self.redis_port,
                "url": self.endpoints.redis_url,
                "log": str(self.redis_log),
            },
        }

    # ---- internals

    def _state(self, pid: int | None, port: int) -> str:
        if pid is None:
            return "stopped"
        return "running" if _port_open(self.host, port) else "starting"

    def _owned_pid(self, pid_file: Path, marker: str) -> int | None:
        """The pid in ``pid_file`` if that process is alive and is ours (its command line names ``marker``)."""
        pid = _read_pid(pid_file)
        if pid is None or not _pid_alive(pid):
            return None
        cmd = _cmdline(pid)
        if cmd is not None and not any(marker in part for part in cmd):
            return None  # pid reused by an unrelated process
        return pid

    def _kafka_pid(self) -> int | None:
        return self._owned_pid(self.kafka_pid_file, str(self.kafka_config))

    def _redis_pid(self) -> int | None:
        pid = self._owned_pid(self.redis_pid_file, "redis-server")
        if pid is None:
            return None
        # Redis rewrites its argv to "redis-server 127.0.0.1:<port>"; make sure it is this instance's.
        cmd = _cmdline(pid)
        if cmd is not None and not any(f":{self.redis_port}" in part for part in cmd):
            return None
        return pid

    def _check_port_free(self, port: int, what: str, flag: str) -> None:
        if _port_open(self.host, port):
            raise InfraError(
                f"{what} port {self.host}:{port} is already in use by a process mpctl did not start "
                f"from {self.state_dir}; stop it or pick another port ({flag})"
            )

    def _popen(self, name: str, cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
                preexec_fn=None if self.detach else _set_parent_death_signal,
            )
        self._children[name] = proc
        return proc

    # -- Redis

    def _redis_up(self, say: Progress) -> None:
        pid = self._redis_pid()
        if pid is not None and self._redis_ping(timeout=2.0):
            say(f"redis already running on {self.host}:{self.redis_port} (pid {pid})")
            return
        if pid is not None:
            _terminate(pid, STOP_TIMEOUT_S, group=False)  # alive but not answering: restart it
        self.redis_pid_file.unlink(missing_ok=True)
        self._check_port_free(self.redis_port, "redis", "--redis-port")
        server = ensure_redis_server(say)
        data = self.redis_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        # Nobody gets in without a user: `default` is off, the admin has the bus admin's password, and each
        # namespace's users (mpctl/bus.py apply_redis) are kept in this file across restarts (ACL SAVE).
        self.bus.ensure([self.host])
        self.bus.record_redis(self.host, self.redis_port)
        existing = self.redis_acl_file.read_text() if self.redis_acl_file.is_file() else ""
        write_private(self.redis_acl_file, redis_acl_file(self.bus, existing).encode())
        started = time.monotonic()
        if self.verbose:
            say(f"starting redis on {self.host}:{self.redis_port}...")
        cmd = [
            server,
            "--bind", self.host,
            "--port", str(self.redis_port),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--pidfile", str(self.redis_pid_file),
            "--logfile", str(self.redis_log),
            "--dir", str(data),
            "--aclfile", str(self.redis_acl_file),
        ]  # fmt: skip
        if self.detach:
            # Redis forks itself into the background; the process we start exits at once.
            proc = subprocess.run(
                [*cmd, "--daemonize", "yes"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                start_new_session=True,
                check=False,
            )
            if proc.returncode != 0:
                raise InfraError(
                    f"redis-server failed to start (exit {proc.returncode}): {proc.stdout}{proc.stderr}\n"
                    + _tail(self.redis_log)
                )
            child: subprocess.Popen[bytes] | None = None
        else:
            child = self._popen("redis", [*cmd, "--daemonize", "no"], self.redis_dir, self.redis_log)
            self.redis_pid_file.write_text(f"{child.pid}\n")
        deadline = started + REDIS_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if child is not None and child.poll() is not None:
                break
            if self._redis_ping(timeout=0.5):
                pid = _read_pid(self.redis_pid_file)
                say(
                    f"redis ready on {self.host}:{self.redis_port} (pid {pid}, "
                    f"{time.monotonic() - started:.1f} s, log {self.redis_log})"
                )
                return
            time.sleep(0.05)
        raise InfraError(
            f"redis on {self.host}:{self.redis_port} did not answer PING within {REDIS_READY_TIMEOUT_S:.0f} s; "
            f"last lines of {self.redis_log}:\n{_tail(self.redis_log)}"
        )

    def _redis_ping(self, timeout: float) -> bool:
        import redis

        client = redis.Redis(
            host=self.host,
            port=self.redis_port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            **self._redis_admin(),
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    # -- Kafka

    def _server_properties(self) -> str:
        h, p, c = self.host, self.kafka_port, self.controller_port
        bus = self.bus
        admin_pw = bus.password(ADMIN).get_secret_value()
        controller_pw = bus.password(CONTROLLER).get_secret_value()
        tls = {
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(bus.broker_pem),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(bus.ca_file),
        }
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # --standalone format refuses controller.quorum.voters; bootstrap.servers is the KRaft-4 way.
            "controller.quorum.bootstrap.servers": f"{h}:{c}",
            # Clients and the broker itself: SCRAM over TLS (docs/operations.md, "The bus"). The controller
            # listener is on loopback and authenticates the controller alone (PLAIN: KRaft controllers cannot
            # check SCRAM, whose verifiers live in the metadata they serve).
            "listeners": f"BUS://{h}:{p},CONTROLLER://{h}:{c}",
            "advertised.listeners": f"BUS://{h}:{p},CONTROLLER://{h}:{c}",
            "inter.broker.listener.name": "BUS",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:SASL_PLAINTEXT,BUS:SASL_SSL",
            "sasl.enabled.mechanisms": SASL_MECHANISM,
            "sasl.mechanism.inter.broker.protocol": SASL_MECHANISM,
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="{CONTROLLER}" password="{controller_pw}" user_{CONTROLLER}="{controller_pw}";'
            ),
            "listener.name.bus.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required "
                f'username="{ADMIN}" password="{admin_pw}";'
            ),
            **tls,
            **{f"listener.name.bus.{k}": v for k, v in tls.items()},
            # Nothing is allowed that no ACL allows (shared/principals.py); the admin and the controller are
            # the only super users, and no service is given either.
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{ADMIN};User:{CONTROLLER}",
            "allow.everyone.if.no.acl.found": "false",
            "log.dirs": str(self.kafka_data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            # Topics are created explicitly with the partition counts their consumers expect.
            "auto.create.topics.enable": "false",
            # One node: every internal topic must be satisfiable with a single replica.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Fewer internal partitions: the first group join / transaction creates them all at once.
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.num.partitions": "10",
            # The default 3 s delay slows every test's first consumer group join.
            "group.initial.rebalance.delay.ms": "0",
            # Default 128 MiB is allocated eagerly on the heap; Kafka's own test kit uses 2 MiB.
            "log.cleaner.dedupe.buffer.size": str(2 * 1024 * 1024),
            # Two cores are shared with everything else.
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "4",
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java_cmd(self, java: str, libs: Path, jvm_opts: list[str], main: str, *args: str) -> list[str]:
        return [
            java,
            *jvm_opts,
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG_PATH}",
            f"-Dkafka.logs.dir={self.kafka_log.parent}",
            "-cp",
            str(libs / "*"),  # expanded by the JVM, not a shell
            main,
            *args,
        ]

    def _kafka_up(self, say: Progress) -> None:
        pid = self._kafka_pid()
        if pid is not None:
            if _port_open(self.host, self.kafka_port):
                say(f"kafka already running on {self.host}:{self.kafka_port} (pid {pid})")
                return
            # Alive but port closed: most likely still starting (another `up`); wait for it.
            self._wait_kafka_ready(pid, time.monotonic(), say)
            return
        self.kafka_pid_file.unlink(missing_ok=True)
        self._check_port_free(self.kafka_port, "kafka", "--kafka-port")
        self._check_port_free(self.controller_port, "kafka controller", "--controller-port")
        libs = ensure_kafka_jars(say, self.cache_dir)
        java = _find_java()
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        formatted = (self.kafka_data_dir / "meta.properties").is_file()
        if formatted and not self.bus.exists():
            raise InfraError(
                f"the broker's data in {self.kafka_data_dir} was created without authentication (an older "
                f"mpctl): delete it with `mpctl infra down --purge` (state dir {self.state_dir}) and start again"
            )
        self.bus.ensure([self.host])
        # The admin's and the controller's passwords are in it: readable by this user only.
        write_private(self.kafka_config, self._server_properties().encode())
        if not formatted:
            self._format_storage(java, libs, say)
        started = time.monotonic()
        if self.verbose:
            say(f"starting kafka {KAFKA_VERSION} on {self.host}:{self.kafka_port}...")
        cmd = self._java_cmd(
            java, libs, [*KAFKA_HEAP_OPTS, *KAFKA_JVM_OPTS], "kafka.Kafka", str(self.kafka_config)
        )
        proc = self._popen("kafka", cmd, self.kafka_dir, self.kafka_stdout_log)
        self.kafka_pid_file.write_text(f"{proc.pid}\n")
        self._wait_kafka_ready(proc.pid, started, say)

    def _format_storage(self, java: str, libs: Path, say: Progress) -> None:
        admin_pw = self.bus.password(ADMIN).get_secret_value()
        if self.verbose:
            say(f"formatting KRaft storage in {self.kafka_data_dir} (first start)...")
        tool = "kafka.tools.StorageTool"
        uuid = subprocess.run(
            self._java_cmd(java, libs, TOOL_JVM_OPTS, tool, "random-uuid"),
            capture_output=True,
            text=True,
            check=False,
        )
        cluster_id = uuid.stdout.strip().splitlines()[-1] if uuid.stdout.strip() else ""
        if uuid.returncode != 0 or not re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id):
            raise InfraError(
                f"StorageTool random-uuid failed (exit {uuid.returncode}): {uuid.stdout}{uuid.stderr}"
            )
        fmt = subprocess.run(
            self._java_cmd(
                java, libs, TOOL_JVM_OPTS, tool,
                "format", "--standalone", "-t", cluster_id, "-c", str(self.kafka_config),
                # The admin's SCRAM verifier, there before the broker first starts (it authenticates as it).
                "--add-scram", f"{SASL_MECHANISM}=[name={ADMIN},password={admin_pw}]",
            ),
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if fmt.returncode != 0:
            raise InfraError(
                f"StorageTool format failed for {self.kafka_data_dir} (exit {fmt.returncode}): "
                + f"{fmt.stdout}{fmt.stderr}".replace(admin_pw, "***")
            )

    def _wait_kafka_ready(self, pid: int, started: float, say: Progress) -> None:
        bootstrap = self.endpoints.kafka
        deadline = started + self.kafka_ready_timeout
        last_error = "client port never opened"
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                self.kafka_pid_file.unlink(missing_ok=True)
                raise InfraError(
                    f"kafka (pid {pid}) exited during startup; from {self.kafka_log}:\n"
                    f"{_log_excerpt(self.kafka_log)}\n--- {self.kafka_stdout_log}:\n{_tail(self.kafka_stdout_log, 10)}"
                )
            # The client port opens only once the broker is unfenced; then prove a metadata round trip.
            if _port_open(self.host, self.kafka_port):
                try:
                    cluster = _run_blocking(lambda: _kafka_metadata(bootstrap, 5.0))
                except Exception as exc:  # any client error just means "not yet"
                    last_error = f"metadata request failed: {exc!r}"
                else:
                    if cluster.get("brokers"):
                        say(
                            f"kafka ready on {bootstrap} (pid {pid}, {time.monotonic() - started:.1f} s, "
                            f"log {self.kafka_log})"
                        )
                        return
                    last_error = f"metadata lists no brokers: {cluster!r}"
            time.sleep(0.25)
        raise InfraError(
            f"kafka on {bootstrap} (pid {pid}) not ready within {self.kafka_ready_timeout:.0f} s "
            f"({last_error}); from {self.kafka_log}:\n{_log_excerpt(self.kafka_log)}"
        )


# --------------------------------------------------------------------------- environment override


def shown_url(url: str) -> str:
    """A server address for a message: a password in it (``redis://:pw@host``) is masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def given_servers(env: Mapping[str, str] | None = None) -> list[str]:
    """What the environment points at, one line each (password masked); empty when nothing is set."""
    environ = os.environ if env is None else env
    kafka_env = environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    redis_env = environ.get("REDIS_URL", "").strip()
    lines = []
    if kafka_env:
        lines.append(f"using KAFKA_BOOTSTRAP_SERVERS={kafka_env}; not starting a local broker")
    if redis_env:
        lines.append(f"using REDIS_URL={shown_url(redis_env)}; not starting a local redis")
    return lines


def resolve_endpoints(
    infra: LocalInfra | None = None,
    progress: Progress | None = None,
    env: Mapping[str, str] | None = None,
    *,
    announce: Progress | None = None,
) -> Endpoints:
    """Endpoints to use: ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` when set (nothing is started for
    that component), otherwise the local servers, started if needed. Which servers the environment gave is
    told to `announce` (default: `progress`)."""
    say = progress or _noop
    environ = os.environ if env is None else env
    kafka_env = environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    redis_env = environ.get("REDIS_URL", "").strip()
    for line in given_servers(environ):
        (announce or say)(line)
    if kafka_env and redis_env:
        return Endpoints(
            kafka=access_from_env(kafka_env, environ), redis_url=redis_env, bus=_given_bus(environ)
        )
    local = (infra or LocalInfra()).up(progress, kafka=not kafka_env, redis=not redis_env)
    if not kafka_env:
        return Endpoints(kafka=local.kafka, redis_url=redis_env or local.redis_url, bus=local.bus)
    return Endpoints(
        kafka=access_from_env(kafka_env, environ), redis_url=local.redis_url, bus=_given_bus(environ)
    )


def redis_admin_credentials(redis_url: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """redis-py's credentials of the admin of the Redis at `redis_url` when it is the bus's own (MPCTL_BUS_DIR,
    else the default local infrastructure's bus); empty for a Redis used as given (a script's own client)."""
    environ = os.environ if env is None else env
    folder = environ.get(ENV_BUS_DIR, "").strip()
    bus = BusSecrets(Path(folder)) if folder else LocalInfra().bus
    if not (bus.exists() and bus.owns_redis(redis_url)):
        return {}
    return {"username": ADMIN, "password": bus.password(ADMIN).get_secret_value()}


def operator_access(
    servers: str, namespace: str, *, bus_dir: str | Path | None = None, env: Mapping[str, str] | None = None
) -> KafkaAccess:
    """How an `mpctl` command (status, lag, send, reports) reaches the broker at `servers`: as the namespace's
    operator principal, with the broker's secrets from `bus_dir` (a run's run.json records it), MPCTL_BUS_DIR, or
    the default local broker's state; else as the environment says (KAFKA_USERNAME, ...)."""
    environ = os.environ if env is None else env
    candidates = [Path(bus_dir)] if bus_dir else []
    if environ.get(ENV_BUS_DIR, "").strip():
        candidates.append(Path(environ[ENV_BUS_DIR].strip()).expanduser())
    local = LocalInfra(verbose=False)
    if servers == f"{local.host}:{local.kafka_port}":
        candidates.append(local.bus_dir)
    for folder in candidates:
        bus = BusSecrets(folder)
        if bus.exists():
            return bus.access(servers, principal(namespace, OPERATOR))
    return access_from_env(servers, {k: v for k, v in environ.items() if k != ENV_BUS_DIR})


def _given_bus(environ: Mapping[str, str]) -> BusSecrets | None:
    folder = environ.get(ENV_BUS_DIR, "").strip()
    if not folder:
        return None
    bus = BusSecrets(Path(folder).expanduser())
    if not bus.exists():
        raise InfraError(f"{ENV_BUS_DIR}={folder} holds no bus secrets (master.key, ca.crt, broker.pem)")
    return bus


def access_from_env(servers: str, environ: Mapping[str, str]) -> KafkaAccess:
    """The broker the environment names: as its admin when MPCTL_BUS_DIR holds its secrets (`mpctl infra up`
    prints both), else with KAFKA_USERNAME / KAFKA_PASSWORD_FILE / KAFKA_CA_FILE, or unauthenticated."""
    bus = _given_bus(environ)
    if bus is not None:
        return admin_access(servers, bus)
    user = environ.get(ENV_USER, "").strip() or None
    pw_file = environ.get(ENV_PASSWORD_FILE, "").strip()
    ca = environ.get(ENV_CA_FILE, "").strip()
    try:
        password = read_password_file(pw_file) if user and pw_file else None
        return KafkaAccess(
            servers=servers, username=user, password=password, ca_file=Path(ca) if ca else None
        )
    except ValueError as err:  # BusAccessError included
        raise InfraError(f"bus access from the environment: {err}") from None


# --------------------------------------------------------------------------- CLI


def _cli_progress() -> Progress:
    # Terminal only (a first start downloads the jars: worth watching); CI logs and pipes stay quiet.
    from mpctl.progress import Progress as TerminalProgress

    return TerminalProgress("infra")


def _infra_from_args(args: argparse.Namespace) -> LocalInfra:
    return LocalInfra(
        state_dir=args.state_dir,
        kafka_port=args.kafka_port,
        controller_port=args.controller_port,
        redis_port=args.redis_port,
        detach=True,
        verbose=not os.environ.get("CI"),  # CI logs get the milestones only
    )


def _cmd_up(args: argparse.Namespace) -> int:
    infra = _infra_from_args(args)
    progress = _cli_progress()
    env = dict(os.environ)
    if not (env.get("KAFKA_BOOTSTRAP_SERVERS", "").strip() and env.get("REDIS_URL", "").strip()):
        progress(f"state and logs: {infra.state_dir}")

    def announce(line: str) -> None:
        # Always on stderr, not through the terminal-only progress: a command that starts nothing must say so.
        print(f"mpctl infra up: {line}", file=sys.stderr)

    try:
        endpoints = resolve_endpoints(infra, progress, env, announce=announce)
    except InfraError as exc:
        print(f"mpctl infra up: {exc}", file=sys.stderr)
        return 1
    print(f"KAFKA_BOOTSTRAP_SERVERS={endpoints.kafka.servers}")
    if endpoints.bus is not None:
        # Not a secret: the folder (mode 0700) is what holds them; a later `mpctl` command derives its access.
        print(f"{ENV_BUS_DIR}={endpoints.bus.folder}")
    print(f"REDIS_URL={endpoints.redis_url}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    infra = _infra_from_args(args)
    progress = _cli_progress()
    try:
        infra.down(progress, purge=args.purge)
    except InfraError as exc:
        print(f"mpctl infra down: {exc}", file=sys.stderr)
        return 1
    progress(f"stopped (state dir {infra.state_dir}{', data deleted' if args.purge else ''})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    infra = _infra_from_args(args)
    status = infra.status()
    if args.json:
        print(json.dumps({"state_dir": str(infra.state_dir), **status}, indent=2))
    else:
        print(f"state dir: {infra.state_dir}")
        for name, info in status.items():
            pid = info["pid"] if info["pid"] is not None else "-"
            print(f"{name:6} {info['state']:8} pid {pid!s:>7}  port {info['port']}  log {info['log']}")
    return 0 if all(info["state"] == "running" for info in status.values()) else 3


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {port}")
    return port


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mpctl infra up|down|status``."""
    infra = subparsers.add_parser(
        "infra",
        help="run a local Kafka broker and Redis (no Docker)",
        description=(
            "Local Apache Kafka (KRaft, single node) and Redis on 127.0.0.1. "
            f"State and logs default to {default_state_dir()} ($MPCTL_HOME/infra)."
        ),
    )
    actions = infra.add_subparsers(dest="infra_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kafka-port", type=_port, default=DEFAULT_KAFKA_PORT)
        p.add_argument("--controller-port", type=_port, default=DEFAULT_CONTROLLER_PORT)
        p.add_argument("--redis-port", type=_port, default=DEFAULT_REDIS_PORT)
        p.add_argument("--state-dir", type=Path, default=None, help=f"default {default_state_dir()}")

    up = actions.add_parser("up", help="start Kafka and Redis unless already running (or set in env)")
    common(up)
    up.set_defaults(handler=_cmd_up)

    down = actions.add_parser("down", help="stop them")
    common(down)
    down.add_argument("--purge", action="store_true", help="also delete their data")
    down.set_defaults(handler=_cmd_down)

    status = actions.add_parser("status", help="show what runs (exit 3 unless both run)")
    common(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_cmd_status)
