"""The Docker Compose stack, generated from the profiles file, and the one-shot topic creation it runs.

    python -m mpctl.compose render [--config FILE] [--out docker-compose.yml]   (also `mpctl compose render`)
    python -m mpctl.compose topics --config FILE --bootstrap HOST:PORT           (the stack's `topics` service)
    python -m mpctl.compose init-secrets [--config FILE] [--dir secrets] [--store S]  (per-profile exports)
    python -m mpctl.compose init-bus [--config FILE] [--dir secrets] [--force]   (the bus's secrets, ComposeBus)
    python -m mpctl.compose rotate PRINCIPAL [--config FILE] [--dir secrets]     (a principal's new password)

`render_compose` is pure and deterministic: the committed `docker-compose.yml` is its output for
`config/coinbase_profiles.yaml`, and a unit test keeps the two equal. Credentials never enter the compose file:
each enabled profile gets two compose secrets, its export of the encrypted store (`./secrets/<profile>.enc`, that
profile's entry only) and the export's key (`./secrets/<profile>.key`), mounted into its execution service only.

The bus is authenticated as everywhere else (docs/operations.md, "The bus"): the broker's client listeners take
SASL/SCRAM-SHA-512 over TLS only, its authorizer denies what no ACL allows, and Redis has no `default` user. Each
service runs as its own principal, with only its own password mounted (`./secrets/app/<principal>.password`) and
the CA; `mpctl compose init-bus` writes these from one BusSecrets folder (`./secrets/bus`, mpctl/bus.py), and the
`topics` job gives the broker and Redis every principal and ACL (`apply_bus`) as the admin.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from mpctl.bus import CONTROLLER, BusError, BusSecrets, redis_acl_file, write_private
from services.execution.bootstrap import LIVE_ENV
from services.execution.credentials import ENV_STORE, MOUNTED_KEY_FILE
from shared.bus import ENV_CA_FILE, ENV_PASSWORD_FILE, ENV_USER, SASL_MECHANISM
from shared.config import DEFAULT_CONFIG, PLACEHOLDER_PREFIX, AppConfig, ConfigError, load_config
from shared.principals import ADMIN, PROFILE_SERVICES, STATEFUL_SERVICES, principal, redis_users
from shared.runtime import ENV_REDIS_AUTH
from shared.snapshots import KEY_FILE_ENV as STATE_KEY_FILE_ENV

# ---------------------------------------------------------------------------------------------- constants
PROJECT_NAME = "multiprofile-coinbase"
APP_IMAGE = "multiprofile-coinbase:local"
KAFKA_IMAGE = "apache/kafka:4.1.1"
REDIS_IMAGE = "redis:7.0"
PROMETHEUS_IMAGE = "prom/prometheus:v3.5.0"
GRAFANA_IMAGE = "grafana/grafana:12.2.0"

# KRaft needs a cluster id; any fixed base64 UUID does for a single-node stack (a new volume formats with it).
KAFKA_CLUSTER_ID = "mpCoinbaseKRaft01AAAAA"
KAFKA_BOOTSTRAP = "kafka:9092"
REDIS_URL = "redis://redis:6379/0"
# Host ports match `mpctl infra up` (Kafka 127.0.0.1:19092, Redis 127.0.0.1:16379), so host-side tools read the
# compose stack with their defaults. Both stacks cannot run at once on one machine.
KAFKA_HOST_PORT = 19092
METRICS_PORT = 9100  # every app service serves /metrics here; deploy/prometheus.yml scrapes it
STRATEGY_METRICS_PORT = METRICS_PORT
REDIS_HOST_PORT = 16379

CONTAINER_CONFIG = "/app/config/profiles.yaml"
CONTAINER_DATA = "/app/data/market"
REPLAY_PROFILE = (
    "replay"  # `docker compose --profile replay`: the recorded candles instead of the live market
)
SECRETS_DIR = "secrets"
# Where the execution worker finds its profile's export: the worker reads the store named by MPCTL_CREDENTIALS_STORE
# and, with no MPCTL_SECRETS_KEY_FILE, the key mounted at /run/secrets/mpctl_secrets_key (credentials.py).
CONTAINER_STORE = "/run/secrets/credentials.enc"
CONTAINER_KEY = str(MOUNTED_KEY_FILE)

# The bus (issue #15). Container users: the secrets a container reads must be owned by its user (compose mounts a
# file secret with the host file's owner and mode), so `init-bus` keeps each container's files in a folder of
# their own: secrets/app (the project's image, uid 10001), secrets/kafka (apache/kafka's `appuser`, uid 1000),
# secrets/redis (read by the Redis image's start, which runs as root before it drops to its user).
APP_UID = 10001
KAFKA_UID = 1000
CONTAINER_BUS_CA = "/run/secrets/bus_ca.crt"
CONTAINER_BUS_PASSWORD = "/run/secrets/bus_password"
# The namespace's snapshot key (shared/snapshots.py), mounted into the services that keep state only.
CONTAINER_STATE_KEY = "/run/secrets/state.key"
STATE_KEY_SECRET = "state_key"
# The topics job's master key and generations, laid out as a BusSecrets folder (mpctl/bus.py) that derives
# every principal's password.
CONTAINER_BUS_DIR = "/run/secrets/bus"
KAFKA_BROKER_PEM = "/run/secrets/kafka_broker.pem"
KAFKA_JAAS = "/run/secrets/kafka_jaas.conf"
KAFKA_ADMIN_PASSWORD = "/run/secrets/kafka_admin_password"
KAFKA_CLIENT_PROPERTIES = "/run/secrets/kafka_client.properties"
REDIS_USERS_ACL = "/run/secrets/redis_users.acl"
REDIS_ADMIN_PASSWORD = "/run/secrets/redis_admin_password"
# The start scripts of the two servers (deploy/compose/): format Kafka's storage with the admin's SCRAM verifier;
# give Redis its ACL file. Mounted read-only, run with `sh` (no executable bit needed).
KAFKA_INIT = "./deploy/compose/kafka-init.sh"
REDIS_INIT = "./deploy/compose/redis-init.sh"
CONTAINER_INIT = "/mpctl/init.sh"

HEADER = """\
# Generated by `mpctl compose render --config {config}` from the profiles file: do not edit by hand,
# change the config (or mpctl/compose.py) and render again. tests/unit/test_compose.py fails when this file and
# the rendering differ. How to run it: deploy/README.md.
#
# Paths are relative to this file, which sits at the repository root. Credentials are not in this file: each
# enabled profile's are the compose secrets `coinbase_<profile>` (./secrets/<profile>.enc, the profile's entry of
# the encrypted store) and `coinbase_<profile>_key` (./secrets/<profile>.key, its key), written by
# `mpctl compose init-secrets` or `mpctl secrets export`, not committed, mounted only into that profile's
# execution service. The bus's secrets (every client listener is SASL/SCRAM-SHA-512 over TLS, Redis has no
# default user) are files under ./secrets too, written by `mpctl compose init-bus`: each service mounts only its
# own principal's password and the CA.
"""

SERVICE_COMMENTS: dict[str, str] = {
    "kafka": "Apache Kafka in KRaft combined mode (broker + controller), one node. Containers use kafka:9092;\n"
    f"the host reaches it on 127.0.0.1:{KAFKA_HOST_PORT} (the same address as `mpctl infra up`). Both take\n"
    "SASL/SCRAM-SHA-512 over TLS only; the controller listener is on the container's loopback (PLAIN). The\n"
    "storage is formatted once with the admin's SCRAM verifier (deploy/compose/kafka-init.sh), then the image\n"
    "starts as usual. The standard authorizer denies what no ACL allows; admin and controller are super users.",
    "redis": "Redis holds the registry's claims (hashes, fingerprints, random assets); append-only file on a volume.\n"
    "No default user: its ACL file (on the volume, deploy/compose/redis-init.sh) has the admin, and the users the\n"
    "topics job gives it.",
    "topics": "One shot, as the admin: creates every declared topic (shared/topics.py) with its partitions, gives the\n"
    "broker every principal (SCRAM) and ACL and Redis its users (shared/principals.py), before any worker starts.",
    "ingest": "The live market from Coinbase (system.market_data: REST candles, websocket liveness and time), with\n"
    "paper execution unless system.mode: live; after a restart it backfills the steps it missed.",
    "ingest-replay": "Opt-in (compose profile `replay`): replays the candles mounted at /app/data/market instead of\n"
    "the live market, then exits 0. Run it alone: `docker compose --profile replay up -d --scale ingest=0`.",
    "monitor": "Consumer lag, per-profile performance, service health, alerts; the audit trail to the audit-data volume.",
    "prometheus": "Scrape config deploy/prometheus.yml (rendered with this file): every service's /metrics on port "
    "9100.",
    "grafana": "Provisioned from deploy/grafana/provisioning: the Prometheus data source and the dashboard\n"
    "deploy/grafana/dashboard.json; http://127.0.0.1:3000 (admin/admin on first login).",
}


def _execution_comment(pid: str, live: bool = False) -> str:
    text = (
        f"The only service that receives {pid}'s credentials (live mode reads them, paper mode does not):\n"
        f"secret coinbase_{pid} = its export of the encrypted store, at {CONTAINER_STORE};\n"
        f"secret coinbase_{pid}_key = that export's key, at {CONTAINER_KEY}."
    )
    if live:
        text += (
            f"\nsystem.mode: live: it trades only when started with {LIVE_ENV}=1 in the shell "
            f"(`mpctl live check`, then `{LIVE_ENV}=1 docker compose up -d`)."
        )
    return text


class _Dumper(yaml.SafeDumper):
    """SafeDumper without anchors/aliases (each service gets its own copy of shared fragments)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# ---------------------------------------------------------------------------------------------- rendering
def _host_path(path: str) -> str:
    """A path as written in the compose file: absolute as given, relative ones explicit (`./...`)."""
    p = PurePosixPath(path.replace(os.sep, "/"))
    if p.is_absolute():
        return str(p)
    text = str(p)
    return text if text.startswith("../") else f"./{text}"


def _bind(source: str, target: str) -> dict[str, Any]:
    # Long syntax: a missing host file is an error instead of an empty directory created in its place.
    return {
        "type": "bind",
        "source": source,
        "target": target,
        "read_only": True,
        "bind": {"create_host_path": False},
    }


def _app_service(
    module: str,
    args: list[str],
    *,
    config_source: str,
    depends_on: dict[str, dict[str, str]],
    restart: str = "unless-stopped",
) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "image": APP_IMAGE,
        "build": {"context": ".", "dockerfile": "Dockerfile"},
        "command": [module, *args],
        "volumes": [_bind(config_source, CONTAINER_CONFIG)],
        "depends_on": depends_on,
        "restart": restart,
    }
    if "--metrics-port" in args:
        svc["healthcheck"] = dict(_METRICS_HEALTHCHECK)
    return svc


# Metrics on the container network for Prometheus (loopback is the default outside containers).
_METRICS_ARGS = ["--metrics-port", str(METRICS_PORT), "--metrics-addr", "0.0.0.0"]

# A service that serves /metrics is healthy when it answers there (stdlib only, from inside the container).
_METRICS_HEALTHCHECK = {
    "test": [
        "CMD",
        "python",
        "-c",
        f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=3).read()",
    ],
    "interval": "20s",
    "timeout": "5s",
    "retries": 3,
    "start_period": "60s",
}

# What Prometheus scrapes: job -> compose services (rendered into deploy/prometheus.yml).
SCRAPED_KINDS = ("ingest", "registry", "arbiter", "monitor", "strategy", "execution")


def _common_args(profile: str | None = None) -> list[str]:
    args = ["--config", CONTAINER_CONFIG, "--bootstrap", KAFKA_BOOTSTRAP, "--redis-url", REDIS_URL]
    if profile is not None:
        args += ["--profile", profile]
    return args


def _needs_topics(*, redis: bool = False) -> dict[str, dict[str, str]]:
    deps = {
        "kafka": {"condition": "service_healthy"},
        "topics": {"condition": "service_completed_successfully"},
    }
    if redis:
        deps["redis"] = {"condition": "service_healthy"}
    return deps


def secret_name(profile: str) -> str:
    return f"coinbase_{profile}"


def key_secret_name(profile: str) -> str:
    return f"coinbase_{profile}_key"


# ---------------------------------------------------------------------------------------------- the bus
BUS_CA_SECRET = "bus_ca"
ADMIN_SECRET = "bus_admin"


def _kafka_environment() -> dict[str, str]:
    """The broker's configuration (the image turns each KAFKA_* variable into a server property). No secret:
    the logins are in the JAAS file secret, named by KAFKA_OPTS."""
    return {
        "CLUSTER_ID": KAFKA_CLUSTER_ID,
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        # The controller listener is on the container's loopback: nothing outside the container reaches it.
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_LISTENERS": f"BUS://:9092,HOST://:{KAFKA_HOST_PORT},CONTROLLER://localhost:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"BUS://{KAFKA_BOOTSTRAP},HOST://127.0.0.1:{KAFKA_HOST_PORT}",
        # Listener names without "SSL"/"SASL_": the image's start script would otherwise ask for its JKS
        # variables (KAFKA_SSL_KEYSTORE_FILENAME, ...); the PEM key store below is what the broker uses.
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:SASL_PLAINTEXT,BUS:SASL_SSL,HOST:SASL_SSL",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "BUS",
        "KAFKA_SASL_ENABLED_MECHANISMS": SASL_MECHANISM,
        "KAFKA_SASL_MECHANISM_INTER_BROKER_PROTOCOL": SASL_MECHANISM,
        # KRaft controllers cannot check SCRAM (its verifiers live in the metadata they serve): PLAIN, with the
        # controller's one user in the JAAS file.
        "KAFKA_SASL_MECHANISM_CONTROLLER_PROTOCOL": "PLAIN",
        "KAFKA_LISTENER_NAME_CONTROLLER_SASL_ENABLED_MECHANISMS": "PLAIN",
        "KAFKA_SSL_KEYSTORE_TYPE": "PEM",
        "KAFKA_SSL_KEYSTORE_LOCATION": KAFKA_BROKER_PEM,
        "KAFKA_SSL_TRUSTSTORE_TYPE": "PEM",
        "KAFKA_SSL_TRUSTSTORE_LOCATION": CONTAINER_BUS_CA,
        "KAFKA_OPTS": f"-Djava.security.auth.login.config={KAFKA_JAAS}",
        # Nothing is allowed that no ACL allows (shared/principals.py); no service is a super user.
        "KAFKA_AUTHORIZER_CLASS_NAME": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "KAFKA_SUPER_USERS": f"User:{ADMIN};User:{CONTROLLER}",
        "KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND": "false",
        "KAFKA_LOG_DIRS": "/var/lib/kafka/data",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    }


def bus_secret_name(cfg: AppConfig, who: str) -> str:
    """The compose secret holding principal `who`'s password (`bus_<service>[_<profile>]`)."""
    if who == ADMIN:
        return ADMIN_SECRET
    short = who.removeprefix(f"{cfg.system.kafka.namespace}.")
    return "bus_" + short.replace(".", "_")


def compose_principals(cfg: AppConfig) -> list[str]:
    """The principals the compose stack's services run as: the system services, each enabled profile's workers."""
    ns = cfg.system.kafka.namespace
    out = [principal(ns, s) for s in ("ingest", "registry", "arbiter", "monitor")]
    out += [principal(ns, s, p) for p in cfg.enabled_profiles() for s in PROFILE_SERVICES]
    return out


def bus_secret_files(cfg: AppConfig) -> dict[str, dict[str, str]]:
    """The compose file's bus secrets: name -> its file under ./secrets (see `ComposeBus`)."""
    d = f"./{SECRETS_DIR}"
    files = {
        BUS_CA_SECRET: f"{d}/bus-ca.crt",
        "kafka_broker_pem": f"{d}/kafka/broker.pem",
        "kafka_jaas": f"{d}/kafka/jaas.conf",
        "kafka_admin_password": f"{d}/kafka/admin.password",
        "kafka_client": f"{d}/kafka/client.properties",
        "redis_users": f"{d}/redis/users.acl",
        "redis_admin_password": f"{d}/redis/admin.password",
        ADMIN_SECRET: f"{d}/app/{ADMIN}.password",
        "bus_master": f"{d}/app/bus-master.key",
        "bus_generations": f"{d}/app/bus-generations.json",
        STATE_KEY_SECRET: f"{d}/app/state.key",
    }
    files.update({bus_secret_name(cfg, w): f"{d}/app/{w}.password" for w in compose_principals(cfg)})
    return {name: {"file": path} for name, path in files.items()}


def _bus_environment(who: str, *, redis: bool) -> dict[str, str]:
    env = {ENV_USER: who, ENV_PASSWORD_FILE: CONTAINER_BUS_PASSWORD, ENV_CA_FILE: CONTAINER_BUS_CA}
    if redis:
        env[ENV_REDIS_AUTH] = "1"  # Redis as the same principal, with the same password
    return env


def _with_principal(
    svc: dict[str, Any], cfg: AppConfig, service: str, profile: str | None = None
) -> dict[str, Any]:
    """`svc` connecting as its principal: its password and the CA mounted, KAFKA_USERNAME & co. set, and Redis
    authenticated when the principal has a Redis user (the ingest has none: it does not use Redis)."""
    ns = cfg.system.kafka.namespace
    who = principal(ns, service, profile if service in PROFILE_SERVICES else None)
    has_redis = who in {u.name for u in redis_users(cfg, ns)}
    svc["environment"] = {**svc.get("environment", {}), **_bus_environment(who, redis=has_redis)}
    svc["secrets"] = [
        *svc.get("secrets", []),
        {"source": bus_secret_name(cfg, who), "target": CONTAINER_BUS_PASSWORD},
        {"source": BUS_CA_SECRET, "target": CONTAINER_BUS_CA},
    ]
    if service in STATEFUL_SERVICES:
        svc["environment"][STATE_KEY_FILE_ENV] = CONTAINER_STATE_KEY
        svc["secrets"].append({"source": STATE_KEY_SECRET, "target": CONTAINER_STATE_KEY})
    return svc


def compose_model(cfg: AppConfig, *, config_path: str = str(DEFAULT_CONFIG)) -> dict[str, Any]:
    """The compose file as a mapping (what `render_compose` dumps)."""
    config_source = _host_path(config_path)
    enabled = list(cfg.enabled_profiles())
    services: dict[str, Any] = {}

    services["kafka"] = {
        "image": KAFKA_IMAGE,
        "hostname": "kafka",
        # The image's own start (/etc/kafka/docker/run) after a first format that adds the admin's SCRAM verifier
        # (the image's format cannot): deploy/compose/kafka-init.sh.
        "entrypoint": ["sh", CONTAINER_INIT],
        "environment": _kafka_environment(),
        "ports": [f"127.0.0.1:{KAFKA_HOST_PORT}:{KAFKA_HOST_PORT}"],
        "volumes": ["kafka-data:/var/lib/kafka/data", _bind(KAFKA_INIT, CONTAINER_INIT)],
        "secrets": [
            {"source": BUS_CA_SECRET, "target": CONTAINER_BUS_CA},
            {"source": "kafka_broker_pem", "target": KAFKA_BROKER_PEM},
            {"source": "kafka_jaas", "target": KAFKA_JAAS},
            {"source": "kafka_admin_password", "target": KAFKA_ADMIN_PASSWORD},
            {"source": "kafka_client", "target": KAFKA_CLIENT_PROPERTIES},
        ],
        "healthcheck": {
            "test": [
                "CMD",
                "/opt/kafka/bin/kafka-broker-api-versions.sh",
                "--bootstrap-server",
                "localhost:9092",
                # As the admin, over SASL_SSL: there is no other way in.
                "--command-config",
                KAFKA_CLIENT_PROPERTIES,
            ],
            "interval": "10s",
            "timeout": "20s",
            "retries": 12,
            "start_period": "20s",
        },
        "restart": "unless-stopped",
    }
    services["redis"] = {
        "image": REDIS_IMAGE,
        # The image's own entrypoint after writing the ACL file (deploy/compose/redis-init.sh).
        "entrypoint": ["sh", CONTAINER_INIT],
        "command": ["redis-server", "--appendonly", "yes", "--aclfile", "/data/users.acl"],
        "ports": [f"127.0.0.1:{REDIS_HOST_PORT}:6379"],
        "volumes": ["redis-data:/data", _bind(REDIS_INIT, CONTAINER_INIT)],
        "secrets": [
            {"source": "redis_users", "target": REDIS_USERS_ACL},
            {"source": "redis_admin_password", "target": REDIS_ADMIN_PASSWORD},
        ],
        "healthcheck": {
            # As the admin (no default user); the password from the secret file, never on a command line.
            "test": [
                "CMD-SHELL",
                f'REDISCLI_AUTH="$$(cat {REDIS_ADMIN_PASSWORD})" redis-cli --user {ADMIN} ping | grep -q PONG',
            ],
            "interval": "5s",
            "timeout": "3s",
            "retries": 12,
        },
        "restart": "unless-stopped",
    }
    topics = _app_service(
        "mpctl.compose",
        [
            "topics",
            "--config",
            CONTAINER_CONFIG,
            "--bootstrap",
            KAFKA_BOOTSTRAP,
            "--bus-dir",
            CONTAINER_BUS_DIR,
            "--redis-url",
            REDIS_URL,
        ],
        config_source=config_source,
        depends_on={
            "kafka": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        },
        restart="no",
    )
    topics["environment"] = _bus_environment(ADMIN, redis=False)
    topics["secrets"] = [
        {"source": ADMIN_SECRET, "target": CONTAINER_BUS_PASSWORD},
        {"source": BUS_CA_SECRET, "target": CONTAINER_BUS_CA},
        {"source": "bus_master", "target": f"{CONTAINER_BUS_DIR}/master.key"},
        {"source": "bus_generations", "target": f"{CONTAINER_BUS_DIR}/generations.json"},
    ]
    services["topics"] = topics
    services["registry"] = _app_service(
        "services.registry",
        [*_common_args(), *_METRICS_ARGS],
        config_source=config_source,
        depends_on=_needs_topics(redis=True),
    )
    services["arbiter"] = _app_service(
        "services.arbiter",
        [*_common_args(), *_METRICS_ARGS],
        config_source=config_source,
        depends_on=_needs_topics(),
    )
    monitor = _app_service(
        "services.monitor",
        [*_common_args(), *_METRICS_ARGS, "--audit-file", "/app/audit/audit.jsonl"],
        config_source=config_source,
        depends_on=_needs_topics(),
    )
    monitor["volumes"].append("audit-data:/app/audit")
    services["monitor"] = monitor
    for name in ("registry", "arbiter", "monitor"):
        _with_principal(services[name], cfg, name)
    for pid in enabled:
        services[f"strategy-{pid}"] = _with_principal(
            _app_service(
                "services.strategy",
                [*_common_args(pid), *_METRICS_ARGS],
                config_source=config_source,
                depends_on=_needs_topics(),
            ),
            cfg,
            "strategy",
            pid,
        )
        execution = _app_service(
            "services.execution",
            [*_common_args(pid), *_METRICS_ARGS],
            config_source=config_source,
            depends_on=_needs_topics(),
        )
        execution["environment"] = {ENV_STORE: CONTAINER_STORE}
        if cfg.system.mode == "live":
            # Going live is explicit: the worker refuses live mode unless the operator starts the stack with
            # `MPCTL_LIVE=1 docker compose up` (after `mpctl live check`); the file alone never trades.
            execution["environment"][LIVE_ENV] = f"${{{LIVE_ENV}:-0}}"
        execution["secrets"] = [
            {"source": secret_name(pid), "target": CONTAINER_STORE},
            {"source": key_secret_name(pid), "target": CONTAINER_KEY},
        ]
        services[f"execution-{pid}"] = _with_principal(execution, cfg, "execution", pid)

    workers = [
        "registry",
        "arbiter",
        *(f"{kind}-{pid}" for pid in enabled for kind in ("strategy", "execution")),
    ]
    ingest_deps: dict[str, dict[str, str]] = _needs_topics()
    ingest_deps.update({name: {"condition": "service_started"} for name in workers})
    services["ingest"] = _with_principal(
        _app_service(
            "services.ingest",
            [*_common_args(), "--source", "coinbase", *_METRICS_ARGS],
            config_source=config_source,
            depends_on=ingest_deps,
        ),
        cfg,
        "ingest",
    )
    replay = _app_service(
        "services.ingest",
        [*_common_args(), "--source", "replay", "--data", CONTAINER_DATA],
        config_source=config_source,
        depends_on=dict(ingest_deps),
        restart="on-failure",
    )
    replay["profiles"] = [REPLAY_PROFILE]
    replay["volumes"].append(_bind("./data/market", CONTAINER_DATA))
    services["ingest-replay"] = _with_principal(replay, cfg, "ingest")

    services["prometheus"] = {
        "image": PROMETHEUS_IMAGE,
        "command": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"],
        "ports": ["127.0.0.1:9090:9090"],
        "volumes": [
            _bind("./deploy/prometheus.yml", "/etc/prometheus/prometheus.yml"),
            _bind("./deploy/prometheus-rules.yml", "/etc/prometheus/rules.yml"),
            "prometheus-data:/prometheus",
        ],
        "restart": "unless-stopped",
    }
    services["grafana"] = {
        "image": GRAFANA_IMAGE,
        "ports": ["127.0.0.1:3000:3000"],
        "volumes": [
            "grafana-data:/var/lib/grafana",
            _bind("./deploy/grafana/provisioning", "/etc/grafana/provisioning"),
            _bind("./deploy/grafana/dashboard.json", "/var/lib/grafana-dashboards/multiprofile.json"),
        ],
        "depends_on": {"prometheus": {"condition": "service_started"}},
        "restart": "unless-stopped",
    }

    return {
        "name": PROJECT_NAME,
        "services": services,
        "secrets": {
            **{
                name: {"file": f"./{SECRETS_DIR}/{pid}.{ext}"}
                for pid in enabled
                for name, ext in ((secret_name(pid), "enc"), (key_secret_name(pid), "key"))
            },
            **bus_secret_files(cfg),
        },
        "volumes": {
            "kafka-data": {},
            "redis-data": {},
            "prometheus-data": {},
            "grafana-data": {},
            "audit-data": {},
        },
    }


def _add_comments(text: str, comments: dict[str, str]) -> str:
    """Insert `# ...` lines above the services named in `comments` (only inside the top-level `services:`)."""
    out: list[str] = []
    in_services = False
    for line in text.splitlines(keepends=True):
        if line and not line[0].isspace():
            in_services = line.rstrip() == "services:"
        elif (
            in_services
            and line.startswith("  ")
            and not line.startswith("   ")
            and line.rstrip().endswith(":")
        ):
            note = comments.get(line.strip()[:-1])
            if note:
                out.extend(f"  # {part}\n" for part in note.splitlines())
        out.append(line)
    return "".join(out)


def render_compose(cfg: AppConfig, *, config_path: str = str(DEFAULT_CONFIG)) -> str:
    """The compose file for `cfg`, with `config_path` (relative to the repository root) mounted read-only."""
    model = compose_model(cfg, config_path=config_path)
    body = yaml.dump(
        model, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=False
    )
    comments = dict(SERVICE_COMMENTS)
    live = cfg.system.mode == "live"
    comments.update({f"execution-{pid}": _execution_comment(pid, live) for pid in cfg.enabled_profiles()})
    return HEADER.format(config=PurePosixPath(config_path.replace(os.sep, "/"))) + _add_comments(
        body, comments
    )


PROMETHEUS_HEADER = """\
# Prometheus scrape configuration for the compose stack (mounted read-only by docker-compose.yml).
# Generated by `mpctl compose render` with docker-compose.yml: do not edit by hand. Every app service serves
# /metrics on port {port} inside its container (`--metrics-port {port} --metrics-addr 0.0.0.0`);
# tests/unit/test_compose.py checks both files agree. Alerting rules (a stale market feed): prometheus-rules.yml.
"""


def prometheus_model(cfg: AppConfig, *, config_path: str = str(DEFAULT_CONFIG)) -> dict[str, Any]:
    services = compose_model(cfg, config_path=config_path)["services"]
    jobs: list[dict[str, Any]] = [
        {"job_name": "prometheus", "static_configs": [{"targets": ["localhost:9090"]}]}
    ]
    for kind in SCRAPED_KINDS:
        # Services of an opt-in compose profile (the replay) are not scraped: they are not running by default.
        names = [
            n for n in services if (n == kind or n.startswith(f"{kind}-")) and "profiles" not in services[n]
        ]
        jobs.append(
            {"job_name": kind, "static_configs": [{"targets": [f"{n}:{METRICS_PORT}" for n in names]}]}
        )
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": ["/etc/prometheus/rules.yml"],
        "scrape_configs": jobs,
    }


def render_prometheus(cfg: AppConfig, *, config_path: str = str(DEFAULT_CONFIG)) -> str:
    body = yaml.dump(
        prometheus_model(cfg, config_path=config_path), Dumper=_Dumper, sort_keys=False, width=120
    )
    return PROMETHEUS_HEADER.format(port=METRICS_PORT) + body


def live_credentials_in(cfg: AppConfig) -> list[str]:
    """Enabled profiles with any non-placeholder credential value in the config (which reaches every container)."""
    found = []
    for pid, p in cfg.enabled_profiles().items():
        c = p.api_credentials
        values = [v.get_secret_value() for v in (c.api_key, c.secret, c.passphrase) if v is not None]
        if any(v and not v.startswith(PLACEHOLDER_PREFIX) for v in values):
            found.append(pid)
    return found


# ---------------------------------------------------------------------------------------------- commands
def cmd_render(args: argparse.Namespace) -> int:
    config_path = str(args.config)
    try:
        cfg = load_config(config_path)
    except ConfigError as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    for pid in live_credentials_in(cfg):
        print(
            f"warning: {config_path} holds credentials for {pid} and is mounted into every service; "
            f"keep placeholders there and put the credentials in the encrypted store (`mpctl secrets set {pid}`), "
            f"then export them to {SECRETS_DIR}/ (`mpctl compose init-secrets`)",
            file=sys.stderr,
        )
    text = render_compose(cfg, config_path=config_path)
    if str(args.out) == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    out.write_text(text, encoding="utf-8")
    # The scrape config lists the rendered services, so it is rendered with them (beside the compose file).
    prom = out.parent / "deploy" / "prometheus.yml"
    if prom.parent.is_dir():
        prom.write_text(render_prometheus(cfg, config_path=config_path), encoding="utf-8")
        print(f"wrote {prom}")
    print(f"wrote {out} ({len(cfg.enabled_profiles())} enabled profile(s))")
    return 0


def cmd_init_secrets(args: argparse.Namespace) -> int:
    """The compose secrets of every enabled profile: `<dir>/<profile>.enc` and `<dir>/<profile>.key`.

    A profile with an entry in the user's encrypted store gets its export (`mpctl secrets export`: that entry
    only, under a new key); one without gets an empty store and key, so that `docker compose up` works in paper
    mode while live mode refuses to start, naming the command to run. Existing files are never overwritten.
    """
    from mpctl.commands_secrets import unlock_for_export
    from services.execution.credentials import (
        CredentialsError,
        CredentialStore,
        default_store_path,
        export_empty,
        export_paths,
        export_profile,
    )

    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    folder = Path(args.dir)
    store_path = Path(args.store) if args.store else default_store_path()
    todo: list[str] = []
    halves = False
    for pid in cfg.enabled_profiles():
        enc, key = export_paths(pid, folder)
        if enc.exists() and key.exists():
            print(f"kept {enc} and {key}")
        elif enc.exists() or key.exists():
            halves = True
            print(
                f"error: only one of {enc} and {key} exists; not touched. Write both again with "
                f"`mpctl secrets export {pid} --out {folder} --force`",
                file=sys.stderr,
            )
        else:
            todo.append(pid)
    try:
        listed = CredentialStore.load(store_path).profiles() if todo and store_path.exists() else {}
        in_store = [p for p in todo if p in listed]
        # Unlocked (the passphrase asked for as `mpctl secrets set` asks) only when a profile is exported from it.
        store = unlock_for_export(store_path, in_store, folder, force=False) if in_store else None
        for pid in todo:
            if store is not None and pid in in_store:
                enc, key = export_profile(store, pid, folder)
                print(f"wrote {enc} and {key} (mode 0600): {pid}'s entry of {store_path}, under a new key")
            else:
                enc, key = export_empty(pid, folder)
                print(
                    f"wrote {enc} and {key}: an EMPTY store, {store_path} has no entry for {pid}. Enough for paper "
                    f"mode; for live mode run `mpctl secrets set {pid}`, then "
                    f"`mpctl secrets export {pid} --out {folder} --force`"
                )
    except CredentialsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write to {folder}: {err.strerror}", file=sys.stderr)
        return 2
    return 2 if halves else 0


@dataclass(frozen=True)
class ComposeBus:
    """The compose stack's bus secrets under `root` (./secrets), written by `mpctl compose init-bus`:

    - `bus/`: the BusSecrets folder (mpctl/bus.py): master key, CA, broker certificate, generations. Yours alone,
      never mounted: every password below is derived from it.
    - `bus-ca.crt`: the CA certificate every container trusts (public: mode 0644, any container user reads it).
    - `kafka/` (for the broker's user, uid 1000): `broker.pem` (its TLS key and certificate), `jaas.conf` (its
      own logins: admin for SCRAM, the controller's PLAIN user), `admin.password` (the first format's SCRAM
      verifier) and `client.properties` (its health check, as the admin).
    - `redis/` (read by the Redis image's root start): `users.acl` (`default` off, the admin by its SHA-256) and
      `admin.password` (its health check).
    - `app/` (for the project's image, uid 10001): `<principal>.password` of each service, `admin.password`,
      `bus-master.key` and `bus-generations.json` (the topics job derives and applies every principal).
    """

    root: Path

    @property
    def state(self) -> BusSecrets:
        return BusSecrets(self.root / "bus")

    @property
    def ca(self) -> Path:
        return self.root / "bus-ca.crt"

    @property
    def kafka_dir(self) -> Path:
        return self.root / "kafka"

    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def app_dir(self) -> Path:
        return self.root / "app"

    def password_file(self, who: str) -> Path:
        return self.app_dir / f"{who}.password"

    def _files(self, cfg: AppConfig) -> dict[Path, Callable[[], bytes]]:
        """Each derived file and how to make it (lazily: a kept file's secret is not even derived)."""
        bus = self.state

        def pw(who: str) -> bytes:
            return bus.password(who).get_secret_value().encode()

        files: dict[Path, Callable[[], bytes]] = {
            self.kafka_dir / "broker.pem": bus.broker_pem.read_bytes,
            self.kafka_dir / "jaas.conf": lambda: kafka_jaas(bus).encode(),
            self.kafka_dir / "admin.password": lambda: pw(ADMIN),
            self.kafka_dir / "client.properties": lambda: kafka_client_properties(bus).encode(),
            self.redis_dir / "users.acl": lambda: redis_acl_file(bus).encode(),
            self.redis_dir / "admin.password": lambda: pw(ADMIN),
            self.app_dir / f"{ADMIN}.password": lambda: pw(ADMIN),
            self.app_dir / "bus-master.key": bus.master_file.read_bytes,
            self.app_dir / "bus-generations.json": self._generations,
            # The stateful services' snapshot key, derived like the local stack's (mpctl/bus.py).
            self.app_dir / "state.key": lambda: bus.state_key_file(cfg.system.kafka.namespace).read_bytes(),
        }
        for who in compose_principals(cfg):
            files[self.password_file(who)] = functools.partial(pw, who)
        return files

    def _generations(self) -> bytes:
        f = self.state.generations_file
        return f.read_bytes() if f.is_file() else b"{}\n"

    def ensure(self, cfg: AppConfig, *, force: bool = False) -> tuple[list[Path], list[Path]]:
        """Create the state if missing, then every derived file that is missing (all of them with `force`).
        Returns (written, kept). A kept file is not read: it may belong to a container's user by now."""
        self.state.ensure(["kafka"])
        write_private(self.ca, self.state.ca_file.read_bytes())
        os.chmod(self.ca, 0o644)  # a certificate is public; every container's user must read it
        written, kept = [], []
        for path, make in self._files(cfg).items():
            if path.exists() and not force:
                kept.append(path)
                continue
            write_private(path, make())
            written.append(path)
        return written, kept

    def refresh(self, cfg: AppConfig, who: str) -> list[Path]:
        """After `who` rotated: its password file and the topics job's generations, written again."""
        files = self._files(cfg)
        out = [self.app_dir / "bus-generations.json"]
        if self.password_file(who) in files:
            out.append(self.password_file(who))
        for path in out:
            write_private(path, files[path]())
        return out

    def owners(self, paths: Sequence[Path]) -> dict[Path, int]:
        """The container user each file must belong to (the Redis files are read as root: no change)."""
        uid = {self.kafka_dir: KAFKA_UID, self.app_dir: APP_UID}
        return {p: uid[p.parent] for p in paths if p.parent in uid}


def kafka_jaas(bus: BusSecrets) -> str:
    """The broker's logins: SCRAM as the admin on its own listeners (the inter-broker one), and the controller's
    PLAIN user on the loopback controller listener (the controller checks it, the broker logs in with it)."""
    admin = bus.password(ADMIN).get_secret_value()
    ctl = bus.password(CONTROLLER).get_secret_value()
    return (
        "KafkaServer {\n"
        "  org.apache.kafka.common.security.scram.ScramLoginModule required\n"
        f'  username="{ADMIN}" password="{admin}";\n'
        "};\n"
        "controller.KafkaServer {\n"
        "  org.apache.kafka.common.security.plain.PlainLoginModule required\n"
        f'  username="{CONTROLLER}" password="{ctl}" user_{CONTROLLER}="{ctl}";\n'
        "};\n"
    )


def kafka_client_properties(bus: BusSecrets) -> str:
    """The broker's health check logs in as the admin, as any client must."""
    admin = bus.password(ADMIN).get_secret_value()
    return (
        "security.protocol=SASL_SSL\n"
        f"sasl.mechanism={SASL_MECHANISM}\n"
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{ADMIN}" password="{admin}";\n'
        "ssl.truststore.type=PEM\n"
        f"ssl.truststore.location={CONTAINER_BUS_CA}\n"
    )


def _chown_hint(bus: ComposeBus, written: Sequence[Path]) -> None:
    """As root, give each written file to its container's user; otherwise say the commands."""
    owners = bus.owners(written)
    if not owners:
        return
    if os.geteuid() == 0:
        for path, uid in owners.items():
            os.chown(path, uid, uid)
        print(
            f"gave {len(owners)} file(s) to the containers' users (uid {APP_UID}: app/, {KAFKA_UID}: kafka/)"
        )
        return
    for uid in sorted(set(owners.values())):
        names = " ".join(sorted(str(p) for p, u in owners.items() if u == uid))
        print(f"now give them to the containers' users: sudo chown {uid} {names}")


def cmd_init_bus(args: argparse.Namespace) -> int:
    """The compose stack's bus secrets (`ComposeBus`): the state on first use, then every missing file."""
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    bus = ComposeBus(Path(args.dir))
    try:
        written, kept = bus.ensure(cfg, force=args.force)
    except BusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(
            f"error: cannot write the bus secrets to {args.dir}: {err.strerror} ({err.filename})",
            file=sys.stderr,
        )
        return 2
    print(
        f"bus secrets in {bus.root}: {len(written)} file(s) written (mode 0600), {len(kept)} kept; "
        f"CA {bus.ca}; state {bus.state.folder} (never mounted)"
    )
    _chown_hint(bus, written)
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    """A new password for one service principal: its file and the generations written again; the topics job
    then gives the broker and Redis the new one, and a restart hands it to the service."""
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    known = compose_principals(cfg)
    if args.principal not in known:
        print(
            f"unknown principal {args.principal!r}; the compose stack runs {', '.join(known)}",
            file=sys.stderr,
        )
        return 2
    bus = ComposeBus(Path(args.dir))
    if not bus.state.exists():
        print(
            f"error: no bus secrets in {bus.state.folder}: run `mpctl compose init-bus` first",
            file=sys.stderr,
        )
        return 2
    try:
        generation = bus.state.rotate(args.principal)
        written = bus.refresh(cfg, args.principal)
    except (BusError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _chown_hint(bus, written)
    service = _service_of(cfg, args.principal)
    print(
        f"{args.principal}: new password (generation {generation}) in {bus.password_file(args.principal)}; "
        f"apply it and restart the service: `docker compose up -d topics && docker compose restart {service}`"
    )
    return 0


def _service_of(cfg: AppConfig, who: str) -> str:
    parts = who.removeprefix(f"{cfg.system.kafka.namespace}.").split(".", 1)
    return "-".join(parts)


def _add_topics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=Path, default=None, help="profiles file (default: local file, else template)"
    )
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", KAFKA_BOOTSTRAP))
    p.add_argument("--attempts", type=int, default=10, help="tries while the broker is not reachable yet")
    p.add_argument("--delay", type=float, default=3.0, help="seconds between tries")
    p.add_argument(
        "--bus-dir",
        type=Path,
        default=None,
        help="a BusSecrets folder (master key, generations): also give the broker every principal (SCRAM) and "
        "ACL, and Redis its users (the compose stack's topics job, as the admin)",
    )
    p.add_argument(
        "--redis-url",
        default=REDIS_URL,
        help=f"the Redis given its users with --bus-dir (default {REDIS_URL})",
    )


def cmd_topics(args: argparse.Namespace) -> int:
    """Create the declared topics; with --bus-dir, then every principal, ACL and Redis user (`apply_bus`)."""
    from urllib.parse import urlsplit

    from aiokafka.errors import KafkaError

    from mpctl.bus import apply_bus
    from mpctl.infra import InfraError, access_from_env
    from shared.kafka import ensure_topics
    from shared.topics import declared_topics

    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    specs = declared_topics(cfg)
    rf = cfg.system.kafka.replication_factor
    try:
        access = access_from_env(args.bootstrap, os.environ)
    except InfraError as err:
        print(f"topics: {err}", file=sys.stderr)
        return 1
    bus = BusSecrets(args.bus_dir) if args.bus_dir is not None else None
    url = urlsplit(args.redis_url)
    redis_at = (url.hostname or "redis", url.port or 6379)
    ns = cfg.system.kafka.namespace
    for attempt in range(1, max(1, args.attempts) + 1):
        try:
            asyncio.run(ensure_topics(access, specs, replication_factor=rf))
            applied = apply_bus(access, bus, cfg, ns, redis_address=redis_at) if bus is not None else None
        except (KafkaError, OSError, BusError) as err:  # KafkaError is a RuntimeError: caught first
            if attempt >= args.attempts:
                print(
                    f"topics: broker {args.bootstrap} not usable after {attempt} tries: {err!r}",
                    file=sys.stderr,
                )
                return 1
            print(
                f"topics: try {attempt} failed ({err!r}); again in {args.delay:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(args.delay)
            continue
        except RuntimeError as err:  # a declared topic exists with another partition count: not retried
            print(f"topics: {err}", file=sys.stderr)
            return 1
        for s in specs:
            print(f"topic {s.name}: {s.partitions} partition(s), {s.configs()['cleanup.policy']}")
        if applied is not None:
            print(
                f"bus {ns}: {applied.users} principal(s), {applied.acls} ACL(s) on {args.bootstrap}; "
                f"{applied.redis_users} Redis user(s) on {redis_at[0]}:{redis_at[1]}"
            )
        return 0
    return 1


def create_topics_main(argv: Sequence[str] | None = None) -> int:
    """`python -m mpctl.compose topics --config FILE --bootstrap HOST:PORT`: create the declared topics."""
    p = argparse.ArgumentParser(prog="python -m mpctl.compose topics", description=cmd_topics.__doc__)
    _add_topics_args(p)
    return cmd_topics(p.parse_args(argv))


def _add_subcommands(csub: Any) -> None:
    r = csub.add_parser("render", help="write the compose file generated from the profiles file")
    r.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"profiles file (default {DEFAULT_CONFIG})"
    )
    r.add_argument(
        "--out", default="docker-compose.yml", help="output file, '-' for stdout (default docker-compose.yml)"
    )
    r.set_defaults(handler=cmd_render)
    t = csub.add_parser(
        "topics", help="create the declared topics (the compose stack's one-shot `topics` service)"
    )
    _add_topics_args(t)
    t.set_defaults(handler=cmd_topics)
    s = csub.add_parser(
        "init-secrets",
        help="write secrets/<profile>.enc and .key for every enabled profile: its export of the encrypted store "
        "(an empty store when it has no entry); never overwrites",
    )
    s.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    s.add_argument("--dir", type=Path, default=Path(SECRETS_DIR))
    s.add_argument(
        "--store", type=Path, default=None, help="the encrypted store (default: as `mpctl secrets`)"
    )
    s.set_defaults(handler=cmd_init_secrets)
    b = csub.add_parser(
        "init-bus",
        help="write the bus secrets under secrets/ (CA, broker key, each principal's password; mode 0600), "
        "derived from secrets/bus; missing files only unless --force",
    )
    b.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    b.add_argument("--dir", type=Path, default=Path(SECRETS_DIR))
    b.add_argument("--force", action="store_true", help="write every derived file again")
    b.set_defaults(handler=cmd_init_bus)
    r = csub.add_parser("rotate", help="give a service principal of the compose stack a new password")
    r.add_argument("principal", help="e.g. mp.execution.profile_a")
    r.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    r.add_argument("--dir", type=Path, default=Path(SECRETS_DIR))
    r.set_defaults(handler=cmd_rotate)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compose", help="the Docker Compose stack: render the compose file, its secrets, create topics"
    )
    _add_subcommands(p.add_subparsers(dest="compose_command", required=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpctl.compose", description="The Docker Compose stack")
    _add_subcommands(parser.add_subparsers(dest="compose_command", required=True))
    args = parser.parse_args(argv)
    handler = args.handler
    result: int = handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
