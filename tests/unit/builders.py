"""Message builders for the domain unit tests: valid messages with sensible defaults, built in one line.

Times are epoch seconds (ints) in the builders' signatures and UTC datetimes on the messages. T0 is a UTC
midnight, so it is also a multiple of every rotation interval used in the config (1 h, 4 h).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from shared.clock import derived_id, from_epoch_s
from shared.config import AppConfig, Profile, load_config
from shared.messages import (
    CandleClosed,
    ExecuteOrder,
    Message,
    OrderDecided,
    OrderFilled,
    OrderUpdated,
    PlaceOrder,
    PlanPublished,
    ReplayFinished,
    StepCompleted,
    WatermarkAdvanced,
)
from shared.strategy_catalog import CATALOG

CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "coinbase_profiles.yaml"
HOUR = 3600
DAY = 86400
T0 = 1_710_028_800  # 2024-03-10T00:00:00Z
HEX64 = "ab" * 32


def config() -> AppConfig:
    return load_config(CONFIG_PATH)


def dt(t: int | float) -> datetime:
    return from_epoch_s(t)


def D(x: Any) -> Decimal:
    return x if isinstance(x, Decimal) else Decimal(str(x))


def tune(profile: Profile, **sections: dict[str, Any]) -> Profile:
    """A copy of the profile with some keys of its sections replaced: tune(p, risk_management={...})."""
    update = {name: getattr(profile, name).model_copy(update=values) for name, values in sections.items()}
    return profile.model_copy(update=update)


# ------------------------------------------------------------------------------------------ market data
def candle(
    product: str,
    open_time: int,
    open: Any = 100,
    high: Any = None,
    low: Any = None,
    close: Any = None,
    *,
    volume: Any = 10,
    interval: int = HOUR,
) -> CandleClosed:
    o = D(open)
    c = D(close) if close is not None else o
    # A real candle's high and low bound its open and close (CandleClosed refuses anything else).
    h = max(D(high), o, c) if high is not None else max(o, c)
    lo = min(D(low), o, c) if low is not None else min(o, c)
    return CandleClosed(
        id=derived_id("candle", product, open_time),
        event_time=dt(open_time + interval),
        correlation_id=f"step:{open_time}",
        product=product,
        interval_s=interval,
        open_time=dt(open_time),
        open=o,
        high=h,
        low=lo,
        close=c,
        volume=D(volume),
        source="test",
    )


def watermark(step_time: int, interval: int = HOUR) -> WatermarkAdvanced:
    return WatermarkAdvanced(
        id=derived_id("wm", step_time),
        event_time=dt(step_time + interval),
        correlation_id=f"step:{step_time}",
        step_time=dt(step_time),
        interval_s=interval,
    )


def replay_finished(last_step: int | None, steps: int) -> ReplayFinished:
    return ReplayFinished(
        id=derived_id("replay-finished", last_step or 0, steps),
        event_time=dt((last_step or 0) + HOUR),
        correlation_id="replay",
        last_step_time=dt(last_step) if last_step is not None else None,
        steps=steps,
    )


def path_candles(
    product: str, closes: Sequence[Any], start: int = T0, interval: int = HOUR, *, first_open: Any = None
) -> list[CandleClosed]:
    """Candles whose closes follow `closes`; each opens at the previous close (the first at `first_open`)."""
    out = []
    prev = D(first_open) if first_open is not None else D(closes[0])
    for i, c in enumerate(closes):
        c = D(c)
        out.append(
            candle(product, start + i * interval, prev, max(prev, c), min(prev, c), c, interval=interval)
        )
        prev = c
    return out


def step_messages(candles: Iterable[CandleClosed]) -> list[Message]:
    """One partition's stream: each step's candles (by product) followed by that step's watermark."""
    by_time: dict[int, list[CandleClosed]] = {}
    for c in candles:
        by_time.setdefault(int(c.open_time.timestamp()), []).append(c)
    out: list[Message] = []
    for t in sorted(by_time):
        cs = sorted(by_time[t], key=lambda c: c.product)
        out.extend(cs)
        out.append(watermark(t, cs[0].interval_s))
    return out


def zigzag(n: int, start: float = 100.0, up: float = 1.006, down: float = 0.998) -> list[Decimal]:
    """Closes of a choppy up-trend: alternately x up, x down (per-candle volatility ~ (up - down) / 2)."""
    out, x = [], start
    for i in range(n):
        x *= up if i % 2 == 0 else down
        out.append(D(round(x, 6)))
    return out


# ------------------------------------------------------------------------------------------ registry
def plan(
    profile: str,
    epoch: int,
    *,
    interval: int = HOUR,
    strategy: str = "zygot_zalgo_entropy_dual_key_gate",
    products: Sequence[str] = ("BTC/USDC",),
    blend_weight: float = 0.85,
    fingerprint: str = HEX64,
    hash_hex: str = HEX64,
) -> PlanPublished:
    assets = sorted({p.split("/")[0] for p in products})
    return PlanPublished(
        id=derived_id("plan", profile, epoch),
        event_time=dt(epoch * interval),
        correlation_id=f"plan:{profile}:{epoch}",
        profile=profile,
        epoch=epoch,
        epoch_start=dt(epoch * interval),
        epoch_end=dt((epoch + 1) * interval),
        hash=hash_hex,
        nonce=0,
        strategy=strategy,
        parameters=dict(CATALOG[strategy].tunable),
        blend_weight=blend_weight,
        assets=assets,
        random_asset=None,
        products=list(products),
        fingerprint=fingerprint,
    )


def plans_covering(profile: str, start: int, end: int, interval: int, **kw: Any) -> list[PlanPublished]:
    """A plan for every epoch that overlaps [start, end)."""
    return [
        plan(profile, e, interval=interval, **kw) for e in range(start // interval, (end - 1) // interval + 1)
    ]


# ------------------------------------------------------------------------------------------ orders
def place_order(
    profile: str,
    side: str,
    *,
    product: str = "BTC/USDC",
    step: int = T0,
    interval: int = HOUR,
    size: Any = "0.1",
    price: Any = 100,
    priority: int = 100,
    intent_id: str | None = None,
    event_time: int | None = None,
    epoch: int | None = None,
    fingerprint: str = HEX64,
    reason: str | None = None,
) -> PlaceOrder:
    """`epoch` defaults to the step's epoch at a rotation of `interval` (pass it for other rotations)."""
    iid = intent_id or derived_id("intent", profile, product, step, side)
    return PlaceOrder(
        id=iid,
        event_time=dt(event_time if event_time is not None else step + interval),
        correlation_id=f"step:{step}",
        intent_id=iid,
        profile=profile,
        product=product,
        side=side,
        size=D(size),
        reference_price=D(price),
        reason=reason or ("entry" if side == "buy" else "exit_signal"),
        fingerprint=fingerprint,
        epoch=epoch if epoch is not None else step // interval,
        step_time=dt(step),
        priority=priority,
    )


def step_completed(profile: str, step: int, *, intents: int = 0, final: bool = False) -> StepCompleted:
    return StepCompleted(
        id=derived_id("step", profile, step, final),
        event_time=dt(step + HOUR),
        correlation_id=f"step:{step}",
        profile=profile,
        step_time=dt(step),
        intents=intents,
        final=final,
    )


def execute_order(
    profile: str,
    side: str,
    *,
    product: str = "BTC/USDC",
    size: Any = "1",
    price: Any = 100,
    not_before: int | float = T0,
    intent_id: str | None = None,
    client_order_id: str | None = None,
    decided_at: int | None = None,
    internal_size: Any = 0,
    counterparties: Sequence[str] = (),
    profile_hash: str | None = None,
) -> ExecuteOrder:
    """`decided_at` (the order's event time, the candle it trades at) defaults to `not_before`."""
    iid = intent_id or derived_id("intent", profile, product, not_before, side)
    return ExecuteOrder(
        id=derived_id("execute", iid),
        event_time=dt(decided_at if decided_at is not None else not_before),
        correlation_id=f"step:{not_before}",
        intent_id=iid,
        client_order_id=client_order_id or derived_id("coid", iid),
        profile=profile,
        product=product,
        side=side,
        size=D(size),
        reference_price=D(price),
        reason="entry",
        step_time=dt((decided_at if decided_at is not None else not_before) - HOUR),
        not_before=dt(not_before),
        internal_size=D(internal_size),
        counterparties=list(counterparties),
        profile_hash=profile_hash,
    )


def order_filled(
    profile: str,
    side: str,
    *,
    product: str = "BTC/USDC",
    size: Any = "1",
    price: Any = 100,
    fee: Any = 0,
    at: int = T0,
    intent_id: str | None = None,
    fill_id: str | None = None,
) -> OrderFilled:
    iid = intent_id or derived_id("manual", profile, product, at, side, size, price)
    fid = fill_id or derived_id("fill", iid)
    return OrderFilled(
        id=fid,
        event_time=dt(at),
        correlation_id=f"fill:{iid}",
        fill_id=fid,
        intent_id=iid,
        client_order_id=derived_id("coid", iid),
        profile=profile,
        product=product,
        side=side,
        size=D(size),
        price=D(price),
        fee=D(fee),
    )


def approval_of(f: OrderFilled, *, size: Any = None, verdict: str = "approved") -> OrderDecided:
    """The arbiter's decision on the (manual) intent a fill answers, as it reaches orders.events first."""
    return OrderDecided(
        id=derived_id("decision", f.intent_id),
        event_time=f.event_time,
        correlation_id=f"manual:{f.intent_id[:16]}",
        intent_id=f.intent_id,
        profile=f.profile,
        product=f.product,
        side=f.side,
        size=D(size) if size is not None else f.size,
        verdict=verdict,
        rule="approved" if verdict != "rejected" else "test",
        reason="test",
    )


def manual_fill(profile: str, side: str, **kw: Any) -> list[Message]:
    """A fill of a manual order (an intent the strategy did not send), preceded by its approving decision."""
    f = order_filled(profile, side, **kw)
    return [approval_of(f), f]


def order_updated(
    intent: PlaceOrder, status: str, *, at: int | None = None, price: Any = None
) -> OrderUpdated:
    return OrderUpdated(
        id=derived_id("order-update", intent.intent_id, status),
        event_time=dt(at if at is not None else intent.event_time.timestamp()),
        correlation_id=intent.correlation_id,
        intent_id=intent.intent_id,
        client_order_id=derived_id("coid", intent.intent_id),
        profile=intent.profile,
        product=intent.product,
        side=intent.side,
        size=intent.size,
        filled_size=intent.size if status == "filled" else Decimal(0),
        price=D(price) if price is not None else None,
        status=status,
    )


def decided(intent: PlaceOrder, verdict: str, rule: str = "test") -> OrderDecided:
    return OrderDecided(
        id=derived_id("decision", intent.intent_id),
        event_time=intent.event_time,
        correlation_id=intent.correlation_id,
        intent_id=intent.intent_id,
        profile=intent.profile,
        product=intent.product,
        side=intent.side,
        size=intent.size,
        verdict=verdict,
        rule=rule,
        reason="test",
    )


def fill_for(intent: PlaceOrder, *, price: Any = None, fee: Any = 0) -> list[Message]:
    """What the execution worker reports for a filled intent: the fill, then the terminal update."""
    p = D(price) if price is not None else intent.reference_price
    at = int(intent.event_time.timestamp())
    f = order_filled(
        intent.profile,
        intent.side,
        product=intent.product,
        size=intent.size,
        price=p,
        fee=fee,
        at=at,
        intent_id=intent.intent_id,
    )
    return [f, order_updated(intent, "filled", at=at, price=p)]


def of_type(msgs: Iterable[Message], cls: type[Any]) -> list[Any]:
    return [m for m in msgs if isinstance(m, cls)]
