"""Run report, pure: from the messages of a run (candles, plans, intents, decisions, order events, fills, halts)
to the output records and summary. Messages are de-duplicated by id, so redelivered copies count once.

Accounting (per profile, quote currency; shared/book.py, the books of the strategy workers and the dashboards):
  cash        = initial + sell proceeds - buy costs - fees
  equity      = cash + sum(open position size * mark price)
  realised    = sum over sells of (sell price - average entry price) * size   (fees reported apart)
  a "win"     = a sell whose (price - average entry price) * size exceeds the fees of both its legs
  drawdown    = max over step closes of (running peak equity - equity) / running peak equity

Only fills the arbiter approved count (shared/book.py's rule, as the strategy workers and the live dashboards
apply it): a fill needs an approving `OrderDecided` for its intent of the same profile, product and side, and
an intent's fills never exceed the decided size in total, except the fills of a second order the exchange took
under the intent's client id (`duplicate_of`, live Exchange API: two workers of a profile both sent it), which are real and
booked beyond the intent's size. Any other fill (a forged record on orders.events) moves no books and is counted
in `counters.unverified_fills`. The report reads the whole run, so no wait is needed.

Why each order exists: every order and fill record carries `intent_reason` (entry, exit_signal, stop_loss,
take_profit, manual, flatten, halt), from its event, else from its intent (`PlaceOrder.reason`), else from
another event of the same order, else null. Per profile, `exits_by_reason` counts the sell orders (distinct
client order ids, internal legs alike) with at least one verified fill by that reason, and `orders_timed_out`
the orders cancelled at `order_timeout` (the paper exchange's cancel reason starts with "order_timeout").

Arbitration (docs/arbiter.md): decisions by verdict and rule, internal-cross opportunities and what netting
them saves, and `desync`. The gaps are measured on the order log: for each product, the exchange orders
(status submitted, not internal) in time order; a gap is the time between two consecutive orders of different
profiles (the smallest gap between two profiles' orders is always such a pair); `below_min` counts gaps under
`min_cross_profile_gap_ms`. The wash-trade count comes from the fills (`opposite_side_pairs`): two orders of
different profiles on one product and opposite sides form a pair when a (non-internal, verified) fill of one
falls inside the other's working life, from its first exchange event (its `submitted` event; a protective
order, whose first event is `open`, from its first fill) to its last fill + `conflict_window_s`; each pair of
orders once. `opposite_side_pairs_within_window` counts the pairs of arbitrated orders (must be 0);
`protective_opposite_pairs_within_window` the pairs where either order is a protective order (a stop loss or
take profit: a trigger order taking liquidity at its level, which cannot trade with another profile's market
order: reported, not prevented).
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from shared import book
from shared.config import AppConfig
from shared.messages import (
    AccountSnapshotted,
    CandleClosed,
    CorrelationAlert,
    InternalCrossOpportunity,
    Message,
    OrderDecided,
    OrderFilled,
    OrderUpdated,
    PlaceOrder,
    PlanPublished,
    ProfileHalted,
)
from shared.native import reduce_frozen

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The message types RunData keeps (add's branches below).
_KEPT = (
    CandleClosed,
    PlanPublished,
    PlaceOrder,
    OrderDecided,
    OrderUpdated,
    OrderFilled,
    ProfileHalted,
    InternalCrossOpportunity,
    CorrelationAlert,
    AccountSnapshotted,
)


def _iso(dt: Any) -> str:
    return str(dt.isoformat().replace("+00:00", "Z"))


def _num(d: Decimal) -> str:
    return format(d.normalize(), "f") if d == d.to_integral() else format(d, "f")


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class RunData:
    candles: list[CandleClosed] = field(default_factory=list)
    plans: list[PlanPublished] = field(default_factory=list)
    intents: list[PlaceOrder] = field(default_factory=list)
    decisions: list[OrderDecided] = field(default_factory=list)
    updates: list[OrderUpdated] = field(default_factory=list)
    fills: list[OrderFilled] = field(default_factory=list)
    halts: list[ProfileHalted] = field(default_factory=list)
    opportunities: list[InternalCrossOpportunity] = field(default_factory=list)
    correlation_alerts: list[CorrelationAlert] = field(default_factory=list)
    accounts: list[AccountSnapshotted] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def add_all(self, msgs: Iterable[Message]) -> None:
        for m in msgs:
            self.add(m)

    def add_candles(self, candles: Iterable[CandleClosed]) -> None:
        """`add` of each candle (the same key and check), without its tests of the message's type: the backtest
        adds every candle of every step."""
        seen = self._seen
        kept = self.candles
        for m in candles:
            key = f"{type(m).__name__}:{m.id}"
            if key in seen:
                continue
            seen.add(key)
            kept.append(m)

    def add(self, m: Message) -> None:
        if not isinstance(m, _KEPT):
            return  # e.g. step markers: the report keeps none (a backtest adds one per profile and step)
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
        elif isinstance(m, InternalCrossOpportunity):
            self.opportunities.append(m)
        elif isinstance(m, CorrelationAlert):
            self.correlation_alerts.append(m)
        elif isinstance(m, AccountSnapshotted):
            self.accounts.append(m)


# The reasons an exit (a sell) can have, each a key of summary.json's exits_by_reason (docs/monitoring.md).
EXIT_REASONS = ("exit_signal", "stop_loss", "take_profit", "flatten", "halt", "manual")


# Intent reasons of the protective orders the paper exchange holds for a position (docs/execution.md).
def exit_reason_order(reasons: Iterable[str]) -> list[str]:
    """Exit reasons in the order they are shown: EXIT_REASONS first (summary.json may sort its keys), others after."""
    given = set(reasons)
    return [r for r in EXIT_REASONS if r in given] + sorted(given - set(EXIT_REASONS))


PROTECTIVE_REASONS = frozenset({"stop_loss", "take_profit"})
TIMEOUT_PREFIX = "order_timeout"  # how the paper exchange's (and live worker's) timeout cancel reason starts


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class _Reasons:
    """An order event's intent reason: its own, else its intent's (PlaceOrder.reason), else that of another
    event of the same order (messages from before the field existed carry none)."""

    def __init__(self, data: RunData) -> None:
        self.by_intent: dict[str, str] = {}
        for i in data.intents:
            self.by_intent.setdefault(i.intent_id, i.reason)
        self.by_order: dict[str, str] = {}
        events: list[OrderUpdated | OrderFilled] = [*data.updates, *data.fills]
        for e in events:
            if e.intent_reason is not None:
                self.by_order.setdefault(e.client_order_id, e.intent_reason)

    def of(self, e: OrderUpdated | OrderFilled) -> str | None:
        if e.intent_reason is not None:
            return e.intent_reason
        return self.by_intent.get(e.intent_id) or self.by_order.get(e.client_order_id)


def order_records(data: RunData) -> list[dict[str, Any]]:
    reasons = _Reasons(data)
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
                "intent_reason": reasons.of(u),
            }
        )
    return out


def verified_fills(data: RunData) -> tuple[list[OrderFilled], list[tuple[OrderFilled, str]]]:
    """The fills an approving decision covers, in (event time, fill id) order, and the others with why (the rule
    is shared/book.py's, as the strategy workers and the live dashboards apply it)."""
    return book.verified_fills(data.fills, book.first_decisions(data.decisions))


def fill_records(data: RunData) -> list[dict[str, Any]]:
    reasons = _Reasons(data)
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
            "internal": f.internal,
            "intent_reason": reasons.of(f),
            "candle_open": _iso(f.candle_open) if f.candle_open is not None else None,
            # Only on a duplicate order's fill: every other record keeps the fields it always had.
            **({"duplicate_of": f.duplicate_of} if f.duplicate_of is not None else {}),
        }
        for f in sorted(verified_fills(data)[0], key=lambda f: (f.event_time, f.profile, f.fill_id))
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
            "not_before": _iso(d.not_before) if d.not_before is not None else None,
            "requested_size": _num(d.requested_size) if d.requested_size is not None else None,
            "details": d.details,
        }
        for d in sorted(data.decisions, key=lambda d: (d.event_time, d.profile, d.intent_id))
    ]


def opportunity_records(data: RunData) -> list[dict[str, Any]]:
    return [
        {
            "product": o.product,
            "buyer": o.buyer,
            "seller": o.seller,
            "buy_intent_id": o.buy_intent_id,
            "sell_intent_id": o.sell_intent_id,
            "size": _num(o.size),
            "price": _num(o.price),
            "fee_saving": _num(o.fee_saving),
            "slippage_saving": _num(o.slippage_saving),
            "saving": _num(o.saving),
            "executed": o.executed,
            "event_time": _iso(o.event_time),
        }
        for o in sorted(data.opportunities, key=lambda o: (o.event_time, o.product, o.id))
    ]


def _us(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(microseconds=1)  # exact, unlike float seconds


def _stats_ms(gaps_us: list[int]) -> dict[str, Any]:
    if not gaps_us:
        return {"pairs": 0, "min_ms": None, "median_ms": None, "p95_ms": None}
    g = sorted(gaps_us)
    n = len(g)
    median = g[n // 2] if n % 2 else (g[n // 2 - 1] + g[n // 2]) / 2
    p95 = g[max(0, -(-95 * n // 100) - 1)]  # nearest rank
    return {"pairs": n, "min_ms": g[0] / 1000, "median_ms": median / 1000, "p95_ms": p95 / 1000}


def _us_iso(s: str) -> int:
    return _us(datetime.fromisoformat(s.replace("Z", "+00:00")))


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class WorkingOrder:
    """An order that traded at the exchange, for the wash-trade count: its non-internal fill times (sorted) and
    the start of its working life (its `submitted` event; a protective order's first fill), in microseconds."""

    client_order_id: str
    profile: str
    product: str
    side: str
    start_us: int
    fills_us: tuple[int, ...]
    protective: bool

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


def working_orders(
    orders: Iterable[Mapping[str, Any]], fills: Iterable[Mapping[str, Any]]
) -> list[WorkingOrder]:
    """The orders with at least one non-internal fill, from order and fill records (orders.jsonl and
    fills.jsonl rows). A stop loss or take profit is protective: a trigger order that takes liquidity once its
    level is reached, so it cannot trade with another profile's market order (docs/execution.md)."""
    submitted: dict[str, int] = {}
    reason: dict[str, str] = {}
    for o in orders:
        coid = o["client_order_id"]
        if o.get("intent_reason"):
            reason.setdefault(coid, o["intent_reason"])
        if o["status"] == "submitted" and not o.get("internal"):
            t = _us_iso(o["event_time"])
            submitted[coid] = min(t, submitted.get(coid, t))
    traded: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for f in fills:
        if not f.get("internal"):
            traded[f["client_order_id"]].append(f)
    out = []
    for coid, fs in sorted(traded.items()):
        times = tuple(sorted(_us_iso(f["event_time"]) for f in fs))
        f0 = fs[0]
        why = next((f["intent_reason"] for f in fs if f.get("intent_reason")), reason.get(coid))
        out.append(
            WorkingOrder(
                client_order_id=coid,
                profile=f0["profile"],
                product=f0["product"],
                side=f0["side"],
                start_us=min(submitted.get(coid, times[0]), times[0]),
                fills_us=times,
                protective=why in PROTECTIVE_REASONS,
            )
        )
    return out


def opposite_side_pairs(
    orders: list[WorkingOrder], window_us: int
) -> list[tuple[WorkingOrder, WorkingOrder]]:
    """The pairs of orders of different profiles on one product and opposite sides where a fill of one falls in
    the other's working life [start, last fill + window); each unordered pair once, in time order."""
    by_product: dict[str, list[tuple[int, int]]] = defaultdict(list)  # product -> (fill time, order index)
    for n, o in enumerate(orders):
        by_product[o.product].extend((t, n) for t in o.fills_us)
    for series in by_product.values():
        series.sort()
    found: set[tuple[int, int]] = set()
    for n, a in enumerate(orders):
        series = by_product[a.product]
        lo = bisect.bisect_left(series, (a.start_us, -1))
        hi = bisect.bisect_left(series, (a.fills_us[-1] + window_us, -1))
        for _, m in series[lo:hi]:
            b = orders[m]
            if b.profile != a.profile and b.side != a.side:
                found.add((min(n, m), max(n, m)))
    pairs = [(orders[n], orders[m]) for n, m in found]
    pairs.sort(key=lambda p: (min(p[0].start_us, p[1].start_us), p[0].client_order_id, p[1].client_order_id))
    return pairs


def desync_report(cfg: AppConfig, data: RunData) -> dict[str, Any]:
    """Time gaps between different profiles' exchange orders on one product, and the opposite-side pairs
    from the fills (see the module docstring)."""
    window_us = int(cfg.system.arbiter.conflict_window_s * 1_000_000)
    min_gap_us = cfg.system.arbiter.min_cross_profile_gap_ms * 1000
    by_product: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for u in data.updates:
        if u.status == "submitted" and not u.internal:
            by_product[u.product].append((_us(u.event_time), u.profile, u.side))
    gaps: list[int] = []
    for orders in by_product.values():
        orders.sort()
        for (t1, p1, _), (t2, p2, _) in itertools.pairwise(orders):
            if p1 != p2:
                gaps.append(t2 - t1)
    working = working_orders(order_records(data), fill_records(data))
    pairs = opposite_side_pairs(working, window_us)
    protective = sum(1 for a, b in pairs if a.protective or b.protective)
    return {
        "min_cross_profile_gap_ms": cfg.system.arbiter.min_cross_profile_gap_ms,
        "gaps": _stats_ms(gaps),
        "gaps_within_window": _stats_ms([g for g in gaps if g < window_us]),
        "below_min": sum(1 for g in gaps if g < min_gap_us),
        "opposite_side_pairs_within_window": len(pairs) - protective,
        "protective_opposite_pairs_within_window": protective,
    }


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


_INFINITY = Decimal("Infinity")
_ZERO = Decimal(0)


def _mark(
    closes: dict[str, list[tuple[float, Decimal]]], product: str, t: float, fallback: Decimal
) -> Decimal:
    """The last close of the product at or before t (the price an open position is valued at)."""
    series = closes.get(product, [])
    i = bisect.bisect_right(series, (t, _INFINITY)) - 1
    return series[i][1] if i >= 0 else fallback


def untracked_holdings(
    snapshot: AccountSnapshotted | None, positions: Mapping[str, Decimal], quote: str
) -> dict[str, str]:
    """What the account holds beyond the books' open positions (from the verified fills), by base asset: the
    holdings the system did not trade (a manual buy on the website), as of the profile's latest account
    snapshot. Beyond dust only (the larger of the size increment, 1e-8 and 0.01 % of the holding); a paper
    account never has any (its snapshots are its books)."""
    if snapshot is None:
        return {}
    books: dict[str, Decimal] = defaultdict(Decimal)
    for product, size in positions.items():
        books[product.split("/", 1)[0]] += size
    out: dict[str, str] = {}
    for asset, b in sorted(snapshot.balances.items()):
        if asset == quote:
            continue
        extra = b.total - books.get(asset, _ZERO)
        dust = max(b.size_increment or _ZERO, Decimal("0.00000001"), Decimal("0.0001") * b.total)
        if extra > dust:
            out[asset] = _num(extra)
    return out


def summarize(cfg: AppConfig, data: RunData) -> dict[str, Any]:
    closes: dict[str, list[tuple[float, Decimal]]] = defaultdict(list)
    step_times: set[float] = set()
    for c in data.candles:
        close_t = c.event_time.timestamp()
        closes[c.product].append((close_t, c.close))
        step_times.add(close_t)
    for series in closes.values():
        series.sort()
    counted, unverified = verified_fills(data)
    fills_by_profile: dict[str, list[OrderFilled]] = defaultdict(list)
    for f in counted:
        fills_by_profile[f.profile].append(f)
    times = sorted(step_times)
    iso_times = {t: _iso_ts(t) for t in times}  # every profile's equity curve has a point at each step
    exits, timed_out = exits_by_reason(cfg, data, counted), orders_timed_out(data)

    latest_account: dict[str, AccountSnapshotted] = {}
    first_account: dict[str, AccountSnapshotted] = {}
    for acc in sorted(data.accounts, key=lambda a: (a.event_time, a.id)):
        latest_account[acc.profile] = acc
        if acc.source == "exchange":
            first_account.setdefault(acc.profile, acc)
    live = cfg.system.mode == "live"
    profiles: dict[str, Any] = {}
    for pid, p in cfg.enabled_profiles().items():
        # Live: the books start from the account's quote balance at the first snapshot (what the strategy's
        # books start from too); holdings it did not trade stay apart (`untracked_holdings`), not in the return.
        first = first_account.get(pid) if live else None
        initial = Decimal(str(p.paper.initial_quote_balance))
        if first is not None:
            quote_balance = first.balances.get(first.quote)
            initial = quote_balance.total if quote_balance is not None else Decimal(0)
        fills = sorted(fills_by_profile.get(pid, []), key=lambda f: (f.event_time, f.fill_id))
        books = book.Book.starting(initial)
        curve: list[tuple[float, Decimal]] = []
        fi = 0

        held: list[tuple[str, Decimal]] = []  # the open positions, as of the last fill
        for t in [*times, float("inf")]:
            if fi < len(fills) and fills[fi].event_time.timestamp() <= t:
                held = []  # positions change below
            while fi < len(fills) and fills[fi].event_time.timestamp() <= t:
                books.apply(fills[fi])
                fi += 1
            if t != float("inf"):
                if not held:
                    held = [(prod, s) for prod, s in books.positions.items() if s]
                curve.append(
                    (
                        t,
                        books.cash
                        + sum((s * _mark(closes, prod, t, books.avg_price(prod)) for prod, s in held), _ZERO),
                    )
                )
        peak = initial
        max_dd = Decimal(0)
        for _, eq in curve:
            peak = max(peak, eq)
            if peak > 0:
                max_dd = max(max_dd, (peak - eq) / peak * 100)
        last_t = max(step_times) if step_times else 0.0
        open_positions = books.open_positions()
        marks = {prod: _mark(closes, prod, last_t, books.avg_price(prod)) for prod in open_positions}
        final = (
            initial
            + books.sells
            - books.buys
            - books.fees
            + sum((s * marks[prod] for prod, s in open_positions.items()), Decimal(0))
        )
        plans = [pl for pl in data.plans if pl.profile == pid]
        strategies = Counter(pl.strategy for pl in plans)
        profiles[pid] = {
            "name": p.name,
            "strategy": strategies.most_common(1)[0][0] if strategies else None,
            "strategies_by_epoch": dict(sorted(strategies.items())),
            "epochs": len(plans),
            "trades": len(fills),
            "closed_trades": books.closed,
            "wins": books.wins,
            "win_rate": round(books.wins / books.closed, 4) if books.closed else 0.0,
            "realized_pnl": _num(books.realized.quantize(Decimal("0.00000001"))),
            "fees": _num(books.fees),
            "buy_costs": _num(books.buys),
            "sell_proceeds": _num(books.sells),
            "initial_equity": _num(initial),
            "initial_equity_source": (
                "exchange account" if first is not None else "paper.initial_quote_balance"
            ),
            "final_equity": _num(final.quantize(Decimal("0.00000001"))),
            "return_pct": float(round((final / initial - 1) * 100, 4)) if initial > 0 else 0.0,
            "max_drawdown_pct": float(round(max_dd, 4)),
            "open_positions": {k: _num(v) for k, v in open_positions.items()},
            "mark_prices": {k: _num(v) for k, v in marks.items()},
            "untracked_holdings": untracked_holdings(
                latest_account.get(pid), open_positions, cfg.system.quote_asset
            ),
            "halts": [_halt_record(h) for h in sorted(data.halts, key=_halt_order) if h.profile == pid],
            "exits_by_reason": exits[pid],
            "orders_timed_out": timed_out.get(pid, 0),
            "equity_curve": [[iso_times[t], float(e)] for t, e in curve],
        }
    verdicts = Counter(d.verdict for d in data.decisions)
    by_rule = Counter(d.rule for d in data.decisions if d.verdict == "rejected")
    decided: dict[str, dict[str, int]] = defaultdict(dict)
    for (v, r), n in sorted(Counter((d.verdict, d.rule) for d in data.decisions).items()):
        decided[v][r] = n
    savings = {
        "fees": _num(sum((o.fee_saving for o in data.opportunities), Decimal(0))),
        "slippage": _num(sum((o.slippage_saving for o in data.opportunities), Decimal(0))),
        "total": _num(sum((o.saving for o in data.opportunities), Decimal(0))),
    }
    a = cfg.system.arbiter
    return {
        "profiles": profiles,
        "counters": {
            "intents": len(data.intents),
            "approved": verdicts.get("approved", 0),
            "rejected": verdicts.get("rejected", 0),
            "rejected_by_rule": dict(sorted(by_rule.items())),
            "delayed": verdicts.get("delayed", 0),
            "decisions_by_rule": dict(decided),
            "internal_cross_opportunities": len(data.opportunities),
            "internal_cross_executed": sum(1 for o in data.opportunities if o.executed),
            "internal_cross_savings": savings,
            "internal_fills": sum(1 for f in counted if f.internal),
            "unverified_fills": len(unverified),
            "correlation_breaches": sum(1 for c in data.correlation_alerts if c.state == "breach"),
            "collisions_resolved": sum(pl.collisions for pl in data.plans),
            "plans": len(data.plans),
            "orders_filled": sum(1 for u in data.updates if u.status == "filled"),
            "orders_cancelled": sum(1 for u in data.updates if u.status == "cancelled"),
            "orders_rejected": sum(1 for u in data.updates if u.status == "rejected"),
            "halts": len(data.halts),
            "exits_by_reason": {
                r: sum(e.get(r, 0) for e in exits.values())
                for r in dict.fromkeys(k for e in exits.values() for k in e) or EXIT_REASONS
            },
            "orders_timed_out": sum(timed_out.values()),
        },
        "desync": desync_report(cfg, data),
        "settings": {
            "conflict_window_s": a.conflict_window_s,
            "min_cross_profile_gap_ms": a.min_cross_profile_gap_ms,
            "internal_cross": a.internal_cross,
            "max_product_notional": a.max_product_notional,
            "max_total_notional": a.max_total_notional,
            "correlation_threshold": a.correlation_threshold,
            "desync_min_ms": cfg.system.execution.desync_min_ms,
            "desync_max_ms": cfg.system.execution.desync_max_ms,
            "mode": cfg.system.mode,
            "quote_asset": cfg.system.quote_asset,
        },
        "span": {
            "first_candle": _iso_ts(min(step_times)) if step_times else None,
            "last_close": _iso_ts(last_t) if step_times else None,
            "steps": len(step_times),
        },
    }


def exits_by_reason(
    cfg: AppConfig, data: RunData, counted: list[OrderFilled] | None = None
) -> dict[str, dict[str, int]]:
    """Per enabled profile: the sell orders (distinct client order ids, internal legs alike) with at least
    one verified fill, by intent reason; every reason of EXIT_REASONS present, "unknown" (no reason known)
    and any other reason only when counted."""
    fills = verified_fills(data)[0] if counted is None else counted
    reasons = _Reasons(data)
    seen: dict[str, dict[str, str]] = defaultdict(dict)  # profile -> client order id -> reason
    for f in fills:
        if f.side == "sell":
            seen[f.profile].setdefault(f.client_order_id, reasons.of(f) or "unknown")
    out: dict[str, dict[str, int]] = {}
    for pid in cfg.enabled_profiles():
        n = Counter(seen.get(pid, {}).values())
        out[pid] = {r: n.get(r, 0) for r in EXIT_REASONS} | {
            r: k for r, k in sorted(n.items()) if r not in EXIT_REASONS
        }
    return out


def orders_timed_out(data: RunData) -> dict[str, int]:
    """Per profile: the orders (distinct client order ids) cancelled because of order_timeout."""
    coids: dict[str, set[str]] = defaultdict(set)
    for u in data.updates:
        if u.status == "cancelled" and u.reason.startswith(TIMEOUT_PREFIX):
            coids[u.profile].add(u.client_order_id)
    return {pid: len(c) for pid, c in coids.items()}


def halt_kind(reason: str) -> str:
    """drawdown / daily_loss / other, from the halt reason's first word ("daily loss ..." is daily_loss)."""
    first = reason.split(" ", 1)[0].lower() if reason else ""
    if first == "drawdown":
        return "drawdown"
    if first in ("daily", "daily_loss"):
        return "daily_loss"
    return "other"


def _halt_order(h: ProfileHalted) -> tuple[datetime, str]:
    return h.event_time, h.id


def _halt_record(h: ProfileHalted) -> dict[str, Any]:
    return {
        "event_time": _iso(h.event_time),
        "at": _iso(h.event_time),  # the earlier name of event_time, kept for readers of older summaries
        "reason": h.reason,
        "until": _iso(h.until) if h.until is not None else None,
        "kind": halt_kind(h.reason),
    }


def _iso_ts(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")
