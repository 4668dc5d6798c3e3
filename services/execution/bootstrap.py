"""Wiring of one profile's execution worker: orders.approved.<profile> + md.candles -> orders.events.

This worker is the only process that would ever hold the profile's credentials (live mode, a later step);
in paper mode it runs the paper exchange of services/execution/domain.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from aiokafka import ConsumerRecord, TopicPartition
from pydantic import BaseModel, ConfigDict, Field

from services.execution import domain, routing
from services.execution.metrics import ExecutionMetrics
from shared.clock import Clock, system_clock
from shared.clock_feed import ServiceClock, service_clock
from shared.commands import gate_for
from shared.config import AppConfig, live_source_problem
from shared.kafka import HandlingError, Route, StateMachineService
from shared.messages import (
    ExecuteOrder,
    Message,
    OrderUpdated,
)
from shared.runtime import ServiceSettings
from shared.snapshots import Durable, dataclass_dump, dataclass_restore, fingerprint
from shared.topics import Topics

if TYPE_CHECKING:
    from services.execution.live import PauseStage
    from services.execution.live_wiring import LiveHandler


class LiveSourceRefused(RuntimeError):
    """Live mode on a replayed market (shared.config.live_source_problem)."""


# The live worker's group session (docs/live.md, "Never twice with two workers"): before each send the worker
# checks that it still holds its partition with more of its session left than the send's request timeout (10 s),
# one heartbeat interval (1 s) and the check's own time. 10 s (the default of the other services) leaves nothing;
# 30 s leaves the check up to 19 s. The cost: a worker that dies without leaving the group is replaced after 30 s.
LIVE_SESSION_TIMEOUT_MS = 30_000

# Going live is explicit (issue 13): a live config alone starts no live worker. `mpctl run --live` sets this after
# its pre-flight; compose and Kubernetes set it in the execution service's environment (mpctl/compose.py, k8s.py).
LIVE_ENV = "MPCTL_LIVE"


def live_consent_problem(cfg: AppConfig, env: Mapping[str, str]) -> str | None:
    """Why a live worker must not start without the explicit go-live setting, or None (paper, or set to 1)."""
    if cfg.system.mode != "live":
        return None
    value = env.get(LIVE_ENV, "")
    if value.strip() == "1":
        return None
    got = f"it is {value!r}" if value else "it is not set"
    return (
        f"system.mode: live trades real money and this worker starts live only with {LIVE_ENV}=1 ({got}). "
        f"Run `mpctl live check` (the pre-flight), then start with `mpctl run --live`; with compose "
        f"`{LIVE_ENV}=1 docker compose up -d`; on Kubernetes render with `mpctl k8s render --live`"
    )


class ExecutionOptions(BaseModel):
    """The execution worker's own command-line options (`python -m services.execution --help`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Live mode: send the exchange's REST calls to this base URL instead of Coinbase's (a test peer).
    exchange_api_base: str | None = Field(default=None, min_length=1)
    # Live mode: accept credentials written in the YAML (refused by default; `mpctl secrets set`).
    allow_plaintext_credentials: bool = False


class ExecutionService:
    def __init__(
        self,
        cfg: AppConfig,
        settings: ServiceSettings,
        options: ExecutionOptions | None = None,
        *,
        clock: Clock,
        metrics_port: int = 0,
        service_clock: ServiceClock | None = None,
        session_timeout_ms: int | None = None,
        exchange_timeout_s: float = 10.0,
        pause_before_send: Callable[[str, PauseStage], Awaitable[None]] | None = None,
    ) -> None:
        """`session_timeout_ms`: the group session (live default LIVE_SESSION_TIMEOUT_MS, paper 10 s);
        `exchange_timeout_s`: one exchange request's timeout; `pause_before_send`: tests only
        (LiveExecution.pause_before_send)."""
        if settings.profile not in cfg.profiles:
            raise ValueError(
                f"--profile {settings.profile!r} is not in the config (have {sorted(cfg.profiles)})"
            )
        self.profile_id: str = settings.profile
        self.cfg = cfg
        self.settings = settings
        self.options = options or ExecutionOptions()
        self.clock = clock
        self.service_clock = service_clock or ServiceClock(clock)
        self.live_handler: LiveHandler | None = None
        self.metrics_port = metrics_port
        self.metrics_bound: int | None = None
        self.exchange_timeout_s = exchange_timeout_s
        self.pause_before_send = pause_before_send
        live = cfg.system.mode == "live"
        session_ms = session_timeout_ms or (LIVE_SESSION_TIMEOUT_MS if live else 10_000)
        # The exchange label is set once live mode has opened its adapter.
        self.metrics = ExecutionMetrics(self.profile_id, "paper", started_at=time.time())
        self.topics = Topics(cfg.system.kafka.namespace)
        profile = cfg.profiles[self.profile_id]
        self.state = domain.new_state(
            self.profile_id,
            profile,
            cfg.system.execution,
            frozenset(range(cfg.system.kafka.candle_partitions)),
            profiles_sharing=len(cfg.enabled_profiles()),
            quote=cfg.system.quote_asset,
            account_snapshots=True,
        )
        self.runner = StateMachineService(
            name=f"execution.{self.profile_id}",
            bootstrap=settings.kafka,
            topics=[self.topics.candles, self.topics.approved(self.profile_id), self.topics.commands],
            group_id=self.topics.group("execution", self.profile_id),
            dead_letter_topic=self.topics.dead_letter,
            handle=self.handle,
            route=self.route,
            clock=clock,
            # Paper state (balances, known client order ids) is rebuilt from the whole input log on start.
            rebuild_on_start=cfg.system.mode == "paper",
            commands=gate_for(f"execution.{self.profile_id}", cfg.system.commands.max_age_s),
            observe=self._received,
            durable=self._durable(cfg, profile) if cfg.system.mode == "paper" else None,
            session_timeout_ms=session_ms,
        )

    def _durable(self, cfg: AppConfig, profile: Any) -> Durable:
        """Paper state snapshots (docs/architecture.md, "Durable state"): a restart resumes from the newest."""
        st = cfg.system.state
        return Durable(
            topic=self.topics.state("execution", self.profile_id),
            namespace=self.topics.ns,
            service=f"execution.{self.profile_id}",
            schema=domain.SNAPSHOT_SCHEMA,
            fingerprint=fingerprint(
                "execution",
                profile,
                cfg.system.execution,
                cfg.system.kafka.candle_partitions,
                cfg.system.mode,
            ),
            dump=lambda: dataclass_dump(self.state, domain.CONFIG_FIELDS),
            restore=lambda data: dataclass_restore(self.state, data),
            interval_s=st.snapshot_interval_s,
            every_messages=st.snapshot_every_messages,
            enabled=st.snapshots,
        )

    def live_problem(self) -> str | None:
        """Why this worker must not start (live orders on a replayed market), or None."""
        return live_source_problem(self.cfg, exchange_url=self.options.exchange_api_base)

    async def _holds(self, partition: int, within_s: float) -> str | None:
        """LiveExecution.fence: this member still holds the order's partition of orders.approved.<profile>."""
        loop = self.runner.loop
        if loop is None:
            return "the consume loop is not running"
        return await loop.holds(TopicPartition(self.topics.approved(self.profile_id), partition), within_s)

    def _received(self, msg: Message, rec: ConsumerRecord[bytes, bytes]) -> None:
        self.metrics.received(msg, rec.topic, rec.timestamp)

    async def handle(self, msg: Message, partition: int) -> list[Message]:
        if isinstance(msg, ExecuteOrder) and msg.profile != self.profile_id:
            # The topic is this profile's: another profile's order here is misrouted or forged.
            raise HandlingError(
                f"order {msg.client_order_id} of profile {msg.profile!r} on {self.profile_id}'s approved topic"
            )
        if self.live_handler is not None:
            out = await self.live_handler.handle(msg, partition)
        else:
            out = domain.decide(self.state, msg, partition)
            if isinstance(msg, ExecuteOrder) and any(
                isinstance(m, OrderUpdated) and m.client_order_id == msg.client_order_id for m in out
            ):
                self.metrics.acknowledged(
                    msg.client_order_id, self.clock().timestamp()
                )  # the paper exchange took it
        if isinstance(msg, ExecuteOrder):
            self.metrics.forget(msg.client_order_id)  # no acknowledgement by now: none to measure
        for m in out:
            self.metrics.observe(m)
        return out

    def route(self, msg: Message) -> list[Route]:
        return routing.route(msg, self.topics, self.profile_id)

    async def run(self, stop: asyncio.Event) -> int:
        if self.metrics_port:
            self.metrics_bound = self.metrics.serve(self.metrics_port, self.settings.metrics_addr)
        try:
            return await self._run(stop)
        finally:
            self.metrics.close()

    async def _run(self, stop: asyncio.Event) -> int:
        if self.cfg.system.mode != "live":
            return await self.runner.run(stop)
        api_base = self.options.exchange_api_base
        problem = self.live_problem()
        if problem is not None:
            raise LiveSourceRefused(problem)
        follower = asyncio.create_task(self.service_clock.run(self.settings.kafka, self.topics, stop))
        try:
            # Live market: send times and order timeouts are exchange time, read from md.clock.
            if not await self.service_clock.wait_synced(stop, timeout_s=300.0):
                if stop.is_set():
                    return 0
                raise RuntimeError(
                    f"no exchange time on {self.topics.clock!r} within 300 s: is the live ingest running?"
                )
            return await self._run_live(stop, api_base)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    async def _latest_close(self, product: str) -> tuple[datetime, Decimal] | None:
        """The price band's reference for a product no candle of was read since start: md.candles' tail."""
        from services.execution.live_wiring import latest_closes

        return (await latest_closes(self.settings.kafka, self.topics.candles)).get(product)

    async def _run_live(self, stop: asyncio.Event, api_base: str | None) -> int:
        # Live: the only place this profile's credentials are read (its own store entry only). ccxt is
        # imported here, not at module level: paper workers and the backtest never load it (half a second).
        from services.execution.ccxt_adapter import CcxtExchange
        from services.execution.live_wiring import LiveHandler, WriteAhead, open_live_execution, start_live

        pid = self.profile_id
        live = await open_live_execution(
            pid,
            self.cfg,
            clock=self.clock,
            clock_sleep=self.service_clock.sleep,
            allow_plaintext=self.options.allow_plaintext_credentials,
            api_base=api_base,
            reference_lookup=self._latest_close,
            timeout_s=self.exchange_timeout_s,
        )
        live.fence = self._holds
        live.pause_before_send = self.pause_before_send
        self.metrics.exchange = live.port.name
        live.on_ack = lambda coid: self.metrics.acknowledged(coid, self.clock().timestamp())
        if isinstance(live.port, CcxtExchange):
            live.port.on_error = self.metrics.error
        missing = await start_live(
            live,
            bootstrap=self.settings.kafka,
            topics=self.topics,
            route=self.route,
            client_id=f"execution.{pid}.start",
        )
        for m in missing:  # published before the consume loop: reconciled fills count too
            self.metrics.observe(m)
        wal = await WriteAhead.started(self.settings.kafka, self.route, f"execution.{pid}.wal")
        ex = self.cfg.system.execution
        self.live_handler = LiveHandler(
            live,
            write_ahead=wal,
            reconcile_every_s=ex.reconcile_interval_s,
            account_every_s=ex.account_snapshot_interval_s,
        )
        account = asyncio.create_task(self.live_handler.account_loop(stop, wal))
        try:
            return await self.runner.run(stop)
        finally:
            account.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await account
            await self.live_handler.close()


def bootstrap(
    settings: ServiceSettings,
    options: ExecutionOptions | None = None,
    *,
    overrides: dict[str, Any] | None = None,
) -> ExecutionService:
    o = overrides or {}
    cfg: AppConfig = o.get("config") or settings.load()
    # Live orders wait on the exchange's clock when the market is live; paper execution runs on event time.
    sclock = o.get("service_clock") or (
        service_clock(cfg)
        if cfg.system.mode == "live" and "clock" not in o
        else ServiceClock(o.get("clock", system_clock))
    )
    return ExecutionService(
        cfg,
        settings,
        options,
        service_clock=sclock,
        clock=o.get("clock", sclock.clock),
        metrics_port=int(o.get("metrics_port", settings.metrics_port)),
        session_timeout_ms=o.get("session_timeout_ms"),
        exchange_timeout_s=float(o.get("exchange_timeout_s", 10.0)),
        pause_before_send=o.get("pause_before_send"),
    )
