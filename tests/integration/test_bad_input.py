"""Bad input, end to end (DESIGN.md section 5, invariant 8): garbage sent to every input topic of a running
pipeline lands in the dead-letter topic with a reason naming the problem, nothing else is lost, and the services
keep running; bad config files and a corrupted candle file are refused with a clear error.

Three pipelines run side by side on the session's broker, each in its own namespace, every service its own
process as `mpctl demo` runs them (registry, arbiter, one strategy and one execution worker per profile; the
garbage run also has the monitor, the consumer of audit.log):

- clean: the bundled candles only;
- garbage: the same candles, with undecodable messages (hand-written and hypothesis-generated) sent to every
  input topic before the replay starts and again while it runs;
- absurd: the same candles, with messages that decode (they pass the schemas) but carry absurd values:
  far-future times, forged orders and fills, impossible sizes. Whether each is refused is recorded per message;
  the ones the services accept today are marked xfail(strict) with what happens (a fix turns them into XPASS,
  i.e. a failure that asks for the mark to go).

The garbage run must produce exactly the outputs of the clean run (decisions, order events, fills, plans).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpctl import commands_config
from mpctl.commands_demo import Stack, expected_finishers, tail, wait_finished
from mpctl.infra import Endpoints
from shared.candles import CandleFileError, load_products
from shared.codec import DecodeError, decode
from shared.config import load_config
from shared.kafka import delete_topics
from shared.messages import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    DeadLettered,
    OrderDecided,
    OrderFilled,
    OrderUpdated,
    PlanPublished,
)
from shared.topics import Topics, declared_topics
from tests.bus import create_namespace, principal_env

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "config" / "coinbase_profiles.yaml"
DATA = ROOT / "data" / "market"
# Enough hourly candles for both template profiles to trade (the indicators need a warm-up).
HOURS = 150
PROFILES = ("profile_a", "profile_b")
T_STEP = 1_627_776_000 + 10 * 3600  # 2021-08-01 10:00 UTC: a step of the replayed slice
FAR_FUTURE = "2099-01-01T00:00:00Z"
RUN_TIMEOUT_S = 150.0
STALL_GRACE_S = 20.0  # how long an absurd run may go on after the clean run finished

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------------------ valid templates
def _env(type_: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": type_,
        "id": f"bad-{uuid.uuid4().hex[:12]}",
        "schema_version": SCHEMA_VERSION,
        "event_time": "2021-08-01T11:00:00Z",
        "correlation_id": f"step:{T_STEP}",
        **fields,
    }


def candle(**over: Any) -> dict[str, Any]:
    d = _env(
        "CandleClosed",
        product="BTC/USDC",
        interval_s=3600,
        open_time="2021-08-01T10:00:00Z",
        open="40000",
        high="40100",
        low="39900",
        close="40050",
        volume="12.5",
        source="test",
    )
    d.update(over)
    return d


def plan(**over: Any) -> dict[str, Any]:
    d = _env(
        "PlanPublished",
        profile="profile_a",
        epoch=452_160,
        epoch_start="2021-08-01T10:00:00Z",
        epoch_end="2021-08-01T11:00:00Z",
        hash="a" * 64,
        nonce=0,
        strategy="volume_weighted_hash_oscillator",
        parameters={"fast": 5.0},
        blend_weight=0.85,
        assets=["BTC", "ETH"],
        random_asset="ADA",
        products=["BTC/USDC"],
        fingerprint="b" * 64,
    )
    d.update(over)
    return d


def intent(**over: Any) -> dict[str, Any]:
    d = _env(
        "PlaceOrder",
        intent_id=f"forged-{uuid.uuid4().hex[:8]}",
        profile="profile_a",
        product="BTC/USDC",
        side="buy",
        size="0.01",
        reference_price="40000",
        reason="entry",
        fingerprint="b" * 64,
        epoch=452_160,
        step_time="2021-08-01T10:00:00Z",
    )
    d.update(over)
    return d


def execute(profile: str = "profile_a", **over: Any) -> dict[str, Any]:
    d = _env(
        "ExecuteOrder",
        intent_id=f"forged-{uuid.uuid4().hex[:8]}",
        client_order_id=str(uuid.uuid4()),
        profile=profile,
        product="BTC/USDC",
        side="buy",
        size="0.01",
        reference_price="40000",
        reason="entry",
        step_time="2021-08-01T10:00:00Z",
        not_before="2021-08-01T11:00:00Z",
    )
    d.update(over)
    return d


def order_updated(**over: Any) -> dict[str, Any]:
    d = _env(
        "OrderUpdated",
        intent_id=f"forged-{uuid.uuid4().hex[:8]}",
        client_order_id=str(uuid.uuid4()),
        profile="profile_a",
        product="BTC/USDC",
        side="buy",
        size="0.01",
        status="filled",
        filled_size="0.01",
        price="40000",
        fee="0.24",
    )
    d.update(over)
    return d


def decision(**over: Any) -> dict[str, Any]:
    d = _env(
        "OrderDecided",
        intent_id=f"forged-{uuid.uuid4().hex[:8]}",
        profile="profile_a",
        product="BTC/USDC",
        side="buy",
        size="0.01",
        verdict="approved",
        rule="r",
        reason="r",
    )
    d.update(over)
    return d


def order_filled(**over: Any) -> dict[str, Any]:
    d = _env(
        "OrderFilled",
        fill_id=f"forged-{uuid.uuid4().hex[:8]}",
        intent_id=f"forged-{uuid.uuid4().hex[:8]}",
        client_order_id=str(uuid.uuid4()),
        profile="profile_a",
        product="BTC/USDC",
        side="buy",
        size="0.01",
        price="40000",
        fee="0.24",
    )
    d.update(over)
    return d


TEMPLATES = {
    "candles": candle,
    "plans": plan,
    "intents": intent,
    "approved": execute,
    "events": order_updated,
    "decisions": decision,
}


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    out = dict(d)
    del out[key]
    return out


def _j(d: Any) -> bytes:
    try:
        return orjson.dumps(d)
    except TypeError:  # integers beyond 64 bits: other clients do write them
        return json.dumps(d).encode()


# ------------------------------------------------------------------------------------------ hand-written garbage
@dataclass(frozen=True)
class Bad:
    label: str
    topic: str  # a key of TEMPLATES (plus "audit", "commands")
    value: bytes | None
    expect: str  # a piece of the dead-letter reason that names the problem
    key: bytes = (
        b"zz-bad-input"  # a profile's id: only that profile's strategy decodes it (plans, events, decisions)
    )


def _generic(topic: str) -> list[Bad]:
    t = TEMPLATES[topic]()
    return [
        Bad(f"{topic}:binary", topic, b"\x00\xff\xfe garbage \x81", "not JSON"),
        Bad(f"{topic}:truncated-json", topic, _j(t)[:-7], "not JSON"),
        Bad(f"{topic}:json-array", topic, b"[1, 2, 3]", "must be a JSON object"),
        Bad(f"{topic}:no-type", topic, _j(_without(t, "type")), "no 'type' field"),
        Bad(f"{topic}:unknown-type", topic, _j({**t, "type": "LaunchRocket"}), "LaunchRocket"),
        Bad(
            f"{topic}:schema-version-2", topic, _j({**t, "schema_version": 2}), "unsupported schema_version 2"
        ),
        Bad(f"{topic}:schema-version-text", topic, _j({**t, "schema_version": "one"}), "schema_version"),
        Bad(f"{topic}:missing-id", topic, _j(_without(t, "id")), "id: Field required"),
        Bad(
            f"{topic}:naive-event-time", topic, _j({**t, "event_time": "2021-08-01T11:00:00"}), "no time zone"
        ),
        Bad(f"{topic}:tombstone", topic, None, "empty message value"),
    ]


HAND_WRITTEN: list[Bad] = [
    *(b for topic in TEMPLATES for b in _generic(topic)),
    # Market data
    Bad("candles:nan-open", "candles", _j(candle(open="NaN")), "finite"),
    Bad("candles:infinite-high", "candles", _j(candle(high="Infinity")), "finite"),
    Bad("candles:negative-volume", "candles", _j(candle(volume="-5")), "volume"),
    Bad("candles:zero-price", "candles", _j(candle(close="0")), "close"),
    Bad("candles:zero-interval", "candles", _j(candle(interval_s=0)), "interval_s"),
    Bad("candles:missing-close", "candles", _j(_without(candle(), "close")), "close: Field required"),
    Bad("candles:price-is-text", "candles", _j(candle(low="cheap")), "low"),
    Bad("candles:bad-date", "candles", _j(candle(open_time="yesterday")), "open_time"),
    # Keyed by a profile, as every writer of these topics keys them: that profile's worker dead-letters it, the
    # others skip it undecoded (services/strategy/routing.py ForeignKeys).
    *(
        Bad(f"{topic}:binary-keyed-profile_b", topic, b"\x00\xff garbage", "not JSON", b"profile_b")
        for topic in ("plans", "events", "decisions")
    ),
    # Plans
    Bad("plans:hash-not-hex", "plans", _j(plan(hash="z" * 64)), "hash"),
    Bad("plans:negative-nonce", "plans", _j(plan(nonce=-1)), "nonce"),
    Bad("plans:blend-weight-7", "plans", _j(plan(blend_weight=7)), "blend_weight"),
    Bad(
        "plans:missing-fingerprint",
        "plans",
        _j(_without(plan(), "fingerprint")),
        "fingerprint: Field required",
    ),
    # Intents
    Bad("intents:negative-size", "intents", _j(intent(size="-1")), "size"),
    Bad("intents:zero-size", "intents", _j(intent(size="0")), "size"),
    Bad("intents:nan-price", "intents", _j(intent(reference_price="NaN")), "finite"),
    Bad("intents:side-hold", "intents", _j(intent(side="hold")), "side"),
    Bad("intents:signal-9", "intents", _j(intent(signal=9.0)), "signal"),
    Bad("intents:missing-profile", "intents", _j(_without(intent(), "profile")), "profile: Field required"),
    # Approved orders
    Bad("approved:negative-size", "approved", _j(execute(size="-3")), "size"),
    Bad("approved:nan-price", "approved", _j(execute(reference_price="NaN")), "finite"),
    Bad(
        "approved:missing-client-order-id",
        "approved",
        _j(_without(execute(), "client_order_id")),
        "client_order_id: Field required",
    ),
    # Order events
    Bad("events:negative-filled", "events", _j(order_updated(filled_size="-0.5")), "filled_size"),
    Bad("events:unknown-status", "events", _j(order_updated(status="teleported")), "status"),
    Bad("events:fill-nan-price", "events", _j(order_filled(price="NaN")), "finite"),
    Bad("events:fill-negative-size", "events", _j(order_filled(size="-1")), "size"),
    # Decisions
    Bad("decisions:unknown-verdict", "decisions", _j(decision(verdict="maybe")), "verdict"),
    Bad("decisions:negative-size", "decisions", _j(decision(size="-1")), "size"),
]


# ------------------------------------------------------------------------------------------ hypothesis garbage
_BAD_VALUES: st.SearchStrategy[Any] = st.sampled_from(
    ["NaN", "-1", "Infinity", "-Infinity", "abc", "", None, [], {}, True, -7, "1e-999999"]
)


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid message of some input topic with one field broken, or bytes that are no message at all."""
    topic = draw(st.sampled_from(sorted(TEMPLATES)))
    kind = draw(st.sampled_from(["field", "drop", "version", "type", "bytes", "nesting"]))
    d = TEMPLATES[topic]()
    keys = sorted(k for k in d if k != "type")
    if kind == "bytes":
        return topic, draw(st.binary(min_size=0, max_size=64))
    if kind == "field":
        d[draw(st.sampled_from(keys))] = draw(_BAD_VALUES)
    elif kind == "drop":
        del d[draw(st.sampled_from(keys))]
    elif kind == "version":
        d["schema_version"] = draw(st.integers().filter(lambda v: v != SCHEMA_VERSION))
    elif kind == "type":
        d["type"] = draw(st.text(min_size=0, max_size=20).filter(lambda s: s not in MESSAGE_TYPES))
    else:
        d[draw(st.sampled_from(keys))] = {"nested": draw(st.text(max_size=10))}
    return topic, _j(d)


def _decode_error(value: bytes | None) -> str | None:
    try:
        decode(value)
    except DecodeError as err:
        return str(err)
    return None


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_mutated())
def test_every_generated_bad_message_is_refused_by_the_codec_with_a_reason(case: tuple[str, bytes]) -> None:
    """The property the pipeline test relies on: what the generator makes never decodes, and the reason says
    what is wrong (a field name, or the kind of damage)."""
    _topic, value = case
    error = _decode_error(value)
    if error is None:
        # A mutation that happens to keep the message valid (e.g. an empty `source`): nothing to refuse.
        return
    assert error and len(error) < 2000
    assert any(w in error for w in ("not JSON", "JSON object", "'type'", "invalid ", "empty message")), error


def hypothesis_corpus(n: int = 40) -> list[Bad]:
    """`n` generated bad messages for the pipeline (derandomized: the same corpus every run)."""
    found: list[Bad] = []

    @settings(
        max_examples=n * 3,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(_mutated())
    def collect(case: tuple[str, bytes]) -> None:
        topic, value = case
        error = _decode_error(value)
        if error is not None and len(found) < n:
            # Expected reason: the codec's own text (the services dead-letter it verbatim).
            found.append(Bad(f"hyp-{len(found)}:{topic}", topic, value, error[:200]))

    collect()
    return found


# ------------------------------------------------------------------------------------------ schema-valid, absurd
@dataclass(frozen=True)
class Absurd:
    label: str
    topic: str
    value: dict[str, Any]
    what: str  # what the message is
    today: str | None = None  # what the services do with it today, when they do not refuse it (xfail)
    alone: bool = False  # its effect is run-wide (stall, lost output): it gets a pipeline of its own


ABSURD: list[Absurd] = [
    Absurd(
        "candle-far-future",
        "candles",
        candle(open_time=FAR_FUTURE, event_time=FAR_FUTURE),
        "a BTC/USDC candle opening in 2099",
    ),
    Absurd(
        "candle-high-below-low",
        "candles",
        candle(
            product="ETH/USDC",
            open_time="2021-08-01T10:00:00Z",
            open="3000",
            high="1",
            low="5000",
            close="3000",
        ),
        "an ETH/USDC candle of a replayed step whose high (1) is below its low (5000)",
    ),
    Absurd(
        "watermark-far-future",
        "candles",
        _env("WatermarkAdvanced", step_time=FAR_FUTURE, interval_s=3600),
        "a watermark in 2099 (declares every step complete)",
        alone=True,
    ),
    Absurd(
        "intent-unknown-profile",
        "intents",
        intent(profile="mallory"),
        "an intent of a profile not in the config",
    ),
    Absurd(
        "intent-far-future",
        "intents",
        intent(step_time=FAR_FUTURE, event_time=FAR_FUTURE),
        "an intent of profile_a for a step in 2099 (refused today by plan_echo: its fingerprint is not the plan's)",
    ),
    Absurd(
        "intent-absurd-size",
        "intents",
        intent(size="1000000000000", reference_price="1e30"),
        "an intent to buy 10^12 BTC at 10^30",
    ),
    Absurd(
        "execute-other-profile",
        "approved_a",
        execute(profile="profile_b"),
        "profile_b's order on profile_a's approved topic",
    ),
    Absurd(
        "execute-absurd-size", "approved_a", execute(size="1000000000000"), "an approved order for 10^12 BTC"
    ),
    # No OrderDecided approves its intent: strategy.profile_a dead-letters it once system.strategy.
    # decision_wait_steps steps closed after it (docs/operations.md, "Forged order events").
    Absurd("fill-forged", "events", order_filled(), "a fill of profile_a for an intent it never sent"),
    Absurd("order-updated-nan-price", "events", order_updated(price="NaN"), "an order event with price NaN"),
    Absurd(
        "plan-far-future-epoch",
        "plans",
        plan(epoch=999_999_999, epoch_start=FAR_FUTURE, epoch_end="2099-01-01T01:00:00Z"),
        "a plan of profile_a for an epoch in 2099",
        alone=True,
    ),
]


# ------------------------------------------------------------------------------------------ pipeline runs
@dataclass
class Run:
    namespace: str
    stack: Stack
    alive_at_end: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    injected: dict[tuple[str, int, int], Any] = field(
        default_factory=dict
    )  # (topic, partition, offset) -> case
    dead_letters: dict[tuple[str, int, int], dict[str, str]] = field(default_factory=dict)
    outputs: dict[str, set[tuple[Any, ...]]] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None  # the run did not complete (a service died, or it stalled)


def _topic_names(t: Topics, topic: str) -> list[tuple[str, int | None]]:
    """Where one bad message of a topic kind is sent: every partition of intents, every profile's approved."""
    if topic == "candles":
        return [(t.candles, None)]
    if topic == "plans":
        return [(t.plans, None)]
    if topic == "intents":
        return [(t.intents, p) for p in range(3)]
    if topic == "approved":
        return [(t.approved(pid), None) for pid in PROFILES]
    if topic == "approved_a":
        return [(t.approved("profile_a"), None)]
    if topic == "events":
        return [(t.events, None)]
    if topic == "decisions":
        return [(t.decisions, None)]
    if topic == "audit":
        return [(t.audit, None)]
    if topic == "commands":
        return [(t.commands, None)]
    raise AssertionError(topic)


async def _inject(bootstrap: str, t: Topics, cases: list[tuple[Any, str, bytes | None]], run: Run) -> None:
    producer = AIOKafkaProducer(**bootstrap.client_options(), acks="all")
    await producer.start()
    try:
        for case, topic, value in cases:
            for name, partition in _topic_names(t, topic):
                key = case.key if isinstance(case, Bad) else b"zz-bad-input"
                md = await producer.send_and_wait(name, value, key=key, partition=partition)
                run.injected[(name, md.partition, md.offset)] = case
    finally:
        await producer.stop()


async def _read(bootstrap: str, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False, max_poll_records=5000)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        for _ in range(50):
            if parts:
                break
            await consumer._client.force_metadata_update()  # noqa: SLF001 - no public refresh in aiokafka
            parts = consumer.partitions_for_topic(topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[ConsumerRecord[bytes, bytes]] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for recs in (await consumer.getmany(timeout_ms=1000)).values():
                out.extend(recs)
        return out
    finally:
        await consumer.stop()


def _output_key(msg: Any) -> tuple[Any, ...] | None:
    """What a run produced, reduced to what must not change (ids are derived from the inputs)."""
    if isinstance(msg, OrderDecided):
        return ("decided", msg.id, msg.intent_id, msg.verdict, msg.rule, str(msg.size))
    if isinstance(msg, OrderUpdated):
        return (
            "order",
            msg.id,
            msg.client_order_id,
            msg.status,
            str(msg.size),
            str(msg.price),
            str(msg.fee),
            msg.event_time.isoformat(),
        )
    if isinstance(msg, OrderFilled):
        return ("fill", msg.fill_id, str(msg.size), str(msg.price), str(msg.fee))
    if isinstance(msg, PlanPublished):
        return (
            "plan",
            msg.profile,
            msg.epoch,
            msg.hash,
            msg.nonce,
            msg.strategy,
            msg.fingerprint,
            tuple(msg.assets),
        )
    return None


async def _collect(bootstrap: str, t: Topics, run: Run) -> None:
    outputs: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
    for topic in (t.events, t.decisions, t.plans):
        for rec in await _read(bootstrap, topic):
            if (rec.topic, rec.partition, rec.offset) in run.injected:
                continue
            try:
                msg = decode(rec.value)
            except DecodeError:
                continue
            key = _output_key(msg)
            if key is not None:
                outputs[key[0]].add(key)
    run.outputs = dict(outputs)
    for rec in await _read(bootstrap, t.dead_letter):
        dl = decode(rec.value)
        assert isinstance(dl, DeadLettered)
        run.dead_letters.setdefault((dl.source_topic, dl.partition, dl.offset), {})[dl.service] = dl.error


async def _stall_after(reference: asyncio.Event) -> None:
    await reference.wait()
    await asyncio.sleep(STALL_GRACE_S)


async def _run_pipeline(
    endpoints: Endpoints,
    tmp: Path,
    label: str,
    before: list[tuple[Any, str, bytes | None]],
    during: list[tuple[Any, str, bytes | None]],
    *,
    timeout: float = RUN_TIMEOUT_S,
    done: asyncio.Event | None = None,
    reference: asyncio.Event | None = None,
    monitor: bool = False,
) -> Run:
    """One pipeline over the slice, with `before` injected before the services start and `during` while they
    replay. `done` is set when this run finished; with `reference`, the run is declared stalled
    STALL_GRACE_S after `reference` is set (the clean run finished) if it has not finished by then."""
    ns = f"bad{label}{uuid.uuid4().hex[:6]}"
    cfg = load_config(TEMPLATE)
    cfg = cfg.model_copy(
        update={
            "system": cfg.system.model_copy(
                update={"kafka": cfg.system.kafka.model_copy(update={"namespace": ns})}
            )
        }
    )
    t = Topics(ns)
    specs = declared_topics(cfg, ns)
    bootstrap = endpoints.kafka
    await create_namespace(bootstrap, cfg, ns)
    log_dir = tmp / ns
    log_dir.mkdir(parents=True)
    common = [
        "--bootstrap",
        bootstrap.servers,
        "--redis-url",
        endpoints.redis_url,
        "--source",
        "replay",
        "--namespace",
        ns,
        "--config",
        str(TEMPLATE),
        "--log-level",
        "WARNING",
    ]
    run = Run(ns, Stack(bus=endpoints.bus))
    started = time.monotonic()
    try:
        await _inject(bootstrap, t, before, run)
        run.stack.start("registry", ["services.registry", *common], log_dir)
        run.stack.start("arbiter", ["services.arbiter", *common], log_dir)
        for pid in cfg.enabled_profiles():
            run.stack.start(f"execution.{pid}", ["services.execution", *common, "--profile", pid], log_dir)
            run.stack.start(f"strategy.{pid}", ["services.strategy", *common, "--profile", pid], log_dir)
        if monitor:
            run.stack.start(
                "monitor",
                ["services.monitor", *common, "--audit-file", str(log_dir / "audit.jsonl")],
                log_dir,
            )
        run.stack.start(
            "ingest", ["services.ingest", *common, "--data", str(DATA), "--hours", str(HOURS)], log_dir
        )
        if during:
            await asyncio.sleep(2.0)  # the workers are starting or replaying: the rest lands in the middle
            await _inject(bootstrap, t, during, run)
        expected = expected_finishers(cfg) | {f"execution:{pid}" for pid in cfg.enabled_profiles()}
        waiter = asyncio.create_task(
            wait_finished(bootstrap, t.status, expected, run.stack, timeout, started)
        )
        watchdog = asyncio.create_task(_stall_after(reference)) if reference is not None else None
        try:
            finished, _ = await asyncio.wait(
                {waiter, *([watchdog] if watchdog else [])}, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter in finished:
                waiter.result()
            else:
                waiter.cancel()
                run.error = f"stalled: not finished {STALL_GRACE_S:.0f} s after the clean run"
        except (TimeoutError, RuntimeError) as err:
            run.error = str(err)
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if done is not None:
                done.set()
        # Still there after the end of the replay: nothing crashed on the way (workers idle, they do not exit).
        run.alive_at_end = [p.name for p in run.stack.procs if p.popen.poll() is None]
        run.dead = [
            f"{p.name} ({p.popen.returncode}): {tail(p.log, 5)}"
            for p in run.stack.procs
            if p.popen.poll() not in (None, 0)
        ]
    finally:
        run.stack.stop()
    try:
        await _collect(bootstrap, t, run)
    finally:
        await delete_topics(bootstrap, [s.name for s in specs])
    run.seconds = time.monotonic() - started
    return run


@dataclass
class Results:
    clean: Run
    garbage: Run
    absurd: Run  # every absurd message not `alone`
    alone: dict[str, Run]  # label -> the run of an `alone` absurd message


@pytest.fixture(scope="module")
def results(infra: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Results]:
    tmp = tmp_path_factory.mktemp("bad-input")
    corpus = HAND_WRITTEN + hypothesis_corpus()
    extra = [
        Bad(f"{topic}:{b.label.split(':', 1)[1]}", topic, b.value, b.expect)
        for topic in ("audit", "commands")
        for b in _generic("candles")[:3]
    ]
    half = len(corpus) // 2
    before: list[tuple[Any, str, bytes | None]] = [(b, b.topic, b.value) for b in corpus[:half] + extra]
    during: list[tuple[Any, str, bytes | None]] = [(b, b.topic, b.value) for b in corpus[half:]]
    together: list[tuple[Any, str, bytes | None]] = [(a, a.topic, _j(a.value)) for a in ABSURD if not a.alone]
    alone = [a for a in ABSURD if a.alone]

    async def all_runs() -> list[Run]:
        # Side by side: most of a run is waiting (process start, group joins), not computing. A message that
        # stalls a pipeline is itself a finding: the absurd runs are not waited for long after the clean one.
        clean_done = asyncio.Event()
        return list(
            await asyncio.gather(
                _run_pipeline(infra, tmp, "c", [], [], done=clean_done),
                _run_pipeline(infra, tmp, "g", before, during, monitor=True),
                _run_pipeline(infra, tmp, "a", together, [], reference=clean_done),
                *(
                    _run_pipeline(infra, tmp, "s", [(a, a.topic, _j(a.value))], [], reference=clean_done)
                    for a in alone
                ),
            )
        )

    runs = asyncio.run(all_runs())
    yield Results(runs[0], runs[1], runs[2], {a.label: r for a, r in zip(alone, runs[3:], strict=True)})


# Who must dead-letter a bad message of each topic kind (each consumer that decodes the topic does).
DEAD_LETTERERS = {
    "candles": {"registry", *(f"strategy.{p}" for p in PROFILES), *(f"execution.{p}" for p in PROFILES)},
    "plans": {f"strategy.{p}" for p in PROFILES},
    "intents": {"arbiter"},
    "events": {f"strategy.{p}" for p in PROFILES},
    "decisions": {f"strategy.{p}" for p in PROFILES},
    "audit": {"monitor"},
    "commands": {*(f"strategy.{p}" for p in PROFILES), *(f"execution.{p}" for p in PROFILES)},
}


def _expected_services(topic_name: str, ns: str, key: bytes = b"") -> set[str]:
    """The services that must dead-letter a bad record of this topic (and key)."""
    base = topic_name[len(ns) + 1 :]
    if base in ("registry.plans", "orders.events", "orders.decisions") and key.decode() in PROFILES:
        return {f"strategy.{key.decode()}"}
    if base.startswith("orders.approved."):
        return {f"execution.{base.rsplit('.', 1)[1]}"}
    kind = {
        "md.candles": "candles",
        "registry.plans": "plans",
        "orders.intents": "intents",
        "orders.events": "events",
        "orders.decisions": "decisions",
        "audit.log": "audit",
        "control.commands": "commands",
    }[base]
    return DEAD_LETTERERS[kind]


# ------------------------------------------------------------------------------------------ the tests
def test_the_clean_run_trades(results: Results) -> None:
    clean = results.clean
    assert clean.error is None and not clean.dead, (clean.error, clean.dead)
    assert clean.outputs.get("fill"), (
        "the clean slice produced no fill: the comparison below would prove little"
    )
    assert clean.outputs.get("decided") and clean.outputs.get("plan")


def test_services_keep_running_through_garbage(results: Results) -> None:
    g = results.garbage
    assert g.error is None and not g.dead, (g.error, g.dead)
    # Every service reached the end of the replay (wait_finished) and was still running then (not the ingest,
    # which exits 0 when the replay is published).
    assert set(g.alive_at_end) >= {
        "registry",
        "arbiter",
        "monitor",
        *(f"{k}.{p}" for p in PROFILES for k in ("strategy", "execution")),
    }


def _dead_letter_problems(g: Run, wanted: Callable[[Any], bool]) -> tuple[list[str], int]:
    """For each injected record `wanted` selects: every service expected to read it dead-lettered it, with a
    reason naming the case's expectation. Returns the problems and how many (record, service) pairs were checked."""
    problems: list[str] = []
    checked = 0
    for (topic, partition, offset), case in sorted(g.injected.items()):
        if not wanted(case):
            continue
        got = g.dead_letters.get((topic, partition, offset), {})
        expected = _expected_services(topic, g.namespace, case.key if isinstance(case, Bad) else b"")
        if isinstance(case, Bad) and case.key.decode() in PROFILES:
            checked += 1
            if set(got) - expected:
                problems.append(f"{case.label}: also dead-lettered by {sorted(set(got) - expected)}")
        for service in sorted(expected):
            checked += 1
            reason = got.get(service)
            if reason is None:
                problems.append(
                    f"{case.label} on {topic}[{partition}]@{offset}: not dead-lettered by {service}"
                )
            elif case.expect not in reason:
                problems.append(
                    f"{case.label}: {service} gave {reason!r}, expected it to name {case.expect!r}"
                )
    return problems, checked


def test_every_bad_message_is_dead_lettered_with_its_reason(results: Results) -> None:
    g = results.garbage
    problems, checked = _dead_letter_problems(g, lambda case: case.topic not in ("audit", "commands"))
    assert checked > 300
    assert not problems, "\n".join(problems[:40])
    # Nothing that was not injected is dead-lettered: the valid messages all went through.
    stray = set(g.dead_letters) - set(g.injected)
    assert not stray, sorted(stray)[:10]


def test_garbage_loses_nothing_the_outputs_equal_the_clean_run(results: Results) -> None:
    clean, garbage = results.clean.outputs, results.garbage.outputs
    for kind in ("plan", "decided", "order", "fill"):
        missing = clean.get(kind, set()) - garbage.get(kind, set())
        extra = garbage.get(kind, set()) - clean.get(kind, set())
        assert not missing and not extra, f"{kind}: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}"


def test_garbage_on_audit_and_commands_is_dead_lettered(results: Results) -> None:
    """audit.log by the monitor (its only consumer), control.commands by every worker that reads commands
    (the strategy and execution workers), each with the reason."""
    g = results.garbage
    problems, checked = _dead_letter_problems(g, lambda case: case.topic in ("audit", "commands"))
    assert {c.topic for c in g.injected.values()} >= {"audit", "commands"} and checked
    assert not problems, "\n".join(problems)


def _refused(results: Results, case: Absurd) -> list[str]:
    """What is missing for `case` to count as refused: a dead letter from every service that reads its topic,
    or, for an order, a rejection the pipeline reports itself (a decision or an order event)."""
    run = results.alone.get(case.label, results.absurd)
    problems = [] if run.error is None else [f"the run did not complete: {run.error[:300]}"]
    rejected_intents = {k[2] for k in run.outputs.get("decided", set()) if k[3] == "rejected"}
    rejected_orders = {k[2] for k in run.outputs.get("order", set()) if k[3] == "rejected"}
    if (
        case.value.get("intent_id") in rejected_intents
        or case.value.get("client_order_id") in rejected_orders
    ):
        return problems
    hits = [k for k, c in run.injected.items() if c.label == case.label]
    assert hits, case.label
    for key in hits:
        got = set(run.dead_letters.get(key, {}))
        want = _expected_services(key[0], run.namespace)
        if case.topic in ("events", "plans") and case.value.get("profile") in PROFILES:
            want = {f"strategy.{case.value['profile']}"}  # the other profiles' workers may just skip it
        if not want <= got:
            problems.append(f"{case.what}: dead-lettered by {sorted(got)}, expected {sorted(want)}")
    if case.alone:
        for kind in ("plan", "decided", "order", "fill"):
            lost = results.clean.outputs.get(kind, set()) - run.outputs.get(kind, set())
            if lost:
                problems.append(f"{len(lost)} {kind} output(s) of the clean run lost")
    return problems


def _absurd_params() -> list[Any]:
    out = []
    for a in ABSURD:
        marks = [pytest.mark.xfail(strict=True, reason=a.today)] if a.today else []
        out.append(pytest.param(a, id=a.label, marks=marks))
    return out


@pytest.mark.parametrize("case", _absurd_params())
def test_absurd_values_that_pass_the_schema_are_refused(results: Results, case: Absurd) -> None:
    """Dead-lettered by every service that reads it, or rejected with a reason the pipeline reports; and the
    services keep running."""
    run = results.alone.get(case.label, results.absurd)
    assert not run.dead, run.dead
    problems = _refused(results, case)
    assert not problems, "\n".join(problems)


def test_forged_fill_is_dead_lettered_naming_its_intent_and_moves_no_books(results: Results) -> None:
    (case,) = [a for a in ABSURD if a.label == "fill-forged"]
    run = results.absurd
    (key,) = [k for k, c in run.injected.items() if c.label == case.label]
    reason = run.dead_letters.get(key, {}).get("strategy.profile_a", "")
    assert case.value["intent_id"] in reason and "no OrderDecided of profile_a" in reason, reason
    # Applied, it would have changed profile_a's cash and position, hence its later orders and fills.
    assert run.outputs.get("fill") == results.clean.outputs.get("fill")


# ------------------------------------------------------------------------------------------ files
def _template() -> dict[str, Any]:
    data = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _bad_configs() -> list[Any]:
    cases: list[Any] = []

    def case(name: str, mutate: Any, *expect: str) -> None:
        d = _template()
        text = mutate(d)
        cases.append(pytest.param(text if isinstance(text, str) else yaml.safe_dump(d), expect, id=name))

    case("not-yaml", lambda d: "profiles:\n  profile_a: [unclosed\n", "not valid YAML", "line")
    case("empty-file", lambda d: "", "top level must be a mapping")
    case(
        "misspelt-key",
        lambda d: d["profiles"]["profile_a"]["risk_management"].update(stop_los_pct=1.0),
        "profile_a",
        "stop_los_pct",
        "unknown key",
    )
    case(
        "weights-sum-0.9",
        lambda d: d["profiles"]["profile_b"]["strategy_config"]["strategy_weights"].update(
            quantum_strategy_calculator=0.15
        ),
        "profile_b",
        "strategy_weights",
        "sum to 1",
    )
    case(
        "negative-stop-loss",
        lambda d: d["profiles"]["profile_a"]["risk_management"].update(stop_loss_pct=-2.5),
        "profile_a",
        "stop_loss_pct",
    )
    case(
        "nan-entropy",
        lambda d: d["profiles"]["profile_a"]["strategy_config"].update(entropy_threshold=float("nan")),
        "profile_a",
        "entropy_threshold",
    )
    case(
        "empty-assets",
        lambda d: d["profiles"]["profile_a"]["strategy_config"].update(base_assets=[]),
        "profile_a",
        "base_assets",
    )
    case(
        "pair-outside-assets",
        lambda d: d["profiles"]["profile_b"]["trading_params"].update(trading_pairs=["DOGE/USDC"]),
        "profile_b",
        "DOGE/USDC",
    )
    case(
        "rotation-zero",
        lambda d: d["profiles"]["profile_a"]["profile_hash"].update(hash_rotation_interval=0),
        "profile_a",
        "hash_rotation_interval",
    )
    case("no-profiles", lambda d: d.update(profiles={}), "profiles")
    case("live-with-placeholders", lambda d: d.update(system={"mode": "live"}), "profile_a", "placeholder")
    return cases


@pytest.mark.parametrize(("text", "expect"), _bad_configs())
def test_bad_config_files_are_refused_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expect: tuple[str, ...]
) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(text, encoding="utf-8")
    # In process (the CLI's own handler): a process per case would cost seconds each on a loaded machine.
    assert commands_config.validate(argparse.Namespace(file=path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("INVALID: "), err
    for piece in expect:
        assert piece in err, (piece, err)


def test_config_validate_cli_exits_1_with_the_message(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    d = _template()
    d["profiles"]["profile_a"]["trading_params"]["max_open_positons"] = 4
    path.write_text(yaml.safe_dump(d), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "mpctl.cli", "config", "validate", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "profile_a" in proc.stderr and "max_open_positons" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "mpctl.cli", "config", "validate", str(tmp_path / "no.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "no.yaml" in missing.stderr and "cannot read" in missing.stderr


def _ts(line_no: int) -> int:
    """The open time (ms) the bundled hourly files have on a line (line 1 is the header)."""
    return 1_627_776_000_000 + (line_no - 2) * 3_600_000


CORRUPTIONS = [
    pytest.param(40, f"{_ts(40)},41000,41100,40900", "expected 6 comma-separated fields", id="short-row"),
    pytest.param(41, f"{_ts(41)},41000,41100,40900,abc,12", "close 'abc' is not a number", id="text-price"),
    pytest.param(
        42, f"{_ts(42)},41000,40000,40900,41050,12", "high/low do not bound open/close", id="high-below-open"
    ),
    pytest.param(
        43, f"{_ts(42)},41000,41100,40900,41050,12", "timestamps must increase strictly", id="time-goes-back"
    ),
    pytest.param(
        44, "2021-08-02T18:00,41000,41100,40900,41050,12", "is not an integer (ms)", id="iso-timestamp"
    ),
    pytest.param(45, f"{_ts(45)},41000,41100,40900,NaN,12", "close 'NaN' is not finite", id="nan-close"),
    pytest.param(46, f"{_ts(46)},41000,41100,40900,41050,-3", "volume >= 0", id="negative-volume"),
]


def _corrupted_data(tmp_path: Path, line_no: int, new_line: str) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    for src in DATA.glob("binance_*_1h.csv.gz"):
        (data / src.name).write_bytes(src.read_bytes())
    target = data / "binance_BTC-USDT_1h.csv.gz"
    lines = gzip.decompress(target.read_bytes()).decode().splitlines()
    lines[line_no - 1] = new_line
    target.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return data, target


@pytest.mark.parametrize(("line_no", "new_line", "expect"), CORRUPTIONS)
def test_corrupted_candle_file_is_refused_naming_file_and_line(
    tmp_path: Path, line_no: int, new_line: str, expect: str
) -> None:
    data, target = _corrupted_data(tmp_path, line_no, new_line)
    cfg = load_config(TEMPLATE)
    with pytest.raises(CandleFileError) as err:
        load_products(data, cfg.all_products())  # what the ingest does before it publishes anything
    assert str(err.value).startswith(f"{target}:{line_no}: "), str(err.value)
    assert expect in str(err.value)


def _ingest(infra: Endpoints, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "services.ingest",
            "--config",
            str(TEMPLATE),
            "--bootstrap",
            infra.kafka.servers,
            "--namespace",
            f"badfile{uuid.uuid4().hex[:6]}",
            "--data",
            str(data),
            "--hours",
            "24",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **principal_env(infra, "badfile.ingest")),
    )


def test_ingest_exits_non_zero_naming_the_corrupted_file_and_line(tmp_path: Path, infra: Endpoints) -> None:
    data, target = _corrupted_data(tmp_path, 41, f"{_ts(41)},41000,41100,40900,abc,12")
    proc = _ingest(infra, data)
    assert proc.returncode != 0
    assert f"{target}:41: close 'abc' is not a number" in proc.stderr, proc.stderr[-2000:]


def test_ingest_reports_a_corrupted_file_without_a_traceback(tmp_path: Path, infra: Endpoints) -> None:
    data, _ = _corrupted_data(tmp_path, 41, f"{_ts(41)},41000,41100,40900,abc,12")
    proc = _ingest(infra, data)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_absurd_summary_for_the_report(results: Results) -> None:
    """Prints what each absurd message met (`pytest -s` shows it); asserts only that the runs ran."""
    summary = {a.label: _refused(results, a) or "refused" for a in ABSURD}
    print(
        json.dumps(
            {
                "absurd": summary,
                "seconds": {
                    "clean": round(results.clean.seconds, 1),
                    "garbage": round(results.garbage.seconds, 1),
                    "absurd": round(results.absurd.seconds, 1),
                    **{k: round(r.seconds, 1) for k, r in results.alone.items()},
                },
            },
            indent=2,
        )
    )
    assert results.absurd.outputs.get("plan")
