"""Issue #14's rules as properties: over generated candles (random walks with gaps, wide and quiet candles, thin
volume) and generated tight configs (stops, take-profits, loss limits, order_timeout longer than the candle, a
small volume share), the whole paper pipeline's pure cores (the backtest: strategy, arbiter and paper exchange
domains) write files that `mpctl audit` passes: fills inside their candle, protective exits within the candle
that reached them, no look-ahead or self-overlap, no wash trade while an order works, liquidity shared across
profiles, halts stamped at the close and closing positions, every exit with its reason."""

from __future__ import annotations

import copy
import os
import random
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mpctl.audit import audit_run
from mpctl.backtest import load_schedule, run_backtest, write_report
from shared import protective
from shared.config import AppConfig, parse_config

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "tests" / "fixtures" / "audit" / "config.yaml").read_text())
PRODUCTS = ("BTC", "ETH", "SOL", "XRP")
START_MS = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000  # a UTC midnight
HOUR_MS = 3_600_000


def _config(
    stop: float, take: float, dd: float, daily: float, timeout: int, share: float, size_pct: float = 30.0
) -> AppConfig:
    data: dict[str, Any] = copy.deepcopy(BASE)
    data["system"]["execution"]["max_volume_participation"] = share
    for p in data["profiles"].values():
        p["trading_params"]["order_timeout"] = timeout
        p["strategy_config"]["max_position_size_pct"] = size_pct
        rm = p["risk_management"]
        rm.update(stop_loss_pct=stop, take_profit_pct=take, max_drawdown_pct=dd, max_daily_loss_pct=daily)
    return parse_config(data)


def _write_candles(d: Path, seed: int, steps: int, vol: float, volume: float) -> None:
    rnd = random.Random(seed)
    for k, base in enumerate(PRODUCTS):
        price = 100.0 * (k + 1)
        rows = ["timestamp_ms,open,high,low,close,volume"]
        for i in range(steps):
            gap = rnd.random() < 0.05  # now and then the market opens away from the last close
            open_ = price * (1 + rnd.gauss(0, vol * 3)) if gap else price
            close = open_ * (1 + rnd.gauss(0, vol))
            high = max(open_, close) * (1 + abs(rnd.gauss(0, vol)))
            low = min(open_, close) * (1 - abs(rnd.gauss(0, vol)))
            v = volume * rnd.choice((0.01, 0.2, 1.0, 3.0))
            rows.append(f"{START_MS + i * HOUR_MS},{open_:.4f},{high:.4f},{low:.4f},{close:.4f},{v:.6f}")
            price = close
        (d / f"gen_{base}-USDT_1h.csv").write_text("\n".join(rows) + "\n")


@settings(
    max_examples=int(os.environ.get("PAPER_TRUTH_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    vol=st.sampled_from([0.002, 0.006, 0.015]),
    volume=st.sampled_from([0.5, 50.0, 5000.0]),
    stop=st.sampled_from([0.3, 0.8, 2.0]),
    take=st.sampled_from([0.4, 1.2, 4.0]),
    dd=st.sampled_from([0.5, 1.0, 2.5, 10.0]),
    daily=st.sampled_from([0.4, 0.8, 1.5, 5.0]),
    timeout=st.sampled_from([45, 3600, 7200, 10800]),
    share=st.sampled_from([0.0001, 0.01, 0.1]),
    size_pct=st.sampled_from([30.0, 95.0]),
)
def test_generated_markets_and_tight_limits_pass_the_audit(
    seed: int,
    vol: float,
    volume: float,
    stop: float,
    take: float,
    dd: float,
    daily: float,
    timeout: int,
    share: float,
    size_pct: float,
) -> None:
    cfg = _config(stop, take, dd, daily, timeout, share, size_pct)
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        data.mkdir()
        out.mkdir()
        _write_candles(data, seed, 144, vol, volume)
        run, _ = run_backtest(cfg, load_schedule(cfg, data))
        write_report(cfg, run, out)
        report = audit_run(out, data, cfg)
        assert report.ok, report.text()


@given(
    open_=st.decimals(min_value=Decimal(1), max_value=Decimal(1000), places=2),
    up=st.decimals(min_value=Decimal(0), max_value=Decimal("0.1"), places=4),
    down=st.decimals(min_value=Decimal(0), max_value=Decimal("0.1"), places=4),
    avg=st.decimals(min_value=Decimal(1), max_value=Decimal(1000), places=2),
    sl=st.decimals(min_value=Decimal("0.1"), max_value=Decimal(50), places=1),
    tp=st.decimals(min_value=Decimal("0.1"), max_value=Decimal(100), places=1),
)
# Opened above the take profit, then fell through the stop: the take profit filled at the open, first.
@example(Decimal("2.00"), Decimal(0), Decimal("0.0060"), Decimal("1.99"), Decimal("0.1"), Decimal("0.1"))
def test_a_protective_exit_is_priced_inside_its_candle_and_the_stop_decides(
    open_: Decimal, up: Decimal, down: Decimal, avg: Decimal, sl: Decimal, tp: Decimal
) -> None:
    high, low = open_ * (1 + up), open_ * (1 - down)
    stop, take = protective.levels(avg, sl, tp)
    assert stop < avg < take
    hit = protective.reached(open_, high, low, stop, take)
    if hit is None:
        assert low > stop and high < take  # neither level reached
        return
    kind, price = hit
    assert low <= price <= high  # a trade happened at that price within the candle
    if open_ <= stop or open_ >= take:
        # A gap through a level at the open: that order fills at the open, before anything else in the candle.
        assert (kind, price) == ("stop_loss" if open_ <= stop else "take_profit", open_)
    elif low <= stop:
        assert (kind, price) == ("stop_loss", stop)  # the stop decides when both are reached
    else:
        assert (kind, price) == ("take_profit", take)
