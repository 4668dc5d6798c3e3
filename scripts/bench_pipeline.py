"""Benchmark: the whole pipeline (ingest -> strategy per profile -> arbiter -> paper execution), every service its
own process as `mpctl demo` runs them, for several profile counts; next to a raw aiokafka baseline on the same
broker.

    .venv/bin/python scripts/bench_pipeline.py [--profiles 2,8,32] [--hours 200] [--data data/market]
        [--json reports/bench/pipeline.json] [--markdown docs/benchmarks.md] [--latency-hours 200]
        [--before EARLIER.json] [--latency-speed S2,S8,...]

For each profile count N (configs generated from the template: N profiles alternating profile_a's and
profile_b's settings, each with its own hash settings and priority):

1. Throughput run: the services are started and the benchmark waits until every consumer group has joined;
   then the ingest replays `--hours` of candles as fast as the pipeline takes them. Market events per second
   = candles published / (Kafka CreateTime of the last output of the run - CreateTime of the first candle),
   where the last output is the latest order event or end-of-run marker (every strategy worker's final marker
   comes after the outcome of its last order).
2. Latency run: a fresh namespace and fresh processes; the ingest is paced at half the step rate the
   throughput run reached, so the pipeline keeps up and the figure is latency rather than queueing.
   Latency of one order = CreateTime of its 'submitted' OrderUpdated (the execution worker's
   acknowledgement) - CreateTime of the candle that caused the intent (the candle of the order's product at
   the step named by the correlation id "step:<open_time>").

   Each order's latency is also cut at every hop (`hop_breakdown`): candle > plan > intent > barrier (the
   step's last StepCompleted marker) > decision > approved > submitted, each point the CreateTime of the record
   that ends the hop, p50/p99/max per hop; the deliberate delays (the arbiter's not_before, the worker's de-sync)
   are event time and reported apart. `--latency-speed` fixes the replay speed of the latency runs (one per
   profile count) to offer the same load as an earlier run. During the latency run the stack's memory (RSS and
   PSS of every service process, /proc/<pid>/smaps_rollup) is sampled every 0.5 s, with each service's CPU
   seconds.

Raw baseline, on the same broker in the same run: an aiokafka producer (acks=all, idempotent, linger 2 ms, as
the services' Publisher) sends as many messages as the largest run had candles, of the candles' mean encoded
size, to a one-partition topic, and one consumer reads them: messages/s from first send to last receipt.
Raw latency: one message at a time, CreateTime to receipt; and four round trips one after the other (each
message sent when the previous one was received), the fewest a candle's way to an order takes: the latency
target is a p99 of at most 3x theirs with 2 profiles, and under 100 ms with 8. Ratios = pipeline / raw.
`--before` shows an earlier result's figures next to this run's. The tables are printed (stderr) after the JSON.

Prints one JSON document, writes it to `--json`, and writes `--markdown` with the machine described.
Topics of the runs are deleted at the end; service logs stay in reports/bench/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpctl import infra  # noqa: E402
from mpctl.commands_demo import Stack, expected_finishers, tail, wait_finished  # noqa: E402
from mpctl.stack import (  # noqa: E402
    create_topics,  # noqa: E402
    profile_groups,
    profiles_per_process,
)
from services.monitor.health import fetch_health  # noqa: E402
from shared.bus import KafkaAccess  # noqa: E402
from shared.codec import DecodeError, decode  # noqa: E402
from shared.config import AppConfig, parse_config  # noqa: E402
from shared.kafka import delete_topics, ensure_topics  # noqa: E402
from shared.messages import (  # noqa: E402
    CandleClosed,
    ExecuteOrder,
    OrderDecided,
    OrderFilled,
    OrderUpdated,
    PlaceOrder,
    PlanPublished,
    StepCompleted,
)
from shared.topics import Topics, TopicSpec, declared_topics  # noqa: E402

TEMPLATE = ROOT / "config" / "coinbase_profiles.yaml"


# ---------------------------------------------------------------------------------------------- configs
def bench_config(n: int) -> dict[str, Any]:
    """N profiles from the template's two, alternating, each with distinct hash settings and priority."""
    data = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    bases = list(data["profiles"].values())
    profiles = {}
    for i in range(n):
        p = copy.deepcopy(bases[i % len(bases)])
        p["name"] = f"Bench profile {i}"
        p["priority"] = i + 1
        p["profile_hash"]["base_hash"] = f"bench_profile_{i:03d}"
        p["profile_hash"]["entropy_seed"] = round(0.05 + 0.9 * i / max(1, n), 6)
        profiles[f"p{i:03d}"] = p
    return {"profiles": profiles}


# ---------------------------------------------------------------------------------------------- reading
async def read_all(bootstrap: KafkaAccess, topic: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of a topic, from the beginning to the end offsets at the time of the call."""
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False, max_poll_records=5000)
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic)
        for _ in range(50):
            if parts:
                break
            await consumer._client.force_metadata_update()  # noqa: SLF001 - no public refresh in aiokafka
            parts = consumer.partitions_for_topic(topic)
            await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(parts or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[ConsumerRecord[bytes, bytes]] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=1000)
            for recs in batch.values():
                out.extend(recs)
        return out
    finally:
        await consumer.stop()


async def total_records(bootstrap: KafkaAccess, specs: list[TopicSpec]) -> int:
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(s.name, p) for s in specs for p in range(s.partitions)]
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        return sum(ends[tp] - begins[tp] for tp in tps)
    finally:
        await consumer.stop()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def spread(values: list[float]) -> dict[str, Any]:
    """p50 / p99 / max of a list of milliseconds (None when empty)."""
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


# The hops of one order, in the order the pipeline takes them (see hop_breakdown).
HOPS = (
    "candle>plan",
    "plan>intent",
    "intent>barrier",
    "barrier>decision",
    "decision>approved",
    "approved>submitted",
)


def _ms(t: datetime) -> int:
    return round(t.timestamp() * 1000)


def hop_breakdown(
    candle_ts: dict[tuple[str, int], int],
    plans: list[ConsumerRecord[bytes, bytes]],
    intents: list[ConsumerRecord[bytes, bytes]],
    events: list[ConsumerRecord[bytes, bytes]],
    approved: list[ConsumerRecord[bytes, bytes]],
) -> dict[str, Any]:
    """Each order's way from its candle to 'submitted', cut at every hop (Kafka CreateTime of each record):

    candle>plan: the plan the step needs (its profile's latest plan starting at or before the step) published
      after the candle; 0 when it was there before (the hop starts at the later of the two);
    plan>intent: the strategy's PlaceOrder;
    intent>barrier: the step's last StepCompleted marker of any profile (the arbiter's barrier), 0 if before;
    barrier>decision: the arbiter's OrderDecided; decision>approved: its ExecuteOrder (orders.approved.<p>);
    approved>submitted: the execution worker's OrderUpdated 'submitted'.

    The hops add up to the total. The deliberate delays (the arbiter's not_before, the worker's de-sync) are in
    event time and do not hold the records back in a replay: they are reported apart, in event-time ms."""
    plan_times: dict[str, list[tuple[int, int]]] = {}  # profile -> (epoch start s, CreateTime)
    for rec in plans:
        msg = decode(rec.value)
        if isinstance(msg, PlanPublished):
            plan_times.setdefault(msg.profile, []).append((int(msg.epoch_start.timestamp()), rec.timestamp))
    for v in plan_times.values():
        v.sort()
    intent_at: dict[str, tuple[int, PlaceOrder]] = {}
    barrier: dict[int, int] = {}  # step (s) -> CreateTime of its last marker
    for rec in intents:
        msg = decode(rec.value)
        if isinstance(msg, PlaceOrder):
            intent_at.setdefault(msg.intent_id, (rec.timestamp, msg))
        elif isinstance(msg, StepCompleted):
            t = int(msg.step_time.timestamp())
            barrier[t] = max(barrier.get(t, 0), rec.timestamp)
    decided: dict[str, tuple[int, OrderDecided]] = {}
    submitted: dict[str, tuple[int, OrderUpdated]] = {}
    for rec in events:
        msg = decode(rec.value)
        if isinstance(msg, OrderDecided):
            decided.setdefault(msg.intent_id, (rec.timestamp, msg))
        elif isinstance(msg, OrderUpdated) and msg.status == "submitted":
            submitted.setdefault(msg.intent_id, (rec.timestamp, msg))
    sent: dict[str, tuple[int, ExecuteOrder]] = {}
    for rec in approved:
        msg = decode(rec.value)
        if isinstance(msg, ExecuteOrder):
            sent.setdefault(msg.intent_id, (rec.timestamp, msg))
    cuts: dict[str, list[float]] = {h: [] for h in HOPS}
    total: list[float] = []
    not_before: list[float] = []
    desync: list[float] = []
    slowest: list[tuple[float, dict[str, Any]]] = []
    for intent_id, (sub_ts, sub) in submitted.items():
        if intent_id not in intent_at or intent_id not in decided or intent_id not in sent:
            continue
        int_ts, intent = intent_at[intent_id]
        t = int(intent.step_time.timestamp())
        cause = candle_ts.get((intent.product, t))
        if cause is None:
            continue
        starts = [ts for start, ts in plan_times.get(intent.profile, []) if start <= t]
        plan_ready = max(cause, starts[-1]) if starts else cause
        bar_ready = max(int_ts, barrier.get(t, int_ts))
        dec_ts, dec = decided[intent_id]
        app_ts, order = sent[intent_id]
        points = [cause, plan_ready, int_ts, bar_ready, dec_ts, app_ts, sub_ts]
        for name, a, b in zip(HOPS, points, points[1:], strict=False):
            cuts[name].append(float(b - a))
        total.append(float(sub_ts - cause))
        hops = {name: b - a for name, a, b in zip(HOPS, points, points[1:], strict=False)}
        where = {"profile": intent.profile, "step": t, "candle_published_ms": cause}
        slowest.append((float(sub_ts - cause), {"total": sub_ts - cause, **where, "hops": hops}))
        not_before.append(float(_ms(order.not_before) - _ms(dec.event_time)))
        desync.append(float(_ms(sub.event_time) - _ms(order.not_before)))
    return {
        "orders": len(total),
        "total": spread(total),
        "hops": {h: spread(v) for h, v in cuts.items()},
        "deliberate_event_ms": {"not_before": spread(not_before), "desync": spread(desync)},
        # The tail, order by order: which hop a slow order spent its time in (p99 is one or two orders here).
        "slowest": [o for _, o in sorted(slowest, key=lambda x: -x[0])[:5]],
    }


# ---------------------------------------------------------------------------------------------- memory
def proc_memory_kib(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) of one process in KiB, from /proc/<pid>/smaps_rollup (None once it is gone)."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return rss, pss


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (the workers a forked host started, MPCTL_PROFILES_PER_PROCESS)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def tree_memory_kib(pid: int) -> tuple[int, int, int] | None:
    """(RSS, PSS, processes) of a process and its descendants, in KiB (None once it is gone)."""
    rss = pss = n = 0
    for p in descendants(pid):
        got = proc_memory_kib(p)
        if got is not None:
            rss, pss, n = rss + got[0], pss + got[1], n + 1
    return (rss, pss, n) if n else None


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of a process and its live descendants."""
    got = [c for c in (proc_cpu_s(p) for p in descendants(pid)) if c is not None]
    return sum(got) if got else None


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one process so far (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class MemorySampler:
    """The stack's total RSS and PSS (every service process, not the broker), sampled every `every_s`: the
    peak of the sums and the last sample (steady state, before the stack stops)."""

    def __init__(self, stack: Stack, every_s: float = 0.5) -> None:
        self.stack = stack
        self.every_s = every_s
        self.peak_rss = self.peak_pss = 0
        self.last: tuple[int, int, int] = (0, 0, 0)
        self.cpu_s: dict[str, float] = {}  # per service process: CPU seconds at its last sample
        self.cpu_at_start: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        rss = pss = n = 0
        for p in self.stack.procs:
            got = tree_memory_kib(p.popen.pid) if p.popen.poll() is None else None
            if got is not None:
                rss, pss, n = rss + got[0], pss + got[1], n + got[2]
        for p in self.stack.procs:
            cpu = tree_cpu_s(p.popen.pid) if p.popen.poll() is None else None
            if cpu is not None:
                self.cpu_s[p.name] = cpu
        if n:
            self.last = (rss, pss, n)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every_s)

    def start(self) -> None:
        """From now on (the services up, the replay about to start): CPU is counted from here."""
        self.sample()
        self.cpu_at_start = dict(self.cpu_s)
        self._task = asyncio.create_task(self._run())

    def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
        rss, pss, n = self.last
        mib = 1024
        return {
            "processes": n,
            "rss_mib": round(rss / mib, 1),
            "pss_mib": round(pss / mib, 1),
            "peak_rss_mib": round(self.peak_rss / mib, 1),
            "peak_pss_mib": round(self.peak_pss / mib, 1),
            # CPU seconds each kind of service used during the replay (ingest: the whole of it).
            "cpu_s": {
                kind: round(
                    sum(
                        cpu - self.cpu_at_start.get(name, 0.0)
                        for name, cpu in self.cpu_s.items()
                        if name.split(".")[0] == kind
                    ),
                    2,
                )
                for kind in sorted({name.split(".")[0] for name in self.cpu_s})
            },
        }


# ---------------------------------------------------------------------------------------------- one run
async def wait_groups_up(
    bootstrap: KafkaAccess, cfg: AppConfig, ns: str, stack: Stack, timeout: float
) -> float:
    """Until the arbiter's and every worker's consumer group has a member (the monitor's health view)."""
    t0 = time.monotonic()
    wanted = {"arbiter"} | {f"{k}.{pid}" for pid in cfg.enabled_profiles() for k in ("strategy", "execution")}
    while True:
        dead = stack.dead()
        if dead:
            d = dead[0]
            raise RuntimeError(f"{d.name} exited with {d.popen.returncode}:\n{tail(d.log)}")
        up = {h.name for h in await fetch_health(bootstrap, cfg, ns) if h.state == "up"}
        if wanted <= up:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"services not up after {timeout:.0f} s: missing {sorted(wanted - up)}")
        await asyncio.sleep(1.0)


async def run_pipeline(
    endpoints: infra.Endpoints,
    n: int,
    *,
    data: Path,
    hours: float,
    speed: float,
    label: str,
    log_root: Path,
    timeout: float,
) -> dict[str, Any]:
    ns = f"bench{n}{label}{uuid.uuid4().hex[:6]}"
    raw_cfg = bench_config(n)
    raw_cfg["system"] = {"kafka": {"namespace": ns}}
    cfg = parse_config(raw_cfg, source=f"<bench {n}>")
    log_dir = log_root / ns
    log_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = log_dir / "profiles.yaml"
    cfg_file.write_text(yaml.safe_dump(raw_cfg, sort_keys=False), encoding="utf-8")
    topics = Topics(ns)
    specs = declared_topics(cfg, ns)
    bootstrap = endpoints.kafka
    await create_topics(endpoints, cfg, ns)  # with the namespace's principals and ACLs
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
        str(cfg_file),
        "--log-level",
        "WARNING",
    ]
    stack = Stack(bus=endpoints.bus)
    memory = MemorySampler(stack)
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.monotonic()
    try:
        stack.start("registry", ["services.registry", *common], log_dir)
        stack.start("arbiter", ["services.arbiter", *common], log_dir)
        # MPCTL_PROFILES_PER_PROCESS > 1: forked hosts, as `mpctl demo` starts them (mpctl/stack.py).
        for group in profile_groups(list(cfg.enabled_profiles()), profiles_per_process()):
            label, profiles = (group[0] if len(group) == 1 else f"{group[0]}..{group[-1]}"), ",".join(group)
            stack.start(f"execution.{label}", ["services.execution", *common, "--profile", profiles], log_dir)
            stack.start(f"strategy.{label}", ["services.strategy", *common, "--profile", profiles], log_dir)
        startup_s = await wait_groups_up(bootstrap, cfg, ns, stack, timeout)
        memory.start()
        stack.start(
            "ingest",
            ["services.ingest", *common, "--data", str(data), "--hours", str(hours), "--speed", str(speed)],
            log_dir,
        )
        expected = expected_finishers(cfg) | {f"execution:{pid}" for pid in cfg.enabled_profiles()}
        await wait_finished(bootstrap, topics.status, expected, stack, timeout, time.monotonic())
        memory.sample()
    finally:
        mem = memory.stop()
        stack.stop()
    try:
        candles = await read_all(bootstrap, topics.candles)
        # The arbiter's decisions and the execution workers' order events (two topics, one list here).
        events = await read_all(bootstrap, topics.decisions) + await read_all(bootstrap, topics.events)
        intents = await read_all(bootstrap, topics.intents)
        status = await read_all(bootstrap, topics.status)
        plans = await read_all(bootstrap, topics.plans)
        approved = [
            rec for pid in cfg.enabled_profiles() for rec in await read_all(bootstrap, topics.approved(pid))
        ]
        records = await total_records(bootstrap, specs)
    finally:
        await delete_topics(bootstrap, [s.name for s in specs])

    candle_ts: dict[tuple[str, int], int] = {}
    sizes: list[int] = []
    for rec in candles:
        try:
            msg = decode(rec.value)
        except DecodeError:
            continue
        if isinstance(msg, CandleClosed):
            candle_ts[(msg.product, int(msg.open_time.timestamp()))] = rec.timestamp
            sizes.append(len(rec.value or b""))
    first = min(candle_ts.values())
    acks: list[float] = []
    last_out = max(rec.timestamp for rec in status)
    kinds: Counter[str] = Counter()
    for rec in events:
        last_out = max(last_out, rec.timestamp)
        msg = decode(rec.value)
        if isinstance(msg, OrderUpdated):
            kinds[f"order_{msg.status}"] += 1
            if msg.status == "submitted" and msg.correlation_id.startswith("step:"):
                t = int(msg.correlation_id.split(":", 1)[1])
                cause = candle_ts.get((msg.product, t))
                if cause is not None:
                    acks.append(float(rec.timestamp - cause))
        elif isinstance(msg, OrderFilled):
            kinds["fills"] += 1
        elif isinstance(msg, OrderDecided):
            kinds[f"decided_{msg.verdict}"] += 1
    kinds["intents"] = sum(1 for rec in intents if isinstance(decode(rec.value), PlaceOrder))
    span_s = max(1e-3, (last_out - first) / 1000)
    steps = len({t for _, t in candle_ts})
    return {
        "namespace": ns,
        "profiles": n,
        "speed": speed,
        "startup_s": round(startup_s, 1),
        "wall_s": round(time.monotonic() - started, 1),
        "steps": steps,
        "candles": len(candle_ts),
        "candle_bytes_mean": round(statistics.fmean(sizes), 1) if sizes else 0,
        "span_s": round(span_s, 3),
        "market_events_per_s": round(len(candle_ts) / span_s, 1),
        "steps_per_s": round(steps / span_s, 2),
        # Each strategy worker and each execution worker reads every candle: the fan-out the pipeline carries.
        "candle_deliveries_per_s": round(2 * n * len(candle_ts) / span_s, 1),
        "records_all_topics": records,
        "records_per_s": round(records / span_s, 1),
        "counts": dict(sorted(kinds.items())),
        "latency_ms": {
            "orders": len(acks),
            "p50": percentile(acks, 50),
            "p99": percentile(acks, 99),
            "max": max(acks) if acks else None,
        },
        "breakdown_ms": hop_breakdown(candle_ts, plans, intents, events, approved),
        "memory": mem,
        # The machine is shared: its load average (1, 5, 15 min) when the run started and when it ended.
        "load_avg": {"start": load_before, "end": [round(x, 2) for x in os.getloadavg()]},
    }


# ---------------------------------------------------------------------------------------------- baseline
async def raw_baseline(bootstrap: KafkaAccess, count: int, size: int, latency_samples: int) -> dict[str, Any]:
    topic = f"benchraw{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, [TopicSpec(topic, 1)], replication_factor=1)
    producer = AIOKafkaProducer(
        **bootstrap.client_options(), acks="all", enable_idempotence=True, linger_ms=2
    )
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False, max_poll_records=5000)
    await producer.start()
    await consumer.start()
    tp = TopicPartition(topic, 0)
    try:
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        payload = orjson.dumps({"pad": "x" * max(0, size - 10)})[:size]

        async def consume(n: int) -> float:
            got = 0
            while got < n:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                got += len(batch.get(tp, []))
            return time.monotonic()

        reader = asyncio.create_task(consume(count))
        t0 = time.monotonic()
        futures = [await producer.send(topic, payload, key=b"BTC/USDC") for _ in range(count)]
        await asyncio.gather(*futures)
        t_end = await reader
        throughput = count / (t_end - t0)

        lat: list[float] = []
        for _ in range(latency_samples):
            md = await producer.send_and_wait(topic, payload, key=b"BTC/USDC")
            while True:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                recs = batch.get(tp, [])
                if recs and recs[-1].offset >= md.offset:
                    lat.append(time.time() * 1000 - recs[-1].timestamp)
                    break
        # Four round trips one after the other (each sent once the previous one was received): the fewest a
        # candle's way to an order takes (candle -> strategy -> arbiter -> execution -> acknowledgement).
        chains: list[float] = []
        for _ in range(max(1, latency_samples // 4)):
            t0 = time.perf_counter()
            for _ in range(4):
                md = await producer.send_and_wait(topic, payload, key=b"BTC/USDC")
                while True:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    recs = batch.get(tp, [])
                    if recs and recs[-1].offset >= md.offset:
                        break
            chains.append((time.perf_counter() - t0) * 1000)
        return {
            "messages": count,
            "bytes": len(payload),
            "produce_consume_per_s": round(throughput, 1),
            "latency_ms": {
                "samples": len(lat),
                "p50": round(percentile(lat, 50) or 0, 2),
                "p99": round(percentile(lat, 99) or 0, 2),
            },
            "four_round_trips_ms": {
                "samples": len(chains),
                "p50": round(percentile(chains, 50) or 0, 2),
                "p99": round(percentile(chains, 99) or 0, 2),
            },
        }
    finally:
        await producer.stop()
        await consumer.stop()
        await delete_topics(bootstrap, [topic])


# ---------------------------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    mem_kib = 0
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kafka": f"Apache Kafka {infra.KAFKA_VERSION} (KRaft, single node, local, replication factor 1)",
        "os": platform.platform(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def markdown(result: dict[str, Any], json_path: str) -> str:
    m = result["machine"]
    raw = result["raw_baseline"]
    biggest = max(r["profiles"] for r in result["runs"])
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `scripts/bench_pipeline.py` (`make bench`) on {result['date']}; raw figures: `{json_path}`.",
        "How each figure is measured: the docstring of scripts/bench_pipeline.py.",
        "",
        "## Machine",
        "",
        f"- {m['nproc']} cores ({m['cpu']}), {m['memory_gib']} GiB memory, {m['os']}",
        f"- Python {m['python']}; {m['kafka']}",
        f"- Load average when the run started: {m['load_avg_at_start']}. A shared machine: other work ran too, and "
        f"the {biggest}-profile runs alone put {2 * biggest + 3} processes on the two cores.",
        "",
        "## End-to-end pipeline",
        "",
        f"Replay of {result['hours']} hours of hourly candles ({result['products']} products). Every service in "
        "its own process: ingest, registry, arbiter, one strategy and one execution worker per profile.",
        "",
        "| profiles | processes | market events/s | steps/s | candle deliveries/s | records/s (all topics) "
        "| orders | latency p50 ms | latency p99 ms | vs raw throughput |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        t, lat = r["throughput"], r["latency"]
        lines.append(
            f"| {r['profiles']} | {2 * r['profiles'] + 3} | {t['market_events_per_s']} | {t['steps_per_s']} | "
            f"{t['candle_deliveries_per_s']} | {t['records_per_s']} | {lat['latency_ms']['orders']} | "
            f"{lat['latency_ms']['p50']} | {lat['latency_ms']['p99']} | {r['ratio_to_raw_throughput']} |"
        )
    lines += [
        "",
        "Latency runs replay "
        f"{result['latency_hours']} hours paced at "
        + (
            "the replay speeds given (`--latency-speed`: "
            + ", ".join(f"{r['latency']['speed']:g}x ({r['profiles']} profiles)" for r in result["runs"])
            + ", to offer the load of an earlier run)"
            if result.get("latency_speed_given")
            else "half the step rate of the throughput run"
        )
        + " (so the figure is not queueing behind a backlog); it is from the candle's publication to the execution worker's "
        "acknowledgement ('submitted'), Kafka CreateTime to CreateTime, and includes the arbiter waiting for every "
        "profile to finish the step. In the throughput runs the same measure is mostly queueing behind the "
        "replayed backlog: p50 "
        + ", ".join(
            f"{r['throughput']['latency_ms']['p50']} ms ({r['profiles']} profiles)" for r in result["runs"]
        )
        + ".",
        "",
        "Startup (every worker's consumer group joined; not counted above): "
        + ", ".join(f"{r['throughput']['startup_s']} s ({r['profiles']} profiles)" for r in result["runs"])
        + ".",
        "",
        "## Latency, hop by hop",
        "",
        "From the latency runs: every order's way from its candle's publication to the execution worker's "
        "'submitted', cut at each hop by the Kafka CreateTime of the record that ends it (scripts/"
        "bench_pipeline.py, `hop_breakdown`). candle>plan: the plan of the step's epoch published after the "
        "candle (0 when it was out before); plan>intent: the strategy evaluates the step and sends its intent; "
        "intent>barrier: the step's last StepCompleted marker of any profile (the arbiter's barrier); "
        "barrier>decision, decision>approved, approved>submitted: arbiter and execution worker. The hops add up "
        "to candle>submitted. 'before': "
        + (
            f"the run of {result['before']['date']} (load average {result['before']['load_avg_at_start']})."
            if result.get("before")
            else "no earlier run given (`--before`)."
        ),
        "",
        *latency_tables(result),
        "",
        "How to read it: the first table says where an order's time goes, hop by hop (a hop that grows with the "
        "profile count is waiting for CPU: every strategy and execution worker wakes on the same candles); the "
        "second compares the whole way's p99 with four raw round trips on the same broker in the same run (the "
        "fewest an order takes) and says whether the target is met, with the machine's load average when the run "
        "started and ended (a shared machine: a load above the two cores shows as p99 outliers in any hop). "
        "p99 over fewer than 100 orders is the slowest order or close to it.",
        "",
        "The deliberate delays (the arbiter's `not_before`, the worker's seeded de-sync) are event time: in a "
        "replay they move the order's times, not its records, so they are not in the hops above. Memory: every "
        "service process of the stack (not the broker), RSS and PSS summed from /proc/<pid>/smaps_rollup at the "
        "end of the latency run, and the peak of the sums sampled every 0.5 s. Startup: until every worker's "
        "consumer group has joined.",
        "",
        "## Raw aiokafka baseline (same broker, same run)",
        "",
        f"- {raw['messages']} messages of {raw['bytes']} bytes (the candles' mean size), one partition, acks=all, "
        f"idempotent producer: {raw['produce_consume_per_s']} messages/s produced and consumed",
        f"- one message at a time, produce to receipt: p50 {raw['latency_ms']['p50']} ms, "
        f"p99 {raw['latency_ms']['p99']} ms",
        "- four round trips one after the other (each message sent once the previous one was received): "
        f"p50 {raw.get('four_round_trips_ms', {}).get('p50')} ms, p99 {raw.get('four_round_trips_ms', {}).get('p99')} ms",
        "",
        "The ratio column is the pipeline's market events/s over the raw messages/s. Each market event costs the "
        "pipeline many messages (watermarks, plans, intents, step markers, decisions, order events, audit) and a "
        "strategy evaluation per profile, in Python processes sharing the machine's cores.",
        "",
        "## Raw figures",
        "",
        "```json",
        json.dumps(result, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    endpoints = await asyncio.to_thread(infra.resolve_endpoints, None, lambda m: print(m, file=sys.stderr))
    counts = [int(x) for x in args.profiles.split(",") if x.strip()]
    pace = dict(zip(counts, [float(x) for x in args.latency_speed.split(",") if x.strip()], strict=False))
    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "hours": args.hours,
        "latency_hours": args.latency_hours,
        "latency_speed_given": bool(pace),
        "runs": [],
    }
    log_root = Path(args.logs)
    for n in counts:
        print(f"[bench] {n} profiles: throughput run ({args.hours} h, as fast as possible)", file=sys.stderr)
        tput = await run_pipeline(
            endpoints,
            n,
            data=args.data,
            hours=args.hours,
            speed=0.0,
            label="t",
            log_root=log_root,
            timeout=args.timeout,
        )
        # Half the reached step rate, as a replay speed factor (steps are one candle interval apart); or the
        # speed given for this profile count (to offer the same load as an earlier run).
        interval_s = 3600.0
        speed = pace.get(n) or max(1.0, 0.5 * tput["steps_per_s"] * interval_s)
        print(
            f"[bench] {n} profiles: {tput['market_events_per_s']} events/s; latency run at speed {speed:.0f}",
            file=sys.stderr,
        )
        lat = await run_pipeline(
            endpoints,
            n,
            data=args.data,
            hours=args.latency_hours,
            speed=speed,
            label="l",
            log_root=log_root,
            timeout=args.timeout,
        )
        result["runs"].append({"profiles": n, "throughput": tput, "latency": lat})
    biggest = max(r["throughput"]["candles"] for r in result["runs"])
    size = round(statistics.fmean(r["throughput"]["candle_bytes_mean"] for r in result["runs"]))
    raw = await raw_baseline(endpoints.kafka, biggest, size, args.latency_samples)
    result["raw_baseline"] = raw
    first = result["runs"][0]["throughput"]
    result["products"] = first["candles"] // max(1, first["steps"])  # products with data in the slice
    for r in result["runs"]:
        r["ratio_to_raw_throughput"] = round(
            r["throughput"]["market_events_per_s"] / raw["produce_consume_per_s"], 4
        )
        p50 = r["latency"]["latency_ms"]["p50"]
        r["ratio_to_raw_latency_p50"] = (
            round(p50 / raw["latency_ms"]["p50"], 1) if p50 and raw["latency_ms"]["p50"] else None
        )
        p99 = r["latency"]["latency_ms"]["p99"]
        chain = raw["four_round_trips_ms"]["p99"]
        r["ratio_p99_to_four_round_trips_p99"] = round(p99 / chain, 2) if p99 and chain else None
    if args.before:
        result["before"] = before_summary(json.loads(Path(args.before).read_text(encoding="utf-8")))
    return result


def before_summary(old: dict[str, Any]) -> dict[str, Any]:
    """What a table needs of an earlier result (`--before`): its date, load and latency figures per run."""
    return {
        "date": old["date"],
        "load_avg_at_start": old["machine"]["load_avg_at_start"],
        "raw_baseline": old["raw_baseline"],
        "runs": {
            str(r["profiles"]): {
                "latency_ms": r["latency"]["latency_ms"],
                "breakdown_ms": r["latency"].get("breakdown_ms"),
                "memory": r["latency"].get("memory"),
                "startup_s": r["latency"]["startup_s"],
                "market_events_per_s": r["throughput"]["market_events_per_s"],
            }
            for r in old["runs"]
        },
    }


def _load(load: dict[str, list[float]] | None) -> str:
    return f"{load['start'][0]} / {load['end'][0]}" if load else "-"


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def latency_tables(result: dict[str, Any]) -> list[str]:
    """The hop-by-hop latency, deliberate delays, startup and memory tables (markdown; also printed)."""
    raw = result["raw_baseline"]
    chain = raw.get("four_round_trips_ms", {})
    before = result.get("before", {}).get("runs", {})
    lines = [
        "| profiles | hop | p50 ms | p99 ms | max ms | before p50 ms | before p99 ms |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        n = str(r["profiles"])
        bd = r["latency"].get("breakdown_ms") or {}
        old = (before.get(n) or {}).get("breakdown_ms") or {}
        rows = [(h, (bd.get("hops") or {}).get(h), (old.get("hops") or {}).get(h)) for h in HOPS]
        rows.append(("**candle>submitted**", bd.get("total"), old.get("total")))
        for name, now, was in rows:
            now, was = now or {}, was or {}
            lines.append(
                f"| {n} | {name} | {_f(now.get('p50'))} | {_f(now.get('p99'))} | {_f(now.get('max'))} "
                f"| {_f(was.get('p50'))} | {_f(was.get('p99'))} |"
            )
    lines += [
        "",
        "| profiles | orders | p99 ms | raw: 4 round trips p99 ms | ratio | target | met | load avg (start / end) |",
        "|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in result["runs"]:
        p99 = r["latency"]["latency_ms"]["p99"]
        if r["profiles"] <= 2:
            target, limit = (
                f"<= 3 x {chain.get('p99')} = {round(3 * chain.get('p99', 0), 1)} ms",
                3 * chain.get("p99", 0),
            )
        elif r["profiles"] <= 8:
            target, limit = "< 100 ms", 100.0
        else:
            target, limit = "- (none past 8 profiles)", None
        met = "-" if limit is None else "yes" if p99 is not None and p99 <= limit else "no"
        lines.append(
            f"| {r['profiles']} | {r['latency']['latency_ms']['orders']} | {_f(p99)} | {_f(chain.get('p99'))} "
            f"| {_f(r.get('ratio_p99_to_four_round_trips_p99'))} | {target} | {met} "
            f"| {_load(r['latency'].get('load_avg'))} |"
        )
    lines += [
        "",
        "| profiles | not_before p50 / p99 ms (event time) | de-sync p50 / p99 ms (event time) |",
        "|---:|---:|---:|",
    ]
    for r in result["runs"]:
        d = (r["latency"].get("breakdown_ms") or {}).get("deliberate_event_ms") or {}
        nb, ds = d.get("not_before") or {}, d.get("desync") or {}
        lines.append(
            f"| {r['profiles']} | {_f(nb.get('p50'))} / {_f(nb.get('p99'))} | {_f(ds.get('p50'))} / {_f(ds.get('p99'))} |"
        )
    lines += [
        "",
        "| profiles | processes | startup s | RSS MiB | PSS MiB | peak RSS MiB | peak PSS MiB | before: startup s, peak PSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["runs"]:
        m = r["latency"].get("memory") or {}
        old = before.get(str(r["profiles"])) or {}
        om = old.get("memory") or {}
        lines.append(
            f"| {r['profiles']} | {_f(m.get('processes'))} | {_f(r['latency']['startup_s'])} | {_f(m.get('rss_mib'))} "
            f"| {_f(m.get('pss_mib'))} | {_f(m.get('peak_rss_mib'))} | {_f(m.get('peak_pss_mib'))} "
            f"| {_f(old.get('startup_s'))}, {_f(om.get('peak_pss_mib'))} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profiles", default="2,8,32", help="comma-separated profile counts")
    p.add_argument("--hours", type=float, default=200.0, help="hours of candles in the throughput runs")
    p.add_argument(
        "--latency-hours",
        type=float,
        default=200.0,
        help="hours of candles in the paced latency runs (the signal models need about five days before the first order)",
    )
    p.add_argument("--latency-samples", type=int, default=300, help="raw baseline one-at-a-time samples")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "market")
    p.add_argument("--json", default=str(ROOT / "reports" / "bench" / "pipeline.json"))
    p.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip")
    p.add_argument("--logs", default=str(ROOT / "reports" / "bench" / "logs"))
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is declared stuck")
    p.add_argument(
        "--markdown-from", default=None, help="only write --markdown from this earlier JSON result"
    )
    p.add_argument("--before", default=None, help="an earlier JSON result to show next to this one")
    p.add_argument(
        "--latency-speed",
        default="",
        help="replay speeds of the latency runs, one per profile count (default: half the throughput run's rate)",
    )
    args = p.parse_args(argv)
    if args.markdown_from:
        text = markdown(json.loads(Path(args.markdown_from).read_text()), args.markdown_from)
        Path(args.markdown).write_text(text + kept_backtest_section(Path(args.markdown)), encoding="utf-8")
        return 0
    os.chdir(ROOT)  # the services resolve relative paths (data, config) from the repository root
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    print("\n".join(latency_tables(result)), file=sys.stderr)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    if args.markdown:
        rel = os.path.relpath(out, ROOT) if out.is_absolute() else str(out)
        page = Path(args.markdown)
        page.write_text(markdown(result, rel) + kept_backtest_section(page), encoding="utf-8")
    return 0


def kept_backtest_section(page: Path) -> str:
    """The page's "## Backtest" section (written by hand from scripts/bench_backtest.py's figures), carried
    over when this script rewrites the page; empty when there is none."""
    if not page.exists():
        return ""
    text = page.read_text(encoding="utf-8")
    start = text.find("\n## Backtest")
    return "" if start < 0 else text[start:]


if __name__ == "__main__":
    sys.exit(main())
