"""Starting a service process in a test as `mpctl`'s stack starts it: connected as its own principal.

`mpctl` hands a service its password on standard input (mpctl/stack.py); a test that starts a service with its
own `subprocess` call gives it the same access through the environment instead (KAFKA_USERNAME,
KAFKA_PASSWORD_FILE, KAFKA_CA_FILE), the password in a file of a private temporary folder (mode 0700, removed
at exit): the form a container gets its password in (a mounted secret file).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mpctl.bus import write_private
from mpctl.infra import Endpoints
from mpctl.stack import process_principal
from shared.bus import ENV_CA_FILE, ENV_PASSWORD_FILE, ENV_USER


@functools.cache
def _folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="mpctl-test-bus-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def principal_env(endpoints: Endpoints, who: str) -> dict[str, str]:
    """The environment that makes a service connect as principal `who` (nothing without the broker's secrets)."""
    if endpoints.bus is None:
        return {}
    access = endpoints.principal(who)
    assert access.password is not None
    pw_file = _folder() / f"{who}.password"
    write_private(pw_file, access.password.get_secret_value().encode())
    return {ENV_USER: who, ENV_PASSWORD_FILE: str(pw_file), ENV_CA_FILE: str(endpoints.bus.ca_file)}


def service_env(endpoints: Endpoints, argv: Sequence[str]) -> dict[str, str]:
    """`principal_env` for the service started with `argv` (`services.<name> ... --namespace NS [--profile P]`)."""
    return principal_env(endpoints, process_principal(list(argv)))
