"""The Kubernetes stack's Redis, run for real (issue #15): the init container's script from the committed
deploy/k8s/stack.yaml writes the ACL file from the two mounted Secrets, and a real redis-server started with
the StatefulSets' own arguments lets in only the registry (its prefix, its commands) and the admin; the
replica follows the primary as admin. Mount paths are moved to a temporary folder; nothing else changes."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from mpctl import k8s
from mpctl.infra import ensure_redis_server
from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "deploy" / "k8s" / "stack.yaml"
NS = "mp"  # the template's namespace, the one the committed manifests are rendered for


def _statefulsets() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(STACK.read_text(encoding="utf-8")) if d]
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "StatefulSet"}


class Mounts:
    """The pod's mounts as folders of `root`: the Secrets' files and the init container's output."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.admin_pw = secrets.token_hex(32)
        self.registry_pw = secrets.token_urlsafe(24)  # as Strimzi makes a KafkaUser's password
        for mount, value in (
            (k8s.REDIS_ADMIN_MOUNT, self.admin_pw),
            (k8s.REDIS_REGISTRY_MOUNT, self.registry_pw),
        ):
            folder = self.here(mount)
            folder.mkdir(parents=True)
            (folder / "password").write_text(value)  # a Secret's file: no trailing newline
        self.here(k8s.REDIS_ACL_DIR).mkdir(parents=True)

    def here(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def moved(self, text: str) -> str:
        for mount in (k8s.REDIS_ADMIN_MOUNT, k8s.REDIS_REGISTRY_MOUNT, k8s.REDIS_ACL_DIR):
            text = text.replace(mount, str(self.here(mount)))
        return text


@pytest.fixture
def mounts(tmp_path: Path) -> Mounts:
    return Mounts(tmp_path)


def _init(spec: dict[str, Any], mounts: Mounts) -> None:
    (init,) = spec["initContainers"]
    assert init["command"][:2] == ["sh", "-c"]
    done = subprocess.run(["sh", "-c", mounts.moved(init["command"][2])], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"" and done.stderr == b""  # says nothing, so never a password


def _server(
    spec: dict[str, Any], mounts: Mounts, port: int, data: Path, primary: int = 0
) -> subprocess.Popen[bytes]:
    (container,) = spec["containers"]
    cmd = [mounts.moved(a) for a in container["command"]]
    assert cmd[0] == "redis-server"
    cmd[0] = ensure_redis_server()
    data.mkdir()
    cmd += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", ""]
    if "--replicaof" in cmd:
        cmd[cmd.index("--replicaof") + 1 : cmd.index("--replicaof") + 3] = ["127.0.0.1", str(primary)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _client(port: int, **credentials: Any) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5.0, **credentials)


def _wait(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except (redis.ConnectionError, redis.ResponseError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def pair(mounts: Mounts, tmp_path: Path) -> Iterator[tuple[int, int]]:
    sets = _statefulsets()
    primary, replica = sets["redis-primary"], sets["redis-replica"]
    _init(primary, mounts)
    p_port, r_port = free_ports(2)
    procs = [
        _server(primary, mounts, p_port, tmp_path / "primary"),
        _server(replica, mounts, r_port, tmp_path / "replica", primary=p_port),
    ]
    try:
        yield p_port, r_port
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_the_acl_file_holds_digests_only(mounts: Mounts) -> None:
    _init(_statefulsets()["redis-primary"], mounts)
    text = (mounts.here(k8s.REDIS_ACL_DIR) / "users.acl").read_text()
    assert mounts.admin_pw not in text and mounts.registry_pw not in text
    lines = text.splitlines()
    assert lines[0] == "user default off"
    assert [ln.split()[1] for ln in lines] == ["default", "admin", f"{NS}.registry"]
    assert (mounts.here(k8s.REDIS_ACL_DIR) / "users.acl").stat().st_mode & 0o077 == 0


def test_only_the_registry_and_the_admin_get_in_and_the_replica_follows(
    mounts: Mounts, pair: tuple[int, int]
) -> None:
    p_port, r_port = pair
    admin = _client(p_port, username="admin", password=mounts.admin_pw)
    _wait("the primary", admin.ping)
    registry = _client(p_port, username=f"{NS}.registry", password=mounts.registry_pw)
    assert registry.set(f"{NS}:reg:probe", "1")
    assert registry.get(f"{NS}:reg:probe") == b"1"
    for refused in (
        lambda: registry.get("other:reg:probe"),
        lambda: registry.get(f"{NS}:state:secret"),
        registry.flushall,
        lambda: registry.config_get("*"),
        lambda: registry.keys("*"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    for creds in (
        {},
        {"username": f"{NS}.registry", "password": "wrong"},
        {"username": f"{NS}.arbiter", "password": mounts.registry_pw},
        {"password": mounts.admin_pw},  # the default user is off
    ):
        with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
            _client(p_port, **creds).get(f"{NS}:reg:probe")
    # The replica authenticates to the primary as admin and copies the registry's keys.
    replica = _client(r_port, username="admin", password=mounts.admin_pw)
    _wait("the replica's link", lambda: replica.info("replication").get("master_link_status") == "up")
    assert _wait("the replicated key", lambda: replica.get(f"{NS}:reg:probe")) == b"1"
