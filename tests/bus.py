"""Starting a service process in a test as `mpctl`'s stack starts it: connected as its own principal.

`mpctl` hands a service its password on standard input (mpctl/stack.py); a test that starts a service with its
own `subprocess` call gives it the same access through the environment instead (KAFKA_USERNAME,
KAFKA_PASSWORD_FILE, KAFKA_CA_FILE), the password in a file of a private temporary folder (mode 0700, removed
at exit): the form a container gets its password in (a mounted secret file).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mpctl.bus import BusSecrets, apply_bus, write_private
from mpctl.infra import ENV_BUS_DIR, Endpoints
from mpctl.stack import process_principal, state_key_env
from shared.bus import ENV_CA_FILE, ENV_PASSWORD_FILE, ENV_USER, KafkaAccess
from shared.config import AppConfig
from shared.kafka import ensure_topics
from shared.runtime import ENV_REDIS_AUTH
from shared.topics import declared_topics


@functools.cache
def _folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="mpctl-test-bus-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _bus(where: Endpoints | KafkaAccess) -> BusSecrets | None:
    if isinstance(where, Endpoints):
        return where.bus
    folder = os.environ.get(ENV_BUS_DIR)
    return BusSecrets(folder) if folder else None


def principal_env(where: Endpoints | KafkaAccess, who: str) -> dict[str, str]:
    """The environment that makes a service connect as principal `who` to the session's broker (`where`: its
    endpoints, or the admin's access; nothing without the broker's secrets)."""
    bus = _bus(where)
    if bus is None:
        return {}
    pw_file = _folder() / f"{who}.password"
    write_private(pw_file, bus.password(who).get_secret_value().encode())
    env = {ENV_USER: who, ENV_PASSWORD_FILE: str(pw_file), ENV_CA_FILE: str(bus.ca_file)}
    ns, service = (who.split(".") + [""])[:2]
    if service == "registry" and bus.redis_address() is not None:
        env[ENV_REDIS_AUTH] = "1"  # the bus's own Redis: as the principal there too
    # The namespace's snapshot key, as mpctl gives it to a stateful service (mpctl/stack.py state_key_env).
    env.update(state_key_env(bus, [f"services.{service}", "--namespace", ns], os.environ))
    return env


def service_env(where: Endpoints | KafkaAccess, argv: Sequence[str]) -> dict[str, str]:
    """`principal_env` for the service started with `argv` (`[python, -m,] services.<name> ... --namespace NS
    [--profile P]`)."""
    args = list(argv)
    while args and not args[0].startswith("services."):
        args.pop(0)
    return principal_env(where, process_principal(args))


async def create_namespace(admin: KafkaAccess, cfg: AppConfig, namespace: str | None = None) -> None:
    """A namespace's topics, and its principals and ACLs (as `mpctl demo` sets them up, mpctl/stack.py), on the
    session's broker (MPCTL_BUS_DIR, set by tests/conftest.py)."""
    ns = namespace or cfg.system.kafka.namespace
    await ensure_topics(admin, declared_topics(cfg, ns), replication_factor=1)
    await create_principals(admin, cfg, ns)


async def create_principals(admin: KafkaAccess, cfg: AppConfig, namespace: str) -> None:
    """A namespace's principals and ACLs alone (they outlive its topics, which a demo deletes at its end)."""
    folder = os.environ.get(ENV_BUS_DIR)
    if folder:
        await asyncio.to_thread(apply_bus, admin, BusSecrets(folder), cfg, namespace)
