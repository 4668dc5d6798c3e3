"""The compose stack, run for real (issue #17): `docker compose up` of the rendered docker-compose.yml on a Docker
engine, with the project's image built from its own Dockerfile (tests/compose/images.py), stand-ins built
locally for the public images it names, and Compose v2 itself.

(a) Live: the live ingest against the market-data peer (a container of the project's image running
    tests/peer/coinbase_md_peer.py), paper execution. Every service becomes healthy; the forward test produces
    plans, orders and fills; `mpctl status` and `mpctl lag` on the host see every service; Prometheus scrapes
    every `/metrics`; each execution container holds only its own profile's credential files, readable by the
    container's user, and each service only its own bus principal's password; no password of the bus is in a log;
    `docker compose down` then `up` resumes (the candles go on, none twice).
(b) Replay: `--profile replay` with the live ingest scaled to 0; `docker kill` of a strategy and an execution
    container mid-run, then `docker compose up -d`: the run's files equal the backtest's on the same candles,
    byte for byte (the books of an uninterrupted run; tests/e2e/test_backtest_parity.py shows the demo's equal
    them too).
(c) The bus (issue #15): the stack's broker refuses a client without credentials or with a wrong password on the
    published port, a strategy principal cannot write its profile's approvals, and Redis refuses its default user
    and keeps each principal to its own keys; `mpctl compose rotate` retires a principal's old password.

Every test runs on the authenticated stack: the host reaches the broker as the admin or the operator with the
secrets `mpctl compose init-bus` wrote (tests/compose/stack.py).

Run by `make test-compose` (and `.ci/run` after `make test`), not by `make test`."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError
from pydantic import SecretStr

from mpctl.bus import CONTROLLER
from mpctl.compose import compose_principals
from mpctl.stack import collect, expected_finishers
from shared.bus import KafkaAccess
from shared.config import load_config
from shared.kafka import read_topics
from shared.messages import CandleClosed, WorkerFinished
from shared.principals import STATEFUL_SERVICES, principal, registry_key_prefix
from shared.topics import Topics
from tests.compose.images import Images, ensure_images, image_size_mb
from tests.compose.stack import PEER_PORT, ComposeStack
from tests.e2e.test_run import DATA, PEER_START, data_assets, lower
from tests.integration.test_bus_acls import end_offset, write

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
APP_UID = 10001  # the image's user (Dockerfile)
FILES = ("orders.jsonl", "fills.jsonl", "decisions.jsonl", "plans.jsonl", "summary.json")
REPLAY_HOURS = 300


@pytest.fixture(scope="module")
def images() -> Images:
    built = ensure_images()
    size = image_size_mb(built.project)
    times = ", ".join(f"{k} {v:.1f} s" for k, v in built.seconds.items())
    print(f"\nimages: {times}; {built.project} {size:.0f} MB")
    return built


@pytest.fixture
def stack(images: Images, tmp_path: Path) -> Iterator[ComposeStack]:
    s = ComposeStack(tmp_path / "stack", images)
    try:
        yield s
    finally:
        print("\n".join(["compose calls:", *s.log]))
        s.destroy()


def profiles_file(tmp_path: Path, market_data: dict[str, Any]) -> Path:
    """The template with both profiles enabled, low entry thresholds (trades within minutes) and `market_data`."""
    doc = yaml.safe_load((ROOT / "config" / "coinbase_profiles.yaml").read_text())
    doc.setdefault("system", {})["mode"] = "paper"
    doc["system"]["market_data"] = market_data
    have = data_assets()
    for p in doc["profiles"].values():
        p["enabled"] = True
        sc = p["strategy_config"]
        sc["random_asset_pool"] = [a for a in sc["random_asset_pool"] if a in have]
        lower(p)
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump(doc))
    load_config(path)
    return path


def mpctl(*argv: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(
        [PYTHON, "-m", "mpctl.cli", *argv],
        cwd=cwd,
        env={**os.environ, "CI": "true", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"mpctl {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def init_bus(stack: ComposeStack) -> None:
    """`mpctl compose init-bus`: the bus secrets (as root, it gives each file to its container's user)."""
    out = mpctl("compose", "init-bus", "--config", "config/profiles.yaml", "--dir", "secrets", cwd=stack.dir)
    assert "file(s) written" in out
    for who in (*compose_principals(load_config(stack.dir / "config" / "profiles.yaml")), "admin"):
        assert stack.bus.password(who).get_secret_value() not in out


def write_secrets(stack: ComposeStack, tmp_path: Path, profiles: list[str]) -> dict[str, str]:
    """The first-run steps of deploy/README.md: each profile's credentials into the encrypted store, then
    `mpctl compose init-secrets` (its export per profile), owned by the containers' user, and
    `mpctl compose init-bus`. Returns the secrets."""
    store = tmp_path / "store" / "credentials.enc"
    env = {"MPCTL_CREDENTIALS_STORE": str(store), "MPCTL_SECRETS_PASSPHRASE": "compose test passphrase 7f3a"}
    secrets = {pid: f"compose-secret-{pid}-51be0c" for pid in profiles}
    for pid, secret in secrets.items():
        proc = subprocess.run(
            [PYTHON, "-m", "mpctl.cli", "secrets", "set", pid, "--exchange", "coinbase", "--force"],
            cwd=ROOT,
            env={**os.environ, **env},
            input=json.dumps({"api_key": f"key-{pid}", "secret": secret}),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
    mpctl(
        "compose",
        "init-secrets",
        "--config",
        "config/profiles.yaml",
        "--dir",
        "secrets",
        "--store",
        str(store),
        cwd=stack.dir,
        env=env,
    )
    if os.geteuid() == 0:  # as a user does with sudo (deploy/README.md, File ownership)
        for f in (stack.dir / "secrets").iterdir():
            if f.suffix in (".enc", ".key"):
                os.chown(f, APP_UID, APP_UID)
    init_bus(stack)
    return secrets


def bus_passwords(stack: ComposeStack) -> dict[str, str]:
    """Every password of the stack's bus: the services', the admin's and the controller's."""
    cfg = load_config(stack.dir / "config" / "profiles.yaml")
    names = [*compose_principals(cfg), "admin", CONTROLLER]
    return {w: stack.bus.password(w).get_secret_value() for w in names}


def run_files(stack: ComposeStack, cfg_path: Path, out: Path) -> dict[str, Any]:
    """The run's files from the stack's topics, as `mpctl demo` writes them."""
    cfg = load_config(cfg_path)
    return asyncio.run(collect(cfg, stack.kafka, out))


def candles(stack: ComposeStack, namespace: str) -> list[CandleClosed]:
    msgs, _ = asyncio.run(read_topics(stack.kafka, [Topics(namespace).candles]))
    return [m for m in msgs if isinstance(m, CandleClosed)]


def until(cond: Any, timeout: float, what: str, stack: ComposeStack) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{stack.logs()}")


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def app_services(doc: dict[str, Any], *, without: set[str]) -> list[str]:
    return [s for s in doc["services"] if s not in without]


@pytest.mark.timeout(1200)
def test_live_stack_trades_on_the_peer_is_seen_from_the_host_and_resumes_after_down_and_up(
    stack: ComposeStack, tmp_path: Path
) -> None:
    peer_url = f"http://md-peer:{PEER_PORT}"
    cfg_path = profiles_file(
        tmp_path,
        {
            "source": "coinbase",
            "interval": "1m",
            "rest_url": peer_url,
            "ws_url": f"ws://md-peer:{PEER_PORT}/ws",
            "history_steps": 250,
            "max_requests_per_s": 40.0,
        },
    )
    products = ",".join(f"{a}-USDC" for a in sorted(data_assets()))
    peer_args = [
        "--speed",
        "60",
        "--start",
        PEER_START,
        "--granularity",
        "60",
        "--products",
        products,
        "--data",
        "/app/data/market",
    ]
    doc = stack.render(cfg_path, peer_args)
    cfg = load_config(stack.dir / "config" / "profiles.yaml")
    profiles = sorted(cfg.enabled_profiles())
    assert len(profiles) >= 2
    secrets = write_secrets(stack, tmp_path, profiles)
    # Grafana is the one public image with no Debian package to stand in for it: not started here.
    services = [*app_services(doc, without={"grafana", "ingest-replay"}), "md-peer"]

    t0 = time.monotonic()
    stack.compose("up", "-d", *services)
    healthy_s = stack.wait_healthy(services, {"topics"}, timeout=300)
    print(f"\nup to every service healthy: {time.monotonic() - t0:.1f} s")

    # The forward test: plans, orders and paper fills on the peer's live candles.
    out = tmp_path / "run"
    seen: dict[str, int] = {}

    def traded() -> bool:
        run_files(stack, cfg_path, out)
        seen.update({n: len(jsonl(out / n)) for n in ("plans.jsonl", "orders.jsonl", "fills.jsonl")})
        return all(seen.values())

    until(traded, 300, "plans, orders and fills", stack)
    print(f"forward test: {seen} at {time.monotonic() - t0:.0f} s")

    # The host sees every service: heartbeats and consumer groups over the published Kafka port.
    host = ["--bootstrap", stack.bootstrap, "--config", str(stack.dir / "config" / "profiles.yaml"), "--json"]
    as_operator = {"MPCTL_BUS_DIR": str(stack.bus.folder)}  # the operator principal (deploy/README.md)
    status = json.loads(mpctl("status", *host, cwd=ROOT, env=as_operator))
    states = {s["name"]: s["state"] for s in status["services"]}
    expected = {
        "ingest",
        "registry",
        "arbiter",
        "monitor",
        *(f"{k}.{p}" for p in profiles for k in ("strategy", "execution")),
    }
    assert set(states) == expected and set(states.values()) == {"up"}, json.dumps(
        status["services"], indent=1
    )
    lag = json.loads(mpctl("lag", *host, cwd=ROOT, env=as_operator))
    groups = {g["group"]: g for g in lag["groups"]}
    for p in profiles:
        for kind in ("strategy", "execution"):
            g = Topics(cfg.system.kafka.namespace).group(kind, p)
            assert g in groups and groups[g]["members"] >= 1, (g, sorted(groups))

    # Prometheus scrapes every /metrics of the rendered scrape config.
    prom = f"http://127.0.0.1:{stack.prometheus_port}/api/v1/targets"
    jobs: dict[str, str] = {}

    def scraped() -> bool:
        with urllib.request.urlopen(prom, timeout=5) as r:
            body = json.loads(r.read())
        jobs.clear()
        for t in body["data"]["activeTargets"]:
            jobs[t["labels"]["instance"]] = t["health"]
        return bool(jobs) and set(jobs.values()) == {"up"}

    until(scraped, 120, "every Prometheus target up", stack)
    want_targets = {
        f"{s}:9100" for s in services if s not in ("topics", "kafka", "redis", "prometheus", "md-peer")
    }
    assert want_targets <= set(jobs), (sorted(want_targets - set(jobs)), jobs)

    # Each execution container holds its own profile's credential files and nothing of another's; no other
    # container holds any. The container's user can read them (the live worker would). Each service holds its own
    # principal's bus password and the CA, nothing of another principal's.
    ns = cfg.system.kafka.namespace
    creds = {"/run/secrets/credentials.enc", "/run/secrets/mpctl_secrets_key"}
    for svc in services:
        mounts = {
            (Path(m["Source"]).name, m["Destination"])
            for m in stack.inspect(svc)["Mounts"]
            if m["Destination"].startswith("/run/secrets")
        }
        held = {m for m in mounts if m[1] in creds}
        if svc.startswith("execution-"):
            pid = svc.removeprefix("execution-")
            assert held == {
                (f"{pid}.enc", "/run/secrets/credentials.enc"),
                (f"{pid}.key", "/run/secrets/mpctl_secrets_key"),
            }, mounts
            got = stack.compose(
                "exec", "-T", svc, "sha256sum", "/run/secrets/credentials.enc"
            ).stdout.split()[0]
            assert got == hashlib.sha256((stack.dir / "secrets" / f"{pid}.enc").read_bytes()).hexdigest()
        else:
            assert held == set(), (svc, mounts)
        kind, _, pid = svc.partition("-")
        if kind in ("ingest", "registry", "arbiter", "monitor", "strategy", "execution"):
            who = f"{ns}.{kind}.{pid}" if pid else f"{ns}.{kind}"
            # The snapshot key: the services that keep state only (arbiter, monitor, strategy, execution).
            state = {("state.key", "/run/secrets/state.key")} if kind in STATEFUL_SERVICES else set()
            assert mounts - held == {
                (f"{who}.password", "/run/secrets/bus_password"),
                ("bus-ca.crt", "/run/secrets/bus_ca.crt"),
                *state,
            }, (svc, mounts)
        elif svc in ("prometheus", "md-peer"):
            assert mounts == set(), (svc, mounts)
    # No credential nor bus password in any container's log, nor in the topics the host reads.
    logs = stack.compose("logs", "--no-color", *services).stdout
    topics_text = "\n".join((out / n).read_text() for n in FILES)
    for pid, secret in secrets.items():
        assert secret not in logs and secret not in topics_text, f"{pid}'s secret leaked"
    for who, password in bus_passwords(stack).items():
        assert password not in logs and password not in topics_text, f"{who}'s bus password leaked"
    state_key = (stack.dir / "secrets" / "app" / "state.key").read_text().strip()
    assert state_key not in logs and state_key not in topics_text, "the snapshot key leaked"
    # Every stateful service found its snapshot key (none runs without snapshots).
    assert "snapshots disabled" not in logs, [ln for ln in logs.splitlines() if "snapshots disabled" in ln]

    # `docker compose down` keeps the volumes; `up` resumes: the ingest goes on from the last step it published.
    before = candles(stack, cfg.system.kafka.namespace)
    last = max(c.open_time for c in before)
    stack.compose("down", "-t", "20")
    assert stack.ps() == {}
    t1 = time.monotonic()
    stack.compose("up", "-d", *services)
    stack.wait_healthy(services, {"topics"}, timeout=300)
    print(f"down, then up to healthy again: {time.monotonic() - t1:.1f} s (first start: {healthy_s:.1f} s)")
    until(
        lambda: max(c.open_time for c in candles(stack, cfg.system.kafka.namespace)) > last,
        180,
        "candles after the restart",
        stack,
    )
    after = candles(stack, cfg.system.kafka.namespace)
    twice = [k for k, n in Counter((c.product, c.open_time) for c in after).items() if n > 1]
    assert twice == [], twice[:5]
    assert len(after) > len(before)
    status = json.loads(mpctl("status", *host, cwd=ROOT, env=as_operator))
    assert {s["name"]: s["state"] for s in status["services"]} == dict.fromkeys(expected, "up")


def trimmed_data(folder: Path, hours: int) -> Path:
    """The first `hours` candles of every bundled file (a short replay), in the same format."""
    folder.mkdir(parents=True)
    for f in sorted(DATA.glob("*_1h.csv.gz")):
        lines = gzip.decompress(f.read_bytes()).decode().splitlines(keepends=True)
        head = lines[0] if not lines[0][0].isdigit() else ""
        rows = [ln for ln in lines if ln[:1].isdigit()][:hours]
        (folder / f.name).write_bytes(gzip.compress((head + "".join(rows)).encode(), mtime=0))
    return folder


@pytest.mark.timeout(1200)
def test_replay_stack_with_a_strategy_and_an_execution_container_killed_books_as_the_backtest(
    stack: ComposeStack, tmp_path: Path
) -> None:
    cfg_path = profiles_file(tmp_path, {"source": "replay"})
    stack.dir.mkdir(parents=True)
    data = trimmed_data(stack.dir / "data" / "market", REPLAY_HOURS)
    doc = stack.render(cfg_path, [])
    cfg = load_config(stack.dir / "config" / "profiles.yaml")
    profiles = sorted(cfg.enabled_profiles())
    write_secrets(stack, tmp_path, profiles)
    services = app_services(doc, without={"grafana", "ingest"})
    topics = Topics(cfg.system.kafka.namespace)

    stack.compose("--profile", "replay", "up", "-d", *services)

    def fills() -> int:
        msgs, _ = asyncio.run(read_topics(stack.kafka, [topics.events]))
        return sum(1 for m in msgs if type(m).__name__ == "OrderFilled")

    def finished() -> set[str]:
        msgs, _ = asyncio.run(read_topics(stack.kafka, [topics.status]))
        return {f"{m.service}:{m.instance}" for m in msgs if isinstance(m, WorkerFinished)}

    until(lambda: fills() > 0, 300, "the first fill", stack)
    victims = (f"strategy-{profiles[0]}", f"execution-{profiles[1]}")
    stack.kill(*victims)
    done_at_kill = finished()
    print(f"\nkilled {victims} after {fills()} fill(s); finished by then: {sorted(done_at_kill)}")
    assert not expected_finishers(cfg) <= done_at_kill, (
        "the replay was over before the kill: nothing was tested"
    )
    assert {stack.ps()[v]["State"] for v in victims} == {"exited"}
    stack.compose("--profile", "replay", "up", "-d", *services)
    until(lambda: expected_finishers(cfg) <= finished(), 600, "the end of the replay", stack)

    out, bt = tmp_path / "compose-run", tmp_path / "backtest"
    # What reaches the topics after the strategies finished (the last orders' fills) settles first.
    previous: dict[str, bytes] = {}

    def settled() -> bool:
        run_files(stack, cfg_path, out)
        now = {n: (out / n).read_bytes() for n in FILES}
        same = now == previous
        previous.clear()
        previous.update(now)
        return same

    until(settled, 120, "the run's files to settle", stack)
    proc = subprocess.run(
        [PYTHON, "-m", "mpctl.backtest", "--config", str(cfg_path), "--data", str(data), "--out", str(bt)],
        cwd=ROOT,
        env={**os.environ, "CI": "true"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert jsonl(bt / "fills.jsonl"), "the backtest made no fill: the comparison would say little"
    for name in FILES:
        assert (out / name).read_bytes() == (bt / name).read_bytes(), f"{name} differs from the backtest's"


@pytest.mark.timeout(600)
def test_the_stacks_broker_and_redis_refuse_whoever_has_no_right_and_never_show_a_password(
    stack: ComposeStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_path = profiles_file(tmp_path, {"source": "replay"})
    stack.render(cfg_path, [])
    cfg = load_config(stack.dir / "config" / "profiles.yaml")
    init_bus(stack)
    servers = ["kafka", "redis", "topics"]
    stack.compose("up", "-d", *servers)
    stack.wait_healthy(servers, {"topics"}, timeout=300)
    ns = cfg.system.kafka.namespace
    t = Topics(ns)
    pid = sorted(cfg.enabled_profiles())[0]
    approvals = t.approved(pid)
    wrong = SecretStr(f"wrong-{os.urandom(8).hex()}")

    async def broker() -> None:
        before = await end_offset(stack.kafka, approvals)
        # No credentials (a plain client on the TLS port), a wrong password, an unknown user: not even connected.
        for acc in (
            KafkaAccess(servers=stack.bootstrap),
            stack.principal(principal(ns, "arbiter")).as_principal(principal(ns, "arbiter"), wrong),
            stack.kafka.as_principal(f"{ns}.nobody", wrong),
        ):
            p = AIOKafkaProducer(**acc.client_options(), request_timeout_ms=5_000)
            with pytest.raises(KafkaConnectionError):
                await asyncio.wait_for(p.start(), 30)
            await p.stop()
        # Authenticated, but not allowed: a strategy cannot hand its execution worker an order.
        with pytest.raises(TopicAuthorizationFailedError):
            await write(stack.principal(principal(ns, "strategy", pid)), approvals, b'{"forged": true}')
        # The control: the arbiter can, so the refusal above is the ACL.
        await write(stack.principal(principal(ns, "arbiter")), approvals, b"{}")
        assert await end_offset(stack.kafka, approvals) == before + 1

    asyncio.run(broker())

    def client(**kw: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=stack.redis_port, socket_timeout=10, **kw)

    with pytest.raises(redis.AuthenticationError):
        client().set("x", "1")  # the default user is off
    with pytest.raises(redis.AuthenticationError):
        client(username=principal(ns, "registry"), password=wrong.get_secret_value()).ping()
    who = principal(ns, "registry")
    registry = client(username=who, password=stack.bus.password(who).get_secret_value())
    assert registry.set(f"{registry_key_prefix(ns)}probe", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        registry.get("elsewhere")  # its own prefix only
    ingest = principal(ns, "ingest")
    with pytest.raises(redis.AuthenticationError):  # no Redis user at all
        client(username=ingest, password=stack.bus.password(ingest).get_secret_value()).ping()

    # A rotation as deploy/README.md says it: the old password is refused once the topics job has run again.
    strategy = principal(ns, "strategy", pid)
    old = stack.principal(strategy)
    out = mpctl(
        "compose", "rotate", strategy, "--config", "config/profiles.yaml", "--dir", "secrets", cwd=stack.dir
    )
    assert "generation 1" in out
    new = stack.principal(strategy)
    assert new.password != old.password
    assert (stack.dir / "secrets" / "app" / f"{strategy}.password").stat().st_uid == APP_UID
    stack.compose("up", "-d", "topics")
    stack.wait_healthy(servers, {"topics"}, timeout=120)

    async def rotated() -> None:
        await write(new, t.intents, b"{}")  # the new password: in, with the strategy's own rights
        p = AIOKafkaProducer(**old.client_options(), request_timeout_ms=5_000)
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(p.start(), 30)
        await p.stop()

    asyncio.run(rotated())

    # Nothing of it shows a password: the servers' and the topics job's logs, and this test's output.
    logs = stack.compose("logs", "--no-color", *servers).stdout
    shown = capsys.readouterr()
    for name, password in bus_passwords(stack).items():
        for text in (logs, shown.out, shown.err, out):
            assert password not in text, f"{name}'s bus password leaked"
    assert old.password is not None
    assert old.password.get_secret_value() not in logs + shown.out + shown.err + out
    assert wrong.get_secret_value() not in logs
