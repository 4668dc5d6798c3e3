"""Run report, pure: from the messages of a run (candles, plans, intents, decisions, order events, fills, halts)
to the output records and summary. Messages are de-duplicated by id, so redelivered copies count once.

Accounting (per profile, quote currency):
  cash        = initial + sell proceeds - buy costs - fees
  equity      = cash + sum(open position size * mark price)
  realised    = sum over sells of (sell price - average entry price) * size   (fees reported apart)
  a "win"     = a sell whose (price - average entry price) * size exceeds the fees of both its legs
  drawdown    = max over step closes of (running peak equity - equity) / running peak equity
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from shared.config import AppConfig
from shared.messages import (
    CandleClosed,
    Message,
    OrderDecided,
    OrderFilled,
    OrderUpdated,
    PlaceOrder,
    PlanPublished,
    ProfileHalted,
)


def _iso(dt: Any) -> str:
    return str(dt.isoformat().replace("+00:00", "Z"))


def _num(d: Decimal) -> str:
    return format(d.normalize(), "f") if d == d.to_integral() else format(d, "f")


@dataclass
class RunData:
    candles: list[CandleClosed] = field(default_factory=list)
    plans: list[PlanPublished] = field(default_factory=list)
    intents: list[PlaceOrder] = field(default_factory=list)
    decisions: list[OrderDecided] = field(default_factory=list)
    updates: list[OrderUpdated] = field(default_factory=list)
    fills: list[OrderFilled] = field(default_factory=list)
    halts: list[ProfileHalted] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def add_all(self, msgs: Iterable[Message]) -> None:
        for m in msgs:
            self.add(m)

    def add(self, m: Message) -> None:
        key = f"{type(m).__name__}:{m.id}"
        if key in self._seen:
            return
        self._seen.add(key)
        if isinstance(m, CandleClosed):
            self.candles.append(m)
        elif isinstance(m, PlanPublished):
            self.plans.append(m)
        elif isinstance(m, PlaceOrder):
            self.intents.append(m)
        elif isinstance(m, OrderDecided):
            self.decisions.append(m)
        elif isinstance(m, OrderUpdated):
            self.updates.append(m)
        elif isinstance(m, OrderFilled):
            self.fills.append(m)
        elif isinstance(m, ProfileHalted):
            self.halts.append(m)


def order_records(data: RunData) -> list[dict[str, Any]]:
    out = []
    for u in sorted(data.updates, key=lambda u: (u.event_time, u.profile, u.client_order_id)):
        out.append(
            {
                "profile": u.profile,
                "product": u.product,
                "side": u.side,
                "size": _num(u.size),
                "price": _num(u.price) if u.price is not None else None,
                "fee": _num(u.fee),
                "status": u.status,
                "client_order_id": u.client_order_id,
                "intent_id": u.intent_id,
                "event_time": _iso(u.event_time),
                "reason": u.reason,
                "internal": u.internal,
            }
        )
    return out


def fill_records(data: RunData) -> list[dict[str, Any]]:
    return [
        {
            "profile": f.profile,
            "product": f.product,
            "side": f.side,
            "size": _num(f.size),
            "price": _num(f.price),
            "fee": _num(f.fee),
            "fill_id": f.fill_id,
            "client_order_id": f.client_order_id,
            "intent_id": f.intent_id,
            "event_time": _iso(f.event_time),
        }
        for f in sorted(data.fills, key=lambda f: (f.event_time, f.profile, f.fill_id))
    ]


def decision_records(data: RunData) -> list[dict[str, Any]]:
    return [
        {
            "intent_id": d.intent_id,
            "profile": d.profile,
            "product": d.product,
            "side": d.side,
            "size": _num(d.size),
            "verdict": d.verdict,
            "rule": d.rule,
            "reason": d.reason,
            "conflicting_profile": d.conflicting_profile,
            "event_time": _iso(d.event_time),
        }
        for d in sorted(data.decisions, key=lambda d: (d.event_time, d.profile, d.intent_id))
    ]


def plan_records(data: RunData) -> list[dict[str, Any]]:
    return [
        {
            "epoch": p.epoch,
            "profile": p.profile,
            "epoch_start": _iso(p.epoch_start),
            "epoch_end": _iso(p.epoch_end),
            "hash": p.hash,
            "nonce": p.nonce,
            "strategy": p.strategy,
            "parameters": p.parameters,
            "assets": p.assets,
            "random_asset": p.random_asset,
            "fingerprint": p.fingerprint,
            "collisions": p.collisions,
        }
        for p in sorted(data.plans, key=lambda p: (p.epoch_start, p.profile))
    ]


def _mark(closes: dict[str, list[tuple[float, Decimal]]], product: str, t: float, fallback: Decimal) -> Decimal:
    """The last close of the product at or before t (the price an open position is valued at)."""
    series = closes.get(product, [])
    i = bisect.bisect_right(series, (t, Decimal("Infinity"))) - 1
    return series[i][1] if i >= 0 else fallback


def summarize(cfg: AppConfig, data: RunData) -> dict[str, Any]:
    closes: dict[str, list[tuple[float, Decimal]]] = defaultdict(list)
    step_times: set[float] = set()
    for c in data.candles:
        closes[c.product].append((c.event_time.timestamp(), c.close))
        step_times.add(c.event_time.timestamp())
    for series in closes.values():
        series.sort()
    fills_by_profile: dict[str, list[OrderFilled]] = defaultdict(list)
    for f in data.fills:
        fills_by_profile[f.profile].append(f)

    profiles: dict[str, Any] = {}
    for pid, p in cfg.enabled_profiles().items():
        initial = Decimal(str(p.paper.initial_quote_balance))
        fills = sorted(fills_by_profile.get(pid, []), key=lambda f: (f.event_time, f.fill_id))
        cash = initial
        pos: dict[str, Decimal] = defaultdict(Decimal)
        avg: dict[str, Decimal] = defaultdict(Decimal)
        entry_fee: dict[str, Decimal] = defaultdict(Decimal)
        realized = fees = buys = sells = Decimal(0)
        wins = closed = 0
        curve: list[tuple[float, Decimal]] = []
        fi = 0

        for t in [*sorted(step_times), float("inf")]:
            while fi < len(fills) and fills[fi].event_time.timestamp() <= t:
                f = fills[fi]
                fi += 1
                notional = f.size * f.price
                fees += f.fee
                if f.side == "buy":
                    new_size = pos[f.product] + f.size
                    avg[f.product] = (avg[f.product] * pos[f.product] + notional) / new_size
                    pos[f.product] = new_size
                    entry_fee[f.product] += f.fee
                    cash -= notional + f.fee
                    buys += notional
                else:
                    sold = min(f.size, pos[f.product])
                    gain = (f.price - avg[f.product]) * sold
                    share = entry_fee[f.product] * (sold / pos[f.product]) if pos[f.product] else Decimal(0)
                    realized += gain
                    closed += 1
                    if gain - share - f.fee > 0:
                        wins += 1
                    entry_fee[f.product] -= share
                    pos[f.product] -= sold
                    cash += notional - f.fee
                    sells += notional
            if t != float("inf"):
                curve.append((t, cash + sum((s * _mark(closes, prod, t, avg[prod]) for prod, s in pos.items() if s), Decimal(0))))
        peak = initial
        max_dd = Decimal(0)
        for _, eq in curve:
            peak = max(peak, eq)
            if peak > 0:
                max_dd = max(max_dd, (peak - eq) / peak * 100)
        last_t = max(step_times) if step_times else 0.0
        open_positions = {prod: size for prod, size in sorted(pos.items()) if size}
        marks = {prod: _mark(closes, prod, last_t, avg[prod]) for prod in open_positions}
        final = initial + sells - buys - fees + sum((s * marks[prod] for prod, s in open_positions.items()), Decimal(0))
        plans = [pl for pl in data.plans if pl.profile == pid]
        strategies = Counter(pl.strategy for pl in plans)
        profiles[pid] = {
            "name": p.name,
            "strategy": strategies.most_common(1)[0][0] if strategies else None,
            "strategies_by_epoch": dict(sorted(strategies.items())),
            "epochs": len(plans),
            "trades": len(fills),
            "closed_trades": closed,
            "wins": wins,
            "win_rate": round(wins / closed, 4) if closed else 0.0,
            "realized_pnl": _num(realized.quantize(Decimal("0.00000001"))),
            "fees": _num(fees),
            "buy_costs": _num(buys),
            "sell_proceeds": _num(sells),
            "initial_equity": _num(initial),
            "final_equity": _num(final.quantize(Decimal("0.00000001"))),
            "return_pct": float(round((final / initial - 1) * 100, 4)),
            "max_drawdown_pct": float(round(max_dd, 4)),
            "open_positions": {k: _num(v) for k, v in open_positions.items()},
            "mark_prices": {k: _num(v) for k, v in marks.items()},
            "halts": [{"reason": h.reason, "at": _iso(h.event_time)} for h in data.halts if h.profile == pid],
            "equity_curve": [[_iso_ts(t), float(e)] for t, e in curve],
        }
    verdicts = Counter(d.verdict for d in data.decisions)
    by_rule = Counter(d.rule for d in data.decisions if d.verdict == "rejected")
    return {
        "profiles": profiles,
        "counters": {
            "intents": len(data.intents),
            "approved": verdicts.get("approved", 0),
            "rejected": verdicts.get("rejected", 0),
            "rejected_by_rule": dict(sorted(by_rule.items())),
            "collisions_resolved": sum(pl.collisions for pl in data.plans),
            "plans": len(data.plans),
            "orders_filled": sum(1 for u in data.updates if u.status == "filled"),
            "orders_cancelled": sum(1 for u in data.updates if u.status == "cancelled"),
            "orders_rejected": sum(1 for u in data.updates if u.status == "rejected"),
            "halts": len(data.halts),
        },
        "settings": {
            "conflict_window_s": cfg.system.arbiter.conflict_window_s,
            "mode": cfg.system.mode,
            "quote_asset": cfg.system.quote_asset,
        },
        "span": {
            "first_candle": _iso_ts(min(step_times)) if step_times else None,
            "last_close": _iso_ts(last_t) if step_times else None,
            "steps": len(step_times),
        },
    }


def _iso_ts(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")
