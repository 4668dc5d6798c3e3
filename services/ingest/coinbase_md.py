"""Coinbase Advanced Trade public market data: a thin aiohttp REST client (candles, server time) and the
websocket's frames, parsed into our own types. Facts: /work/shared/notes/coinbase-market-data.md.

The parsers are pure functions (unit-tested on their own); the client takes its session, monotonic clock and
sleep from the caller, and nothing here connects at import time. Wire errors become `MarketDataError`s with a
short `kind` (the label of the error metric) and the bad value in the text.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp

from services.ingest.live_domain import MAX_BUCKETS_PER_REQUEST, Bar, IngestError, granularity

CANDLES_PATH = "/api/v3/brokerage/market/products/{id}/candles"
TIME_PATH = "/api/v3/brokerage/time"


class MarketDataError(IngestError):
    """Something the exchange sent (or failed to send); `kind` names it for the error counter."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ProtocolError(MarketDataError):
    """A frame, row or body that does not have the documented shape: never published."""


class RestError(MarketDataError):
    """A REST request that failed (status, time-out, connection); the caller asks again later."""


# ---------------------------------------------------------------------------------------- product ids
def rest_product_id(product: str) -> str:
    """`BTC/USDC` -> `BTC-USDC` (REST serves the USDC book under its own id)."""
    return product.replace("/", "-")


def ws_product_id(product: str) -> str:
    """`BTC/USDC` -> `BTC-USD`: the market channels answer a `-USDC` subscription with the `-USD` product."""
    pid = rest_product_id(product)
    return pid[:-1] if pid.endswith("-USDC") else pid


def ws_products(products: Sequence[str]) -> dict[str, str]:
    """Websocket product id -> our product name. Two products mapping to one id would be ambiguous."""
    out: dict[str, str] = {}
    for p in products:
        wid = ws_product_id(p)
        if wid in out:
            raise IngestError(f"products {out[wid]!r} and {p!r} share the websocket id {wid!r}")
        out[wid] = p
    return out


# ---------------------------------------------------------------------------------------- times
_RFC3339 = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d\d):?(\d\d))$"
)
# Go's time.Time.String(): `2026-04-07 14:30:10.000123456 +0000 UTC m=+91717.525857105` (the monotonic
# reading `m=...` is the server's uptime, not a time: ignored).
_GO_TIME = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))? ([+-])(\d\d)(\d\d)(?: [A-Za-z]+)?(?: m=[+-][\d.]+)?$"
)


def _epoch(parts: Sequence[str | None], sign: str | None, oh: str | None, om: str | None) -> float:
    y, mo, d, h, mi, s = (int(x or 0) for x in parts[:6])
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60 and s < 61):
        raise ValueError("field out of range")
    frac = parts[6] or ""
    t = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) + (int(frac) / 10 ** len(frac) if frac else 0.0)
    if sign is not None:
        off = int(oh or 0) * 3600 + int(om or 0) * 60
        t -= off if sign == "+" else -off
    return float(t)


def parse_rfc3339(text: object) -> float:
    """`2026-04-07T14:30:02.800000Z` (up to nanoseconds) -> epoch seconds."""
    m = _RFC3339.match(text) if isinstance(text, str) else None
    if m is None:
        raise ProtocolError("bad_time", f"not an RFC 3339 time: {text!r}")
    g = m.groups()
    try:
        return _epoch(g[:7], None if g[7] else g[8], g[9], g[10])
    except ValueError as err:
        raise ProtocolError("bad_time", f"not an RFC 3339 time: {text!r} ({err})") from None


def parse_go_time(text: object) -> float:
    """A heartbeat's `current_time` (Go's time format, see _GO_TIME) -> epoch seconds."""
    m = _GO_TIME.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ProtocolError("bad_time", f"not a heartbeat current_time: {text!r}")
    g = m.groups()
    try:
        return _epoch(g[:7], g[7], g[8], g[9])
    except ValueError as err:
        raise ProtocolError("bad_time", f"not a heartbeat current_time: {text!r} ({err})") from None


# ---------------------------------------------------------------------------------------- REST bodies
def _decimal(row: dict[str, Any], key: str) -> Decimal:
    raw = row.get(key)
    if not isinstance(raw, str | int):
        raise ProtocolError("bad_row", f"candle {key} must be a decimal string, got {raw!r}")
    try:
        d = Decimal(str(raw))
    except InvalidOperation:
        raise ProtocolError("bad_row", f"candle {key} is not a decimal: {raw!r}") from None
    if not d.is_finite():
        raise ProtocolError("bad_row", f"candle {key} is not finite: {raw!r}")
    return d


def parse_candle(row: object, interval_s: int) -> Bar:
    """One REST candle row, validated: aligned start, prices > 0, volume >= 0, high/low bounding open/close."""
    if not isinstance(row, dict):
        raise ProtocolError("bad_row", f"candle row must be an object, got {row!r}")
    raw_start = row.get("start")
    try:
        start = int(str(raw_start))
    except ValueError:
        raise ProtocolError("bad_row", f"candle start is not unix seconds: {raw_start!r}") from None
    if start % interval_s:
        raise ProtocolError("bad_row", f"candle start {start} is not aligned to {interval_s}s")
    o, h, lo, c, v = (_decimal(row, k) for k in ("open", "high", "low", "close", "volume"))
    if min(o, h, lo, c) <= 0 or v < 0:
        raise ProtocolError("bad_row", f"candle {start}: prices must be > 0 and volume >= 0, got {row!r}")
    if h < max(o, c) or lo > min(o, c):
        raise ProtocolError("bad_row", f"candle {start}: high/low do not bound open/close: {row!r}")
    return Bar(start, o, h, lo, c, v)


def parse_candles(body: object, interval_s: int) -> list[Bar]:
    """`{"candles": [...]}` (newest first) -> bars oldest first. One malformed row fails the whole page: a
    page with a hole must not make a bucket look empty."""
    if not isinstance(body, dict) or not isinstance(body.get("candles"), list):
        raise ProtocolError(
            "bad_body", f"candles answer must be {{'candles': [...]}}, got {str(body)[:200]!r}"
        )
    bars = [parse_candle(r, interval_s) for r in body["candles"]]
    starts = [b.start_s for b in bars]
    if len(set(starts)) != len(starts):
        raise ProtocolError("bad_body", f"candles answer repeats a bucket: starts {sorted(starts)[:20]}")
    return sorted(bars, key=lambda b: b.start_s)


def parse_server_time(body: object) -> float:
    """`{"iso","epochSeconds","epochMillis"}` -> epoch seconds (millisecond precision when given)."""
    if isinstance(body, dict):
        for key, scale in (("epochMillis", 1000.0), ("epochSeconds", 1.0)):
            raw = body.get(key)
            if raw is not None:
                try:
                    return int(str(raw)) / scale
                except ValueError:
                    raise ProtocolError("bad_body", f"server time {key} is not an integer: {raw!r}") from None
        if "iso" in body:
            return parse_rfc3339(body["iso"])
    raise ProtocolError(
        "bad_body", f"server time answer has no epochMillis/epochSeconds/iso: {str(body)[:200]!r}"
    )


# ---------------------------------------------------------------------------------------- websocket frames
@dataclass(frozen=True)
class WsTrade:
    trade_id: str
    ws_product: str
    price: Decimal
    size: Decimal
    side: str | None  # "buy" / "sell"
    time_s: float


@dataclass(frozen=True)
class Frame:
    """One websocket message. `kind`: heartbeat, trades, subscriptions, error, other."""

    kind: str
    channel: str = ""
    seq: int | None = None
    timestamp_s: float | None = None
    current_time_s: float | None = None  # heartbeats
    trades: tuple[WsTrade, ...] = ()
    snapshot: bool = False
    message: str = ""  # error frames


def _trade(raw: object) -> WsTrade:
    if not isinstance(raw, dict):
        raise ProtocolError("bad_trade", f"trade must be an object, got {raw!r}")
    tid, pid = raw.get("trade_id"), raw.get("product_id")
    if not isinstance(tid, str | int) or not str(tid) or not isinstance(pid, str) or not pid:
        raise ProtocolError("bad_trade", f"trade needs trade_id and product_id: {raw!r}")
    try:
        price, size = Decimal(str(raw.get("price"))), Decimal(str(raw.get("size")))
    except InvalidOperation:
        raise ProtocolError("bad_trade", f"trade price/size not decimal: {raw!r}") from None
    if not (price.is_finite() and size.is_finite()) or price <= 0 or size < 0:
        raise ProtocolError("bad_trade", f"trade price must be > 0 and size >= 0: {raw!r}")
    side = str(raw.get("side", "")).lower() or None
    if side not in (None, "buy", "sell"):
        raise ProtocolError("bad_trade", f"trade side must be BUY or SELL: {raw!r}")
    return WsTrade(str(tid), pid, price, size, side, parse_rfc3339(raw.get("time")))


def parse_frame(text: str | bytes) -> Frame:
    try:
        msg = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_frame", f"websocket frame is not JSON: {str(text)[:200]!r}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_frame", f"websocket frame must be an object: {str(text)[:200]!r}")
    if msg.get("type") == "error":
        return Frame("error", message=str(msg.get("message", ""))[:500])
    channel = msg.get("channel")
    if not isinstance(channel, str):
        raise ProtocolError("bad_frame", f"websocket frame has no channel: {str(text)[:200]!r}")
    seq_raw = msg.get("sequence_num")
    if seq_raw is not None and (not isinstance(seq_raw, int) or isinstance(seq_raw, bool)):
        raise ProtocolError("bad_frame", f"sequence_num must be an integer, got {seq_raw!r}")
    ts = parse_rfc3339(msg["timestamp"]) if "timestamp" in msg else None
    events = msg.get("events", [])
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ProtocolError("bad_frame", f"events must be a list of objects: {str(text)[:200]!r}")
    base = {"channel": channel, "seq": seq_raw, "timestamp_s": ts}
    if channel == "heartbeats":
        if not events or "current_time" not in events[0]:
            raise ProtocolError("bad_frame", f"heartbeat without current_time: {str(text)[:200]!r}")
        return Frame("heartbeat", current_time_s=parse_go_time(events[0]["current_time"]), **base)  # type: ignore[arg-type]
    if channel == "market_trades":
        trades: list[WsTrade] = []
        snapshot = False
        for e in events:
            snapshot = snapshot or e.get("type") == "snapshot"
            raw_trades = e.get("trades", [])
            if not isinstance(raw_trades, list):
                raise ProtocolError("bad_frame", f"trades must be a list: {str(text)[:200]!r}")
            trades.extend(_trade(t) for t in raw_trades)
        return Frame("trades", trades=tuple(trades), snapshot=snapshot, **base)  # type: ignore[arg-type]
    if channel == "subscriptions":
        return Frame("subscriptions", **base)  # type: ignore[arg-type]
    return Frame("other", **base)  # type: ignore[arg-type]


def subscribe_messages(ws_ids: Sequence[str]) -> list[str]:
    """One subscribe message per channel (Coinbase takes one channel per message)."""
    ids = sorted(ws_ids)
    return [
        json.dumps({"type": "subscribe", "product_ids": ids, "channel": ch})
        for ch in ("heartbeats", "market_trades")
    ]


# ---------------------------------------------------------------------------------------- REST client
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """At most `rate` requests a real second on average, bursts up to `capacity`."""

    def __init__(
        self, rate: float, *, capacity: float | None = None, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        if not rate > 0:
            raise IngestError(f"max_requests_per_s must be > 0, got {rate!r}")
        self.rate = rate
        self.capacity = capacity if capacity is not None else max(1.0, rate)
        self._mono = monotonic
        self._tokens = self.capacity
        self._at = monotonic()

    def take(self) -> float:
        """Take a token; returns how long to wait first (0: go now). The token is owed until then."""
        now = self._mono()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class CoinbaseRest:
    """GET candles and server time, within the rate limit; a 429 backs off (Retry-After, else doubling from
    0.25 s) and retries up to `max_retries` times."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        max_requests_per_s: float,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        timeout_s: float = 10.0,
        max_retries: int = 6,
        on_error: Callable[[str], None] | None = None,
        on_request: Callable[[str], None] | None = None,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.bucket = TokenBucket(max_requests_per_s, monotonic=monotonic)
        self._sleep = sleep
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self._on_error = on_error or (lambda kind: None)
        self._on_request = on_request or (lambda what: None)

    async def _get(self, what: str, path: str, params: dict[str, str] | None = None) -> Any:
        backoff = 0.25
        for attempt in range(self.max_retries + 1):
            wait = self.bucket.take()
            if wait > 0:
                await self._sleep(wait)
            self._on_request(what)
            try:
                async with self.session.get(
                    self.base_url + path, params=params, timeout=self._timeout
                ) as resp:
                    if resp.status == 429:
                        self._on_error("http_429")
                        if attempt == self.max_retries:
                            raise RestError(
                                "http_429", f"GET {path}: still rate limited after {attempt} retries"
                            )
                        await self._sleep(_retry_after(resp.headers.get("Retry-After"), backoff))
                        backoff = min(backoff * 2, 8.0)
                        continue
                    if resp.status != 200:
                        text = (await resp.text())[:300]
                        kind = "http_5xx" if resp.status >= 500 else "http_4xx"
                        raise RestError(kind, f"GET {path} {params or ''}: HTTP {resp.status}: {text}")
                    try:
                        return await resp.json(content_type=None)
                    except ValueError:
                        raise ProtocolError("bad_body", f"GET {path}: answer is not JSON") from None
            except TimeoutError:
                raise RestError("timeout", f"GET {path}: no answer within {self._timeout.total}s") from None
            except aiohttp.ClientError as err:
                raise RestError("connect", f"GET {path}: {type(err).__name__}: {err}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def server_time(self) -> float:
        return parse_server_time(await self._get("time", TIME_PATH))

    async def candles(self, product: str, start_s: int, end_s: int, interval_s: int) -> list[Bar]:
        """Buckets with start in [start_s, end_s) (at most 300), oldest first; `end` is sent as end_s - 1 so
        the answer is the same whether the server reads `end` as inclusive or not."""
        n = (end_s - start_s) // interval_s
        if not 0 < n <= MAX_BUCKETS_PER_REQUEST:
            raise IngestError(f"a candles request covers 1..{MAX_BUCKETS_PER_REQUEST} buckets, asked {n}")
        params = {"start": str(start_s), "end": str(end_s - 1), "granularity": granularity(interval_s)}
        body = await self._get("candles", CANDLES_PATH.format(id=rest_product_id(product)), params)
        return [b for b in parse_candles(body, interval_s) if start_s <= b.start_s < end_s]


def _retry_after(header: str | None, fallback: float) -> float:
    try:
        v = float(header) if header is not None else fallback
    except ValueError:
        v = fallback
    # Jitter: several clients rate-limited together must not come back together.
    return min(30.0, max(0.05, v)) * random.uniform(1.0, 1.25)
