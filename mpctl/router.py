"""`ProfileRouter`: the Python entry point the original description promised, as a client of the running stack.

    router = ProfileRouter("config/coinbase_profiles_local.yaml")
    await router.initialize()          # connect, follow the namespace's topics, read the services' health
    await router.start_trading()       # check that every service of every enabled profile is up
    status = router.get_profile_status()
    print(status["profile_router"]["active_profiles"])
    result = await router.execute_unified_trade({"symbol": "BTC/USDC", "side": "buy", "type": "market", "size": 0.001})

The router holds no credentials and never talks to an exchange. A trade goes the way every order goes:

1. pre-trade risk checks here, with the limits the strategy workers apply to their own entries: the profile is
   enabled and not halted, the product is one of its trading pairs, a buy stays within
   `max_position_size_pct` of the profile's equity and `max_open_positions`, a sell within the position held;
2. a `PlaceOrder` intent (reason `manual`) on the intents topic, keyed by product, and a copy on the audit topic;
3. the arbiter decides it like any intent (wash-trade rule against the other profiles' orders) and sends an
   approved order to the profile's execution worker, which alone holds the profile's credentials;
4. the router waits for the decision (orders.decisions) and the order's final state (orders.events) and returns
   them.

The router's books (the positions and equity its risk checks use, `get_profile_status`) and the fills it returns
count only verified fills, by the rule of the strategy workers and the report (shared/book.py): a fill needs the
approving decision of its profile, product and side, within the approved size. A forged record on orders.events
moves nothing here.

Which profile trades: `order["profile"]` when given, otherwise the enabled profile of highest priority
(lowest number) that trades the symbol.

Time: the arbiter orders intents by event-time step and releases a step once every running strategy worker
completed it, so a manual intent carries the latest step every profile has completed (read from the
StepCompleted markers on the intents topic). Its event time is the market's clock: the last candle close
when replaying history, the wall clock when the candles are current.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from mpctl.infra import operator_access
from services.monitor.health import ServiceHealth, fetch_health
from services.monitor.metrics import PerformanceTracker
from shared.book import verified_fills
from shared.bus import KafkaAccess
from shared.clock import derived_id
from shared.codec import DecodeError, decode
from shared.config import AppConfig, load_config
from shared.kafka import Publisher, list_topics
from shared.messages import (
    TERMINAL_STATUSES,
    CandleClosed,
    Message,
    OrderDecided,
    OrderFilled,
    OrderUpdated,
    PlaceOrder,
    ProfileHalted,
    StepCompleted,
)
from shared.topics import Topics

log = logging.getLogger("mpctl.router")
DEFAULT_BOOTSTRAP = "127.0.0.1:19092"


class TradeRefused(ValueError):
    """A manual trade refused before it reached the arbiter (bad request or a risk limit)."""


def normalise_symbol(symbol: str, quote: str) -> str:
    s = symbol.strip().upper().replace("-", "/")
    if "/" not in s:
        s = f"{s}/{quote}"
    return s


class ProfileRouter:
    def __init__(
        self,
        config_path: str | Path | None = None,
        *,
        bootstrap: KafkaAccess | None = None,
        namespace: str | None = None,
        decision_timeout_s: float = 30.0,
        fill_timeout_s: float = 60.0,
    ) -> None:
        self.config_path = Path(config_path) if config_path is not None else None
        self._bootstrap = bootstrap
        self._namespace = namespace
        self.decision_timeout_s = decision_timeout_s
        self.fill_timeout_s = fill_timeout_s
        self.cfg: AppConfig | None = None
        self.topics: Topics | None = None
        self.bootstrap: KafkaAccess | None = None
        self.tracker: PerformanceTracker | None = None
        self.health: list[ServiceHealth] = []
        self.halted: dict[str, ProfileHalted] = {}
        self.step_marks: dict[str, float] = {}  # profile -> last completed step (epoch s), from StepCompleted
        self.last_candle: dict[str, CandleClosed] = {}
        self.decisions: dict[str, OrderDecided] = {}
        self.order_updates: dict[str, list[OrderUpdated]] = {}
        self.fills: dict[str, list[OrderFilled]] = {}
        self.trading_started = False
        self._publisher: Publisher | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._follower: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._positions_read: dict[TopicPartition, int] = {}

    # ------------------------------------------------------------------ lifecycle
    async def initialize(self) -> None:
        """Load the config, check the namespace's topics exist, follow them up to now, read the services' health."""
        cfg = load_config(self.config_path)
        ns = self._namespace or cfg.system.kafka.namespace
        t = Topics(ns)
        self.bootstrap = self._bootstrap or operator_access(
            os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip() or DEFAULT_BOOTSTRAP, ns
        )
        existing = set(await list_topics(self.bootstrap))
        followed = [t.plans, t.events, t.decisions, t.candles, t.intents, t.audit]
        missing = [n for n in followed if n not in existing]
        if missing:
            raise RuntimeError(
                f"namespace {ns!r} has no topics {missing} on {self.bootstrap}: start the stack first "
                "(docker compose up, or the services with this namespace)"
            )
        self.cfg, self.topics = cfg, t
        self.tracker = PerformanceTracker(
            {pid: Decimal(str(p.paper.initial_quote_balance)) for pid, p in cfg.enabled_profiles().items()}
        )
        self._publisher = Publisher(self.bootstrap, client_id=f"{ns}.router.{uuid.uuid4().hex[:8]}")
        await self._publisher.start()
        self._consumer = c = AIOKafkaConsumer(
            **self.bootstrap.client_options(),
            enable_auto_commit=False,
            group_id=None,
            auto_offset_reset="earliest",
        )
        await c.start()
        tps = []
        for name in followed:
            parts = c.partitions_for_topic(name)
            if not parts:
                await c._client.force_metadata_update()  # noqa: SLF001 - a fresh consumer lacks the metadata
                parts = c.partitions_for_topic(name) or set()
            tps += [TopicPartition(name, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        ends = await c.end_offsets(tps)
        self._follower = asyncio.create_task(self._follow(), name="router-follower")
        await self._wait(lambda: self._caught_up(ends), 60.0, "reading the namespace's topics")
        self.health = await fetch_health(self.bootstrap, cfg, ns)

    def _access(self) -> KafkaAccess:
        if self.bootstrap is None:
            raise RuntimeError("the router is not initialized: use `async with ProfileRouter(...)`")
        return self.bootstrap

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._publisher is not None:
            await self._publisher.stop()
            self._publisher = None

    async def __aenter__(self) -> ProfileRouter:
        await self.initialize()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ following the topics
    async def _follow(self) -> None:
        c = self._consumer
        assert c is not None
        while True:
            batches = await c.getmany(timeout_ms=200)
            for recs in batches.values():
                for rec in recs:
                    try:
                        self._apply(decode(rec.value))
                    except DecodeError:
                        continue
            self._positions_read = {tp: await c.position(tp) for tp in c.assignment()}
            self._changed.set()

    def _caught_up(self, ends: Mapping[TopicPartition, int]) -> bool:
        return all(self._positions_read.get(tp, -1) >= end for tp, end in ends.items())

    def _apply(self, m: Message) -> None:
        assert self.tracker is not None
        self.tracker.add(m)
        if isinstance(m, CandleClosed):
            cur = self.last_candle.get(m.product)
            if cur is None or m.open_time >= cur.open_time:
                self.last_candle[m.product] = m
        elif isinstance(m, StepCompleted):
            t = m.step_time.timestamp()
            self.step_marks[m.profile] = max(t, self.step_marks.get(m.profile, t))
        elif isinstance(m, ProfileHalted):
            self.halted[m.profile] = m
        elif isinstance(m, OrderDecided):
            self.decisions.setdefault(
                m.intent_id, m
            )  # the first, as the strategy workers and the report keep
        elif isinstance(m, OrderUpdated):
            ups = self.order_updates.setdefault(m.intent_id, [])
            if all(u.id != m.id for u in ups):
                ups.append(m)
        elif isinstance(m, OrderFilled):
            fs = self.fills.setdefault(m.intent_id, [])
            if all(f.fill_id != m.fill_id for f in fs):
                fs.append(m)

    async def _wait(self, cond: Any, timeout: float, what: str) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
            if self._follower is not None and self._follower.done():
                exc = self._follower.exception()
                raise RuntimeError(f"following the topics failed while {what}: {exc!r}")
        return True

    # ------------------------------------------------------------------ the seed's interface
    async def start_trading(self) -> dict[str, Any]:
        """Check that the arbiter and every enabled profile's strategy and execution workers are up.

        The services trade on their own once running; this does not start processes (compose, Kubernetes or
        `mpctl demo` do). Resuming paused profiles goes through signed commands (`mpctl send resume`)."""
        cfg, t = self._need()
        self.health = await fetch_health(self._access(), cfg, t.ns)
        needed = {"arbiter"} | {
            f"{kind}.{pid}" for pid in cfg.enabled_profiles() for kind in ("strategy", "execution")
        }
        down = sorted(h.name for h in self.health if h.name in needed and h.state != "up")
        if down:
            raise RuntimeError(
                f"services not running in namespace {t.ns!r}: {', '.join(down)}; start the stack "
                "(docker compose up, or mpctl demo for a replay), then call start_trading() again"
            )
        self.trading_started = True
        return self.get_profile_status()

    def get_profile_status(self) -> dict[str, Any]:
        """The router's current view (kept up to date by following the topics; health as of the last check)."""
        cfg, t = self._need()
        assert self.tracker is not None
        enabled = cfg.enabled_profiles()
        services = {h.name: h.state for h in self.health}
        profiles = {}
        for pid, p in cfg.profiles.items():
            view = self.tracker.profile_view(pid) if pid in self.tracker.books else {}
            halt = self.halted.get(pid)
            profiles[pid] = {
                "name": p.name,
                "enabled": p.enabled,
                "priority": p.priority,
                "trading_pairs": list(p.trading_params.trading_pairs),
                "strategy_service": services.get(f"strategy.{pid}", "unknown"),
                "execution_service": services.get(f"execution.{pid}", "unknown"),
                "halted": halt is not None and not self._halt_over(halt),
                "halt_reason": halt.reason if halt is not None else None,
                **view,
            }
        return {
            "profile_router": {
                "active_profiles": len(enabled),
                "namespace": t.ns,
                "bootstrap": self.bootstrap.servers if self.bootstrap is not None else "",
                "trading_started": self.trading_started,
                "services_up": sorted(n for n, s in services.items() if s == "up"),
                "services_down": sorted(n for n, s in services.items() if s in ("down", "never-ran")),
                "arbiter": services.get("arbiter", "unknown"),
            },
            "profiles": profiles,
        }

    async def refresh_status(self) -> dict[str, Any]:
        cfg, t = self._need()
        self.health = await fetch_health(self._access(), cfg, t.ns)
        return self.get_profile_status()

    async def execute_unified_trade(self, order: Mapping[str, Any]) -> dict[str, Any]:
        """Submit a manual market order through risk checks and the arbiter; return its outcome.

        Returns a dict with `status`: `refused` (a check here failed; nothing was sent), `rejected` (by the
        arbiter or the exchange), `filled`, `cancelled`, or `pending` (no final state within the timeouts)."""
        cfg, t = self._need()
        assert self._publisher is not None
        try:
            intent, pid = self._intent(order)
        except TradeRefused as err:
            return {"status": "refused", "reason": str(err), "order": dict(order)}
        await self._publisher.send(t.intents, intent, key=intent.product)
        await self._publisher.send(t.audit, intent, key=pid)
        await self._publisher.flush()
        log.info(
            "manual intent %s: %s %s %s for %s",
            intent.intent_id,
            intent.side,
            intent.size,
            intent.product,
            pid,
        )
        result: dict[str, Any] = {
            "status": "pending",
            "profile": pid,
            "symbol": intent.product,
            "side": intent.side,
            "size": str(intent.size),
            "intent_id": intent.intent_id,
            "reference_price": str(intent.reference_price),
            "decision": None,
            "order_status": None,
            "fills": [],
        }
        iid = intent.intent_id
        if not await self._wait(
            lambda: iid in self.decisions, self.decision_timeout_s, "waiting for the decision"
        ):
            result["reason"] = f"no decision within {self.decision_timeout_s:.0f} s (is the arbiter running?)"
            return result
        d = self.decisions[iid]
        result["decision"] = {
            "verdict": d.verdict,
            "rule": d.rule,
            "reason": d.reason,
            "conflicting_profile": d.conflicting_profile,
        }
        if d.verdict == "rejected":
            result["status"] = "rejected"
            result["reason"] = d.reason
            return result

        def final() -> bool:
            return any(u.status in TERMINAL_STATUSES for u in self.order_updates.get(iid, []))

        done = await self._wait(final, self.fill_timeout_s, "waiting for the order's outcome")
        ups = self.order_updates.get(iid, [])
        if ups:
            last = next((u for u in ups if u.status in TERMINAL_STATUSES), ups[-1])
            result["order_status"] = last.status
            result["client_order_id"] = last.client_order_id
            if last.reason:
                result["reason"] = last.reason
        result["fills"] = [
            {
                "fill_id": f.fill_id,
                "size": str(f.size),
                "price": str(f.price),
                "fee": str(f.fee),
                "time": f.event_time.isoformat(),
            }
            for f in self.verified_fills_of(iid)
        ]
        if done:
            result["status"] = result["order_status"]
        else:
            result["reason"] = (
                f"no final order state within {self.fill_timeout_s:.0f} s (is execution.{pid} running?)"
            )
        return result

    def verified_fills_of(self, intent_id: str) -> list[OrderFilled]:
        """The intent's fills its (first) decision approves, by shared/book.py's rule; the others are logged."""
        d = self.decisions.get(intent_id)
        counted, refused = verified_fills(self.fills.get(intent_id, []), {intent_id: d} if d else {})
        for f, why in refused:
            log.warning("fill %s of intent %s left out: %s", f.fill_id, intent_id, why)
        return counted

    # ------------------------------------------------------------------ building the intent
    def _need(self) -> tuple[AppConfig, Topics]:
        if self.cfg is None or self.topics is None or self.tracker is None:
            raise RuntimeError("call `await router.initialize()` first")
        return self.cfg, self.topics

    def _market_time(self) -> datetime | None:
        if not self.last_candle:
            return None
        return max(c.event_time for c in self.last_candle.values())

    def _halt_over(self, h: ProfileHalted) -> bool:
        now = self._market_time() or datetime.now(UTC)
        return h.until is not None and h.until <= now

    def _intent(self, order: Mapping[str, Any]) -> tuple[PlaceOrder, str]:
        cfg, _ = self._need()
        assert self.tracker is not None
        otype = str(order.get("type", "market")).lower()
        if otype != "market":
            raise TradeRefused(f"order type {otype!r} is not supported; only market orders are")
        side = str(order.get("side", "")).lower()
        if side not in ("buy", "sell"):
            raise TradeRefused(f"side must be 'buy' or 'sell', got {order.get('side')!r}")
        try:
            size = Decimal(str(order.get("size")))
        except InvalidOperation:
            raise TradeRefused(f"size {order.get('size')!r} is not a number") from None
        if not size.is_finite() or size <= 0:
            raise TradeRefused(f"size must be a positive number, got {order.get('size')!r}")
        product = normalise_symbol(str(order.get("symbol", "")), cfg.system.quote_asset)
        enabled = cfg.enabled_profiles()
        pid = order.get("profile")
        if pid is None:
            candidates = sorted(
                (p.priority, q) for q, p in enabled.items() if product in p.trading_params.trading_pairs
            )
            if not candidates:
                raise TradeRefused(f"no enabled profile trades {product}")
            pid = candidates[0][1]
        pid = str(pid)
        if pid not in enabled:
            raise TradeRefused(f"profile {pid!r} is not an enabled profile (have {sorted(enabled)})")
        prof = enabled[pid]
        if product not in prof.trading_params.trading_pairs:
            raise TradeRefused(
                f"{product} is not one of {pid}'s trading pairs {prof.trading_params.trading_pairs}"
            )
        halt = self.halted.get(pid)
        if halt is not None and not self._halt_over(halt):
            raise TradeRefused(f"{pid} is halted: {halt.reason}")
        candle = self.last_candle.get(product)
        if candle is None:
            raise TradeRefused(f"no market price known for {product} (no candle on the candles topic yet)")
        price = candle.close
        book = self.tracker.books[pid]
        held = book.positions.get(product, Decimal(0))
        if side == "buy":
            equity = book.equity(self.tracker.marks)
            budget = equity * Decimal(str(prof.strategy_config.max_position_size_pct)) / 100
            if (held + size) * price > budget:
                raise TradeRefused(
                    f"{pid}: {product} position would be {(held + size) * price:.2f}, above max_position_size_pct "
                    f"{prof.strategy_config.max_position_size_pct}% of equity {equity:.2f}"
                )
            if held == 0 and len(book.open_positions()) >= prof.trading_params.max_open_positions:
                raise TradeRefused(
                    f"{pid}: max_open_positions {prof.trading_params.max_open_positions} reached"
                )
        elif size > held:
            raise TradeRefused(f"{pid}: sells {size} {product} but holds {held}")

        market = candle.event_time
        now = datetime.now(UTC)
        live = now - market < timedelta(seconds=2 * candle.interval_s)
        event_time = now if live else market
        marks = [self.step_marks[p] for p in enabled if p in self.step_marks]
        step_s = min(marks) if len(marks) == len(enabled) else candle.open_time.timestamp()
        plan = self.tracker.latest_plan.get(pid)
        intent_id = derived_id("manual", pid, product, side, size, uuid.uuid4().hex)
        intent = PlaceOrder(
            id=derived_id("intent-msg", intent_id),
            event_time=event_time,
            correlation_id=f"manual:{intent_id[:16]}",
            intent_id=intent_id,
            profile=pid,
            product=product,
            side=side,
            size=size,
            reference_price=price,
            reason="manual",
            fingerprint=plan.fingerprint if plan is not None else "manual",
            epoch=plan.epoch if plan is not None else 0,
            step_time=datetime.fromtimestamp(step_s, UTC),
            priority=prof.priority,
        )
        return intent, pid
