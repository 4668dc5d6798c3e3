"""Encrypted credentials store: one entry per profile, each encrypted on its own.

File (JSON, default `~/.config/mpctl/credentials.enc`, mode 0600):

    {"format": "mpctl-credentials", "version": 1,
     "kdf": {"name": "scrypt", "salt": B64, "n": 32768, "r": 8, "p": 1}   or   {"name": "key-file"},
     "check": {"nonce": B64, "ciphertext": B64},
     "entries": {"<profile>": {"fields": ["api_key", "secret", ...], "nonce": B64, "ciphertext": B64}}}

- Master key: scrypt (memory-hard; n=2^15, r=8 -> 32 MiB) from a passphrase, or 32 raw bytes from a key file
  (`MPCTL_SECRETS_KEY_FILE`, or a secret mounted at /run/secrets/mpctl_secrets_key).
- Each entry has its own key, HKDF-SHA256(master, info = "mpctl-credentials/v1/entry/<profile>"), its own random
  96-bit nonce, and AES-256-GCM with associated data binding the profile id and the list of fields set. Opening
  profile X decrypts X's entry and nothing else; an entry copied under another profile's name, or a field list
  edited by hand, fails authentication.
- `check` is a fixed plaintext encrypted under the master key: a wrong passphrase is reported as such, distinct
  from a modified entry.
- `export_profile` writes a deployable copy of one entry: a store of the same format (`key-file` KDF) holding
  that entry only, under a new random key written beside it. A container gets that pair, so the execution worker
  of profile X can decrypt X's entry and has no ciphertext, and no key, for any other profile.

Nothing here logs or raises a value: errors name the profile and the field, never its content.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import re
import secrets as pysecrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeGuard

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydantic import SecretStr

from shared.config import PLACEHOLDER_PREFIX, Profile

log = logging.getLogger(__name__)

FORMAT = "mpctl-credentials"
VERSION = 1
FIELDS: tuple[str, ...] = ("api_key", "secret", "passphrase")
ENV_KEY_FILE = "MPCTL_SECRETS_KEY_FILE"
ENV_PASSPHRASE = "MPCTL_SECRETS_PASSPHRASE"
ENV_STORE = "MPCTL_CREDENTIALS_STORE"
MOUNTED_KEY_FILE = Path("/run/secrets/mpctl_secrets_key")
_CHECK_PLAINTEXT = b"mpctl-credentials key check v1"
_CHECK_AD = b"mpctl-credentials/v1/check"

ExchangeId = Literal["coinbase", "coinbaseexchange"]
EXCHANGE_IDS: tuple[ExchangeId, ...] = ("coinbase", "coinbaseexchange")


class CredentialsError(Exception):
    """A credentials problem, said without any secret value."""


class WrongKeyError(CredentialsError):
    pass


class TamperedError(CredentialsError):
    pass


class NoCredentialsError(CredentialsError):
    pass


class PlaintextRefusedError(CredentialsError):
    pass


class ExportExistsError(CredentialsError):
    pass


def default_store_path(env: Mapping[str, str] | None = None) -> Path:
    e = os.environ if env is None else env
    if e.get(ENV_STORE):
        return Path(e[ENV_STORE]).expanduser()
    base = Path(e["XDG_CONFIG_HOME"]).expanduser() if e.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "mpctl" / "credentials.enc"


# ------------------------------------------------------------------------------------------ values
@dataclass(frozen=True)
class StoredCredentials:
    """One profile's secret values. SecretStr keeps them out of repr, str, logs and tracebacks."""

    api_key: SecretStr
    secret: SecretStr
    passphrase: SecretStr | None = None

    def fields_set(self) -> tuple[str, ...]:
        return tuple(
            f for f in FIELDS if getattr(self, f) is not None and getattr(self, f).get_secret_value()
        )

    def _plaintext(self) -> bytes:
        return json.dumps({f: getattr(self, f).get_secret_value() for f in self.fields_set()}).encode()

    @classmethod
    def _from_plaintext(cls, data: bytes) -> StoredCredentials:
        d = json.loads(data)
        pp = d.get("passphrase")
        return cls(
            api_key=SecretStr(d["api_key"]),
            secret=SecretStr(d["secret"]),
            passphrase=SecretStr(pp) if pp else None,
        )


@dataclass(frozen=True)
class ScryptParams:
    n: int = 2**15
    r: int = 8
    p: int = 1


# What a store's header may ask of scrypt. The header is read before anything authenticates it, so an edited one
# (n = 2^40) would otherwise make the derivation allocate terabytes; the defaults sit well inside these bounds.
SCRYPT_MAX_N = 2**20
SCRYPT_MAX_R = 32
SCRYPT_MAX_P = 16
SCRYPT_MAX_MEMORY = 2**30  # bytes, 128 * n * r: 1 GiB (n = 2^20 with r = 8)
SCRYPT_SALT_BYTES = (8, 64)


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def scrypt_params(kdf: Mapping[str, Any]) -> tuple[bytes, int, int, int]:
    """(salt, n, r, p) of a scrypt header, or TamperedError naming the value out of bounds (no secret is in it)."""
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    if not _is_int(n) or not 2 <= n <= SCRYPT_MAX_N or n & (n - 1):
        raise TamperedError(
            f"scrypt n = {n!r} is out of bounds: a power of two from 2 to 2^20 ({SCRYPT_MAX_N}) is accepted"
        )
    if not _is_int(r) or not 1 <= r <= SCRYPT_MAX_R:
        raise TamperedError(
            f"scrypt r = {r!r} is out of bounds: an integer from 1 to {SCRYPT_MAX_R} is accepted"
        )
    if not _is_int(p) or not 1 <= p <= SCRYPT_MAX_P:
        raise TamperedError(
            f"scrypt p = {p!r} is out of bounds: an integer from 1 to {SCRYPT_MAX_P} is accepted"
        )
    if 128 * n * r > SCRYPT_MAX_MEMORY:
        raise TamperedError(
            f"scrypt n = {n} with r = {r} needs {128 * n * r // 2**20} MiB: more than the "
            f"{SCRYPT_MAX_MEMORY // 2**20} MiB accepted"
        )
    salt = kdf.get("salt")
    try:
        raw = base64.b64decode(salt, validate=True) if isinstance(salt, str) else None
    except (binascii.Error, ValueError):
        raw = None
    lo, hi = SCRYPT_SALT_BYTES
    if raw is None or not lo <= len(raw) <= hi:
        got = "not base64 text" if raw is None else f"{len(raw)} bytes"
        raise TamperedError(f"the scrypt salt is {got}: base64 of {lo} to {hi} bytes is accepted")
    return raw, n, r, p


class KeySource:
    """Where the master key comes from: a passphrase (scrypt) or a key file (32 bytes: raw, hex or base64)."""

    def __init__(
        self,
        kind: Literal["scrypt", "key-file"],
        *,
        passphrase: SecretStr | None = None,
        path: Path | None = None,
    ):
        self.kind = kind
        self._passphrase = passphrase
        self.path = path

    def __repr__(self) -> str:
        return f"KeySource({self.kind}{', ' + str(self.path) if self.path else ''})"

    @classmethod
    def from_passphrase(cls, passphrase: str | SecretStr) -> KeySource:
        pp = passphrase if isinstance(passphrase, SecretStr) else SecretStr(passphrase)
        if not pp.get_secret_value():
            raise CredentialsError("the passphrase is empty")
        return cls("scrypt", passphrase=pp)

    @classmethod
    def from_key_file(cls, path: str | Path) -> KeySource:
        return cls("key-file", path=Path(path))

    def master_key(self, kdf: Mapping[str, Any]) -> bytes:
        if self.kind == "key-file":
            assert self.path is not None
            return read_key_file(self.path)
        assert self._passphrase is not None
        salt, n, r, p = scrypt_params(kdf)  # bounded: never a derivation that exhausts the machine
        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(
            self._passphrase.get_secret_value().encode()
        )


def read_key_file(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as err:
        raise CredentialsError(f"cannot read the key file {path}: {err.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and not path.resolve().is_relative_to("/run/secrets"):
        log.warning("key file %s is readable by other users: chmod 600 it", path)
    if len(raw) == 32:
        return raw
    text = raw.strip()
    with contextlib.suppress(ValueError):
        if re.fullmatch(rb"[0-9a-fA-F]{64}", text):
            return bytes.fromhex(text.decode())
    with contextlib.suppress(binascii.Error, ValueError):
        key = base64.b64decode(text, validate=True)
        if len(key) == 32:
            return key
    raise CredentialsError(f"the key file {path} must hold a 32-byte key: raw, 64 hex digits or base64")


def new_key_file(path: Path) -> None:
    """Write a fresh random key (base64 text, mode 0600). Refuses to overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(pysecrets.token_bytes(32)).decode() + "\n")
        f.flush()
        os.fsync(f.fileno())


def key_source_from_env(
    kind: Literal["scrypt", "key-file"],
    *,
    env: Mapping[str, str] | None = None,
    prompt: Callable[[str], str] | None = None,
) -> KeySource:
    """The key source for a store of this kind, from the environment, a mounted secret, or a prompt."""
    e = os.environ if env is None else env
    if kind == "key-file":
        if e.get(ENV_KEY_FILE):
            return KeySource.from_key_file(Path(e[ENV_KEY_FILE]).expanduser())
        if MOUNTED_KEY_FILE.exists():
            return KeySource.from_key_file(MOUNTED_KEY_FILE)
        raise CredentialsError(
            f"this store is encrypted with a key file: set {ENV_KEY_FILE}=PATH or mount the key at {MOUNTED_KEY_FILE}"
        )
    if e.get(ENV_PASSPHRASE):
        return KeySource.from_passphrase(e[ENV_PASSPHRASE])
    if prompt is not None:
        return KeySource.from_passphrase(prompt("Passphrase of the credentials store: "))
    raise CredentialsError(
        f"this store is encrypted with a passphrase: run interactively, or set {ENV_PASSPHRASE} "
        f"(or re-create the store with a key file, {ENV_KEY_FILE})"
    )


# ------------------------------------------------------------------------------------------ store
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(s), validate=True)
    except (binascii.Error, ValueError):
        raise TamperedError(f"{what} is not valid base64 (file modified or corrupted)") from None


def _entry_ad(profile: str, fields: tuple[str, ...]) -> bytes:
    return f"mpctl-credentials/v1/entry|{profile}|{','.join(fields)}".encode()


class CredentialStore:
    """The store file. Listing needs no key; reading or writing an entry needs the store unlocked."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self._data = data
        self._master: bytes | None = None

    def __repr__(self) -> str:
        return f"CredentialStore({self.path}, kdf={self.kdf_name}, profiles={sorted(self.profiles())})"

    # -------------------------------------------------------------------------- open / create
    @classmethod
    def load(cls, path: str | Path) -> CredentialStore:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            raise CredentialsError(
                f"no credentials store at {p}: create it with `mpctl secrets set PROFILE`"
            ) from None
        except OSError as err:
            raise CredentialsError(f"cannot read the credentials store {p}: {err.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TamperedError(
                f"{p} is not a credentials store: byte 0x{raw[err.start]:02x} at offset {err.start} is not UTF-8 "
                "(file modified or corrupted)"
            ) from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise TamperedError(f"{p} is not a credentials store (not JSON)") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TamperedError(f"{p} is not a credentials store (format is not {FORMAT!r})")
        if data.get("version") != VERSION:
            raise CredentialsError(
                f"{p}: store version {data.get('version')!r} is not supported (this build reads {VERSION})"
            )
        if not isinstance(data.get("entries"), dict) or not isinstance(data.get("kdf"), dict):
            raise TamperedError(f"{p}: the store's structure is damaged")
        store = cls(p, data)
        if store.kdf_name == "scrypt":
            try:
                scrypt_params(data["kdf"])
            except TamperedError as err:
                raise TamperedError(f"{p}: {err} (file modified or corrupted)") from None
        return store

    @classmethod
    def create(
        cls, path: str | Path, source: KeySource, *, scrypt: ScryptParams | None = None
    ) -> CredentialStore:
        """A new, empty, unlocked store (written by `save`)."""
        if source.kind == "scrypt":
            # Parameters are stored so that they can be raised later without breaking old stores.
            sp = scrypt or ScryptParams()
            kdf: dict[str, Any] = {
                "name": "scrypt",
                "salt": _b64(pysecrets.token_bytes(16)),
                "n": sp.n,
                "r": sp.r,
                "p": sp.p,
            }
        else:
            kdf = {"name": "key-file"}
        store = cls(Path(path), {"format": FORMAT, "version": VERSION, "kdf": kdf, "entries": {}})
        master = source.master_key(kdf)
        nonce = pysecrets.token_bytes(12)
        ct = AESGCM(_subkey(master, "check")).encrypt(nonce, _CHECK_PLAINTEXT, _CHECK_AD)
        store._data["check"] = {"nonce": _b64(nonce), "ciphertext": _b64(ct)}
        store._master = master
        return store

    @classmethod
    def open_or_create(
        cls, path: str | Path, source: KeySource, *, scrypt: ScryptParams | None = None
    ) -> CredentialStore:
        p = Path(path)
        if p.exists():
            store = cls.load(p)
            store.unlock(source)
            return store
        return cls.create(p, source, scrypt=scrypt)

    @property
    def kdf_name(self) -> Literal["scrypt", "key-file"]:
        name = self._data["kdf"].get("name")
        if name not in ("scrypt", "key-file"):
            raise TamperedError(f"{self.path}: unknown key derivation {name!r}")
        return "scrypt" if name == "scrypt" else "key-file"

    def unlock(self, source: KeySource) -> None:
        if source.kind != self.kdf_name:
            raise WrongKeyError(
                f"{self.path} is encrypted with a {'passphrase' if self.kdf_name == 'scrypt' else 'key file'}, "
                f"but a {'passphrase' if source.kind == 'scrypt' else 'key file'} was given"
            )
        master = source.master_key(self._data["kdf"])
        check = self._data.get("check")
        if not isinstance(check, dict):
            raise TamperedError(f"{self.path}: the store's key check is missing or damaged")
        nonce = _unb64(check.get("nonce", ""), "the key check")
        ct = _unb64(check.get("ciphertext", ""), "the key check")
        try:
            ok = AESGCM(_subkey(master, "check")).decrypt(nonce, ct, _CHECK_AD) == _CHECK_PLAINTEXT
        except (InvalidTag, ValueError):
            ok = False
        if not ok:
            raise WrongKeyError(
                f"the passphrase or key file does not open {self.path} (or its header was modified)"
            )
        self._master = master

    @property
    def unlocked(self) -> bool:
        return self._master is not None

    # -------------------------------------------------------------------------- entries
    def profiles(self) -> dict[str, tuple[str, ...]]:
        """Profile -> names of the fields set. Needs no key and reveals no value."""
        out: dict[str, tuple[str, ...]] = {}
        for pid, entry in sorted(self._data["entries"].items()):
            fields = entry.get("fields") if isinstance(entry, dict) else None
            out[str(pid)] = tuple(str(f) for f in fields) if isinstance(fields, list) else ()
        return out

    def __contains__(self, profile: object) -> bool:
        return profile in self._data["entries"]

    def get(self, profile: str) -> StoredCredentials:
        """Decrypt this profile's entry, and only it."""
        master = self._require_master()
        entry = self._data["entries"].get(profile)
        if entry is None:
            raise NoCredentialsError(
                f"no credentials for profile {profile!r} in {self.path}: run `mpctl secrets set {profile}`"
            )
        if not isinstance(entry, dict) or not isinstance(entry.get("fields"), list):
            raise TamperedError(f"the entry of profile {profile!r} in {self.path} is damaged")
        fields = tuple(str(f) for f in entry["fields"])
        nonce = _unb64(entry.get("nonce", ""), f"the entry of profile {profile!r}")
        ct = _unb64(entry.get("ciphertext", ""), f"the entry of profile {profile!r}")
        try:
            plain = AESGCM(_subkey(master, f"entry/{profile}")).decrypt(nonce, ct, _entry_ad(profile, fields))
            creds = StoredCredentials._from_plaintext(plain)
        except (InvalidTag, ValueError, KeyError, TypeError):
            raise TamperedError(
                f"the entry of profile {profile!r} in {self.path} failed authentication: it was modified, "
                "corrupted or copied from another profile; set it again with `mpctl secrets set`"
            ) from None
        if creds.fields_set() != fields:
            raise TamperedError(f"the entry of profile {profile!r} does not hold the fields its header lists")
        return creds

    def put(self, profile: str, creds: StoredCredentials) -> None:
        master = self._require_master()
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,47}", profile):
            raise CredentialsError(
                f"{profile!r} is not a profile id (lower case letters, digits, _; as in the config)"
            )
        fields = creds.fields_set()
        if "api_key" not in fields or "secret" not in fields:
            raise CredentialsError(f"profile {profile!r}: api_key and secret are both required")
        nonce = pysecrets.token_bytes(12)  # random 96-bit nonce per encryption: never reused with a key
        ct = AESGCM(_subkey(master, f"entry/{profile}")).encrypt(
            nonce, creds._plaintext(), _entry_ad(profile, fields)
        )
        self._data["entries"][profile] = {
            "fields": list(fields),
            "nonce": _b64(nonce),
            "ciphertext": _b64(ct),
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def remove(self, profile: str) -> bool:
        return self._data["entries"].pop(profile, None) is not None

    def save(self) -> None:
        """Atomic write (temporary file, fsync, rename), mode 0600, folder 0700."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._data, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _require_master(self) -> bytes:
        if self._master is None:
            raise CredentialsError(f"{self.path} is locked: unlock it with its passphrase or key file first")
        return self._master


def export_paths(profile: str, folder: Path) -> tuple[Path, Path]:
    """Where `export_profile` writes: <folder>/<profile>.enc and <folder>/<profile>.key."""
    return folder / f"{profile}.enc", folder / f"{profile}.key"


def refuse_overwrite(profile: str, folder: Path) -> None:
    """ExportExistsError when an export of `profile` is already in `folder`."""
    existing = [str(p) for p in export_paths(profile, folder) if p.exists() or p.is_symlink()]
    if existing:
        raise ExportExistsError(
            f"{' and '.join(existing)} exist: not overwritten (use --force to replace both)"
        )


def export_profile(
    source: CredentialStore, profile: str, folder: str | Path, *, force: bool = False
) -> tuple[Path, Path]:
    """Write <folder>/<profile>.enc, a store holding only `profile`'s entry, encrypted under a new random key
    written to <folder>/<profile>.key (mode 0600). Returns both paths; prints and logs nothing.

    A new key for each export: the deployed pair opens this one entry and nothing else, and never the user's
    store. Existing files are kept unless `force` (then both are replaced: an old key must not outlive its store).
    """
    if profile not in source:
        present = ", ".join(source.profiles()) or "none"
        raise NoCredentialsError(
            f"no entry for profile {profile!r} in {source.path} (profiles present: {present})"
        )
    enc, key = export_paths(profile, Path(folder))
    if not force:
        refuse_overwrite(profile, Path(folder))
    return _write_export(profile, source.get(profile), enc, key)  # decrypts this profile's entry only


def export_empty(profile: str, folder: str | Path) -> tuple[Path, Path]:
    """The export of a profile that has no credentials yet: a store with no entry and its own new key. Paper mode
    never opens it; live mode refuses to start with the command that adds the entry. Never overwrites."""
    enc, key = export_paths(profile, Path(folder))
    refuse_overwrite(profile, Path(folder))
    return _write_export(profile, None, enc, key)


def _write_export(profile: str, creds: StoredCredentials | None, enc: Path, key: Path) -> tuple[Path, Path]:
    enc.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Both files are written in a private temporary folder and renamed at the end: a failure while writing
    # (disk full, interrupt) leaves the old pair, if any, untouched.
    work = Path(tempfile.mkdtemp(prefix=f".{profile}-export-", dir=enc.parent))
    try:
        tmp_key = work / "key"
        new_key_file(tmp_key)
        out = CredentialStore.create(work / "store", KeySource.from_key_file(tmp_key))
        if creds is not None:
            out.put(profile, creds)
        out.save()
        os.replace(work / "store", enc)
        os.replace(tmp_key, key)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return enc, key


def _subkey(master: bytes, purpose: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=f"mpctl-credentials/v1/{purpose}".encode()
    ).derive(master)


# ------------------------------------------------------------------------------------------ exchange choice
_CDP_KEY_NAME = re.compile(r"^organizations/[^/\s]+/apiKeys/[^/\s]+$")


def exchange_id_for(
    creds: StoredCredentials | ResolvedCredentials, explicit: str | None = None
) -> ExchangeId:
    """The ccxt exchange of a profile: the explicit setting when given, else from the credentials' shape
    (a passphrase means the Exchange API; a CDP key name or PEM secret means Advanced Trade)."""
    if explicit is not None:
        if explicit not in EXCHANGE_IDS:
            raise CredentialsError(f"exchange {explicit!r} is not supported; use one of {list(EXCHANGE_IDS)}")
        return "coinbase" if explicit == "coinbase" else "coinbaseexchange"
    if creds.passphrase is not None and creds.passphrase.get_secret_value():
        return "coinbaseexchange"
    return "coinbase"


def key_format_problems(exchange: ExchangeId, creds: StoredCredentials | ResolvedCredentials) -> list[str]:
    """What is wrong with the shape of the credentials, said without their values (empty: looks right)."""
    key = creds.api_key.get_secret_value().strip()
    secret = creds.secret.get_secret_value().strip()
    problems: list[str] = []
    if exchange == "coinbase":
        if key.startswith("-----BEGIN"):
            problems.append(
                "api_key holds a PEM key; it must be the key *name* organizations/<org>/apiKeys/<id>"
            )
        elif not _CDP_KEY_NAME.match(key):
            problems.append("api_key is not a CDP key name of the form organizations/<org>/apiKeys/<id>")
        if "\\n" in secret and "\n" not in secret:
            problems.append("secret holds literal \\n sequences: paste the PEM with real line breaks")
        elif secret.startswith("-----BEGIN"):
            problems.extend(_pem_problems(secret))
        else:
            try:
                raw = base64.b64decode(secret, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != 64:
                problems.append(
                    "secret is neither an EC private key in PEM (the PEM block Coinbase's CDP key file holds) "
                    "nor a base64 Ed25519 key of 64 bytes"
                )
        if creds.passphrase is not None and creds.passphrase.get_secret_value():
            problems.append(
                "a passphrase is set, but Advanced Trade (CDP) keys have none: is this an Exchange API key?"
            )
    else:
        if not key or "/" in key:
            problems.append(
                "api_key does not look like a Coinbase Exchange API key (a CDP key name belongs to 'coinbase')"
            )
        try:
            base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            problems.append("secret is not base64 (Coinbase Exchange API secrets are base64 text)")
        if creds.passphrase is None or not creds.passphrase.get_secret_value():
            problems.append("the Exchange API needs the key's passphrase, and none is set")
    return problems


def _pem_problems(pem: str) -> list[str]:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        return ["secret is a PEM block that does not load as an unencrypted private key"]
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        return ["secret is a private key, but not an EC P-256 key (ES256) as Coinbase issues"]
    return []


# ------------------------------------------------------------------------------------------ resolution
@dataclass(frozen=True)
class ResolvedCredentials:
    profile_id: str
    api_key: SecretStr
    secret: SecretStr
    passphrase: SecretStr | None
    sandbox: bool
    exchange: ExchangeId
    source: Literal["store", "yaml"]

    def values(self) -> list[str]:
        """Every secret value, for redaction of text that may contain one."""
        vals = [self.api_key.get_secret_value(), self.secret.get_secret_value()]
        if self.passphrase is not None:
            vals.append(self.passphrase.get_secret_value())
        return [v for v in vals if v]


PLAINTEXT_WHY = (
    "credentials written in a YAML file end up in backups, editor swap files, diffs and version control, "
    "readable by anyone who can read the file"
)


def _yaml_has_values(profile: Profile) -> bool:
    c = profile.api_credentials
    vals = [c.api_key, c.secret] + ([c.passphrase] if c.passphrase else [])
    return any(v.get_secret_value() and not v.get_secret_value().startswith(PLACEHOLDER_PREFIX) for v in vals)


def resolve_credentials(
    profile_id: str, profile: Profile, store: CredentialStore | None, allow_plaintext: bool
) -> ResolvedCredentials:
    """The credentials profile X's execution worker trades with, in live mode.

    1. The encrypted store's entry for X (only X's entry is decrypted). YAML values, if any, are ignored (warned).
    2. Else real values in the YAML: refused unless `allow_plaintext`, with the reason and the way out.
    3. Else (placeholders only): no credentials, with the command that adds them.
    """
    yaml_creds = profile.api_credentials
    explicit = getattr(yaml_creds, "exchange", None)  # the optional `exchange:` profile setting, when present
    if store is not None and profile_id in store:
        stored = store.get(profile_id)
        if _yaml_has_values(profile):
            log.warning(
                "profiles.%s.api_credentials holds values in the YAML as well; the encrypted store's entry is used. "
                "Replace the YAML values with placeholders.",
                profile_id,
            )
        return ResolvedCredentials(
            profile_id=profile_id,
            api_key=stored.api_key,
            secret=stored.secret,
            passphrase=stored.passphrase,
            sandbox=yaml_creds.sandbox,
            exchange=exchange_id_for(stored, explicit),
            source="store",
        )
    if _yaml_has_values(profile):
        if not allow_plaintext:
            raise PlaintextRefusedError(
                f"profiles.{profile_id}.api_credentials: live mode refuses plaintext credentials in the YAML, because "
                f"{PLAINTEXT_WHY}. Move them to the encrypted store with `mpctl secrets set {profile_id}` and put "
                f"placeholders ({PLACEHOLDER_PREFIX}...) in the YAML, or accept the risk with --allow-plaintext-credentials."
            )
        log.warning(
            "profile %s trades with plaintext credentials from the YAML (--allow-plaintext-credentials)",
            profile_id,
        )
        yc = StoredCredentials(yaml_creds.api_key, yaml_creds.secret, yaml_creds.passphrase)
        return ResolvedCredentials(
            profile_id=profile_id,
            api_key=yaml_creds.api_key,
            secret=yaml_creds.secret,
            passphrase=yaml_creds.passphrase
            if yaml_creds.passphrase and yaml_creds.passphrase.get_secret_value()
            else None,
            sandbox=yaml_creds.sandbox,
            exchange=exchange_id_for(yc, explicit),
            source="yaml",
        )
    where = f"the store {store.path}" if store is not None else "an encrypted store (none was found)"
    raise NoCredentialsError(
        f"no credentials for profile {profile_id!r}: the YAML holds placeholders and {where} has no entry; "
        f"run `mpctl secrets set {profile_id}` (for a container, then `mpctl secrets export {profile_id} --out secrets`)"
    )


def redactor(values: list[str]) -> Callable[[str], str]:
    """A function that masks every given value in a text; a multi-line value (a PEM key) line by line too."""
    pieces = set(values) | {
        line.strip() for v in values for line in v.splitlines() if len(line.strip()) >= 16
    }
    needles = sorted({v for v in pieces if len(v) >= 4}, key=len, reverse=True)

    def redact(text: str) -> str:
        for v in needles:
            if v in text:
                text = text.replace(v, "***")
        return text

    return redact
