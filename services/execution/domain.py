"""One profile's paper exchange, pure: approved orders in, order events and fills out.

- An order is sent at `not_before` (the arbiter's, which keeps different profiles' orders on a product
  apart) plus a per-profile de-sync delay: seeded from the profile's hash (the plan hash of the intent's
  epoch, carried on the order; the config's base_hash when absent), bounded by desync_min_ms..desync_max_ms,
  in event time. It trades at the open of the candle that follows its decision (the first candle of the
  product opening at or after the decision time, the order's event time), with slippage, at its send time.
- Internal part (`internal_size`, paper mode): settled with the other profile at that candle's open (the
  mid price), without fee or slippage, at the decision time: an internal fill and order events marked internal.
- Slippage = min(slippage_tolerance, 0.1 * (high - low) / open) of that candle, against the trader, and the
  price is then bounded by the candle's range: no fill is ever priced outside [low, high] of its candle.
- Protective exits (`ExecuteOrder.trigger_price`, from the strategy's stop loss / take profit): the resting
  order reached its level within the candle opening at `trigger_candle`; it fills on that candle at the
  trigger price (the level, or the open after a gap) moved by the slippage and bounded by the range.
- Volume is shared: all profiles together take at most max_volume_participation of a candle's volume. Each
  profile's worker takes at most its part (`liquidity_share`: the participation over the number of profiles),
  across all its orders on the product; the rest continues on the product's next candles and is cancelled at
  order_timeout (from the send time). Taker fee for what takes liquidity, maker fee for a resting limit order
  (docs/execution.md, Paper exchange).
- Never twice: an order is known by its client order id; a redelivered or retried ExecuteOrder for a known id
  produces nothing new.
- Balances are checked: a buy beyond the cash, or a sell beyond the position, is rejected with the reason.
- Account snapshots (`account_snapshots`, on in the workers and the backtest): an `AccountSnapshotted` of the
  paper books (cash in the quote asset, the position of every base asset the profile trades) at the first market
  step, and after the calls in which an order reached a final state, stamped with the latest event time of that
  call's outputs: the same event a live worker publishes from the exchange, and equal to the books by
  construction (free = total, used = 0: the paper exchange holds no funds for open orders).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, ROUND_UP, Decimal
from typing import Literal

# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from shared.aligner import Aligner, Step
from shared.clock import derived_id, from_epoch_s
from shared.config import ExecutionSettings, Profile
from shared.messages import (
    TERMINAL_STATUSES,
    AccountSnapshotted,
    AssetBalance,
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
from shared.orders import desync_delay_ms

# Candles kept per product. The market-data stream runs ahead of orders (a replay publishes everything at
# once), so an order decided at T must still find the candle opening at T when it arrives: a year of hourly
# candles in replay; in live trading orders arrive within seconds of their candle.
HISTORY_CANDLES = 10_000
EIGHT = Decimal("0.00000001")


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class OrderRecord:
    order: ExecuteOrder
    send_time: datetime
    status: str = "submitted"
    deadline: datetime | None = None  # send_time + order_timeout: what is still open then is cancelled
    filled: Decimal = Decimal(0)  # exchange part filled so far (the internal part is settled at once)
    internal_done: Decimal = Decimal(0)
    cost: Decimal = Decimal(0)  # sum of price * size over all fills (internal leg included)
    fees: Decimal = Decimal(0)
    fills: int = 0  # exchange fills so far: numbers the fill ids
    last_open: datetime | None = None  # open time of the last candle the order traded on
    last_interval_s: int = 0
    last_fill_time: datetime | None = None

    @property
    def remaining(self) -> Decimal:
        return self.order.size - self.internal_done - self.filled


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
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
    waiting: list[str] = field(
        default_factory=list
    )  # client order ids still open: awaiting a candle or the rest
    history: dict[str, list[CandleClosed]] = field(default_factory=dict)  # per product, by open time
    order_timeout: timedelta = timedelta(seconds=60)
    # This profile's part of each candle's volume (max_volume_participation over the profiles sharing it), and
    # what its orders have taken of each (product, candle open) so far.
    liquidity_share: Decimal = Decimal("0.1")
    used: dict[tuple[str, datetime], Decimal] = field(default_factory=dict)
    market_time_s: int | None = None  # the latest complete market step seen (its open time)
    finished: bool = False
    killed: str | None = None  # set by an operator's `kill`: waiting orders cancelled, new ones refused
    quote: str = "USDC"
    assets: tuple[str, ...] = ()  # every base asset the profile trades (the account snapshot's assets)
    account_snapshots: bool = False  # publish AccountSnapshotted (module docstring)
    account_started: bool = False  # the start snapshot went out


# Durable state (shared/snapshots.py): the version of PaperState's snapshot form (raise it when a field changes
# meaning), and the fields new_state sets from the configuration, which a snapshot leaves out.
SNAPSHOT_SCHEMA = 2
CONFIG_FIELDS = frozenset(
    {
        "profile_id",
        "seed",
        "settings",
        "slippage_tolerance",
        "order_timeout",
        "liquidity_share",
        "quote",
        "assets",
        "account_snapshots",
    }
)


def traded_base_assets(profile: Profile, quote: str) -> tuple[str, ...]:
    """Every base asset a profile may trade (its pairs' bases and its assets), sorted; never the quote."""
    bases = {pair.split("/", 1)[0] for pair in profile.trading_pairs} | set(profile.traded_assets())
    return tuple(sorted(bases - {quote}))


def new_state(
    profile_id: str,
    profile: Profile,
    settings: ExecutionSettings,
    partitions: frozenset[int],
    *,
    profiles_sharing: int = 1,
    quote: str = "USDC",
    account_snapshots: bool = False,
) -> PaperState:
    """`profiles_sharing`: how many profiles' workers trade on the same candles (every enabled profile): each
    takes at most its equal part of max_volume_participation, so together they never exceed it."""
    if profiles_sharing < 1:
        raise ValueError(f"profiles_sharing must be at least 1, got {profiles_sharing}")
    share = (Decimal(str(settings.max_volume_participation)) / profiles_sharing).quantize(
        EIGHT, rounding=ROUND_DOWN
    )
    return PaperState(
        liquidity_share=share,
        profile_id=profile_id,
        seed=profile.profile_hash.base_hash,
        settings=settings,
        slippage_tolerance=Decimal(str(profile.trading_params.slippage_tolerance)),
        aligner=Aligner(partitions),
        cash=Decimal(str(profile.paper.initial_quote_balance)),
        order_timeout=timedelta(seconds=profile.trading_params.order_timeout),
        quote=quote,
        assets=traded_base_assets(profile, quote),
        account_snapshots=account_snapshots,
    )


def decide(state: PaperState, msg: Message, partition: int = 0) -> list[Message]:
    out = _decide(state, msg, partition)
    if state.account_snapshots:
        snaps = _account_events(state, out)
        if snaps:
            # Before a WorkerFinished: whoever waits for the end finds the last snapshot published.
            done: list[Message] = [m for m in out if isinstance(m, WorkerFinished)]
            out = [m for m in out if not isinstance(m, WorkerFinished)] + snaps + done
    return out


# The balance of an asset not held: AssetBalance(free=Decimal(0), used=Decimal(0), total=Decimal(0)), built once.
_NO_BALANCE = AssetBalance(free=Decimal(0), used=Decimal(0), total=Decimal(0))


def account_snapshot(
    state: PaperState, t: datetime, trigger: Literal["start", "periodic", "order_final"], key: str
) -> AccountSnapshotted:
    """The paper books as the exchange's account would show them: the quote and every traded base asset."""
    held: dict[str, Decimal] = {}
    for product, size in state.positions.items():
        base = product.split("/", 1)[0]
        held[base] = held.get(base, Decimal(0)) + size
    balances = {state.quote: AssetBalance(free=state.cash, used=Decimal(0), total=state.cash)}
    for asset in sorted(set(state.assets) | set(held)):
        amount = held.get(asset)
        # An asset not held: the one empty balance (a frozen message with the same values), not one more.
        balances[asset] = (
            _NO_BALANCE if amount is None else AssetBalance(free=amount, used=Decimal(0), total=amount)
        )
    return AccountSnapshotted(
        id=derived_id("account", state.profile_id, trigger, key),
        event_time=t,
        correlation_id=f"account:{state.profile_id}",
        profile=state.profile_id,
        source="paper",
        trigger=trigger,
        quote=state.quote,
        balances=balances,
    )


def _account_events(state: PaperState, out: list[Message]) -> list[Message]:
    snaps: list[Message] = []
    if not state.account_started and state.market_time_s is not None:
        state.account_started = True
        t = from_epoch_s(state.market_time_s)
        snaps.append(account_snapshot(state, t, "start", str(state.market_time_s)))
    final = [m for m in out if isinstance(m, OrderUpdated) and m.status in TERMINAL_STATUSES]
    if final:
        # After every output of this call: the books then include each of them (and nothing later, since
        # what still works trades on candles that have not arrived yet).
        t = max(m.event_time for m in out if not isinstance(m, WorkerFinished))
        snaps.append(account_snapshot(state, t, "order_final", ",".join(m.client_order_id for m in final)))
    return snaps


def _decide(state: PaperState, msg: Message, partition: int = 0) -> list[Message]:
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
            delay = desync_delay_ms(
                seed, msg.intent_id, state.settings.desync_min_ms, state.settings.desync_max_ms
            )
            why = f"de-sync delay {delay} ms"
        send_time = msg.not_before + timedelta(milliseconds=delay)
        state.orders[msg.client_order_id] = OrderRecord(
            msg, send_time, deadline=send_time + state.order_timeout
        )
        out.append(_update(msg, "submitted", send_time, reason=why, internal=internal_only))
        state.waiting.append(msg.client_order_id)
        out.extend(_fill_waiting(state))
        if state.aligner.finished:
            out.extend(_cancel_waiting(state, "the replay ended before the next candle of the product"))
    return out


def _remember(state: PaperState, step: Step) -> None:
    state.market_time_s = step.time_s
    for c in step.candles:
        h = state.history.setdefault(c.product, [])
        h.append(c)  # steps arrive in time order (aligner), so the list stays sorted
        if len(h) > HISTORY_CANDLES:
            del h[: len(h) - HISTORY_CANDLES]
    if len(state.used) > 4 * HISTORY_CANDLES:
        # What was taken of candles no order can trade on any more (older than every product's history).
        oldest = min(h[0].open_time for h in state.history.values() if h)
        state.used = {k: v for k, v in state.used.items() if k[1] >= oldest}


def _fill_candle(state: PaperState, order: ExecuteOrder) -> CandleClosed | None:
    """The first candle of the product opening at or after the decision: its open is the next tradable price.
    A protective exit's: the candle that reached its level (it rested at the exchange during it)."""
    h = state.history.get(order.product, [])
    if order.trigger_candle is not None:
        i = bisect.bisect_left(h, order.trigger_candle, key=lambda c: c.open_time)
        return h[i] if i < len(h) else None
    # The decision time, not not_before: an order the arbiter delays by milliseconds still trades at the
    # candle its decision was made for.
    i = bisect.bisect_left(h, order.event_time, key=lambda c: c.open_time)
    return h[i] if i < len(h) else None


def _next_candle(state: PaperState, rec: OrderRecord) -> CandleClosed | None:
    if rec.last_open is None:
        return _fill_candle(state, rec.order)
    h = state.history.get(rec.order.product, [])
    i = bisect.bisect_right(h, rec.last_open, key=lambda c: c.open_time)
    return h[i] if i < len(h) else None


def _fill_waiting(state: PaperState) -> list[Message]:
    out: list[Message] = []
    still: list[str] = []
    for coid in state.waiting:
        rec = state.orders[coid]
        while rec.status in ("submitted", "partially_filled"):
            candle = _next_candle(state, rec)
            # The first candle is the order's arrival at the market and always trades; order_timeout bounds
            # how long the rest stays open after it.
            if rec.last_open is not None and _expired(state, rec, candle):
                t = max(rec.deadline or rec.send_time, rec.last_fill_time or rec.send_time)
                out.append(_cancel(rec, _timeout_reason(state, rec), t))
                break
            if candle is None:
                break
            out.extend(_execute(state, rec, candle))
        if rec.status in ("submitted", "partially_filled"):
            still.append(coid)
    state.waiting = still
    return out


def _expired(state: PaperState, rec: OrderRecord, candle: CandleClosed | None) -> bool:
    """The order's next candle cannot come before its deadline: cancel the rest now, not at the next step."""
    deadline = rec.deadline or rec.send_time
    if candle is not None:
        return candle.open_time >= deadline
    assert rec.last_open is not None
    if rec.last_interval_s and rec.last_open + timedelta(seconds=rec.last_interval_s) >= deadline:
        return True  # the product's next candle opens too late
    return state.market_time_s is not None and from_epoch_s(state.market_time_s) >= deadline


def _num(d: Decimal) -> str:
    return format(d.normalize(), "f")


def _share(state: PaperState) -> str:
    whole = Decimal(str(state.settings.max_volume_participation))
    part = f"at most {_num(state.liquidity_share * 100)}% of a candle's volume"
    return part if state.liquidity_share >= whole else f"{part} (this profile's part of {_num(whole * 100)}%)"


def _timeout_reason(state: PaperState, rec: OrderRecord) -> str:
    return (
        f"order_timeout {state.order_timeout.total_seconds():g}s reached: filled "
        f"{_num(rec.internal_done + rec.filled)} of {_num(rec.order.size)} ({_share(state)} per candle)"
    )


def _cancel(rec: OrderRecord, reason: str, t: datetime) -> OrderUpdated:
    rec.status = "cancelled"
    o = rec.order
    done = rec.internal_done + rec.filled
    avg = (rec.cost / done).quantize(EIGHT) if done > 0 else None
    return _update(
        o,
        "cancelled",
        t,
        reason=reason,
        filled=done,
        price=avg,
        fee=rec.fees,
        internal=o.internal_size >= o.size,
    )


def _cancel_waiting(state: PaperState, reason: str) -> list[Message]:
    out: list[Message] = []
    for coid in state.waiting:
        rec = state.orders[coid]
        out.append(_cancel(rec, reason, max(rec.send_time, rec.last_fill_time or rec.send_time)))
    state.waiting = []
    return out


def _limit_fill_price(
    state: PaperState, o: ExecuteOrder, candle: CandleClosed, first: bool
) -> tuple[Decimal, bool] | None:
    """(price, maker) at which a limit order trades on this candle, or None when the market does not reach it.

    Marketable on arrival (a buy limit at or above the open): it takes liquidity like a market order, its price
    capped by the limit. Otherwise it rests on the book and fills at its limit, as maker, once the candle trades
    through the limit (strictly: a touch may leave a resting order in the queue).
    """
    lim = o.limit_price
    assert lim is not None
    buy = o.side == "buy"
    if first and (candle.open <= lim if buy else candle.open >= lim):
        p = _taker_price(state, o, candle)
        return (min(p, lim) if buy else max(p, lim)), False
    if candle.low < lim if buy else candle.high > lim:
        # A later candle that opened beyond the limit trades at the limit's side of its range at best.
        return _in_range(lim, candle), True
    return None


def _taker_price(state: PaperState, o: ExecuteOrder, candle: CandleClosed, first: bool = True) -> Decimal:
    """The open (a protective exit's trigger price on its candle) moved by the slippage against the trader,
    then bounded by the candle's range: a price nobody traded at is never a fill."""
    rng = (candle.high - candle.low) / candle.open
    slip = min(state.slippage_tolerance, rng * Decimal("0.1"))
    ref = o.trigger_price if first and o.trigger_price is not None else candle.open
    price = ref * (1 + slip) if o.side == "buy" else ref * (1 - slip)
    # Rounded towards the reference, so the slippage never exceeds slippage_tolerance by the rounding.
    price = price.quantize(EIGHT, rounding=ROUND_DOWN if o.side == "buy" else ROUND_UP)
    return _in_range(price, candle)


def _in_range(price: Decimal, candle: CandleClosed) -> Decimal:
    return min(max(price, candle.low), candle.high)


def _execute(state: PaperState, rec: OrderRecord, candle: CandleClosed) -> list[Message]:
    """Trade the order on one candle: on its first, the internal leg and the balance check of the whole order;
    on each, at most max_volume_participation of the candle's volume of the exchange part."""
    o = rec.order
    first = rec.last_open is None
    rec.last_open, rec.last_interval_s = candle.open_time, candle.interval_s
    internal = min(o.internal_size, o.size) if first else Decimal(0)
    market_left = o.size - min(o.internal_size, o.size) - rec.filled
    slot = (o.product, candle.open_time)
    taken = state.used.get(slot, Decimal(0))
    cap = max(
        Decimal(0), (candle.volume * state.liquidity_share).quantize(EIGHT, rounding=ROUND_DOWN) - taken
    )
    market = min(market_left, cap)
    if o.order_type == "limit":
        priced = _limit_fill_price(state, o, candle, first)
        if priced is None:  # the market did not reach the limit on this candle
            priced, market = (o.limit_price or candle.open, True), Decimal(0)
        price, maker = priced
    else:
        price, maker = _taker_price(state, o, candle, first), False
    rate = state.settings.maker_fee_rate if maker else state.settings.taker_fee_rate
    fee = (price * market * Decimal(str(rate))).quantize(EIGHT)
    mid = candle.open.quantize(EIGHT)
    t = max(rec.send_time, candle.open_time)
    t_internal = max(o.not_before, candle.open_time)
    held = state.positions.get(o.product, Decimal(0))
    if first:
        # The whole order must be covered when it reaches the market (an exchange holds the funds for all of it).
        whole = price * market_left + mid * internal
        whole_fee = (price * market_left * Decimal(str(rate))).quantize(EIGHT)
        if o.side == "buy" and whole + whole_fee > state.cash:
            rec.status = "rejected"
            return [
                _update(
                    o,
                    "rejected",
                    t,
                    reason=f"insufficient funds: needs {whole + whole_fee:.2f}, has {state.cash:.2f}",
                    internal=market_left == 0,
                )
            ]
        if o.side == "sell" and o.size > held:
            rec.status = "rejected"
            return [
                _update(
                    o,
                    "rejected",
                    t,
                    reason=f"insufficient position: sells {o.size}, holds {held}",
                    internal=market_left == 0,
                )
            ]
    elif o.side == "buy" and price * market + fee > state.cash:
        # Later parts: another order of the profile may have used the cash since (no holds are modelled).
        return [
            _cancel(
                rec,
                f"insufficient funds for the rest: needs {price * market + fee:.2f}, has {state.cash:.2f}",
                t,
            )
        ]
    elif o.side == "sell" and market > held:
        return [_cancel(rec, f"insufficient position for the rest: sells {market}, holds {held}", t)]
    out: list[Message] = []
    if internal > 0:
        _book(state, o, internal, mid * internal, Decimal(0))
        rec.internal_done = internal
        rec.cost += mid * internal
        out.append(
            _fill(
                o,
                derived_id("fill", o.client_order_id, "internal"),
                t_internal,
                internal,
                mid,
                Decimal(0),
                True,
                candle_open=candle.open_time,
            )
        )
        if market_left > 0:
            # The internal leg as its own line of the order log; the order completes with the exchange part.
            rec.status = "partially_filled"
            out.append(
                _update(
                    o,
                    "partially_filled",
                    t_internal,
                    filled=internal,
                    price=mid,
                    internal=True,
                    reason=f"internal transfer with {', '.join(o.counterparties)} at the mid price",
                )
            )
        rec.last_fill_time = t_internal
    if market > 0:
        state.used[slot] = taken + market
        _book(state, o, market, price * market, fee)
        out.append(
            _fill(
                o,
                derived_id("fill", o.client_order_id, rec.fills),
                t,
                market,
                price,
                fee,
                False,
                liquidity="maker" if maker else "taker",
                candle_open=candle.open_time,
            )
        )
        rec.fills += 1
        rec.filled += market
        rec.cost += price * market
        rec.fees += fee
        rec.last_fill_time = t
    done = rec.internal_done + rec.filled
    if rec.remaining == 0:
        rec.status = "filled"
        avg = (rec.cost / o.size).quantize(EIGHT)
        t_done = t if market_left > 0 else t_internal
        out.append(
            _update(o, "filled", t_done, filled=o.size, price=avg, fee=rec.fees, internal=market_left == 0)
        )
    elif market > 0:
        rec.status = "partially_filled"
        out.append(
            _update(
                o,
                "partially_filled",
                t,
                filled=done,
                price=(rec.cost / done).quantize(EIGHT),
                fee=rec.fees,
                reason=f"filled {_num(market)} at {_num(price)}: {_share(state)} ({_num(candle.volume)})",
                seq=rec.fills,
            )
        )
    return out


def _book(state: PaperState, o: ExecuteOrder, size: Decimal, notional: Decimal, fee: Decimal) -> None:
    held = state.positions.get(o.product, Decimal(0))
    if o.side == "buy":
        state.cash -= notional + fee
        state.positions[o.product] = held + size
    else:
        state.cash += notional - fee
        left = held - size
        if left > 0:
            state.positions[o.product] = left
        else:
            state.positions.pop(o.product, None)


def _fill(
    o: ExecuteOrder,
    fill_id: str,
    t: datetime,
    size: Decimal,
    price: Decimal,
    fee: Decimal,
    internal: bool,
    *,
    liquidity: Literal["maker", "taker"] = "taker",
    candle_open: datetime | None = None,
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
        liquidity=liquidity,
        internal=internal,
        intent_reason=o.intent_reason,
        candle_open=candle_open,
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
    seq: int = 0,
) -> OrderUpdated:
    return OrderUpdated(
        # `seq` tells apart the several partially_filled updates of one order (0: the first, or the only one).
        id=derived_id("order-update", o.client_order_id, status, *((seq,) if seq else ())),
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
        intent_reason=o.intent_reason,
    )
