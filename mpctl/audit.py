"""`mpctl audit --run DIR`: an independent check of a run's output files against the rules of issue #14.

It reads only what a run wrote (orders.jsonl, fills.jsonl, decisions.jsonl, summary.json), the candle files
and the config, and recomputes everything it checks from them: no service code is called, except
`mpctl.invariants.check_run` for the books and the DESIGN.md invariants it already checks. docs/audit.md
says what each check means.

Checks (the names in the report):
- 1-fill-in-candle: every fill's price lies within [low, high] of its product's candle containing its time.
- 2-stop-in-candle, 2-stop-first, 2-stop-price: a position's stop or take-profit acts on the first candle
  whose range reaches its level; the stop acts when both are reached; a stop fills no worse than
  min(level, open) * (1 - slippage_tolerance) and not below the candle's low.
- 3-self-overlap, 3-sell-beyond-position, 3-buy-while-held: one working order per profile and product; sells
  within the position held at the fill's time; one entry per position (long only).
- 4-wash-trade, 4-summary-count: no opposite-side fill of another profile during an order's working life
  plus conflict_window_s after its last fill (protective pairs are reported apart, as information).
- 5-liquidity: per product and candle, all profiles' exchange fills together take at most
  max_volume_participation of the candle's volume.
- 6-halt-stamp, 6-halt-close, 6-halt-entry: a drawdown or daily-loss halt is stamped at the close of the step
  whose equity breached, closes the positions by the next candle (close_on_halt) and blocks entries.
- 7-intent-reason, 7-exits-by-reason, 7-orders-timed-out: every order and fill record says why; the summary
  counts exits by reason and timed-out orders as the files do.
- position-limit: max_open_positions per profile, from the fills in time order.
- invariants:<name>: what mpctl.invariants.check_run finds (the books, DESIGN.md invariants 1 to 4).
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from shared.config import AppConfig

__all__ = [
    "CHECKS",
    "REASONS",
    "AuditInputError",
    "AuditReport",
    "CandleBar",
    "Candles",
    "Fill",
    "Limits",
    "Order",
    "Run",
    "audit",
    "audit_run",
    "load_candles",
    "load_run",
    "register",
    "run_command",
]

REASONS = frozenset({"entry", "exit_signal", "stop_loss", "take_profit", "manual", "flatten", "halt"})
PROTECTIVE = frozenset({"stop_loss", "take_profit"})
TERMINAL = frozenset({"filled", "cancelled", "rejected"})
CHECKS: dict[str, str] = {
    "1-fill-in-candle": "a fill priced outside [low, high] of its candle (or with no candle at its time)",
    "2-stop-in-candle": "a stop or take-profit level reached by a candle without an exit on that candle",
    "2-stop-first": "a candle reached both levels and the take-profit, not the stop, acted",
    "2-stop-price": "a stop exit priced below min(level, open) * (1 - slippage_tolerance) or the candle low",
    "3-self-overlap": "an order submitted while another order of the profile on the product was working",
    "3-sell-beyond-position": "a sell fill larger than the position held at its time",
    "3-buy-while-held": "a buy fill of a new order in a product already held",
    "4-wash-trade": "another profile's opposite-side fill during an order's working life plus the window",
    "4-summary-count": "summary desync.opposite_side_pairs_within_window differs from the fills' count",
    "5-liquidity": "a candle's exchange fills over all profiles above max_volume_participation of its volume",
    "6-halt-stamp": "a halt stamped before the close of the step whose equity breached the limit",
    "6-halt-close": "a position still open after the next candle following a drawdown/daily-loss halt",
    "6-halt-entry": "an entry submitted while a drawdown/daily-loss halt blocks entries",
    "7-intent-reason": "an order or fill record without a known intent_reason",
    "7-exits-by-reason": "summary exits_by_reason missing or different from the files",
    "7-orders-timed-out": "summary orders_timed_out missing or different from the files",
    "position-limit": "more open positions than max_open_positions",
}
MAX_EXAMPLES = 5
EPS = Decimal("0.00000001")  # sizes and prices are written with 8 decimals
HALT_TOL_PCT = Decimal("0.005")  # the halt reasons round the drawdown and daily loss to 2 decimals
US = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class AuditInputError(ValueError):
    """A run directory, file or record that cannot be audited; the message names the file and line."""


# ------------------------------------------------------------------------------------------ records
def _us(text: str) -> int:
    """An ISO time (a trailing Z allowed) as integer microseconds since the epoch (exact, no float)."""
    d = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if d.tzinfo is None:
        d = d.replace(tzinfo=UTC)
    return (d - _EPOCH) // timedelta(microseconds=1)


def _iso(us: int) -> str:
    if us >= INF:
        return "never"
    d = _EPOCH + timedelta(microseconds=us)
    return d.strftime("%Y-%m-%dT%H:%M:%S") + (f".{d.microsecond:06d}Z" if d.microsecond else "Z")


INF = 2**62


def _n(d: Decimal) -> str:
    return format(d.normalize(), "f") if d == d.to_integral_value() or abs(d) < 1 else f"{d:.8f}".rstrip("0")


@dataclass(frozen=True)
class Fill:
    profile: str
    product: str
    side: str
    size: Decimal
    price: Decimal
    fee: Decimal
    t: int  # event time, microseconds since the epoch
    client_order_id: str
    intent_id: str
    internal: bool = False
    intent_reason: str | None = None
    fill_id: str = ""
    where: str = ""  # file:line, for messages
    candle_us: int | None = None  # `candle_open`: the candle whose range priced it (paper), when recorded

    @property
    def priced_at(self) -> int:
        """A time inside the candle that priced the fill: a protective exit is priced on the candle that reached
        its level and booked when that is known (at its close); other fills on the candle of their time."""
        return self.candle_us if self.candle_us is not None else self.t


@dataclass
class OrderEvent:
    status: str
    t: int
    reason: str = ""
    internal: bool = False
    intent_reason: str | None = None
    where: str = ""


@dataclass
class Order:
    client_order_id: str
    profile: str
    product: str
    side: str
    intent_id: str
    events: list[OrderEvent] = field(default_factory=list)

    @property
    def intent_reason(self) -> str | None:
        return next((e.intent_reason for e in self.events if e.intent_reason is not None), None)

    @property
    def final(self) -> OrderEvent | None:
        return next((e for e in self.events if e.status in TERMINAL), None)

    @property
    def resting_first(self) -> bool:
        """A protective order: its first event says "open" (resting at the exchange), not "submitted"."""
        return bool(self.events) and self.events[0].status == "open"

    @property
    def internal_only(self) -> bool:
        sub = next((e for e in self.events if e.status == "submitted"), None)
        return sub is not None and sub.internal


@dataclass(frozen=True)
class CandleBar:
    open_us: int
    interval_us: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal

    @property
    def close_us(self) -> int:
        return self.open_us + self.interval_us


class Candles:
    """Each product's candles in time order, found by the time they contain."""

    def __init__(self, by_product: Mapping[str, Sequence[CandleBar]]) -> None:
        self.bars = {p: sorted(bs, key=lambda b: b.open_us) for p, bs in by_product.items()}
        self._opens = {p: [b.open_us for b in bs] for p, bs in self.bars.items()}

    def at(self, product: str, t: int) -> CandleBar | None:
        """The candle with open <= t < open + interval, if any."""
        opens = self._opens.get(product)
        if not opens:
            return None
        i = bisect.bisect_right(opens, t) - 1
        if i < 0:
            return None
        b = self.bars[product][i]
        return b if t < b.close_us else None

    def from_time(self, product: str, t: int) -> list[CandleBar]:
        """The candle containing t (if any) and every later one."""
        opens = self._opens.get(product, [])
        i = bisect.bisect_right(opens, t) - 1
        bars = self.bars.get(product, [])
        if i >= 0 and t >= bars[i].close_us:
            i += 1
        return bars[max(i, 0) :]

    def first_opening_at_or_after(self, product: str, t: int) -> CandleBar | None:
        opens = self._opens.get(product, [])
        i = bisect.bisect_left(opens, t)
        return self.bars[product][i] if i < len(opens) else None

    def closes(self) -> list[int]:
        return sorted({b.close_us for bs in self.bars.values() for b in bs})


@dataclass(frozen=True)
class Limits:
    """A profile's settings that the rules use."""

    stop_loss_pct: Decimal
    take_profit_pct: Decimal
    slippage_tolerance: Decimal
    max_open_positions: int
    max_drawdown_pct: Decimal
    max_daily_loss_pct: Decimal
    close_on_halt: bool = True
    initial_equity: Decimal = Decimal(10_000)

    @staticmethod
    def of(cfg: AppConfig, pid: str) -> Limits:
        p = cfg.profiles[pid]
        rm, tp = p.risk_management, p.trading_params
        return Limits(
            stop_loss_pct=Decimal(str(rm.stop_loss_pct)),
            take_profit_pct=Decimal(str(rm.take_profit_pct)),
            slippage_tolerance=Decimal(str(tp.slippage_tolerance)),
            max_open_positions=tp.max_open_positions,
            max_drawdown_pct=Decimal(str(rm.max_drawdown_pct)),
            max_daily_loss_pct=Decimal(str(rm.max_daily_loss_pct)),
            close_on_halt=rm.close_on_halt,
            initial_equity=Decimal(str(p.paper.initial_quote_balance)),
        )


@dataclass
class Run:
    """A run's records, parsed; the checks are pure functions of it."""

    orders: dict[str, Order]
    fills: list[Fill]  # in time order (file order among equal times)
    decided_intents: set[str]
    summary: dict[str, Any]
    candles: Candles
    limits: dict[str, Limits]
    max_volume_participation: Decimal = Decimal("0.1")
    conflict_window_us: int = 300 * US
    order_lines: list[dict[str, Any]] = field(default_factory=list)  # raw records, for rule 7
    decision_lines: list[dict[str, Any]] = field(default_factory=list)
    fill_lines: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ report
@dataclass
class AuditReport:
    checked: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)  # violations per check
    examples: dict[str, list[str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.counts

    def fail(self, check: str, message: str) -> None:
        self.counts[check] += 1
        ex = self.examples.setdefault(check, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(message)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": dict(self.checked),
            "violations": {
                c: {"count": n, "meaning": CHECKS.get(c, ""), "examples": self.examples.get(c, [])}
                for c, n in sorted(self.counts.items())
            },
            "info": self.info,
        }

    def text(self) -> str:
        lines = ["checked: " + ", ".join(f"{k} {v}" for k, v in sorted(self.checked.items()))]
        for key, value in self.info.items():
            lines.append(f"info {key}: {json.dumps(value, sort_keys=True)}")
        if self.ok:
            lines.append("OK: no violation")
        else:
            total = sum(self.counts.values())
            lines.append(f"VIOLATIONS: {total} in {len(self.counts)} checks")
            for c, n in sorted(self.counts.items()):
                lines.append(f"[{c}] {n}: {CHECKS.get(c, '')}")
                lines.extend(f"    {m}" for m in self.examples.get(c, []))
                if n > len(self.examples.get(c, [])):
                    lines.append(f"    ... {n - len(self.examples.get(c, []))} more")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ helpers
def _by(items: Iterable[Fill], *keys: str) -> dict[tuple[str, ...], list[Fill]]:
    out: dict[tuple[str, ...], list[Fill]] = defaultdict(list)
    for f in items:
        out[tuple(getattr(f, k) for k in keys)].append(f)
    return out


def _life_start(o: Order, fills_of: Mapping[str, list[Fill]]) -> int | None:
    """When the order starts working: its "submitted" event, or for a protective order (first event "open")
    its first fill (None: it never traded)."""
    if o.resting_first:
        fs = fills_of.get(o.client_order_id)
        return fs[0].t if fs else None
    sub = next((e for e in o.events if e.status == "submitted"), None)
    return sub.t if sub is not None else (o.events[0].t if o.events else None)


def _life_end(o: Order) -> int:
    fin = o.final
    return fin.t if fin is not None else INF


def _fills_by_order(run: Run) -> dict[str, list[Fill]]:
    out: dict[str, list[Fill]] = defaultdict(list)
    for f in run.fills:
        out[f.client_order_id].append(f)
    return out


def _protective(o: Order | None, run: Run) -> bool:
    """A stop loss or take profit: a trigger order that takes liquidity once its level is reached (whether the
    exchange held it or the arbiter passed it on), so it cannot trade with another profile's market order."""
    return o is not None and o.intent_reason in PROTECTIVE


# ------------------------------------------------------------------------------------------ rule 1
def check_fills_in_candle(run: Run, r: AuditReport) -> None:
    for f in run.fills:
        r.checked["fills"] += 1
        c = run.candles.at(f.product, f.priced_at)
        if c is None:
            r.fail(
                "1-fill-in-candle",
                f"{f.profile} {f.product} fill {f.fill_id} (order {f.client_order_id}) at {_iso(f.t)}: "
                "no candle of the product contains its time",
            )
        elif not (c.low <= f.price <= c.high):
            kind = "internal " if f.internal else ""
            r.fail(
                "1-fill-in-candle",
                f"{f.profile} {f.product} {kind}{f.side} fill {f.fill_id} (order {f.client_order_id}) at "
                f"{_iso(f.t)} priced {_n(f.price)} outside the candle {_iso(c.open_us)} "
                f"[low {_n(c.low)}, high {_n(c.high)}]",
            )


# ------------------------------------------------------------------------------------------ rule 2
@dataclass
class _Episode:
    """One position: from the buy that opens it (from flat) to the sell that brings it back to zero."""

    fills: list[Fill] = field(default_factory=list)
    end: int = INF  # the time of the sell that closed it


def _episodes(fills: Sequence[Fill]) -> list[_Episode]:
    out: list[_Episode] = []
    pos = Decimal(0)
    cur: _Episode | None = None
    for f in fills:
        if cur is None:
            if f.side != "buy":
                continue  # a sell without a position: rule 3's business
            cur = _Episode()
            out.append(cur)
        cur.fills.append(f)
        pos += f.size if f.side == "buy" else -f.size
        if pos <= EPS:
            cur.end = f.t
            cur, pos = None, Decimal(0)
    return out


def _avg_cost(fills: Iterable[Fill], before: int) -> tuple[Decimal, Decimal]:
    """(size held, average cost) from the fills before `before` (average cost: sells leave it unchanged)."""
    size = cost = Decimal(0)
    for f in fills:
        if f.t >= before:
            break
        if f.side == "buy":
            size += f.size
            cost += f.size * f.price
        elif size > 0:
            cost -= cost / size * min(f.size, size)
            size -= min(f.size, size)
    return size, (cost / size if size > 0 else Decimal(0))


def _protective_sent(run: Run, pid: str, product: str, c: CandleBar) -> bool:
    """A stop loss / take profit of the profile was sent at that candle's close (it acted on the candle; its
    fills come on the next candles when the profile's share of the candle's volume was used up)."""
    interval = c.close_us - c.open_us
    return any(
        o.profile == pid
        and o.product == product
        and o.side == "sell"
        and o.intent_reason in PROTECTIVE
        and any(e.status == "submitted" and c.close_us <= e.t < c.close_us + interval for e in o.events)
        for o in run.orders.values()
    )


def check_stops(run: Run, r: AuditReport) -> None:
    stop_stats: dict[str, dict[str, Any]] = {}
    for (pid, product), fills in sorted(_by(run.fills, "profile", "product").items()):
        lim = run.limits.get(pid)
        if lim is None:
            continue
        for ep in _episodes(fills):
            r.checked["positions"] += 1
            t0 = ep.fills[0].t
            # Protected from the candle in which the entry order completed (docs/execution.md): while it
            # still fills, a sale would work against it.
            entry = run.orders.get(ep.fills[0].client_order_id)
            done = entry.final if entry is not None else None
            guarded = max(t0, done.t) if done is not None else t0
            for c in run.candles.from_time(product, guarded):
                if c.open_us > ep.end:
                    break
                # The episode's buys up to this candle (sells leave the average cost unchanged); the position
                # is open at the candle (the episode ends at or after its open).
                buys = [f for f in ep.fills if f.side == "buy" and f.t < c.close_us]
                bought = sum((f.size for f in buys), Decimal(0))
                avg = sum((f.size * f.price for f in buys), Decimal(0)) / bought
                stop = avg * (1 - lim.stop_loss_pct / 100)
                take = avg * (1 + lim.take_profit_pct / 100)
                hit_stop, hit_take = c.low <= stop, c.high >= take
                if not (hit_stop or hit_take):
                    continue
                r.checked["stop/take-profit triggers"] += 1
                level, what = (stop, "stop") if hit_stop else (take, "take-profit")
                sells = [f for f in ep.fills if f.side == "sell" and c.open_us <= f.priced_at < c.close_us]
                head = (
                    f"{pid} {product}: position entered {_iso(t0)} (avg cost {_n(avg)}): candle "
                    f"{_iso(c.open_us)} reached the {what} level {_n(level)} "
                    f"(low {_n(c.low)}, high {_n(c.high)})"
                )
                if not sells and _protective_sent(run, pid, product, c):
                    r.checked["protective exits short of the candle's liquidity"] += 1
                    break  # sent for that candle, whose volume share this profile's orders had used up (rule 5)
                if not sells:
                    later = next((f for f in ep.fills if f.side == "sell" and f.t >= c.close_us), None)
                    tail = (
                        f"; the first exit came at {_iso(later.t)} at {_n(later.price)}"
                        if later is not None
                        else "; no exit followed"
                    )
                    r.fail("2-stop-in-candle", head + ", but no sell on that candle" + tail)
                    break
                # A candle that opened through the take profit (orders resting before it opened) takes it there.
                gap_take = c.open >= take and guarded < c.open_us
                if (
                    hit_stop
                    and hit_take
                    and not gap_take
                    and any(f.intent_reason == "take_profit" for f in sells)
                ):
                    r.fail("2-stop-first", head + " and both levels: the take-profit acted, not the stop")
                if hit_stop:
                    floor = min(stop, c.open) * (1 - lim.slippage_tolerance)
                    for f in sells:
                        if f.intent_reason not in (None, "stop_loss"):
                            continue
                        if f.price < floor - EPS or f.price < c.low:
                            r.fail(
                                "2-stop-price",
                                f"{head}: stop exit {f.fill_id} (order {f.client_order_id}) at {_n(f.price)}, "
                                f"below min(level, open {_n(c.open)}) * (1 - {_n(lim.slippage_tolerance)}) = "
                                f"{_n(floor)} or the low",
                            )
                break
        # The stop exits' losses (share beyond stop_loss_pct + slippage): information for the closing note.
        st = stop_stats.setdefault(
            pid, {"stop_exits": 0, "beyond_stop_and_slippage": 0, "worst_loss_pct": 0.0}
        )
        by_order: dict[str, list[Fill]] = defaultdict(list)
        for f in fills:
            if f.side == "sell":
                by_order[f.client_order_id].append(f)
        for coid, sold in by_order.items():
            _, avg = _avg_cost(fills, sold[0].t)
            if avg <= 0:
                continue
            size = sum((f.size for f in sold), Decimal(0))
            price = sum((f.size * f.price for f in sold), Decimal(0)) / size
            loss_pct = (1 - price / avg) * 100
            reason = run.orders[coid].intent_reason if coid in run.orders else sold[0].intent_reason
            is_stop = reason == "stop_loss" if reason is not None else loss_pct >= lim.stop_loss_pct
            if not is_stop:
                continue
            st["stop_exits"] += 1
            st["worst_loss_pct"] = max(st["worst_loss_pct"], round(float(loss_pct), 4))
            if loss_pct > lim.stop_loss_pct + lim.slippage_tolerance * 100:
                st["beyond_stop_and_slippage"] += 1
    for st in stop_stats.values():
        st["share_beyond"] = (
            round(st["beyond_stop_and_slippage"] / st["stop_exits"], 4) if st["stop_exits"] else 0.0
        )
    r.info["stop_exits"] = stop_stats


# ------------------------------------------------------------------------------------------ rule 3
def check_no_look_ahead(run: Run, r: AuditReport) -> None:
    fills_of = _fills_by_order(run)
    groups: dict[tuple[str, str], list[tuple[int, int, Order]]] = defaultdict(list)
    for o in run.orders.values():
        start = _life_start(o, fills_of)
        if start is not None:
            groups[(o.profile, o.product)].append((start, _life_end(o), o))
    for (pid, product), lives in sorted(groups.items()):
        lives.sort(key=lambda x: (x[0], x[1]))
        for j, (start, _, o) in enumerate(lives):
            r.checked["orders"] += 1
            for s_i, e_i, other in lives[:j]:
                if s_i <= start < e_i:
                    r.fail(
                        "3-self-overlap",
                        f"{pid} {product}: order {o.client_order_id} ({o.side}) submitted {_iso(start)} while "
                        f"order {other.client_order_id} ({other.side}, working from {_iso(s_i)}) was still "
                        f"working until {_iso(e_i)}",
                    )
    for (pid,), fills in sorted(_by(run.fills, "profile").items()):
        lim = run.limits.get(pid)
        pos: dict[str, Decimal] = defaultdict(Decimal)
        entry: dict[str, str] = {}
        for f in fills:
            held = pos[f.product]
            if f.side == "sell":
                if f.size > held + EPS:
                    r.fail(
                        "3-sell-beyond-position",
                        f"{f.profile} {f.product}: sell fill {f.fill_id} (order {f.client_order_id}) at "
                        f"{_iso(f.t)} sells {_n(f.size)} but holds {_n(held)}",
                    )
                pos[f.product] = held - f.size
            else:
                if held > EPS and entry.get(f.product) not in (None, f.client_order_id):
                    r.fail(
                        "3-buy-while-held",
                        f"{f.profile} {f.product}: buy fill {f.fill_id} (order {f.client_order_id}) at "
                        f"{_iso(f.t)} while holding {_n(held)} from order {entry[f.product]}",
                    )
                if held <= EPS:
                    entry[f.product] = f.client_order_id
                pos[f.product] = held + f.size
            if pos[f.product] <= EPS:
                entry.pop(f.product, None)
            if lim is not None:
                n_open = sum(1 for v in pos.values() if v > EPS)
                if n_open > lim.max_open_positions:
                    r.fail(
                        "position-limit",
                        f"{f.profile}: {n_open} open positions after fill {f.fill_id} at {_iso(f.t)} "
                        f"(max_open_positions {lim.max_open_positions}): "
                        + ", ".join(sorted(k for k, v in pos.items() if v > EPS)),
                    )


# ------------------------------------------------------------------------------------------ rule 4
def check_wash_trades(run: Run, r: AuditReport) -> None:
    fills_of = _fills_by_order(run)
    window = run.conflict_window_us
    by_product = _by((f for f in run.fills if not f.internal), "product")
    pairs: set[frozenset[str]] = set()
    protective_pairs: set[frozenset[str]] = set()
    for o in sorted(run.orders.values(), key=lambda o: o.client_order_id):
        if o.internal_only:
            continue
        start = _life_start(o, fills_of)
        if start is None:
            continue
        own = fills_of.get(o.client_order_id, [])
        end = max(_life_end(o), (own[-1].t + window) if own else 0)
        r.checked["order lives"] += 1
        for f in by_product.get((o.product,), []):
            if f.profile == o.profile or f.side == o.side or not (start <= f.t < end):
                continue
            key = frozenset((o.client_order_id, f.client_order_id))
            if _protective(o, run) or _protective(run.orders.get(f.client_order_id), run):
                protective_pairs.add(key)
                continue
            if key in pairs:
                continue
            pairs.add(key)
            r.fail(
                "4-wash-trade",
                f"{o.product}: {f.profile} {f.side} fill {f.fill_id} (order {f.client_order_id}) at "
                f"{_iso(f.t)} while {o.profile}'s {o.side} order {o.client_order_id} worked "
                f"[{_iso(start)}, {_iso(end)})",
            )
    r.info["protective_opposite_pairs"] = len(protective_pairs)
    r.info["opposite_side_pairs"] = len(pairs)
    reported = run.summary.get("desync", {}).get("opposite_side_pairs_within_window")
    if reported is not None and reported != len(pairs):
        r.fail(
            "4-summary-count",
            f"summary.json desync.opposite_side_pairs_within_window is {reported}, the fills give {len(pairs)}",
        )


# ------------------------------------------------------------------------------------------ rule 5
def check_liquidity(run: Run, r: AuditReport) -> None:
    taken: dict[tuple[str, int], list[Fill]] = defaultdict(list)
    for f in run.fills:
        if f.internal:
            continue
        c = run.candles.at(f.product, f.priced_at)
        if c is not None:
            taken[(f.product, c.open_us)].append(f)
    for (product, open_us), fs in sorted(taken.items()):
        r.checked["product candles with fills"] += 1
        c = run.candles.at(product, open_us)
        assert c is not None
        total = sum((f.size for f in fs), Decimal(0))
        cap = c.volume * run.max_volume_participation
        if total > cap + EPS:
            who = Counter(f"{f.profile}/{f.client_order_id[:8]}" for f in fs)
            r.fail(
                "5-liquidity",
                f"{product} candle {_iso(open_us)}: fills of {_n(total)} over {len(fs)} fills "
                f"({', '.join(sorted(who))}) above {_n(run.max_volume_participation)} x volume "
                f"{_n(c.volume)} = {_n(cap)}",
            )


# ------------------------------------------------------------------------------------------ rule 6
@dataclass(frozen=True)
class _EquityPoint:
    t: int  # a step close
    equity: Decimal
    drawdown_pct: Decimal
    daily_loss_pct: Decimal


def _equity_curve(run: Run, pid: str, lim: Limits) -> dict[int, _EquityPoint]:
    """The profile's equity at every step close: cash from the fills booked before it, positions at the closes
    (what the strategy knows at that close: a protective exit is booked when its fill is)."""
    fills = [f for f in run.fills if f.profile == pid]
    closes = sorted((b.close_us, p, b.close) for p, bs in run.candles.bars.items() for b in bs)
    cash = lim.initial_equity
    pos: dict[str, Decimal] = defaultdict(Decimal)
    marks: dict[str, Decimal] = {}
    high = lim.initial_equity
    day, day_start = -1, lim.initial_equity
    out: dict[int, _EquityPoint] = {}
    fi = ci = 0
    for t in run.candles.closes():
        while fi < len(fills) and fills[fi].t < t:
            f = fills[fi]
            sign = 1 if f.side == "sell" else -1
            cash += sign * f.size * f.price - f.fee
            pos[f.product] += -sign * f.size
            fi += 1
        while ci < len(closes) and closes[ci][0] <= t:
            marks[closes[ci][1]] = closes[ci][2]
            ci += 1
        equity = cash + sum((v * marks.get(p, Decimal(0)) for p, v in pos.items() if v), Decimal(0))
        high = max(high, equity)
        if t // (86400 * US) != day:
            day, day_start = t // (86400 * US), equity
        dd = (high - equity) / high * 100 if high > 0 else Decimal(0)
        dl = (day_start - equity) / day_start * 100 if day_start > 0 else Decimal(0)
        out[t] = _EquityPoint(t, equity, dd, dl)
    return out


def check_halts(run: Run, r: AuditReport) -> None:
    fills_of = _fills_by_order(run)
    for pid, prof in sorted(run.summary.get("profiles", {}).items()):
        lim = run.limits.get(pid)
        halts = prof.get("halts") or []
        if lim is None or not halts:
            continue
        curve = _equity_curve(run, pid, lim)
        times = sorted(curve)
        for h in halts:
            reason, at = str(h.get("reason", "")), _us(str(h.get("at")))
            kind = (
                "drawdown" if reason.startswith("drawdown") else "daily" if reason.startswith("daily") else ""
            )
            r.checked["halts"] += 1
            if not kind:
                continue
            limit = lim.max_drawdown_pct if kind == "drawdown" else lim.max_daily_loss_pct

            def value(p: _EquityPoint) -> Decimal:
                return p.drawdown_pct if kind == "drawdown" else p.daily_loss_pct  # noqa: B023

            # The first step close from which the breach is known (the recomputed value reaches the limit).
            i = bisect.bisect_left(times, at)
            known = curve.get(at)
            nxt = curve[times[i + 1]] if known is not None and i + 1 < len(times) else None
            if known is None:
                r.fail("6-halt-stamp", f"{pid}: halt '{reason}' at {_iso(at)}, which is no step close")
            elif (
                value(known) < limit - HALT_TOL_PCT and nxt is not None and value(nxt) >= limit - HALT_TOL_PCT
            ):
                r.fail(
                    "6-halt-stamp",
                    f"{pid}: halt '{reason}' stamped {_iso(at)}, but the fills and closes give "
                    f"{value(known):.2f}% then, {value(nxt):.2f}% at the close {_iso(nxt.t)}: stamped at the open "
                    "of the step that breached",
                )
            # Entries blocked: a drawdown halt until a resume (no resume is in the files: the end of the run),
            # a daily-loss halt until the next UTC day.
            until = INF if kind == "drawdown" else (at // (86400 * US) + 1) * 86400 * US
            for o in run.orders.values():
                if o.profile != pid or o.side != "buy" or o.intent_reason not in (None, "entry"):
                    continue
                s = _life_start(o, fills_of)
                if s is not None and at <= s < until:
                    r.fail(
                        "6-halt-entry",
                        f"{pid} {o.product}: entry order {o.client_order_id} submitted {_iso(s)} after the "
                        f"halt '{reason}' at {_iso(at)} (entries blocked until {_iso(until)})",
                    )
            if not lim.close_on_halt:
                continue
            # close_on_halt: every position held at the halt is sold from the halt's close on (a sale order
            # submitted before the next candle closes); how fast it fills is the market's share (rule 5).
            held: dict[str, Decimal] = defaultdict(Decimal)
            for f in run.fills:
                if f.profile == pid and f.priced_at < at:
                    held[f.product] += f.size if f.side == "buy" else -f.size
            for product, size in sorted(held.items()):
                if size <= EPS:
                    continue
                c = run.candles.first_opening_at_or_after(product, at)
                if c is None:
                    continue  # the run ended first
                # An order of the profile still working on the product at the halt decides first (no sale
                # while it works, rule 3): the sale is due at the first close after it ended.
                busy = max(
                    (
                        _life_end(o)
                        for o in run.orders.values()
                        if o.profile == pid
                        and o.product == product
                        and (s0 := _life_start(o, fills_of)) is not None
                        and s0 < at
                    ),
                    default=0,
                )
                # (the first close after it ended, and the de-sync delay of the sale after that close)
                due = max(c.close_us, busy + 2 * (c.close_us - c.open_us)) if busy < INF else INF
                sold = [
                    o
                    for o in run.orders.values()
                    if o.profile == pid
                    and o.product == product
                    and o.side == "sell"
                    and (s := _life_start(o, fills_of)) is not None
                    and at <= s < due
                ]
                left = size + sum(
                    (
                        f.size if f.side == "buy" else -f.size
                        for f in run.fills
                        if f.profile == pid and f.product == product and at <= f.t < due
                    ),
                    Decimal(0),
                )
                # A sale the arbiter refused (it would have crossed another profile's working order, rule 4) was
                # sent all the same: the strategy tries it again at the next steps.
                refused = any(
                    d.get("profile") == pid
                    and d.get("product") == product
                    and d.get("side") == "sell"
                    and d.get("verdict") == "rejected"
                    and at <= _us(str(d.get("event_time"))) < due
                    for d in run.decision_lines
                )
                if not sold and not refused and due < INF and left > EPS:
                    r.fail(
                        "6-halt-close",
                        f"{pid} {product}: halt '{reason}' at {_iso(at)} with close_on_halt, but no sale of the "
                        f"{_n(size)} held was sent before the next candle {_iso(c.open_us)} closed",
                    )


# ------------------------------------------------------------------------------------------ rule 7
def check_reasons(run: Run, r: AuditReport) -> None:
    for name, lines in (("orders.jsonl", run.order_lines), ("fills.jsonl", run.fill_lines)):
        for i, rec in enumerate(lines, start=1):
            r.checked[f"{name} records"] += 1
            reason = rec.get("intent_reason")
            if reason not in REASONS:
                what = (
                    "no intent_reason" if reason is None else f"intent_reason {reason!r} (not one of REASONS)"
                )
                r.fail(
                    "7-intent-reason",
                    f"{name}:{i}: {rec.get('profile')} {rec.get('product')} {rec.get('side')} "
                    f"{rec.get('status', 'fill')} of order {rec.get('client_order_id')}: {what}",
                )
    fills_of = _fills_by_order(run)
    for pid, prof in sorted(run.summary.get("profiles", {}).items()):
        mine = [o for o in run.orders.values() if o.profile == pid]
        exits = Counter(
            o.intent_reason or "unknown" for o in mine if o.side == "sell" and fills_of.get(o.client_order_id)
        )
        timed_out = sum(
            1
            for o in mine
            if (fin := o.final) is not None and fin.status == "cancelled" and "timeout" in fin.reason
        )
        r.info.setdefault("exits_by_reason", {})[pid] = dict(sorted(exits.items()))
        r.info.setdefault("orders_timed_out", {})[pid] = timed_out
        got = prof.get("exits_by_reason")
        if got is None:
            r.fail(
                "7-exits-by-reason",
                f"summary.json profiles.{pid} has no exits_by_reason (files: {dict(exits)})",
            )
        elif {k: int(v) for k, v in got.items() if int(v)} != dict(exits):
            r.fail(
                "7-exits-by-reason",
                f"summary.json profiles.{pid}.exits_by_reason {got}, the files give {dict(exits)}",
            )
        got_t = prof.get("orders_timed_out")
        if got_t is None:
            r.fail(
                "7-orders-timed-out",
                f"summary.json profiles.{pid} has no orders_timed_out (files: {timed_out})",
            )
        elif int(got_t) != timed_out:
            r.fail(
                "7-orders-timed-out",
                f"summary.json profiles.{pid}.orders_timed_out {got_t}, the files give {timed_out}",
            )


# ------------------------------------------------------------------------------------------ all
RULES = (
    check_fills_in_candle,
    check_stops,
    check_no_look_ahead,
    check_wash_trades,
    check_liquidity,
    check_halts,
    check_reasons,
)


def audit(run: Run) -> AuditReport:
    r = AuditReport()
    for rule in RULES:
        rule(run, r)
    return r


# ------------------------------------------------------------------------------------------ reading
def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise AuditInputError(f"{path}: missing (a run writes it)")
    out: list[tuple[int, dict[str, Any]]] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise AuditInputError(f"{path}: cannot read: {err}") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise AuditInputError(f"{path}:{n}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(rec, dict):
            raise AuditInputError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    return out


def _field(rec: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in rec:
        raise AuditInputError(f"{where}: no {key!r}")
    return rec[key]


def _dec(rec: Mapping[str, Any], key: str, where: str) -> Decimal:
    v = _field(rec, key, where)
    try:
        d = Decimal(str(v))
    except InvalidOperation:
        raise AuditInputError(f"{where}: {key} {v!r} is not a number") from None
    if not d.is_finite():
        raise AuditInputError(f"{where}: {key} {v!r} is not finite")
    return d


def _time(rec: Mapping[str, Any], key: str, where: str) -> int:
    v = _field(rec, key, where)
    try:
        return _us(str(v))
    except ValueError:
        raise AuditInputError(f"{where}: {key} {v!r} is not an ISO time") from None


def parse_fill(rec: Mapping[str, Any], where: str = "") -> Fill:
    return Fill(
        profile=str(_field(rec, "profile", where)),
        product=str(_field(rec, "product", where)),
        side=str(_field(rec, "side", where)),
        size=_dec(rec, "size", where),
        price=_dec(rec, "price", where),
        fee=_dec(rec, "fee", where) if "fee" in rec else Decimal(0),
        t=_time(rec, "event_time", where),
        client_order_id=str(_field(rec, "client_order_id", where)),
        intent_id=str(rec.get("intent_id", "")),
        internal=bool(rec.get("internal", False)),
        intent_reason=rec.get("intent_reason"),
        fill_id=str(rec.get("fill_id", "")),
        where=where,
        candle_us=_time(rec, "candle_open", where) if rec.get("candle_open") else None,
    )


def parse_orders(records: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, Order]:
    orders: dict[str, Order] = {}
    for where, rec in records:
        coid = str(_field(rec, "client_order_id", where))
        o = orders.get(coid)
        if o is None:
            o = orders[coid] = Order(
                coid,
                str(_field(rec, "profile", where)),
                str(_field(rec, "product", where)),
                str(_field(rec, "side", where)),
                str(rec.get("intent_id", "")),
            )
        o.events.append(
            OrderEvent(
                status=str(_field(rec, "status", where)),
                t=_time(rec, "event_time", where),
                reason=str(rec.get("reason") or ""),
                internal=bool(rec.get("internal", False)),
                intent_reason=rec.get("intent_reason"),
                where=where,
            )
        )
    return orders


def load_candles(data_dir: Path, products: Sequence[str], *, until_us: int | None = None) -> Candles:
    """The products' candles; with `until_us`, only those closed by then (the run's last close: a candle
    after the run is no part of it)."""
    from shared.candles import CandleFileError, load_products

    try:
        files = load_products(data_dir, list(products))
    except CandleFileError as err:
        raise AuditInputError(str(err)) from None
    return Candles(
        {
            p: [
                CandleBar(
                    row.open_time_ms * 1000,
                    cf.interval_s * US,
                    row.open,
                    row.high,
                    row.low,
                    row.close,
                    row.volume,
                )
                for row in cf.rows
                if until_us is None or (row.open_time_ms // 1000 + cf.interval_s) * US <= until_us
            ]
            for p, cf in files.items()
        }
    )


def _last_close(summary: Mapping[str, Any], where: str) -> int | None:
    last = (summary.get("span") or {}).get("last_close")
    if not last:
        return None
    try:
        return _us(str(last))
    except ValueError:
        raise AuditInputError(f"{where}: span.last_close {last!r} is not an ISO time") from None


def load_run(run_dir: Path, data_dir: Path, cfg: AppConfig) -> Run:
    if not run_dir.is_dir():
        raise AuditInputError(f"run directory {run_dir} does not exist")
    if not data_dir.is_dir():
        raise AuditInputError(f"data directory {data_dir} does not exist")
    spath = run_dir / "summary.json"
    if not spath.is_file():
        raise AuditInputError(f"{spath}: missing (a run writes it)")
    try:
        summary = json.loads(spath.read_text())
    except json.JSONDecodeError as err:
        raise AuditInputError(f"{spath}:{err.lineno}: not JSON ({err.msg})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("profiles"), dict):
        raise AuditInputError(f"{spath}: expected an object with 'profiles'")
    opath, fpath, dpath = run_dir / "orders.jsonl", run_dir / "fills.jsonl", run_dir / "decisions.jsonl"
    order_recs = _read_jsonl(opath)
    fill_recs = _read_jsonl(fpath)
    decisions = _read_jsonl(dpath)
    orders = parse_orders((f"{opath}:{n}", rec) for n, rec in order_recs)
    fills = [parse_fill(rec, f"{fpath}:{n}") for n, rec in fill_recs]
    fills.sort(key=lambda f: f.t)  # stable: file order among equal times
    products = sorted(
        {*cfg.all_products(), *(f.product for f in fills), *(o.product for o in orders.values())}
    )
    limits = {pid: Limits.of(cfg, pid) for pid in cfg.profiles}
    for pid, prof in summary["profiles"].items():
        if pid in limits and "initial_equity" in prof:
            limits[pid] = _with_equity(limits[pid], Decimal(str(prof["initial_equity"])))
    return Run(
        orders=orders,
        fills=fills,
        decided_intents={str(rec.get("intent_id")) for _, rec in decisions},
        summary=summary,
        candles=load_candles(data_dir, products, until_us=_last_close(summary, f"{run_dir}/summary.json")),
        limits=limits,
        max_volume_participation=Decimal(str(cfg.system.execution.max_volume_participation)),
        conflict_window_us=int(Decimal(str(cfg.system.arbiter.conflict_window_s)) * US),
        order_lines=[rec for _, rec in order_recs],
        decision_lines=[rec for _, rec in decisions],
        fill_lines=[rec for _, rec in fill_recs],
    )


def _with_equity(lim: Limits, equity: Decimal) -> Limits:
    from dataclasses import replace

    return replace(lim, initial_equity=equity)


def audit_summary_line(run_dir: Path, data_dir: Path, cfg: AppConfig) -> tuple[bool, str]:
    """(ok, one line) for the end of a demo or backtest: every run checks itself (`mpctl audit` gives detail)."""
    try:
        report = audit_run(run_dir, data_dir, cfg)
    except AuditInputError as err:
        return False, f"audit: cannot read the run: {err}"
    if report.ok:
        return True, f"audit: OK ({sum(report.checked.values())} checks of issue #14's rules and the books)"
    broken = ", ".join(f"{c} {n}" for c, n in sorted(report.counts.items()))
    return False, f"audit: VIOLATIONS {broken}; details: mpctl audit --run {run_dir}"


def audit_run(run_dir: Path, data_dir: Path, cfg: AppConfig) -> AuditReport:
    """Every check on a run directory; AuditInputError when a file cannot be read."""
    from mpctl.invariants import check_run

    run = load_run(run_dir, data_dir, cfg)
    r = audit(run)
    try:
        inv = check_run(run_dir, run.summary)
    except (KeyError, TypeError, ValueError, InvalidOperation) as err:
        raise AuditInputError(f"{run_dir}: the books cannot be checked: {type(err).__name__} {err}") from None
    for name, n in inv.checked.items():
        r.checked[f"invariants: {name}"] += n
    for v in inv.violations:
        if not v.message.startswith("more violations"):
            r.fail(f"invariants:{v.check}", v.message)
    return r


# ------------------------------------------------------------------------------------------ command
def register(sub: Any) -> None:
    p = sub.add_parser("audit", help="check a run's output files against the paper-trading rules (issue #14)")
    p.add_argument(
        "--run", type=Path, required=True, help="a run's output directory (backtest --out, demo, selftest)"
    )
    p.add_argument("--data", type=Path, default=Path("data/market"), help="the candle files the run replayed")
    p.add_argument(
        "--config", type=Path, default=None, help="the run's profiles file (default: as other commands)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Exit 0: every rule holds; 1: violations; 2: bad input (named file and line, no traceback)."""
    from mpctl.commands_config import load_for_command

    cfg = load_for_command(args.config)
    if cfg is None:
        return 2
    try:
        report = audit_run(args.run, args.data, cfg)
    except AuditInputError as err:
        print(f"audit: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        print(report.text())
    return 0 if report.ok else 1
