"""services/strategy/metrics.py: gauges follow the rebuilt state; counters skip what a rebuild re-reads."""

from __future__ import annotations

from services.strategy.domain import decide, new_state
from services.strategy.metrics import StrategyMetrics
from tests.unit.builders import (
    DAY,
    HOUR,
    T0,
    approval_of,
    config,
    order_filled,
    path_candles,
    plans_covering,
    step_messages,
)


def sample(m: StrategyMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, {"profile": "profile_a", **labels})


def test_gauges_come_from_the_state_so_a_rebuild_exports_the_same_numbers() -> None:
    p = config().profiles["profile_a"]
    fills = [
        order_filled("profile_a", "buy", product="BTC/USDC", size=2, price=100, fee="0.2", at=T0 - DAY),
        order_filled("profile_a", "sell", product="BTC/USDC", size=1, price=110, fee="0.1", at=T0 - DAY + 60),
        order_filled(
            "profile_a", "sell", product="BTC/USDC", size=1, price="100.1", fee="0.1", at=T0 - DAY + 120
        ),
    ]
    m = StrategyMetrics("profile_a")
    for _ in range(2):  # a first run, then a rebuild of a restarted worker over the same inputs
        state = new_state("profile_a", p, "USDC", frozenset({0}))
        # Approved fills of no intent of ours are applied at the first step closing after them: one flat step.
        market = step_messages(path_candles("BTC/USDC", [100]))
        approvals = [approval_of(f) for f in fills]
        for msg in [*plans_covering("profile_a", T0, T0 + HOUR, HOUR), *approvals, *fills, *market]:
            decide(state, msg, 0)
            m.update(state)
        assert sample(m, "mp_strategy_trades") == 3 and sample(m, "mp_strategy_closed_trades") == 2
        # 110: gain 10 > fees 0.1 + 0.1; 100.1: gain 0.1 < fees 0.1 + 0.1 (both legs' fees, as summary.json)
        assert sample(m, "mp_strategy_wins") == 1 and sample(m, "mp_strategy_win_rate") == 0.5
        assert sample(m, "mp_strategy_realized_pnl") == 10.1
        assert sample(m, "mp_strategy_fees") == 0.4
        assert (
            sample(m, "mp_strategy_equity") == float(state.cash)
            and sample(m, "mp_strategy_open_positions") == 0
        )


def test_counters_count_only_records_past_the_previous_committed_offset() -> None:
    m = StrategyMetrics("profile_a")
    m.counted_from = {("ns.md.candles", 0): 5}
    for offset in range(8):  # offsets 0..4 were consumed (and counted) by the previous process
        m.consumed("ns.md.candles", 0, offset, "md.candles")
    m.error("dead_lettered", "ns.md.candles", 0, 3)
    m.error("dead_lettered", "ns.md.candles", 0, 6)
    m.consumed("ns.orders.events", 0, 0, "orders.events")  # never committed before: counted
    assert sample(m, "mp_strategy_events_total", topic="md.candles") == 3
    assert sample(m, "mp_strategy_events_total", topic="orders.events") == 1
    assert sample(m, "mp_strategy_errors_total", kind="dead_lettered") == 1
    assert sample(m, "mp_strategy_errors_total", kind="command_refused") == 0
