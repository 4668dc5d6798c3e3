"""The snapshot codec (shared/snapshots.py): exact round trips of the services' real states, and every refusal
(tampered bytes, another key, service, schema or configuration, classes outside the code base)."""

from __future__ import annotations

import asyncio
import copy
import math
import pickle
from collections import deque
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError
from pydantic import BaseModel

from mpctl.backtest import Backtest, load_schedule
from services.arbiter import domain as arbiter_domain
from services.execution import domain as execution_domain
from services.strategy import domain as strategy_domain
from shared.config import AppConfig, load_config
from shared.snapshots import (
    Snapshot,
    SnapshotRefused,
    StateKeeper,
    clamp_positions,
    dataclass_dump,
    dataclass_restore,
    decode_snapshot,
    derive_key,
    encode_snapshot,
    fingerprint,
    secret_from_env,
)
from shared.topics import Topics, declared_topics

ROOT = Path(__file__).resolve().parents[2]
KEY = derive_key(b"0123456789abcdef-secret", "ns")
POS = {("ns.md.candles", 0): 120, ("ns.orders.events", 0): 7}


def snap(state: Any, **kw: Any) -> Snapshot:
    args: dict[str, Any] = {
        "service": "strategy.p",
        "schema": 1,
        "fingerprint": "f",
        "positions": POS,
        "state": state,
    }
    args.update(kw)
    return Snapshot(**args)


def decode(data: bytes, key: bytes = KEY, **kw: Any) -> Snapshot:
    args: dict[str, Any] = {"service": "strategy.p", "schema": 1, "fingerprint": "f"}
    args.update(kw)
    return decode_snapshot(data, key, **args)


def same(a: Any, b: Any) -> bool:
    """Deep equality, also of objects without __eq__ (the signal models): type, attributes, items."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict | MappingProxyType):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, deque):
        return a.maxlen == b.maxlen and same(list(a), list(b))
    # A class compiled by mypyc (scripts/build_native.py) lists its attributes in __mypyc_attrs__.
    slots = (*getattr(a, "__slots__", ()), *getattr(type(a), "__mypyc_attrs__", ()))
    if isinstance(a, BaseModel) or not hasattr(a, "__dict__") and not slots:
        return bool(a == b)
    names = list(getattr(a, "__dict__", {})) + [n for n in slots if n != "__dict__" and hasattr(a, n)]
    return all(same(getattr(a, n), getattr(b, n)) for n in names)


@pytest.fixture(scope="module")
def run() -> tuple[AppConfig, Backtest]:
    cfg = load_config(ROOT / "config" / "examples" / "three_profiles.yaml")
    bt = Backtest(cfg, load_schedule(cfg, ROOT / "data" / "market", hours=400))
    asyncio.run(bt.run())
    return cfg, bt


def test_round_trip_of_plain_values() -> None:
    state = {"cash": Decimal("1000.12345678"), "window": deque([1.5, 2.5], maxlen=3), "seen": {"a", "b"}}
    back = decode(encode_snapshot(snap(state), KEY))
    assert back.state == state and back.state["window"].maxlen == 3
    assert back.positions == POS and back.service == "strategy.p"


@pytest.mark.parametrize(
    ("which", "fields"),
    [
        ("strategy", strategy_domain.CONFIG_FIELDS),
        ("execution", execution_domain.CONFIG_FIELDS),
        ("arbiter", arbiter_domain.CONFIG_FIELDS),
    ],
)
def test_round_trip_of_the_services_states_is_exact(
    run: tuple[AppConfig, Backtest], which: str, fields: frozenset[str]
) -> None:
    cfg, bt = run
    pid = next(iter(cfg.enabled_profiles()))
    if which == "strategy":
        state: Any = copy.copy(bt.strategies[pid])
        state.market = bt.market  # the backtest shares it; a worker has its own
        assert state.fills, "the slice trades"
    elif which == "execution":
        state = bt.exchanges[pid].state
    else:
        state = bt.arbiter
    dumped = dataclass_dump(state, fields)
    assert not set(dumped) & fields
    back = decode(encode_snapshot(snap(dumped), KEY))
    # Every field equals the original, down to each signal model's windows and running sums.
    for name, value in dumped.items():
        assert same(back.state[name], value), name
    if which == "strategy":
        fresh = strategy_domain.new_state(pid, cfg.profiles[pid], cfg.system.quote_asset, frozenset({0}))
        dataclass_restore(fresh, back.state)
        assert fresh.cash == state.cash and fresh.positions == state.positions
        assert fresh.seen_fills == state.seen_fills and fresh.profile is cfg.profiles[pid]
        assert fresh.equity() == state.equity()


def test_no_configuration_object_in_a_snapshot(run: tuple[AppConfig, Backtest]) -> None:
    # A profile holds its credentials: a snapshot never carries one.
    cfg, bt = run
    pid = next(iter(cfg.enabled_profiles()))
    data = encode_snapshot(snap(dataclass_dump(bt.strategies[pid], strategy_domain.CONFIG_FIELDS)), KEY)
    import zlib

    payload = zlib.decompress(data[4 + 32 + 4 + int.from_bytes(data[36:40], "big") :])
    assert b"SecretStr" not in payload and b"api_key" not in payload


def test_tampered_bytes_are_refused() -> None:
    data = bytearray(encode_snapshot(snap({"cash": Decimal(1)}), KEY))
    data[-5] ^= 0x01
    with pytest.raises(SnapshotRefused, match="signature"):
        decode(bytes(data))


def test_another_key_or_namespace_is_refused() -> None:
    data = encode_snapshot(snap({"cash": Decimal(1)}), KEY)
    with pytest.raises(SnapshotRefused, match="signature"):
        decode(data, key=derive_key(b"0123456789abcdef-secret", "other-ns"))
    with pytest.raises(SnapshotRefused, match="not a snapshot"):
        decode(b"garbage")


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"schema": 2}, "schema"),
        ({"fingerprint": "g"}, "configuration"),
        ({"service": "strategy.q"}, "not of"),
    ],
)
def test_version_configuration_or_service_mismatch_is_ignored(kw: dict[str, Any], why: str) -> None:
    data = encode_snapshot(snap({"cash": Decimal(1)}), KEY)
    with pytest.raises(SnapshotRefused, match=why):
        decode(data, **kw)


class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pwned",))


def test_a_validly_signed_pickle_of_a_foreign_callable_is_refused() -> None:
    # Defence in depth: even with the key, only this code base's classes and plain containers load.
    with pytest.raises(SnapshotRefused, match="not allowed"):
        decode(encode_snapshot(snap(Evil()), KEY))
    assert pickle.dumps(Evil())  # (the object pickles: the refusal is the unpickler's)


def test_fingerprint_follows_the_configuration(run: tuple[AppConfig, Backtest]) -> None:
    cfg, _ = run
    pid = next(iter(cfg.enabled_profiles()))
    p = cfg.profiles[pid]
    changed = p.model_copy(update={"priority": p.priority + 1})
    assert fingerprint("strategy", p, 1) == fingerprint("strategy", p, 1)
    assert fingerprint("strategy", p, 1) != fingerprint("strategy", changed, 1)


def test_positions_resume_at_the_snapshot_or_the_beginning() -> None:
    from aiokafka import TopicPartition

    a, b, c = (
        TopicPartition("ns.md.candles", 0),
        TopicPartition("ns.orders.events", 0),
        TopicPartition("x", 0),
    )
    assert clamp_positions(POS, {a: 0, b: 10, c: 3}) == {a: 120, b: 10, c: 3}  # b: inputs lost, said loudly


def test_state_key_from_env(tmp_path: Path) -> None:
    assert secret_from_env({}) is None
    assert secret_from_env({"MPCTL_STATE_KEY": "k" * 16}) == b"k" * 16
    (tmp_path / "key").write_text("f" * 20 + "\n")
    assert secret_from_env({"MPCTL_STATE_KEY_FILE": str(tmp_path / "key")}) == b"f" * 20
    with pytest.raises(ValueError, match="too short"):
        secret_from_env({"MPCTL_STATE_KEY": "short"})


def test_every_stateful_instance_has_a_compacted_state_topic(run: tuple[AppConfig, Backtest]) -> None:
    cfg, _ = run
    t = Topics("ns")
    specs = {s.name: s for s in declared_topics(cfg, "ns")}
    names = [t.state("arbiter")] + [
        t.state(s, pid) for pid in cfg.profiles for s in ("strategy", "execution")
    ]
    for name in names:
        assert specs[name].compacted and specs[name].partitions == 1
        assert int(specs[name].configs()["max.message.bytes"]) >= 16 * 1024 * 1024


class MemoryStore:
    """A state topic in memory: the last record written is the newest snapshot."""

    topic = "ns.state.strategy.p"

    def __init__(self) -> None:
        self.records: list[bytes] = []

    async def latest(self) -> bytes | None:
        return self.records[-1] if self.records else None

    async def write(self, data: bytes) -> None:
        self.records.append(data)

    async def close(self) -> None:
        return None


def keeper(
    store: MemoryStore, box: dict[str, Any], *, fp: str = "f", schema: int = 1, **kw: Any
) -> StateKeeper:
    return StateKeeper(
        store,  # type: ignore[arg-type]
        KEY,
        "strategy.p",
        schema,
        fp,
        dump=lambda: dict(box),
        restore=lambda d: box.update(d),
        **kw,
    )


async def test_keeper_saves_after_progress_and_restores_state_and_positions() -> None:
    store, box = MemoryStore(), {"cash": Decimal("10")}
    k = keeper(store, box, interval_s=3600, every_messages=2)
    assert await k.load() is None  # nothing yet: read the inputs from the beginning
    await k.save()
    assert store.records == []  # nothing handled, nothing written
    k.advance("ns.md.candles", 0, 5)
    assert not k.due()
    k.advance("ns.md.candles", 0, 6)
    assert k.due()
    box["cash"] = Decimal("12.5")
    await k.save()
    assert len(store.records) == 1 and not k.due()

    other: dict[str, Any] = {}
    k2 = keeper(store, other)
    assert await k2.load() == {("ns.md.candles", 0): 6}
    assert other == {"cash": Decimal("12.5")}


@pytest.mark.parametrize(("kw", "said"), [({"fp": "g"}, "another configuration"), ({"schema": 2}, "schema")])
async def test_keeper_ignores_a_snapshot_of_another_configuration_or_schema(
    kw: dict[str, Any], said: str, caplog: pytest.LogCaptureFixture
) -> None:
    store, box = MemoryStore(), {"cash": Decimal("10")}
    k = keeper(store, box)
    k.advance("ns.md.candles", 0, 1)
    await k.save()
    other: dict[str, Any] = {}
    assert await keeper(store, other, **kw).load() is None
    assert other == {}  # nothing restored: the service rebuilds from what its inputs still hold
    assert said in caplog.text and "rebuilding from what the inputs still hold" in caplog.text


async def test_keeper_ignores_a_forged_snapshot(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    store.records.append(
        encode_snapshot(snap({"cash": Decimal("1e9")}), derive_key(b"attacker-key-123456", "ns"))
    )
    box: dict[str, Any] = {"cash": Decimal("10")}
    assert await keeper(store, box).load() is None
    assert box == {"cash": Decimal("10")} and "bad signature" in caplog.text


class FlakyStore(MemoryStore):
    """The broker is away for the first `down` writes (a restart at snapshot time)."""

    def __init__(self, down: int) -> None:
        super().__init__()
        self.down = down

    async def write(self, data: bytes) -> None:
        if self.down > 0:
            self.down -= 1
            raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]")
        await super().write(data)


async def test_a_snapshot_the_broker_cannot_take_is_skipped_and_the_next_one_is_written() -> None:
    store, box = FlakyStore(down=1), {"cash": Decimal("10")}
    k = keeper(store, box, interval_s=3600, every_messages=1)  # type: ignore[arg-type]
    k.advance("in", 0, 5)
    await k.save()  # the broker is away: no exception, nothing written, counted
    assert (k.written, k.failed, store.records) == (0, 1, [])
    box["cash"] = Decimal("12")
    k.advance("in", 0, 9)
    await k.save()
    assert (k.written, k.failed, len(store.records)) == (1, 1, 1)
    restored: dict[str, Any] = {}
    k2 = keeper(store, restored)
    assert await k2.load() == {("in", 0): 9}
    assert restored == {"cash": Decimal("12")}


class SlowStore(MemoryStore):
    """A store whose writes wait until the test lets them through (a producer connecting, a slow broker)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.started = 0

    async def write(self, data: bytes) -> None:
        self.started += 1
        await self.gate.wait()
        await super().write(data)


async def test_save_soon_captures_now_writes_in_order_without_blocking_and_close_waits() -> None:
    store, box = SlowStore(), {"cash": Decimal("10")}
    k = keeper(store, box, interval_s=3600, every_messages=1)  # type: ignore[arg-type]
    k.advance("in", 0, 5)
    k.save_soon()  # returns at once, the write still waiting on the store
    box["cash"] = Decimal("11")  # changed after the capture: not in the first snapshot
    k.advance("in", 0, 7)
    k.save_soon()
    await asyncio.sleep(0.01)
    assert store.started == 1 and store.records == []  # the second waits for the first: order kept
    assert not k.due()  # both captured
    store.gate.set()
    await k.close()  # waits for both
    assert (k.written, k.failed, len(store.records)) == (2, 0, 2)
    first: dict[str, Any] = {}
    k1 = keeper(MemoryStore(), first)
    k1.store.records.append(store.records[0])  # type: ignore[attr-defined]
    assert await k1.load() == {("in", 0): 5} and first == {"cash": Decimal("10")}
    last: dict[str, Any] = {}
    assert await keeper(store, last).load() == {("in", 0): 7} and last == {"cash": Decimal("11")}


async def test_a_final_save_waits_for_the_snapshots_in_flight_and_comes_last() -> None:
    store, box = SlowStore(), {"n": 1}
    k = keeper(store, box, interval_s=3600, every_messages=1)  # type: ignore[arg-type]
    k.advance("in", 0, 1)
    k.save_soon()
    box["n"] = 2
    k.advance("in", 0, 2)
    final = asyncio.create_task(k.save(final=True))
    await asyncio.sleep(0.01)
    assert not final.done() and store.started == 1
    store.gate.set()
    await final
    restored: dict[str, Any] = {}
    assert await keeper(store, restored).load() == {("in", 0): 2} and restored == {"n": 2}
    assert len(store.records) == 2
