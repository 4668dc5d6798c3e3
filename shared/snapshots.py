"""Durable state: signed snapshots of a service's state with the input offsets they cover.

Every input topic but the compacted ones keeps 7 days, so a service cannot rebuild a weeks-long run by
re-reading its inputs from the beginning. A stateful service therefore writes, every `snapshot_interval_s`
(or `snapshot_every_messages` inputs) and on a clean stop, one record to its compacted state topic
(`<ns>.state.<service>[.<profile>]`, shared/topics.py): its domain state, serialised, and the exact position
(topic, partition -> next offset) of every input partition that state covers, taken after the outputs of those
inputs were acknowledged. On start it loads the newest record, restores the state and resumes each input
partition at the covered offset; with no usable snapshot it reads its inputs from the beginning, as before.

Wire form (one Kafka record):

    b"MPS1" | HMAC-SHA256(key, rest) (32 bytes) | rest
    rest = header length (4 bytes, big endian) | header (JSON) | zlib(pickle(state))

The header (service, state schema version, config fingerprint, positions, time) is read only after the MAC
checks, and the state is unpickled only after the header matches the running service: a snapshot of another
service, of an older state schema or of another configuration is ignored with a log line (the service then
rebuilds from what its inputs still hold). The unpickler also refuses every class outside this code base's
modules and a few standard containers (defence in depth: the MAC is what makes the bytes trusted).

The key is per namespace: HMAC-SHA256(secret, "mpctl-state|" + namespace), the secret from the file named by
`MPCTL_STATE_KEY_FILE` (a mounted secret; `mpctl` derives one per namespace from its bus master key,
mpctl/bus.py state_key_file) or env `MPCTL_STATE_KEY`. Without one a service keeps no snapshots and says so.
docs/architecture.md, "Durable state", has the threat model.
"""

from __future__ import annotations

import asyncio
import contextlib
import copyreg
import gc
import hashlib
import hmac
import io
import logging
import os
import pickle
import random
import struct
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from shared.bus import KafkaAccess
from shared.topics import STATE_MAX_MESSAGE_BYTES

log = logging.getLogger("snapshots")

MAGIC = b"MPS1"
FORMAT_VERSION = 1
KEY_ENV = "MPCTL_STATE_KEY"
KEY_FILE_ENV = "MPCTL_STATE_KEY_FILE"
MIN_SECRET_BYTES = 16

Positions = dict[tuple[str, int], int]


class SnapshotRefused(ValueError):
    """A snapshot that must not be used (bad signature, another service, schema or configuration)."""


# ------------------------------------------------------------------------------------------------- keys
def derive_key(secret: bytes, namespace: str) -> bytes:
    return hmac.new(secret, f"mpctl-state|{namespace}".encode(), hashlib.sha256).digest()


def secret_from_env(env: Mapping[str, str] | None = None) -> bytes | None:
    """The state secret the environment names (the file first), None when it names none. A file that cannot be
    read, or a secret shorter than MIN_SECRET_BYTES, is an error naming the variable (never the secret)."""
    e = os.environ if env is None else env
    if e.get(KEY_FILE_ENV):
        try:
            secret = Path(e[KEY_FILE_ENV]).read_bytes().strip()
        except OSError as err:
            raise ValueError(
                f"{KEY_FILE_ENV}={e[KEY_FILE_ENV]}: cannot read the state key: {err.strerror}"
            ) from None
        where = KEY_FILE_ENV
    elif e.get(KEY_ENV):
        secret, where = e[KEY_ENV].encode(), KEY_ENV
    else:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the state key in {where} is too short ({len(secret)} bytes); use at least {MIN_SECRET_BYTES}"
        )
    return secret


def load_state_key(namespace: str, env: Mapping[str, str] | None = None) -> bytes | None:
    """The namespace's snapshot key, from the environment. None when it gives none: the service then keeps no
    snapshots (it rebuilds from its inputs, as before), and says so."""
    secret = secret_from_env(env)
    if secret is None:
        log.warning("no state key (%s or %s): snapshots disabled", KEY_FILE_ENV, KEY_ENV)
        return None
    return derive_key(secret, namespace)


def fingerprint(*parts: object) -> str:
    """SHA-256 of the configuration a state depends on: a snapshot of another configuration is not used."""

    def default(o: object) -> Any:
        if isinstance(o, BaseModel):
            return o.model_dump(mode="json")
        if isinstance(o, set | frozenset):
            return sorted(o, key=str)
        if isinstance(o, Decimal):
            return str(o)
        raise TypeError(type(o).__name__)

    data = orjson.dumps(list(parts), default=default, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------------- codec
_ALLOWED_MODULES = ("services.", "shared.")
_ALLOWED = {
    ("builtins", n)
    for n in (
        "set",
        "frozenset",
        "dict",
        "list",
        "tuple",
        "int",
        "float",
        "str",
        "bytes",
        "bool",
        "complex",
        "bytearray",
        "object",
        "slice",
        "range",
    )
} | {
    ("collections", "deque"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("collections", "Counter"),
    ("decimal", "Decimal"),
    ("datetime", "datetime"),
    ("datetime", "date"),
    ("datetime", "timedelta"),
    ("datetime", "timezone"),
    ("copyreg", "_reconstructor"),
    ("copyreg", "__newobj__"),
    ("uuid", "UUID"),
    ("pydantic.main", "_model_construct"),
    ("pydantic_core._pydantic_core", "PydanticUndefinedType"),
}


def _reduce_proxy(m: MappingProxyType[Any, Any]) -> tuple[Any, tuple[Any, ...]]:
    # The wrapped dict is pickled as itself (memoised): a proxy of an object's own dict stays a view of it.
    inner = _proxied(m)
    return _proxy, (inner if isinstance(inner, dict) else dict(m),)


def _proxy(d: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(d)


def _proxied(m: MappingProxyType[Any, Any]) -> Any:
    """The mapping a proxy wraps (reached through the GC's referents: the proxy exposes no attribute for it)."""
    refs = gc.get_referents(m)
    return refs[0] if refs else dict(m)


def _model(cls: type[BaseModel], values: dict[str, Any]) -> BaseModel:
    """A message rebuilt from its field values without validation (they were valid when pickled)."""
    obj = cls.__new__(cls)
    object.__setattr__(obj, "__dict__", values)
    object.__setattr__(obj, "__pydantic_fields_set__", set(values))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        # The code base's pydantic messages as (class, field values): half the time of pydantic's own pickling
        # (a paper exchange keeps thousands of candles).
        if (
            isinstance(obj, BaseModel)
            and type(obj).__module__.startswith(_ALLOWED_MODULES)
            and obj.__pydantic_extra__ is None
            and obj.__pydantic_private__ is None
        ):
            return _model, (type(obj), obj.__dict__)
        return NotImplemented


def _pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    p = _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    table = copyreg.dispatch_table.copy()
    table[MappingProxyType] = _reduce_proxy
    p.dispatch_table = table
    p.dump(obj)
    return buf.getvalue()


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or module.startswith(_ALLOWED_MODULES):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a snapshot")


@dataclass
class Snapshot:
    service: str
    schema: int
    fingerprint: str
    positions: Positions
    state: Any
    written_at: float = 0.0
    processed: int = 0


def encode_snapshot(snap: Snapshot, key: bytes) -> bytes:
    payload = zlib.compress(_pickle(snap.state), 1)
    header = orjson.dumps(
        {
            "format": FORMAT_VERSION,
            "service": snap.service,
            "schema": snap.schema,
            "fingerprint": snap.fingerprint,
            "positions": sorted([t, p, o] for (t, p), o in snap.positions.items()),
            "written_at": snap.written_at,
            "processed": snap.processed,
        }
    )
    rest = struct.pack(">I", len(header)) + header + payload
    return MAGIC + hmac.new(key, rest, hashlib.sha256).digest() + rest


def decode_snapshot(data: bytes, key: bytes, *, service: str, schema: int, fingerprint: str) -> Snapshot:
    """The snapshot, or SnapshotRefused with why it must not be used."""
    if len(data) < len(MAGIC) + 36 or not data.startswith(MAGIC):
        raise SnapshotRefused("not a snapshot record")
    mac, rest = data[len(MAGIC) : len(MAGIC) + 32], data[len(MAGIC) + 32 :]
    if not hmac.compare_digest(mac, hmac.new(key, rest, hashlib.sha256).digest()):
        raise SnapshotRefused(
            "bad signature (another namespace's key, or written by someone without the key)"
        )
    (n,) = struct.unpack(">I", rest[:4])
    head = orjson.loads(rest[4 : 4 + n])
    if head.get("format") != FORMAT_VERSION:
        raise SnapshotRefused(f"snapshot format {head.get('format')} (this code reads {FORMAT_VERSION})")
    if head["service"] != service:
        raise SnapshotRefused(f"snapshot of {head['service']!r}, not of {service!r}")
    if head["schema"] != schema:
        raise SnapshotRefused(f"state schema {head['schema']} (this code keeps schema {schema})")
    if head["fingerprint"] != fingerprint:
        raise SnapshotRefused("written under another configuration (its fingerprint differs)")
    try:
        state = _Unpickler(io.BytesIO(zlib.decompress(rest[4 + n :]))).load()
    except Exception as err:
        raise SnapshotRefused(f"state unreadable: {type(err).__name__}: {err}") from None
    return Snapshot(
        service=service,
        schema=schema,
        fingerprint=fingerprint,
        positions={(t, int(p)): int(o) for t, p, o in head["positions"]},
        state=state,
        written_at=float(head.get("written_at", 0.0)),
        processed=int(head.get("processed", 0)),
    )


# ------------------------------------------------------------------------------------------------- store
class SnapshotStore:
    """The state topic of one service instance: one partition, the newest snapshot is its last record."""

    def __init__(self, bootstrap: KafkaAccess, topic: str, *, client_id: str = "snapshots") -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None

    async def exists(self, wait_s: float = 3.0) -> bool:
        consumer = AIOKafkaConsumer(**self.bootstrap.client_options(), enable_auto_commit=False)
        await consumer.start()
        try:
            deadline = time.monotonic() + wait_s
            while True:
                await consumer._client.force_metadata_update()  # noqa: SLF001 - no public refresh in aiokafka
                if consumer._client.cluster.partitions_for_topic(self.topic):  # noqa: SLF001
                    return True
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.2)
        finally:
            await consumer.stop()

    async def latest(self, timeout_s: float = 30.0) -> bytes | None:
        consumer = AIOKafkaConsumer(
            **self.bootstrap.client_options(),
            enable_auto_commit=False,
            max_partition_fetch_bytes=STATE_MAX_MESSAGE_BYTES,
            fetch_max_bytes=STATE_MAX_MESSAGE_BYTES,
        )
        await consumer.start()
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            begin = (await consumer.beginning_offsets([tp]))[tp]
            end = (await consumer.end_offsets([tp]))[tp]
            if end <= begin:
                return None
            consumer.seek(tp, end - 1)
            deadline = time.monotonic() + timeout_s
            found: bytes | None = None
            while time.monotonic() < deadline:
                for recs in (await consumer.getmany(tp, timeout_ms=500)).values():
                    for rec in recs:
                        if rec.value is not None:
                            found = rec.value
                if found is not None or await consumer.position(tp) >= end:
                    return found
            raise TimeoutError(f"could not read the last record of {self.topic} within {timeout_s:.0f} s")
        finally:
            await consumer.stop()

    async def write(self, data: bytes) -> None:
        producer = await self._connect()
        await producer.send_and_wait(self.topic, data, key=b"snapshot")

    async def _connect(self) -> AIOKafkaProducer:
        """The store's producer, started on first use (a TLS and SCRAM handshake, tens of ms of CPU); writes
        come one at a time (`StateKeeper.save_soon` chains them), so never two starts at once."""
        if self._producer is not None:
            return self._producer
        producer = AIOKafkaProducer(
            **self.bootstrap.client_options(),
            client_id=self.client_id,
            acks="all",
            enable_idempotence=True,
            max_request_size=STATE_MAX_MESSAGE_BYTES,
        )
        try:
            await producer.start()
        except BaseException:
            # A broker that is away: the next write starts a new producer rather than a half-started one.
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._producer = producer
        return producer

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


# ------------------------------------------------------------------------------------------------- keeper
@dataclass
class StateKeeper:
    """One service instance's snapshots: `load` at start, `advance` per handled input, `due`/`save` after the
    outputs of the handled inputs are acknowledged.

    `dump` returns the object to pickle (the state, plus any bookkeeping the service needs); `restore` takes it
    back. Both run synchronously, so the state and the positions a snapshot holds are of one moment.
    """

    store: SnapshotStore
    key: bytes
    service: str
    schema: int
    fingerprint: str
    dump: Callable[[], Any]
    restore: Callable[[Any], None]
    interval_s: float = 30.0
    every_messages: int = 200_000
    positions: Positions = field(default_factory=dict)
    processed: int = 0  # inputs handled since the last snapshot
    restored_from: Snapshot | None = None
    last_size: int = 0
    last_capture_s: float = 0.0
    last_write_s: float = 0.0
    written: int = 0
    failed: int = 0  # snapshots the store did not take (a broker outage): skipped, not fatal
    _last_save: float = field(default_factory=time.monotonic)
    _writing: asyncio.Task[None] | None = None  # the snapshot `save_soon` is writing

    def __post_init__(self) -> None:
        # The first snapshot comes after half to all of the interval: services a stack started together would
        # otherwise all capture and write theirs at the same moment (17 at once held a step back by 100 ms).
        self._last_save = time.monotonic() - random.random() * self.interval_s / 2

    async def load(self) -> Positions | None:
        """Restore the newest usable snapshot; returns its positions (None: read the inputs from the start)."""
        try:
            data = await self.store.latest()
        except Exception as err:
            log.warning(
                "%s: cannot read %s (%s: %s): rebuilding from the inputs",
                self.service,
                self.store.topic,
                type(err).__name__,
                err,
            )
            return None
        if data is None:
            log.info(
                "%s: no snapshot on %s: rebuilding from the inputs' beginning", self.service, self.store.topic
            )
            return None
        try:
            snap = decode_snapshot(
                data, self.key, service=self.service, schema=self.schema, fingerprint=self.fingerprint
            )
        except SnapshotRefused as err:
            log.warning(
                "%s: snapshot on %s ignored: %s; rebuilding from what the inputs still hold",
                self.service,
                self.store.topic,
                err,
            )
            return None
        self.restore(snap.state)
        self.positions = dict(snap.positions)
        self.restored_from = snap
        log.info(
            "%s: restored the snapshot of %s (%d bytes, %d input partitions)",
            self.service,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.written_at)),
            len(data),
            len(snap.positions),
        )
        return dict(snap.positions)

    def advance(self, topic: str, partition: int, next_offset: int) -> None:
        self.positions[(topic, partition)] = next_offset
        self.processed += 1

    def due(self) -> bool:
        if self.processed <= 0:
            return False
        return self.processed >= self.every_messages or time.monotonic() - self._last_save >= self.interval_s

    def capture(self) -> bytes | None:
        """The snapshot of now (None when nothing was handled since the last one). Synchronous: call it when
        the outputs of every advanced input are acknowledged."""
        if self.processed <= 0:
            return None
        t0 = time.perf_counter()
        snap = Snapshot(
            self.service,
            self.schema,
            self.fingerprint,
            dict(self.positions),
            self.dump(),
            written_at=time.time(),
            processed=self.processed,
        )
        data = encode_snapshot(snap, self.key)
        self.last_capture_s = time.perf_counter() - t0
        self.last_size = len(data)
        self.processed = 0
        self._last_save = time.monotonic()
        return data

    async def write(self, data: bytes, *, final: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            await self.store.write(data)
        except (KafkaError, OSError) as err:
            # A snapshot only shortens a restart (it rebuilds from the last one written and the inputs after it),
            # so a broker outage at snapshot time must not stop the service: the next one is taken at the next
            # interval. Seen in the fault suite: the arbiter's 30 s snapshot fell inside a broker restart.
            self.failed += 1
            log.warning(
                "%s: %ssnapshot not written (%s: %s); the next is tried in %g s",
                self.service,
                "final " if final else "",
                type(err).__name__,
                err,
                self.interval_s,
            )
            return
        self.last_write_s = time.perf_counter() - t0
        self.written += 1
        (log.info if final else log.debug)(
            "%s: %ssnapshot of %d bytes (capture %.3f s, write %.3f s)",
            self.service,
            "final " if final else "",
            len(data),
            self.last_capture_s,
            self.last_write_s,
        )

    async def save(self, *, final: bool = False) -> None:
        await self.written_all()
        data = self.capture()
        if data is not None:
            await self.write(data, final=final)

    def save_soon(self) -> None:
        """`save` without waiting for the write: the snapshot is captured now (the caller's outputs are
        acknowledged), and written while the caller goes on handling inputs. A consume loop must not stall on it:
        the first write also connects the store's producer (a TLS and SCRAM handshake), and 16 workers' first
        snapshots at once held a step back by 360 ms. Writes keep their order; `save` and `close` wait for them.
        """
        data = self.capture()
        if data is None:
            return
        previous = self._writing

        async def write() -> None:
            if previous is not None:
                await asyncio.wait([previous])  # its own errors are its own (logged by write, or below)
            await self.write(data)

        task = self._writing = asyncio.create_task(write(), name=f"{self.service} snapshot")
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[None]) -> None:
        if self._writing is task:
            self._writing = None
        if not task.cancelled() and task.exception() is not None:
            self.failed += 1
            err = task.exception()
            log.warning("%s: snapshot not written (%s: %s)", self.service, type(err).__name__, err)

    async def written_all(self) -> None:
        """Wait until the snapshots `save_soon` began are written (or failed)."""
        task = self._writing
        if task is not None:
            await asyncio.wait([task])

    async def close(self) -> None:
        await self.written_all()
        await self.store.close()


@dataclass(frozen=True)
class Durable:
    """What a service declares to keep its state durably; `keeper` builds the StateKeeper in the running loop."""

    topic: str
    namespace: str
    service: str
    schema: int
    fingerprint: str
    dump: Callable[[], Any]
    restore: Callable[[Any], None]
    interval_s: float = 30.0
    every_messages: int = 200_000
    enabled: bool = True

    async def keeper(self, bootstrap: KafkaAccess) -> StateKeeper | None:
        return await keeper_for(
            bootstrap=bootstrap,
            topic=self.topic,
            namespace=self.namespace,
            service=self.service,
            schema=self.schema,
            fingerprint=self.fingerprint,
            dump=self.dump,
            restore=self.restore,
            interval_s=self.interval_s,
            every_messages=self.every_messages,
            enabled=self.enabled,
        )


async def keeper_for(
    *,
    bootstrap: KafkaAccess,
    topic: str,
    namespace: str,
    service: str,
    schema: int,
    fingerprint: str,
    dump: Callable[[], Any],
    restore: Callable[[Any], None],
    interval_s: float,
    every_messages: int,
    enabled: bool = True,
) -> StateKeeper | None:
    """A keeper for the service, or None (snapshots off, no key, or no state topic: rebuild as before)."""
    if not enabled:
        return None
    key = load_state_key(namespace)
    if key is None:
        return None
    store = SnapshotStore(bootstrap, topic, client_id=f"{service}.state")
    if not await store.exists():
        log.warning("%s: no state topic %s (create the topics): snapshots disabled", service, topic)
        return None
    return StateKeeper(
        store,
        key,
        service,
        schema,
        fingerprint,
        dump,
        restore,
        interval_s=interval_s,
        every_messages=every_messages,
    )


def clamp_positions(positions: Positions, begins: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
    """Where each assigned partition resumes: the snapshot's offset, or its beginning for a partition the
    snapshot does not cover. An offset below the beginning means retention deleted inputs the snapshot does not
    cover (a snapshot older than the retention): said loudly, and resumed at the beginning."""
    out: dict[TopicPartition, int] = {}
    for tp, begin in begins.items():
        pos = positions.get((tp.topic, tp.partition))
        if pos is None:
            out[tp] = begin
        elif pos < begin:
            log.error(
                "%s[%d]: the snapshot covers up to offset %d but the log starts at %d: %d input(s) lost to "
                "retention",
                tp.topic,
                tp.partition,
                pos,
                begin,
                begin - pos,
            )
            out[tp] = begin
        else:
            out[tp] = pos
    return out


def dataclass_dump(obj: Any, config_fields: frozenset[str]) -> dict[str, Any]:
    """The fields of a state dataclass but those its constructor sets from the configuration: those come from
    the running configuration on restore (the fingerprint guarantees it is the same), and a snapshot then never
    carries configuration objects (which may hold secrets)."""
    return {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in config_fields}


def dataclass_restore(obj: Any, data: Mapping[str, Any]) -> None:
    names = {f.name for f in fields(obj)}
    unknown = set(data) - names
    if unknown:
        raise SnapshotRefused(f"unknown state fields {sorted(unknown)}")
    for k, v in data.items():
        setattr(obj, k, v)
