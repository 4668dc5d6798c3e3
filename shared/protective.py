"""A long position's protective exits, pure: where its stop loss and take profit rest, and which of them a candle
reaches first (docs/execution.md, Protective exits).

A protective order rests at the exchange from the moment its entry completes, so it acts inside a candle, not at
its close: it is reached on the first candle whose range touches its level, at the level, or at the candle's
open when the candle opens beyond it (a gap: the open is the first price anyone could trade at). The candle
does not say in which order its high and low came; when it reaches both levels the stop is the one that acts
(the conservative reading: a backtest must not assume the better of two unknown orders).
"""

from __future__ import annotations

from decimal import ROUND_DOWN, ROUND_UP, Decimal
from typing import Literal

EIGHT = Decimal("0.00000001")
HUNDRED = Decimal(100)

Kind = Literal["stop_loss", "take_profit"]


def levels(avg_price: Decimal, stop_loss_pct: Decimal, take_profit_pct: Decimal) -> tuple[Decimal, Decimal]:
    """(stop, take profit) of a position bought at `avg_price`, rounded towards the position's favour never:
    the stop up and the take profit down to 1e-8, so a rounding never lets a loss run past the limit."""
    stop = (avg_price * (1 - stop_loss_pct / HUNDRED)).quantize(EIGHT, rounding=ROUND_UP)
    take = (avg_price * (1 + take_profit_pct / HUNDRED)).quantize(EIGHT, rounding=ROUND_DOWN)
    return stop, take


def reached(
    open_: Decimal,
    high: Decimal,
    low: Decimal,
    stop: Decimal,
    take_profit: Decimal,
    *,
    resting_at_open: bool = True,
) -> tuple[Kind, Decimal] | None:
    """Which protective exit this candle triggers and at what price, or None when it reaches neither.

    `resting_at_open`: the orders rested before the candle opened. False on the candle in which the entry
    completed: its open came before them, so it is no gap for them, and only the levels count."""
    if resting_at_open and open_ <= stop:
        return "stop_loss", open_  # opened through the stop
    if resting_at_open and open_ >= take_profit:
        return "take_profit", open_  # opened through the take profit
    if low <= stop:
        return "stop_loss", stop  # also when the high reached the take profit: the stop decides
    if high >= take_profit:
        return "take_profit", take_profit
    return None
