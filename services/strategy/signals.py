"""The five strategies' signal models, fed one closed candle at a time.

Pure domain code: no I/O, no Kafka/Redis/exchange imports, standard library only (and mypyc's class
attribute, see scripts/build_native.py). Every indicator is incremental (O(1) amortised per bar) and uses only
bars already seen, so a replay and live trading compute the same numbers. The formulas are documented in
docs/strategies.md; names and parameters come from shared/strategy_catalog.py.

Rolling sums and variances use a two-stack queue: values are only ever added, never subtracted, so a large
value that has left the window leaves no rounding residue behind (a running add/subtract sum would), and a
window of identical values has a variance of exactly 0.0.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from types import FunctionType, MappingProxyType
from typing import Any, ClassVar, SupportsIndex

# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from shared.native import reduce_frozen
from shared.strategy_catalog import CATALOG

__all__ = [
    "SECONDS_PER_YEAR",
    "Bar",
    "BayesianDriftModel",
    "DonchianAtrBreakoutModel",
    "EntropyGatedMomentumModel",
    "MultiHorizonMomentumModel",
    "ProductSignals",
    "Signal",
    "SignalModel",
    "VolatilityTracker",
    "VwmaOscillatorModel",
    "blend",
    "blend_with",
    "make_model",
]

SECONDS_PER_YEAR = 365 * 86400
_SQRT1_2 = math.sqrt(0.5)
_NO_TUNABLES: dict[str, float] = {}  # never written to


def _probe() -> None:
    """Nothing: its type tells whether this module runs compiled (see _NATIVE)."""


# Whether mypyc compiled this module (scripts/build_native.py): a compiled function is a builtin, not a Python
# function. The frozen dataclasses' __init__ below set their fields by plain assignment when compiled (a store
# into the object's own slot, which mypyc makes directly; `frozen` guards setattr from outside, which still
# raises), and through object.__setattr__ when interpreted (as the dataclass's generated __init__ does, since
# the class's __setattr__ refuses). The same fields, the same values.
_NATIVE = not isinstance(_probe, FunctionType)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True, slots=True, init=False)
class Bar:
    """One closed candle. Floats, not Decimals, for speed inside the indicators."""

    open_time: int  # epoch seconds
    open: float
    high: float
    low: float
    close: float
    volume: float

    def __init__(
        self, open_time: int, open: float, high: float, low: float, close: float, volume: float
    ) -> None:
        # The dataclass's own __init__ (each field set, then __post_init__), written here so that mypyc compiles
        # it: the generated one is interpreted code, and it runs for every bar. See _NATIVE for the two ways.
        if _NATIVE:
            self.open_time = open_time  # type: ignore[misc]
            self.open = open  # type: ignore[misc]
            self.high = high  # type: ignore[misc]
            self.low = low  # type: ignore[misc]
            self.close = close  # type: ignore[misc]
            self.volume = volume  # type: ignore[misc]
        else:
            _set = object.__setattr__
            _set(self, "open_time", open_time)
            _set(self, "open", open)
            _set(self, "high", high)
            _set(self, "low", low)
            _set(self, "close", close)
            _set(self, "volume", volume)
        self.__post_init__()

    def __post_init__(self) -> None:
        # Checked once here so no indicator ever takes the log of a non-positive price or sums a NaN.
        inf = math.inf
        o, c, v = self.open, self.close, self.volume
        if 0.0 < self.low <= self.high < inf and 0.0 < o < inf and 0.0 < c < inf and 0.0 <= v < inf:
            return  # a valid bar (every bar of a backtest): one test, the precise errors below otherwise
        for what, x in (("open", self.open), ("high", self.high), ("low", self.low), ("close", self.close)):
            if not 0.0 < x < math.inf:
                raise ValueError(f"bar at {self.open_time}: {what} {x!r} must be a positive finite price")
        if not 0.0 <= self.volume < math.inf:
            raise ValueError(f"bar at {self.open_time}: volume {self.volume!r} must be finite and >= 0")
        if self.high < self.low:
            raise ValueError(f"bar at {self.open_time}: high {self.high!r} is below low {self.low!r}")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True, slots=True, init=False)
class Signal:
    value: float  # in [-1, 1]; > 0 bullish
    confidence: float  # in [0, 1]

    def __init__(self, value: float, confidence: float) -> None:
        # The dataclass's own __init__, compiled (see Bar.__init__).
        if _NATIVE:
            self.value = value  # type: ignore[misc]
            self.confidence = confidence  # type: ignore[misc]
        else:
            _set = object.__setattr__
            _set(self, "value", value)
            _set(self, "confidence", confidence)
        self.__post_init__()

    def __post_init__(self) -> None:
        # The comparisons are False for NaN, so NaN is refused too.
        if not -1.0 <= self.value <= 1.0:
            raise ValueError(f"signal value {self.value!r} must be in [-1, 1]")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"signal confidence {self.confidence!r} must be in [0, 1]")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


def _signal(value: float, confidence: float) -> Signal:
    # Last line of defence: formulas are guarded, but a NaN must never reach an order decision.
    if value != value:
        value = 0.0
    if confidence != confidence:
        confidence = 0.0
    # min(1.0, max(-1.0, value)) and min(1.0, max(0.0, confidence)), written out (they run for every signal).
    value = value if value > -1.0 else -1.0
    confidence = confidence if confidence > 0.0 else 0.0
    # min(1.0, value) and min(1.0, confidence); Signal's checks then hold (no NaN, both clamped).
    return Signal(value if value < 1.0 else 1.0, confidence if confidence < 1.0 else 1.0)


_FLAT = Signal(0.0, 0.0)


# --------------------------------------------------------------------------------------------------
# Rolling primitives
# --------------------------------------------------------------------------------------------------


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class _RollingSum:
    """Sum of the last n pushed values (two-stack queue, amortised O(1), no subtraction)."""

    __slots__ = ("_n", "_back", "_back_sum", "_front")

    def __init__(self, n: int) -> None:
        self._n = n
        self._back: list[float] = []  # newest values, in arrival order
        self._back_sum = 0.0
        self._front: list[float] = []  # suffix sums of older values; _front[-1] covers the whole front

    def push(self, x: float) -> None:
        # Full once n values were pushed, and then a non-empty front means full: the front is filled only
        # when the back holds n values, and from then on every push pops one value and appends one.
        front = self._front
        if front:
            front.pop()
        elif len(self._back) >= self._n:
            acc = 0.0
            for y in reversed(self._back):
                acc += y
                front.append(acc)
            self._back.clear()
            self._back_sum = 0.0
            front.pop()
        self._back.append(x)
        self._back_sum += x

    def total(self) -> float:
        return (self._front[-1] if self._front else 0.0) + self._back_sum


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class _RollingSum3:
    """Three rolling sums of one window pushed together (the VWMA's price x volume, volume and close): each
    sum is exactly what its own _RollingSum gives (same additions, same order), with one bookkeeping."""

    __slots__ = ("_n", "_back", "_sa", "_sb", "_sc", "_front")

    def __init__(self, n: int) -> None:
        self._n = n
        self._back: list[tuple[float, float, float]] = []
        self._sa = self._sb = self._sc = 0.0
        self._front: list[tuple[float, float, float]] = []

    def push(self, a: float, b: float, c: float) -> None:
        front = self._front
        if front:  # full (see _RollingSum.push)
            front.pop()
        elif len(self._back) >= self._n:
            xa = xb = xc = 0.0
            for ya, yb, yc in reversed(self._back):
                xa += ya
                xb += yb
                xc += yc
                front.append((xa, xb, xc))
            self._back.clear()
            self._sa = self._sb = self._sc = 0.0
            front.pop()
        self._back.append((a, b, c))
        self._sa += a
        self._sb += b
        self._sc += c

    def totals(self) -> tuple[float, float, float]:
        if self._front:
            fa, fb, fc = self._front[-1]
            return fa + self._sa, fb + self._sb, fc + self._sc
        return 0.0 + self._sa, 0.0 + self._sb, 0.0 + self._sc  # as _RollingSum.total: 0.0 + -0.0 is 0.0


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class _RollingMoments:
    """Sample variance of the last n pushed values: Welford aggregates per stack, merged by Chan's formula."""

    __slots__ = ("_n", "_back", "_bn", "_bmean", "_bm2", "_front")

    def __init__(self, n: int) -> None:
        self._n = n
        self._back: list[float] = []
        self._bn = 0
        self._bmean = 0.0
        self._bm2 = 0.0
        self._front: list[tuple[int, float, float]] = []  # suffix (count, mean, M2) aggregates

    def push(self, x: float) -> None:
        front = self._front
        if front:  # full (see _RollingSum.push)
            front.pop()
        elif len(self._back) >= self._n:
            mean, m2 = 0.0, 0.0
            for k, y in enumerate(reversed(self._back), 1):
                d = y - mean
                mean += d / k
                m2 += d * (y - mean)
                front.append((k, mean, m2))
            self._back.clear()
            self._bn, self._bmean, self._bm2 = 0, 0.0, 0.0
            front.pop()
        self._back.append(x)
        # Welford's update with the aggregates in locals (the same operations, fewer attribute accesses).
        n = self._bn = self._bn + 1
        mean = self._bmean
        d = x - mean
        mean = self._bmean = mean + d / n
        self._bm2 += d * (x - mean)

    def count(self) -> int:
        return len(self._front) + len(self._back)

    def variance(self) -> float:
        """Sample variance (ddof=1); 0.0 for fewer than two values."""
        nb = self._bn
        if self._front:
            na, ma, m2 = self._front[-1]
            if nb:
                n = na + nb
                d = self._bmean - ma
                m2 = m2 + self._bm2 + d * d * na * nb / n
            else:
                n = na
        else:
            n, m2 = nb, self._bm2
        return m2 / (n - 1) if n > 1 and m2 > 0.0 else 0.0


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class _LogReturns:
    """Log returns of close, r = ln(close / previous close), with their rolling moments by window.

    One instance serves every model of a product (ProductSignals): the log is taken once per bar instead of
    once per model, and models asking for the same window share one _RollingMoments (the same values pushed
    in the same order give the same numbers, so sharing changes none). A model built alone has its own.
    """

    __slots__ = ("_prev", "last", "_windows")

    def __init__(self) -> None:
        self._prev: float | None = None
        self.last = 0.0  # the last bar's return (valid from the second bar on)
        self._windows: dict[int, _RollingMoments] = {}

    def window(self, n: int) -> _RollingMoments:
        m = self._windows.get(n)
        if m is None:
            if self._prev is not None:
                raise RuntimeError("a returns window must be asked for before the first bar")
            m = self._windows[n] = _RollingMoments(n)
        return m

    def push(self, close: float) -> None:
        prev = self._prev
        if prev is not None:
            r = self.last = math.log(close / prev)
            for m in self._windows.values():
                m.push(r)
        self._prev = close


def _tunable(tunable: Mapping[str, float], key: str, default: float, *, positive: bool = False) -> float:
    v = tunable.get(key)
    if v is None:
        return default
    x = float(v)
    if not math.isfinite(x) or (positive and x <= 0.0):
        need = "a positive finite number" if positive else "a finite number"
        raise ValueError(f"tunable parameter {key!r} = {v!r} must be {need}")
    return x


def _binary_entropy(k: int, n: int) -> float:
    """Entropy in bits of k successes out of n (0 log 0 = 0)."""
    if k == 0 or k == n:
        return 0.0
    p = k / n
    q = (n - k) / n
    return -(p * math.log2(p) + q * math.log2(q))


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class SignalModel(ABC):
    """One strategy's indicator state for one product. Feed every closed bar once, in order."""

    name: ClassVar[str]
    # Smallest allowed value of each structural parameter (2 where a sample variance needs two values).
    _minimum: ClassVar[Mapping[str, int]]

    def __init__(
        self, structural: Mapping[str, int] | None = None, *, returns: _LogReturns | None = None
    ) -> None:
        """`returns`: the log returns shared by the models of one product (ProductSignals feeds them);
        None: the model keeps and feeds its own."""
        spec = CATALOG[self.name]
        params = dict(spec.structural)
        # Read as objects: the values are checked below, and compiled code would refuse a non-int before that.
        given: Mapping[str, object] = structural or {}
        for key, raw in given.items():
            if key not in params:
                raise ValueError(
                    f"{self.name}: unknown structural parameter {key!r}; valid: {', '.join(sorted(params))}"
                )
            params[key] = _window(self.name, key, raw)
        for key, val in params.items():
            low = self._minimum.get(key, 1)
            if val < low:
                raise ValueError(f"{self.name}: structural parameter {key!r} = {val} must be >= {low}")
        self._structural: Mapping[str, int] = MappingProxyType(params)
        self._defaults: dict[str, float] = dict(spec.tunable)
        self._bars = 0
        self._last_time: int | None = None
        # Bar count at which the model's per-bar quantities were last computed (see `_at_bar`).
        self._memo_at = -1
        self._log = returns if returns is not None else _LogReturns()
        self._own_log = returns is None
        self._setup(params)
        self._warmup = self._compute_warmup(params)

    @property
    def structural(self) -> Mapping[str, int]:
        return self._structural

    @property
    def warmup(self) -> int:
        """Bars needed before ready()."""
        return self._warmup

    @property
    def bars(self) -> int:
        return self._bars

    def update(self, bar: Bar) -> None:
        # A bar fed twice (e.g. a redelivered message) would silently corrupt every window: refuse it.
        if self._last_time is not None and bar.open_time <= self._last_time:
            raise ValueError(
                f"{self.name}: bar open_time {bar.open_time} is not after the previous {self._last_time}; "
                "feed each closed bar once, in order"
            )
        if self._own_log:
            self._log.push(bar.close)
        self._advance(bar)

    def _advance(self, bar: Bar) -> None:
        """Take `bar` without the order check: for ProductSignals, which checks once for all its models and feeds
        their shared log-return stream itself."""
        self._last_time = bar.open_time
        self._bars += 1
        self._push(bar)

    def ready(self) -> bool:
        return self._bars >= self._warmup

    def _at_bar(self) -> bool:
        """True once per bar: when the quantities that do not depend on the tunables must be computed again.

        A backtest evaluates each model of a product several times per bar (catalog defaults, then every
        profile's own drifted tunables); the tunables only enter at the end of each formula, so what comes
        before is computed once per bar and kept: the same numbers from the same operations."""
        if self._memo_at == self._bars:
            return False
        self._memo_at = self._bars
        return True

    def evaluate(self, tunable: Mapping[str, float]) -> Signal | None:
        """Signal at the last bar, or None before warm-up. Missing tunable keys take the catalog default;
        keys that are not tunables of this strategy (e.g. structural ones) are ignored."""
        if self._bars < self._warmup:
            return None
        return self._evaluate(tunable)

    @abstractmethod
    def _setup(self, p: Mapping[str, int]) -> None: ...

    @abstractmethod
    def _compute_warmup(self, p: Mapping[str, int]) -> int: ...

    @abstractmethod
    def _push(self, bar: Bar) -> None:
        """Take the bar in; the log returns (`self._log`) already include it."""

    @abstractmethod
    def _evaluate(self, tunable: Mapping[str, float]) -> Signal: ...


def _window(model: str, key: str, raw: object) -> int:
    # Integral floats are accepted because StrategySpec.defaults() hands structural values out as floats.
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, SupportsIndex) and not isinstance(raw, bool):
        return operator.index(raw)  # int, or e.g. a numpy integer
    raise ValueError(f"{model}: structural parameter {key!r} must be an integer, got {raw!r}")


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class VwmaOscillatorModel(SignalModel):
    """volume_weighted_hash_oscillator: fast VWMA against slow VWMA, in units of return volatility."""

    name = "volume_weighted_hash_oscillator"
    _minimum = MappingProxyType({"fast_window": 1, "slow_window": 2})

    def _setup(self, p: Mapping[str, int]) -> None:
        self._f = p["fast_window"]
        self._s = p["slow_window"]
        self._sqrt_f = math.sqrt(self._f)
        # Rolling sums of (close x volume, volume, close) over the fast and the slow window.
        self._fast = _RollingSum3(self._f)
        self._slow = _RollingSum3(self._s)
        self._returns = self._log.window(self._s)

    def _compute_warmup(self, p: Mapping[str, int]) -> int:
        # VWMA_fast needs fast_window bars; sigma needs slow_window returns, i.e. slow_window + 1 closes.
        return max(p["fast_window"], p["slow_window"] + 1)

    def _push(self, bar: Bar) -> None:
        c, v = bar.close, bar.volume
        pv = c * v
        self._fast.push(pv, v, c)
        self._slow.push(pv, v, c)

    def _evaluate(self, tunable: Mapping[str, float]) -> Signal:
        d = self._defaults
        gain = _tunable(tunable, "gain", d["gain"])
        scale = _tunable(tunable, "confidence_scale", d["confidence_scale"], positive=True)
        if self._at_bar():
            self._z = self._oscillator()
        z = self._z
        if z is None:
            return _FLAT
        return _signal(math.tanh(gain * z), 1.0 - math.exp(-abs(z) / scale))

    def _oscillator(self) -> float | None:
        var = self._returns.variance()
        if var <= 0.0:
            return None  # no volatility, no scale: the oscillator is undefined
        # Sums of non-negative volumes are exactly 0.0 only when every volume is 0: fall back to equal weights.
        pv_f, vol_f, c_f = self._fast.totals()
        pv_s, vol_s, c_s = self._slow.totals()
        vwma_f = pv_f / vol_f if vol_f > 0.0 else c_f / self._f
        vwma_s = pv_s / vol_s if vol_s > 0.0 else c_s / self._s
        if vwma_s <= 0.0:
            return None  # subnormal volumes: every close x volume underflowed to 0, so no average is defined
        return (vwma_f - vwma_s) / vwma_s / (math.sqrt(var) * self._sqrt_f)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class EntropyGatedMomentumModel(SignalModel):
    """zygot_zalgo_entropy_dual_key_gate: momentum t-statistic, passed only when return signs are ordered."""

    name = "zygot_zalgo_entropy_dual_key_gate"
    _minimum = MappingProxyType({"momentum_window": 2, "entropy_window": 1})

    def _setup(self, p: Mapping[str, int]) -> None:
        self._m = p["momentum_window"]
        self._e = p["entropy_window"]
        self._sqrt_m = math.sqrt(self._m)
        self._closes: deque[float] = deque(maxlen=self._m + 1)
        self._returns = self._log.window(self._m)
        self._signs: deque[int] = deque()
        self._up = 0
        self._down = 0

    def _compute_warmup(self, p: Mapping[str, int]) -> int:
        return max(p["momentum_window"], p["entropy_window"]) + 1

    def _push(self, bar: Bar) -> None:
        c = bar.close
        if self._closes:
            r = self._log.last  # ln(c / previous close)
            s = (r > 0.0) - (r < 0.0)
            if len(self._signs) == self._e:
                old = self._signs.popleft()
                self._up -= old == 1
                self._down -= old == -1
            self._signs.append(s)
            self._up += s == 1
            self._down += s == -1
        self._closes.append(c)

    def _evaluate(self, tunable: Mapping[str, float]) -> Signal:
        d = self._defaults
        z_scale = _tunable(tunable, "momentum_z_scale", d["momentum_z_scale"], positive=True)
        gate = _tunable(tunable, "entropy_gate", d["entropy_gate"])
        if self._at_bar():
            moves = self._up + self._down
            self._h = (
                _binary_entropy(self._up, moves) if moves else 1.0
            )  # no moves at all: no order to trade on
            self._t_stat = self._momentum()
        h, m = self._h, self._t_stat
        if h > gate:
            return _FLAT
        # No momentum (m None: undefined without volatility) or none at all: value 0.
        value = 0.0 if m is None or m == 0.0 else math.copysign(min(1.0, abs(m) / z_scale), m)
        return _signal(value, 1.0 - h)

    def _momentum(self) -> float | None:
        var = self._returns.variance()
        if var > 0.0:
            return math.log(self._closes[-1] / self._closes[0]) / (math.sqrt(var) * self._sqrt_m)
        return None


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class MultiHorizonMomentumModel(SignalModel):
    """multi_phase_strategy_weight_tensor: weighted blend of volatility-normalised returns over 3 horizons."""

    name = "multi_phase_strategy_weight_tensor"
    _minimum = MappingProxyType({"short_horizon": 1, "mid_horizon": 1, "long_horizon": 1, "vol_window": 2})

    def _setup(self, p: Mapping[str, int]) -> None:
        self._h = (p["short_horizon"], p["mid_horizon"], p["long_horizon"])
        self._sqrt_h = tuple(math.sqrt(h) for h in self._h)
        self._closes: deque[float] = deque(maxlen=max(self._h) + 1)
        self._returns = self._log.window(p["vol_window"])

    def _compute_warmup(self, p: Mapping[str, int]) -> int:
        return max(p["short_horizon"], p["mid_horizon"], p["long_horizon"], p["vol_window"]) + 1

    def _push(self, bar: Bar) -> None:
        self._closes.append(bar.close)

    def _evaluate(self, tunable: Mapping[str, float]) -> Signal:
        d = self._defaults
        w0 = _tunable(tunable, "w_short", d["w_short"])
        w1 = _tunable(tunable, "w_mid", d["w_mid"])
        w2 = _tunable(tunable, "w_long", d["w_long"])
        gain = _tunable(tunable, "gain", d["gain"])
        total = w0 + w1 + w2
        # min(w0, w1, w2) < 0.0, written out (the tunables are finite).
        if w0 < 0.0 or w1 < 0.0 or w2 < 0.0 or total <= 0.0:
            ws = (w0, w1, w2)
            raise ValueError(f"{self.name}: horizon weights {ws} must be >= 0 with a positive sum")
        if self._at_bar():
            self._zs = self._horizon_z()
        zs = self._zs
        if zs is None:
            return _FLAT
        z0, z1, z2 = zs
        # The sums over the three horizons in their order, from 0.0, as the loop over zip(zs, ws) made them.
        score = 0.0
        score += w0 * z0
        score += w1 * z1
        score += w2 * z2
        agree = 0.0
        agree += w0 * ((z0 > 0.0) - (z0 < 0.0))
        agree += w1 * ((z1 > 0.0) - (z1 < 0.0))
        agree += w2 * ((z2 > 0.0) - (z2 < 0.0))
        return _signal(math.tanh(gain * score / total), abs(agree / total))

    def _horizon_z(self) -> tuple[float, float, float] | None:
        """Each horizon's log return in units of sd * sqrt(horizon); None without volatility."""
        var = self._returns.variance()
        if var <= 0.0:
            return None
        sd = math.sqrt(var)
        closes = self._closes
        c = closes[-1]
        h0, h1, h2 = self._h
        s0, s1, s2 = self._sqrt_h
        return (
            math.log(c / closes[-1 - h0]) / (sd * s0),
            math.log(c / closes[-1 - h1]) / (sd * s1),
            math.log(c / closes[-1 - h2]) / (sd * s2),
        )


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class BayesianDriftModel(SignalModel):
    """quantum_strategy_calculator: normal-normal posterior of the mean log return over a window."""

    name = "quantum_strategy_calculator"
    _minimum = MappingProxyType({"window": 2})

    def _setup(self, p: Mapping[str, int]) -> None:
        self._n = p["window"]
        self._closes: deque[float] = deque(maxlen=self._n + 1)
        self._returns = self._log.window(self._n)

    def _compute_warmup(self, p: Mapping[str, int]) -> int:
        return p["window"] + 1

    def _push(self, bar: Bar) -> None:
        self._closes.append(bar.close)

    def _evaluate(self, tunable: Mapping[str, float]) -> Signal:
        d = self._defaults
        prior_scale = _tunable(tunable, "prior_scale", d["prior_scale"], positive=True)
        gain = _tunable(tunable, "gain", d["gain"])
        if self._at_bar():
            self._s2 = self._returns.variance()
            # Sum of the window's log returns, telescoped: exact, no running sum needed.
            self._total = math.log(self._closes[-1] / self._closes[0]) if self._s2 > 0.0 else 0.0
        s2, total = self._s2, self._total
        if s2 <= 0.0:
            return _FLAT  # zero noise variance: the posterior is degenerate
        # Posterior mean / posterior sd, simplified: tau2 = prior_scale^2 * s2 makes s2 partly cancel.
        z = total / math.sqrt(s2 * (1.0 / (prior_scale * prior_scale) + self._n))
        return _signal(math.tanh(gain * z), abs(math.erf(z * _SQRT1_2)))


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class DonchianAtrBreakoutModel(SignalModel):
    """entropy_enhanced_trading_executor: close beyond the prior Donchian channel, in ATRs."""

    name = "entropy_enhanced_trading_executor"
    _minimum = MappingProxyType({"channel_window": 1, "atr_fast": 1, "atr_slow": 1})

    def _setup(self, p: Mapping[str, int]) -> None:
        self._c = p["channel_window"]
        self._af = p["atr_fast"]
        self._as = p["atr_slow"]
        self._tr_f = _RollingSum(self._af)
        self._tr_s = _RollingSum(self._as)
        # Monotonic deques of (bar index, value): front is the max high / min low of the prior bars.
        self._highs: deque[tuple[int, float]] = deque()
        self._lows: deque[tuple[int, float]] = deque()
        self._prev: Bar | None = None

    def _compute_warmup(self, p: Mapping[str, int]) -> int:
        # The channel needs channel_window prior bars; each true range needs a previous close.
        return max(p["channel_window"], p["atr_fast"], p["atr_slow"]) + 1

    def _push(self, bar: Bar) -> None:
        prev = self._prev
        if prev is not None:
            # The previous bar joins the channel only now, so the channel never contains the current bar.
            i = self._bars - 1
            highs, lows = self._highs, self._lows
            while highs and highs[-1][1] <= prev.high:
                highs.pop()
            highs.append((i, prev.high))
            while lows and lows[-1][1] >= prev.low:
                lows.pop()
            lows.append((i, prev.low))
            oldest = i - self._c
            if highs[0][0] <= oldest:
                highs.popleft()
            if lows[0][0] <= oldest:
                lows.popleft()
            pc = prev.close
            tr = max(bar.high - bar.low, abs(bar.high - pc), abs(bar.low - pc))
            self._tr_f.push(tr)
            self._tr_s.push(tr)
        self._prev = bar

    def _evaluate(self, tunable: Mapping[str, float]) -> Signal:
        d = self._defaults
        gain = _tunable(tunable, "gain", d["gain"])
        expansion_ref = _tunable(tunable, "expansion_ref", d["expansion_ref"], positive=True)
        if self._at_bar():
            self._breakout = self._breakout_atrs()
        if self._breakout is None:
            return _FLAT
        x, ratio = self._breakout
        return _signal(math.tanh(gain * x), min(1.0, ratio / expansion_ref))

    def _breakout_atrs(self) -> tuple[float, float] | None:
        """(distance beyond the channel in fast ATRs, fast ATR / slow ATR); None inside the channel."""
        assert self._prev is not None  # ready() guarantees bars
        close = self._prev.close
        upper = self._highs[0][1]
        lower = self._lows[0][1]
        atr_f = self._tr_f.total() / self._af
        if atr_f <= 0.0:
            return None
        if close > upper:
            x = (close - upper) / atr_f
        elif close < lower:
            x = (close - lower) / atr_f
        else:
            return None
        atr_s = self._tr_s.total() / self._as
        return x, atr_f / atr_s if atr_s > 0.0 else math.inf


_MODELS: dict[str, type[SignalModel]] = {
    m.name: m
    for m in (
        VwmaOscillatorModel,
        EntropyGatedMomentumModel,
        MultiHorizonMomentumModel,
        BayesianDriftModel,
        DonchianAtrBreakoutModel,
    )
}
assert tuple(_MODELS) == tuple(CATALOG), "one model per catalog strategy, in catalog order"


def make_model(
    name: str, structural: Mapping[str, int] | None = None, *, returns: _LogReturns | None = None
) -> SignalModel:
    cls = _MODELS.get(name)
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(_MODELS)}")
    return cls(structural, returns=returns)


# --------------------------------------------------------------------------------------------------
# Volatility, per product bundle, blending
# --------------------------------------------------------------------------------------------------


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class VolatilityTracker:
    """Sample standard deviation of the last `window` log returns of close (the entropy_threshold measure)."""

    def __init__(
        self, window: int = 24, interval_s: int = 3600, *, returns: _LogReturns | None = None
    ) -> None:
        if window < 2:
            raise ValueError(f"volatility window {window} must be >= 2 (a sample stdev needs two returns)")
        if interval_s < 1:
            raise ValueError(f"interval_s {interval_s} must be >= 1")
        self.window = window
        self.interval_s = interval_s
        self._annualise = math.sqrt(SECONDS_PER_YEAR / interval_s)
        self._log = returns if returns is not None else _LogReturns()
        self._own_log = returns is None  # shared: ProductSignals feeds them
        self._returns = self._log.window(window)
        self._last_time: int | None = None

    def update(self, bar: Bar) -> None:
        if self._last_time is not None and bar.open_time <= self._last_time:
            raise ValueError(f"volatility: bar open_time {bar.open_time} is not after {self._last_time}")
        self._last_time = bar.open_time
        if self._own_log:
            self._log.push(bar.close)

    def per_candle(self) -> float | None:
        if self._returns.count() < self.window:
            return None
        return math.sqrt(self._returns.variance())

    def annualised(self) -> float | None:
        pc = self.per_candle()
        return None if pc is None else pc * self._annualise


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class ProductSignals:
    """Everything one product needs: the five models and a VolatilityTracker, fed by one update()."""

    def __init__(
        self,
        interval_s: int,
        vol_window: int = 24,
        *,
        structural_by_strategy: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        overrides = structural_by_strategy or {}
        unknown = sorted(set(overrides) - set(_MODELS))
        if unknown:
            raise ValueError(f"unknown strategy {unknown[0]!r}; valid: {', '.join(_MODELS)}")
        # One set of log returns for the five models and the volatility (see _LogReturns).
        self._log = _LogReturns()
        self._models: dict[str, SignalModel] = {
            n: make_model(n, overrides.get(n), returns=self._log) for n in _MODELS
        }
        self.volatility = VolatilityTracker(vol_window, interval_s, returns=self._log)
        self.interval_s = interval_s
        self._last_time: int | None = None

    @property
    def models(self) -> Mapping[str, SignalModel]:
        return MappingProxyType(self._models)

    @property
    def last_open_time(self) -> int | None:
        """Open time of the last bar fed; lets a consumer skip a redelivered candle before update()."""
        return self._last_time

    def update(self, bar: Bar) -> None:
        # Checked once up front so an out-of-order bar leaves every model untouched, not half of them.
        if self._last_time is not None and bar.open_time <= self._last_time:
            raise ValueError(
                f"bar open_time {bar.open_time} is not after the previous {self._last_time}; "
                "feed each closed bar once, in order"
            )
        t = self._last_time = bar.open_time
        self._log.push(bar.close)
        for model in self._models.values():
            # SignalModel.update without its own order check (the one above covers every model) and with
            # _advance written out: this loop runs for every product of every step (a fifth of a backtest).
            last = model._last_time
            if last is not None and t <= last:
                model.update(bar)  # fed apart from this ProductSignals: let it raise its own error
            model._last_time = t
            model._bars += 1
            model._push(bar)
        vol = self.volatility
        last = vol._last_time
        if last is not None and t <= last:
            vol.update(bar)  # fed apart: its own error
        vol._last_time = t  # VolatilityTracker.update: its log returns are ours, pushed above

    def evaluate(
        self, strategy: str, tunable_by_strategy: Mapping[str, Mapping[str, float]]
    ) -> dict[str, Signal]:
        """Signals of every ready model. `strategy` is the profile's selected one (validated here; blend()
        uses it); a strategy missing from `tunable_by_strategy` runs with catalog defaults."""
        if strategy not in self._models:
            raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(self._models)}")
        out: dict[str, Signal] = {}
        for name, model in self._models.items():
            if model._bars >= model._warmup:  # SignalModel.evaluate, without its frame
                tunable = tunable_by_strategy.get(name)
                # No tunables of its own: the catalog defaults, read from an empty dict (a mapping proxy's get
                # goes through to its dict's: twice the call, for every default signal of every step).
                out[name] = model._evaluate(_NO_TUNABLES if tunable is None else tunable)
        return out


def blend(
    selected: str, signals: Mapping[str, Signal], weights: Mapping[str, float], w: float
) -> Signal | None:
    """Traded signal = w * selected + (1 - w) * weight-averaged other ready strategies (DESIGN.md section 2).

    The ensemble renormalises `weights` over the other strategies present in `signals` with a positive
    weight; with none, the ensemble term is the selected signal itself. Confidence blends the same way.
    """
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"hash_trajectory_weight {w!r} must be in [0, 1]")
    own = signals.get(selected)
    if own is None:
        return None
    return blend_with(selected, own, signals, weights, w)


def blend_with(
    selected: str, own: Signal, others: Mapping[str, Signal], weights: Mapping[str, float], w: float
) -> Signal:
    """`blend` with the selected strategy's signal given apart: whatever `others` holds under the selected
    name is skipped, so one set of catalog-default signals serves every profile's blend without a copy."""
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"hash_trajectory_weight {w!r} must be in [0, 1]")
    total = value = confidence = 0.0
    for name, sig in others.items():
        if name == selected:
            continue
        weight = weights.get(name, 0.0)
        if weight > 0.0 and weight < math.inf:
            total += weight
            value += weight * sig.value
            confidence += weight * sig.confidence
    if total <= 0.0:
        return own  # the ensemble term is the selected signal itself, so the blend is exactly it
    value /= total
    confidence /= total
    return _signal(w * own.value + (1.0 - w) * value, w * own.confidence + (1.0 - w) * confidence)
