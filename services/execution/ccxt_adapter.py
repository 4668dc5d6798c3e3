"""The exchange port over ccxt's async `coinbase` (Advanced Trade, CDP keys) and `coinbaseexchange` (Exchange API,
key + secret + passphrase). ccxt is imported here and in ccxt_errors.py, nowhere else.

One adapter per profile: it holds that profile's credentials, its own ccxt client, rate limiter and markets.

Never twice:
- Advanced Trade de-duplicates `client_order_id` (a repeated id returns the existing order), so a retry re-posts
  the same id. ccxt 4.5.90 ignores the unified `clientOrderId` for `coinbase` and generates its own id: ours goes in
  `params={'client_order_id': ...}`.
- The Exchange API takes a UUID `client_oid` and does not de-duplicate it, so before every send (the first one
  too: a crash may have happened after a send) the adapter looks the id up (`GET /orders/client:<id>`) and
  returns the existing order instead of sending.
- When retries run out on an error after which the order may exist (timeout, 5xx), create raises
  UnknownOrderStateError: the caller must not send the order again until a lookup (reconciliation) settles it.

Protective orders (`create_protective`: a stop loss resting at the exchange, so a crash of ours still caps the loss):
- Advanced Trade stop: ccxt `create_order(symbol, 'limit', 'sell', size, limit, {'stopLossPrice': stop, ...})`
  sends `stop_limit_stop_limit_gtc` {base_size, limit_price, stop_price, stop_direction STOP_DOWN}. ccxt has no
  market stop (NotSupported) and, given stopLossPrice and takeProfitPrice together, silently drops the take profit.
- Advanced Trade bracket: ccxt does not build `trigger_bracket_gtc` {base_size, limit_price (the take profit),
  stop_trigger_price}; it extends its request with the params, so ours carries the whole order_configuration.
  When the stop triggers, Coinbase places a stop-limit 5% under it (the band is Coinbase's, not settable).
- Exchange API stop: ccxt sends `stop_price` and passes `stop: 'loss'` through; type 'limit' makes it a
  stop-limit. The Exchange API has no bracket: a take profit there is refused before sending.
- Read back: ccxt parses a stop-limit's trigger as `triggerPrice` but not a bracket at all (price and amount come
  back None), so the kind, size and prices are read from `info.order_configuration` (Exchange: `info.stop`).

Each HTTP request waits for the profile's token bucket (ccxt's `throttle` hook), which keeps under Coinbase's
published limits (Advanced Trade private 30 requests/s per key; Exchange private 15/s per profile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any, TypeVar, cast

import ccxt.async_support as ccxt_async
from ccxt.base import errors as cx

from services.execution.ccxt_errors import translate
from services.execution.credentials import ExchangeId, ResolvedCredentials, redactor
from services.execution.errors import (
    ExecutionError,
    HaltError,
    RejectedError,
    RetryableError,
    UnknownOrderStateError,
)
from services.execution.ports import (
    Balance,
    ExchangeFill,
    ExchangeOrder,
    ExchangeOrderStatus,
    KeyPermissions,
    MarketInfo,
    OrderKind,
    SendGuard,
)
from shared.messages import Side

log = logging.getLogger(__name__)
T = TypeVar("T")

# ccxt logs every request and response at DEBUG with its headers: the API key, the Exchange passphrase, the bearer
# token. Each client gets this logger instead of ccxt's, and it keeps nothing.
_WIRE_LOG = logging.getLogger("services.execution.ccxt_wire")
_WIRE_LOG.propagate = False
_WIRE_LOG.addFilter(lambda record: False)


@dataclass(frozen=True)
class RateLimit:
    """Token bucket: `rate` requests/s on average, up to `burst` at once; at most rate + burst in any second."""

    rate: float
    burst: int


# Under Coinbase's limits with headroom: Advanced private 30/s per key -> at most 25 in any second;
# Exchange private 15/s per profile (bursts 30) -> at most 15 in any second.
DEFAULT_LIMITS: dict[ExchangeId, RateLimit] = {
    "coinbase": RateLimit(rate=20.0, burst=5),
    "coinbaseexchange": RateLimit(rate=10.0, burst=5),
}


class RateLimiter:
    def __init__(
        self,
        limit: RateLimit,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if limit.rate <= 0 or limit.burst < 1:
            raise ValueError(f"rate limit must have rate > 0 and burst >= 1, got {limit}")
        self.limit = limit
        self._mono = monotonic
        self._sleep = sleep
        self._tokens = float(limit.burst)
        self._last = monotonic()
        self._lock = asyncio.Lock()
        self.waited_s = 0.0  # total time spent waiting: a metric

    async def acquire(self) -> None:
        async with self._lock:  # FIFO: requests leave in the order they asked
            while True:
                now = self._mono()
                self._tokens = min(
                    float(self.limit.burst), self._tokens + (now - self._last) * self.limit.rate
                )
                self._last = now
                if (
                    self._tokens >= 1.0 - 1e-9
                ):  # tolerance: float refills may fall a hair short after the wait
                    self._tokens = max(0.0, self._tokens - 1.0)
                    return
                wait = (1.0 - self._tokens) / self.limit.rate
                self.waited_s += wait
                await self._sleep(wait)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int  # retries after the first try (TradingParams.retry_attempts)
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delay(self, attempt: int, err: ExecutionError) -> float:
        d: float = min(self.max_delay_s, self.base_delay_s * 2.0 ** (attempt - 1))
        if err.kind in ("rate_limited", "maintenance"):
            d = min(self.max_delay_s, d * 2)  # the exchange asked us to slow down
        return d * random.uniform(0.5, 1.0)  # jitter: profiles hitting one outage do not retry in lock-step


# ------------------------------------------------------------------------------------------ ccxt clients
def _tag(exc: BaseException, code: Any) -> None:
    with contextlib.suppress(Exception):
        exc.http_status = int(code)  # type: ignore[attr-defined]


class _Hooks:
    """Mixed into ccxt's classes: tag errors with their HTTP status; route throttling through our limiter."""

    _mp_limiter: RateLimiter | None = None

    def handle_errors(self, code: Any, *args: Any) -> Any:
        try:
            return cast(Any, super()).handle_errors(code, *args)
        except Exception as exc:
            _tag(exc, code)
            raise

    def handle_http_status_code(self, code: Any, *args: Any) -> Any:
        try:
            return cast(Any, super()).handle_http_status_code(code, *args)
        except Exception as exc:
            _tag(exc, code)
            raise

    async def throttle(self, cost: Any = None) -> Any:
        if self._mp_limiter is not None:
            await self._mp_limiter.acquire()
            return None
        return await cast(Any, super()).throttle(cost)


class _AdvancedTrade(_Hooks, ccxt_async.coinbase):  # type: ignore[misc]
    pass


class _ExchangeApi(_Hooks, ccxt_async.coinbaseexchange):  # type: ignore[misc]
    pass


def build_client(
    exchange: ExchangeId,
    creds: ResolvedCredentials,
    *,
    limiter: RateLimiter,
    timeout_s: float = 10.0,
    api_base: str | None = None,
) -> Any:
    """A ccxt client for one profile. `api_base` replaces Coinbase's URLs (tests: the local peer)."""
    cfg: dict[str, Any] = {
        "apiKey": creds.api_key.get_secret_value(),
        "secret": creds.secret.get_secret_value(),
        "enableRateLimit": True,  # makes ccxt call throttle() before each request: our limiter
        "timeout": int(timeout_s * 1000),
    }
    if exchange == "coinbaseexchange":
        cfg["password"] = creds.passphrase.get_secret_value() if creds.passphrase else ""
        client: Any = _ExchangeApi(cfg)
        if creds.sandbox:
            client.set_sandbox_mode(True)
        if api_base is not None:
            client.urls["api"] = {"public": api_base, "private": api_base}
    else:
        if creds.sandbox and api_base is None:
            raise HaltError(
                f"profile {creds.profile_id}: `sandbox: true`, but Coinbase Advanced Trade has no sandbox in ccxt; "
                "set `sandbox: false` to trade this CDP key for real, or use an Exchange API key for the sandbox",
                kind="configuration",
            )
        client = _AdvancedTrade(cfg)
        if api_base is not None:
            client.urls["api"] = {"rest": api_base}
    client._mp_limiter = limiter
    client.logger = _WIRE_LOG
    client.verbose = False
    return client


# ------------------------------------------------------------------------------------------ rounding
def _dec(v: Any) -> Decimal | None:
    if v is None or v == "":
        return None
    try:
        d = Decimal(str(v))
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def _floor_to(x: Decimal, inc: Decimal) -> Decimal:
    return (x / inc).to_integral_value(rounding=ROUND_FLOOR) * inc


def _ceil_to(x: Decimal, inc: Decimal) -> Decimal:
    return (x / inc).to_integral_value(rounding=ROUND_CEILING) * inc


def _num(d: Decimal) -> str:
    return format(d.normalize(), "f")  # plain digits in messages: 10, not 1E+1


def prepare_order(
    m: MarketInfo, side: Side, size: Decimal, limit_price: Decimal | None
) -> tuple[Decimal, Decimal | None]:
    """Size and price rounded to the market's increments, or RejectedError with the reason (nothing is sent).

    The size rounds down (never more than decided). A buy's limit rounds down and a sell's up, so rounding never
    makes the price worse than the one the worker chose.
    """
    if not m.active:
        raise RejectedError(
            f"{m.product} is not trading at the exchange (status {m.status}): no order is sent",
            kind="market_closed",
        )
    if m.status in ("post_only", "post-only"):
        # Our orders are marketable limits (they take liquidity): a post-only book refuses them.
        raise RejectedError(
            f"{m.product} accepts post-only orders only at the exchange: a marketable order is not sent",
            kind="market_closed",
        )
    if size <= 0:
        raise RejectedError(f"size must be positive, got {size}", kind="invalid_order")
    q = _floor_to(size, m.size_increment).normalize()
    if q <= 0 or (m.min_size is not None and q < m.min_size):
        minimum = _num(m.min_size) if m.min_size is not None else f"{_num(m.size_increment)} (one increment)"
        raise RejectedError(
            f"below minimum: size {_num(size)} {m.base} rounds to {_num(q)} at increment "
            f"{_num(m.size_increment)}; {m.product} minimum is {minimum} {m.base}; not sent",
            kind="below_minimum",
        )
    if m.max_size is not None and q > m.max_size:
        raise RejectedError(
            f"above maximum: size {_num(q)} {m.base} exceeds {m.product} maximum {_num(m.max_size)}",
            kind="above_maximum",
        )
    p: Decimal | None = None
    if limit_price is not None:
        if limit_price <= 0:
            raise RejectedError(f"limit price must be positive, got {limit_price}", kind="invalid_order")
        p = (_floor_to if side == "buy" else _ceil_to)(limit_price, m.price_increment).normalize()
        if p <= 0:
            raise RejectedError(
                f"limit price {_num(limit_price)} rounds to 0 at increment {_num(m.price_increment)}",
                kind="invalid_order",
            )
        if m.min_notional is not None and q * p < m.min_notional:
            raise RejectedError(
                f"below minimum: notional {_num(q * p)} {m.quote} (size {_num(q)} x price {_num(p)}) is under "
                f"{m.product} minimum {_num(m.min_notional)} {m.quote}; not sent",
                kind="below_minimum",
            )
    return q, p


def _flag(v: Any) -> bool:
    return v is True or str(v).strip().lower() == "true"


def trading_status(info: dict[str, Any]) -> str:
    """The product's trading status from the exchange's own fields, which ccxt passes through in `info`
    (Advanced Trade and Exchange API products both carry status, trading_disabled, cancel_only, limit_only,
    post_only). ccxt's `active` reads only part of them (Advanced: trading_disabled; Exchange: status), and the
    Exchange API reports a cancel-only product as status "online" with cancel_only true: the flags come first."""
    raw = str(info.get("status") or "").strip().lower()
    if _flag(info.get("trading_disabled")) or _flag(info.get("is_disabled")) or raw == "disabled":
        return "disabled"
    for key in ("cancel_only", "limit_only", "post_only"):
        if _flag(info.get(key)):
            return key.replace("_", "-")
    return "online" if raw in ("", "online") else raw


def market_from_ccxt(mk: dict[str, Any]) -> MarketInfo:
    """Our market rules from a ccxt market; the raw strings of `info` are preferred over ccxt's floats."""
    info = mk.get("info") or {}
    prec = mk.get("precision") or {}
    limits = mk.get("limits") or {}
    size_inc = _dec(info.get("base_increment")) or _dec(prec.get("amount"))
    price_inc = (
        _dec(info.get("price_increment")) or _dec(info.get("quote_increment")) or _dec(prec.get("price"))
    )
    if size_inc is None or price_inc is None or size_inc <= 0 or price_inc <= 0:
        raise HaltError(
            f"market {mk.get('symbol')}: the exchange gave no size or price increment", kind="bad_response"
        )
    min_size = _dec(info.get("base_min_size")) or _dec((limits.get("amount") or {}).get("min"))
    min_notional = (
        _dec(info.get("quote_min_size"))
        or _dec(info.get("min_market_funds"))
        or _dec((limits.get("cost") or {}).get("min"))
    )
    max_size = _dec(info.get("base_max_size")) or _dec((limits.get("amount") or {}).get("max"))
    status = trading_status(info)
    price = _dec(info.get("price"))
    return MarketInfo(
        product=str(mk["symbol"]),
        exchange_id=str(mk["id"]),
        base=str(mk["base"]),
        quote=str(mk["quote"]),
        price_increment=price_inc,
        size_increment=size_inc,
        min_size=min_size if min_size and min_size > 0 else None,
        min_notional=min_notional if min_notional and min_notional > 0 else None,
        max_size=max_size if max_size and max_size > 0 else None,
        # A cancel-only or disabled product takes no new order; limit- and post-only ones take some.
        active=mk.get("active") is not False and status not in ("disabled", "cancel-only"),
        status=status,
        price=price if price and price > 0 else None,
    )


# The stop-limit's default limit under its stop: the band Coinbase itself uses when a bracket's stop triggers. Wide
# enough that a fast market still fills the exit; the limit caps how far under the stop a thin book can take it.
STOP_LIMIT_BAND = Decimal("0.05")


def protective_prices(
    m: MarketInfo,
    stop_price: Decimal,
    stop_limit_price: Decimal | None,
    take_profit_price: Decimal | None,
) -> tuple[Decimal, Decimal, Decimal | None]:
    """(stop, stop's limit, take profit) of a protective sell, on the market's price increment, or RejectedError
    with the reason. Each rounds toward acting sooner: the stop up (it triggers no later than asked, so the loss
    is capped no further away), the stop's limit down (more willing to fill once triggered), the take profit
    down (shared/protective.py rounds its level down too: reached no later than the paper books it)."""
    inc = m.price_increment
    if not stop_price.is_finite() or stop_price <= 0:
        raise RejectedError(f"stop price must be positive, got {stop_price}", kind="invalid_order")
    stop = _ceil_to(stop_price, inc).normalize()
    asked_limit = stop_limit_price if stop_limit_price is not None else stop * (1 - STOP_LIMIT_BAND)
    if not asked_limit.is_finite() or asked_limit <= 0:
        raise RejectedError(f"stop limit price must be positive, got {asked_limit}", kind="invalid_order")
    limit = _floor_to(asked_limit, inc).normalize()
    if limit <= 0:
        raise RejectedError(
            f"stop limit price {_num(asked_limit)} rounds to 0 at increment {_num(inc)}", kind="invalid_order"
        )
    if limit > stop:
        raise RejectedError(
            f"stop limit price {_num(limit)} is above the stop {_num(stop)}: once triggered the sell would rest "
            "above the market instead of exiting",
            kind="invalid_order",
        )
    take: Decimal | None = None
    if take_profit_price is not None:
        if not take_profit_price.is_finite() or take_profit_price <= 0:
            raise RejectedError(
                f"take profit price must be positive, got {take_profit_price}", kind="invalid_order"
            )
        take = _floor_to(take_profit_price, inc).normalize()
        if take <= stop:
            raise RejectedError(
                f"take profit {_num(take)} is not above the stop {_num(stop)} (after rounding to {_num(inc)})",
                kind="invalid_order",
            )
    return stop, limit, take


# ------------------------------------------------------------------------------------------ parsing
_STATUS: dict[str, ExchangeOrderStatus] = {
    "open": "open",
    "closed": "filled",
    "canceled": "cancelled",
    "cancelled": "cancelled",
    "expired": "cancelled",
    "rejected": "rejected",
}


def _side(v: Any) -> Side:
    return "sell" if str(v).lower() == "sell" else "buy"


def _ms_to_dt(ms: Any) -> datetime | None:
    return datetime.fromtimestamp(int(ms) / 1000, UTC) if isinstance(ms, int | float) else None


def _shape(o: dict[str, Any]) -> tuple[OrderKind | None, Decimal | None, Decimal | None, Decimal | None]:
    """(kind, size, limit, stop) as the exchange describes the order: Advanced Trade's order_configuration (ccxt
    does not parse a bracket), the Exchange API's `stop`; Nones where the answer does not say."""
    info = o.get("info")
    info = info if isinstance(info, dict) else {}
    cfg = info.get("order_configuration")
    if isinstance(cfg, dict):
        for key, c in cfg.items():
            if not isinstance(c, dict):
                continue
            size = _dec(c.get("base_size"))
            if key.startswith("trigger_bracket"):
                return "bracket", size, _dec(c.get("limit_price")), _dec(c.get("stop_trigger_price"))
            if key.startswith("stop_limit"):
                return "stop", size, _dec(c.get("limit_price")), _dec(c.get("stop_price"))
            if key.startswith("market"):
                return "market", size, None, None
            if "limit" in key:
                return "limit", size, _dec(c.get("limit_price")), None
    if info.get("stop"):
        return "stop", None, None, _dec(info.get("stop_price"))
    typ = o.get("type")
    return (typ if typ in ("market", "limit") else None), None, None, None


def order_from_ccxt(
    o: dict[str, Any],
    *,
    product: str,
    side: Side,
    size: Decimal,
    client_order_id: str | None,
    kind: OrderKind | None = None,
    limit_price: Decimal | None = None,
    stop_price: Decimal | None = None,
) -> ExchangeOrder:
    """Our order from ccxt's unified order; fields an answer lacks (a create's answer is short) are filled from
    what we sent (`size`, `kind`, `limit_price`, `stop_price`)."""
    raw_status = o.get("status")
    status: ExchangeOrderStatus = _STATUS.get(str(raw_status), "open") if raw_status is not None else "open"
    filled = _dec(o.get("filled")) or Decimal(0)
    shape_kind, shape_size, shape_limit, shape_stop = _shape(o)
    amount = _dec(o.get("amount")) or shape_size or size
    price = _dec(o.get("price")) or shape_limit or limit_price
    the_kind: OrderKind = shape_kind or kind or ("limit" if price is not None else "market")
    if status == "filled" and filled < amount:
        status = (
            "cancelled"  # closed with a remainder: only a cancel (or expiry) closes a partly filled order
        )
    fee = _dec((o.get("fee") or {}).get("cost")) or Decimal(0)
    return ExchangeOrder(
        exchange_order_id=str(o.get("id")),
        client_order_id=o.get("clientOrderId") or client_order_id,
        product=str(o.get("symbol") or product),
        side=_side(o.get("side") or side),
        size=amount,
        filled_size=filled,
        status=status,
        limit_price=price,
        average_price=_dec(o.get("average")),
        fee=fee,
        created_at=_ms_to_dt(o.get("timestamp")),
        kind=the_kind,
        stop_price=_dec(o.get("triggerPrice")) or shape_stop or stop_price,
    )


def fill_from_ccxt(
    t: dict[str, Any], exchange: ExchangeId, *, client_order_id: str | None = None
) -> ExchangeFill:
    info = t.get("info") or {}
    product = str(t.get("symbol"))
    # Advanced: entry_id is unique per fill; Exchange: trade ids are unique per product only.
    fid = str(info.get("entry_id") or t.get("id")) if exchange == "coinbase" else f"{product}:{t.get('id')}"
    size = _dec(t.get("amount")) or Decimal(0)
    price = _dec(t.get("price")) or Decimal(0)
    fee = _dec((t.get("fee") or {}).get("cost")) or Decimal(0)
    when = _ms_to_dt(t.get("timestamp")) or datetime.now(UTC)
    return ExchangeFill(
        fill_id=fid,
        exchange_order_id=str(t.get("order")),
        product=product,
        side=_side(t.get("side")),
        size=size,
        price=price,
        fee=fee,
        time=when,
        liquidity="maker" if t.get("takerOrMaker") == "maker" else "taker",
        client_order_id=client_order_id,
    )


def is_uuid(s: str) -> bool:
    try:
        uuid.UUID(s)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------ the adapter
class CcxtExchange:
    """ExchangePort over ccxt for one profile."""

    def __init__(
        self,
        profile_id: str,
        exchange: ExchangeId,
        client: Any,
        *,
        retry: RetryPolicy,
        redact: Callable[[str], str],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        lookup_window: timedelta = timedelta(days=7),
    ) -> None:
        self.profile_id = profile_id
        self.exchange = exchange
        self._ex = client
        self.retry = retry
        self._redact = redact
        self._sleep = sleep
        self._lookup_window = lookup_window
        self._markets: dict[str, MarketInfo] = {}
        # The Exchange API does not de-duplicate client_oid: look the id up before every send.
        self.lookup_before_send = exchange == "coinbaseexchange"
        # ccxt's timeout of one request (build_client): how long a send may take before the client gives up.
        self.request_timeout_s = 10.0
        self.retries = 0  # a metric: how many retries this adapter made
        # Told every error the table translates, retried or not (the worker's error metric).
        self.on_error: Callable[[ExecutionError], None] | None = None

    def __repr__(self) -> str:
        return f"CcxtExchange({self.profile_id}, {self.exchange})"

    @property
    def name(self) -> str:
        return self.exchange

    @property
    def dedups_client_ids(self) -> bool:
        return self.exchange == "coinbase"

    # -------------------------------------------------------------------------- retry
    async def _retrying(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await fn()
            except Exception as exc:  # noqa: BLE001 - every failure goes through the table
                err = translate(exc, redact=self._redact, context=f"{self.profile_id} {what}")
                self._noted(err)
                if not isinstance(err, RetryableError) or attempt >= self.retry.attempts:
                    raise err from None  # `from None`: the library's exception (URLs, bodies) stays out of tracebacks
                attempt += 1
                self.retries += 1
                delay = self.retry.delay(attempt, err)
                log.warning("%s; retry %d/%d in %.2fs", err.reason, attempt, self.retry.attempts, delay)
                await self._sleep(delay)

    def _noted(self, err: ExecutionError) -> None:
        if self.on_error is not None:
            self.on_error(err)

    # -------------------------------------------------------------------------- markets
    async def load_markets(
        self, products: list[str] | None = None, *, refresh: bool = False
    ) -> dict[str, MarketInfo]:
        if not self._markets or refresh:
            # ccxt caches its markets too: a refresh asks the exchange again (a product switched to cancel-only).
            raw = await self._retrying("load markets", lambda: self._ex.load_markets(reload=refresh))
            out: dict[str, MarketInfo] = {}
            for symbol, mk in raw.items():
                if mk.get("spot") and (products is None or symbol in products):
                    out[symbol] = market_from_ccxt(mk)
            self._markets = out
            missing = sorted(set(products or []) - set(out))
            if missing:
                log.warning(
                    "%s: the exchange lists no spot market for %s; orders on them are rejected",
                    self.profile_id,
                    missing,
                )
        if products is None:
            return dict(self._markets)
        return {p: m for p, m in self._markets.items() if p in products}

    def market(self, product: str) -> MarketInfo:
        m = self._markets.get(product)
        if m is None:
            raise RejectedError(
                f"{product} is not a market of {self.exchange} for this profile (or markets not loaded)",
                kind="bad_symbol",
            )
        return m

    # -------------------------------------------------------------------------- orders
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
        try:  # refused here, never sent: counted with the exchange's refusals
            m = self.market(product)
            q, p = prepare_order(m, side, size, limit_price)
            if self.exchange == "coinbaseexchange" and not is_uuid(client_order_id):
                raise RejectedError(
                    f"client order id {client_order_id!r} is not a UUID, as the Exchange API requires",
                    kind="invalid_order",
                )
            if p is None and side == "buy" and self.exchange == "coinbase":
                raise RejectedError(
                    "a market buy on Advanced Trade needs a quote size: give a limit price",
                    kind="invalid_order",
                )
        except RejectedError as refused:
            self._noted(refused)
            raise
        params = (
            {"client_order_id": client_order_id}
            if self.exchange == "coinbase"
            else {"client_oid": client_order_id}
        )
        kind = "limit" if p is not None else "market"

        async def send() -> Any:
            return await self._ex.create_order(
                product, kind, side, float(q), float(p) if p is not None else None, dict(params)
            )

        def made(raw: dict[str, Any]) -> ExchangeOrder:
            return order_from_ccxt(raw, product=product, side=side, size=q, client_order_id=client_order_id)

        return await self._place(client_order_id, product, send, made, guard)

    async def _place(
        self,
        client_order_id: str,
        product: str,
        send: Callable[[], Awaitable[Any]],
        made: Callable[[dict[str, Any]], ExchangeOrder],
        guard: SendGuard | None = None,
    ) -> ExchangeOrder:
        """Send one order at most once for its client order id, whatever the retries (module docstring, Never
        twice): `send` makes the ccxt call, `made` reads its answer."""
        attempt = 0
        while True:
            if self.lookup_before_send:
                existing = await self._retrying(
                    "lookup before send", lambda: self._lookup(client_order_id, product, None)
                )
                if existing is not None:
                    log.info(
                        "%s: order %s already at the exchange; not sent again",
                        self.profile_id,
                        client_order_id,
                    )
                    return existing
            if guard is not None:
                await guard()  # outside the table: a refusal propagates as it is, and nothing is sent
            try:
                raw = await send()
            except Exception as exc:  # noqa: BLE001
                err = translate(
                    exc, redact=self._redact, context=f"{self.profile_id} create {client_order_id}"
                )
                self._noted(err)
                if isinstance(err, RejectedError) and err.kind == "duplicate_client_id":
                    found = await self._retrying(
                        "lookup duplicate", lambda: self._lookup(client_order_id, product, None)
                    )
                    if found is not None:
                        return found
                if not isinstance(err, RetryableError):
                    raise err from None
                if attempt >= self.retry.attempts:
                    raise UnknownOrderStateError(
                        f"{err.reason}; gave up after {attempt + 1} attempts and the order may exist: it is not sent "
                        "again until a lookup settles it",
                        kind=err.kind,
                        http_status=err.http_status,
                    ) from None
                attempt += 1
                self.retries += 1
                delay = self.retry.delay(attempt, err)
                log.warning(
                    "%s; resend %d/%d in %.2fs (same client order id)",
                    err.reason,
                    attempt,
                    self.retry.attempts,
                    delay,
                )
                await self._sleep(delay)
                continue
            return made(raw)

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
        """ExchangePort.create_protective: a resting stop-limit sell, or an Advanced Trade bracket when a take
        profit is given (module docstring: what ccxt sends)."""
        try:  # refused here, never sent
            m = self.market(product)
            stop, limit, take = protective_prices(m, stop_price, stop_limit_price, take_profit_price)
            if take is not None and self.exchange == "coinbaseexchange":
                raise RejectedError(
                    f"take profit {_num(take)} refused: the Exchange API has no order carrying both a stop and a "
                    "take profit; place the stop alone",
                    kind="unsupported",
                )
            if take is not None and stop_limit_price is not None:
                raise RejectedError(
                    f"stop limit price {_num(stop_limit_price)} refused with a take profit: a bracket's stop limit "
                    f"is Coinbase's ({_num(STOP_LIMIT_BAND * 100)}% under the stop) and cannot be set",
                    kind="invalid_order",
                )
            if self.exchange == "coinbaseexchange" and not is_uuid(client_order_id):
                raise RejectedError(
                    f"client order id {client_order_id!r} is not a UUID, as the Exchange API requires",
                    kind="invalid_order",
                )
            # The minimum notional is checked at the worst price the exit may fill at: the stop's limit.
            q, _ = prepare_order(m, "sell", size, limit)
        except RejectedError as refused:
            self._noted(refused)
            raise
        kind: OrderKind = "bracket" if take is not None else "stop"
        params: dict[str, Any]
        if self.exchange == "coinbaseexchange":
            params = {"client_oid": client_order_id, "stop": "loss", "stop_price": float(stop)}
        elif take is not None:
            params = {
                "client_order_id": client_order_id,
                "order_configuration": {
                    "trigger_bracket_gtc": {
                        "base_size": _num(q),
                        "limit_price": _num(take),
                        "stop_trigger_price": _num(stop),
                    }
                },
            }
        else:
            # The direction is explicit although ccxt derives STOP_DOWN from stopLossPrice for a sell: its defaults
            # differ between stopPrice (sell -> STOP_UP) and stopLossPrice, and a flipped one would rest as a
            # take-profit trigger.
            params = {
                "client_order_id": client_order_id,
                "stopLossPrice": float(stop),
                "stop_direction": "STOP_DIRECTION_STOP_DOWN",
            }
        price = take if take is not None else limit

        async def send() -> Any:
            return await self._ex.create_order(product, "limit", "sell", float(q), float(price), dict(params))

        def made(raw: dict[str, Any]) -> ExchangeOrder:
            return order_from_ccxt(
                raw,
                product=product,
                side="sell",
                size=q,
                client_order_id=client_order_id,
                kind=kind,
                limit_price=price,
                stop_price=stop,
            )

        return await self._place(client_order_id, product, send, made, guard)

    async def _lookup(
        self, client_order_id: str, product: str, since: datetime | None
    ) -> ExchangeOrder | None:
        if self.exchange == "coinbaseexchange":
            try:
                raw = await self._ex.fetch_order(None, None, {"client_oid": client_order_id})
            except cx.OrderNotFound:
                return None
            return order_from_ccxt(
                raw, product=product, side="buy", size=Decimal(0), client_order_id=client_order_id
            )
        # Advanced Trade: list the product's orders since `since` (all statuses) and match the client id.
        start = since or (datetime.now(UTC) - self._lookup_window)
        cursor: str | None = None
        for _ in range(100):  # 100 pages of 250: far beyond one profile's orders in the window
            params: dict[str, Any] = {"cursor": cursor} if cursor else {}
            page = await self._ex.fetch_orders(product, int(start.timestamp() * 1000), 250, params)
            for o in page:
                if o.get("clientOrderId") == client_order_id:
                    return order_from_ccxt(
                        o, product=product, side="buy", size=Decimal(0), client_order_id=client_order_id
                    )
            cursor = ((page[0].get("info") or {}).get("cursor") if page else None) or None
            if not cursor:
                return None
        return None

    async def fetch_order_by_client_id(
        self, client_order_id: str, product: str, *, since: datetime | None = None
    ) -> ExchangeOrder | None:
        return await self._retrying(
            f"lookup {client_order_id}", lambda: self._lookup(client_order_id, product, since)
        )

    async def fetch_orders_since(self, product: str, since: datetime) -> list[ExchangeOrder]:
        """ExchangePort.fetch_orders_since. Exchange API: `GET /orders?status=all&product_id=&start_date=` (newest
        first, at most 1000 a page; older pages by `end_date` = the oldest seen). Advanced Trade: the historical
        batch endpoint, by cursor."""
        since_ms = int(since.timestamp() * 1000)
        seen: dict[str, dict[str, Any]] = {}
        if self.exchange == "coinbaseexchange":
            until: int | None = None
            for _ in range(
                100
            ):  # 100 pages of 1000: far beyond one profile's orders of a product in the window
                params: dict[str, Any] = {"until": until} if until is not None else {}

                async def page_of(p: dict[str, Any] = params) -> list[dict[str, Any]]:
                    return cast(list[dict[str, Any]], await self._ex.fetch_orders(product, since_ms, 1000, p))

                page = await self._retrying(f"list orders of {product}", page_of)
                new = [o for o in page if str(o.get("id")) not in seen]
                seen.update((str(o.get("id")), o) for o in new)
                stamps = [int(o["timestamp"]) for o in page if isinstance(o.get("timestamp"), int | float)]
                if len(page) < 1000 or not new or not stamps:
                    break
                until = min(stamps)
        else:
            cursor: str | None = None
            for _ in range(100):
                params = {"cursor": cursor} if cursor else {}

                async def adv_page(p: dict[str, Any] = params) -> list[dict[str, Any]]:
                    return cast(list[dict[str, Any]], await self._ex.fetch_orders(product, since_ms, 250, p))

                page = await self._retrying(f"list orders of {product}", adv_page)
                seen.update((str(o.get("id")), o) for o in page)
                cursor = ((page[0].get("info") or {}).get("cursor") if page else None) or None
                if not cursor:
                    break
        out = [
            order_from_ccxt(
                o, product=product, side=_side(o.get("side")), size=Decimal(0), client_order_id=None
            )
            for o in seen.values()
        ]
        epoch = datetime.min.replace(tzinfo=UTC)
        return sorted(out, key=lambda o: (o.created_at or epoch, o.exchange_order_id))

    async def fetch_orders_by_client_id(
        self, client_order_id: str, product: str, *, since: datetime
    ) -> list[ExchangeOrder]:
        # Neither API filters a listing by client id (GET /orders/client:<id> answers one order only): list, match.
        return [
            o for o in await self.fetch_orders_since(product, since) if o.client_order_id == client_order_id
        ]

    async def fetch_order(self, order: ExchangeOrder) -> ExchangeOrder:
        async def get() -> ExchangeOrder:
            try:
                raw = await self._ex.fetch_order(order.exchange_order_id, order.product)
            except cx.OrderNotFound:
                if self.exchange == "coinbaseexchange":
                    # Coinbase Exchange answers 404 for an order cancelled before any fill.
                    return _replace(order, status="cancelled", reason="not found: cancelled before any fill")
                raise
            return order_from_ccxt(
                raw,
                product=order.product,
                side=order.side,
                size=order.size,
                client_order_id=order.client_order_id,
            )

        return await self._retrying(f"fetch order {order.client_order_id}", get)

    async def cancel(self, order: ExchangeOrder) -> ExchangeOrder:
        async def do_cancel() -> None:
            # Already done or cancelled: the fetch below tells which.
            with contextlib.suppress(cx.OrderNotFound, cx.BadRequest):
                await self._ex.cancel_order(order.exchange_order_id, order.product)

        await self._retrying(f"cancel {order.client_order_id}", do_cancel)
        return await self.fetch_order(order)

    async def fetch_open_orders(self, product: str | None = None) -> list[ExchangeOrder]:
        raw = await self._retrying("fetch open orders", lambda: self._ex.fetch_open_orders(product))
        return [
            order_from_ccxt(
                o,
                product=str(o.get("symbol")),
                side=_side(o.get("side")),
                size=Decimal(0),
                client_order_id=None,
            )
            for o in raw
        ]

    async def fetch_fills(
        self, *, product: str | None = None, order: ExchangeOrder | None = None, since: datetime | None = None
    ) -> list[ExchangeFill]:
        since_ms = int(since.timestamp() * 1000) if since is not None else None
        coid = order.client_order_id if order is not None else None
        if self.exchange == "coinbaseexchange":
            if order is not None:
                raw = await self._retrying(
                    "fetch fills", lambda: self._ex.fetch_order_trades(order.exchange_order_id, order.product)
                )
            else:
                if product is None:
                    raise ValueError("the Exchange API lists fills per product or per order: give one")
                raw = await self._retrying("fetch fills", lambda: self._ex.fetch_my_trades(product, since_ms))
            return [fill_from_ccxt(t, self.exchange, client_order_id=coid) for t in raw]
        out: list[ExchangeFill] = []
        cursor: str | None = None
        for _ in range(100):
            params: dict[str, Any] = {}
            if order is not None:
                params["order_ids"] = [order.exchange_order_id]
            if cursor:
                params["cursor"] = cursor
            symbol = product if order is None else None

            async def page_of(p: dict[str, Any] = params, sym: str | None = symbol) -> list[dict[str, Any]]:
                return cast(list[dict[str, Any]], await self._ex.fetch_my_trades(sym, since_ms, None, p))

            page = await self._retrying("fetch fills", page_of)
            out.extend(fill_from_ccxt(t, self.exchange, client_order_id=coid) for t in page)
            cursor = ((page[0].get("info") or {}).get("cursor") if page else None) or None
            if not cursor:
                break
        return out

    # -------------------------------------------------------------------------- account
    async def balances(self) -> dict[str, Balance]:
        params = (
            {"v3": True} if self.exchange == "coinbase" else {}
        )  # v3: the key's portfolio, not the v2 wallet
        raw = await self._retrying("fetch balance", lambda: self._ex.fetch_balance(params))
        out: dict[str, Balance] = {}
        for asset, b in raw.items():
            if asset in ("info", "free", "used", "total", "timestamp", "datetime") or not isinstance(b, dict):
                continue
            total = _dec(b.get("total")) or Decimal(0)
            free = _dec(b.get("free"))
            used = _dec(b.get("used")) or Decimal(0)
            out[asset] = Balance(asset, free if free is not None else total - used, used, total)
        return out

    async def key_permissions(self) -> KeyPermissions:
        if self.exchange == "coinbaseexchange":
            # No permissions endpoint; the profile (portfolio) the key belongs to is on each of its accounts.
            accounts = await self._retrying("list accounts", lambda: self._ex.privateGetAccounts())
            profiles = sorted(
                {str(a["profile_id"]) for a in accounts or [] if isinstance(a, dict) and a.get("profile_id")}
            )
            return KeyPermissions(
                None,
                None,
                None,
                portfolio=",".join(profiles) or None,
                note="the Exchange API does not report a key's permissions; a 403 on the first order means no 'trade'",
            )
        raw = await self._retrying("key permissions", lambda: self._ex.v3PrivateGetBrokerageKeyPermissions())
        return KeyPermissions(
            can_view=raw.get("can_view"),
            can_trade=raw.get("can_trade"),
            can_transfer=raw.get("can_transfer"),
            portfolio=raw.get("portfolio_uuid"),
        )

    async def server_time(self) -> datetime:
        ms = await self._retrying("server time", lambda: self._ex.fetch_time())
        if not isinstance(ms, int | float):
            raise RetryableError("the exchange's time answer was unreadable", kind="bad_response")
        return datetime.fromtimestamp(ms / 1000, UTC)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ex.close()


def _replace(o: ExchangeOrder, **kw: Any) -> ExchangeOrder:
    from dataclasses import replace

    return replace(o, **kw)


def profile_products(profile: Any, quote: str) -> list[str]:
    """Every product a profile may trade: its pairs, and each traded asset against the quote."""
    assets = [a for a in profile.traded_assets() if a != quote]
    return sorted(set(profile.trading_pairs) | {f"{a}/{quote}" for a in assets})


async def open_exchange(
    creds: ResolvedCredentials,
    *,
    retry_attempts: int,
    products: list[str] | None = None,
    api_base: str | None = None,
    limit: RateLimit | None = None,
    timeout_s: float = 10.0,
    base_delay_s: float = 0.5,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    load: bool = True,
) -> CcxtExchange:
    """One profile's adapter, markets loaded. The worker calls this once, with the profile's resolved credentials."""
    limiter = RateLimiter(limit or DEFAULT_LIMITS[creds.exchange])
    client = build_client(creds.exchange, creds, limiter=limiter, timeout_s=timeout_s, api_base=api_base)
    port = CcxtExchange(
        creds.profile_id,
        creds.exchange,
        client,
        retry=RetryPolicy(attempts=retry_attempts, base_delay_s=base_delay_s),
        redact=redactor(creds.values()),
        sleep=sleep,
    )
    port.request_timeout_s = timeout_s
    if load:
        try:
            await port.load_markets(products)
        except BaseException:
            await port.close()
            raise
    return port
