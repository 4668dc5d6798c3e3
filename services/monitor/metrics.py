"""The monitor's Prometheus metrics, computed from the run's messages, and the pure tracker behind them.

`PerformanceTracker` follows a run message by message (candles for mark prices, fills, halts, plans,
decisions) with the books of shared/book.py, as the run report and the strategy workers keep them: average-cost
positions, realised PnL on sells, a win when a sell's gain exceeds the fees of both legs, equity = cash +
positions at the last close, drawdown from the running peak of the equity at each step close. Only verified
fills count (shared/book.py's rule: an approving decision of the fill's profile, product and side, within the
approved size): a forged fill moves neither the dashboards nor the router's risk checks, and a fill read before
its decision counts once the decision is read. Read completely, a run gives the numbers of its summary.json.

`MonitorMetrics` is one CollectorRegistry (not the library's global one) served on 127.0.0.1. Values the tracker
recomputes (trades, PnL, equity, ...) are gauges, so a monitor that rebuilds its state after a restart exports
the same numbers again instead of counting twice.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from services.monitor.health import ServiceHealth
from services.monitor.lag import LagReport
from shared import book
from shared.book import simple_returns
from shared.messages import CandleClosed, Message, OrderDecided, OrderFilled, PlanPublished, ProfileHalted
from shared.metrics import MetricsEndpoint

ZERO = Decimal(0)
# The monitor's durable state pickles the whole tracker (services/monitor/bootstrap.py): raise this when its
# fields change, so an older snapshot is ignored and the tracker rebuilt from the topics. 2: the books of
# shared/book.py (holdings) and the decisions the verified-fill rule needs.
SNAPSHOT_SCHEMA = 2


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation of two equity-return series (shared/book.py), with the monitor's floor: None with
    fewer than 3 points or when either profile's equity never really moved (the report shows "n/a")."""
    return book.pearson(xs, ys, floor=book.EQUITY_RETURN_FLOOR)


@dataclass
class ProfileBook(book.Book):
    """A profile's books (shared/book.py) and what the dashboards show beside them."""

    halts: int = 0
    last_halt: str | None = None
    collisions: int = 0
    peak: Decimal = ZERO
    max_drawdown_pct: float = 0.0
    drawdown_pct: float = 0.0


class PerformanceTracker:
    """Per-profile performance, arbiter statistics and return correlations from a stream of messages.

    Messages are de-duplicated by (type, id), so a redelivered copy counts once. Counts, PnL, positions and the
    equity curve (drawdown, correlations) are recomputed from the verified fills (module docstring) when next
    read, in event time from the kept candle closes, as the run report does, so they do not depend on the order
    in which the topics were read.
    """

    def __init__(
        self,
        initial_balances: Mapping[str, Decimal | float | str],
        *,
        correlation_window: int = 48,
        max_steps: int = 10_000,
    ) -> None:
        self.initial = {pid: Decimal(str(b)) for pid, b in initial_balances.items()}
        self._books: dict[str, ProfileBook] = {
            pid: ProfileBook(initial=b, cash=b, peak=b) for pid, b in self.initial.items()
        }
        self.marks: dict[str, Decimal] = {}
        self.decisions: Counter[tuple[str, str]] = Counter()
        self.latest_plan: dict[str, PlanPublished] = {}
        self.window = correlation_window
        self.max_steps = max_steps
        self.step_times: list[float] = []
        self._closes: dict[str, list[tuple[float, Decimal]]] = {}
        self._fills: dict[str, list[tuple[float, str, OrderFilled]]] = {pid: [] for pid in self._books}
        self._curves: dict[str, list[tuple[float, Decimal]]] | None = None
        self._seen: set[str] = set()
        # The first decision read per intent: what makes a fill count (shared/book.py).
        self._decisions: dict[str, OrderDecided] = {}
        self._unverified: dict[str, list[tuple[OrderFilled, str]]] = {}

    @property
    def step_time(self) -> float | None:
        return self.step_times[-1] if self.step_times else None

    @property
    def steps(self) -> int:
        return len(self.step_times)

    @property
    def books(self) -> dict[str, ProfileBook]:
        """Each profile's accounting, with its fills applied in event time (recomputed after new messages)."""
        self.curves()
        return self._books

    @property
    def unverified(self) -> dict[str, list[tuple[OrderFilled, str]]]:
        """Each profile's fills that move no books (as yet: a fill whose decision is not read yet), with why."""
        self.curves()
        return self._unverified

    def _book(self, pid: str) -> ProfileBook:
        if pid not in self._books:
            # A profile absent from the config (disabled since): counted, with no starting balance.
            self.initial[pid] = ZERO
            self._books[pid] = ProfileBook(initial=ZERO, cash=ZERO)
            self._fills[pid] = []
        return self._books[pid]

    def add_all(self, msgs: Iterable[Message]) -> None:
        for m in msgs:
            self.add(m)

    def add(self, m: Message) -> bool:
        """Apply one message; False when it was a duplicate or irrelevant."""
        key = f"{type(m).__name__}:{m.id}"
        if key in self._seen:
            return False
        if isinstance(m, CandleClosed):
            self._seen.add(key)
            t = m.event_time.timestamp()
            i = bisect.bisect_left(self.step_times, t)
            if i == len(self.step_times) or self.step_times[i] != t:
                self.step_times.insert(i, t)
                if len(self.step_times) > self.max_steps:
                    del self.step_times[0]
            series = self._closes.setdefault(m.product, [])
            bisect.insort(series, (t, m.close))
            if len(series) > self.max_steps:
                del series[0]
            if series[-1][0] == t:
                self.marks[m.product] = m.close
            self._curves = None
            return True
        if isinstance(m, OrderFilled):
            self._seen.add(key)
            # No book yet: a profile absent from the config gets one only with a verified fill (curves), so a
            # forged fill of an invented profile adds no series to the dashboards.
            bisect.insort(
                self._fills.setdefault(m.profile, []),
                (m.event_time.timestamp(), m.fill_id, m),
                key=lambda x: x[:2],
            )
            self._curves = None
            return True
        if isinstance(m, ProfileHalted):
            self._seen.add(key)
            b = self._book(m.profile)
            b.halts += 1
            b.last_halt = m.reason
            return True
        if isinstance(m, PlanPublished):
            self._seen.add(key)
            self._book(m.profile).collisions += m.collisions
            cur = self.latest_plan.get(m.profile)
            if cur is None or m.epoch_start >= cur.epoch_start:
                self.latest_plan[m.profile] = m
            return True
        if isinstance(m, OrderDecided):
            self._seen.add(key)
            self.decisions[(m.verdict, m.rule)] += 1
            if m.intent_id not in self._decisions:
                self._decisions[m.intent_id] = m
                self._curves = None  # a fill read before its decision may count now
            return True
        return False

    def _mark_at(self, product: str, t: float, fallback: Decimal) -> Decimal:
        series = self._closes.get(product, [])
        i = bisect.bisect_right(series, t, key=lambda x: x[0]) - 1
        return series[i][1] if i >= 0 else fallback

    def curves(self) -> dict[str, list[tuple[float, Decimal]]]:
        """Each profile's equity at every kept step close, fills applied in event time (as the report does).

        Arrival order does not matter: a sell read before its buy is still applied after it."""
        if self._curves is not None:
            return self._curves
        out: dict[str, list[tuple[float, Decimal]]] = {}
        for pid, all_fills in self._fills.items():
            # Already in (event time, fill id) order: the rule's caps apply in that order, as the report's do.
            counted, refused = book.verified_fills((f for _, _, f in all_fills), self._decisions)
            self._unverified[pid] = refused
            fills = [(f.event_time.timestamp(), f) for f in counted]
            if pid not in self._books and not fills:
                continue
            old = self._book(pid)
            pb = ProfileBook(
                initial=self.initial[pid],
                cash=self.initial[pid],
                halts=old.halts,
                last_halt=old.last_halt,
                collisions=old.collisions,
            )
            curve: list[tuple[float, Decimal]] = []
            fi = 0
            for t in self.step_times:
                while fi < len(fills) and fills[fi][0] <= t:
                    pb.apply(fills[fi][1])
                    fi += 1
                marks = {p: self._mark_at(p, t, pb.avg_price(p)) for p in pb.open_positions()}
                curve.append((t, pb.equity(marks)))
            for _, f in fills[fi:]:  # fills after the last known close count too (the report's "inf" step)
                pb.apply(f)
            peak = pb.initial
            dd = max_dd = 0.0
            for _, eq in curve:
                peak = max(peak, eq)
                dd = float((peak - eq) / peak * 100) if peak > 0 else 0.0
                max_dd = max(max_dd, dd)
            pb.peak, pb.drawdown_pct, pb.max_drawdown_pct = peak, dd, max_dd
            self._books[pid] = pb
            out[pid] = curve
        self._curves = out
        return out

    def correlations(self) -> dict[tuple[str, str], float | None]:
        rets = {
            pid: simple_returns([float(e) for _, e in c[-(self.window + 1) :]])
            for pid, c in self.curves().items()
        }
        return {(a, b): pearson(rets[a], rets[b]) for a, b in itertools.combinations(sorted(rets), 2)}

    def profile_view(self, pid: str) -> dict[str, Any]:
        self.curves()  # refreshes the drawdown figures
        b = self.books[pid]
        eq = b.equity(self.marks)
        plan = self.latest_plan.get(pid)
        return {
            "trades": b.trades,
            "closed_trades": b.closed,
            "wins": b.wins,
            "win_rate": round(b.wins / b.closed, 4) if b.closed else 0.0,
            "realized_pnl": str(b.realized.quantize(Decimal("0.00000001"))),
            "unrealized_pnl": str(b.unrealized(self.marks).quantize(Decimal("0.00000001"))),
            "fees": str(b.fees),
            "initial_equity": str(b.initial),
            "equity": str(eq.quantize(Decimal("0.00000001"))),
            "drawdown_pct": round(b.drawdown_pct, 4),
            "max_drawdown_pct": round(b.max_drawdown_pct, 4),
            "open_positions": {p: str(s) for p, s in b.open_positions().items()},
            "halts": b.halts,
            "last_halt": b.last_halt,
            "collisions": b.collisions,
            "plan": None
            if plan is None
            else {
                "epoch": plan.epoch,
                "epoch_start": plan.epoch_start.isoformat().replace("+00:00", "Z"),
                "strategy": plan.strategy,
                "assets": plan.assets,
                "random_asset": plan.random_asset,
                "nonce": plan.nonce,
                "fingerprint": plan.fingerprint[:12],
            },
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            "profiles": {pid: self.profile_view(pid) for pid in sorted(self._books)},
            "decisions": {f"{v}:{r}": n for (v, r), n in sorted(self.decisions.items())},
            "correlations": {f"{a}~{b}": rho for (a, b), rho in self.correlations().items()},
            "steps": self.steps,
        }


class MonitorMetrics(MetricsEndpoint):
    log_name = "monitor.metrics"

    def __init__(self, namespace: str) -> None:
        super().__init__()
        r = self.registry
        self.info = Gauge(
            "mp_monitor_info",
            "Constant 1, labelled with the namespace the monitor watches",
            ["namespace"],
            registry=r,
        )
        self.info.labels(namespace=namespace).set(1)
        self.lag = Gauge(
            "mp_consumer_lag",
            "End offset minus committed offset",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.group_lag = Gauge(
            "mp_consumer_group_lag", "Sum of a consumer group's partition lags", ["group"], registry=r
        )
        self.service_up = Gauge(
            "mp_service_up",
            "1 when the service's consumer group has members, 0 when it has none",
            ["service"],
            registry=r,
        )
        p = ["profile"]
        self.trades = Gauge("mp_profile_trades", "Fills of the profile", p, registry=r)
        self.closed = Gauge("mp_profile_closed_trades", "Sells (closing fills) of the profile", p, registry=r)
        self.wins = Gauge("mp_profile_wins", "Sells whose gain exceeded the fees of both legs", p, registry=r)
        self.win_rate = Gauge("mp_profile_win_rate", "Wins / closed trades (0..1)", p, registry=r)
        self.realized = Gauge(
            "mp_profile_realized_pnl", "Realised PnL in the quote currency (fees apart)", p, registry=r
        )
        self.unrealized = Gauge(
            "mp_profile_unrealized_pnl", "Open positions at the last close minus their cost", p, registry=r
        )
        self.fees = Gauge("mp_profile_fees", "Fees paid in the quote currency", p, registry=r)
        self.equity = Gauge("mp_profile_equity", "Cash plus open positions at the last close", p, registry=r)
        self.drawdown = Gauge(
            "mp_profile_drawdown_pct", "Current drawdown from the running equity peak, percent", p, registry=r
        )
        self.max_drawdown = Gauge(
            "mp_profile_max_drawdown_pct", "Largest drawdown seen, percent", p, registry=r
        )
        self.halts = Gauge("mp_profile_halts", "ProfileHalted events of the profile", p, registry=r)
        self.open_positions = Gauge(
            "mp_profile_open_positions", "Products with an open position", p, registry=r
        )
        self.collisions = Gauge(
            "mp_profile_collisions", "Nonce bumps in the profile's published plans", p, registry=r
        )
        self.epoch = Gauge("mp_profile_plan_epoch", "Epoch of the profile's latest plan", p, registry=r)
        self.decisions = Gauge(
            "mp_arbiter_decisions", "Arbiter decisions by verdict and rule", ["verdict", "rule"], registry=r
        )
        self.correlation = Gauge(
            "mp_profile_return_correlation",
            "Pearson correlation of two profiles' step returns over the rolling window",
            ["profile_a", "profile_b"],
            registry=r,
        )
        self.alerts = PromCounter("mp_alerts", "Alerts raised, by kind", ["kind"], registry=r)
        self.alert_failures = Gauge(
            "mp_alert_sink_failures", "Alerts a sink failed to deliver", ["sink"], registry=r
        )
        self.alerts_dropped = Gauge(
            "mp_alerts_dropped", "Alerts dropped because the queue was full", registry=r
        )
        self.messages = PromCounter(
            "mp_monitor_messages", "Messages the monitor consumed, by topic", ["topic"], registry=r
        )
        self.audit_lines = Gauge("mp_audit_lines", "Lines in the audit file (distinct messages)", registry=r)
        self._lag_labels: set[tuple[str, str, str]] = set()
        self._group_labels: set[str] = set()

    def update_lag(self, report: LagReport) -> None:
        labels: set[tuple[str, str, str]] = set()
        groups: set[str] = set()
        for g in report.groups:
            groups.add(g.group)
            self.group_lag.labels(group=g.group).set(g.total)
            for p in g.partitions:
                if p.lag is None:
                    continue
                key = (g.group, p.topic, str(p.partition))
                labels.add(key)
                self.lag.labels(group=key[0], topic=key[1], partition=key[2]).set(p.lag)
        # Series of groups and partitions that went away are removed, not left at their last value.
        for key in self._lag_labels - labels:
            self.lag.remove(*key)
        for gone in self._group_labels - groups:
            self.group_lag.remove(gone)
        self._lag_labels, self._group_labels = labels, groups

    def update_health(self, health: Iterable[ServiceHealth]) -> None:
        for h in health:
            if h.state != "not-observable":
                self.service_up.labels(service=h.name).set(1 if h.state == "up" else 0)

    def update_performance(self, tracker: PerformanceTracker) -> None:
        tracker.curves()  # refreshes the drawdown figures
        for pid, b in tracker.books.items():
            self.trades.labels(pid).set(b.trades)
            self.closed.labels(pid).set(b.closed)
            self.wins.labels(pid).set(b.wins)
            self.win_rate.labels(pid).set(b.wins / b.closed if b.closed else 0.0)
            self.realized.labels(pid).set(float(b.realized))
            self.unrealized.labels(pid).set(float(b.unrealized(tracker.marks)))
            self.fees.labels(pid).set(float(b.fees))
            self.equity.labels(pid).set(float(b.equity(tracker.marks)))
            self.drawdown.labels(pid).set(b.drawdown_pct)
            self.max_drawdown.labels(pid).set(b.max_drawdown_pct)
            self.halts.labels(pid).set(b.halts)
            self.open_positions.labels(pid).set(len(b.open_positions()))
            self.collisions.labels(pid).set(b.collisions)
            plan = tracker.latest_plan.get(pid)
            if plan is not None:
                self.epoch.labels(pid).set(plan.epoch)
        for (verdict, rule), n in tracker.decisions.items():
            self.decisions.labels(verdict=verdict, rule=rule).set(n)
        for (a, b_), rho in tracker.correlations().items():
            if rho is not None:
                self.correlation.labels(profile_a=a, profile_b=b_).set(rho)
