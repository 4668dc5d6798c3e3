"""The Kubernetes manifests: the committed files are the rendering of the template config, one strategy and one
execution Deployment per enabled profile, each profile's Secret mounted only into its execution Deployment, and
every object validated by a real validator:

- core objects (Deployment, StatefulSet, Service, ConfigMap, Secret) against the Kubernetes JSON schemas that
  PyPI's `kubernetes-validate` ships (strict mode: unknown fields are errors);
- Strimzi resources (Kafka, KafkaNodePool, KafkaTopic) against Strimzi's own CRD schemas, compiled into
  validators by npm's `@kubernetes-models/strimzi-kafka-operator` (deploy/k8s/schema-check), run with Node.

A CRD schema lets unknown fields through (the API server prunes them silently), so a misspelt Strimzi key
would vanish without an error; a small strict schema of the Strimzi fields we use catches that.
Deliberately broken manifests must fail each validator, which proves the validators are real.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import kubernetes_validate  # type: ignore[import-untyped,unused-ignore]
import pytest
import yaml

from mpctl import k8s
from services.execution import credentials
from shared.config import AppConfig, load_config, parse_config
from shared.principals import acls, principal, principals
from shared.runtime import base_parser
from shared.topics import Topics, declared_topics

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_REL = "config/coinbase_profiles.yaml"
TEMPLATE = ROOT / TEMPLATE_REL
STACK = ROOT / "deploy" / "k8s" / "stack.yaml"
SECRETS = ROOT / "deploy" / "k8s" / "secrets.example.yaml"
SCHEMA_CHECK = ROOT / "deploy" / "k8s" / "schema-check"
# Oldest Kubernetes minor that Strimzi 0.49+ and current managed offerings support; the schemas of a newer
# minor only add fields.
K8S_VERSION = "1.30"
CORE_KINDS = {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _three_profiles(*, real_looking_credentials: bool = False) -> tuple[AppConfig, list[str]]:
    """The template plus an enabled profile_c and a disabled profile_off; optionally non-placeholder keys."""
    data = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
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


def _config(which: str) -> AppConfig:
    return load_config(TEMPLATE) if which == "template" else _three_profiles()[0]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _pod_spec(d: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = d["spec"]["template"]["spec"]
    return spec


# ------------------------------------------------------------------------------------------ committed files
def test_committed_manifests_are_the_rendering_of_the_template() -> None:
    cfg = load_config(TEMPLATE)
    assert STACK.read_text(encoding="utf-8") == k8s.render_manifests(cfg, config_path=TEMPLATE_REL), (
        "deploy/k8s/stack.yaml differs from the rendering of the profiles file: run `mpctl k8s render`"
    )
    assert SECRETS.read_text(encoding="utf-8") == k8s.render_secret_templates(cfg)
    assert "&id" not in STACK.read_text(encoding="utf-8")  # no YAML aliases: each object stands alone


def test_cli_render_writes_the_same_files(tmp_path: Path) -> None:
    out, sec = tmp_path / "stack.yaml", tmp_path / "secrets.yaml"
    # The config path is relative to the repository root, as in the committed header: render from there.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mpctl.k8s",
            "render",
            "--config",
            TEMPLATE_REL,
            "--out",
            str(out),
            "--secrets-out",
            str(sec),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8") == STACK.read_text(encoding="utf-8")
    assert sec.read_text(encoding="utf-8") == SECRETS.read_text(encoding="utf-8")


def test_register_adds_mpctl_k8s_render() -> None:
    parser = argparse.ArgumentParser(prog="mpctl")
    k8s.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["k8s", "render", "--out", "-"])
    assert args.handler is k8s.cmd_render
    assert str(args.config) == TEMPLATE_REL


def test_invalid_config_is_refused_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles: {}\n", encoding="utf-8")
    assert k8s.main(["render", "--config", str(bad), "--out", str(tmp_path / "x.yaml")]) == 1
    assert "INVALID" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


# ------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("which", ["template", "three_profiles"])
def test_one_strategy_and_one_execution_deployment_per_enabled_profile(which: str) -> None:
    cfg = _config(which)
    docs = _docs(k8s.render_manifests(cfg))
    deployments = {d["metadata"]["name"]: d for d in _by_kind(docs, "Deployment")}
    enabled = list(cfg.enabled_profiles())
    for kind in ("strategy", "execution"):
        mine = [
            d for d in deployments.values() if d["metadata"]["labels"]["app.kubernetes.io/component"] == kind
        ]
        assert sorted(d["metadata"]["labels"]["multiprofile.coinbase/profile"] for d in mine) == sorted(
            enabled
        )
        for d in mine:
            assert d["spec"]["replicas"] == 1
            assert d["spec"]["strategy"] == {"type": "Recreate"}  # never two consumers of one profile's group
            (c,) = _pod_spec(d)["containers"]
            assert c["args"][0] == f"services.{kind}"
            pid = d["metadata"]["labels"]["multiprofile.coinbase/profile"]
            assert c["args"].count("--profile") == 1 and c["args"][c["args"].index("--profile") + 1] == pid
            assert d["metadata"]["name"] == f"{kind}-{pid.replace('_', '-')}"
    for pid in set(cfg.profiles) - set(enabled):
        assert not any(pid.replace("_", "-") in name for name in deployments)
    assert {"registry", "arbiter", "monitor"} <= set(deployments)


@pytest.mark.parametrize("which", ["template", "three_profiles"])
def test_each_profile_secret_is_mounted_only_into_its_execution_deployment(which: str) -> None:
    cfg = _config(which)
    docs = _docs(k8s.render_manifests(cfg))
    assert not _by_kind(docs, "Secret"), "the stack must reference Secrets, never carry them"
    referenced: dict[str, list[str]] = {}
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = _pod_spec(d)
        for v in pod.get("volumes", []):
            if "secret" in v:
                referenced.setdefault(v["secret"]["secretName"], []).append(d["metadata"]["name"])
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.setdefault(ref["name"], []).append(d["metadata"]["name"])
            for ef in c.get("envFrom", []):
                if "secretRef" in ef:
                    referenced.setdefault(ef["secretRef"]["name"], []).append(d["metadata"]["name"])
    enabled = list(cfg.enabled_profiles())
    # The bus: every workload mounts the cluster CA and its own KafkaUser's Secret, nothing else of it.
    deployments = [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"]
    assert sorted(referenced.pop(k8s.CA_SECRET)) == sorted(deployments)
    # Redis: both StatefulSets mount the registry's KafkaUser Secret too (its Redis password is its bus
    # password) and the admin's Secret; the snapshot key reaches exactly the services that keep state.
    redis_sets = ["redis-primary", "redis-replica"]
    registry_user = f"{cfg.system.kafka.namespace}.registry"
    assert sorted(referenced.pop(registry_user)) == [*redis_sets, "registry"]
    assert sorted(referenced.pop(k8s.REDIS_ADMIN_SECRET)) == redis_sets
    users = {u["metadata"]["name"] for u in _by_kind(docs, "KafkaUser")}
    for user in users & set(referenced):
        assert len(referenced.pop(user)) == 1  # one workload per principal (its replicas share it)
    stateful = ["arbiter", "monitor"] + [
        f"{s}-{pid.replace('_', '-')}" for s in ("strategy", "execution") for pid in enabled
    ]
    assert sorted(referenced.pop(k8s.STATE_SECRET)) == sorted(stateful)
    assert referenced == {
        f"coinbase-{pid.replace('_', '-')}": [f"execution-{pid.replace('_', '-')}"] for pid in enabled
    }
    templates = _docs(k8s.render_secret_templates(cfg))
    names = [t["metadata"]["name"] for t in templates]
    assert names == [f"coinbase-{p.replace('_', '-')}" for p in enabled] + [
        k8s.STATE_SECRET,
        k8s.REDIS_ADMIN_SECRET,
    ]
    for t in templates[: len(enabled)]:
        assert sorted(t["stringData"]) == ["credentials.enc", "mpctl_secrets_key"]
    for t in templates:
        assert all(v.startswith("YOUR_") for v in t["stringData"].values())


@pytest.mark.parametrize("which", ["template", "three_profiles"])
def test_execution_pod_finds_the_export_and_its_key_where_the_worker_looks(which: str) -> None:
    cfg = _config(which)
    docs = _docs(k8s.render_manifests(cfg))
    for pid in cfg.enabled_profiles():
        d = next(
            x
            for x in docs
            if x["kind"] == "Deployment" and x["metadata"]["name"] == f"execution-{pid.replace('_', '-')}"
        )
        pod = _pod_spec(d)
        (vol,) = [v for v in pod["volumes"] if v["name"] == "coinbase"]
        assert vol["secret"]["items"] == [
            {"key": "credentials.enc", "path": "credentials.enc"},
            {"key": "mpctl_secrets_key", "path": "mpctl_secrets_key"},
        ]
        (c,) = pod["containers"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
        assert mount["mountPath"] == "/run/secrets" and mount["readOnly"] is True
        assert f"{mount['mountPath']}/mpctl_secrets_key" == str(credentials.MOUNTED_KEY_FILE)
        assert c["env"][0] == {"name": credentials.ENV_STORE, "value": "/run/secrets/credentials.enc"}
        assert [e["name"] for e in c["env"][1:]] == [
            "KAFKA_USERNAME",
            "KAFKA_PASSWORD_FILE",
            "KAFKA_CA_FILE",
            "MPCTL_STATE_KEY_FILE",
        ]
    # No other workload is told where a store is.
    told = [
        x["metadata"]["name"]
        for x in docs
        if x["kind"] in ("Deployment", "StatefulSet") and credentials.ENV_STORE in json.dumps(x)
    ]
    assert sorted(told) == sorted(f"execution-{p.replace('_', '-')}" for p in cfg.enabled_profiles())


def test_secret_example_shows_the_kubectl_command_for_the_export() -> None:
    text = SECRETS.read_text(encoding="utf-8")
    assert "mpctl secrets export profile_a --out secrets" in text
    assert (
        "--from-file=credentials.enc=secrets/profile_a.enc --from-file=mpctl_secrets_key=secrets/profile_a.key"
        in text
    )


def test_no_credential_value_reaches_the_manifests() -> None:
    cfg, values = _three_profiles(real_looking_credentials=True)
    text = k8s.render_manifests(cfg) + k8s.render_secret_templates(cfg)
    for value in values:
        assert value not in text
    (cm,) = _by_kind(_docs(text), "ConfigMap")
    shipped = parse_config(yaml.safe_load(cm["data"]["profiles.yaml"]), source="<configmap>")
    # The ConfigMap holds the same config, credentials replaced by placeholders (refused in live mode).
    assert all(p.api_credentials.is_placeholder() for p in shipped.profiles.values())
    strip = {"profiles": {pid: {"api_credentials"} for pid in cfg.profiles}}
    assert shipped.model_dump(mode="json", exclude=strip) == cfg.model_dump(mode="json", exclude=strip)


def test_kafka_cluster_has_three_brokers_and_replicated_topics() -> None:
    cfg = load_config(TEMPLATE)
    docs = _docs(STACK.read_text(encoding="utf-8"))
    pools = {p["metadata"]["name"]: p["spec"] for p in _by_kind(docs, "KafkaNodePool")}
    assert pools["brokers"]["replicas"] == 3 and pools["brokers"]["roles"] == ["broker"]
    assert pools["controllers"]["replicas"] == 3 and pools["controllers"]["roles"] == ["controller"]
    (kafka,) = _by_kind(docs, "Kafka")
    kc = kafka["spec"]["kafka"]["config"]
    assert kc["default.replication.factor"] == 3 and kc["min.insync.replicas"] == 2
    assert kc["offsets.topic.replication.factor"] == 3 and kc["auto.create.topics.enable"] is False
    assert "topicOperator" in kafka["spec"]["entityOperator"]
    topics = {t["spec"]["topicName"]: t for t in _by_kind(docs, "KafkaTopic")}
    declared = {s.name: s for s in declared_topics(cfg)}
    assert set(topics) == set(declared)
    ns = cfg.system.kafka.namespace
    order_topics = {f"{ns}.orders.intents", f"{ns}.orders.events", f"{ns}.orders.decisions"} | {
        f"{ns}.orders.approved.{pid}" for pid in cfg.profiles
    }
    for name, t in topics.items():
        assert t["metadata"]["labels"] == {"strimzi.io/cluster": k8s.KAFKA_CLUSTER}
        assert t["spec"]["replicas"] == 3 and t["spec"]["partitions"] == declared[name].partitions
        for key, value in declared[name].configs().items():
            assert str(t["spec"]["config"][key]) == value
        if name in order_topics:
            assert t["spec"]["config"]["min.insync.replicas"] == 2
    names = [d["metadata"]["name"] for d in docs]
    assert len(names) == len({(d["kind"], d["metadata"]["name"]) for d in docs})
    for d in docs:
        pattern = DNS_LABEL if d["kind"] in ("Service", "StatefulSet") else DNS_SUBDOMAIN
        assert pattern.match(d["metadata"]["name"]), d["metadata"]["name"]


def test_redis_has_a_primary_and_a_replica() -> None:
    docs = _docs(STACK.read_text(encoding="utf-8"))
    sets = {s["metadata"]["name"]: s for s in _by_kind(docs, "StatefulSet")}
    assert set(sets) == {"redis-primary", "redis-replica"}
    replica_cmd = _pod_spec(sets["redis-replica"])["containers"][0]["command"]
    assert replica_cmd[replica_cmd.index("--replicaof") + 1] == "redis-primary-0.redis-primary"
    services = {s["metadata"]["name"]: s["spec"] for s in _by_kind(docs, "Service")}
    for name in ("redis-primary", "redis-replica"):
        assert services[name]["clusterIP"] == "None"  # the StatefulSets' governing (headless) Services
        assert sets[name]["spec"]["serviceName"] == name
    assert services["redis"]["selector"]["multiprofile.coinbase/redis-role"] == "primary"
    assert k8s.REDIS_URL.startswith("redis://redis:")


def test_workloads_have_resources_probes_and_parse_their_args() -> None:
    docs = _docs(STACK.read_text(encoding="utf-8"))
    extras = {
        "registry": {"--metrics-port"},
        "monitor": {"--metrics-port", "--metrics-addr"},
        "ingest": {"--source", "--data"},
    }
    for d in [*_by_kind(docs, "Deployment"), *_by_kind(docs, "StatefulSet")]:
        for c in _pod_spec(d)["containers"]:
            r = c["resources"]
            assert set(r) == {"requests", "limits"} and set(r["requests"]) == {"cpu", "memory"}, d["metadata"]
            assert set(r["limits"]) == {"cpu", "memory"}
            assert "readinessProbe" in c, d["metadata"]["name"]
            if c.get("image") != k8s.DEFAULT_IMAGE:
                continue
            module = c["args"][0]
            service = module.split(".")[1]
            args, unknown = base_parser(
                service, needs_profile=service in ("strategy", "execution")
            ).parse_known_args(c["args"][1:])
            assert {u for u in unknown if u.startswith("--")} <= extras.get(service, set()), (module, unknown)
            assert args.bootstrap == k8s.KAFKA_BOOTSTRAP and args.config == Path(k8s.CONFIG_FILE)
            assert args.redis_url == k8s.REDIS_URL


def _ingest(docs: list[dict[str, Any]]) -> dict[str, Any]:
    deps = [d for d in _by_kind(docs, "Deployment") if d["metadata"]["name"] == "ingest"]
    assert len(deps) == 1
    spec = deps[0]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}  # one publisher of md.candles
    container: dict[str, Any] = _pod_spec(deps[0])["containers"][0]
    return container


def test_the_ingest_runs_the_live_market_by_default_and_a_replay_with_the_flag() -> None:
    cfg = load_config(TEMPLATE)
    assert cfg.system.mode == "paper"  # paper execution by default
    live = _docs(STACK.read_text(encoding="utf-8"))
    args = _ingest(live)["args"]
    assert (
        args[0] == "services.ingest"
        and args[args.index("--source") + 1] == "coinbase"
        and "--data" not in args
    )
    assert not _by_kind(live, "PersistentVolumeClaim")
    replay = _docs(k8s.render_manifests(cfg, config_path=TEMPLATE_REL, replay=True))
    c = _ingest(replay)
    args = c["args"]
    assert (
        args[args.index("--source") + 1] == "replay"
        and args[args.index("--data") + 1] == k8s.REPLAY_DATA_MOUNT
    )
    assert {"name": "market-data", "mountPath": k8s.REPLAY_DATA_MOUNT, "readOnly": True} in c["volumeMounts"]
    (pvc,) = _by_kind(replay, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == k8s.REPLAY_DATA_CLAIM
    for d in [pvc, *(d for d in _by_kind(replay, "Deployment") if d["metadata"]["name"] == "ingest")]:
        _validate_core(d)
    # Everything else is the same rendering.
    assert [d for d in replay if d["metadata"]["name"] not in ("ingest", k8s.REPLAY_DATA_CLAIM)] == [
        d for d in live if d["metadata"]["name"] != "ingest"
    ]


def test_cli_render_replay_flag(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    k8s.register(parser.add_subparsers())
    out = tmp_path / "stack.yaml"
    args = parser.parse_args(
        ["k8s", "render", "--config", str(TEMPLATE), "--out", str(out), "--secrets-out", "", "--replay"]
    )
    assert args.handler(args) == 0
    args = _ingest(_docs(out.read_text(encoding="utf-8")))["args"]
    assert args[args.index("--source") + 1] == "replay"


# ------------------------------------------------------------------------------------------ core schemas
def _validate_core(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_core_objects_validate_against_the_kubernetes_schemas() -> None:
    docs = _docs(STACK.read_text(encoding="utf-8")) + _docs(SECRETS.read_text(encoding="utf-8"))
    core = [d for d in docs if d["kind"] in CORE_KINDS]
    assert {d["kind"] for d in core} == CORE_KINDS
    for d in core:
        try:
            _validate_core(d)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(f"{d['kind']}/{d['metadata']['name']}: {path}: {err.message}")
    # Everything else is a Strimzi resource, validated below; nothing escapes both validators.
    assert {d["kind"] for d in docs} - CORE_KINDS == {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"}


def _first(kind: str, name: str | None = None) -> dict[str, Any]:
    docs = _docs(STACK.read_text(encoding="utf-8")) + _docs(SECRETS.read_text(encoding="utf-8"))
    return copy.deepcopy(
        next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))
    )


def _break_core(case: str) -> dict[str, Any]:
    if case == "replicas-not-an-integer":
        d = _first("Deployment", "arbiter")
        d["spec"]["replicas"] = "one"
    elif case == "misspelt-container-field":
        d = _first("Deployment", "execution-profile-a")
        d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    elif case == "missing-containers":
        d = _first("StatefulSet", "redis-primary")
        del d["spec"]["template"]["spec"]["containers"]
    elif case == "service-port-not-a-number":
        d = _first("Service", "redis")
        d["spec"]["ports"][0]["port"] = "six-three-seven-nine"
    elif case == "configmap-data-not-strings":
        d = _first("ConfigMap")
        d["data"] = {"profiles.yaml": {"profiles": {}}}
    elif case == "secret-unknown-top-level-key":
        d = _first("Secret")
        d["password"] = "x"
    else:
        raise AssertionError(case)
    return d


@pytest.mark.parametrize(
    "case",
    [
        "replicas-not-an-integer",
        "misspelt-container-field",
        "missing-containers",
        "service-port-not-a-number",
        "configmap-data-not-strings",
        "secret-unknown-top-level-key",
    ],
)
def test_broken_core_objects_are_refused(case: str) -> None:
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_core(_break_core(case))


# ------------------------------------------------------------------------------------------ Strimzi schemas
@pytest.fixture(scope="module")
def strimzi_validator() -> Path:
    """deploy/k8s/schema-check installed with `npm ci` (pinned by its lock file) into a cache outside the
    repository, once per lock-file content; returns the validate.mjs to run with node."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed to run Strimzi's CRD schemas (apt-get install nodejs npm)")
    lock = (SCHEMA_CHECK / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock + (SCHEMA_CHECK / "package.json").read_bytes()).hexdigest()[:16]
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mpctl" / f"strimzi-schema-{digest}"
    )
    marker = cache / ".installed"
    if not marker.exists():
        cache.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(SCHEMA_CHECK / name, cache / name)
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=cache,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"npm ci failed:\n{proc.stdout}\n{proc.stderr}"
        marker.write_text("ok\n")
    script = cache / "validate.mjs"
    shutil.copy2(SCHEMA_CHECK / "validate.mjs", script)  # always the committed script
    return script


def _run_strimzi(script: Path, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        ["node", str(script)],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 1), proc.stderr
    results: list[dict[str, Any]] = json.loads(proc.stdout)
    assert len(results) == len(docs)
    return results


def _strimzi_docs() -> list[dict[str, Any]]:
    return [
        d for d in _docs(STACK.read_text(encoding="utf-8")) if d["apiVersion"].startswith("kafka.strimzi.io/")
    ]


def test_strimzi_resources_validate_against_strimzi_crd_schemas(strimzi_validator: Path) -> None:
    docs = _strimzi_docs()
    results = _run_strimzi(strimzi_validator, docs)
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad
    assert {r["kind"] for r in results} == {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"}


def _break_strimzi(case: str) -> dict[str, Any]:
    docs = _strimzi_docs()
    if case == "topic-partitions-not-an-integer":
        d = copy.deepcopy(next(x for x in docs if x["kind"] == "KafkaTopic"))
        d["spec"]["partitions"] = "three"
    elif case == "listener-type-unknown":
        d = copy.deepcopy(next(x for x in docs if x["kind"] == "Kafka"))
        d["spec"]["kafka"]["listeners"][0]["type"] = "internel"
    elif case == "listener-without-tls":
        d = copy.deepcopy(next(x for x in docs if x["kind"] == "Kafka"))
        del d["spec"]["kafka"]["listeners"][0]["tls"]
    elif case == "node-pool-role-unknown":
        d = copy.deepcopy(next(x for x in docs if x["kind"] == "KafkaNodePool"))
        d["spec"]["roles"] = ["leader"]
    elif case == "node-pool-without-storage":
        d = copy.deepcopy(next(x for x in docs if x["kind"] == "KafkaNodePool"))
        del d["spec"]["storage"]
    elif case == "unknown-kind":
        d = copy.deepcopy(docs[0])
        d["kind"] = "KafkaBroker"
    else:
        raise AssertionError(case)
    return d


@pytest.mark.parametrize(
    "case",
    [
        "topic-partitions-not-an-integer",
        "listener-type-unknown",
        "listener-without-tls",
        "node-pool-role-unknown",
        "node-pool-without-storage",
        "unknown-kind",
    ],
)
def test_broken_strimzi_resources_are_refused(strimzi_validator: Path, case: str) -> None:
    (result,) = _run_strimzi(strimzi_validator, [_break_strimzi(case)])
    assert not result["ok"], result
    assert result["error"]


# The Strimzi fields this project uses, from Strimzi's documented API (kafka.strimzi.io/v1: Kafka,
# KafkaNodePool, KafkaTopic), closed with additionalProperties: false. The CRD schema above checks types and
# enums but lets an unknown key through (the API server would prune it without a word).
_RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "requests": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"cpu": {}, "memory": {}},
        },
        "limits": {"type": "object", "additionalProperties": False, "properties": {"cpu": {}, "memory": {}}},
    },
}
_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "labels": {"type": "object"},
        "annotations": {"type": "object"},
    },
}
STRIMZI_STRICT: dict[str, dict[str, Any]] = {
    "KafkaUser": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "kafka.strimzi.io/v1"},
            "kind": {"const": "KafkaUser"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "authentication": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"type": {"enum": ["scram-sha-512", "tls", "tls-external"]}},
                    },
                    "authorization": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "type": {"const": "simple"},
                            "acls": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["resource", "operations"],
                                    "properties": {
                                        "resource": {
                                            "type": "object",
                                            "additionalProperties": False,
                                            "properties": {
                                                "type": {"enum": ["topic", "group"]},
                                                "name": {"type": "string"},
                                                "patternType": {"enum": ["literal", "prefix"]},
                                            },
                                        },
                                        "operations": {
                                            "type": "array",
                                            "items": {"enum": ["Read", "Write", "Describe"]},
                                        },
                                        "host": {"const": "*"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "KafkaTopic": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "kafka.strimzi.io/v1"},
            "kind": {"const": "KafkaTopic"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "topicName": {"type": "string"},
                    "partitions": {"type": "integer", "minimum": 1},
                    "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                    "config": {"type": "object"},
                },
            },
        },
    },
    "KafkaNodePool": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "kafka.strimzi.io/v1"},
            "kind": {"const": "KafkaNodePool"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["replicas", "roles", "storage"],
                "additionalProperties": False,
                "properties": {
                    "replicas": {"type": "integer", "minimum": 0},
                    "roles": {"type": "array", "items": {"enum": ["controller", "broker"]}},
                    "storage": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "type": {"enum": ["jbod", "ephemeral", "persistent-claim"]},
                            "volumes": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "id": {"type": "integer"},
                                        "type": {"enum": ["ephemeral", "persistent-claim"]},
                                        "size": {"type": "string"},
                                        "class": {"type": "string"},
                                        "deleteClaim": {"type": "boolean"},
                                        "kraftMetadata": {"enum": ["shared"]},
                                    },
                                },
                            },
                        },
                    },
                    "resources": _RESOURCES,
                    "jvmOptions": {"type": "object"},
                    "template": {"type": "object"},
                },
            },
        },
    },
    "Kafka": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "kafka.strimzi.io/v1"},
            "kind": {"const": "Kafka"},
            "metadata": _META,
            "spec": {
                "type": "object",
                "required": ["kafka"],
                "additionalProperties": False,
                "properties": {
                    "kafka": {
                        "type": "object",
                        "required": ["listeners"],
                        "additionalProperties": False,
                        "properties": {
                            "version": {"type": "string"},
                            "metadataVersion": {"type": "string"},
                            "listeners": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["name", "port", "type", "tls"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "name": {"type": "string"},
                                        "port": {"type": "integer"},
                                        "type": {
                                            "enum": [
                                                "internal",
                                                "route",
                                                "loadbalancer",
                                                "nodeport",
                                                "ingress",
                                                "cluster-ip",
                                            ]
                                        },
                                        "tls": {"type": "boolean"},
                                        "authentication": {"type": "object"},
                                        "configuration": {"type": "object"},
                                    },
                                },
                            },
                            "config": {"type": "object"},
                            "authorization": {"type": "object"},
                            "rack": {"type": "object"},
                            "template": {"type": "object"},
                            "metricsConfig": {"type": "object"},
                        },
                    },
                    "entityOperator": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "topicOperator": {"type": "object"},
                            "userOperator": {"type": "object"},
                        },
                    },
                    "cruiseControl": {"type": "object"},
                    "kafkaExporter": {"type": "object"},
                },
            },
        },
    },
}


def test_strimzi_resources_use_only_documented_fields() -> None:
    for d in _strimzi_docs():
        jsonschema.validate(d, STRIMZI_STRICT[d["kind"]])


def test_misspelt_strimzi_key_passes_the_crd_schema_but_not_the_strict_one(strimzi_validator: Path) -> None:
    d = copy.deepcopy(next(x for x in _strimzi_docs() if x["kind"] == "KafkaTopic"))
    d["spec"]["replica"] = d["spec"].pop("replicas")  # the topic would silently get the broker default
    (result,) = _run_strimzi(strimzi_validator, [d])
    assert result["ok"], "the CRD schema now refuses unknown fields: the strict schema may be redundant"
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        jsonschema.validate(d, STRIMZI_STRICT["KafkaTopic"])


@pytest.mark.parametrize("which", ["template", "three_profiles"])
def test_every_workload_connects_as_its_own_principal_with_exactly_its_acls(which: str) -> None:
    cfg = _config(which)
    docs = _docs(k8s.render_manifests(cfg))
    ns = cfg.system.kafka.namespace
    (kafka,) = _by_kind(docs, "Kafka")
    (listener,) = kafka["spec"]["kafka"]["listeners"]  # one listener: no anonymous way in
    assert listener["tls"] is True and listener["authentication"] == {"type": "scram-sha-512"}
    assert kafka["spec"]["kafka"]["authorization"] == {"type": "simple"}
    users = {u["metadata"]["name"]: u for u in _by_kind(docs, "KafkaUser")}
    assert set(users) == {k8s.kafka_user(p) for p in principals(cfg, ns)}
    # The KafkaUsers' ACLs are shared/principals.py's set, rule for rule.
    rendered = {
        (name, a["resource"]["type"], a["resource"]["name"], a["resource"]["patternType"], op)
        for name, u in users.items()
        for a in u["spec"]["authorization"]["acls"]
        for op in a["operations"]
    }
    expected = {
        (k8s.kafka_user(r.principal), r.resource, r.name, "prefix" if r.pattern == "prefixed" else "literal",
         r.operation.capitalize())
        for r in acls(cfg, ns)
    }  # fmt: skip
    assert rendered == expected
    t = Topics(ns)
    for pid in cfg.profiles:
        writers = {n for n, _k, topic, _p, op in rendered if topic == t.approved(pid) and op == "Write"}
        readers = {n for n, _k, topic, _p, op in rendered if topic == t.approved(pid) and op == "Read"}
        assert writers == {f"{ns}.arbiter"} and readers == {k8s.kafka_user(f"{ns}.execution.{pid}")}
    for d in _by_kind(docs, "Deployment"):
        labels = d["metadata"]["labels"]
        who = k8s.kafka_user(
            principal(ns, labels["app.kubernetes.io/component"], labels.get("multiprofile.coinbase/profile"))
        )
        (c,) = _pod_spec(d)["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["KAFKA_USERNAME"] == who and env["KAFKA_PASSWORD_FILE"] == "/run/kafka-user/password"
        assert c["args"][c["args"].index("--bootstrap") + 1] == k8s.KAFKA_BOOTSTRAP
        (vol,) = [v for v in _pod_spec(d)["volumes"] if v["name"] == "kafka-user"]
        assert vol["secret"]["secretName"] == who  # its own user's password, no other
