"""The exchange port: what the execution worker needs from an exchange, in our types (Decimal, UTC datetimes,
our product names `BASE/QUOTE`). ccxt never crosses this line; the adapters in ccxt_adapter.py implement it.

Every method may raise the errors of services/execution/errors.py, and only those: RetryableError (the adapter
already retried up to `retry_attempts`), RejectedError, HaltError.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal, Protocol, runtime_checkable

from shared.messages import Side

# Our reading of an exchange order's state. `open` covers "accepted, maybe partly filled".
ExchangeOrderStatus = Literal["open", "filled", "cancelled", "rejected"]
# What the order is at the exchange. `stop`: a stop-limit (limit_price is its limit, stop_price its trigger);
# `bracket`: one order holding a take profit (limit_price) and a stop (stop_price, the trigger).
OrderKind = Literal["market", "limit", "stop", "bracket"]
# Awaited after the look-up of a client order id and immediately before each send of it (a retry's too); it raises
# (errors.NotOwnerError) to refuse the send. The worker checks there that it still owns the order (live.py).
SendGuard = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class MarketInfo:
    """Trading rules of one product, from the exchange's market metadata."""

    product: str  # ours and ccxt's unified symbol: BTC/USDC
    exchange_id: str  # the exchange's own id: BTC-USDC
    base: str
    quote: str
    price_increment: Decimal
    size_increment: Decimal
    min_size: Decimal | None  # in base units
    min_notional: Decimal | None  # in quote units (size * price)
    max_size: Decimal | None = None
    active: bool = True  # orders may be sent: false when disabled or cancel-only
    # The exchange's trading status: online, cancel-only, post-only, limit-only, disabled (or its own word for
    # another state, e.g. offline). Anything but online restricts what may be sent.
    status: str = "online"
    # The last price the exchange lists with the product (Advanced Trade does, the Exchange API does not): a
    # reference for the pre-flight's sizes, never an order's price.
    price: Decimal | None = None


@dataclass(frozen=True)
class ExchangeOrder:
    exchange_order_id: str
    client_order_id: str | None
    product: str
    side: Side
    size: Decimal
    filled_size: Decimal
    status: ExchangeOrderStatus
    limit_price: Decimal | None = None
    average_price: Decimal | None = None
    fee: Decimal = Decimal(0)
    created_at: datetime | None = None
    reason: str = ""
    kind: OrderKind = "limit"  # the adapter reads it from the exchange; "limit" is what our orders mostly are
    stop_price: Decimal | None = None  # the trigger of a stop or a bracket

    @property
    def protective(self) -> bool:
        """A resting stop or bracket: it fills only when the market reaches it."""
        return self.kind in ("stop", "bracket")

    @property
    def terminal(self) -> bool:
        return self.status != "open"


@dataclass(frozen=True)
class ExchangeFill:
    fill_id: str  # unique per account at the exchange; our OrderFilled id is derived from it
    exchange_order_id: str
    product: str
    side: Side
    size: Decimal
    price: Decimal
    fee: Decimal
    time: datetime
    liquidity: Literal["maker", "taker"] = "taker"
    client_order_id: str | None = None


@dataclass(frozen=True)
class Balance:
    asset: str
    free: Decimal
    used: Decimal
    total: Decimal


@dataclass(frozen=True)
class KeyPermissions:
    can_view: bool | None
    can_trade: bool | None
    can_transfer: bool | None
    portfolio: str | None = None
    note: str = ""


@runtime_checkable
class ExchangePort(Protocol):
    """One profile's connection to one exchange account. One instance per profile: it holds that profile's
    credentials, rate limiter and market metadata, and nothing of any other profile."""

    @property
    def name(self) -> str: ...

    @property
    def dedups_client_ids(self) -> bool:
        """The exchange refuses or returns the existing order for a repeated client order id (Advanced Trade);
        False where two sends of one id make two orders (the Exchange API)."""
        ...

    async def load_markets(
        self, products: list[str] | None = None, *, refresh: bool = False
    ) -> dict[str, MarketInfo]:
        """Market metadata, keyed by product (only `products` when given). Cached after the first call;
        `refresh` asks the exchange again (trading status and rules change: a product goes cancel-only)."""
        ...

    def market(self, product: str) -> MarketInfo: ...

    async def create_order(
        self,
        client_order_id: str,
        product: str,
        side: Side,
        size: Decimal,
        *,
        limit_price: Decimal | None = None,
        guard: SendGuard | None = None,
    ) -> ExchangeOrder:
        """Place one order, at most once for this client order id, whatever the retries. Sizes and prices are
        rounded to the market's increments here; below the minimum raises RejectedError without sending.
        `guard` (SendGuard) is awaited before each send; what it raises propagates and nothing is sent."""
        ...

    async def create_protective(
        self,
        client_order_id: str,
        product: str,
        size: Decimal,
        stop_price: Decimal,
        *,
        stop_limit_price: Decimal | None = None,
        take_profit_price: Decimal | None = None,
        guard: SendGuard | None = None,
    ) -> ExchangeOrder:
        """Rest a protective sell of a long position at the exchange, at most once for this client order id: a
        stop-limit triggered at `stop_price` (limit `stop_limit_price`, by default the stop less 5%), or, with
        `take_profit_price`, one bracket order carrying both exits where the API has one (Advanced Trade; the
        Exchange API has none and refuses it with RejectedError). Rounded to the market's increments: the size
        down, the stop up, the stop's limit down, the take profit down."""
        ...

    async def fetch_order(self, order: ExchangeOrder) -> ExchangeOrder: ...

    async def fetch_order_by_client_id(
        self, client_order_id: str, product: str, *, since: datetime | None = None
    ) -> ExchangeOrder | None:
        """The order with this client order id, or None when the exchange definitely has none."""
        ...

    async def fetch_orders_by_client_id(
        self, client_order_id: str, product: str, *, since: datetime
    ) -> list[ExchangeOrder]:
        """Every order of the product created since `since` under this client order id, in any status, oldest
        first: more than one only where the exchange does not de-duplicate client ids (`dedups_client_ids`)."""
        ...

    async def fetch_orders_since(self, product: str, since: datetime) -> list[ExchangeOrder]:
        """Every order of the product created since `since`, in any status, oldest first."""
        ...

    async def cancel(self, order: ExchangeOrder) -> ExchangeOrder:
        """Cancel if still open; returns the order's state after the attempt (it may have filled meanwhile)."""
        ...

    async def fetch_open_orders(self, product: str | None = None) -> list[ExchangeOrder]: ...

    async def fetch_fills(
        self, *, product: str | None = None, order: ExchangeOrder | None = None, since: datetime | None = None
    ) -> list[ExchangeFill]: ...

    async def balances(self) -> dict[str, Balance]: ...

    async def key_permissions(self) -> KeyPermissions: ...

    async def server_time(self) -> datetime: ...

    async def close(self) -> None: ...
