"""A local Coinbase Advanced Trade *market-data* peer for tests: an aiohttp server on 127.0.0.1 that serves
public REST candles, server time and the market-data websocket (`heartbeats`, `market_trades`) from a
deterministic tape driven by a fast peer clock, with faults on demand.

Faithful (shapes copied from /work/shared/notes/coinbase-market-data.md):
- REST `GET /api/v3/brokerage/market/products/{id}/candles?start&end&granularity` -> `{"candles":[...]}`, all
  values strings, newest first, the bucket in progress included (aggregate of its trades so far), buckets without
  trades and future buckets left out, more than 300 buckets -> 400 `INVALID_ARGUMENT`; `GET /api/v3/brokerage/time`
  -> `{"iso","epochSeconds","epochMillis"}` (strings).
- Websocket `/ws`: one subscribe per channel, a `subscriptions` answer listing the current subscriptions,
  `{"type":"error","message":"failure to subscribe"}` for a bad subscribe, no subscribe within 5 s -> closed,
  heartbeats once a real second with Coinbase's Go-style `current_time` and an increasing `heartbeat_counter`,
  `market_trades` snapshot (up to 50 trades per product, newest first) then updates, every message with
  `channel`, `timestamp`, `sequence_num` (one counter per connection across channels, from 0) and `events`.
  `-USDC` products are answered as `-USD` on the websocket; REST accepts both. A re-subscribe repeats the
  snapshot's trades (clients must de-duplicate by `trade_id`).

Simplified (document for whoever reads a failing test):
- Prices come from real hourly candles (`data/market`, Binance USDT pairs as a proxy) replayed one row per peer
  bucket: bucket k serves row (k - k0) mod N, k0 = the bucket of the clock's start; trades inside a bucket are
  synthesised (4-9 per bucket, seeded by seed+product+bucket) so that they aggregate exactly to that row.
  `trade_id` = bucket index * 100 + i: unique and increasing per product, not contiguous.
- Candle selection: buckets whose start s satisfies `start <= s <= end`; `(end - start) / granularity > 300`
  -> 400. Granularities that are a multiple of the peer's base bucket are aggregated (epoch-aligned, ONE_DAY at
  00:00 UTC); a granularity finer than, or not a multiple of, the base bucket -> 400.
- A late bucket (`late_bucket`, `rest_lag_s`) is left out of REST answers (even while it is in progress) until
  peer time >= bucket end + delay; then it appears with its final values.
- Websocket updates list their trades newest first, like the snapshot (one `update` message per product per
  ticker step). During `silence` nothing is sent (no pongs either, unless asked) and the trades of that time are
  not sent later: they are lost, as on a stalled stream; REST still has them.
- Only `heartbeats` and `market_trades` exist; no `candles`/`level2`/`ticker`, no idle-channel close after 60-90 s,
  no per-IP connection or message limits on the websocket; `jwt` is ignored. Error bodies are Coinbase-like,
  not byte-exact. `heartbeat_counter` counts per connection once a second, also while heartbeats are stopped.

Faults (methods, and `POST /_peer/fault {"kind": <name>, ...args}` for a peer in a subprocess): `close(code)`,
`abort()`, `silence(seconds)`, `stop_heartbeats(seconds)`, `sequence_jump(k)`, `outage(seconds)`,
`set_speed(speed)`, `rest_429(n, retry_after_s)`, `late_bucket(product, bucket_start_s, delay_s)`,
`set_rest_lag(seconds)`, `set_rate_limit(per_s)`, `shock(product, price, buckets)` (from the next bucket on, the
product trades at that one price: a crash through a stop). `GET /_peer/stats` returns the counters.

CLI: `python -m tests.peer.coinbase_md_peer --port P --speed X --start ISO --granularity 60 --products BTC-USD,...
[--data data/market] [--quiet-every PRODUCT=N]...` prints `ready http://127.0.0.1:P ws://127.0.0.1:P/ws` and runs
until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import WSMsgType, web

from shared.candles import CandleRow, load_products

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "market"

GRANULARITIES: dict[str, int] = {
    "ONE_MINUTE": 60,
    "FIVE_MINUTE": 300,
    "FIFTEEN_MINUTE": 900,
    "THIRTY_MINUTE": 1800,
    "ONE_HOUR": 3600,
    "TWO_HOUR": 7200,
    "SIX_HOUR": 21600,
    "ONE_DAY": 86400,
}
MAX_CANDLES = 300
SNAPSHOT_TRADES = 50
HISTORY_BUCKETS = 1000  # how far back a snapshot looks for trades (quiet products)
CHANNELS = ("heartbeats", "market_trades")
_NS = 1_000_000_000
_US = 1_000_000
_EIGHT = Decimal("1e-8")


# ------------------------------------------------------------------------------------------------ time
class PeerClock:
    """Exchange time = start + (monotonic elapsed) * speed; `set_speed` keeps it continuous."""

    def __init__(
        self, start: datetime, speed: float = 1.0, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self._mono = monotonic
        self._born = monotonic()
        self._base_ns = _datetime_ns(start)
        self._base_mono = self._born
        self.speed = float(speed)

    def set_speed(self, speed: float) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        now = self._mono()
        self._base_ns = self._ns_at(now)
        self._base_mono = now
        self.speed = float(speed)

    def _ns_at(self, mono: float) -> int:
        return self._base_ns + round((mono - self._base_mono) * self.speed * _NS)

    def now_ns(self) -> int:
        return self._ns_at(self._mono())

    def now_us(self) -> int:
        return self.now_ns() // 1000

    def now_s(self) -> float:
        return self.now_ns() / _NS

    def now(self) -> datetime:
        us = self.now_us()
        return datetime.fromtimestamp(us // _US, UTC).replace(microsecond=us % _US)

    def uptime_s(self) -> float:
        """Real seconds since the clock was made (Go's `m=+` monotonic reading in heartbeats)."""
        return self._mono() - self._born

    def real_seconds_until(self, peer_s: float) -> float:
        return max(0.0, (peer_s - self.now_s()) / self.speed)


def _datetime_ns(dt: datetime) -> int:
    delta = dt.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * _NS + delta.microseconds * 1000


def rfc3339_us(us: int) -> str:
    """`2026-04-07T14:30:02.800000Z`."""
    return datetime.fromtimestamp(us // _US, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{us % _US:06d}Z"


def go_time(ns: int, uptime_s: float) -> str:
    """Coinbase's heartbeat `current_time`: `2026-04-07 14:30:10.000123456 +0000 UTC m=+91717.525857105`."""
    wall = datetime.fromtimestamp(ns // _NS, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{wall}.{ns % _NS:09d} +0000 UTC m=+{uptime_s:.9f}"


# ------------------------------------------------------------------------------------------------ products
def canonical(product_id: str) -> str:
    """`BTC-USDC` -> `BTC-USD` (market channels answer with the -USD product); other ids unchanged."""
    return product_id[:-1] if product_id.endswith("-USDC") else product_id


@functools.lru_cache(maxsize=64)
def _rows_for(data_dir: Path, base: str) -> tuple[CandleRow, ...]:
    found = load_products(data_dir, [f"{base}/USDC"])
    if not found:
        raise ValueError(f"no candle file for {base} in {data_dir}")
    return next(iter(found.values())).rows


def _fmt(d: Decimal) -> str:
    return format(d, "f")


def _vol(d: Decimal) -> str:
    exp = d.as_tuple().exponent
    return _fmt(d.quantize(_EIGHT) if isinstance(exp, int) and exp > -8 else d)


# ------------------------------------------------------------------------------------------------ tape
@dataclass(frozen=True, slots=True)
class Trade:
    trade_id: int
    product_id: str
    price: Decimal
    size: Decimal
    side: str  # BUY | SELL
    time_us: int

    def to_ws(self) -> dict[str, str]:
        return {
            "trade_id": str(self.trade_id),
            "product_id": self.product_id,
            "price": _fmt(self.price),
            "size": _fmt(self.size),
            "side": self.side,
            "time": rfc3339_us(self.time_us),
        }


@dataclass(frozen=True, slots=True)
class Candle:
    start: int
    low: Decimal
    high: Decimal
    open: Decimal
    close: Decimal
    volume: Decimal

    def to_json(self) -> dict[str, str]:
        return {
            "start": str(self.start),
            "low": _fmt(self.low),
            "high": _fmt(self.high),
            "open": _fmt(self.open),
            "close": _fmt(self.close),
            "volume": _vol(self.volume),
        }


def aggregate(start: int, trades: Sequence[Trade]) -> Candle | None:
    """OHLCV of trades given oldest first; None without trades."""
    if not trades:
        return None
    prices = [t.price for t in trades]
    return Candle(
        start, min(prices), max(prices), prices[0], prices[-1], sum((t.size for t in trades), Decimal(0))
    )


def merge(start: int, parts: Sequence[Candle]) -> Candle | None:
    """OHLCV of consecutive candles given oldest first."""
    if not parts:
        return None
    return Candle(
        start,
        min(c.low for c in parts),
        max(c.high for c in parts),
        parts[0].open,
        parts[-1].close,
        sum((c.volume for c in parts), Decimal(0)),
    )


class MarketTape:
    """Deterministic trades per product: bucket k (of `granularity_s`) replays row (k - k0) mod N."""

    def __init__(
        self,
        rows: Mapping[str, Sequence[CandleRow]],
        *,
        granularity_s: int,
        start_s: int,
        seed: int = 0,
        empty: Iterable[tuple[str, int]] = (),
        quiet_every: Mapping[str, int] | None = None,
    ) -> None:
        if granularity_s not in GRANULARITIES.values():
            raise ValueError(
                f"granularity {granularity_s} s is not one of Coinbase's {sorted(GRANULARITIES.values())}"
            )
        self.rows = {canonical(p): tuple(r) for p, r in rows.items()}
        for p, r in self.rows.items():
            if not r:
                raise ValueError(f"no candle rows for {p}")
        self.g = granularity_s
        self.k0 = start_s // granularity_s
        self.seed = seed
        self.empty = {(canonical(p), s) for p, s in empty}
        self.quiet_every = {canonical(p): n for p, n in (quiet_every or {}).items()}
        self._cache: dict[tuple[str, int], tuple[Trade, ...]] = {}
        self.flat: dict[tuple[str, int], Decimal] = {}  # (product, bucket k) -> the one price it trades at

    @property
    def products(self) -> list[str]:
        return sorted(self.rows)

    def row(self, product: str, k: int) -> CandleRow:
        rows = self.rows[product]
        r = rows[(k - self.k0) % len(rows)]
        flat = self.flat.get((product, k))
        if flat is None:
            return r
        return replace(r, open=flat, high=flat, low=flat, close=flat)

    def shock(self, product: str, price: Decimal, from_k: int, buckets: int) -> None:
        """Buckets from_k .. from_k + buckets - 1 of `product` trade at `price` only (a crash or a spike), on
        the websocket and in REST alike. Only buckets not served yet may be changed: the caller picks from_k."""
        if not price.is_finite() or price <= 0:
            raise ValueError(f"shock price must be positive, got {price}")
        if buckets < 1:
            raise ValueError(f"shock buckets must be at least 1, got {buckets}")
        p = canonical(product)
        if p not in self.rows:
            raise ValueError(f"unknown product {product!r}; the peer has {self.products}")
        for k in range(from_k, from_k + buckets):
            self.flat[(p, k)] = price
            self._cache.pop((p, k), None)

    def is_empty(self, product: str, k: int) -> bool:
        n = self.quiet_every.get(product)
        if n and k % n == 0:
            return True
        return (product, k * self.g) in self.empty or self.row(product, k).volume <= 0

    def final_candle(self, product: str, k: int) -> Candle | None:
        """The bucket's candle once closed: the data row itself (None for an empty bucket)."""
        if self.is_empty(product, k):
            return None
        r = self.row(product, k)
        return Candle(k * self.g, r.low, r.high, r.open, r.close, r.volume)

    def bucket_trades(self, product: str, k: int) -> tuple[Trade, ...]:
        key = (product, k)
        got = self._cache.get(key)
        if got is None:
            if len(self._cache) > 500_000:
                self._cache.clear()
            got = self._cache[key] = self._make(product, k)
        return got

    def _make(self, product: str, k: int) -> tuple[Trade, ...]:
        if self.is_empty(product, k):
            return ()
        r = self.row(product, k)
        rng = random.Random(f"{self.seed}:{product}:{k * self.g}")
        n = rng.randint(4, 9)
        # Prices: first = open, last = close, one trade at the high and one at the low, the rest in between.
        exps = [x.as_tuple().exponent for x in (r.open, r.high, r.low, r.close)]
        tick = Decimal(1).scaleb(min(e for e in exps if isinstance(e, int)))
        prices: list[Decimal] = [r.low] * n
        prices[0], prices[-1] = r.open, r.close
        hi_i, lo_i = rng.sample(range(1, n - 1), 2)
        prices[hi_i], prices[lo_i] = r.high, r.low
        for i in range(1, n - 1):
            if i not in (hi_i, lo_i):
                p = (r.low + (r.high - r.low) * Decimal(rng.random())).quantize(
                    tick, rounding=ROUND_HALF_EVEN
                )
                prices[i] = min(max(p, r.low), r.high)
        # Sizes: n positive parts summing exactly to the volume.
        vexp = r.volume.as_tuple().exponent
        q = Decimal(1).scaleb(min(vexp if isinstance(vexp, int) else -8, -8))
        while int(r.volume / q) < 16 * n:
            q = q.scaleb(-3)
        units = int(r.volume / q)
        cuts = sorted(rng.sample(range(1, units), n - 1))
        bounds = [0, *cuts, units]
        sizes = [(b - a) * q for a, b in zip(bounds, bounds[1:], strict=False)]
        # Times: the first in the first tenth of the bucket, the last in the last tenth.
        g_us = self.g * _US
        first = rng.randrange(0, g_us // 10)
        last = rng.randrange(g_us * 9 // 10, g_us)
        middle = sorted(rng.sample(range(first + 1, last), n - 2))
        base_us = k * g_us
        return tuple(
            Trade(k * 100 + i, product, prices[i], sizes[i], rng.choice(("BUY", "SELL")), base_us + off)
            for i, off in enumerate([first, *middle, last])
        )

    def trades_between(self, product: str, after_us: int, upto_us: int) -> list[Trade]:
        """Trades with after_us < time <= upto_us, oldest first."""
        if upto_us <= after_us:
            return []
        g_us = self.g * _US
        out: list[Trade] = []
        for k in range(after_us // g_us, upto_us // g_us + 1):
            out.extend(t for t in self.bucket_trades(product, k) if after_us < t.time_us <= upto_us)
        return out

    def recent(self, product: str, upto_us: int, limit: int = SNAPSHOT_TRADES) -> list[Trade]:
        """Up to `limit` latest trades with time <= upto_us, newest first."""
        out: list[Trade] = []
        k = upto_us // (self.g * _US)
        for kk in range(k, k - HISTORY_BUCKETS - 1, -1):
            for t in reversed(self.bucket_trades(product, kk)):
                if t.time_us <= upto_us:
                    out.append(t)
                    if len(out) >= limit:
                        return out
        return out


# ------------------------------------------------------------------------------------------------ peer state
@dataclass
class RestRecord:
    path: str
    params: dict[str, str]
    status: int
    peer_time_s: float
    real_t: float


@dataclass
class PeerStats:
    connections: int = 0
    refused_connections: int = 0
    subscribes: int = 0
    unsubscribes: int = 0
    bad_subscribes: int = 0
    messages_sent: int = 0
    by_channel: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "refused_connections": self.refused_connections,
            "subscribes": self.subscribes,
            "unsubscribes": self.unsubscribes,
            "bad_subscribes": self.bad_subscribes,
            "messages_sent": self.messages_sent,
            "by_channel": dict(self.by_channel),
        }


@dataclass(eq=False)
class _Conn:
    ws: web.WebSocketResponse
    request: web.Request
    opened: float
    seq: int = 0
    jump: int = 0
    hb_counter: int = 0
    subscribed_once: bool = False
    heartbeats: list[str] | None = (
        None  # product ids given with the heartbeats subscribe; None = not subscribed
    )
    trades: dict[str, int] = field(default_factory=dict)  # product -> cursor (peer us) of the last trade sent
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _HttpError(Exception):
    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.headers = status, error, message, headers or {}

    def response(self) -> web.Response:
        body = {"error": self.error, "error_details": self.message, "message": self.message}
        return web.json_response(body, status=self.status, headers=self.headers)


class CoinbaseMdPeer:
    """The market-data peer. `async with CoinbaseMdPeer(...) as peer:` or `await peer.start()` / `stop()`."""

    def __init__(
        self,
        products: Sequence[str] = ("BTC-USD", "ETH-USD"),
        *,
        start: datetime | None = None,
        speed: float = 1.0,
        granularity_s: int = 60,
        data_dir: Path = DATA_DIR,
        rows: Mapping[str, Sequence[CandleRow]] | None = None,
        empty: Iterable[tuple[str, int]] = (),
        quiet_every: Mapping[str, int] | None = None,
        seed: int = 0,
        rest_rate_limit_per_s: float | None = None,
        rest_lag_s: float = 0.0,
        subscribe_timeout_s: float = 5.0,
        heartbeat_interval_s: float = 1.0,
        tick_s: float = 0.05,
        host: str = "127.0.0.1",
        port: int = 0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = PeerClock(start or datetime.now(UTC), speed, monotonic=monotonic)
        ids = [canonical(p) for p in products]
        if rows is None:
            rows = {p: _rows_for(data_dir, p.split("-")[0]) for p in ids}
        else:
            rows = {canonical(p): r for p, r in rows.items()}
            missing = set(ids) - set(rows)
            if missing:
                raise ValueError(f"no rows for {sorted(missing)}")
        self.tape = MarketTape(
            {p: rows[p] for p in ids},
            granularity_s=granularity_s,
            start_s=int(self.clock.now_s()),
            seed=seed,
            empty=empty,
            quiet_every=quiet_every,
        )
        self.g = granularity_s
        self.host, self.port = host, port
        self._mono = monotonic
        self.rest_rate_limit_per_s = rest_rate_limit_per_s
        self._tokens = float(rest_rate_limit_per_s or 0)
        self._tokens_at = monotonic()
        self.rest_lag_s = rest_lag_s
        self.late: dict[tuple[str, int], float] = {}
        self.subscribe_timeout_s = subscribe_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.tick_s = tick_s
        self.requests: list[RestRecord] = []
        self.stats = PeerStats()
        self._429_left = 0
        self._429_retry_after: float | None = None
        self._outage_until = 0.0
        self._silence_until = 0.0
        self._silence_pongs = False
        self._hb_stop_until = 0.0
        self._conns: set[_Conn] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.ws_url = ""

    # -------------------------------------------------------------------------- lifecycle
    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/api/v3/brokerage/market/products/{product_id}/candles", self._candles)
        app.router.add_get("/api/v3/brokerage/time", self._time)
        app.router.add_post("/_peer/fault", self._fault_http)
        app.router.add_get("/_peer/stats", self._stats_http)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{self.host}:{port}"
        self.ws_url = f"ws://{self.host}:{port}/ws"
        return self.base_url

    async def stop(self) -> None:
        for c in list(self._conns):
            self._abort_conn(c)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> CoinbaseMdPeer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -------------------------------------------------------------------------- ground truth
    def now_s(self) -> float:
        return self.clock.now_s()

    def bucket_of(self, t_s: float, granularity_s: int | None = None) -> int:
        g = granularity_s or self.g
        return int(t_s // g) * g

    def final_candles(
        self,
        product: str,
        start_s: int,
        end_s: int,
        *,
        granularity_s: int | None = None,
        closed_only: bool = True,
    ) -> list[dict[str, str]]:
        """Final REST values of buckets with start in [start_s, end_s), oldest first, empty buckets left out;
        with `closed_only`, only buckets that have ended by peer time."""
        p = canonical(product)
        g = granularity_s or self.g
        now = self.clock.now_s()
        out: list[dict[str, str]] = []
        for s in range(-(-start_s // g) * g, end_s, g):
            if closed_only and s + g > now:
                break
            c = merge(
                s, [c for k in range(s // self.g, (s + g) // self.g) if (c := self.tape.final_candle(p, k))]
            )
            if c is not None:
                out.append(c.to_json())
        return out

    def trades(self, product: str, start_s: float, end_s: float) -> list[Trade]:
        """All tape trades with start_s <= time < end_s, oldest first (whatever the peer time)."""
        return self.tape.trades_between(canonical(product), round(start_s * _US) - 1, round(end_s * _US) - 1)

    def connections(self) -> int:
        return len(self._conns)

    # -------------------------------------------------------------------------- faults
    def set_speed(self, speed: float) -> None:
        self.clock.set_speed(speed)

    def rest_429(self, n: int = 1, retry_after_s: float | None = None) -> None:
        self._429_left = n
        self._429_retry_after = retry_after_s

    def set_rate_limit(self, per_s: float | None) -> None:
        self.rest_rate_limit_per_s = per_s
        self._tokens = float(per_s or 0)
        self._tokens_at = self._mono()

    def late_bucket(self, product: str, bucket_start_s: int, delay_s: float) -> None:
        self.late[(canonical(product), bucket_start_s)] = delay_s

    def set_rest_lag(self, seconds: float) -> None:
        self.rest_lag_s = seconds

    def shock(self, product: str, price: str, buckets: int = 1) -> int:
        """From the next bucket on, `buckets` buckets of `product` trade at `price` only (see MarketTape.shock);
        returns the first shocked bucket's start (peer epoch s)."""
        first = int(self.clock.now_s() // self.g) + 1
        self.tape.shock(product, Decimal(str(price)), first, int(buckets))
        return first * self.g

    def outage(self, seconds: float) -> None:
        self._outage_until = self._mono() + seconds
        for c in list(self._conns):
            self._abort_conn(c)

    def silence(self, seconds: float, *, pongs: bool = False) -> None:
        self._silence_until = self._mono() + seconds
        self._silence_pongs = pongs

    def stop_heartbeats(self, seconds: float) -> None:
        self._hb_stop_until = self._mono() + seconds

    def sequence_jump(self, k: int) -> None:
        for c in self._conns:
            c.jump += k

    def abort(self) -> None:
        for c in list(self._conns):
            self._abort_conn(c)

    async def close(self, code: int = 1000) -> None:
        await asyncio.gather(*(c.ws.close(code=code) for c in list(self._conns)), return_exceptions=True)

    def _abort_conn(self, c: _Conn) -> None:
        transport = c.request.transport
        if transport is not None:
            transport.abort()

    def _in_outage(self) -> bool:
        return self._mono() < self._outage_until

    def _silenced(self) -> bool:
        return self._mono() < self._silence_until

    async def fault(self, kind: str, **args: Any) -> None:
        """Apply a fault by name (what `POST /_peer/fault` calls)."""
        table: dict[str, Callable[..., Any]] = {
            "close": self.close,
            "abort": self.abort,
            "silence": self.silence,
            "stop_heartbeats": self.stop_heartbeats,
            "sequence_jump": self.sequence_jump,
            "outage": self.outage,
            "set_speed": self.set_speed,
            "rest_429": self.rest_429,
            "late_bucket": self.late_bucket,
            "rest_lag": self.set_rest_lag,
            "rate_limit": self.set_rate_limit,
            "shock": self.shock,
        }
        if kind not in table:
            raise ValueError(f"unknown fault {kind!r}; known: {sorted(table)}")
        result = table[kind](**args)
        if asyncio.iscoroutine(result):
            await result

    async def _fault_http(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            kind = body.pop("kind")
            if kind == "close":
                # Answer first: a clean close waits for the clients' close frames.
                task = asyncio.get_running_loop().create_task(self.fault(kind, **body))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            else:
                await self.fault(kind, **body)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            return web.json_response({"ok": False, "error": str(err)}, status=400)
        return web.json_response({"ok": True, "peer_time_s": self.clock.now_s()})

    async def _stats_http(self, request: web.Request) -> web.Response:
        return web.json_response(
            {**self.stats.to_json(), "peer_time_s": self.clock.now_s(), "open": len(self._conns)}
        )

    # -------------------------------------------------------------------------- REST
    async def _not_found(self, request: web.Request) -> web.Response:
        self._record(request, 404)
        return _HttpError(404, "NOT_FOUND", "Not Found").response()

    def _record(self, request: web.Request, status: int) -> None:
        self.requests.append(
            RestRecord(request.path, dict(request.query), status, self.clock.now_s(), self._mono())
        )

    def _gate(self, candles: bool) -> None:
        if self._in_outage():
            raise _HttpError(503, "UNAVAILABLE", "Service Unavailable")
        if self.rest_rate_limit_per_s:
            now = self._mono()
            rate = self.rest_rate_limit_per_s
            self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            if self._tokens < 1:
                raise _HttpError(429, "rate_limit_exceeded", "Too many requests")
            self._tokens -= 1
        if candles and self._429_left > 0:
            self._429_left -= 1
            ra = self._429_retry_after
            headers = (
                {"Retry-After": str(int(ra) if float(ra).is_integer() else ra)} if ra is not None else None
            )
            raise _HttpError(429, "rate_limit_exceeded", "Too many requests", headers)

    async def _time(self, request: web.Request) -> web.Response:
        try:
            self._gate(False)
        except _HttpError as h:
            self._record(request, h.status)
            return h.response()
        ns = self.clock.now_ns()
        us = ns // 1000
        iso = (
            datetime.fromtimestamp(us // _US, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{us % _US // 1000:03d}Z"
        )
        self._record(request, 200)
        return web.json_response(
            {"iso": iso, "epochSeconds": str(ns // _NS), "epochMillis": str(ns // 1_000_000)}
        )

    async def _candles(self, request: web.Request) -> web.Response:
        try:
            self._gate(True)
            body = self._candles_body(request.match_info["product_id"], request.query)
        except _HttpError as h:
            self._record(request, h.status)
            return h.response()
        self._record(request, 200)
        return web.json_response(body)

    def _candles_body(self, product_id: str, q: Mapping[str, str]) -> dict[str, Any]:
        p = canonical(product_id)
        if p not in self.tape.rows:
            raise _HttpError(404, "NOT_FOUND", f"ProductID {product_id} not found")
        gran = q.get("granularity", "")
        if gran not in GRANULARITIES:
            raise _HttpError(400, "INVALID_ARGUMENT", f"invalid granularity {gran!r}")
        g = GRANULARITIES[gran]
        if g % self.g:
            raise _HttpError(
                400, "INVALID_ARGUMENT", f"granularity {gran} is not served by this peer (base {self.g} s)"
            )
        try:
            start, end = int(q["start"]), int(q["end"])
        except (KeyError, ValueError):
            raise _HttpError(400, "INVALID_ARGUMENT", "start and end must be unix seconds") from None
        if end < start:
            raise _HttpError(400, "INVALID_ARGUMENT", "start must be before end")
        if (end - start) / g > MAX_CANDLES:
            raise _HttpError(
                400,
                "INVALID_ARGUMENT",
                f"start and end argument is invalid - number of candles requested should be less than or equal to {MAX_CANDLES}",
            )
        now_us = self.clock.now_us()
        out: list[dict[str, str]] = []
        first = -(-start // g) * g
        for s in range(first, end + 1, g):
            if s * _US > now_us:
                break
            parts = [c for k in range(s // self.g, (s + g) // self.g) if (c := self._visible(p, k, now_us))]
            c = merge(s, parts)
            if c is not None:
                out.append(c.to_json())
        out.reverse()
        return {"candles": out}

    def _visible(self, p: str, k: int, now_us: int) -> Candle | None:
        """What REST shows of base bucket k at now_us: None (future, empty, late), partial (open) or final."""
        s = k * self.g
        if s * _US > now_us:
            return None
        delay = max(self.late.get((p, s), 0.0), self.rest_lag_s)
        end_us = (s + self.g) * _US
        if delay > 0:
            return self.tape.final_candle(p, k) if now_us >= end_us + delay * _US else None
        if now_us >= end_us:
            return self.tape.final_candle(p, k)
        return aggregate(s, [t for t in self.tape.bucket_trades(p, k) if t.time_us <= now_us])

    # -------------------------------------------------------------------------- websocket
    async def _ws(self, request: web.Request) -> web.StreamResponse:
        if self._in_outage():
            self.stats.refused_connections += 1
            return _HttpError(503, "UNAVAILABLE", "Service Unavailable").response()
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        conn = _Conn(ws, request, self._mono())
        self._conns.add(conn)
        self.stats.connections += 1
        sender = asyncio.get_running_loop().create_task(self._sender(conn))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(conn, msg.data)
                elif msg.type == WSMsgType.PING:
                    if not self._silenced() or self._silence_pongs:
                        await ws.pong(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self._error(conn)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            self._conns.discard(conn)
        return ws

    async def _send(self, conn: _Conn, channel: str, events: list[dict[str, Any]]) -> None:
        async with conn.lock:
            if self._silenced() or conn.ws.closed:
                return
            seq = conn.seq + conn.jump
            conn.jump = 0
            conn.seq = seq + 1
            msg = {
                "channel": channel,
                "timestamp": rfc3339_us(self.clock.now_us()),
                "sequence_num": seq,
                "events": events,
            }
            with contextlib.suppress(ConnectionError, RuntimeError):
                await conn.ws.send_str(json.dumps(msg))
                self.stats.messages_sent += 1
                self.stats.by_channel[channel] += 1

    async def _error(self, conn: _Conn) -> None:
        self.stats.bad_subscribes += 1
        async with conn.lock:
            if self._silenced() or conn.ws.closed:
                return
            with contextlib.suppress(ConnectionError, RuntimeError):
                await conn.ws.send_str(json.dumps({"type": "error", "message": "failure to subscribe"}))
                self.stats.messages_sent += 1
                self.stats.by_channel["error"] += 1

    async def _on_text(self, conn: _Conn, data: str) -> None:
        try:
            req = json.loads(data)
        except json.JSONDecodeError:
            await self._error(conn)
            return
        if not isinstance(req, dict):
            await self._error(conn)
            return
        typ, channel, raw = req.get("type"), req.get("channel"), req.get("product_ids", [])
        if (
            typ not in ("subscribe", "unsubscribe")
            or channel not in CHANNELS
            or not isinstance(raw, list)
            or not all(isinstance(x, str) for x in raw)
            or any(canonical(x) not in self.tape.rows for x in raw)
            or (channel == "market_trades" and not raw)
        ):
            await self._error(conn)
            return
        ids = list(dict.fromkeys(canonical(x) for x in raw))
        now_us = self.clock.now_us()
        if typ == "unsubscribe":
            self.stats.unsubscribes += 1
            if channel == "heartbeats":
                conn.heartbeats = None
            else:
                for p in ids:
                    conn.trades.pop(p, None)
            await self._send(conn, "subscriptions", [{"subscriptions": self._subs(conn)}])
            return
        self.stats.subscribes += 1
        conn.subscribed_once = True
        if channel == "heartbeats":
            conn.heartbeats = sorted(set(conn.heartbeats or []) | set(ids))
            await self._send(conn, "subscriptions", [{"subscriptions": self._subs(conn)}])
            return
        for p in ids:
            conn.trades[p] = now_us
        await self._send(conn, "subscriptions", [{"subscriptions": self._subs(conn)}])
        snap = sorted(
            (t for p in ids for t in self.tape.recent(p, now_us)),
            key=lambda t: (t.time_us, t.trade_id),
            reverse=True,
        )
        await self._send(conn, "market_trades", [{"type": "snapshot", "trades": [t.to_ws() for t in snap]}])

    @staticmethod
    def _subs(conn: _Conn) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        if conn.heartbeats is not None:
            out["heartbeats"] = list(conn.heartbeats)
        if conn.trades:
            out["market_trades"] = sorted(conn.trades)
        return out

    async def _sender(self, conn: _Conn) -> None:
        next_hb = self._mono() + self.heartbeat_interval_s
        while not conn.ws.closed:
            now = self._mono()
            if not conn.subscribed_once and now - conn.opened >= self.subscribe_timeout_s:
                await conn.ws.close(code=1000, message=b"subscribe timeout")
                return
            if now >= next_hb:
                next_hb = max(next_hb + self.heartbeat_interval_s, now)
                conn.hb_counter += 1
                if conn.heartbeats is not None and now >= self._hb_stop_until:
                    ev = {
                        "current_time": go_time(self.clock.now_ns(), self.clock.uptime_s()),
                        "heartbeat_counter": conn.hb_counter,
                    }
                    await self._send(conn, "heartbeats", [ev])
            if conn.trades:
                now_us = self.clock.now_us()
                for p in sorted(conn.trades):
                    cursor = conn.trades.get(p)
                    if cursor is None or cursor >= now_us:
                        continue
                    new = self.tape.trades_between(p, cursor, now_us)
                    conn.trades[p] = now_us
                    if new:
                        await self._send(
                            conn,
                            "market_trades",
                            [{"type": "update", "trades": [t.to_ws() for t in reversed(new)]}],
                        )
            await asyncio.sleep(self.tick_s)


# ------------------------------------------------------------------------------------------------ CLI
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m tests.peer.coinbase_md_peer", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--start", default=None, help="ISO time of the peer clock's start (default: now)")
    ap.add_argument("--granularity", type=int, default=60, help="base bucket in seconds")
    ap.add_argument("--products", default="BTC-USD,ETH-USD")
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--quiet-every", action="append", default=[], metavar="PRODUCT=N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rest-rate-limit", type=float, default=None, help="requests per second (default: off)")
    ap.add_argument(
        "--rest-lag", type=float, default=0.0, help="peer seconds before a closed bucket shows in REST"
    )
    ap.add_argument("--subscribe-timeout", type=float, default=5.0)
    return ap.parse_args(argv)


def _parse_start(text: str | None) -> datetime | None:
    if text is None:
        return None
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


async def _serve(args: argparse.Namespace) -> None:
    quiet = {}
    for item in args.quiet_every:
        product, _, n = item.partition("=")
        quiet[product] = int(n)
    peer = CoinbaseMdPeer(
        [p.strip() for p in args.products.split(",") if p.strip()],
        start=_parse_start(args.start),
        speed=args.speed,
        granularity_s=args.granularity,
        data_dir=args.data,
        quiet_every=quiet,
        seed=args.seed,
        rest_rate_limit_per_s=args.rest_rate_limit,
        rest_lag_s=args.rest_lag,
        subscribe_timeout_s=args.subscribe_timeout,
        host=args.host,
        port=args.port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await peer.start()
    print(f"ready {peer.base_url} {peer.ws_url}", flush=True)
    try:
        await stop.wait()
    finally:
        await peer.stop()


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(_serve(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
