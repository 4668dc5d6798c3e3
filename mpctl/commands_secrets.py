"""`mpctl secrets`: the encrypted credentials store (services/execution/credentials.py).

- `mpctl secrets set PROFILE`: reads the values without echo (getpass) on a terminal; otherwise from stdin, as
  JSON ({"api_key", "secret", "passphrase"}, or a CDP key file's {"name", "privateKey"}) or as lines (api key,
  secret, passphrase; a PEM may be written on one line with \\n). `--cdp-key-file FILE` reads the JSON file
  Coinbase's developer platform downloads.
- `mpctl secrets list`: profile names and which fields are set; never a value, and no key is needed.
- `mpctl secrets remove PROFILE`, `mpctl secrets keygen PATH` (a random key file for MPCTL_SECRETS_KEY_FILE).
- `mpctl secrets export PROFILE --out DIR`: DIR/<profile>.enc (a store holding that profile's entry only) and
  DIR/<profile>.key (its new random key, mode 0600), the pair a container's execution worker is given.

The store's key: the key file of MPCTL_SECRETS_KEY_FILE (or /run/secrets/mpctl_secrets_key) when set, else a
passphrase (MPCTL_SECRETS_PASSPHRASE, or asked for without echo).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from services.execution.credentials import (
    ENV_KEY_FILE,
    ENV_PASSPHRASE,
    EXCHANGE_IDS,
    FIELDS,
    MOUNTED_KEY_FILE,
    CredentialsError,
    CredentialStore,
    KeySource,
    StoredCredentials,
    default_store_path,
    exchange_id_for,
    export_profile,
    key_format_problems,
    key_source_from_env,
    new_key_file,
    refuse_overwrite,
)


def register(sub: Any) -> None:
    p = sub.add_parser("secrets", help="encrypted credentials store (one entry per profile)")
    ss = p.add_subparsers(dest="secrets_command", required=True)

    s = ss.add_parser("set", help="store a profile's API credentials (values are read without echo)")
    s.add_argument("profile")
    _store_arg(s)
    s.add_argument(
        "--cdp-key-file", type=Path, default=None, help="the JSON key file downloaded from Coinbase (CDP)"
    )
    s.add_argument(
        "--exchange",
        choices=EXCHANGE_IDS,
        default=None,
        help="check the values for this API (default: by shape)",
    )
    s.add_argument("--force", action="store_true", help="store even when the key format looks wrong")
    s.set_defaults(handler=run_set)

    ls = ss.add_parser("list", help="profiles in the store and which fields are set (never values)")
    _store_arg(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=run_list)

    rm = ss.add_parser("remove", help="delete a profile's entry")
    rm.add_argument("profile")
    _store_arg(rm)
    rm.set_defaults(handler=run_remove)

    ex = ss.add_parser(
        "export",
        help="write DIR/<profile>.enc (that profile's entry only) and DIR/<profile>.key (its new key) for a container",
    )
    ex.add_argument("profile")
    ex.add_argument(
        "--out", type=Path, required=True, help="folder to write to (e.g. secrets, beside docker-compose.yml)"
    )
    _store_arg(ex)
    ex.add_argument(
        "--force", action="store_true", help="replace an existing export of this profile (store and key)"
    )
    ex.set_defaults(handler=run_export)

    kg = ss.add_parser("keygen", help=f"write a random key file (use it with {ENV_KEY_FILE})")
    kg.add_argument("path", type=Path)
    kg.set_defaults(handler=run_keygen)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None, help=f"store file (default: {default_store_path()})")


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _prompt_hidden(label: str) -> str:
    return getpass.getpass(label)


def _interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _new_store_source() -> KeySource:
    """Key source for a store that does not exist yet: key file when configured, else a confirmed passphrase."""
    if os.environ.get(ENV_KEY_FILE) or MOUNTED_KEY_FILE.exists():
        return key_source_from_env("key-file")
    if os.environ.get(ENV_PASSPHRASE):
        return KeySource.from_passphrase(os.environ[ENV_PASSPHRASE])
    if not _interactive():
        raise CredentialsError(
            f"a new store needs a key: set {ENV_KEY_FILE} (see `mpctl secrets keygen`) or {ENV_PASSPHRASE}, "
            "or run on a terminal to choose a passphrase"
        )
    first = _prompt_hidden("New passphrase for the credentials store: ")
    if len(first) < 12:
        raise CredentialsError("the passphrase must have at least 12 characters")
    if _prompt_hidden("Repeat the passphrase: ") != first:
        raise CredentialsError("the passphrases differ")
    return KeySource.from_passphrase(first)


def open_store(path: Path, *, create: bool) -> CredentialStore:
    if path.exists():
        store = CredentialStore.load(path)
        prompt = _prompt_hidden if _interactive() else None
        store.unlock(key_source_from_env(store.kdf_name, prompt=prompt))
        return store
    if not create:
        raise CredentialsError(f"no credentials store at {path}")
    return CredentialStore.create(path, _new_store_source())


def _unescape_pem(v: str) -> str:
    return v.replace("\\n", "\n") if v.startswith("-----BEGIN") and "\\n" in v else v


def _from_mapping(d: dict[str, Any]) -> dict[str, str]:
    if "name" in d and "privateKey" in d:  # CDP key file
        return {"api_key": str(d["name"]), "secret": str(d["privateKey"])}
    return {f: str(d[f]) for f in FIELDS if d.get(f)}


def read_values(args: argparse.Namespace) -> dict[str, str]:
    if args.cdp_key_file is not None:
        try:
            return _from_mapping(json.loads(args.cdp_key_file.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError):
            raise CredentialsError(
                f"{args.cdp_key_file} is not a readable CDP key file (JSON with name and privateKey)"
            ) from None
    if _interactive():
        vals = {
            "api_key": _prompt_hidden("API key (Advanced Trade: organizations/.../apiKeys/...): "),
            "secret": _prompt_hidden("Secret (a PEM key may be pasted on one line with \\n): "),
            "passphrase": _prompt_hidden("Passphrase (Exchange API keys only; empty for none): "),
        }
    else:
        text = sys.stdin.read()
        if text.lstrip().startswith("{"):
            try:
                vals = _from_mapping(json.loads(text))
            except ValueError:
                raise CredentialsError("stdin starts with '{' but is not valid JSON") from None
        else:
            lines = [line.strip() for line in text.splitlines()]
            vals = dict(zip(FIELDS, lines, strict=False))
    return {
        k: _unescape_pem(v.strip()) if k == "secret" else v.strip()
        for k, v in vals.items()
        if v and v.strip()
    }


def run_set(args: argparse.Namespace) -> int:
    path = args.store or default_store_path()
    try:
        vals = read_values(args)
        if not vals.get("api_key") or not vals.get("secret"):
            return _err("both an API key and a secret are needed; nothing was stored")
        creds = StoredCredentials(
            api_key=SecretStr(vals["api_key"]),
            secret=SecretStr(vals["secret"]),
            passphrase=SecretStr(vals["passphrase"]) if vals.get("passphrase") else None,
        )
        exchange = exchange_id_for(creds, args.exchange)
        problems = key_format_problems(exchange, creds)
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)
        if problems and not args.force:
            return _err(
                f"the values do not look like a {exchange} key (above); nothing stored (use --force to store anyway)"
            )
        store = open_store(path, create=True)
        store.put(args.profile, creds)
        store.save()
    except CredentialsError as err:
        return _err(str(err))
    print(f"stored {', '.join(creds.fields_set())} for {args.profile} ({exchange}) in {path}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    path = args.store or default_store_path()
    try:
        store = CredentialStore.load(path)
        profiles = store.profiles()
        kdf = store.kdf_name
    except CredentialsError as err:
        return _err(str(err))
    if args.json:
        print(
            json.dumps(
                {"store": str(path), "kdf": kdf, "profiles": {p: list(f) for p, f in profiles.items()}},
                indent=2,
            )
        )
        return 0
    print(f"store: {path} (key: {'passphrase, scrypt' if kdf == 'scrypt' else 'key file'})")
    if not profiles:
        print("no profiles")
    width = max((len(p) for p in profiles), default=0)
    for p, fields in profiles.items():
        print(f"{p.ljust(width)}  {', '.join(fields) or '(damaged entry)'}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    path = args.store or default_store_path()
    try:
        store = open_store(path, create=False)  # unlocking proves the right to change the store
        if not store.remove(args.profile):
            return _err(f"no entry for {args.profile} in {path}")
        store.save()
    except CredentialsError as err:
        return _err(str(err))
    print(f"removed {args.profile} from {path}")
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    try:
        new_key_file(args.path)
    except FileExistsError:
        return _err(f"{args.path} exists; not overwritten")
    except OSError as err:
        return _err(f"cannot write {args.path}: {err.strerror}")
    print(f"wrote a new key to {args.path} (mode 0600); use it with {ENV_KEY_FILE}={args.path}")
    return 0


def unlock_for_export(path: Path, profiles: list[str], out: Path, *, force: bool) -> CredentialStore:
    """The user's store, unlocked, once every profile is known to be in it and no export would be overwritten:
    the passphrase is asked for (as `set` asks) only when there is something to do."""
    store = CredentialStore.load(path)
    present = store.profiles()
    for profile in profiles:
        if profile not in present:
            raise CredentialsError(
                f"no entry for profile {profile!r} in {path} (profiles present: {', '.join(present) or 'none'}); "
                f"add it with `mpctl secrets set {profile}`"
            )
        if not force:
            refuse_overwrite(profile, out)
    prompt = _prompt_hidden if _interactive() else None
    store.unlock(key_source_from_env(store.kdf_name, prompt=prompt))
    return store


def run_export(args: argparse.Namespace) -> int:
    path = args.store or default_store_path()
    try:
        store = unlock_for_export(path, [args.profile], args.out, force=args.force)
        enc, key = export_profile(store, args.profile, args.out, force=args.force)
    except CredentialsError as err:
        return _err(str(err))
    except OSError as err:
        return _err(f"cannot write to {args.out}: {err.strerror}")
    print(f"wrote {enc} ({args.profile}'s entry only) and its new key {key} (mode 0600)")
    print(
        f"the execution worker of {args.profile} opens it with MPCTL_CREDENTIALS_STORE={enc} and the key mounted "
        f"at {MOUNTED_KEY_FILE} (or {ENV_KEY_FILE}={key}); keep both out of git and images"
    )
    return 0
