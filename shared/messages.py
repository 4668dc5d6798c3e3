"""Message schemas: frozen pydantic models, each with the envelope (id, type, schema version, event time,
correlation id). Commands are imperatives (`PlaceOrder`, `ExecuteOrder`), events past tense.

Prices and sizes are `Decimal` and travel as strings, so no float rounding happens on the wire.
This module imports no Kafka, Redis or ccxt.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1


def _finite(v: Decimal) -> Decimal:
    if not v.is_finite():
        raise ValueError(f"must be a finite number, got {v!r}")
    return v


Price = Annotated[Decimal, AfterValidator(_finite), Field(gt=0)]
Size = Annotated[Decimal, AfterValidator(_finite), Field(ge=0)]
Money = Annotated[Decimal, AfterValidator(_finite)]
Side = Literal["buy", "sell"]
OrderStatus = Literal["submitted", "open", "partially_filled", "filled", "cancelled", "rejected"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"filled", "cancelled", "rejected"})


def utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise ValueError(f"timestamp {dt.isoformat()} has no time zone; UTC is required")
    return dt.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(utc)]
# One trade of a bucket's path: (exchange time in epoch milliseconds, price).
PathPoint = tuple[int, Price]
# Successive new lows and highs of a random walk are few (about 2 ln n for n trades); the bound refuses a forgery.
MAX_PATH_POINTS = 5000


class Message(BaseModel):
    """The envelope every message carries."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str] = ""

    id: str = Field(min_length=1, max_length=128)
    schema_version: int = SCHEMA_VERSION
    event_time: UtcDatetime
    correlation_id: str = Field(min_length=1, max_length=128)
    causation_id: str | None = None

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema_version {v!r}; this build reads version {SCHEMA_VERSION}")
        return v


# ------------------------------------------------------------------------------------------ market data
class CandleClosed(Message):
    """One OHLCV candle, published when it closes. `event_time` is the close (open_time + interval)."""

    type: Literal["CandleClosed"] = "CandleClosed"
    product: str
    interval_s: int = Field(gt=0)
    open_time: UtcDatetime
    open: Price
    high: Price
    low: Price
    close: Price
    volume: Size
    source: str = ""
    # A bucket without trades (REST leaves it out): flat at the previous close, volume 0 (docs/ingest.md).
    synthetic: bool = False
    # The live ingest's record of every trade of the bucket, when the websocket showed all of them: its successive
    # new lows and new highs in time order (at one time, lows first), so a protective order acts where the trades
    # reached its level (shared/protective.py). None: unknown (a replay, or a gap in the feed).
    trade_path: tuple[PathPoint, ...] | None = Field(default=None, max_length=MAX_PATH_POINTS)

    @model_validator(mode="after")
    def _ohlc_consistent(self) -> CandleClosed:
        if (
            self.high < max(self.open, self.close)
            or self.low > min(self.open, self.close)
            or self.low > self.high
        ):
            raise ValueError(
                f"high/low do not bound open/close: open {self.open}, high {self.high}, low {self.low}, close {self.close}"
            )
        path = self.trade_path
        if path is not None:
            start = int(self.open_time.timestamp() * 1000)
            end = start + self.interval_s * 1000
            times = [t for t, _ in path]
            prices = [p for _, p in path]
            if not path or times != sorted(times) or times[0] < start or times[-1] >= end:
                raise ValueError(
                    f"trade_path of {self.product} at {self.open_time.isoformat()}: empty, out of time order or "
                    f"outside the bucket [{start}, {end}) ms: {times[:3]}...{times[-3:]}"
                )
            if min(prices) != self.low or max(prices) != self.high:
                # Reaching a level must read the same from the path as from the candle.
                raise ValueError(
                    f"trade_path of {self.product} at {self.open_time.isoformat()} spans "
                    f"[{min(prices)}, {max(prices)}], the candle [{self.low}, {self.high}]"
                )
        return self


class WatermarkAdvanced(Message):
    """All candles with open_time <= `step_time` have been published on this partition (event-time progress)."""

    type: Literal["WatermarkAdvanced"] = "WatermarkAdvanced"
    step_time: UtcDatetime
    interval_s: int = Field(gt=0)
    # Live feed only: the exchange's time when the step was published (None in a replay). A step published
    # long after its end is history (a backfill): strategies warm up on it but open nothing.
    published_at: UtcDatetime | None = None
    # Products whose bucket was still missing at the deadline: the step went out without them.
    missing: list[str] = Field(default_factory=list)


class ReplayFinished(Message):
    """The replay published its last candle; nothing follows on this partition."""

    type: Literal["ReplayFinished"] = "ReplayFinished"
    last_step_time: UtcDatetime | None
    steps: int = Field(ge=0)


class TradeObserved(Message):
    """One market trade seen on the exchange's websocket (topic md.trades, keyed by product).
    `event_time` is the trade's time; ids are derived from the exchange's trade id, so a repeat is one trade."""

    type: Literal["TradeObserved"] = "TradeObserved"
    product: str
    trade_id: str = Field(min_length=1, max_length=64)
    price: Price
    size: Size
    side: Side | None = None  # the taker's side, as the exchange reports it


class FeedStateChanged(Message):
    """The live feed went stale (no websocket frame, or the last step too old) or is fresh again. Broadcast
    on every md.candles partition, in order with the candles: while stale, strategies open nothing."""

    type: Literal["FeedStateChanged"] = "FeedStateChanged"
    state: Literal["stale", "fresh"]
    reason: str = Field(max_length=500)
    last_frame_age_s: float | None = None
    last_step_time: UtcDatetime | None = None


class ExchangeTimeObserved(Message):
    """The exchange's time as the feed reports it (heartbeats, REST server time), about once a second on
    md.clock. `event_time` is the exchange's time; `rate` is exchange seconds per local second (1 against
    Coinbase; a test peer may run faster), so a reader extrapolates between observations."""

    type: Literal["ExchangeTimeObserved"] = "ExchangeTimeObserved"
    rate: float = Field(gt=0.0, le=1_000_000.0, allow_inf_nan=False)
    skew_s: float = Field(allow_inf_nan=False)  # exchange time minus the ingest machine's clock
    origin: Literal["heartbeat", "rest"]


# ------------------------------------------------------------------------------------------ registry
class PlanPublished(Message):
    """A profile's plan for one epoch: hash, strategy, drifted parameters, assets and fingerprint."""

    type: Literal["PlanPublished"] = "PlanPublished"
    profile: str
    epoch: int
    epoch_start: UtcDatetime
    epoch_end: UtcDatetime
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    nonce: int = Field(ge=0)
    strategy: str
    parameters: dict[str, float]
    blend_weight: float = Field(ge=0.0, le=1.0)
    assets: list[str]
    random_asset: str | None
    products: list[str]
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    collisions: int = Field(ge=0, default=0)
    asset_candidates: list[str] = Field(default_factory=list)
    # 0: the epoch's scheduled plan; k > 0: the k-th early rotation inside the epoch (an operator's `rotate`),
    # valid from epoch_start (the rotation step) to the epoch's end. rotation_commands: the commands it answers.
    rotation: int = Field(ge=0, default=0)
    rotation_commands: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------------------------------ orders
def _check_trigger(price: Decimal | None, candle: datetime | None, side: str) -> None:
    if (price is None) != (candle is None):
        raise ValueError(
            f"trigger_price {price!r} with trigger_candle {candle!r}: a protective exit needs both, other orders neither"
        )
    if price is not None and side != "sell":
        raise ValueError(f"a protective exit (trigger_price {price}) sells a held position, not a {side}")


# Why an order exists: an entry, or the exit's cause. Carried from the intent to the order and each fill, so a
# run's files say what every limit did (summary.json counts exits by it). "stop_loss"/"take_profit" orders are
# also the protective orders the paper exchange holds for a position (docs/execution.md, Protective orders).
IntentReason = Literal["entry", "exit_signal", "stop_loss", "take_profit", "manual", "flatten", "halt"]


class PlaceOrder(Message):
    """Command from a strategy worker to the arbiter: the intent to trade (keyed by product)."""

    type: Literal["PlaceOrder"] = "PlaceOrder"
    intent_id: str
    profile: str
    product: str
    side: Side
    size: Annotated[Decimal, AfterValidator(_finite), Field(gt=0)]
    reference_price: Price
    reason: IntentReason
    fingerprint: str
    epoch: int
    plan_rotation: int = Field(ge=0, default=0)  # which plan of the epoch (PlanPublished.rotation) it acts on
    step_time: UtcDatetime
    priority: int = 100
    signal: float = Field(ge=-1.0, le=1.0, default=0.0)
    confidence: float = Field(ge=0.0, le=1.0, default=0.0)
    # A protective exit (stop_loss / take_profit): the position's resting order was reached within the candle
    # opening at `trigger_candle`, at `trigger_price` (the level, or the open when the candle opened beyond
    # it). The paper exchange fills it on that candle's range (docs/execution.md, Protective exits).
    trigger_price: Price | None = None
    trigger_candle: UtcDatetime | None = None

    @model_validator(mode="after")
    def _trigger_whole(self) -> PlaceOrder:
        _check_trigger(self.trigger_price, self.trigger_candle, self.side)
        return self


class StepCompleted(Message):
    """A strategy worker finished one event-time step; sent to every intents partition after its intents."""

    type: Literal["StepCompleted"] = "StepCompleted"
    profile: str
    step_time: UtcDatetime
    intents: int = Field(ge=0)
    final: bool = False


class OrderDecided(Message):
    """The arbiter's decision on one intent."""

    type: Literal["OrderDecided"] = "OrderDecided"
    intent_id: str
    profile: str
    product: str
    side: Side
    size: Size
    verdict: Literal["approved", "rejected", "delayed"]
    rule: str
    reason: str
    conflicting_profile: str | None = None
    not_before: UtcDatetime | None = None
    # The intent's size when a rule changed it (`size` is then the approved size).
    requested_size: Size | None = None
    # The numbers each rule used (rule name -> values), for decisions.jsonl and the audit trail.
    details: dict[str, Any] = Field(default_factory=dict)


class ExecuteOrder(Message):
    """Command from the arbiter to one profile's execution worker (topic orders.approved.<profile>)."""

    type: Literal["ExecuteOrder"] = "ExecuteOrder"
    intent_id: str
    client_order_id: str
    profile: str
    product: str
    side: Side
    size: Annotated[Decimal, AfterValidator(_finite), Field(gt=0)]
    reference_price: Price
    reason: str
    step_time: UtcDatetime
    not_before: UtcDatetime
    # Part of `size` settled as an internal transfer with the `counterparties` at the mid price (paper mode);
    # the rest goes to the exchange.
    internal_size: Size = Decimal(0)
    counterparties: list[str] = Field(default_factory=list)
    # The plan hash of the intent's epoch: it seeds the worker's de-sync delay (None: the profile's base_hash).
    profile_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    # "market" (what the arbiter sends): a marketable limit at the reference price moved by slippage_tolerance,
    # paying the taker fee. "limit": rests at `limit_price`; what fills from the book pays the maker fee.
    order_type: Literal["market", "limit"] = "market"
    limit_price: Price | None = None
    intent_reason: IntentReason | None = None  # the intent's reason (None: a message from before it existed)
    trigger_price: Price | None = None  # PlaceOrder.trigger_price / trigger_candle, carried unchanged
    trigger_candle: UtcDatetime | None = None

    @model_validator(mode="after")
    def _limit_price_with_limit_orders(self) -> ExecuteOrder:
        if (self.order_type == "limit") != (self.limit_price is not None):
            raise ValueError(
                f"order_type {self.order_type!r} with limit_price {self.limit_price!r}: a limit order needs a "
                "limit_price and a market order takes none"
            )
        _check_trigger(self.trigger_price, self.trigger_candle, self.side)
        return self


# The start of an OrderUpdated reason when the execution worker refused an order priced beyond the band around
# the latest market price (system.execution.max_price_deviation_pct); the monitor alerts on it.
PRICE_BAND_REASON = "price band"


class OrderUpdated(Message):
    """An order's state changed at the exchange (paper or live)."""

    type: Literal["OrderUpdated"] = "OrderUpdated"
    intent_id: str
    client_order_id: str
    profile: str
    product: str
    side: Side
    size: Size
    filled_size: Size = Decimal(0)
    price: Decimal | None = None
    fee: Money = Decimal(0)
    status: OrderStatus
    reason: str = ""
    internal: bool = False
    intent_reason: IntentReason | None = None


class OrderFilled(Message):
    """One fill (a partial fill is its own event)."""

    type: Literal["OrderFilled"] = "OrderFilled"
    fill_id: str
    intent_id: str
    client_order_id: str
    profile: str
    product: str
    side: Side
    size: Annotated[Decimal, AfterValidator(_finite), Field(gt=0)]
    price: Price
    fee: Money
    liquidity: Literal["maker", "taker"] = "taker"
    internal: bool = False
    intent_reason: IntentReason | None = None
    # Paper fills: the open time of the candle whose range priced the fill (a protective exit is priced on the
    # candle that reached its level, and booked when that is known, at the candle's close).
    candle_open: UtcDatetime | None = None
    # Live, an exchange without client id de-duplication (Coinbase Exchange): this fill belongs to a second order
    # the exchange took under the same client order id (two workers of the profile both sent it), and this is the
    # exchange id of the first one. A real position change outside the intent's size: booked, never counted
    # toward the intent (DuplicateOrderDetected tells the story).
    duplicate_of: str | None = None


class DuplicateOrderDetected(Message):
    """The exchange holds a second order under one client order id (live, Exchange API: a paused worker sent it
    after another worker had). `duplicate` was cancelled if it was still open; whatever it filled is booked as
    OrderFilled events with `duplicate_of` = `original`. The monitor alerts on it (duplicate_order)."""

    type: Literal["DuplicateOrderDetected"] = "DuplicateOrderDetected"
    profile: str
    intent_id: str
    client_order_id: str
    product: str
    side: Side
    original: str  # exchange id of the first order under the client order id: the intent's order
    duplicate: str  # exchange id of the second one
    status: Literal["open", "filled", "cancelled", "rejected"]  # the duplicate's state after the worker acted
    filled_size: Size = Decimal(0)
    cancelled: bool = False  # the worker cancelled it (it was open when found)
    reason: str = Field(default="", max_length=2000)


class InternalCrossOpportunity(Message):
    """Two profiles wanted opposite sides of one product within the conflict window: what netting them
    saves (both legs' taker fees and both profiles' slippage), and whether it was executed internally."""

    type: Literal["InternalCrossOpportunity"] = "InternalCrossOpportunity"
    intent_id: str  # the intent whose decision found the opportunity
    profile: str  # that intent's profile
    product: str
    buyer: str
    seller: str
    buy_intent_id: str
    sell_intent_id: str
    size: Annotated[Decimal, AfterValidator(_finite), Field(gt=0)]  # the quantity that crosses
    price: Price  # mid-price estimate (the intent's reference price)
    fee_saving: Money
    slippage_saving: Money
    saving: Money
    executed: bool
    step_time: UtcDatetime


class CorrelationAlert(Message):
    """The rolling correlation of two profiles' returns crossed the threshold (`breach`) or fell back (`clear`).
    While breached, the newer profile's buys are scaled down."""

    type: Literal["CorrelationAlert"] = "CorrelationAlert"
    intent_id: str  # the first intent decided at the step that evaluated it
    profile: str  # the newer profile (its sizes are scaled)
    other_profile: str
    state: Literal["breach", "clear"]
    correlation: float | None
    threshold: float
    window_steps: int
    points: int
    size_scale: float
    step_time: UtcDatetime


# ------------------------------------------------------------------------------------------ account
class AssetBalance(BaseModel):
    """One asset of an account: amounts only (never a key, key id, account id or anything credential-like)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    free: Size
    used: Size
    total: Size
    # The exchange's size increment of the asset's product against the quote (None: unknown, or the quote).
    size_increment: Annotated[Decimal, AfterValidator(_finite), Field(gt=0)] | None = None


class AccountSnapshotted(Message):
    """What one profile's account holds (topic orders.events, keyed by profile): the quote asset and every base
    asset the profile trades. `event_time` is the exchange's time when the balances were read (live: the
    exchange clock the worker follows; paper: the event time of the paper exchange's books). Published by the
    execution worker at start, every `system.execution.account_snapshot_interval_s` (live) and after each
    order reaches a final state."""

    type: Literal["AccountSnapshotted"] = "AccountSnapshotted"
    profile: str
    source: Literal["exchange", "paper"]
    trigger: Literal["start", "periodic", "order_final"]
    quote: str
    balances: dict[str, AssetBalance]


class AccountMismatchDetected(Message):
    """The books of a live profile and its account snapshot differ beyond dust (`state: mismatch`: entries of
    the profile halt), or agree again / were acknowledged by an operator (`state: resolved`)."""

    type: Literal["AccountMismatchDetected"] = "AccountMismatchDetected"
    profile: str
    state: Literal["mismatch", "resolved"]
    reason: str = Field(max_length=2000)
    snapshot_id: str | None = None
    # asset -> {"books": ..., "exchange": ..., "dust": ...} (decimal strings) of the assets that differ
    differences: dict[str, dict[str, str]] = Field(default_factory=dict)


# ------------------------------------------------------------------------------------------ operations
class WorkerFinished(Message):
    """A service instance processed the end of the replay (used by the demo to know the run is complete)."""

    type: Literal["WorkerFinished"] = "WorkerFinished"
    service: str
    instance: str
    detail: dict[str, Any] = Field(default_factory=dict)


class ControlCommand(Message):
    """An operator's command on the commands topic, signed with HMAC-SHA256 (shared/commands.py)."""

    type: Literal["ControlCommand"] = "ControlCommand"
    # acknowledge: the operator accepts the exchange's balances as the profile's books (an account mismatch)
    action: Literal["pause", "resume", "flatten", "kill", "rotate", "acknowledge"]
    target: str = Field(min_length=1, max_length=64)  # a profile id or "all"
    issued_at: UtcDatetime
    nonce: str = Field(min_length=16, max_length=64)
    issuer: str = Field(default="mpctl", max_length=64)
    reason: str = Field(default="", max_length=500)
    signature: str | None = None


class CommandHandled(Message):
    """A service's verdict on a command: applied, or refused with the reason (both audited)."""

    type: Literal["CommandHandled"] = "CommandHandled"
    command_id: str
    action: str
    target: str
    service: str
    accepted: bool
    reason: str = ""


class ProfileHalted(Message):
    type: Literal["ProfileHalted"] = "ProfileHalted"
    profile: str
    reason: str
    until: UtcDatetime | None = None


class ServiceHeartbeat(Message):
    """A running service process says it is alive, every `interval_s` seconds (services.heartbeats topic)."""

    type: Literal["ServiceHeartbeat"] = "ServiceHeartbeat"
    service: str = Field(min_length=1, max_length=128)  # "ingest", "registry", "strategy.profile_a", ...
    instance: str = Field(max_length=128)
    started_at: UtcDatetime
    interval_s: float = Field(gt=0)
    pid: int = Field(ge=0, default=0)
    host: str = Field(default="", max_length=255)
    stopping: bool = False  # the last beat of a clean shutdown: down at once, no threshold to wait for


class DeadLettered(Message):
    """What could not be decoded or handled, with the error text; the original bytes are kept (base64)."""

    type: Literal["DeadLettered"] = "DeadLettered"
    source_topic: str
    partition: int
    offset: int
    key: str | None
    payload_b64: str
    error: str
    service: str


AnyMessage = Annotated[
    CandleClosed
    | WatermarkAdvanced
    | ReplayFinished
    | TradeObserved
    | FeedStateChanged
    | ExchangeTimeObserved
    | PlanPublished
    | PlaceOrder
    | StepCompleted
    | OrderDecided
    | ExecuteOrder
    | OrderUpdated
    | OrderFilled
    | InternalCrossOpportunity
    | CorrelationAlert
    | AccountSnapshotted
    | AccountMismatchDetected
    | DuplicateOrderDetected
    | WorkerFinished
    | ControlCommand
    | CommandHandled
    | ProfileHalted
    | ServiceHeartbeat
    | DeadLettered,
    Field(discriminator="type"),
]
ANY_MESSAGE: TypeAdapter[Any] = TypeAdapter(AnyMessage)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        CandleClosed,
        WatermarkAdvanced,
        ReplayFinished,
        TradeObserved,
        FeedStateChanged,
        ExchangeTimeObserved,
        PlanPublished,
        PlaceOrder,
        StepCompleted,
        OrderDecided,
        ExecuteOrder,
        OrderUpdated,
        OrderFilled,
        InternalCrossOpportunity,
        CorrelationAlert,
        AccountSnapshotted,
        AccountMismatchDetected,
        DuplicateOrderDetected,
        WorkerFinished,
        ControlCommand,
        CommandHandled,
        ProfileHalted,
        ServiceHeartbeat,
        DeadLettered,
    )
}
