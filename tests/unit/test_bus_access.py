"""Bus access without a broker: the access type, password files, the principals' secrets and who starts as whom."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pydantic import SecretStr, ValidationError

from mpctl.bus import BusSecrets, redis_acl_file, redis_password_rule
from mpctl.stack import bus_args, process_principal, process_principals, state_key_env
from shared.bus import BusAccessError, KafkaAccess, read_password_file, redis_credentials
from shared.config import load_config
from shared.forkhost import argv_for
from shared.principals import redis_users
from shared.runtime import add_bus_args, bus_access_from_args
from shared.snapshots import KEY_FILE_ENV as STATE_KEY_FILE_ENV
from shared.snapshots import secret_from_env

SECRET = "s3cret-value-never-shown"
TEMPLATE = Path(__file__).resolve().parents[2] / "config" / "coinbase_profiles.yaml"


def test_access_hides_its_password_and_gives_scram_over_tls(tmp_path: Path) -> None:
    bus = BusSecrets(tmp_path / "bus")
    bus.ensure(["127.0.0.1"])
    ca = bus.ca_file
    acc = KafkaAccess(servers="h:1", username="ns.arbiter", password=SecretStr(SECRET), ca_file=ca)
    assert SECRET not in repr(acc) and SECRET not in str(acc) and str(acc) == "h:1 as ns.arbiter"
    opts = acc.client_options()
    assert (opts["security_protocol"], opts["sasl_mechanism"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert opts["sasl_plain_username"] == "ns.arbiter" and opts["ssl_context"] is not None
    assert KafkaAccess(servers="h:1").client_options() == {"bootstrap_servers": "h:1"}


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"username": "u"}, "a user name without the other"),
        ({"password": SecretStr("p")}, "a password without the other"),
        ({"username": "u", "password": SecretStr("")}, "the password is empty"),
    ],
)
def test_half_given_credentials_are_refused(fields: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        KafkaAccess(servers="h:1", **fields)  # type: ignore[arg-type]


def test_password_files_are_read_strictly_without_showing_the_value(tmp_path: Path) -> None:
    good = tmp_path / "pw"
    good.write_text(f"  {SECRET}\n")
    assert read_password_file(good).get_secret_value() == SECRET
    for name, content, says in [
        ("empty", b"\n", "is empty"),
        ("long", b"x" * 2000, "longer than 1024 bytes"),
        ("binary", b"\xff\xfe", "not UTF-8"),
    ]:
        f = tmp_path / name
        f.write_bytes(content)
        with pytest.raises(BusAccessError, match=says) as err:
            read_password_file(f)
        assert str(f) in str(err.value)
    with pytest.raises(BusAccessError, match="cannot read the bus password file .*missing"):
        read_password_file(tmp_path / "missing")


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bus_args(p)
    return p.parse_args(list(argv))


def test_a_user_without_a_password_file_or_the_reverse_exits_naming_the_option(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for env in ("KAFKA_USERNAME", "KAFKA_PASSWORD_FILE", "KAFKA_CA_FILE"):
        monkeypatch.delenv(env, raising=False)
    with pytest.raises(SystemExit, match="--kafka-user ns.registry needs --kafka-password-file"):
        bus_access_from_args(parse("--kafka-user", "ns.registry"))
    with pytest.raises(SystemExit, match="--kafka-password-file given without --kafka-user"):
        bus_access_from_args(parse("--kafka-password-file", str(tmp_path / "pw")))
    with pytest.raises(SystemExit, match="--kafka-password-file: .* is empty"):
        (tmp_path / "pw").write_text("")
        bus_access_from_args(parse("--kafka-user", "u", "--kafka-password-file", str(tmp_path / "pw")))
    (tmp_path / "pw").write_text(SECRET)
    args = parse("--bootstrap", "h:9", "--kafka-user", "u", "--kafka-password-file", str(tmp_path / "pw"))
    acc = bus_access_from_args(args)
    assert (acc.servers, acc.username, acc.password) == ("h:9", "u", SecretStr(SECRET))
    assert bus_access_from_args(args) is acc  # read once per process


def test_each_principal_has_its_own_password_and_rotation_changes_only_its_own(tmp_path: Path) -> None:
    bus = BusSecrets(tmp_path / "bus")
    bus.ensure(["127.0.0.1"])
    a, b = bus.password("ns.strategy.profile_a"), bus.password("ns.strategy.profile_b")
    assert a != b and len(a.get_secret_value()) >= 40
    assert BusSecrets(tmp_path / "bus").password("ns.strategy.profile_a") == a  # derived, not stored
    assert bus.rotate("ns.strategy.profile_a") == 1
    assert bus.password("ns.strategy.profile_a") != a and bus.password("ns.strategy.profile_b") == b
    assert stat.S_IMODE((tmp_path / "bus").stat().st_mode) == 0o700
    for f in (tmp_path / "bus").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert a.get_secret_value() not in f.read_text(errors="replace")


def test_the_broker_certificate_is_signed_by_the_ca_for_its_hosts(tmp_path: Path) -> None:
    bus = BusSecrets(tmp_path / "bus")
    bus.ensure(["kafka"])
    ca = x509.load_pem_x509_certificate(bus.ca_file.read_bytes())
    pem = bus.broker_pem.read_bytes()
    assert b"PRIVATE KEY" in pem
    cert = x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE") :])
    key = ca.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and cert.signature_hash_algorithm is not None
    key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"kafka", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    before = bus.broker_pem.read_bytes()
    bus.ensure(["kafka"])
    assert bus.broker_pem.read_bytes() == before  # kept while it covers the hosts
    bus.ensure(["kafka", "broker.internal"])
    assert bus.broker_pem.read_bytes() != before  # a new host: a new certificate


def test_each_process_connects_as_the_principal_of_its_role() -> None:
    common = ["--bootstrap", "h:1", "--namespace", "ns"]
    assert process_principal(["services.registry", *common]) == "ns.registry"
    assert process_principal(["services.execution", *common, "--profile", "p1"]) == "ns.execution.p1"
    host = ["services.strategy", *common, "--profile", "p1,p2"]
    assert process_principals(host) == ["ns.strategy.p1", "ns.strategy.p2"]
    with pytest.raises(ValueError, match="without --namespace"):
        process_principal(["services.arbiter", "--bootstrap", "h:1"])
    with pytest.raises(ValueError, match="not a service module"):
        process_principal(["mpctl.cli"])


def test_a_hosted_worker_gets_its_own_principal() -> None:
    argv = [
        "--profile",
        "p1,p2",
        "--kafka-user",
        "ns.strategy.p1,ns.strategy.p2",
        "--kafka-password-file",
        "-",
    ]
    out = argv_for(argv, "p2", ["p1", "p2"])
    assert out[out.index("--profile") + 1] == "p2"
    assert out[out.index("--kafka-user") + 1] == "ns.strategy.p2"


def test_redis_users_give_the_registry_its_prefix_and_nobody_else_a_user() -> None:
    cfg = load_config(TEMPLATE)
    users = {u.name: u for u in redis_users(cfg, "ns")}
    reg = users["ns.registry"].rules()
    assert reg[:2] == ["reset", "resetchannels"] and "-@all" in reg
    assert [r for r in reg if r.startswith("~")] == ["~ns:reg:*"]
    for forbidden in ("+flushall", "+flushdb", "+config", "+keys", "+acl", "+@all", "allkeys", "~*"):
        assert forbidden not in reg
    assert {"+evalsha", "+script|load", "+zadd", "+info"} <= set(reg)
    assert set(users) == {"ns.registry"}


def test_the_bus_redis_acl_file_keeps_saved_users_and_no_password(tmp_path: Path) -> None:
    bus = BusSecrets(tmp_path / "bus")
    bus.ensure(["127.0.0.1"])
    saved = "user default on nopass ~* +@all\nuser admin on #00 ~* +@all\nuser ns.registry on #ab ~ns:reg:* +get\n"
    text = redis_acl_file(bus, saved)
    lines = text.splitlines()
    assert lines[0].startswith("user default off") and lines[1].startswith("user admin on #")
    assert lines[2:] == ["user ns.registry on #ab ~ns:reg:* +get"]
    assert bus.password("admin").get_secret_value() not in text
    assert redis_password_rule(bus.password("admin")) in lines[1]


def test_a_service_authenticates_to_the_bus_redis_only(tmp_path: Path) -> None:
    bus = BusSecrets(tmp_path / "bus")
    bus.ensure(["127.0.0.1"])
    args = [
        "services.registry",
        "--namespace",
        "ns",
        "--bootstrap",
        "h:1",
        "--redis-url",
        "redis://127.0.0.1:6390/0",
    ]
    assert "--redis-auth" not in bus_args(bus, args)[0]  # no Redis of the bus's: used as given
    bus.record_redis("127.0.0.1", 6390)
    assert bus_args(bus, args)[0][-1] == "--redis-auth"
    other = [*args[:-1], "redis://10.0.0.9:6390/0"]
    assert "--redis-auth" not in bus_args(bus, other)[0]
    # Only the registry uses Redis: the other services get no Redis credentials even with the same URL.
    keeper = ["services.arbiter", *args[1:]]
    assert "--redis-auth" not in bus_args(bus, keeper)[0]
    acc = KafkaAccess(servers="h:1", username="ns.registry", password=SecretStr(SECRET))
    assert redis_credentials(acc, True) == {"username": "ns.registry", "password": SECRET}
    assert redis_credentials(acc, False) == {} and redis_credentials(KafkaAccess(servers="h:1"), True) == {}


def test_a_service_whose_parent_died_and_does_not_stop_exits_after_the_grace(tmp_path: Path) -> None:
    """The orphan watchdog (shared/runtime.py): a child that ignores SIGTERM is gone soon after its parent is."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    child = (
        "import os, signal, sys, time\n"
        "from shared.runtime import start_orphan_watchdog\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "start_orphan_watchdog(1.0)\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    parent = (
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = int(pid_file.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the orphan outlived its grace")
    finally:
        proc.kill()


def test_stateful_services_get_their_namespaces_snapshot_key_file_and_no_one_else(tmp_path: Path) -> None:
    bus = BusSecrets(tmp_path / "bus")
    bus.ensure(["127.0.0.1"])
    base = ["--namespace", "ns", "--bootstrap", "h:1"]
    got = state_key_env(bus, ["services.strategy", *base, "--profile", "a"], {})
    path = Path(got[STATE_KEY_FILE_ENV])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 64
    # The same key on every start (a restart verifies its snapshots) and for every keeper of the namespace.
    key = path.read_bytes()
    for module in ("services.arbiter", "services.monitor", "services.execution"):
        again = state_key_env(bus, [module, *base], {})
        assert Path(again[STATE_KEY_FILE_ENV]).read_bytes() == key
    other = state_key_env(bus, ["services.arbiter", "--namespace", "ns2", "--bootstrap", "h:1"], {})
    assert Path(other[STATE_KEY_FILE_ENV]).read_bytes() != key
    # Services that keep no state get none; an operator's own key is kept; no bus, nothing to give.
    assert state_key_env(bus, ["services.ingest", *base], {}) == {}
    assert state_key_env(bus, ["services.registry", *base], {}) == {}
    assert state_key_env(bus, ["services.arbiter", *base], {"MPCTL_STATE_KEY": "x" * 16}) == {}
    assert state_key_env(None, ["services.arbiter", *base], {}) == {}
    assert bus.password("admin").get_secret_value().encode() not in key


def test_an_unreadable_or_short_state_key_is_refused_naming_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(ValueError, match=r"MPCTL_STATE_KEY_FILE=.*nope.key: cannot read the state key"):
        secret_from_env({STATE_KEY_FILE_ENV: str(missing)})
    short = tmp_path / "short.key"
    short.write_bytes(b"tooshort")
    with pytest.raises(ValueError, match=r"in MPCTL_STATE_KEY_FILE is too short \(8 bytes\)") as err:
        secret_from_env({STATE_KEY_FILE_ENV: str(short)})
    assert "tooshort" not in str(err.value)
    assert secret_from_env({}) is None
