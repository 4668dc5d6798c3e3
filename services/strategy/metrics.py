"""Prometheus metrics of one profile's strategy worker, served on 127.0.0.1 when `--metrics-port` is given (0: off).

The worker rebuilds its state from the beginning of its input topics on every start, so:

- the trading figures (trades, win rate, PnL, equity, drawdown, halts, intents) are gauges set from the domain
  state, which the rebuild recomputes exactly: a restarted worker exports the numbers of the first run, never
  twice as much;
- the counters of consumed records and errors count only records at or after the position the group had
  committed before the restart (`counted_from`): what the rebuild re-reads below it was counted by the
  previous process.

Its own CollectorRegistry: several services in one interpreter (tests) never share series.
"""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import Counter, Gauge

from services.strategy.domain import StrategyState
from shared.metrics import MetricsEndpoint

__all__ = ["StrategyMetrics"]


class StrategyMetrics(MetricsEndpoint):
    log_name = "strategy.metrics"

    def __init__(self, profile: str) -> None:
        super().__init__()
        self.profile = profile
        # (topic, partition) -> first offset this process counts (the previous run's committed offset)
        self.counted_from: dict[tuple[str, int], int] = {}
        self._max_dd = 0.0
        r = self.registry
        p = ["profile"]
        self.trades = Gauge("mp_strategy_trades", "Fills applied to the profile's book", p, registry=r)
        self.closed = Gauge(
            "mp_strategy_closed_trades", "Sell fills (each closes all or part of a position)", p, registry=r
        )
        self.wins = Gauge(
            "mp_strategy_wins", "Sell fills whose gain at average cost exceeds both legs' fees", p, registry=r
        )
        self.win_rate = Gauge(
            "mp_strategy_win_rate", "wins / closed trades (0 before the first close)", p, registry=r
        )
        self.realized = Gauge(
            "mp_strategy_realized_pnl", "Realised PnL at average cost (quote currency)", p, registry=r
        )
        self.unrealized = Gauge(
            "mp_strategy_unrealized_pnl",
            "Open positions at the last close minus their cost (quote)",
            p,
            registry=r,
        )
        self.fees = Gauge("mp_strategy_fees", "Fees paid (quote currency)", p, registry=r)
        self.equity = Gauge(
            "mp_strategy_equity", "Cash plus open positions at the last close (quote)", p, registry=r
        )
        self.drawdown = Gauge(
            "mp_strategy_drawdown_pct",
            "Percent below the running equity peak at the last step",
            p,
            registry=r,
        )
        self.max_drawdown = Gauge("mp_strategy_max_drawdown_pct", "Largest drawdown_pct seen", p, registry=r)
        self.open_positions = Gauge("mp_strategy_open_positions", "Open positions", p, registry=r)
        self.halts = Gauge(
            "mp_strategy_halts",
            "Risk halts emitted, by kind (drawdown, daily_loss)",
            ["profile", "kind"],
            registry=r,
        )
        self.halted = Gauge(
            "mp_strategy_halted",
            "1 while the profile opens no new position, by kind (drawdown, daily_loss, operator, account_mismatch)",
            ["profile", "kind"],
            registry=r,
        )
        self.untracked = Gauge(
            "mp_strategy_untracked_holding",
            "Live mode: a holding of the account the system did not trade, by asset (never sold unless sell_untracked)",
            ["profile", "asset"],
            registry=r,
        )
        self.intents = Gauge("mp_strategy_intents", "Order intents emitted", p, registry=r)
        self.steps = Gauge("mp_strategy_steps", "Market steps evaluated", p, registry=r)
        self.epoch = Gauge(
            "mp_strategy_plan_epoch", "Epoch of the plan of the last evaluated step", p, registry=r
        )
        self.rotation = Gauge(
            "mp_strategy_plan_rotation", "Early rotation of that plan (0: the scheduled plan)", p, registry=r
        )
        self.events = Counter(
            "mp_strategy_events", "Records consumed, by topic (short name)", ["profile", "topic"], registry=r
        )
        self.errors = Counter(
            "mp_strategy_errors",
            "Errors by kind: dead_lettered (undecodable or implausible), command_refused",
            ["profile", "kind"],
            registry=r,
        )
        for kind in ("dead_lettered", "command_refused"):
            self.errors.labels(profile, kind)  # exported as 0 before the first error
        for kind in ("drawdown", "daily_loss"):
            self.halts.labels(profile, kind)

    def counts(self, topic: str, partition: int, offset: int) -> bool:
        """Whether a record is new to this worker's history (not re-read by the rebuild)."""
        return offset >= self.counted_from.get((topic, partition), 0)

    def consumed(self, topic: str, partition: int, offset: int, short: str) -> None:
        if self.counts(topic, partition, offset):
            self.events.labels(self.profile, short).inc()

    def error(self, kind: str, topic: str, partition: int, offset: int) -> None:
        if self.counts(topic, partition, offset):
            self.errors.labels(self.profile, kind).inc()

    def update(self, state: StrategyState) -> None:
        """Set the gauges from the state (cheap: a handful of sets; called after steps and fills)."""
        pid = self.profile
        self.trades.labels(pid).set(state.fills)
        self.closed.labels(pid).set(state.closed_trades)
        self.wins.labels(pid).set(state.wins)
        self.win_rate.labels(pid).set(state.wins / state.closed_trades if state.closed_trades else 0.0)
        self.realized.labels(pid).set(float(state.realized_pnl))
        unrealized = sum(
            (
                (state.marks.get(prod, pos.avg_price) - pos.avg_price) * pos.size
                for prod, pos in state.positions.items()
            ),
            Decimal(0),
        )
        self.unrealized.labels(pid).set(float(unrealized))
        self.fees.labels(pid).set(float(state.fees))
        equity = state.equity()
        self.equity.labels(pid).set(float(equity))
        dd = float((state.high_water - equity) / state.high_water * 100) if state.high_water > 0 else 0.0
        dd = max(dd, 0.0)
        self._max_dd = max(self._max_dd, dd)
        self.drawdown.labels(pid).set(dd)
        self.max_drawdown.labels(pid).set(self._max_dd)
        self.open_positions.labels(pid).set(len(state.positions))
        for kind, n in state.halt_counts.items():
            self.halts.labels(pid, kind).set(n)
        self.halted.labels(pid, "drawdown").set(1 if state.halted else 0)
        self.halted.labels(pid, "daily_loss").set(
            1 if state.day is not None and state.entries_paused_day == state.day else 0
        )
        self.halted.labels(pid, "operator").set(1 if state.paused else 0)
        self.halted.labels(pid, "account_mismatch").set(1 if state.account_mismatch else 0)
        for asset, size in state.untracked_holdings().items():
            self.untracked.labels(pid, asset).set(float(size))
        self.intents.labels(pid).set(state.intents_sent)
        self.steps.labels(pid).set(state.steps_done)
        if state.last_plan is not None:
            self.epoch.labels(pid).set(state.last_plan[0])
            self.rotation.labels(pid).set(state.last_plan[1])
