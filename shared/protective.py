"""A long position's protective exits, pure: where its stop loss and take profit rest, and which of them a candle
reaches first (docs/execution.md, Protective exits).

A protective order rests at the exchange from the moment its entry completes, so it acts inside a candle, not at
its close: it is reached on the first candle whose range touches its level, at the level, or at the candle's
open when the candle opens beyond it (a gap: the open is the first price anyone could trade at). The candle
does not say in which order its high and low came; when it reaches both levels the stop is the one that acts
(the conservative reading: a backtest must not assume the better of two unknown orders).

A candle of the live market may carry its trades' path (`CandleClosed.trade_path`: the successive new lows and
new highs, in time order, built by the live ingest from every trade of the bucket). Then the trades decide, as
they do for an order resting at the exchange (`reached_on_path`): which level came first, and the stop's price
is the first trade at or through it (a stop sells at the market once triggered; a fall between two trades is
the seller's loss), the take profit's its level (a resting limit).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_DOWN, ROUND_UP, Decimal
from typing import Literal

from shared.messages import PathPoint

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


def reached_on_path(
    path: Sequence[PathPoint], stop: Decimal, take_profit: Decimal
) -> tuple[Kind, Decimal] | None:
    """`reached` from a bucket's trade path: the first point at or through a level decides, at that trade's price
    for the stop and at the level for the take profit. A point of both at one time: the stop (conservative)."""
    for _, price in path:
        if price <= stop:
            return "stop_loss", price
        if price >= take_profit:
            return "take_profit", take_profit
    return None
