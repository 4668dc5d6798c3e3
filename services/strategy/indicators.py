"""The indicators of every product a strategy worker sees, fed once per step: a pure cache over
services/strategy/signals.py, read by the trading step (services/strategy/domain.py).

Indicators live in a `MarketSignals` (one `ProductSignals` per product). Each worker has its own; the
backtest shares one across all profiles, because indicators depend only on the product and the structural
parameters, which every profile shares (mpctl/backtest.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from services.strategy.signals import Bar, ProductSignals, Signal, SignalModel, blend_with
from shared.aligner import Step, candle_floats
from shared.strategy_catalog import CATALOG

_ANY_STRATEGY = next(iter(CATALOG))  # ProductSignals.evaluate validates a name; every model runs regardless


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class _Snapshot:
    """What every profile reads of one product at its last bar: volatility, and the catalog-default signals
    of the ready models (computed on first use: only a product some profile blends needs them)."""

    __slots__ = ("per_candle", "annualised", "models", "_ps", "_defaults")

    def __init__(self, ps: ProductSignals) -> None:
        vol = ps.volatility
        pc = self.per_candle = vol.per_candle()
        # VolatilityTracker.annualised(), without computing per_candle() a second time.
        self.annualised = None if pc is None else pc * vol._annualise
        self.models: Mapping[str, SignalModel] = ps._models  # read only (ps.models without its proxy)
        self._ps = ps
        self._defaults: dict[str, Signal] | None = None

    def defaults(self) -> dict[str, Signal]:
        if self._defaults is None:
            self._defaults = self._ps.evaluate(_ANY_STRATEGY, {})
        return self._defaults


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class MarketSignals:
    """The indicators of every product, fed once per step.

    Sharing one instance across profiles (the backtest) is exact only if every profile evaluates a step
    before any profile is fed the next one; `update` refuses a step older than what it has seen (that would
    be look-ahead for the lagging profile), so a violation fails loudly instead of skewing results.
    """

    def __init__(self) -> None:
        self.products: dict[str, ProductSignals] = {}
        self.closes: dict[str, Decimal] = {}  # of the last step: product -> close
        self._snaps: dict[str, _Snapshot] = {}
        self._last_step: int | None = None

    def update(self, step: Step) -> None:
        if self._last_step is not None and step.time_s <= self._last_step:
            if step.time_s < self._last_step:
                raise RuntimeError(
                    f"market signals are at step {self._last_step}, asked to evaluate the older step {step.time_s}: "
                    "a shared MarketSignals needs every profile in lockstep"
                )
            return  # a profile sharing this instance already fed the step
        self._last_step = step.time_s
        products = self.products
        closes: dict[str, Decimal] = {}
        candles = step.candles
        floats = candle_floats(candles)  # converted once per step, with the registry (shared.aligner)
        for i in range(len(candles)):
            c = candles[i]
            o, h, lo, cl, v = floats[i]
            ps = products.get(c.product)
            if ps is None:
                ps = products[c.product] = ProductSignals(step.interval_s)
            ps.update(Bar(step.time_s, o, h, lo, cl, v))
            closes[c.product] = c.close
        self.closes = closes
        self._snaps = {}

    def snapshot(self, product: str) -> _Snapshot | None:
        """The product at its last bar; None for a product never seen or absent from the last step."""
        snap = self._snaps.get(product)
        if snap is None:
            if product not in self.closes:
                return None
            # Computed once per product and step, however many profiles read it.
            snap = self._snaps[product] = _Snapshot(self.products[product])
        return snap

    def blended(
        self,
        product: str,
        strategy: str,
        tunable: Mapping[str, float],
        weights: Mapping[str, float],
        w: float,
    ) -> Signal | None:
        """`blend` of the selected strategy (with the plan's drifted tunables) and the others (catalog
        defaults): the same signal as `blend(strategy, ProductSignals.evaluate(...), ...)`, with only the
        selected model evaluated per profile. None for a product absent from the last step."""
        snap = self.snapshot(product)
        if snap is None:
            return None
        model = snap.models.get(strategy)
        if model is None:
            raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(CATALOG)}")
        if model._bars < model._warmup:
            return None  # SignalModel.evaluate's None before warm-up, without its frame
        own = model._evaluate(tunable)
        # The others' default signals, in catalog order (blend_with skips the selected one's default).
        return blend_with(strategy, own, snap.defaults(), weights, w)
