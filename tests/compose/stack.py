"""A compose project of the test: the rendered docker-compose.yml of a profiles file in a folder of its own, the
test's override file (stand-in images for the public ones, free host ports, the market-data peer), and the
`docker compose` calls the test makes, with Compose v2 itself (tests/compose/images.py compose_binary)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from mpctl.bus import BusSecrets
from mpctl.compose import REPLAY_PROFILE, ComposeBus
from shared.bus import KafkaAccess
from shared.principals import ADMIN
from tests.compose.images import ImageError, Images, compose_binary
from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[2]
PEER_PORT = 8080


def override_text(
    images: Images, kafka_port: int, redis_port: int, prometheus_port: int, peer_args: list[str]
) -> str:
    """The test's own override: only what stands in for the public images, the host ports (`!override`: the
    rendered ones are the user's defaults, and may be taken on a test machine), and the market-data peer the
    live ingest reads. The project's services, secrets, volumes, health checks and network stay the rendered
    file's."""
    peer_cmd = json.dumps(
        ["tests.peer.coinbase_md_peer", "--host", "0.0.0.0", "--port", str(PEER_PORT), *peer_args]
    )
    return f"""\
services:
  kafka:
    image: {images.kafka}
    environment:
      KAFKA_ADVERTISED_LISTENERS: BUS://kafka:9092,HOST://127.0.0.1:{kafka_port}
    ports: !override
      - 127.0.0.1:{kafka_port}:19092
  redis:
    image: {images.redis}
    ports: !override
      - 127.0.0.1:{redis_port}:6379
  prometheus:
    image: {images.prometheus}
    ports: !override
      - 127.0.0.1:{prometheus_port}:9090
  md-peer:
    image: {images.project}
    command: {peer_cmd}
    volumes:
      - {ROOT / "tests"}:/app/tests:ro
      - {ROOT / "data" / "market"}:/app/data/market:ro
    healthcheck:
      test: ["CMD", "python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{PEER_PORT}/api/v3/brokerage/time', timeout=3).read()"]
      interval: 1s
      timeout: 5s
      retries: 30
  ingest:
    depends_on:
      md-peer:
        condition: service_healthy
"""


class ComposeStack:
    """One compose project in `folder`: `render` the profiles file, then `up`, `ps`, `kill`, `down`."""

    def __init__(self, folder: Path, images: Images) -> None:
        self.dir = folder
        self.images = images
        self.project = f"mpctl-ctest-{uuid.uuid4().hex[:8]}"
        self.kafka_port, self.redis_port, self.prometheus_port = free_ports(3)
        self.binary = compose_binary()
        self.log: list[str] = []  # every compose call and how long it took

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def bus(self) -> BusSecrets:
        """The stack's bus secrets (`mpctl compose init-bus` in the project folder): every principal's password."""
        return ComposeBus(self.dir / "secrets").state

    @property
    def kafka(self) -> KafkaAccess:
        """The stack's broker from the host, as its admin (SCRAM over TLS, the stack's CA)."""
        return self.principal(ADMIN)

    def principal(self, who: str) -> KafkaAccess:
        """The stack's broker from the host as principal `who`."""
        return self.bus.access(self.bootstrap, who)

    def render(self, config: Path, peer_args: list[str]) -> dict[str, Any]:
        """The user's way: `mpctl compose render` of the profiles file into the project folder (the compose file
        and deploy/prometheus.yml beside it), plus what the compose file mounts from the repository."""
        (self.dir / "config").mkdir(parents=True, exist_ok=True)
        shutil.copy(config, self.dir / "config" / "profiles.yaml")
        deploy = self.dir / "deploy"
        deploy.mkdir(exist_ok=True)
        shutil.copy(ROOT / "deploy" / "prometheus-rules.yml", deploy / "prometheus-rules.yml")
        if not (deploy / "grafana").exists():
            shutil.copytree(ROOT / "deploy" / "grafana", deploy / "grafana")
        if not (deploy / "compose").exists():  # the servers' start scripts
            shutil.copytree(ROOT / "deploy" / "compose", deploy / "compose")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mpctl.cli",
                "compose",
                "render",
                "--config",
                "config/profiles.yaml",
                "--out",
                "docker-compose.yml",
            ],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise ImageError(f"mpctl compose render failed:\n{proc.stdout}\n{proc.stderr}")
        (self.dir / "compose.test.yml").write_text(
            override_text(self.images, self.kafka_port, self.redis_port, self.prometheus_port, peer_args)
        )
        doc: dict[str, Any] = yaml.safe_load((self.dir / "docker-compose.yml").read_text())
        return doc

    def compose(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            str(self.binary),
            "-p",
            self.project,
            "-f",
            "docker-compose.yml",
            "-f",
            "compose.test.yml",
            *args,
        ]
        t = time.monotonic()
        proc = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout, check=False)
        self.log.append(f"{' '.join(args)}: {time.monotonic() - t:.1f} s (exit {proc.returncode})")
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def ps(self) -> dict[str, dict[str, Any]]:
        """Service -> its container's state (State, Health, ExitCode), stopped ones included."""
        out = self.compose("ps", "-a", "--format", "json").stdout
        rows: list[dict[str, Any]] = []
        text = out.strip()
        if text.startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return {r["Service"]: r for r in rows}

    def health_checked(self) -> set[str]:
        """The services with a health check, in the rendered file or the override."""
        names: set[str] = set()
        for f in ("docker-compose.yml", "compose.test.yml"):
            text = (self.dir / f).read_text().replace("!override", "")
            names |= {s for s, d in yaml.safe_load(text)["services"].items() if d and "healthcheck" in d}
        return names

    def wait_healthy(self, services: list[str], one_shots: set[str], timeout: float) -> float:
        """Until every service with a health check is healthy (a restarting one is not), the others running, and
        one-shots exited 0."""
        checked = self.health_checked()
        t0 = time.monotonic()
        state: dict[str, dict[str, Any]] = {}
        while time.monotonic() - t0 < timeout:
            state = self.ps()
            bad = [
                s
                for s in services
                if s in state
                and s in one_shots
                and state[s]["State"] == "exited"
                and state[s].get("ExitCode")
            ]
            if bad:
                raise AssertionError(f"{bad} exited with an error:\n{self.logs(*bad)}")
            ready = all(
                s in state
                and (
                    (state[s]["State"] == "exited" and state[s].get("ExitCode") == 0)
                    if s in one_shots
                    else state[s]["State"] == "running"
                    and state[s].get("Health", "") == ("healthy" if s in checked else "")
                )
                for s in services
            )
            if ready:
                return time.monotonic() - t0
            time.sleep(2)
        summary = {s: (state.get(s, {}).get("State"), state.get(s, {}).get("Health")) for s in services}
        raise AssertionError(
            f"not every service became healthy within {timeout:.0f} s: {summary}\n{self.logs()}"
        )

    def logs(self, *services: str, tail: int = 40) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), *services, check=False).stdout[-12000:]

    def container(self, service: str) -> str:
        return self.compose("ps", "-a", "-q", service).stdout.strip()

    def inspect(self, service: str) -> dict[str, Any]:
        out = subprocess.run(
            ["docker", "inspect", self.container(service)], capture_output=True, text=True, check=True
        ).stdout
        doc: dict[str, Any] = json.loads(out)[0]
        return doc

    def kill(self, *services: str) -> None:
        for s in services:
            subprocess.run(["docker", "kill", self.container(s)], capture_output=True, check=True)

    def destroy(self) -> None:
        """Down with the volumes: nothing of the project is left on the engine. With the replay's compose profile:
        `down` leaves the containers of a profile it is not given (the replay test's ingest-replay)."""
        self.compose(
            "--profile", REPLAY_PROFILE, "down", "-v", "--remove-orphans", "-t", "5", check=False, timeout=300
        )
