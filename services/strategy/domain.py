"""One profile's trading decisions, as a pure state machine: `decide(state, message, partition) -> messages`.

Inputs: complete event-time steps of candles (see shared/aligner.py), the profile's plans, and the outcomes
of its own orders. A step is evaluated only when (a) the plan of its epoch is known and (b) what each of its
orders did before the step's close is known: the order has its final outcome (filled, cancelled, rejected),
or an event of the exchange at or after the close (the exchange reports an order's events in time order, so
nothing earlier is still to come). The step then sees exactly the outcomes whose event time is before its
close, and nothing later: an order still working at the close is working for the decision (no look-ahead),
and the position a decision sees is the one a live trader would have, whatever order Kafka delivers the
topics in: replay is deterministic.

While an order of the profile works on a product, the step makes no new intent in that product (no buy and
sell working at once, no sale sized to a position not yet held); an entry elsewhere is sized from the cash
with what the working buys can still spend set aside (their unfilled size at the reference price, plus 2 %).

The state is a function of the input logs alone, whatever their interleaving. That is what lets a worker
rebuild it after a crash by reading its inputs from the beginning (docs/backtest.md): an outcome read before
the intent it answers (a restarted worker reads the order events topic faster than it re-evaluates the
candles) is held until the state re-emits that intent, then applied, exactly where the first run applied it.

Which order events reach the books is services/strategy/trust.py's: a fill contradicting our own intent is
refused; outcomes of intents this state never sends (manual orders) are booked only when the arbiter approved
them, judged before the first step closing after their event time, after a bounded wait for the decision.

Early rotations (an operator's `rotate`): the registry publishes a second plan for the epoch, valid from the
rotation step (`PlanPublished.rotation` > 0). A step uses the latest plan of its epoch starting at or before it.
An accepted rotate command for this profile, appended at broker time T, applies at the first step whose candles
were published at or after T (the registry's rule, docs/registry.md section 13): that step waits for the
rotated plan, so a rebuild switches plans at the same step as the first run.

Long-only spot: a buy opens a position, a sell closes it. Exits come before entries. Stop loss and take profit
are protective orders resting at the exchange once the entry completed (shared/protective.py): the first
candle whose range reaches a level sends the exit with its trigger price and candle, and the paper exchange
fills it on that candle at that price (slippage and fee included), not at a later close. A live candle that
carries its trades' path is read from the trades: which level came first, and the stop at the first trade
through it. Then a halt's close
(reason "halt"), an operator's or a rotation's flatten, and signal reversal; entries need the blended signal and confidence above the profile's
thresholds and the market's volatility between `entropy_threshold` (per candle) and `volatility_threshold`
(annualised).

Live mode (`new_state(..., live=True)`, `system.mode: live`): cash, positions, equity, the drawdown's high-water
mark and the daily-loss day start come from the account snapshots (`AccountSnapshotted`, published by the
execution worker) and the fills, not from `paper.initial_quote_balance`. A snapshot is an outcome like the others:
applied when the first step closing after its event time is evaluated, in event-time order with the fills.
- The first snapshot seeds the books as soon as it is read (the account before the profile trades): cash is the
  quote asset's total; a base asset held beyond the books'
  positions is a holding the system did not trade, kept apart (`untracked`: shown and reported, out of the
  equity, so neither sizing nor the drawdown and daily-loss limits move with its price). Equity, the high-water mark and the day start are taken afresh at that step. No step
  with a plan is evaluated before it (warm-up history is), so a rebuild from the inputs evaluates the same steps
  with the same books whatever order it reads its topics in.
- Each later snapshot is compared with the books, unless an order of the profile is working or an outcome not
  ours is still being judged (the exchange may then be ahead of the books): a difference beyond dust (quote:
  0.01; an asset: the larger of its product's size increment, 1e-8 and 0.01 % of the holding) emits
  `AccountMismatchDetected` (state mismatch) and halts the profile's entries (exits still act). A later snapshot
  that agrees again, or an operator's signed `acknowledge` command issued after the mismatching snapshot (the
  books then take the exchange's amounts: the difference goes to cash, to the untracked holdings or out of the
  positions), lifts it (state resolved).
- Untracked holdings are never sold unless `risk_management.sell_untracked` (then they are positions like the
  others from the first snapshot on: stops, signal exits, flatten and halts sell them).
In paper mode snapshots are ignored: the paper exchange's agree with the books by construction.

The indicators are services/strategy/indicators.py's `MarketSignals`, one per worker (the backtest shares one
across its profiles).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from functools import partial
from typing import Any, Literal

# Re-exported: callers name MarketSignals from here, and a snapshot written before the split names both classes
# as services.strategy.domain's (pickle finds a class by its module and name).
# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from services.strategy.indicators import MarketSignals as MarketSignals
from services.strategy.indicators import _Snapshot as _Snapshot
from services.strategy.signals import Signal
from services.strategy.trust import Outcome, contradicts_own, hold, refuse, release_foreign

# Re-exported: the worker (bootstrap.py) reaches the refusals and held outcomes through this module, and a
# snapshot holding a refusal written before the split names Refusal as services.strategy.domain's.
from services.strategy.trust import Refusal as Refusal
from services.strategy.trust import awaits as awaits
from services.strategy.trust import take_refused as take_refused
from shared import protective
from shared.aligner import Aligner, Step
from shared.book import Holding, book_fill
from shared.clock import derived_id, from_epoch_s
from shared.config import Profile, StrategySettings
from shared.messages import (
    TERMINAL_STATUSES,
    AccountMismatchDetected,
    AccountSnapshotted,
    CandleClosed,
    ControlCommand,
    FeedStateChanged,
    IntentReason,
    Message,
    OrderDecided,
    OrderFilled,
    OrderUpdated,
    PlaceOrder,
    PlanPublished,
    ProfileHalted,
    ReplayFinished,
    Side,
    StepCompleted,
    WatermarkAdvanced,
    WorkerFinished,
)
from shared.native import reduce_frozen
from shared.strategy_catalog import CATALOG

SIZE_STEP = Decimal("0.00000001")
MIN_NOTIONAL = Decimal("1")
Reason = IntentReason
RESERVE = Decimal("1.02")  # a working buy may still spend its unfilled size at the reference price, plus this
RotationPolicy = Literal["keep", "close"]
Deferred = Outcome | AccountSnapshotted
QUOTE_DUST = Decimal("0.01")  # a difference in the quote asset up to this is dust
ASSET_DUST_MIN = Decimal("0.00000001")
ASSET_DUST_RATE = Decimal("0.0001")  # 0.01 % of the holding
DEFAULT_DECISION_WAIT_STEPS = StrategySettings().decision_wait_steps


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class _Limits:
    """The profile's thresholds as the types the hot path compares with (converted once)."""

    stop_loss_pct: Decimal
    take_profit_pct: Decimal
    max_drawdown_pct: Decimal
    max_daily_loss_pct: Decimal

    @staticmethod
    def of(p: Profile) -> _Limits:
        rm = p.risk_management
        return _Limits(
            Decimal(str(rm.stop_loss_pct)),
            Decimal(str(rm.take_profit_pct)),
            Decimal(str(rm.max_drawdown_pct)),
            Decimal(str(rm.max_daily_loss_pct)),
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class Position:
    size: Decimal
    avg_price: Decimal


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class StrategyState:
    profile_id: str
    profile: Profile
    quote: str
    aligner: Aligner
    cash: Decimal
    initial_equity: Decimal
    limits: _Limits
    on_rotation: RotationPolicy = "keep"
    market: MarketSignals = field(default_factory=MarketSignals)
    weights: dict[str, float] = field(default_factory=dict)
    positions: dict[str, Position] = field(default_factory=dict)
    plans: dict[int, list[PlanPublished]] = field(default_factory=dict)  # epoch -> plans by (start, rotation)
    step_published: dict[int, int] = field(
        default_factory=dict
    )  # step -> latest Kafka timestamp of its candles
    rotations_waiting: dict[str, int] = field(default_factory=dict)  # rotate command id -> broker time (ms)
    rotations_answered: set[str] = field(default_factory=set)  # command ids a published plan answers
    marks: dict[str, Decimal] = field(default_factory=dict)
    # Our intents whose final outcome has not been applied yet: orders working as of the last evaluated step.
    pending: dict[str, PlaceOrder] = field(default_factory=dict)
    # Outcomes of our intents as they arrive, applied when a step whose close is after their event time is
    # evaluated: (event time, arrival number, outcome).
    deferred: list[tuple[float, int, Deferred]] = field(default_factory=list)
    defer_seq: int = 0
    seen_through: dict[str, float] = field(default_factory=dict)  # intent -> latest exchange event time seen
    final_seen: set[str] = field(default_factory=set)  # intents whose final outcome has arrived
    applied_size: dict[str, Decimal] = field(default_factory=dict)  # intent -> size of its applied fills
    entry_done: dict[str, float] = field(default_factory=dict)  # product -> when its last entry order ended
    queue: deque[Step] = field(default_factory=deque)
    seen_fills: set[str] = field(default_factory=set)
    emitted: set[str] = field(default_factory=set)  # every intent id this state has sent
    # From here to `refused`: what services/strategy/trust.py's rules keep (its TrustState).
    # What each of our intents asked (product, side, size) and how much of it has filled: a fill of our own
    # intent that contradicts it (another product or side, more than the intent's size) is refused.
    own_orders: dict[str, tuple[str, str, Decimal]] = field(default_factory=dict)
    own_filled: dict[str, Decimal] = field(default_factory=dict)
    # Outcomes whose intent this state has not sent (yet): by intent id, and by event time for the ones that
    # turn out to answer no intent of ours (applied before the first step closing after them).
    held: dict[str, list[Outcome]] = field(default_factory=dict)
    held_times: list[tuple[float, int, str]] = field(default_factory=list)
    held_seq: int = 0
    # The arbiter's decisions on intents this state has not sent (first one per intent): what makes a manual
    # order's outcomes legitimate. Own intents' entries go when the intent is (re-)emitted.
    decisions: dict[str, OrderDecided] = field(default_factory=dict)
    decided_filled: dict[str, Decimal] = field(
        default_factory=dict
    )  # manual intent -> size of its applied fills
    # Foreign outcomes past their release with no decision yet: intent -> (refuse after this close, outcomes).
    awaiting: dict[str, tuple[int, list[Outcome]]] = field(default_factory=dict)
    decision_wait_steps: int = DEFAULT_DECISION_WAIT_STEPS
    refused: list[Refusal] = field(default_factory=list)  # drained by the worker (take_refused)
    realized_pnl: Decimal = Decimal(0)
    fees: Decimal = Decimal(0)
    high_water: Decimal = Decimal(0)
    day: int | None = None
    day_start_equity: Decimal = Decimal(0)
    halted: str | None = None  # drawdown halt: until a resume command
    paused: str | None = None  # an operator's pause or kill: no new entries until resume
    flatten_requested: bool = False  # an operator's flatten or kill: sell every position at the next step
    entries_paused_day: int | None = None  # daily-loss halt: until the next UTC day
    # Live feed: stale (the ingest's FeedStateChanged) -> no new entries until fresh again; exits still act.
    feed_stale: str | None = None
    # Live feed: a step published more than this long after its close is history (warm-up, backfill after an
    # outage): it feeds the models and exits but opens nothing. None: no limit (a replay carries no times).
    max_publish_lag_s: float | None = None
    history_steps: int = 0  # steps evaluated as history or while stale (entries held back)
    last_plan: tuple[int, int] | None = None  # (epoch, rotation) of the plan of the last evaluated step
    flatten: set[str] = field(default_factory=set)  # products to close because the plan rotated
    halt_close: set[str] = field(default_factory=set)  # products to close because a risk halt fired
    close_on_halt: bool = True
    steps_done: int = 0
    last_step_s: int | None = None
    market_done: bool = False
    finished: bool = False
    intents_sent: int = 0
    fills: int = 0  # fills applied (metrics)
    closed_trades: int = 0  # sell fills
    wins: int = 0  # sell fills whose gain at average cost exceeds both legs' fees (as summary.json counts)
    entry_fees: dict[str, Decimal] = field(default_factory=dict)  # buy fees of the open position, by product
    halt_counts: dict[str, int] = field(default_factory=dict)  # risk halts emitted, by kind
    # Live mode: account state from the exchange (module docstring).
    live: bool = False
    sell_untracked: bool = False
    account_seeded: bool = False  # the first snapshot was applied
    untracked: dict[str, Position] = field(
        default_factory=dict
    )  # product -> holding the system did not trade
    unpriced: set[str] = field(default_factory=set)  # untracked products whose cost basis awaits a mark
    reset_risk_marks: bool = False  # take equity, high-water mark and day start afresh at the next step
    account_mismatch: str | None = None  # entries halted: books and exchange differ beyond dust
    # The mismatching snapshot: (its id, event time, asset -> exchange minus books), what an acknowledge adopts.
    mismatch_diff: tuple[str, float, dict[str, Decimal]] | None = None
    acknowledged_through: float = -math.inf  # issue time of the latest acknowledge command
    account_events: list[Message] = field(default_factory=list)  # to publish with the next outputs
    last_account: AccountSnapshotted | None = None  # the latest applied snapshot
    _tunable: tuple[str, dict[str, float]] | None = None  # (plan id, the selected strategy's tunables)
    # on_step(..., lazy_marker=True): the last evaluated step's marker, left out of the outputs, as
    # (step time, step close, intents): the caller builds it with step_marker when it needs it.
    marker: tuple[int, int, int] | None = None
    _lazy_marker: bool = False

    def equity(self) -> Decimal:
        """Cash plus the positions at the step's marks: what the system trades. Untracked holdings (live: bought
        outside the system) are left out, so their price moves neither size entries nor halt the profile, and
        the halts agree with the report, whose return leaves them out too."""
        if not self.positions:
            return self.cash  # the common case, every step
        marks = self.marks
        return self.cash + sum(
            (p.size * marks.get(prod, p.avg_price) for prod, p in self.positions.items()), Decimal(0)
        )

    def untracked_holdings(self) -> dict[str, Decimal]:
        """Holdings the system did not trade, by asset (live mode; shown by status and the report)."""
        return {prod.split("/", 1)[0]: p.size for prod, p in sorted(self.untracked.items())}


# Durable state (shared/snapshots.py): the version of StrategyState's snapshot form (raise it when a field
# changes meaning), and the fields new_state sets from the configuration, which a snapshot leaves out.
SNAPSHOT_SCHEMA = 3
CONFIG_FIELDS = frozenset(
    {
        "live",
        "sell_untracked",
        "close_on_halt",
        "profile_id",
        "profile",
        "quote",
        "limits",
        "on_rotation",
        "weights",
        "decision_wait_steps",
        "max_publish_lag_s",
    }
)


def new_state(
    profile_id: str,
    profile: Profile,
    quote: str,
    partitions: frozenset[int],
    *,
    on_rotation: RotationPolicy = "keep",
    market: MarketSignals | None = None,
    decision_wait_steps: int = DEFAULT_DECISION_WAIT_STEPS,
    max_publish_lag_s: float | None = None,
    live: bool = False,
) -> StrategyState:
    """`market`: the backtest passes one instance shared by every profile; a worker leaves it None.
    `decision_wait_steps`: how many steps a foreign outcome waits for its decision (module docstring).
    `max_publish_lag_s`: a live step published later than this after its close opens nothing.
    `live`: `system.mode: live`: the books come from the account snapshots (module docstring), not from
    `paper.initial_quote_balance` (cash 0 until the first snapshot)."""
    cash = Decimal(0) if live else Decimal(str(profile.paper.initial_quote_balance))
    return StrategyState(
        profile_id=profile_id,
        profile=profile,
        quote=quote,
        aligner=Aligner(partitions),
        cash=cash,
        initial_equity=cash,
        high_water=cash,
        on_rotation=on_rotation,
        market=market if market is not None else MarketSignals(),
        weights={str(k): v for k, v in profile.strategy_config.strategy_weights.items()},
        limits=_Limits.of(profile),
        decision_wait_steps=decision_wait_steps,
        max_publish_lag_s=max_publish_lag_s,
        close_on_halt=profile.risk_management.close_on_halt,
        live=live,
        sell_untracked=profile.risk_management.sell_untracked,
    )


def decide(
    state: StrategyState, msg: Message, now_partition: int = 0, published_ms: int | None = None
) -> list[Message]:
    """Apply one input message; return the messages to publish (intents, step markers, halts, finish).

    `published_ms`: the record's Kafka timestamp (a candle: when it was published; a command: when the broker
    appended it); it places a rotate command among the steps."""
    if isinstance(msg, CandleClosed) and published_ms is not None:
        t = int(msg.open_time.timestamp())
        state.step_published[t] = max(published_ms, state.step_published.get(t, published_ms))
    if isinstance(msg, CandleClosed | WatermarkAdvanced | ReplayFinished):
        for step in state.aligner.add(now_partition, msg):
            state.queue.append(step)
        if state.aligner.finished:
            state.market_done = True
    elif isinstance(msg, FeedStateChanged):
        # In order with the candles (broadcast on every partition): it holds from the next step evaluated.
        state.feed_stale = msg.reason if msg.state == "stale" else None
    elif isinstance(msg, PlanPublished):
        if msg.profile == state.profile_id:
            plans = state.plans.setdefault(msg.epoch, [])
            # A redelivered or re-published plan replaces its own slot: one plan per (start, rotation).
            plans[:] = [
                p for p in plans if (p.epoch_start, p.rotation) != (msg.epoch_start, msg.rotation)
            ] + [msg]
            plans.sort(key=lambda p: (p.epoch_start, p.rotation))
            for c in msg.rotation_commands:
                state.rotations_waiting.pop(c, None)
                state.rotations_answered.add(c)
    elif isinstance(msg, ControlCommand):
        # Only verified commands reach the domain (shared/commands.py). They act from the next step evaluated.
        if msg.target in (state.profile_id, "all"):
            if msg.action in ("pause", "kill"):
                state.paused = f"{msg.action} by operator command {msg.id}"
            if msg.action in ("flatten", "kill"):
                state.flatten_requested = True  # positions are known as of the next step
            if msg.action == "resume":
                state.paused = None
                state.halted = None  # a drawdown halt lasts until a resume command
            if msg.action == "rotate" and published_ms is not None and msg.id not in state.rotations_answered:
                state.rotations_waiting[msg.id] = published_ms
            if msg.action == "acknowledge" and state.live:
                _acknowledge(state, msg)
    elif isinstance(msg, AccountSnapshotted) and msg.profile == state.profile_id:
        if state.live and not state.account_seeded:
            # The account before any trading of this profile: the books start from it at once (the worker's
            # start snapshot is stamped with the exchange's time, which a replay's steps may never reach). No
            # step was evaluated before it (_drain), so no order of ours can be ahead of it; outcomes a rebuild
            # read before it (held until their intents are re-emitted) came after it.
            _apply_account(state, msg)
        elif state.live:  # paper: the paper exchange's snapshots equal the books by construction
            state.defer_seq += 1
            heapq.heappush(state.deferred, (msg.event_time.timestamp(), state.defer_seq, msg))
    elif isinstance(msg, OrderDecided | OrderUpdated | OrderFilled) and msg.profile == state.profile_id:
        if msg.intent_id in state.emitted:
            reason = contradicts_own(state, msg) if isinstance(msg, OrderFilled) else None
            if reason is None:
                _receive_own(state, msg)
            else:
                refuse(state, msg, reason)
        else:
            hold(state, msg)  # judged at the first step closing after it, unless the state sends its intent
    return _drain(state)


def _receive_own(state: StrategyState, o: Outcome) -> None:
    """An outcome of one of our intents: it proves how far the exchange got with the order, and is applied
    when the first step closing after its event time is evaluated (never earlier: no look-ahead)."""
    t = o.event_time.timestamp()
    iid = o.intent_id
    if not isinstance(o, OrderDecided) and t > state.seen_through.get(iid, -math.inf):
        state.seen_through[iid] = t  # the arbiter's decision says nothing of the exchange's progress
    if (isinstance(o, OrderDecided) and o.verdict == "rejected") or (
        isinstance(o, OrderUpdated) and o.status in TERMINAL_STATUSES
    ):
        state.final_seen.add(iid)
    state.defer_seq += 1
    heapq.heappush(state.deferred, (t, state.defer_seq, o))


def _apply_due(state: StrategyState, before_s: float) -> None:
    """Apply the deferred outcomes whose event time is before `before_s` (all of them: math.inf)."""
    d = state.deferred
    while d and d[0][0] < before_s:
        _apply_outcome(state, heapq.heappop(d)[2])


def _known(state: StrategyState, step: Step) -> bool:
    """What each working order did before the step's close is known (module docstring)."""
    if not state.pending:
        return True  # the common case: no order working
    close = step.close_s
    seen = state.seen_through
    return all(iid in state.final_seen or seen.get(iid, -math.inf) >= close for iid in state.pending)


def on_step(state: StrategyState, step: Step, *, lazy_marker: bool = False) -> list[Message]:
    """Feed one complete step directly (what the aligner releases); the backtest's entry point.

    `lazy_marker`: the marker of the last step this call evaluates (it would close the outputs) is not built
    but described in `state.marker`, for `step_marker`. The backtest holds most markers and delivers only
    the latest one per profile: one in ten is ever read, and building them is a tenth of its time."""
    state.queue.append(step)
    state._lazy_marker = lazy_marker
    try:
        return _drain(state)
    finally:
        state._lazy_marker = False


def step_marker(profile_id: str, step_time_s: int, close_s: int, intents: int) -> StepCompleted:
    """The marker a strategy publishes after the intents of a step it evaluated."""
    return StepCompleted(
        id=derived_id("step", profile_id, step_time_s),
        event_time=from_epoch_s(close_s),
        correlation_id=f"step:{step_time_s}",
        profile=profile_id,
        step_time=from_epoch_s(step_time_s),
        intents=intents,
    )


def on_market_end(state: StrategyState) -> list[Message]:
    """No step follows (what ReplayFinished on every partition means); the backtest's entry point."""
    state.market_done = True
    return _drain(state)


def _apply_outcome(state: StrategyState, o: Deferred) -> None:
    if isinstance(o, AccountSnapshotted):
        _apply_account(state, o)
    elif isinstance(o, OrderFilled):
        _apply_fill(state, o)
    elif isinstance(o, OrderDecided):
        if o.verdict == "rejected":
            _settle(state, o)
    elif o.status in TERMINAL_STATUSES:
        _settle(state, o)


def _settle(state: StrategyState, o: OrderDecided | OrderUpdated) -> None:
    """The intent's final outcome is applied: it works no more (an entry's position is protected from now)."""
    intent_id = o.intent_id
    done = state.pending.pop(intent_id, None)
    if done is not None and done.side == "buy":
        state.entry_done[done.product] = o.event_time.timestamp()
    state.seen_through.pop(intent_id, None)
    state.final_seen.discard(intent_id)
    state.applied_size.pop(intent_id, None)


def _apply_fill(state: StrategyState, f: OrderFilled) -> None:
    if f.fill_id in state.seen_fills:
        return  # redelivered fill: counted once
    state.seen_fills.add(f.fill_id)
    state.fills += 1
    state.fees += f.fee
    if f.intent_id in state.pending and f.duplicate_of is None:
        state.applied_size[f.intent_id] = state.applied_size.get(f.intent_id, Decimal(0)) + f.size
    # The accounting is shared/book.py's (the report's and the dashboards'); the state keeps its own fields.
    pos = state.positions.get(f.product)
    before = (
        None if pos is None else Holding(pos.size, pos.avg_price, state.entry_fees.get(f.product, Decimal(0)))
    )
    b = book_fill(before, f.side, f.size, f.price, f.fee)
    state.cash += b.cash
    if f.side == "sell":
        state.realized_pnl += b.gain
        state.closed_trades += 1
        state.wins += 1 if b.win else 0
    after = b.holding
    if after is not None and after.size > 0:
        if pos is None:
            state.positions[f.product] = Position(after.size, after.avg_price)
        else:
            pos.size, pos.avg_price = after.size, after.avg_price
        state.entry_fees[f.product] = after.entry_fees
    elif pos is not None:
        del state.positions[f.product]
        state.entry_fees.pop(f.product, None)
        state.flatten.discard(f.product)
        state.halt_close.discard(f.product)


# ------------------------------------------------------------------------------------------ account (live)
def _take_account_events(state: StrategyState) -> list[Message]:
    out, state.account_events = state.account_events, []
    return out


def _price_untracked(state: StrategyState) -> None:
    """Untracked holdings get the step's mark as cost basis (the first mark known after they were found)."""
    for product in list(state.unpriced):
        mark = state.marks.get(product)
        if mark is None:
            continue
        state.unpriced.discard(product)
        for book in (state.untracked, state.positions):
            pos = book.get(product)
            if pos is not None and pos.avg_price <= 0:
                pos.avg_price = mark


def _asset_of(state: StrategyState, product: str) -> str:
    return product.split("/", 1)[0]


def _held_by_asset(state: StrategyState) -> dict[str, Decimal]:
    held: dict[str, Decimal] = {}
    for book in (state.positions, state.untracked):
        for product, pos in book.items():
            a = _asset_of(state, product)
            held[a] = held.get(a, Decimal(0)) + pos.size
    return held


def account_differences(
    state: StrategyState, snap: AccountSnapshotted
) -> dict[str, tuple[Decimal, Decimal, Decimal]]:
    """asset -> (books, exchange, dust) for each asset of the snapshot whose amounts differ beyond dust: quote
    0.01; a base asset the larger of its product's size increment (when known), 1e-8 and 0.01 % of the holding."""
    out: dict[str, tuple[Decimal, Decimal, Decimal]] = {}
    held = _held_by_asset(state)
    for asset, b in snap.balances.items():
        if asset == state.quote:
            books, dust = state.cash, QUOTE_DUST
        else:
            books = held.get(asset, Decimal(0))
            dust = max(b.size_increment or Decimal(0), ASSET_DUST_MIN, ASSET_DUST_RATE * max(books, b.total))
        if abs(b.total - books) > dust:
            out[asset] = (books, b.total, dust)
    return out


def _adopt(state: StrategyState, diffs: Mapping[str, Decimal]) -> None:
    """The books take the exchange's amounts: asset -> exchange minus books. Quote: to cash; a base asset held
    beyond the books: an untracked holding (priced at the next mark); held short of the books: out of the
    untracked holding first, then out of the position."""
    for asset, d in sorted(diffs.items()):
        if asset == state.quote:
            state.cash += d
            continue
        product = f"{asset}/{state.quote}"
        if d > 0:
            book = state.positions if state.sell_untracked else state.untracked
            pos = book.get(product)
            mark = state.marks.get(product)
            if pos is None:
                book[product] = Position(d, mark if mark is not None else Decimal(0))
                if mark is None:
                    state.unpriced.add(product)
            else:
                basis = mark if mark is not None else pos.avg_price
                pos.avg_price = (pos.avg_price * pos.size + basis * d) / (pos.size + d)
                pos.size += d
            continue
        left = -d
        for book in (state.untracked, state.positions):
            if left <= 0:
                break
            for prod in [p for p in book if _asset_of(state, p) == asset]:
                pos = book[prod]
                take = min(pos.size, left)
                pos.size -= take
                left -= take
                if pos.size <= 0:
                    del book[prod]
                    if book is state.positions:
                        state.entry_fees.pop(prod, None)
                        state.flatten.discard(prod)
                        state.halt_close.discard(prod)


def _account_event(
    state: StrategyState,
    snap_id: str,
    when: datetime,
    kind: Literal["mismatch", "resolved"],
    reason: str,
    diffs: Mapping[str, tuple[Decimal, Decimal, Decimal]] | None = None,
    *,
    key: str = "",
) -> None:
    state.account_events.append(
        AccountMismatchDetected(
            id=derived_id("account-mismatch", state.profile_id, snap_id, kind, key),
            event_time=when,
            correlation_id=f"account:{state.profile_id}",
            causation_id=snap_id,
            profile=state.profile_id,
            state=kind,
            reason=reason[:2000],
            snapshot_id=snap_id,
            differences={
                a: {"books": str(b), "exchange": str(e), "dust": str(d)}
                for a, (b, e, d) in (diffs or {}).items()
            },
        )
    )


def _describe(diffs: Mapping[str, tuple[Decimal, Decimal, Decimal]]) -> str:
    return "; ".join(f"{a}: books {b}, exchange {e} (dust {d})" for a, (b, e, d) in sorted(diffs.items()))


def _apply_account(state: StrategyState, snap: AccountSnapshotted) -> None:
    """One account snapshot, in event-time order with the fills (module docstring, live mode)."""
    if state.account_seeded and (state.pending or state.held or state.awaiting):
        return  # an order works or an outcome is still judged: the exchange may be ahead of the books
    state.last_account = snap
    diffs = account_differences(state, snap)
    t = snap.event_time.timestamp()
    if not state.account_seeded:
        state.account_seeded = True
        state.reset_risk_marks = True
        # Cash is the exchange's; what the account holds beyond the books was not traded by the system.
        seed = {a: e - b for a, (b, e, _) in diffs.items() if a == state.quote or e > b}
        _adopt(state, seed)
        rest = {a: v for a, v in diffs.items() if a not in seed}
        if not rest:
            return
        diffs = rest
    if not diffs:
        if state.account_mismatch is not None:
            state.account_mismatch = None
            state.mismatch_diff = None
            _account_event(
                state, snap.id, snap.event_time, "resolved", "the account snapshot agrees with the books"
            )
        return
    exch_minus_books = {a: e - b for a, (b, e, _) in diffs.items()}
    if t <= state.acknowledged_through:
        _adopt(state, exch_minus_books)  # an operator already accepted the exchange's amounts of this time
        return
    first = state.account_mismatch is None
    state.account_mismatch = f"account mismatch: {_describe(diffs)}"
    state.mismatch_diff = (snap.id, t, exch_minus_books)
    if first:
        state.halt_counts["account_mismatch"] = state.halt_counts.get("account_mismatch", 0) + 1
        _account_event(
            state,
            snap.id,
            snap.event_time,
            "mismatch",
            f"{state.account_mismatch}; entries halted until a snapshot agrees or `mpctl send acknowledge "
            f"{state.profile_id}`",
            diffs,
        )


def _acknowledge(state: StrategyState, cmd: ControlCommand) -> None:
    """An operator accepts the exchange's amounts as of the command's issue time: a mismatch found at a
    snapshot not later than that is adopted into the books, and entries resume."""
    t = cmd.issued_at.timestamp()
    state.acknowledged_through = max(state.acknowledged_through, t)
    found = state.mismatch_diff
    if state.account_mismatch is None or found is None or found[1] > t:
        return
    snap_id, _, diff = found
    _adopt(state, diff)
    state.account_mismatch = None
    state.mismatch_diff = None
    _account_event(
        state,
        snap_id,
        max(cmd.issued_at, from_epoch_s(int(found[1]))),
        "resolved",
        f"acknowledged by operator command {cmd.id}: the books take the exchange's amounts",
        key=cmd.id,
    )


def _plan_for(state: StrategyState, step: Step) -> PlanPublished | None:
    """The latest plan of the step's epoch that starts at or before it; None while it is not known yet, or
    while a rotation due at this step waits for its plan."""
    if state.rotations_waiting:
        published = state.step_published.get(step.time_s)
        if published is not None and min(state.rotations_waiting.values()) <= published:
            return None
    interval = state.profile.profile_hash.hash_rotation_interval
    found = None
    for p in state.plans.get(step.time_s // interval, ()):
        if int(p.epoch_start.timestamp()) <= step.time_s:
            found = p
    return found


def ready(state: StrategyState, step: Step) -> bool:
    """What the profile's orders did before `step` closed is known: it can be evaluated once its plan is."""
    return _known(state, step)


def _drain(state: StrategyState) -> list[Message]:
    out: list[Message] = _take_account_events(state) if state.account_events else []
    while state.queue and _known(state, state.queue[0]):
        step = state.queue[0]
        if state.deferred:
            _apply_due(state, step.close_s)
            if state.account_events:
                out.extend(_take_account_events(state))
        plan = _plan_for(state, step)
        if plan is None:
            if not _unplanned_history(state, step):
                break  # the registry has not published this epoch's plan yet
            # A live start's warm-up history from before the registry's first epoch: it will never have a plan
            # (the registry plans live epochs on the exchange's clock); the models learn from it, nothing acts.
            state.queue.popleft()
            state.step_published.pop(step.time_s, None)
            out.extend(_warm_up(state, step))
            continue
        if state.live and not state.account_seeded:
            # Live: no step acts before the books are seeded from the account. Steps evaluated before the first
            # snapshot is read would depend on when it was read, and a rebuild from the inputs (which reads the
            # topics in another interleaving) would then decide otherwise and lose its own fills.
            break
        state.queue.popleft()
        state.step_published.pop(step.time_s, None)
        out.extend(_evaluate_step(state, step, plan))
    if state.market_done and not state.queue and state.deferred:
        _apply_due(state, math.inf)  # no step follows: every outcome is in the past
        out.extend(_take_account_events(state))
    if state.market_done and not state.queue and not state.pending and not state.finished:
        state.finished = True
        t = from_epoch_s(state.last_step_s or 0)
        out.append(
            StepCompleted(
                id=derived_id("final", state.profile_id),
                event_time=t,
                correlation_id=f"{state.profile_id}:final",
                profile=state.profile_id,
                step_time=t,
                intents=0,
                final=True,
            )
        )
        out.append(
            WorkerFinished(
                id=derived_id("finished", "strategy", state.profile_id),
                event_time=t,
                correlation_id=f"{state.profile_id}:final",
                service="strategy",
                instance=state.profile_id,
                detail={"steps": state.steps_done, "intents": state.intents_sent},
            )
        )
    return out


def _unplanned_history(state: StrategyState, step: Step) -> bool:
    """A history step (published long after it closed: `_is_current` says no) of an epoch before every plan
    this profile has: the registry moved on without planning it."""
    if step.published_s is None or _is_current(state, step):
        return False  # a replay's or a current step's plan is still to come: wait for it
    epoch = step.time_s // state.profile.profile_hash.hash_rotation_interval
    return bool(state.plans) and min(state.plans) > epoch


def _warm_up(state: StrategyState, step: Step) -> list[Message]:
    state.market.update(step)
    state.marks.update(state.market.closes)
    if state.unpriced:
        _price_untracked(state)
    state.steps_done += 1
    state.history_steps += 1
    state.last_step_s = step.time_s
    return [step_marker(state.profile_id, step.time_s, step.close_s, 0)]


def _is_current(state: StrategyState, step: Step) -> bool:
    """The step is the market of now: the feed is not stale and the step went out soon after it closed."""
    if state.feed_stale is not None:
        return False
    lag = state.max_publish_lag_s
    return lag is None or step.published_s is None or step.published_s - step.close_s <= lag


def _selected_tunable(state: StrategyState, plan: PlanPublished) -> dict[str, float]:
    cached = state._tunable
    if cached is not None and cached[0] == plan.id:
        return cached[1]
    spec = CATALOG[plan.strategy]
    tunable = {k: v for k, v in plan.parameters.items() if k in spec.tunable}
    state._tunable = (plan.id, tunable)
    return tunable


def _evaluate_step(state: StrategyState, step: Step, plan: PlanPublished) -> list[Message]:
    p = state.profile
    sc = p.strategy_config
    lim = state.limits
    if state.held_times or state.awaiting:
        release_foreign(state, step, partial(_apply_outcome, state))
    market = state.market
    market.update(step)
    present = market.closes
    marks = state.marks
    marks.update(present)
    if state.unpriced:
        _price_untracked(state)
    state.steps_done += 1
    state.last_step_s = step.time_s
    out: list[Message] = []

    # Orders still working at this close: no new intent in their products (module docstring).
    working: set[str] = set()
    reserved = Decimal(0)
    for w_intent in state.pending.values():
        working.add(w_intent.product)
        if w_intent.side == "buy":
            left = w_intent.size - state.applied_size.get(w_intent.intent_id, Decimal(0))
            reserved += max(left, Decimal(0)) * w_intent.reference_price * RESERVE

    # Protective exits the step's candles reached (the exit is booked with its fill: the equity of this close
    # is the books' own, applied fills and the closes, as the audit recomputes it).
    triggered: dict[str, tuple[Reason, Decimal, datetime]] = {}
    if state.positions:
        candles = {c.product: c for c in step.candles}
        for product, pos in state.positions.items():
            c = candles.get(product)
            if c is None or product in working:
                continue  # nothing traded, or the entry still fills (protected once it completed)
            stop, take = protective.levels(pos.avg_price, lim.stop_loss_pct, lim.take_profit_pct)
            # On the candle in which the entry completed, the orders did not rest at its open.
            rested = state.entry_done.get(product, -math.inf) < step.time_s
            if rested and c.trade_path is not None:
                # A live candle whose every trade was seen: the trades say which level came first, and at
                # what price the stop sold (the path starts before the entry completed: the range then decides).
                hit = protective.reached_on_path(c.trade_path, stop, take)
            else:
                hit = protective.reached(c.open, c.high, c.low, stop, take, resting_at_open=rested)
            if hit is not None:
                triggered[product] = (hit[0], hit[1], c.open_time)

    equity = state.equity()
    day = step.close_s // 86400
    if state.reset_risk_marks:
        # The first account snapshot of a live profile: its equity is where the risk limits start from.
        state.reset_risk_marks = False
        state.initial_equity = state.high_water = state.day_start_equity = equity
        state.day = day
    if equity > state.high_water:
        state.high_water = equity
    if state.day != day:
        state.day = day
        state.day_start_equity = equity
    if equity < state.high_water or equity < state.day_start_equity:  # else neither loss can be positive
        out.extend(_risk_halts(state, equity, day, step.time_s, step.close_s))

    # Rotation: the first step under a new epoch's plan. "close" sells every open position (reason
    # "flatten"); a sale that does not happen (rejected, cancelled) is tried again at the next steps.
    plan_key = (plan.epoch, plan.rotation)
    if state.last_plan is not None and plan_key != state.last_plan and state.on_rotation == "close":
        state.flatten = set(state.positions)
    if state.flatten_requested:
        state.flatten |= set(state.positions)
        state.flatten_requested = False
    state.last_plan = plan_key

    tunable = _selected_tunable(state, plan)
    weights = state.weights
    strategy, w = plan.strategy, plan.blend_weight
    threshold = sc.signal_strength_threshold
    intents: list[PlaceOrder] = []
    # Exits first: they free slots and never wait on the market regime.
    if state.positions:
        for product in sorted(state.positions):
            if product in working:
                continue  # its order is still working: its outcome decides
            if state.unpriced and product in state.unpriced:
                continue  # an adopted holding (sell_untracked) with no price known yet
            pos = state.positions[product]
            flat = product in state.flatten
            halt = product in state.halt_close
            hit_at = triggered.get(product)
            if hit_at is not None:
                reason, at, candle_open = hit_at
                intents.append(
                    _intent(
                        state,
                        plan,
                        step,
                        product,
                        "sell",
                        pos.size,
                        at,
                        reason,
                        None,
                        trigger=(at, candle_open),
                    )
                )
                continue
            if product not in present and not (flat or halt):
                continue
            price = marks.get(product, pos.avg_price)
            reason_: Reason | None = None
            exit_sig: Signal | None = None  # the signal behind an exit_signal, recorded on the intent
            if halt:
                reason_ = "halt"
            elif flat:
                reason_ = "flatten"
            else:
                sig = market.blended(product, strategy, tunable, weights, w)
                if sig is not None and sig.value <= -threshold:
                    reason_, exit_sig = "exit_signal", sig
            if reason_ is not None:
                intents.append(
                    _intent(state, plan, step, product, "sell", pos.size, price, reason_, exit_sig)
                )

    positions = state.positions
    if state.pending:
        held_or_buying = len(set(positions) | {i.product for i in state.pending.values() if i.side == "buy"})
    else:
        held_or_buying = len(positions)  # the common case: no order working
    slots = p.trading_params.max_open_positions - held_or_buying
    if not _is_current(state, step):
        state.history_steps += 1
        slots = 0  # history or a stale feed: the models learn from it, nothing is opened on it
    if state.live and (state.account_mismatch is not None or not state.account_seeded):
        slots = 0  # no account known yet, or books and exchange differ: exits only
    if state.halted is None and state.paused is None and state.entries_paused_day != day and slots > 0:
        candidates: list[tuple[float, str, Signal]] = []
        low, high = sc.entropy_threshold, p.risk_management.volatility_threshold
        snaps = market._snaps  # the step's snapshots (market.snapshot without its frame when one is there)
        for product in plan.products:
            if product in positions or product in working:
                continue
            snap = snaps.get(product) or market.snapshot(product)
            if snap is None:
                continue  # absent from this step
            per_candle, annualised = snap.per_candle, snap.annualised
            if per_candle is None or annualised is None:
                continue  # not enough history
            if per_candle < low or annualised > high:
                continue  # a flat market has nothing to trade; a wild one is outside the profile's risk
            sig = market.blended(product, strategy, tunable, weights, w)
            if sig is None:
                continue
            if sig.value >= threshold and sig.confidence >= sc.confidence_threshold:
                candidates.append((-sig.value, product, sig))
        cash = state.cash - reserved
        for _, product, sig in sorted(candidates)[:slots]:
            price = marks[product]
            budget = equity * Decimal(
                str(sc.max_position_size_pct / 100 * sig.confidence / sc.risk_adjustment_factor)
            )
            budget = min(budget, cash * Decimal("0.98"))  # keep room for fee and slippage
            size = (budget / price).quantize(SIZE_STEP, rounding=ROUND_DOWN)
            if size <= 0 or size * price < MIN_NOTIONAL:
                continue
            intents.append(_intent(state, plan, step, product, "buy", size, price, "entry", sig))

    for i in intents:
        state.pending[i.intent_id] = i
        state.emitted.add(i.intent_id)
        state.own_orders[i.intent_id] = (i.product, i.side, i.size)
        if state.decisions:
            state.decisions.pop(i.intent_id, None)  # read ahead in a rebuild: answered as our own now
    state.intents_sent += len(intents)
    out.extend(intents)
    if state._lazy_marker and not state.queue and not state.market_done:
        state.marker = (step.time_s, step.close_s, len(intents))  # the last output of this call (on_step)
    else:
        out.append(step_marker(state.profile_id, step.time_s, step.close_s, len(intents)))
    # Outcomes read before their intent (a rebuild after a crash): applied now, where the first run had them.
    if state.held:
        for i in intents:
            for o in state.held.pop(i.intent_id, ()):
                _receive_own(state, o)
    return out


def _risk_halts(state: StrategyState, equity: Decimal, day: int, step_s: int, close_s: int) -> list[Message]:
    """Halts the step's close breached, stamped at that close (when they are known). With close_on_halt the
    profile's positions are sold too (reason "halt"), so the loss stops at the limit."""
    rm = state.profile.risk_management
    lim = state.limits
    out: list[Message] = []
    if state.halted is None and state.high_water > 0:
        dd_pct = (state.high_water - equity) / state.high_water * 100
        if dd_pct >= lim.max_drawdown_pct:
            state.halted = f"drawdown {dd_pct:.2f}% >= max_drawdown_pct {rm.max_drawdown_pct}"
            out.append(_halt(state, state.halted, None, from_epoch_s(close_s), f"step:{step_s}"))
            state.halt_counts["drawdown"] = state.halt_counts.get("drawdown", 0) + 1
    if state.entries_paused_day != day and state.day_start_equity > 0:
        loss_pct = (state.day_start_equity - equity) / state.day_start_equity * 100
        if loss_pct >= lim.max_daily_loss_pct:
            state.entries_paused_day = day
            reason = f"daily loss {loss_pct:.2f}% >= max_daily_loss_pct {rm.max_daily_loss_pct}"
            # The close as a datetime only when a halt is stamped with it (most steps under water halt nothing).
            until = from_epoch_s((day + 1) * 86400)
            out.append(_halt(state, reason, until, from_epoch_s(close_s), f"step:{step_s}"))
            state.halt_counts["daily_loss"] = state.halt_counts.get("daily_loss", 0) + 1
    if out and state.close_on_halt:
        state.halt_close |= set(state.positions)
    return out


def _halt(
    state: StrategyState, reason: str, until: datetime | None, when: datetime, corr: str
) -> ProfileHalted:
    return ProfileHalted(
        id=derived_id("halt", state.profile_id, when.isoformat(), reason.split(" ")[0]),
        event_time=when,
        correlation_id=corr,
        profile=state.profile_id,
        reason=reason,
        until=until,
    )


def _intent(
    state: StrategyState,
    plan: PlanPublished,
    step: Step,
    product: str,
    side: Side,
    size: Decimal,
    price: Decimal,
    reason: Reason,
    sig: Signal | None,
    *,
    trigger: tuple[Decimal, datetime] | None = None,
) -> PlaceOrder:
    intent_id = derived_id("intent", state.profile_id, product, step.time_s, side)
    return PlaceOrder(
        id=intent_id,
        event_time=from_epoch_s(step.close_s),
        correlation_id=f"step:{step.time_s}",
        intent_id=intent_id,
        profile=state.profile_id,
        product=product,
        side=side,
        size=size,
        reference_price=price,
        reason=reason,
        fingerprint=plan.fingerprint,
        epoch=plan.epoch,
        plan_rotation=plan.rotation,
        step_time=from_epoch_s(step.time_s),
        priority=state.profile.priority,
        signal=max(-1.0, min(1.0, sig.value)) if sig else 0.0,
        confidence=max(0.0, min(1.0, sig.confidence)) if sig else 0.0,
        trigger_price=trigger[0] if trigger else None,
        trigger_candle=trigger[1] if trigger else None,
    )
