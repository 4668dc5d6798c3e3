"""A local Coinbase peer for tests: an aiohttp server on 127.0.0.1 speaking the endpoints our adapters use, for
both APIs, so that real ccxt code signs and sends real HTTP requests to it.

- Advanced Trade (ccxt `coinbase`): /v2/... and /api/v3/brokerage/... Every private request must carry an ES256
  JWT (`Authorization: Bearer`) whose `kid` names a registered CDP key; the signature is verified with that
  key's public key, and the claims (iss, sub, aud, nbf/exp, `uri` = method + URL) are checked.
  `client_order_id` is de-duplicated per key as Coinbase documents: a repeated id creates nothing and returns
  the existing order.
- Exchange API (ccxt `coinbaseexchange`): /products, /orders, /fills, ... Every private request must carry
  CB-ACCESS-KEY/SIGN/TIMESTAMP/PASSPHRASE; the HMAC-SHA256 (base64 secret) over timestamp + method + path + body
  is verified. `client_oid` is NOT de-duplicated, as on the real exchange.

Each order records the key that signed its request (`signed_by`) and the profile that key belongs to.
Faults: `inject` (any status and body, e.g. 429, 500, 401, 403), `hang_after_accept` (store the order, then
answer too late), `rate_limit_per_s` (per key, sliding one-second window -> 429), `clock_offset_s` (the peer's
clock is off: signatures outside the window are refused), partial fills (`fill_plan`, `fill`).

Protective orders (stop-limit and bracket on Advanced Trade, stop on the Exchange API) rest without filling and
act when the market trades through them: `trade(product, price)` is a market trade print (tests and the
market-data peer call it), `price(product)` the last one. See PROTECTIVE ORDERS below for the facts and rules.
For the pre-flight: `set_status` (a product's trading status, as both products endpoints report it), keys with
the transfer permission, and several keys on one portfolio (`portfolio=`: they share its balances).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

D = Decimal


@dataclass(frozen=True)
class Product:
    base: str
    quote: str
    base_increment: str
    quote_increment: str
    base_min_size: str
    quote_min_size: str = "1"
    price: str = "100"

    @property
    def id(self) -> str:
        return f"{self.base}-{self.quote}"


DEFAULT_PRODUCTS: tuple[Product, ...] = (
    Product("BTC", "USDC", "0.00000001", "0.01", "0.00001", "1", "60000"),
    Product("ETH", "USDC", "0.00000001", "0.01", "0.0001", "1", "3000"),
    Product("SOL", "USDC", "0.001", "0.01", "0.01", "1", "150"),
    *(
        Product(base, "USDC", "0.01", "0.0001", "0.1", "1", price)
        for base, price in (
            ("XRP", "0.6"),
            ("LINK", "15"),
            ("ADA", "0.45"),
            ("DOT", "7"),
            ("MATIC", "0.7"),
            ("AVAX", "35"),
            ("UNI", "8"),
            ("ATOM", "9"),
            ("LTC", "80"),
        )
    ),  # fmt: skip
)


@dataclass
class Account:
    profile: str
    api: str  # "advanced" | "exchange"
    key_id: str  # CDP key name, or Exchange API key
    public_key: ec.EllipticCurvePublicKey | None = None
    secret_b64: str = ""
    passphrase: str = ""
    can_trade: bool = True
    can_transfer: bool = False
    portfolio: str = (
        ""  # the portfolio (Advanced) or profile (Exchange API) the key trades; default per profile
    )
    balances: dict[str, Decimal] = field(
        default_factory=lambda: {"USDC": D("100000"), "BTC": D("1"), "ETH": D("10"), "SOL": D("100")}
    )


@dataclass
class PeerFill:
    fill_id: str
    trade_id: int
    order_id: str
    size: Decimal
    price: Decimal
    fee: Decimal
    time: datetime


@dataclass
class PeerOrder:
    order_id: str
    client_id: str
    api: str
    profile: str
    signed_by: str
    product: Product
    side: str
    size: Decimal
    limit_price: Decimal | None
    created: datetime
    status: str = "OPEN"  # OPEN | FILLED | CANCELLED
    fills: list[PeerFill] = field(default_factory=list)
    # market | limit | stop_limit | bracket. Set by _store; "limit" whenever a limit price is given otherwise.
    order_type: str = ""
    stop_price: Decimal | None = None  # stop_limit: stop_price; bracket: stop_trigger_price
    stop_direction: str = ""  # STOP_DIRECTION_STOP_DOWN | STOP_DIRECTION_STOP_UP (Exchange loss | entry)
    # Once the stop has triggered: the limit the order now rests at (stop-limit: its limit; bracket: the stop
    # trigger less BRACKET_STOP_BAND for a sell, plus for a buy).
    triggered_limit: Decimal | None = None

    @property
    def protective(self) -> bool:
        return self.order_type in ("stop_limit", "bracket")

    @property
    def triggered(self) -> bool:
        return self.triggered_limit is not None

    @property
    def filled(self) -> Decimal:
        return sum((f.size for f in self.fills), D(0))

    @property
    def fees(self) -> Decimal:
        return sum((f.fee for f in self.fills), D(0))

    @property
    def avg_price(self) -> Decimal:
        f = self.filled
        return (sum((x.size * x.price for x in self.fills), D(0)) / f) if f else D(0)


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    body: Any
    times: int
    api: str | None = None


@dataclass
class RequestRecord:
    t: float
    method: str
    path: str
    api: str
    key_id: str | None
    profile: str | None
    status: int = 0
    body: str = ""  # what the client sent: tests read the order configuration ccxt built


@dataclass(frozen=True)
class AdvancedKeyMaterial:
    key_name: str
    private_pem: str


@dataclass(frozen=True)
class ExchangeKeyMaterial:
    api_key: str
    secret_b64: str
    passphrase: str


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _parse_iso(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _b64url_dec(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _multiple(x: Decimal, inc: Decimal) -> bool:
    return (x / inc) == (x / inc).to_integral_value()


# ------------------------------------------------------------------------------------------ PROTECTIVE ORDERS
# What real ccxt 4.5.90 sends (coinbase.py create_order, coinbaseexchange.py create_order), and Coinbase's facts:
# - Advanced Trade, type 'limit' + `stopPrice`/`stop_price`/`triggerPrice` -> order_configuration
#   `stop_limit_stop_limit_gtc` {base_size, limit_price, stop_price, stop_direction} (`..._gtd` + end_time with
#   timeInForce GTD). Default stop_direction for a trigger price: buy STOP_DOWN, sell STOP_UP.
# - type 'limit' + `stopLossPrice` -> the same configuration, default direction buy STOP_UP, sell STOP_DOWN;
#   `takeProfitPrice` -> buy STOP_DOWN, sell STOP_UP. With both, only the stop loss is sent: ccxt silently drops
#   the take profit. An explicit `stop_direction` param wins.
# - type 'market' with any of them -> ccxt raises NotSupported ("only stop limit orders are supported").
# - ccxt has no bracket: `trigger_bracket_gtc` {base_size, limit_price, stop_trigger_price} (and `_gtd` + end_time)
#   goes through params: ccxt extends the request with the params, so params['order_configuration'] replaces the
#   one it built. Coinbase: the bracket rests as a limit at limit_price (the take profit); when the last trade
#   reaches stop_trigger_price "a stop limit order is automatically placed with a limit price 5% higher for BUYS
#   and 5% lower for SELLS". One order, so when either side fills nothing of the other remains.
# - Listing: order_type STOP_LIMIT / BRACKET, status OPEN while untriggered (ccxt's fetch_open_orders asks for
#   order_status=OPEN), trigger_status STOP_PENDING, then STOP_TRIGGERED; ccxt reads the stop-limit's
#   stop_price as `triggerPrice` but does not parse trigger_bracket_gtc at all (its price and amount come back
#   None: read `info.order_configuration`).
# - Refusals (preview_failure_reason): PREVIEW_STOP_PRICE_ABOVE_LAST_TRADE_PRICE for a STOP_DOWN stop at or
#   above the last trade (ccxt maps it to InvalidOrder), ..._BELOW_LAST_TRADE_PRICE for STOP_UP,
#   PREVIEW_STOP_PRICE_BELOW_LIMIT_PRICE / ..._ABOVE_LIMIT_PRICE, PREVIEW_STOP_TRIGGER_PRICE_OUT_OF_BOUNDS,
#   PREVIEW_BRACKET_LIMIT_PRICE_OUT_OF_BOUNDS, PREVIEW_INVALID_STOP_PRICE_PRECISION. The exact bounds behind the
#   last four are not published; the peer applies the natural ones below.
# - Exchange API: ccxt sends `stop_price` for stopPrice/triggerPrice and passes any other param through, so
#   {'stop': 'loss', 'stop_price': ...} with type 'limit' is a stop-limit. `loss` triggers when the last trade is
#   at or below stop_price, `entry` at or above. Untriggered stops list with status `active` (ccxt: open).
#
# What the peer does (the rules the tests rely on):
# - Accepts: sizes and prices on the increments, prices positive, stop_direction given and known, a STOP_DOWN
#   stop below the last trade and its limit at or below the stop (STOP_UP: above, and at or above), a bracket's
#   take profit above the last trade and its stop trigger below it (a buy bracket: the reverse), and a sell of no
#   more than the base the account holds beyond its other open protective sells (Coinbase holds the base).
# - A protective order never fills at creation (fill_plan is for market and limit orders only). An Exchange API
#   stop already crossed by the last trade is refused (what Coinbase does there is unconfirmed; refusing keeps a
#   test from mistaking an immediate fill for a resting stop).
# - `trade(product, price, size)` prints a trade: the last price moves, then each OPEN protective order of the
#   product, oldest first, is checked:
#   - untriggered, its stop crossed (STOP_DOWN: price <= stop; STOP_UP: price >= stop): it triggers and becomes a
#     limit at its limit (bracket: stop trigger -/+ 5%). If that limit is marketable at this print (a sell: price
#     >= limit; a buy: price <= limit) it fills now AT THE PRINT'S PRICE: a marketable limit takes the bids that
#     just traded, which are at or better than its limit (max(limit, price) for a sell); filling at the worse
#     limit would hide what a gap costs. Otherwise (the price gapped through the limit) it rests.
#   - a bracket's take-profit side, untriggered (a sell: price >= limit_price): fills AT ITS LIMIT, as a resting
#     limit lifted by the market does; the order is then FILLED and its stop is gone.
#   - triggered and resting, the print reaches its limit: fills AT ITS LIMIT (resting, so its own price).
#   Fills move the balances as `fill` does (taker fee on all of them: the peer has one fee rate). `size` bounds
#   the liquidity of the print across the orders it fills (None: enough for all).
# - Only protective orders react to prints: plain limit orders keep their fill_plan behaviour, so tests that
#   keep one open are unaffected by a market-data peer printing trades.
BRACKET_STOP_BAND = Decimal("0.05")
STOP_DOWN, STOP_UP = "STOP_DIRECTION_STOP_DOWN", "STOP_DIRECTION_STOP_UP"


class CoinbasePeer:
    def __init__(
        self,
        *,
        products: tuple[Product, ...] = DEFAULT_PRODUCTS,
        rate_limit_per_s: int | None = None,
        taker_fee: Decimal = Decimal("0.006"),  # noqa: B008 - Decimal is immutable
    ) -> None:
        self.products = {p.id: p for p in products}
        self.last_price: dict[str, Decimal] = {p.id: D(p.price) for p in products}  # moved by trade()
        self.rate_limit_per_s = rate_limit_per_s
        self.taker_fee = taker_fee
        self.clock_offset_s = 0.0
        # The time the peer's order book runs on (order creation, fills); None: its clock, `now()`. A test that
        # drives the market from the market-data peer passes that peer's (fast) clock, so fills happen at the
        # market's time; signatures and the server-time endpoints stay on `now()`, the machine's time.
        self.market_clock: Callable[[], datetime] | None = None
        self.accounts: dict[str, Account] = {}  # key id -> account
        self.product_status: dict[str, str] = {}  # product id -> set_status(); absent: online
        self.orders: list[PeerOrder] = []
        self.requests: list[RequestRecord] = []
        self.faults: list[Fault] = []
        self.fill_plan: list[Decimal] = [D(1)]  # fractions of the size filled right at creation
        # Coinbase Exchange "might return 404" for an order cancelled before any fill: on, it always does.
        self.exchange_forgets_unfilled_cancels = False
        self.hang_s = 0.0
        self._hang_next = 0
        self._windows: dict[str, deque[float]] = {}
        self._trade_seq = 1000
        self.rejected_auth: list[str] = []  # why each refused signature was refused
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.base_url = ""

    # -------------------------------------------------------------------------- set-up
    def _account(self, profile: str, api: str, key_id: str, portfolio: str | None, **kw: Any) -> Account:
        """A key's account; keys registered on one portfolio share its balances (one account's money)."""
        acct = Account(profile, api, key_id, portfolio=portfolio or f"portfolio-{profile}", **kw)
        same = next((a for a in self.accounts.values() if a.portfolio == acct.portfolio), None)
        if same is not None:
            acct.balances = same.balances
        self.accounts[key_id] = acct
        return acct

    def set_status(self, product: str, status: str) -> None:
        """Coinbase switches a product's trading: online, cancel_only, post_only, limit_only or disabled."""
        pid = product.replace("/", "-")
        if pid not in self.products:
            raise KeyError(f"no product {product!r} at the peer")
        if status not in ("online", "cancel_only", "post_only", "limit_only", "disabled"):
            raise ValueError(f"unknown trading status {status!r}")
        self.product_status[pid] = status

    def _status_fields(self, product_id: str) -> dict[str, Any]:
        """The status fields both products endpoints carry. Coinbase keeps status "online" for the *_only
        modes and says so in the flags; a disabled product is offline with trading_disabled."""
        st = self.product_status.get(product_id, "online")
        return {
            "status": "offline" if st == "disabled" else "online",
            "trading_disabled": st == "disabled",
            "cancel_only": st == "cancel_only",
            "limit_only": st == "limit_only",
            "post_only": st == "post_only",
        }

    def add_advanced_profile(
        self, profile: str, *, portfolio: str | None = None, can_transfer: bool = False
    ) -> AdvancedKeyMaterial:
        key = ec.generate_private_key(ec.SECP256R1())
        name = f"organizations/{uuid.uuid4()}/apiKeys/{uuid.uuid4()}"
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode()
        self._account(
            profile, "advanced", name, portfolio, public_key=key.public_key(), can_transfer=can_transfer
        )
        return AdvancedKeyMaterial(name, pem)

    def add_exchange_profile(
        self, profile: str, *, portfolio: str | None = None, can_transfer: bool = False
    ) -> ExchangeKeyMaterial:
        api_key = secrets.token_hex(16)
        secret = base64.b64encode(secrets.token_bytes(64)).decode()
        passphrase = secrets.token_urlsafe(12)
        self._account(
            profile,
            "exchange",
            api_key,
            portfolio,
            secret_b64=secret,
            passphrase=passphrase,
            can_transfer=can_transfer,
        )
        return ExchangeKeyMaterial(api_key, secret, passphrase)

    def account_of(self, profile: str) -> Account:
        return next(a for a in self.accounts.values() if a.profile == profile)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]  # the port the OS chose
        self.base_url = f"http://127.0.0.1:{port}"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()  # held answers end now instead of holding the shutdown
        if self._runner is not None:
            await self._runner.cleanup()

    # -------------------------------------------------------------------------- faults and fills
    def inject(
        self, method: str, path_regex: str, status: int, body: Any, *, times: int = 1, api: str | None = None
    ) -> None:
        self.faults.append(Fault(method.upper(), re.compile(path_regex), status, body, times, api))

    def hang_after_accept(self, seconds: float, *, times: int = 1) -> None:
        """The next `times` order creations are stored, then answered after `seconds` (the client times out)."""
        self.hang_s = seconds
        self._hang_next = times

    def fill(self, order: PeerOrder, size: Decimal | None = None, price: Decimal | None = None) -> PeerFill:
        left = order.size - order.filled
        qty = left if size is None else min(size, left)
        px = price if price is not None else (order.limit_price or self.last_price[order.product.id])
        self._trade_seq += 1
        f = PeerFill(
            fill_id=str(uuid.uuid4()),
            trade_id=self._trade_seq,
            order_id=order.order_id,
            size=qty,
            price=px,
            fee=(qty * px * self.taker_fee).quantize(D("0.00000001")),
            time=self.market_time(),
        )
        order.fills.append(f)
        if order.filled >= order.size:
            order.status = "FILLED"
        acct = self.account_of(order.profile)
        sign = 1 if order.side == "buy" else -1
        acct.balances[order.product.base] = acct.balances.get(order.product.base, D(0)) + sign * qty
        acct.balances[order.product.quote] = (
            acct.balances.get(order.product.quote, D(0)) - sign * qty * px - f.fee
        )
        return f

    async def _hold(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.hang_s)

    def cancel_on_site(self, order: PeerOrder) -> None:
        """The user cancels the order on Coinbase's website."""
        if order.status == "OPEN":
            order.status = "CANCELLED"

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.clock_offset_s)

    def market_time(self) -> datetime:
        """When an order is created or fills (see `market_clock`)."""
        return self.market_clock() if self.market_clock is not None else self.now()

    # -------------------------------------------------------------------------- market prints
    def product(self, product_id_or_symbol: str) -> Product:
        pid = product_id_or_symbol.replace("/", "-")
        if pid not in self.products:
            raise ValueError(
                f"unknown product {product_id_or_symbol!r}; the peer has {sorted(self.products)}"
            )
        return self.products[pid]

    def price(self, product_id_or_symbol: str) -> Decimal:
        """The product's last trade price: its listed price until the first `trade`."""
        return self.last_price[self.product(product_id_or_symbol).id]

    def trade(
        self, product_id_or_symbol: str, price: Decimal | str, size: Decimal | str | None = None
    ) -> list[PeerFill]:
        """A market trade print at `price`: resting protective orders it crosses trigger and fill (rules in the
        PROTECTIVE ORDERS block above). Returns the fills it made, in order."""
        prod = self.product(product_id_or_symbol)
        px = D(str(price))
        if not px.is_finite() or px <= 0:
            raise ValueError(f"trade price must be positive, got {price!r}")
        liquidity = D(str(size)) if size is not None else None
        if liquidity is not None and liquidity <= 0:
            raise ValueError(f"trade size must be positive, got {size!r}")
        self.last_price[prod.id] = px
        out: list[PeerFill] = []
        for o in [x for x in self.orders if x.product.id == prod.id and x.protective and x.status == "OPEN"]:
            if liquidity is not None and liquidity <= 0:
                break
            at = self._reaction(o, px)
            if at is None:
                continue
            f = self.fill(o, liquidity, at)
            out.append(f)
            if liquidity is not None:
                liquidity -= f.size
        return out

    def _reaction(self, o: PeerOrder, px: Decimal) -> Decimal | None:
        """The price `o` fills at on a print at `px`, or None; triggers `o` when the print crosses its stop."""
        assert o.stop_price is not None and o.limit_price is not None
        sell = o.side == "sell"
        if not o.triggered:
            if o.order_type == "bracket" and (px >= o.limit_price if sell else px <= o.limit_price):
                return o.limit_price  # the take-profit limit is lifted by the market: its own price
            crossed = px <= o.stop_price if o.stop_direction == STOP_DOWN else px >= o.stop_price
            if not crossed:
                return None
            if o.order_type == "bracket":
                band = 1 - BRACKET_STOP_BAND if sell else 1 + BRACKET_STOP_BAND
                inc = D(o.product.quote_increment)
                # Rounded away from the market (a sell down): the widened limit stays marketable at the stop.
                rounding = ROUND_FLOOR if sell else ROUND_CEILING
                o.triggered_limit = (o.stop_price * band / inc).to_integral_value(rounding=rounding) * inc
            else:
                o.triggered_limit = o.limit_price
            marketable = px >= o.triggered_limit if sell else px <= o.triggered_limit
            return px if marketable else None  # taker at the print, or it rests after a gap
        limit = o.triggered_limit
        assert limit is not None
        return limit if (px >= limit if sell else px <= limit) else None

    def orders_of(self, profile: str) -> list[PeerOrder]:
        return [o for o in self.orders if o.profile == profile]

    def max_rate(self, key_id: str, window_s: float = 1.0) -> int:
        """Most accepted private requests of one key within any window."""
        ts = sorted(r.t for r in self.requests if r.key_id == key_id and r.status != 429 and r.status < 500)
        best, j = 0, 0
        for i, t in enumerate(ts):
            while ts[j] <= t - window_s:
                j += 1
            best = max(best, i - j + 1)
        return best

    # -------------------------------------------------------------------------- dispatch
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        api = "advanced" if path.startswith(("/api/v3/", "/v2/")) else "exchange"
        body = await request.text()
        rec = RequestRecord(time.monotonic(), request.method, path, api, None, None, body=body)
        self.requests.append(rec)
        public = self._is_public(api, path)
        acct: Account | None = None
        if not public:
            acct, why = self._authenticate(api, request, body)
            if acct is None:
                self.rejected_auth.append(why)
                rec.status = 401 if "timestamp" not in why or api == "advanced" else 400
                if api == "advanced":
                    return web.Response(status=401, text="Unauthorized\n")
                return web.json_response({"message": why}, status=rec.status)
            rec.key_id, rec.profile = acct.key_id, acct.profile
            if self.rate_limit_per_s is not None and self._over_limit(acct.key_id):
                rec.status = 429
                if api == "advanced":
                    return web.json_response(
                        {
                            "error": "rate_limit_exceeded",
                            "error_details": "Too many requests",
                            "message": "Too many requests",
                        },
                        status=429,
                    )
                return web.json_response({"message": "Private rate limit exceeded"}, status=429)
        for fault in self.faults:
            if (
                fault.times > 0
                and fault.method in (request.method, "*")
                and fault.path.search(path)
                and fault.api in (None, api)
            ):
                fault.times -= 1
                rec.status = fault.status
                if isinstance(fault.body, str):
                    return web.Response(status=fault.status, text=fault.body)
                return web.json_response(fault.body, status=fault.status)
        try:
            if api == "advanced":
                resp = await self._advanced(request, path, body, acct)
            else:
                resp = await self._exchange(request, path, body, acct)
        except _Http as h:
            resp = web.json_response(h.body, status=h.status)
        rec.status = resp.status
        return resp

    @staticmethod
    def _is_public(api: str, path: str) -> bool:
        if api == "advanced":
            return path.startswith(
                ("/v2/currencies", "/v2/exchange-rates", "/v2/time", "/api/v3/brokerage/market/")
            ) or (path == "/api/v3/brokerage/time")
        return path in ("/products", "/currencies", "/time") or path.startswith("/products/")

    def _over_limit(self, key_id: str) -> bool:
        w = self._windows.setdefault(key_id, deque())
        now = time.monotonic()
        while w and w[0] <= now - 1.0:
            w.popleft()
        if len(w) >= (self.rate_limit_per_s or 0):
            return True
        w.append(now)
        return False

    # -------------------------------------------------------------------------- authentication
    def _authenticate(self, api: str, request: web.Request, body: str) -> tuple[Account | None, str]:
        now = self.now().timestamp()
        if api == "advanced":
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return None, "no bearer token"
            token = auth[len("Bearer ") :]
            try:
                h64, p64, s64 = token.split(".")
                header = json.loads(_b64url_dec(h64))
                claims = json.loads(_b64url_dec(p64))
                sig = _b64url_dec(s64)
            except (ValueError, json.JSONDecodeError):
                return None, "malformed JWT"
            if header.get("alg") != "ES256":
                return None, f"alg {header.get('alg')!r} is not ES256"
            acct = self.accounts.get(str(header.get("kid")))
            if acct is None or acct.api != "advanced" or acct.public_key is None:
                return None, "unknown key name (kid)"
            if len(sig) != 64:
                return None, "ES256 signature is not 64 bytes"
            der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
            try:
                acct.public_key.verify(der, f"{h64}.{p64}".encode(), ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                return None, f"signature does not verify with the key of profile {acct.profile}"
            expected_uri = f"{request.method} {str(request.url).split('?')[0].replace('https://', '')}"
            if claims.get("sub") != acct.key_id or claims.get("iss") != "coinbase-cloud":
                return None, "sub/iss claims do not match the key"
            if "retail_rest_api_proxy" not in (claims.get("aud") or []):
                return None, "aud claim lacks retail_rest_api_proxy"
            if claims.get("uri") != expected_uri:
                return None, f"uri claim {claims.get('uri')!r} is not {expected_uri!r}"
            if not (float(claims.get("nbf", 0)) - 5 <= now <= float(claims.get("exp", 0))):
                return None, "token outside its validity window (request timestamp expired: clock skew?)"
            return acct, ""
        key = request.headers.get("CB-ACCESS-KEY", "")
        acct = self.accounts.get(key)
        if acct is None or acct.api != "exchange":
            return None, "Invalid API Key"
        if not hmac.compare_digest(request.headers.get("CB-ACCESS-PASSPHRASE", ""), acct.passphrase):
            return None, "Invalid Passphrase"
        ts = request.headers.get("CB-ACCESS-TIMESTAMP", "")
        try:
            ts_f = float(ts)
        except ValueError:
            return None, "invalid timestamp"
        if abs(now - ts_f) > 30:
            return None, "request timestamp expired"
        prehash = f"{ts}{request.method}{request.raw_path}{body}".encode()
        expected = base64.b64encode(
            hmac.new(base64.b64decode(acct.secret_b64), prehash, hashlib.sha256).digest()
        ).decode()
        if not hmac.compare_digest(expected, request.headers.get("CB-ACCESS-SIGN", "")):
            return None, "invalid signature"
        return acct, ""

    # -------------------------------------------------------------------------- Advanced Trade
    def _adv_order(self, o: PeerOrder) -> dict[str, Any]:
        filled = o.filled
        cfg: dict[str, Any]
        if o.order_type == "stop_limit":
            cfg = {
                "stop_limit_stop_limit_gtc": {
                    "base_size": str(o.size),
                    "limit_price": str(o.limit_price),
                    "stop_price": str(o.stop_price),
                    "stop_direction": o.stop_direction,
                    "reduce_only": False,
                }
            }
        elif o.order_type == "bracket":
            cfg = {
                "trigger_bracket_gtc": {
                    "base_size": str(o.size),
                    "limit_price": str(o.limit_price),
                    "stop_trigger_price": str(o.stop_price),
                }
            }
        elif o.limit_price is not None:
            cfg = {
                "limit_limit_gtc": {
                    "base_size": str(o.size),
                    "limit_price": str(o.limit_price),
                    "post_only": False,
                }
            }
        else:
            cfg = {"market_market_ioc": {"base_size": str(o.size)}}
        order_type = {"stop_limit": "STOP_LIMIT", "bracket": "BRACKET", "limit": "LIMIT"}.get(
            o.order_type, "MARKET"
        )
        trigger = (
            ("STOP_TRIGGERED" if o.triggered else "STOP_PENDING") if o.protective else "INVALID_ORDER_TYPE"
        )
        return {
            "order_id": o.order_id,
            "product_id": o.product.id,
            "user_id": "peer-user",
            "order_configuration": cfg,
            "side": o.side.upper(),
            "client_order_id": o.client_id,
            "status": o.status,
            "time_in_force": "GOOD_UNTIL_CANCELLED",
            "created_time": _iso(o.created),
            "completion_percentage": str((filled / o.size * 100).quantize(D("0.01"))),
            "filled_size": str(filled),
            "average_filled_price": str(o.avg_price),
            "number_of_fills": str(len(o.fills)),
            "filled_value": str(filled * o.avg_price),
            "pending_cancel": False,
            "size_in_quote": False,
            "total_fees": str(o.fees),
            "order_type": order_type,
            "trigger_status": trigger,
            "reject_reason": "",
            "settled": o.status != "OPEN",
            "product_type": "SPOT",
        }

    def _adv_fill(self, o: PeerOrder, f: PeerFill) -> dict[str, Any]:
        return {
            "entry_id": f.fill_id,
            "trade_id": str(f.trade_id),
            "order_id": o.order_id,
            "trade_time": _iso(f.time),
            "trade_type": "FILL",
            "price": str(f.price),
            "size": str(f.size),
            "commission": str(f.fee),
            "product_id": o.product.id,
            "sequence_timestamp": _iso(f.time),
            "liquidity_indicator": "TAKER",
            "size_in_quote": False,
            "user_id": "peer-user",
            "side": o.side.upper(),
        }

    async def _advanced(
        self, request: web.Request, path: str, body: str, acct: Account | None
    ) -> web.StreamResponse:
        m, q = request.method, request.query
        if path == "/v2/currencies":
            return web.json_response({"data": [{"id": "USD", "name": "US Dollar", "min_size": "0.01"}]})
        if path == "/v2/currencies/crypto":
            codes = sorted(
                {p.base for p in self.products.values()} | {p.quote for p in self.products.values()}
            )
            data = [
                {
                    "asset_id": str(uuid.uuid5(uuid.NAMESPACE_DNS, c)),
                    "code": c,
                    "name": c,
                    "exponent": 8,
                    "type": "crypto",
                }
                for c in codes
            ]
            return web.json_response({"data": data})
        if path == "/v2/exchange-rates":
            return web.json_response(
                {"data": {"currency": "USD", "rates": {p.base: "1" for p in self.products.values()}}}
            )
        if path == "/v2/time":
            n = self.now()
            return web.json_response({"data": {"iso": _iso(n), "epoch": int(n.timestamp())}})
        if path == "/api/v3/brokerage/time":
            n = self.now()
            return web.json_response(
                {
                    "iso": _iso(n),
                    "epochSeconds": str(int(n.timestamp())),
                    "epochMillis": str(int(n.timestamp() * 1000)),
                }
            )
        if path == "/api/v3/brokerage/market/products":
            if q.get("product_type", "SPOT") != "SPOT":
                return web.json_response({"products": [], "num_products": 0})
            prods = [
                {
                    "product_id": p.id,
                    "price": p.price,
                    "base_increment": p.base_increment,
                    "quote_increment": p.quote_increment,
                    "price_increment": p.quote_increment,
                    "quote_min_size": p.quote_min_size,
                    "quote_max_size": "10000000",
                    "base_min_size": p.base_min_size,
                    "base_max_size": "10000",
                    "base_name": p.base,
                    "quote_name": p.quote,
                    **self._status_fields(p.id),
                    "is_disabled": False,
                    "product_type": "SPOT",
                    "base_currency_id": p.base,
                    "quote_currency_id": p.quote,
                    "display_name": p.id,
                    "alias_to": [],
                }
                for p in self.products.values()
            ]
            return web.json_response({"products": prods, "num_products": len(prods)})
        assert acct is not None
        if path == "/api/v3/brokerage/transaction_summary":
            fee = {
                "pricing_tier": "Advanced 1",
                "taker_fee_rate": str(self.taker_fee),
                "maker_fee_rate": "0.004",
            }
            return web.json_response({"total_volume": 0, "total_fees": 0, "fee_tier": fee})
        if path == "/api/v3/brokerage/key_permissions":
            return web.json_response(
                {
                    "can_view": True,
                    "can_trade": acct.can_trade,
                    "can_transfer": acct.can_transfer,
                    "portfolio_uuid": acct.portfolio,
                    "portfolio_type": "DEFAULT",
                }
            )
        if path == "/api/v3/brokerage/accounts":
            accounts = [
                {
                    "uuid": str(uuid.uuid5(uuid.NAMESPACE_DNS, acct.key_id + c)),
                    "name": f"{c} Wallet",
                    "currency": c,
                    "available_balance": {"value": str(v), "currency": c},
                    "hold": {"value": "0", "currency": c},
                    "type": "ACCOUNT_TYPE_CRYPTO",
                    "active": True,
                }
                for c, v in sorted(acct.balances.items())
            ]
            return web.json_response(
                {"accounts": accounts, "has_next": False, "cursor": "", "size": len(accounts)}
            )
        if path == "/api/v3/brokerage/orders" and m == "POST":
            return await self._adv_create(acct, json.loads(body or "{}"))
        if path == "/api/v3/brokerage/orders/historical/batch":
            mine = [o for o in self.orders if o.signed_by == acct.key_id]
            statuses = q.getall("order_status", [])
            if statuses:
                mine = [o for o in mine if o.status in statuses]
            pids = q.getall("product_id", []) + q.getall("product_ids", [])
            if pids:
                mine = [o for o in mine if o.product.id in pids]
            if "start_date" in q:
                start = _parse_iso(q["start_date"])
                mine = [o for o in mine if o.created >= start]
            mine.sort(key=lambda o: o.created, reverse=True)
            limit, offset = int(q.get("limit", "100")), int(q.get("cursor") or 0)
            page = mine[offset : offset + limit]
            more = offset + limit < len(mine)
            return web.json_response(
                {
                    "orders": [self._adv_order(o) for o in page],
                    "sequence": "0",
                    "has_next": more,
                    "cursor": str(offset + limit) if more else "",
                }
            )
        if path == "/api/v3/brokerage/orders/historical/fills":
            ids = set(q.getall("order_ids", []) + q.getall("order_id", []))
            out = []
            for o in self.orders:
                if o.signed_by != acct.key_id or (ids and o.order_id not in ids):
                    continue
                if "product_id" in q and o.product.id != q["product_id"]:
                    continue
                for f in o.fills:
                    if "start_sequence_timestamp" in q and f.time < _parse_iso(q["start_sequence_timestamp"]):
                        continue
                    out.append(self._adv_fill(o, f))
            return web.json_response({"fills": out, "cursor": ""})
        mo = re.fullmatch(r"/api/v3/brokerage/orders/historical/([^/]+)", path)
        if mo and m == "GET":
            found = self._find(acct, mo.group(1))
            if found is None:
                msg = "order with this orderID was not found"
                raise _Http(404, {"error": "NOT_FOUND", "error_details": msg, "message": msg})
            return web.json_response({"order": self._adv_order(found)})
        if path == "/api/v3/brokerage/orders/batch_cancel" and m == "POST":
            results = []
            for oid in json.loads(body or "{}").get("order_ids", []):
                target = self._find(acct, oid)
                if target is None or target.status != "OPEN":
                    reason = "UNKNOWN_CANCEL_ORDER" if target is None else "INVALID_CANCEL_REQUEST"
                    results.append({"success": False, "failure_reason": reason, "order_id": oid})
                else:
                    target.status = "CANCELLED"
                    results.append(
                        {"success": True, "failure_reason": "UNKNOWN_CANCEL_FAILURE_REASON", "order_id": oid}
                    )
            return web.json_response({"results": results})
        raise _Http(
            404,
            {
                "error": "NOT_FOUND",
                "error_details": f"no route {m} {path}",
                "message": f"no route {m} {path}",
            },
        )

    def _find(self, acct: Account, order_id: str) -> PeerOrder | None:
        return next((o for o in self.orders if o.order_id == order_id and o.signed_by == acct.key_id), None)

    async def _adv_create(self, acct: Account, req: dict[str, Any]) -> web.StreamResponse:
        coid = str(req.get("client_order_id", ""))
        # Coinbase: a non-unique client_order_id creates nothing and returns the existing order.
        existing = next((o for o in self.orders if o.signed_by == acct.key_id and o.client_id == coid), None)
        if existing is not None:
            return web.json_response(self._adv_success(existing))
        if not acct.can_trade:
            raise _Http(
                403,
                {
                    "error": "PERMISSION_DENIED",
                    "error_details": "Missing required scopes",
                    "message": "Missing required scopes",
                },
            )
        prod = self.products.get(str(req.get("product_id")))
        if prod is None:
            return self._adv_failure("INVALID_PRODUCT_ID", "Product not found")
        cfg = req.get("order_configuration") or {}
        side = str(req.get("side", "")).lower()
        stop: Decimal | None = None
        direction, kind = "", ""
        try:
            if "limit_limit_gtc" in cfg:
                size, price = D(cfg["limit_limit_gtc"]["base_size"]), D(cfg["limit_limit_gtc"]["limit_price"])
            elif "market_market_ioc" in cfg and "base_size" in cfg["market_market_ioc"]:
                size, price = D(cfg["market_market_ioc"]["base_size"]), None
            elif "stop_limit_stop_limit_gtc" in cfg:
                c = cfg["stop_limit_stop_limit_gtc"]
                size, price, stop = D(c["base_size"]), D(c["limit_price"]), D(c["stop_price"])
                direction, kind = str(c.get("stop_direction", "")), "stop_limit"
            elif "trigger_bracket_gtc" in cfg:
                c = cfg["trigger_bracket_gtc"]
                size, price, stop = D(c["base_size"]), D(c["limit_price"]), D(c["stop_trigger_price"])
                kind = "bracket"
                # The stop side of a sell bracket is below the market: it acts as a STOP_DOWN trigger.
                direction = STOP_DOWN if side == "sell" else STOP_UP
            else:
                return self._adv_failure("UNSUPPORTED_ORDER_CONFIGURATION", "unsupported order configuration")
        except (KeyError, TypeError, InvalidOperation) as exc:
            return self._adv_failure("INVALID_ARGUMENT", f"order_configuration {cfg!r} is malformed: {exc!r}")
        if not _multiple(size, D(prod.base_increment)):
            return self._adv_failure("INVALID_SIZE_PRECISION", f"Invalid order size precision: {size}")
        if size < D(prod.base_min_size):
            return self._adv_failure("INVALID_LIMIT_ORDER_SIZE", f"Order size {size} below minimum")
        if price is not None and (price <= 0 or not _multiple(price, D(prod.quote_increment))):
            return self._adv_failure("INVALID_PRICE_PRECISION", f"Invalid limit price {price}")
        if kind:
            assert price is not None and stop is not None
            refused = self._adv_protective_refusal(acct, prod, side, kind, size, price, stop, direction)
            if refused is not None:
                return self._adv_failure(*refused)
        px = price if price is not None else self.last_price[prod.id]
        if side == "buy" and size * px * (1 + self.taker_fee) > acct.balances.get(prod.quote, D(0)):
            return self._adv_failure("INSUFFICIENT_FUND", "Insufficient balance in source account")
        o = self._store(
            acct, "advanced", coid, prod, side, size, price, kind=kind, stop=stop, direction=direction
        )
        if self._hang_next > 0:
            self._hang_next -= 1
            await self._hold()  # accepted, answered too late: the client has timed out by now
        return web.json_response(self._adv_success(o))

    def _adv_protective_refusal(
        self,
        acct: Account,
        prod: Product,
        side: str,
        kind: str,
        size: Decimal,
        limit: Decimal,
        stop: Decimal,
        direction: str,
    ) -> tuple[str, str] | None:
        """Why Coinbase would refuse this stop-limit or bracket (error, message), or None. Names as Coinbase's
        preview_failure_reason (without PREVIEW_); each message carries the offending value."""
        last = self.last_price[prod.id]
        if stop <= 0 or not _multiple(stop, D(prod.quote_increment)):
            return (
                "INVALID_STOP_PRICE_PRECISION",
                f"stop price {stop} is not a positive multiple of the increment",
            )
        if direction not in (STOP_DOWN, STOP_UP):
            return "INVALID_ARGUMENT", f"stop_direction {direction!r} is not {STOP_DOWN} or {STOP_UP}"
        if kind == "stop_limit":
            if direction == STOP_DOWN and stop >= last:
                return "STOP_PRICE_ABOVE_LAST_TRADE_PRICE", f"stop {stop} is not below the last trade {last}"
            if direction == STOP_UP and stop <= last:
                return "STOP_PRICE_BELOW_LAST_TRADE_PRICE", f"stop {stop} is not above the last trade {last}"
            if direction == STOP_DOWN and limit > stop:
                return "STOP_PRICE_BELOW_LIMIT_PRICE", f"stop {stop} is below the limit {limit}"
            if direction == STOP_UP and limit < stop:
                return "STOP_PRICE_ABOVE_LIMIT_PRICE", f"stop {stop} is above the limit {limit}"
        else:  # bracket: take profit on the far side of the market from the stop
            tp_ok = limit > last if side == "sell" else limit < last
            stop_ok = stop < last if side == "sell" else stop > last
            if not tp_ok:
                return "BRACKET_LIMIT_PRICE_OUT_OF_BOUNDS", f"take profit {limit} vs the last trade {last}"
            if not stop_ok:
                return "STOP_TRIGGER_PRICE_OUT_OF_BOUNDS", f"stop trigger {stop} vs the last trade {last}"
        if side == "sell":
            held = self._held(acct, prod)
            available = acct.balances.get(prod.base, D(0)) - held
            if size > available:
                return "INSUFFICIENT_FUND", f"size {size} {prod.base} exceeds the available {available}"
        return None

    def _held(self, acct: Account, prod: Product) -> Decimal:
        """Base the account's open protective sells hold: Coinbase holds it, so it backs no other sell."""
        return sum(
            (
                o.size - o.filled
                for o in self.orders
                if o.signed_by == acct.key_id
                and o.protective
                and o.status == "OPEN"
                and o.side == "sell"
                and o.product.base == prod.base
            ),
            D(0),
        )

    @staticmethod
    def _adv_success(o: PeerOrder) -> dict[str, Any]:
        return {
            "success": True,
            "failure_reason": "UNKNOWN_FAILURE_REASON",
            "order_id": o.order_id,
            "success_response": {
                "order_id": o.order_id,
                "product_id": o.product.id,
                "side": o.side.upper(),
                "client_order_id": o.client_id,
            },
        }

    @staticmethod
    def _adv_failure(error: str, message: str) -> web.StreamResponse:
        return web.json_response(
            {
                "success": False,
                "failure_reason": "UNKNOWN_FAILURE_REASON",
                "order_id": "",
                # Coinbase fills preview_failure_reason too; ccxt's error handler reads that field first.
                "error_response": {
                    "error": error,
                    "message": message,
                    "error_details": message,
                    "preview_failure_reason": f"PREVIEW_{error}",
                },
            }
        )

    def _store(
        self,
        acct: Account,
        api: str,
        coid: str,
        prod: Product,
        side: str,
        size: Decimal,
        price: Decimal | None,
        *,
        kind: str = "",
        stop: Decimal | None = None,
        direction: str = "",
    ) -> PeerOrder:
        o = PeerOrder(
            str(uuid.uuid4()),
            coid,
            api,
            acct.profile,
            acct.key_id,
            prod,
            side,
            size,
            price,
            self.market_time(),
        )
        o.order_type = kind or ("limit" if price is not None else "market")
        o.stop_price, o.stop_direction = stop, direction
        self.orders.append(o)
        if o.protective:
            return o  # rests until a trade print crosses it
        for frac in self.fill_plan:
            if o.status != "OPEN":
                break
            self.fill(o, (size * frac).quantize(D(prod.base_increment)))
        return o

    # -------------------------------------------------------------------------- Exchange API
    def _ex_order(self, o: PeerOrder) -> dict[str, Any]:
        done = o.status != "OPEN"
        d: dict[str, Any] = {
            "id": o.order_id,
            "price": str(o.limit_price) if o.limit_price is not None else None,
            "size": str(o.size),
            "product_id": o.product.id,
            "profile_id": f"profile-{o.profile}",
            "side": o.side,
            "type": "limit" if o.limit_price is not None else "market",
            "time_in_force": "GTC",
            "post_only": False,
            "created_at": _iso(o.created),
            "fill_fees": str(o.fees),
            "filled_size": str(o.filled),
            "executed_value": str(o.filled * o.avg_price),
            "status": "done" if done else "open",
            "settled": done,
            "client_oid": o.client_id,
        }
        if o.protective:
            d["stop"] = "loss" if o.stop_direction == STOP_DOWN else "entry"
            d["stop_price"] = str(o.stop_price)
            if not done and not o.triggered:
                d["status"] = "active"  # an untriggered stop is "active" on the Exchange API (ccxt: open)
        if done:
            d["done_reason"] = "filled" if o.status == "FILLED" else "canceled"
            d["done_at"] = _iso(o.created)
        return d

    def _ex_fill(self, o: PeerOrder, f: PeerFill) -> dict[str, Any]:
        return {
            "created_at": _iso(f.time),
            "trade_id": f.trade_id,
            "product_id": o.product.id,
            "order_id": o.order_id,
            "user_id": "peer-user",
            "profile_id": f"profile-{o.profile}",
            "liquidity": "T",
            "price": str(f.price),
            "size": str(f.size),
            "fee": str(f.fee),
            "side": o.side,
            "settled": True,
            "usd_volume": str(f.size * f.price),
        }

    async def _exchange(
        self, request: web.Request, path: str, body: str, acct: Account | None
    ) -> web.StreamResponse:
        m, q = request.method, request.query
        if path == "/time":
            n = self.now()
            return web.json_response({"iso": _iso(n), "epoch": n.timestamp()})
        if path == "/currencies":
            codes = sorted(
                {p.base for p in self.products.values()} | {p.quote for p in self.products.values()}
            )
            return web.json_response(
                [
                    {
                        "id": c,
                        "name": c,
                        "min_size": "0.00000001",
                        "status": "online",
                        "message": "",
                        "max_precision": "0.00000001",
                        "details": {"type": "crypto"},
                    }
                    for c in codes
                ]
            )
        if path == "/products":
            return web.json_response(
                [
                    {
                        "id": p.id,
                        "base_currency": p.base,
                        "quote_currency": p.quote,
                        "quote_increment": p.quote_increment,
                        "base_increment": p.base_increment,
                        "display_name": p.id,
                        "min_market_funds": p.quote_min_size,
                        "margin_enabled": False,
                        **self._status_fields(p.id),
                        "status_message": "",
                    }
                    for p in self.products.values()
                ]
            )
        assert acct is not None
        if path == "/accounts":
            return web.json_response(
                [
                    {
                        "id": str(uuid.uuid5(uuid.NAMESPACE_DNS, acct.key_id + c)),
                        "currency": c,
                        "balance": str(v),
                        "hold": "0",
                        "available": str(v),
                        "profile_id": acct.portfolio,
                        "trading_enabled": True,
                    }
                    for c, v in sorted(acct.balances.items())
                ]
            )
        if path == "/orders" and m == "POST":
            return await self._ex_create(acct, json.loads(body or "{}"))
        if path == "/orders" and m == "GET":
            status = q.getall("status", ["open", "pending", "active"])
            mine = [o for o in self.orders if o.signed_by == acct.key_id and not self._forgotten(o)]
            if "all" not in status:
                want_open = bool({"open", "pending", "active"} & set(status))
                want_done = "done" in status
                mine = [
                    o
                    for o in mine
                    if (o.status == "OPEN" and want_open) or (o.status != "OPEN" and want_done)
                ]
            if "product_id" in q:
                mine = [o for o in mine if o.product.id == q["product_id"]]
            # As Coinbase Exchange: start_date / end_date bound created_at, newest first, `limit` (default 100,
            # at most 1000) orders a page. There is no client_oid filter on this listing.
            try:
                if "start_date" in q:
                    start = _parse_iso(q["start_date"])
                    mine = [o for o in mine if o.created >= start]
                if "end_date" in q:
                    end = _parse_iso(q["end_date"])
                    mine = [o for o in mine if o.created <= end]
                limit = int(q.get("limit", "100"))
            except ValueError:
                raise _Http(
                    400, {"message": f"Invalid start_date, end_date or limit in {dict(q)!r}"}
                ) from None
            if not 1 <= limit <= 1000:
                raise _Http(400, {"message": f"limit must be between 1 and 1000, got {limit}"})
            newest = sorted(mine, key=lambda o: o.created, reverse=True)[:limit]
            return web.json_response([self._ex_order(o) for o in newest])
        mo = re.fullmatch(r"/orders/(client:)?([^/]+)", path)
        if mo:
            by_client, ident = mo.group(1) is not None, mo.group(2)
            mine = [o for o in self.orders if o.signed_by == acct.key_id]
            o = next((x for x in mine if (x.client_id if by_client else x.order_id) == ident), None)
            if o is None or self._forgotten(o):
                raise _Http(404, {"message": "NotFound"})
            if m == "GET":
                return web.json_response(self._ex_order(o))
            if m == "DELETE":
                if o.status != "OPEN":
                    raise _Http(400, {"message": "Order already done"})
                o.status = "CANCELLED"
                return web.json_response(o.order_id)
        if path == "/fills":
            out: list[dict[str, Any]] = []
            for o in self.orders:
                if o.signed_by != acct.key_id:
                    continue
                if "order_id" in q and o.order_id != q["order_id"]:
                    continue
                if "product_id" in q and o.product.id != q["product_id"]:
                    continue
                out.extend(self._ex_fill(o, f) for f in o.fills)
            if "order_id" not in q and "product_id" not in q:
                raise _Http(400, {"message": "product_id or order_id is required"})
            return web.json_response(out)
        raise _Http(404, {"message": "NotFound"})

    def _forgotten(self, o: PeerOrder) -> bool:
        """An Exchange order cancelled before any fill, when the peer forgets those: gone from every answer."""
        return self.exchange_forgets_unfilled_cancels and o.status == "CANCELLED" and not o.fills

    async def _ex_create(self, acct: Account, req: dict[str, Any]) -> web.StreamResponse:
        if not acct.can_trade:
            raise _Http(403, {"message": "Forbidden"})
        coid = str(req.get("client_oid", ""))
        try:
            uuid.UUID(coid)
        except ValueError:
            raise _Http(400, {"message": "Invalid client_oid"}) from None
        prod = self.products.get(str(req.get("product_id")))
        if prod is None:
            raise _Http(400, {"message": "Product not found"})
        side = str(req.get("side"))
        try:
            size = D(str(req.get("size", "0")))
            price = D(str(req["price"])) if req.get("type") == "limit" else None
            stop = D(str(req["stop_price"])) if "stop_price" in req else None
        except (KeyError, InvalidOperation):
            raise _Http(400, {"message": f"Invalid size, price or stop_price in {req!r}"}) from None
        if not _multiple(size, D(prod.base_increment)):
            raise _Http(400, {"message": "size too precise"})
        if price is not None and (price <= 0 or not _multiple(price, D(prod.quote_increment))):
            raise _Http(400, {"message": f"price {price} is not a positive multiple of the increment"})
        kind, direction = "", ""
        if "stop" in req or stop is not None:
            direction = {"loss": STOP_DOWN, "entry": STOP_UP}.get(str(req.get("stop")), "")
            last = self.last_price[prod.id]
            if not direction or stop is None or price is None:
                raise _Http(
                    400, {"message": f"a stop order needs stop loss|entry, stop_price and a limit: {req!r}"}
                )
            if stop <= 0 or not _multiple(stop, D(prod.quote_increment)):
                raise _Http(
                    400, {"message": f"stop_price {stop} is not a positive multiple of the increment"}
                )
            # Unconfirmed how Coinbase treats a stop already crossed; the peer refuses it, so that a test never
            # mistakes an immediate fill for a resting stop.
            if (direction == STOP_DOWN and stop >= last) or (direction == STOP_UP and stop <= last):
                raise _Http(
                    400, {"message": f"stop_price {stop} is already crossed by the last trade {last}"}
                )
            if side == "sell":
                held = self._held(acct, prod)
                if size > acct.balances.get(prod.base, D(0)) - held:
                    raise _Http(400, {"message": "Insufficient funds"})
            kind = "stop_limit"
        px = price if price is not None else self.last_price[prod.id]
        if size * px < D(prod.quote_min_size):
            raise _Http(400, {"message": f"size is too small. Minimum funds is {prod.quote_min_size}"})
        if side == "buy" and size * px * (1 + self.taker_fee) > acct.balances.get(prod.quote, D(0)):
            raise _Http(400, {"message": "Insufficient funds"})
        # No de-duplication of client_oid here: Coinbase Exchange does not enforce its uniqueness.
        o = self._store(
            acct, "exchange", coid, prod, side, size, price, kind=kind, stop=stop, direction=direction
        )
        if self._hang_next > 0:
            self._hang_next -= 1
            await self._hold()
        return web.json_response(self._ex_order(o))


class _Http(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
