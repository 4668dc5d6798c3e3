"""The book, once: average-cost accounting of fills, the rule of which fills count, and the return correlation.

Pure (no Kafka, Redis, exchange or Prometheus): the strategy workers (their cash, positions and risk halts), the
arbiter (its correlation guard), the run report (summary.json) and the live dashboards and router (the monitor's
tracker) all book with these functions, so they agree by construction.

Accounting, per product, long-only spot, quote currency:
  a buy       adds to the holding at average cost: avg = (avg * held + size * price) / (held + size); its fee is
              kept with the holding (`entry_fees`) and cash falls by size * price + fee
  a sell      sells min(size, held) at the average cost: realised gain = (price - avg) * sold; the holding's
              entry fees are charged pro rata (entry_fees * sold / held); cash rises by size * price - fee
  a "win"     a sell whose gain exceeds the fees of both its legs (its share of the entry fees and its own fee)
  closed      every sell counts as a closed trade, even one that finds nothing booked (a holding the books do
              not know, e.g. bought outside the system): the report has always counted sells this way
A holding sold to zero stays in the book at size 0 (the report has always kept it, and the Decimal exponents of
its next sizes follow from it: summary.json prints them as they are); the strategy drops it, so its next buy
starts afresh at the fill's own size and price. The values are the same either way.

Which fills count (the verified-fill rule): a fill is real only when it belongs to an order the arbiter
approved, i.e. an `OrderDecided` (the first one read for the intent) of the fill's profile, not rejected, with
the fill's product and side, and the intent's fills never exceed the approved size in total. A fill of a second
order the exchange took under the intent's client id (`OrderFilled.duplicate_of`: two workers of a profile both
sent it) is real and booked beyond the intent's size. Anything else (a forged record on orders.events) moves no
books. The strategy applies the same check to its own intents against what it asked (`Order`), and to foreign
ones (manual orders) against the decision, after waiting a bounded time for it (services/strategy/trust.py).

Correlation: `pearson` of two return series, with the sums taken by `math.fsum`.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from shared.messages import OrderDecided, OrderFilled
from shared.native import reduce_frozen

ZERO = Decimal(0)


# ------------------------------------------------------------------------------------------ accounting
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True, slots=True)
class Holding:
    """An open position in one product: its size, average cost, and the buy fees not yet charged to a sale."""

    size: Decimal
    avg_price: Decimal
    entry_fees: Decimal = ZERO

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True, slots=True)
class Booked:
    """What one fill did to one product's holding."""

    holding: Holding | None  # after the fill (size 0 once sold out); None when a sell found nothing held
    cash: Decimal  # the change of cash: - (size * price + fee) for a buy, size * price - fee for a sell
    notional: Decimal  # size * price
    sold: Decimal  # of a sell, the size taken out of the holding (0 for a buy)
    gain: Decimal  # realised at average cost, fees apart (0 for a buy)
    win: bool  # a sell whose gain exceeds its share of the entry fees plus its own fee

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


def book_fill(before: Holding | None, side: str, size: Decimal, price: Decimal, fee: Decimal) -> Booked:
    """Apply one fill to a product's holding (module docstring). `side` is "buy" or "sell"."""
    notional = size * price
    if side == "buy":
        if before is None:
            return Booked(Holding(size, price, fee), -(notional + fee), notional, ZERO, ZERO, False)
        total = before.size + size
        after = Holding(total, (before.avg_price * before.size + notional) / total, before.entry_fees + fee)
        return Booked(after, -(notional + fee), notional, ZERO, ZERO, False)
    if side != "sell":
        raise ValueError(f"a fill's side is 'buy' or 'sell', got {side!r}")
    if before is None:
        # Nothing booked to sell: cash only. A sell still counts as a closed trade (gain 0, a win only with a
        # rebate larger than nothing, as the report has always counted it).
        return Booked(None, notional - fee, notional, ZERO, ZERO, -fee > 0)
    held = before.size
    sold = min(held, size)
    gain = (price - before.avg_price) * sold
    share = before.entry_fees * (sold / held) if held else ZERO
    rest = Holding(held - sold, before.avg_price, before.entry_fees - share)
    return Booked(rest, notional - fee, notional, sold, gain, gain - share - fee > 0)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass
class Book:
    """One profile's books from its verified fills (mutable: it accumulates; each step is `book_fill`)."""

    initial: Decimal
    cash: Decimal
    holdings: dict[str, Holding] = field(default_factory=dict)
    realized: Decimal = ZERO
    fees: Decimal = ZERO
    buys: Decimal = ZERO  # buy notionals
    sells: Decimal = ZERO  # sell notionals
    trades: int = 0
    closed: int = 0
    wins: int = 0

    @classmethod
    def starting(cls, initial: Decimal) -> Book:
        return cls(initial=initial, cash=initial)

    def apply(self, f: OrderFilled) -> Booked:
        b = book_fill(self.holdings.get(f.product), f.side, f.size, f.price, f.fee)
        if b.holding is None:
            self.holdings.pop(f.product, None)
        else:
            self.holdings[f.product] = b.holding
        self.cash += b.cash
        self.fees += f.fee
        self.trades += 1
        if f.side == "buy":
            self.buys += b.notional
        else:
            self.sells += b.notional
            self.realized += b.gain
            self.closed += 1
            self.wins += b.win
        return b

    @property
    def positions(self) -> dict[str, Decimal]:
        """Size held by product (0 for a product sold out: `open_positions` leaves those out)."""
        return {p: h.size for p, h in self.holdings.items()}

    def avg_price(self, product: str) -> Decimal:
        h = self.holdings.get(product)
        return h.avg_price if h is not None else ZERO

    def open_positions(self) -> dict[str, Decimal]:
        return {p: h.size for p, h in sorted(self.holdings.items()) if h.size}

    def equity(self, marks: Mapping[str, Decimal]) -> Decimal:
        """Cash plus the open positions at the marks (a product without a mark at its average cost)."""
        return self.cash + sum(
            (s * marks.get(p, self.avg_price(p)) for p, s in self.open_positions().items()), ZERO
        )

    def unrealized(self, marks: Mapping[str, Decimal]) -> Decimal:
        return sum(
            (
                (marks.get(p, self.avg_price(p)) - self.avg_price(p)) * s
                for p, s in self.open_positions().items()
            ),
            ZERO,
        )


# ------------------------------------------------------------------------------------------ which fills count
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True, slots=True)
class Order:
    """What an intent's fills must match: the approved (or, for the strategy's own intents, the asked) order."""

    product: str
    side: str
    size: Decimal

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


FillCheck = Literal["counted", "duplicate", "mismatch", "over_size"]


def approved_order(decision: OrderDecided | None, profile: str) -> Order | None:
    """The order a decision approves for the profile's fills; None when there is none (no decision, a rejection,
    or a decision of another profile)."""
    if decision is None or decision.verdict == "rejected" or decision.profile != profile:
        return None
    return Order(decision.product, decision.side, decision.size)


def check_fill(f: OrderFilled, order: Order, filled: Decimal) -> tuple[FillCheck, Decimal]:
    """Judge one fill against its order, `filled` being what the order's earlier counted fills add up to.

    Returns the verdict and the order's filled size with this fill: "counted" (consistent), "duplicate" (a
    second exchange order under the intent's client id: real, outside the order's size, `filled` unchanged),
    "mismatch" (another product or side) or "over_size" (the total would exceed the order's size)."""
    if (f.product, f.side) != (order.product, order.side):
        return "mismatch", filled
    if f.duplicate_of is not None:
        return "duplicate", filled
    total = filled + f.size
    return ("over_size" if total > order.size else "counted"), total


def first_decisions(decisions: Iterable[OrderDecided]) -> dict[str, OrderDecided]:
    """The first decision read for each intent (what the strategy workers keep; a later copy changes nothing)."""
    out: dict[str, OrderDecided] = {}
    for d in decisions:
        out.setdefault(d.intent_id, d)
    return out


def verified_fills(
    fills: Iterable[OrderFilled], decisions: Mapping[str, OrderDecided]
) -> tuple[list[OrderFilled], list[tuple[OrderFilled, str]]]:
    """The fills an approving decision covers, in (event time, fill id) order, and the others with why.

    `decisions`: the first decision per intent (`first_decisions`). The caps apply in (event time, fill id)
    order, so the result does not depend on the order the fills were read in."""
    filled: dict[str, Decimal] = defaultdict(Decimal)
    ok: list[OrderFilled] = []
    refused: list[tuple[OrderFilled, str]] = []
    for f in sorted(fills, key=lambda f: (f.event_time, f.fill_id)):
        d = decisions.get(f.intent_id)
        order = approved_order(d, f.profile)
        if d is None or order is None:
            refused.append((f, f"no approving decision of {f.profile} for intent {f.intent_id}"))
            continue
        verdict, total = check_fill(f, order, filled[f.intent_id])
        if verdict == "mismatch":
            refused.append((f, f"{f.side} {f.product} does not match the approved {d.side} {d.product}"))
        elif verdict == "over_size":
            refused.append((f, f"fills of intent {f.intent_id} would exceed the approved size {d.size}"))
        else:
            filled[f.intent_id] = total
            ok.append(f)
    return ok, refused


# ------------------------------------------------------------------------------------------ correlation
# The smallest sum of squared deviations a series needs to be correlated at all ("it moved"). Each caller keeps
# the floor its outputs were produced with:
# - the arbiter's series are per-step PnL / initial equity of the positions held: a small but real position gives
#   returns near 1e-12 (squares near 1e-24), and the correlation guard must see them;
# - the monitor's series are simple returns of float equity curves (dashboards, HTML report), which show "n/a"
#   when a profile's equity never really moved: a dust holding's wiggle (returns near 1e-10) stays "n/a".
STEP_PNL_FLOOR = 1e-24
EQUITY_RETURN_FLOOR = 1e-18


def centred(xs: Sequence[float]) -> tuple[list[float], float]:
    """A series' deviations from its mean and their sum of squares: what `pearson` needs of each series, computed
    once per series when every pair of many series is correlated."""
    mx = math.fsum(xs) / len(xs)
    dx = [x - mx for x in xs]
    return dx, math.fsum(d**2 for d in dx)


def pearson_centred(
    a: tuple[list[float], float], b: tuple[list[float], float], *, floor: float
) -> float | None:
    """Pearson correlation of two equally long centred series; None when either sum of squares is <= `floor`."""
    (dx, sxx), (dy, syy) = a, b
    if sxx <= floor or syy <= floor:
        return None
    sxy = math.fsum(x * y for x, y in zip(dx, dy, strict=True))
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def pearson(xs: Sequence[float], ys: Sequence[float], *, floor: float) -> float | None:
    """Pearson correlation of the last n points of each series (n the shorter length), clipped to [-1, 1]; None
    with fewer than 3 points or when either series' sum of squared deviations is <= `floor` (constant)."""
    n = min(len(xs), len(ys))
    if n < 3:
        return None
    return pearson_centred(centred(xs[len(xs) - n :]), centred(ys[len(ys) - n :]), floor=floor)


def simple_returns(equity: Sequence[float]) -> list[float]:
    """Step returns b / a - 1 of consecutive values (0 after a zero value)."""
    return [(b / a - 1.0) if a else 0.0 for a, b in itertools.pairwise(equity)]
