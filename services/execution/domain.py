"""One profile's paper exchange, pure: approved orders in, order events and fills out.

- An order is sent at `not_before` (the arbiter's, which keeps different profiles' orders on a product
  apart) plus a per-profile de-sync delay: seeded from the profile's hash (the plan hash of the intent's
  epoch, carried on the order; the config's base_hash when absent), bounded by desync_min_ms..desync_max_ms,
  in event time. It fills at the open of the candle that follows its decision (the first candle of the
  product opening at or after the decision time, the order's event time), with slippage and the taker fee,
  at its send time.
- Internal part (`internal_size`, paper mode): settled with the other profile at that candle's open (the
  mid price), without fee or slippage, at the decision time: an internal fill and order events marked internal.
- Slippage = min(slippage_tolerance, 0.1 * (high - low) / open) of that candle, against the trader.
- Never twice: an order is known by its client order id; a redelivered or retried ExecuteOrder for a known id
  produces nothing new.
- Balances are checked: a buy beyond the cash, or a sell beyond the position, is rejected with the reason.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, ROUND_UP, Decimal

from shared.aligner import Aligner, Step
from shared.clock import derived_id, from_epoch_s
from shared.config import ExecutionSettings, Profile
from shared.messages import (
    CandleClosed,
    ControlCommand,
    ExecuteOrder,
    Message,
    OrderFilled,
    OrderUpdated,
    ReplayFinished,
    WatermarkAdvanced,
    WorkerFinished,
)

# Candles kept per product. The market-data stream runs ahead of orders (a replay publishes everything at
# once), so an order decided at T must still find the candle opening at T when it arrives: a year of hourly
# candles in replay; in live trading orders arrive within seconds of their candle.
HISTORY_CANDLES = 10_000


def desync_delay_ms(seed: str, intent_id: str, lo: int, hi: int) -> int:
    """Seeded, bounded delay: the same profile and intent always wait the same time (replay is reproducible)."""
    if hi <= lo:
        return lo
    u = int.from_bytes(hashlib.sha256(f"{seed}|desync|{intent_id}".encode()).digest()[:8], "big") / 2**64
    return lo + int(u * (hi - lo + 1))


@dataclass
class OrderRecord:
    order: ExecuteOrder
    send_time: datetime
    status: str = "submitted"


@dataclass
class PaperState:
    profile_id: str
    seed: str
    settings: ExecutionSettings
    slippage_tolerance: Decimal
    aligner: Aligner
    cash: Decimal
    positions: dict[str, Decimal] = field(default_factory=dict)
    orders: dict[str, OrderRecord] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)  # client order ids awaiting their candle
    history: dict[str, list[CandleClosed]] = field(default_factory=dict)  # per product, by open time
    finished: bool = False
    killed: str | None = None  # set by an operator's `kill`: waiting orders cancelled, new ones refused


def new_state(profile_id: str, profile: Profile, settings: ExecutionSettings, partitions: frozenset[int]) -> PaperState:
    return PaperState(
        profile_id=profile_id,
        seed=profile.profile_hash.base_hash,
        settings=settings,
        slippage_tolerance=Decimal(str(profile.trading_params.slippage_tolerance)),
        aligner=Aligner(partitions),
        cash=Decimal(str(profile.paper.initial_quote_balance)),
    )


def decide(state: PaperState, msg: Message, partition: int = 0) -> list[Message]:
    out: list[Message] = []
    if isinstance(msg, CandleClosed | WatermarkAdvanced | ReplayFinished):
        for step in state.aligner.add(partition, msg):
            _remember(state, step)
        out.extend(_fill_waiting(state))
        if state.aligner.finished:
            out.extend(_cancel_waiting(state, "the replay ended before the next candle of the product"))
            if not state.finished:
                state.finished = True
                out.append(
                    WorkerFinished(
                        id=derived_id("finished", "execution", state.profile_id),
                        event_time=from_epoch_s(0),
                        correlation_id=f"{state.profile_id}:final",
                        service="execution",
                        instance=state.profile_id,
                        detail={"orders": len(state.orders)},
                    )
                )
    elif isinstance(msg, ControlCommand):
        # Only verified commands reach the domain (shared/commands.py CommandGate).
        if msg.target not in (state.profile_id, "all"):
            return []
        if msg.action == "kill":
            state.killed = f"killed by operator command {msg.id}"
            out.extend(_cancel_waiting(state, state.killed))
        elif msg.action == "resume":
            state.killed = None
    elif isinstance(msg, ExecuteOrder):
        if msg.profile != state.profile_id:
            return []  # not ours: the topic is per profile, so this is a routing error upstream
        if msg.client_order_id in state.orders:
            return []  # never twice
        if state.killed is not None:
            state.orders[msg.client_order_id] = OrderRecord(msg, msg.not_before, status="rejected")
            return [_update(msg, "rejected", msg.not_before, reason=state.killed)]
        internal_only = msg.internal_size >= msg.size
        if internal_only:
            delay, why = 0, f"internal transfer with {', '.join(msg.counterparties)}"
        else:
            seed = msg.profile_hash or state.seed
            delay = desync_delay_ms(seed, msg.intent_id, state.settings.desync_min_ms, state.settings.desync_max_ms)
            why = f"de-sync delay {delay} ms"
        send_time = msg.not_before + timedelta(milliseconds=delay)
        state.orders[msg.client_order_id] = OrderRecord(msg, send_time)
        out.append(_update(msg, "submitted", send_time, reason=why, internal=internal_only))
        state.waiting.append(msg.client_order_id)
        out.extend(_fill_waiting(state))
        if state.aligner.finished:
            out.extend(_cancel_waiting(state, "the replay ended before the next candle of the product"))
    return out


def _remember(state: PaperState, step: Step) -> None:
    for c in step.candles:
        h = state.history.setdefault(c.product, [])
        h.append(c)  # steps arrive in time order (aligner), so the list stays sorted
        if len(h) > HISTORY_CANDLES:
            del h[: len(h) - HISTORY_CANDLES]


def _fill_candle(state: PaperState, order: ExecuteOrder) -> CandleClosed | None:
    """The first candle of the product opening at or after the decision: its open is the next tradable price."""
    h = state.history.get(order.product, [])
    # The decision time, not not_before: an order the arbiter delays by milliseconds still trades at the
    # candle its decision was made for.
    i = bisect.bisect_left(h, order.event_time, key=lambda c: c.open_time)
    return h[i] if i < len(h) else None


def _fill_waiting(state: PaperState) -> list[Message]:
    out: list[Message] = []
    still: list[str] = []
    for coid in state.waiting:
        rec = state.orders[coid]
        candle = _fill_candle(state, rec.order)
        if candle is None:
            still.append(coid)
            continue
        out.extend(_execute(state, rec, candle))
    state.waiting = still
    return out


def _cancel_waiting(state: PaperState, reason: str) -> list[Message]:
    out: list[Message] = []
    for coid in state.waiting:
        rec = state.orders[coid]
        rec.status = "cancelled"
        o = rec.order
        out.append(_update(o, "cancelled", rec.send_time, reason=reason, internal=o.internal_size >= o.size))
    state.waiting = []
    return out


def _execute(state: PaperState, rec: OrderRecord, candle: CandleClosed) -> list[Message]:
    o = rec.order
    internal = min(o.internal_size, o.size)
    market = o.size - internal
    rng = (candle.high - candle.low) / candle.open
    slip = min(state.slippage_tolerance, rng * Decimal("0.1"))
    price = candle.open * (1 + slip) if o.side == "buy" else candle.open * (1 - slip)
    # Rounded towards the open, so the slippage never exceeds slippage_tolerance by the rounding.
    price = price.quantize(Decimal("0.00000001"), rounding=ROUND_DOWN if o.side == "buy" else ROUND_UP)
    mid = candle.open.quantize(Decimal("0.00000001"))
    notional = price * market
    fee = (notional * Decimal(str(state.settings.taker_fee_rate))).quantize(Decimal("0.00000001"))
    total = notional + mid * internal
    t = max(rec.send_time, candle.open_time)
    t_internal = max(o.not_before, candle.open_time)
    if o.side == "buy" and total + fee > state.cash:
        rec.status = "rejected"
        return [_update(o, "rejected", t, reason=f"insufficient funds: needs {total + fee:.2f}, has {state.cash:.2f}",
                        internal=market == 0)]
    held = state.positions.get(o.product, Decimal(0))
    if o.side == "sell" and o.size > held:
        rec.status = "rejected"
        return [_update(o, "rejected", t, reason=f"insufficient position: sells {o.size}, holds {held}",
                        internal=market == 0)]
    if o.side == "buy":
        state.cash -= total + fee
        state.positions[o.product] = held + o.size
    else:
        state.cash += total - fee
        left = held - o.size
        if left > 0:
            state.positions[o.product] = left
        else:
            state.positions.pop(o.product, None)
    rec.status = "filled"
    out: list[Message] = []
    if internal > 0:
        out.append(_fill(o, derived_id("fill", o.client_order_id, "internal"), t_internal, internal, mid, Decimal(0), True))
        if market > 0:
            # The internal leg as its own line of the order log; the order completes with the exchange part.
            out.append(_update(o, "partially_filled", t_internal, filled=internal, price=mid, internal=True,
                               reason=f"internal transfer with {', '.join(o.counterparties)} at the mid price"))
    if market > 0:
        out.append(_fill(o, derived_id("fill", o.client_order_id, 0), t, market, price, fee, False))
    avg = (total / o.size).quantize(Decimal("0.00000001"))
    t_done = t if market > 0 else t_internal
    out.append(_update(o, "filled", t_done, filled=o.size, price=avg, fee=fee, internal=market == 0))
    return out


def _fill(
    o: ExecuteOrder, fill_id: str, t: datetime, size: Decimal, price: Decimal, fee: Decimal, internal: bool
) -> OrderFilled:
    return OrderFilled(
        id=fill_id,
        event_time=t,
        correlation_id=o.correlation_id,
        causation_id=o.id,
        fill_id=fill_id,
        intent_id=o.intent_id,
        client_order_id=o.client_order_id,
        profile=o.profile,
        product=o.product,
        side=o.side,
        size=size,
        price=price,
        fee=fee,
        internal=internal,
    )


def _update(
    o: ExecuteOrder,
    status: str,
    t: datetime,
    *,
    reason: str = "",
    filled: Decimal = Decimal(0),
    price: Decimal | None = None,
    fee: Decimal = Decimal(0),
    internal: bool = False,
) -> OrderUpdated:
    return OrderUpdated(
        id=derived_id("order-update", o.client_order_id, status),
        event_time=t,
        correlation_id=o.correlation_id,
        causation_id=o.id,
        intent_id=o.intent_id,
        client_order_id=o.client_order_id,
        profile=o.profile,
        product=o.product,
        side=o.side,
        size=o.size,
        filled_size=filled,
        price=price,
        fee=fee,
        status=status,
        reason=reason,
        internal=internal,
    )
