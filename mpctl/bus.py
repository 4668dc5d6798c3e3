"""The secrets and the administration of a bus this project runs (`mpctl infra up`, the demo, `mpctl run`).

`BusSecrets` is one folder (mode 0700, every file 0600):

- `master.key`: 32 random bytes, created on the first start. Every principal's password is derived from it
  (HKDF-SHA256 with the principal's name and generation), so no password is stored anywhere: the broker keeps
  only salted SCRAM verifiers, and `mpctl` derives a password when it starts a service and hands it over on
  the service's standard input. Rotating a principal bumps its generation (`generations.json`, not secret): the
  next `apply_bus` gives the broker the new verifier and the old password stops working.
- `ca.crt`, `ca.key`, `broker.pem`: a private CA and the broker's TLS key and certificate for its host names.
  Clients trust `ca.crt` only.

`apply_bus` gives the broker a namespace's principals (SCRAM users) and their ACLs (shared/principals.py),
through the admin principal, a super user that no service ever gets. Nothing here logs or raises a password.

The Redis `mpctl infra up` runs belongs to the same folder (`redis.json`: where it listens, not secret): its
`default` user is off, its `admin` user has the broker admin's password, and `apply_bus` also gives it the
namespace's Redis user (`shared.principals.redis_users`: the registry's, the only service that uses Redis), with
its principal's bus password: it authenticates to Redis exactly as to the broker, with the one password `mpctl`
hands it. Redis keeps only SHA-256 digests of these passwords (`#<hex>` rules), in its ACL file.

- `state/<namespace>.key`: the namespace's snapshot key (`state_key_file`), derived from the master key.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets as pysecrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

from shared.bus import KafkaAccess
from shared.config import AppConfig
from shared.principals import ADMIN, Acl, acls, principals, redis_users

# The broker's controller listener authenticates the controller itself (PLAIN, loopback only).
CONTROLLER = "controller"
SCRAM_ITERATIONS = 8192
CERT_DAYS = 3650
_PASSWORD_INFO = "mpctl-bus/v1/password"
_STATE_KEY_INFO = "mpctl-bus/v1/state-key"


class BusError(RuntimeError):
    """A bus set-up problem, said without any secret."""


def write_private(path: Path, data: bytes) -> None:
    """Atomic write, mode 0600 from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class BusSecrets:
    """The secrets folder of one broker (see the module docstring). Holds the path only: every secret is read
    from the folder when needed."""

    folder: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    @property
    def master_file(self) -> Path:
        return self.folder / "master.key"

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key_file(self) -> Path:
        return self.folder / "ca.key"

    @property
    def broker_pem(self) -> Path:
        return self.folder / "broker.pem"

    @property
    def generations_file(self) -> Path:
        return self.folder / "generations.json"

    @property
    def redis_file(self) -> Path:
        return self.folder / "redis.json"

    def record_redis(self, host: str, port: int) -> None:
        """The Redis whose users this folder's passwords are (`mpctl infra up`'s)."""
        write_private(self.redis_file, json.dumps({"host": host, "port": port}).encode() + b"\n")

    def redis_address(self) -> tuple[str, int] | None:
        """(host, port) of the Redis this folder secures; None: none."""
        try:
            data = json.loads(self.redis_file.read_text())
            return str(data["host"]), int(data["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def owns_redis(self, url: str) -> bool:
        """Whether `url` is this folder's Redis (its clients then authenticate as their principal)."""
        from urllib.parse import urlsplit

        address = self.redis_address()
        if address is None:
            return False
        try:
            parts = urlsplit(url)
            return (parts.hostname, parts.port or 6379) == address
        except ValueError:
            return False

    def exists(self) -> bool:
        return self.master_file.is_file() and self.ca_file.is_file() and self.broker_pem.is_file()

    def ensure(self, hosts: Sequence[str]) -> None:
        """Create what is missing: the master key, the CA, the broker's certificate for `hosts`."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        if not self.master_file.is_file():
            write_private(self.master_file, base64.b64encode(pysecrets.token_bytes(32)) + b"\n")
        if not (self.ca_file.is_file() and self.ca_key_file.is_file()):
            self._new_ca()
        if not self.broker_pem.is_file() or not self._covers(hosts):
            self._new_broker_cert(hosts)

    def _master(self) -> bytes:
        try:
            raw = self.master_file.read_bytes()
        except OSError as err:
            raise BusError(f"cannot read the bus master key {self.master_file}: {err.strerror}") from None
        try:
            key = base64.b64decode(raw.strip(), validate=True)
        except ValueError:
            raise BusError(f"{self.master_file} is not a bus master key (base64 of 32 bytes)") from None
        if len(key) != 32:
            raise BusError(f"{self.master_file} holds {len(key)} bytes, not 32")
        return key

    def generation(self, principal: str) -> int:
        return self._generations().get(principal, 0)

    def _generations(self) -> dict[str, int]:
        if not self.generations_file.is_file():
            return {}
        try:
            data = json.loads(self.generations_file.read_text())
        except (OSError, ValueError) as err:
            raise BusError(f"cannot read {self.generations_file}: {err}") from None
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise BusError(f"{self.generations_file} is not a map of principal to generation")
        return {str(k): int(v) for k, v in data.items()}

    def rotate(self, principal: str) -> int:
        """The principal's next generation (its password changes); `apply_bus` then gives it to the broker."""
        gens = self._generations()
        gens[principal] = gens.get(principal, 0) + 1
        write_private(self.generations_file, json.dumps(gens, indent=1, sort_keys=True).encode() + b"\n")
        return gens[principal]

    def password(self, principal: str) -> SecretStr:
        info = f"{_PASSWORD_INFO}/{principal}/{self.generation(principal)}".encode()
        raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._master())
        return SecretStr(base64.urlsafe_b64encode(raw).decode().rstrip("="))

    def state_key_file(self, namespace: str) -> Path:
        """The file of a namespace's snapshot key (shared/snapshots.py, MPCTL_STATE_KEY_FILE), derived from the
        master key (so the same on every start: a restart verifies the snapshots it wrote before), written
        0600 in this folder. Services that keep state are given its path, never the key itself."""
        path = self.folder / "state" / f"{namespace}.key"
        info = f"{_STATE_KEY_INFO}/{namespace}".encode()
        raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(self._master())
        key = raw.hex().encode()
        if not path.exists() or path.read_bytes() != key:
            write_private(path, key)
        return path

    def access(self, servers: str, principal: str) -> KafkaAccess:
        """How `principal` reaches the broker at `servers`."""
        return KafkaAccess(
            servers=servers, username=principal, password=self.password(principal), ca_file=self.ca_file
        )

    # ---- TLS

    def _new_ca(self) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mpctl bus CA")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        write_private(self.ca_key_file, _pkcs8(key))
        write_private(self.ca_file, cert.public_bytes(serialization.Encoding.PEM))
        self.broker_pem.unlink(missing_ok=True)  # signed by the old CA, if any

    def _covers(self, hosts: Sequence[str]) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(self.broker_pem.read_bytes())
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (OSError, ValueError, x509.ExtensionNotFound):
            return False
        names = {str(n) for n in san.get_values_for_type(x509.DNSName)}
        names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        return set(hosts) <= names

    def _new_broker_cert(self, hosts: Sequence[str]) -> None:
        ca_key = serialization.load_pem_private_key(self.ca_key_file.read_bytes(), password=None)
        if not isinstance(ca_key, rsa.RSAPrivateKey):
            raise BusError(f"{self.ca_key_file} is not the bus CA's RSA key")
        ca = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        sans: list[x509.GeneralName] = []
        for h in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mpctl bus broker")]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        # Kafka's PEM key store: the unencrypted PKCS#8 key, then the certificate chain, in one file.
        write_private(self.broker_pem, _pkcs8(key) + cert.public_bytes(serialization.Encoding.PEM))


def _pkcs8(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# ------------------------------------------------------------------------------------------ administration


@dataclass(frozen=True)
class Applied:
    users: int
    acls: int
    redis_users: int = 0


def apply_bus(
    admin: KafkaAccess,
    secrets: BusSecrets,
    cfg: AppConfig,
    namespace: str,
    *,
    redis_address: tuple[str, int] | None = None,
) -> Applied:
    """Give the broker every principal of `namespace` (its current password's SCRAM verifier) and the
    namespace's ACL set, and the Redis of the folder (or at `redis_address`: the compose stack's, which its
    secrets folder does not record) the namespace's Redis users. Idempotent: what exists already is set again.
    Blocking (librdkafka's admin client)."""
    names = principals(cfg, namespace)
    set_users(admin, secrets, names)
    rules = acls(cfg, namespace)
    create_acls(admin, rules)
    redis_users_set = 0
    if redis_address is not None or secrets.redis_address() is not None:
        redis_users_set = apply_redis(secrets, cfg, namespace, address=redis_address)
    return Applied(users=len(names), acls=len(rules), redis_users=redis_users_set)


def redis_password_rule(password: SecretStr) -> str:
    """An ACL rule giving a Redis user `password` by its SHA-256 digest (the plain text never reaches Redis)."""
    return "#" + hashlib.sha256(password.get_secret_value().encode()).hexdigest()


def redis_acl_file(secrets: BusSecrets, existing: str = "") -> str:
    """The ACL file a Redis of this folder starts with: `default` off, `admin` with the admin's password, and
    the users `existing` (the file as Redis last saved it) holds besides those two."""
    keep = [
        ln
        for ln in existing.splitlines()
        if ln.strip() and not ln.startswith(("user default ", f"user {ADMIN} "))
    ]
    admin = f"user {ADMIN} on {redis_password_rule(secrets.password(ADMIN))} ~* &* +@all"
    return "\n".join(["user default off resetchannels -@all", admin, *keep]) + "\n"


def redis_admin(
    secrets: BusSecrets, *, timeout: float = 10.0, address: tuple[str, int] | None = None
) -> object:
    """A (blocking) redis-py client to this folder's Redis (or the one at `address`) as its admin."""
    import redis

    address = address or secrets.redis_address()
    if address is None:
        raise BusError(f"no Redis recorded in {secrets.folder}")
    return redis.Redis(
        host=address[0],
        port=address[1],
        username=ADMIN,
        password=secrets.password(ADMIN).get_secret_value(),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


def apply_redis(
    secrets: BusSecrets,
    cfg: AppConfig,
    namespace: str,
    only: Iterable[str] | None = None,
    *,
    address: tuple[str, int] | None = None,
) -> int:
    """Give the folder's Redis (or the one at `address`) the namespace's users (their current passwords;
    `only`: those of these principals), then save its ACL file so that a restart keeps them. Idempotent.
    Returns how many users."""
    import redis

    client = redis_admin(secrets, address=address)
    assert isinstance(client, redis.Redis)
    wanted = None if only is None else set(only)
    users = [u for u in redis_users(cfg, namespace) if wanted is None or u.name in wanted]
    if not users:
        client.close()
        return 0
    try:
        for u in users:
            rules = [*u.rules(), "on", redis_password_rule(secrets.password(u.name))]
            client.execute_command("ACL", "SETUSER", u.name, *rules)  # type: ignore[no-untyped-call]
        if only is None:
            # Users of the namespace it no longer has (the snapshot keepers' of an earlier version): gone.
            keep = {u.name for u in users}
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in client.acl_users()]
            stale = [n for n in names if n.startswith(f"{namespace}.") and n not in keep]
            if stale:
                client.acl_deluser(*stale)
        client.acl_save()
    except redis.RedisError as err:
        raise BusError(f"setting the Redis users of {namespace}: {type(err).__name__}: {err}") from None
    finally:
        client.close()
    return len(users)


def _admin_client(admin: KafkaAccess) -> object:
    from confluent_kafka.admin import AdminClient

    # librdkafka logs to stderr by itself; its lines name brokers and errors, never the SASL password.
    return AdminClient({**admin.librdkafka_options(), "log_level": 3})


def set_users(admin: KafkaAccess, secrets: BusSecrets, names: Iterable[str]) -> None:
    from confluent_kafka.admin import (
        AdminClient,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    client = _admin_client(admin)
    assert isinstance(client, AdminClient)
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    todo = [
        UserScramCredentialUpsertion(n, info, secrets.password(n).get_secret_value().encode()) for n in names
    ]
    if not todo:
        return
    futures = client.alter_user_scram_credentials(todo, request_timeout=30)
    _wait(futures, "setting the SCRAM credentials of")


def create_acls(admin: KafkaAccess, rules: Sequence[Acl]) -> None:
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    client = _admin_client(admin)
    assert isinstance(client, AdminClient)
    kinds = {"topic": ResourceType.TOPIC, "group": ResourceType.GROUP}
    ops = {"read": AclOperation.READ, "write": AclOperation.WRITE, "describe": AclOperation.DESCRIBE}
    bindings = [
        AclBinding(
            kinds[r.resource],
            r.name,
            ResourcePatternType.PREFIXED if r.pattern == "prefixed" else ResourcePatternType.LITERAL,
            f"User:{r.principal}",
            "*",
            ops[r.operation],
            AclPermissionType.ALLOW,
        )
        for r in rules
    ]
    if bindings:
        _wait(client.create_acls(bindings, request_timeout=30), "creating the ACL")


def _wait(futures: dict[object, object], what: str) -> None:
    from concurrent.futures import Future

    from confluent_kafka import KafkaException

    failed: list[str] = []
    for key, fut in futures.items():
        assert isinstance(fut, Future)
        try:
            fut.result(timeout=60)
        except KafkaException as err:
            failed.append(f"{key}: {err.args[0].str() if err.args else err}")
        except TimeoutError:
            failed.append(f"{key}: no answer within 60 s")
    if failed:
        more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
        raise BusError(f"{what} {'; '.join(failed[:3])}{more}")


def admin_access(servers: str, secrets: BusSecrets) -> KafkaAccess:
    return secrets.access(servers, ADMIN)
