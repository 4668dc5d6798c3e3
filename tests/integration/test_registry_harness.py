"""Shared helpers of the registry's process-level tests (races, recovery, metrics): no test here.

Registry processes run exactly as in production (`python -m services.registry ...`); candles are published by
a small in-test publisher built on the ingest's own schedule, so a test controls when each step arrives.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis.asyncio as aioredis
import yaml
from aiokafka import AIOKafkaConsumer

from mpctl.infra import Endpoints
from services.ingest.domain import build_schedule, finished_message
from services.registry.recovery import read_plans
from shared.aligner import Step
from shared.candles import load_products
from shared.codec import DecodeError, decode
from shared.config import AppConfig, load_config
from shared.kafka import Publisher, delete_topics
from shared.messages import PlanPublished, WorkerFinished
from shared.topics import Topics, declared_topics
from tests.bus import create_namespace, service_env

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "market"
WEIGHTS = {
    "volume_weighted_hash_oscillator": 0.30,
    "zygot_zalgo_entropy_dual_key_gate": 0.25,
    "multi_phase_strategy_weight_tensor": 0.20,
    "quantum_strategy_calculator": 0.15,
    "entropy_enhanced_trading_executor": 0.10,
}
ALL_ASSETS = ["BTC", "ETH", "SOL", "XRP", "ADA", "DOT", "LINK", "MATIC", "AVAX", "ATOM", "LTC"]


@dataclass(frozen=True)
class ProfileSpec:
    base_hash: str
    seed: float = 0.42
    interval: int = 3600
    base: tuple[str, ...] = ("BTC", "ETH")
    pool: tuple[str, ...] = ("SOL", "XRP", "ADA", "DOT", "LINK", "MATIC", "AVAX", "ATOM", "LTC")
    priority: int = 100


def write_config(path: Path, specs: dict[str, ProfileSpec], *, score_top_k: int = 3) -> Path:
    profiles: dict[str, Any] = {}
    for i, (pid, s) in enumerate(specs.items()):
        profiles[pid] = {
            "name": f"test {pid}",
            "enabled": True,
            "priority": s.priority if s.priority != 100 else i + 1,
            "api_credentials": {"api_key": f"YOUR_KEY_{i}", "secret": f"YOUR_SECRET_{i}", "sandbox": True},
            "strategy_config": {
                "base_assets": [*s.base, "USDC"],
                "random_asset_pool": list(s.pool),
                "strategy_weights": WEIGHTS,
                "confidence_threshold": 0.7,
                "signal_strength_threshold": 0.6,
                "max_position_size_pct": 5.0,
                "risk_adjustment_factor": 1.0,
                "entropy_threshold": 0.003,
                "hash_trajectory_weight": 0.8,
                "drift_delta_range": [0.001, 0.005],
            },
            "trading_params": {
                "trading_pairs": [f"{a}/USDC" for a in s.base],
                "max_open_positions": 2,
                "order_timeout": 30,
                "retry_attempts": 1,
                "slippage_tolerance": 0.002,
            },
            "risk_management": {
                "stop_loss_pct": 2.0,
                "take_profit_pct": 5.0,
                "max_daily_loss_pct": 3.0,
                "max_drawdown_pct": 10.0,
                "volatility_threshold": 0.8,
            },
            "profile_hash": {
                "base_hash": s.base_hash,
                "entropy_seed": s.seed,
                "hash_rotation_interval": s.interval,
                "hash_complexity_factor": 1.1,
            },
        }
    doc = {"system": {"registry": {"score_top_k": score_top_k}}, "profiles": profiles}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def schedule(cfg: AppConfig, hours: int) -> list[Step]:
    return build_schedule(load_products(DATA, cfg.all_products()), hours=hours)


class Run:
    """One namespace: its topics, its registry processes, its Redis keys; cleaned up by ``close``."""

    def __init__(self, endpoints: Endpoints, namespace: str, config: Path, log_dir: Path) -> None:
        self.endpoints = endpoints
        self.ns = namespace
        self.config = config
        self.cfg = load_config(config)
        self.topics = Topics(namespace)
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self._restarts: Counter[str] = Counter()
        self.publisher: Publisher | None = None

    async def setup(self) -> None:
        for attempt in range(5):
            try:
                await create_namespace(self.endpoints.kafka, self.cfg, self.ns)
                break
            except RuntimeError:
                # Right after creation the broker may describe a topic with 0 partitions; ask again.
                if attempt == 4:
                    raise
                await asyncio.sleep(0.5)
        self.publisher = Publisher(self.endpoints.kafka, client_id=f"{self.ns}.test-ingest")
        await self.publisher.start()

    def start_registry(self, instance: str, *extra: str) -> subprocess.Popen[bytes]:
        self._restarts[instance] += 1
        log = (self.log_dir / f"registry.{instance}.{self._restarts[instance]}.log").open("wb")
        self._logs.append(log)
        cmd = [
            sys.executable,
            "-m",
            "services.registry",
            "--bootstrap",
            self.endpoints.kafka.servers,
            "--redis-url",
            self.endpoints.redis_url,
            "--namespace",
            self.ns,
            "--config",
            str(self.config),
            "--instance",
            instance,
            "--source",
            "replay",
            *extra,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **service_env(self.endpoints, cmd))
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs[instance] = proc
        return proc

    def kill(self, instance: str) -> None:
        proc = self.procs[instance]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self, instance: str) -> None:
        proc = self.procs[instance]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
            for p in sorted(self.log_dir.glob("registry.*.log"))
        )

    def assert_alive(self) -> None:
        for inst, proc in self.procs.items():
            rc = proc.poll()
            assert rc is None, f"registry {inst} exited with {rc}:\n{self.logs()}"

    async def publish(self, steps: Sequence[Step], *, finish_with: list[Step] | None = None) -> None:
        assert self.publisher is not None
        for step in steps:
            for c in step.candles:
                await self.publisher.send(self.topics.candles, c, key=c.product)
            await self.publisher.send_to_all_partitions(self.topics.candles, step.watermark())
        if finish_with is not None:
            await self.publisher.send_to_all_partitions(self.topics.candles, finished_message(finish_with))
        await self.publisher.flush()

    async def plans(self) -> list[PlanPublished]:
        plans = await read_plans(self.endpoints.kafka, self.topics.plans)
        assert plans is not None
        return plans

    async def wait_plans(self, predicate: Any, timeout: float = 40.0) -> list[PlanPublished]:
        deadline = time.monotonic() + timeout
        while True:
            self.assert_alive()
            plans = await self.plans()
            if predicate(plans):
                return plans
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"plans not as expected after {timeout} s ({len(plans)} plans)\n{self.logs()}"
                )
            await asyncio.sleep(0.2)

    async def wait_finished(
        self, instances: Iterable[str], timeout: float = 40.0
    ) -> dict[str, WorkerFinished]:
        want = set(instances)
        consumer = AIOKafkaConsumer(
            self.topics.status, **self.endpoints.kafka.client_options(), auto_offset_reset="earliest"
        )
        await consumer.start()
        seen: dict[str, WorkerFinished] = {}
        deadline = time.monotonic() + timeout
        try:
            while not want <= set(seen):
                self.assert_alive()
                if time.monotonic() > deadline:
                    raise AssertionError(f"registries {sorted(want - set(seen))} not finished\n{self.logs()}")
                for recs in (await consumer.getmany(timeout_ms=300)).values():
                    for rec in recs:
                        try:
                            msg = decode(rec.value)
                        except DecodeError:
                            continue
                        if isinstance(msg, WorkerFinished) and msg.service == "registry":
                            seen[msg.instance] = msg  # the last one: a restarted instance reports again
        finally:
            await consumer.stop()
        return seen

    async def flush_redis(self) -> int:
        """FLUSHDB restricted to this namespace (the test Redis is shared with other tests)."""
        r = aioredis.Redis.from_url(self.endpoints.redis_url, **self.endpoints.redis_credentials())
        try:
            keys = [k async for k in r.scan_iter(match=f"{self.ns}:*", count=1000)]
            if keys:
                await r.delete(*keys)
            return len(keys)
        finally:
            await r.aclose()

    async def close(self) -> None:
        for inst in list(self.procs):
            self.stop(inst)
        for log in self._logs:
            log.close()
        if self.publisher is not None:
            await self.publisher.stop()
        await delete_topics(self.endpoints.kafka, [s.name for s in declared_topics(self.cfg, self.ns)])
        await self.flush_redis()


@dataclass
class Check:
    """Invariants of a set of published plans (DESIGN.md section 5, invariants 1 and 2)."""

    plans: list[PlanPublished]

    @property
    def messages_per_epoch(self) -> Counter[tuple[str, int]]:
        """How many plan messages the topic holds per (profile, epoch) (1 when only one replica published)."""
        return Counter((p.profile, p.epoch) for p in self.plans)

    def unique(self) -> dict[tuple[str, int], PlanPublished]:
        by_epoch: dict[tuple[str, int], set[str]] = {}
        out: dict[tuple[str, int], PlanPublished] = {}
        for p in self.plans:
            by_epoch.setdefault((p.profile, p.epoch), set()).add(p.id)
            out.setdefault((p.profile, p.epoch), p)
        two = {k: v for k, v in by_epoch.items() if len(v) > 1}
        assert not two, f"(profile, epoch) with two different plans: {two}"
        return out

    def no_overlapping_duplicates(self, *, pool_allows: bool = True) -> None:
        plans = list(self.unique().values())
        for a, b in itertools.combinations(plans, 2):
            if a.profile == b.profile:
                continue
            if not (a.epoch_start < b.epoch_end and b.epoch_start < a.epoch_end):
                continue
            assert a.hash != b.hash, f"hash held twice: {a.profile}/{a.epoch} and {b.profile}/{b.epoch}"
            assert a.fingerprint != b.fingerprint, (
                f"fingerprint held twice: {a.profile}/{a.epoch}, {b.profile}/{b.epoch}"
            )
            if pool_allows and a.random_asset and b.random_asset:
                assert a.random_asset != b.random_asset, (
                    f"random asset {a.random_asset} shared: {a.profile}/{a.epoch} and {b.profile}/{b.epoch}"
                )


def outcome(plans: Iterable[PlanPublished]) -> set[tuple[Any, ...]]:
    """What a run decided, independent of namespace and of which replica published."""
    return {
        (
            p.id,
            p.profile,
            p.epoch,
            p.hash,
            p.nonce,
            p.strategy,
            p.fingerprint,
            p.random_asset,
            tuple(p.assets),
        )
        for p in plans
    }
