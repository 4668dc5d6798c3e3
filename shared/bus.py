"""How a client reaches the broker: its servers and, on an authenticated bus, its principal's credentials.

The bus authenticates every client with SASL/SCRAM-SHA-512 over TLS (docs/operations.md, "The bus"): one
principal per service instance kind, each with its own password, and the broker's ACLs decide what each may
read and write (shared/principals.py). `KafkaAccess` is what every Kafka client of the project is built from
(`client_options()` for aiokafka), so no client connects in any other way. A password never appears in
`repr`, `str`, a log line or an error (SecretStr).
"""

from __future__ import annotations

import functools
import ssl
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

SASL_MECHANISM = "SCRAM-SHA-512"
# The environment a process may take its bus access from (`mpctl infra up` prints them; compose and the k8s
# manifests set them, the password as a mounted secret file).
ENV_SERVERS = "KAFKA_BOOTSTRAP_SERVERS"
ENV_USER = "KAFKA_USERNAME"
ENV_PASSWORD_FILE = "KAFKA_PASSWORD_FILE"
ENV_CA_FILE = "KAFKA_CA_FILE"
# The longest password file read: a principal's password is 43 characters; anything much longer is a mistake.
MAX_PASSWORD_BYTES = 1024


class BusAccessError(ValueError):
    """Bus credentials that cannot be used; said without the secret."""


class KafkaAccess(BaseModel):
    """The broker's servers and the principal a client authenticates as (none: an unauthenticated broker, which
    only a broker the user points at explicitly can be; every broker this project starts requires a principal)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    servers: str = Field(min_length=1)
    username: str | None = Field(default=None, min_length=1, max_length=128)
    password: SecretStr | None = None
    # The CA that signed the broker's certificate; None: the system's trust store.
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> KafkaAccess:
        if (self.username is None) != (self.password is None):
            given = "a user name" if self.username is not None else "a password"
            raise ValueError(f"bus access for {self.servers}: {given} without the other")
        if self.password is not None and not self.password.get_secret_value():
            raise ValueError(f"bus access for {self.servers} as {self.username!r}: the password is empty")
        return self

    @property
    def protocol(self) -> Literal["SASL_SSL", "PLAINTEXT"]:
        return "SASL_SSL" if self.username is not None else "PLAINTEXT"

    @property
    def authenticated(self) -> bool:
        return self.username is not None

    def __str__(self) -> str:
        return f"{self.servers} as {self.username}" if self.username else f"{self.servers} (unauthenticated)"

    def as_principal(self, username: str, password: SecretStr) -> KafkaAccess:
        """The same broker reached as another principal."""
        return self.model_copy(update={"username": username, "password": password})

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.authenticated:
            return None
        return _ssl_context(str(self.ca_file) if self.ca_file is not None else None)

    def client_options(self) -> dict[str, Any]:
        """aiokafka's connection options (`bootstrap_servers` and security) for a producer, consumer or admin."""
        opts: dict[str, Any] = {"bootstrap_servers": self.servers}
        if self.username is not None and self.password is not None:
            opts.update(
                security_protocol="SASL_SSL",
                sasl_mechanism=SASL_MECHANISM,
                sasl_plain_username=self.username,
                sasl_plain_password=self.password.get_secret_value(),
                ssl_context=self.ssl_context(),
            )
        return opts

    def librdkafka_options(self) -> dict[str, str]:
        """The same access in librdkafka's terms (confluent-kafka's admin client: ACLs and SCRAM users)."""
        conf = {"bootstrap.servers": self.servers}
        if self.username is not None and self.password is not None:
            conf.update(
                {
                    "security.protocol": "SASL_SSL",
                    "sasl.mechanism": SASL_MECHANISM,
                    "sasl.username": self.username,
                    "sasl.password": self.password.get_secret_value(),
                }
            )
            if self.ca_file is not None:
                conf["ssl.ca.location"] = str(self.ca_file)
        return conf


def redis_credentials(access: KafkaAccess, redis_auth: bool) -> dict[str, Any]:
    """redis-py's `username`/`password` of the principal `access` names, when Redis authenticates its clients
    (the same password as on the bus); empty otherwise."""
    if not redis_auth or access.username is None or access.password is None:
        return {}
    return {"username": access.username, "password": access.password.get_secret_value()}


@functools.lru_cache(maxsize=16)
def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    # One context per CA in a process: building one reads the CA file and the system store.
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as err:
        raise BusAccessError(f"cannot load the bus CA certificate {ca_file!r}: {err}") from None
    return ctx


def read_password_file(path: str | Path) -> SecretStr:
    """A principal's password from a file (a mounted secret), or from standard input when `path` is "-" (how
    `mpctl` hands a service process its password: never in its arguments, environment or on disk)."""
    if str(path) == "-":
        raw = sys.stdin.buffer.read(MAX_PASSWORD_BYTES + 1)
        where = "standard input"
    else:
        where = str(path)
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_PASSWORD_BYTES + 1)
        except OSError as err:
            raise BusAccessError(f"cannot read the bus password file {where}: {err.strerror}") from None
    if len(raw) > MAX_PASSWORD_BYTES:
        raise BusAccessError(f"the bus password in {where} is longer than {MAX_PASSWORD_BYTES} bytes")
    try:
        text = raw.decode().strip()
    except UnicodeDecodeError:
        raise BusAccessError(f"the bus password in {where} is not UTF-8 text") from None
    if not text:
        raise BusAccessError(f"the bus password in {where} is empty")
    return SecretStr(text)
