"""Two arbiter processes over real Kafka share the intents partitions; one is killed with SIGKILL in the middle
of the run (its partitions move to the other), restarted (it rebuilds its state from the inputs), then the
other is stopped: every decision published, by whichever process, equals the decision of one pure run of the
domain over the same inputs, and every rule (plan echo, opposite side, internal cross, crowding, exposure,
correlation) has acted in it. A redelivered intent gets its decision again, unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from mpctl.infra import Endpoints
from services.arbiter import domain
from shared.clock import derived_id
from shared.codec import DecodeError, decode
from shared.config import AppConfig, load_config
from shared.kafka import Publisher
from shared.messages import (
    CorrelationAlert,
    ExecuteOrder,
    InternalCrossOpportunity,
    Message,
    OrderDecided,
    PlaceOrder,
    WatermarkAdvanced,
    WorkerFinished,
)
from shared.topics import Topics
from tests.bus import create_namespace, service_env
from tests.conftest import free_ports
from tests.unit.builders import HOUR, T0, candle, place_order, plan, step_completed, watermark

ROOT = Path(__file__).resolve().parents[2]
THREE = ROOT / "config" / "examples" / "three_profiles.yaml"
A, B, C = "profile_a", "profile_b", "profile_c"
PRODUCTS = ("BTC/USDC", "ETH/USDC", "SOL/USDC", "XRP/USDC")
STEPS = 16
ARBITER = {
    "conflict_window_s": 5400,  # an order of the previous step is still "recent"
    "min_cross_profile_gap_ms": 800,
    "max_product_notional": 500.0,
    "max_total_notional": 2500.0,
    "internal_cross": "execute",
    "correlation_window_steps": 4,
    "correlation_min_steps": 3,
}


def write_config(tmp: Path, namespace: str, arbiter: dict[str, Any]) -> tuple[Path, AppConfig]:
    data = yaml.safe_load(THREE.read_text())
    data["system"] = {"kafka": {"namespace": namespace}, "arbiter": arbiter}
    path = tmp / "arbiter.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, load_config(path)


# ------------------------------------------------------------------------------------------ the inputs
def fp(profile: str, epoch: int) -> str:
    return derived_id("fp", profile, epoch) * 2


@dataclass
class Script:
    cfg: AppConfig
    plans: dict[tuple[str, int], Message] = field(default_factory=dict)
    market: dict[int, list[Message]] = field(default_factory=dict)
    intents: dict[int, list[PlaceOrder]] = field(default_factory=dict)

    def epoch(self, profile: str, t: int) -> int:
        return t // self.cfg.profiles[profile].profile_hash.hash_rotation_interval

    def intent(self, k: int, profile: str, side: str, product: str, size: str, **kw: Any) -> PlaceOrder:
        t = T0 + k * HOUR
        e = kw.pop("epoch", self.epoch(profile, t))
        price = next(c for c in self.market[k] if getattr(c, "product", None) == product).close  # type: ignore[attr-defined]
        return place_order(
            profile,
            side,
            step=t,
            product=product,
            size=size,
            price=price,
            epoch=e,
            fingerprint=kw.pop("fingerprint", fp(profile, e)),
            **kw,
        )


def build_script(cfg: AppConfig) -> Script:
    s = Script(cfg)
    base = {"BTC/USDC": 100.0, "ETH/USDC": 50.0, "SOL/USDC": 20.0, "XRP/USDC": 2.0}
    moves = [0, 3, -2, 4, -1, 2, -3, 5, 1, -2, 3, -1, 2, 0, -2, 1]
    for k in range(STEPS):
        t = T0 + k * HOUR
        px = {
            p: round(v * (1 + moves[k] / 100 + (i - 1.5) * 0.002 * (k % 3)), 4)
            for i, (p, v) in enumerate(base.items())
        }
        s.market[k] = [candle(p, t, v, v, v, v) for p, v in px.items()] + [watermark(t)]
        for pid in (A, B, C):
            r = cfg.profiles[pid].profile_hash.hash_rotation_interval
            e = t // r
            s.plans.setdefault(
                (pid, e), plan(pid, e, interval=r, fingerprint=fp(pid, e), hash_hex=fp(pid, e))
            )
    i = s.intent
    s.intents = {
        0: [
            i(0, A, "buy", "BTC/USDC", "2"),
            i(0, B, "buy", "BTC/USDC", "2"),
            i(0, C, "buy", "ETH/USDC", "4"),
        ],
        1: [],
        2: [i(2, C, "buy", "BTC/USDC", "3")],  # beyond max_product_notional: trimmed
        3: [i(3, A, "sell", "XRP/USDC", "10"), i(3, C, "buy", "XRP/USDC", "25")],  # netted (execute mode)
        4: [i(4, B, "sell", "BTC/USDC", "2")],
        5: [
            i(5, A, "buy", "BTC/USDC", "1"),
            i(5, C, "buy", "SOL/USDC", "2"),
        ],  # A's: opposite to B's recent sell
        6: [i(6, C, "buy", "SOL/USDC", "2", fingerprint="ee" * 32)],  # forged
        7: [i(7, A, "buy", "SOL/USDC", "1", epoch=(T0 + 6 * HOUR) // HOUR)],  # stale after a rotation
        8: [i(8, B, "buy", "ETH/USDC", "3"), i(8, C, "buy", "ETH/USDC", "3")],
        9: [],
        10: [i(10, C, "buy", "XRP/USDC", "40"), i(10, A, "buy", "ETH/USDC", "1")],
        11: [i(11, B, "buy", "SOL/USDC", "5"), i(11, A, "buy", "SOL/USDC", "5")],
        12: [i(12, C, "sell", "ETH/USDC", "4"), i(12, B, "buy", "XRP/USDC", "30")],
        13: [i(13, A, "sell", "BTC/USDC", "3"), i(13, C, "buy", "BTC/USDC", "1")],
        14: [
            i(14, B, "buy", "BTC/USDC", "2"),
            i(14, A, "buy", "XRP/USDC", "20"),
            i(14, C, "buy", "SOL/USDC", "3"),
        ],
        15: [i(15, A, "sell", "ETH/USDC", "1"), i(15, B, "sell", "SOL/USDC", "5")],
    }
    return s


def intents_partition(product: str, n: int) -> int:
    return int(murmur2(product.encode()) & 0x7FFFFFFF) % n  # the producer's default partitioner


def expected_outputs(s: Script) -> dict[str, Message]:
    """One pure run over every input: plans, market data, then each step's intents and markers."""
    state = domain.new_state(s.cfg)
    n = s.cfg.system.kafka.intent_partitions
    out: list[Message] = []
    for m in s.plans.values():
        out += domain.decide(state, m, 0)
    for k in range(STEPS):
        for m in s.market[k]:
            out += domain.decide(state, m, 0)
        for it in s.intents[k]:
            out += domain.decide(state, it, intents_partition(it.product, n))
        for pid in (A, B, C):
            for p in range(n):
                out += domain.decide(state, step_completed(pid, T0 + k * HOUR, final=k == STEPS - 1), p)
    out += domain.decide(state, place_order("profile_z", "buy", step=T0), 0)
    return {m.id: m for m in out}


# ------------------------------------------------------------------------------------------ processes
@dataclass
class Arbiter:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path

    async def metrics(self) -> str | None:
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{self.port}/metrics") as r,
            ):
                return await r.text()
        except aiohttp.ClientError:
            return None

    async def owned(self) -> int | None:
        text = await self.metrics()
        if text is None:
            return None
        for line in text.splitlines():
            if line.startswith("mp_arbiter_partitions_owned "):
                return int(float(line.split()[1]))
        return None


def start_arbiter(name: str, config: Path, endpoints: Endpoints, namespace: str, tmp: Path) -> Arbiter:
    (port,) = free_ports(1)
    log = tmp / f"{name}.log"
    fh = log.open("ab")
    argv = [
        "services.arbiter",
        "--config",
        str(config),
        "--bootstrap",
        endpoints.kafka.servers,
        "--namespace",
        namespace,
        "--instance",
        name,
        "--metrics-port",
        str(port),
    ]
    popen = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        stdout=fh,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **service_env(endpoints, argv)),
    )
    fh.close()
    return Arbiter(name, popen, port, log)


async def until(
    check: Callable[[], Any], what: str, timeout: float = 90.0, procs: list[Arbiter] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ok = check()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        for p in procs or []:
            if p.popen.poll() not in (None, -signal.SIGKILL):
                raise AssertionError(f"{p.name} exited {p.popen.returncode}:\n{p.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.log.read_text()[-2000:]}" for p in procs or [])
            raise AssertionError(f"{what} not reached within {timeout:.0f} s\n{logs}")
        await asyncio.sleep(0.3)


class Outputs:
    """Everything the arbiters publish, read as it comes."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False)
        self.topics = topics
        self.copies: dict[str, list[Message]] = defaultdict(list)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Outputs:
        await self.consumer.start()
        tps = []
        for t in self.topics:
            self.consumer.subscribe([t])
            await self.consumer._client.force_metadata_update()  # noqa: SLF001
            self.consumer.unsubscribe()
            tps += [TopicPartition(t, p) for p in sorted(self.consumer.partitions_for_topic(t) or {0})]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        self.task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.consumer.stop()

    async def _read(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                for rec in recs:
                    try:
                        m = decode(rec.value)
                    except DecodeError:
                        continue
                    if isinstance(
                        m,
                        OrderDecided
                        | ExecuteOrder
                        | InternalCrossOpportunity
                        | CorrelationAlert
                        | WorkerFinished,
                    ) and (not isinstance(m, WorkerFinished) or m.service == "arbiter"):
                        self.copies[m.id].append(m)

    def decided(self) -> set[str]:
        return {c[0].intent_id for c in self.copies.values() if isinstance(c[0], OrderDecided)}


@contextlib.asynccontextmanager
async def publisher(bootstrap: str) -> AsyncIterator[Publisher]:
    pub = Publisher(bootstrap, client_id="arbiter-cluster-test")
    await pub.start()
    try:
        yield pub
    finally:
        await pub.stop()


# ------------------------------------------------------------------------------------------ the test
@pytest.mark.timeout(400)
async def test_two_arbiters_one_killed_and_restarted_decide_exactly_as_one_pure_run(
    infra: Endpoints, namespace: str, tmp_path: Path
) -> None:
    config, cfg = write_config(tmp_path, namespace, ARBITER)
    t = Topics(namespace)
    b = infra.kafka
    await create_namespace(b, cfg)
    script = build_script(cfg)
    expected = expected_outputs(script)
    decisions = [m for m in expected.values() if isinstance(m, OrderDecided)]
    rules = {(d.verdict, d.rule) for d in decisions}
    # The scenario exercises every rule (checked on the pure run, then on Kafka).
    for rule in [
        ("rejected", "plan_echo"),
        ("rejected", "opposite_side"),
        ("approved", "internal_cross"),
        ("delayed", "crowding"),
        ("approved", "exposure_cap"),
        ("approved", "correlation_guard"),
        ("rejected", "unknown_profile"),
    ]:
        assert rule in rules, f"{rule} not in {sorted(rules)}"
    assert any(isinstance(m, CorrelationAlert) for m in expected.values())
    assert any(isinstance(m, InternalCrossOpportunity) and m.executed for m in expected.values())

    n = cfg.system.kafka.intent_partitions
    procs: list[Arbiter] = []

    async def publish_steps(pub: Publisher, ks: range, *, late_plan: tuple[str, int] | None = None) -> None:
        for k in ks:
            tk = T0 + k * HOUR
            for pid in (A, B, C):
                key = (pid, script.epoch(pid, tk))
                if key in sent_plans or key == late_plan:
                    continue
                await pub.send(t.plans, script.plans[key], key=pid)
                sent_plans.add(key)
            for m in script.market[k]:
                if isinstance(m, WatermarkAdvanced):
                    await pub.send_to_all_partitions(t.candles, m)
                else:
                    await pub.send(t.candles, m, key=getattr(m, "product", None))
            for it in script.intents[k]:
                await pub.send(t.intents, it, key=it.product)
            for pid in (A, B, C):
                await pub.send_to_all_partitions(t.intents, step_completed(pid, tk, final=k == STEPS - 1))
        await pub.flush()

    def decided_upto(k: int) -> Callable[[], bool]:
        want = {it.intent_id for j in range(k) for it in script.intents[j]}
        return lambda: want <= out.decided()

    sent_plans: set[tuple[str, int]] = set()
    try:
        async with (
            Outputs(b, [t.decisions, t.audit, *(t.approved(p) for p in (A, B, C)), t.status]) as out,
            publisher(b) as pub,
        ):
            first, second = (start_arbiter(x, config, infra, namespace, tmp_path) for x in ("one", "two"))
            procs += [first, second]

            async def shared() -> bool:
                owned = [await p.owned() for p in (first, second)]
                return all(o is not None and o >= 1 for o in owned) and sum(o or 0 for o in owned) == n

            await until(shared, "both arbiters own partitions", procs=procs)
            await publish_steps(pub, range(0, 4))
            await pub.send(t.intents, place_order("profile_z", "buy", step=T0), key="BTC/USDC")
            await pub.flush()
            await until(decided_upto(4), "decisions of steps 0-3", procs=procs)

            first.popen.send_signal(
                signal.SIGKILL
            )  # mid-run: its partitions move to the other after its session
            first.popen.wait()
            late = (A, script.epoch(A, T0 + 5 * HOUR))
            await publish_steps(
                pub, range(4, 8), late_plan=late
            )  # step 5's plan of A arrives after its intents
            await asyncio.sleep(1.0)
            assert {it.intent_id for it in script.intents[5] if it.profile == A}.isdisjoint(out.decided())
            await pub.send(t.plans, script.plans[late], key=A)
            sent_plans.add(late)
            await pub.flush()
            await until(decided_upto(8), "decisions of steps 4-7 (after the takeover)", procs=[second])

            restarted = start_arbiter("one-again", config, infra, namespace, tmp_path)
            procs.append(restarted)

            async def rejoined() -> bool:
                return (await restarted.owned() or 0) >= 1

            await until(rejoined, "the restarted arbiter owns a partition", procs=[second, restarted])
            redelivered = script.intents[3][1]
            await publish_steps(pub, range(8, 12))
            await pub.send(t.intents, redelivered, key=redelivered.product)  # a redelivery of an old intent
            await pub.flush()
            await until(decided_upto(12), "decisions of steps 8-11", procs=[second, restarted])

            second.popen.send_signal(signal.SIGTERM)
            assert second.popen.wait(30) == 0

            async def alone() -> bool:
                return await restarted.owned() == n

            await until(alone, "the restarted arbiter owns every partition", procs=[restarted])
            await publish_steps(pub, range(12, STEPS))  # decided by the rebuilt state alone
            finished = {derived_id("finished", "arbiter", p) for p in range(n)}

            def complete() -> bool:
                return decided_upto(STEPS)() and finished <= set(out.copies)

            await until(complete, "every decision and every partition finished", procs=[restarted])
            await asyncio.sleep(1.0)  # late duplicates, if any, are read too
            copies = dict(out.copies)
            metrics = await restarted.metrics() or ""
    finally:
        for p in procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
                try:
                    p.popen.wait(30)
                except subprocess.TimeoutExpired:
                    p.popen.kill()

    # Every published copy equals the pure run's message; nothing is missing, nothing extra.
    published = {i: c for i, c in copies.items() if not isinstance(c[0], WorkerFinished)}
    want = {i: m for i, m in expected.items() if not isinstance(m, WorkerFinished)}
    assert set(published) == set(want), (
        sorted(set(want) - set(published))[:5],
        sorted(set(published) - set(want))[:5],
    )
    for i, cs in published.items():
        for c in cs:
            assert c.model_dump() == want[i].model_dump(), (c, want[i])
    # The redelivered intent's decision was published again (and is identical, checked above).
    assert len(copies[derived_id("decision", redelivered.intent_id)]) >= 2
    # The killed process's partitions were taken over: the restarted one rebuilt its state and decided alone.
    assert "publishing from offset" in restarted.log.read_text()
    # Its metrics count what it published, by rule and verdict (steps 12-15 hold two opposite-side rejections).
    line = 'mp_arbiter_decided_total{rule="opposite_side",verdict="rejected"} '
    counted = [float(x[len(line) :]) for x in metrics.splitlines() if x.startswith(line)]
    assert counted and counted[0] >= 2, metrics
    assert "mp_arbiter_internal_cross_opportunities_total" in metrics
