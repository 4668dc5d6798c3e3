"""Signal models against independent vectorised references, on the bundled real candles.

Each reference recomputes a model's formula from docs/strategies.md over the whole series with pandas/numpy
rolling windows; the incremental model must agree at every bar, including where it is not yet ready.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from services.strategy.signals import (
    SECONDS_PER_YEAR,
    Bar,
    ProductSignals,
    Signal,
    SignalModel,
    VolatilityTracker,
    blend,
    make_model,
)
from shared.strategy_catalog import CATALOG

DATA = Path(__file__).resolve().parents[2] / "data/market"
REL, ABS = 1e-9, 1e-12

VWMA = "volume_weighted_hash_oscillator"
GATE = "zygot_zalgo_entropy_dual_key_gate"
MULTI = "multi_phase_strategy_weight_tensor"
BAYES = "quantum_strategy_calculator"
BREAKOUT = "entropy_enhanced_trading_executor"


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


@cache
def candles(symbol: str) -> pd.DataFrame:
    df = pd.read_csv(DATA / f"binance_{symbol}-USDT_1h.csv.gz")
    assert list(df.columns) == ["timestamp_ms", "open", "high", "low", "close", "volume"]
    assert len(df) > 1000
    return df


def to_bars(df: pd.DataFrame) -> list[Bar]:
    return [
        Bar(int(ts) // 1000, float(o), float(h), float(lo), float(c), float(v))
        for ts, o, h, lo, c, v in df[["timestamp_ms", "open", "high", "low", "close", "volume"]].itertuples(
            index=False
        )
    ]


def run_model(
    name: str, bars: list[Bar], structural: Mapping[str, int] | None, tunable: Mapping[str, float]
) -> tuple[SignalModel, list[Signal | None]]:
    model = make_model(name, structural)
    out: list[Signal | None] = []
    for bar in bars:
        model.update(bar)
        out.append(model.evaluate(tunable))
    return model, out


def params(name: str, structural: Mapping[str, int] | None, tunable: Mapping[str, float]) -> dict[str, float]:
    spec = CATALOG[name]
    p: dict[str, float] = {**spec.structural, **(structural or {})}
    p.update({**spec.tunable, **tunable})
    return p


# ---------------------------------------------------------------------------------------------------
# Independent references: whole-series pandas/numpy, NaN where the model is not ready
# ---------------------------------------------------------------------------------------------------

Ref = tuple[np.ndarray, np.ndarray]


def log_returns(df: pd.DataFrame) -> pd.Series:
    return np.log(df["close"]).diff()


def window_sum(x: pd.Series, n: int) -> np.ndarray:
    # numpy pairwise sum of each full window: exact zeros for all-zero windows, unlike a running sum.
    out = np.full(len(x), np.nan)
    out[n - 1 :] = sliding_window_view(x.to_numpy(dtype=float), n).sum(axis=1)
    return out


def ref_vwma(df: pd.DataFrame, p: Mapping[str, float]) -> Ref:
    f, s = int(p["fast_window"]), int(p["slow_window"])
    c, v = df["close"], df["volume"]

    def vwma(n: int) -> np.ndarray:
        vol = window_sum(v, n)
        sma = window_sum(c, n) / n
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(vol > 0, window_sum(c * v, n) / vol, sma)

    sigma = log_returns(df).rolling(s).std(ddof=1).to_numpy()
    vf, vs = vwma(f), vwma(s)
    valid = ~np.isnan(sigma) & ~np.isnan(vf) & ~np.isnan(vs)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(sigma > 0, ((vf - vs) / vs) / (sigma * np.sqrt(f)), 0.0)
    value = np.tanh(p["gain"] * z)
    conf = 1.0 - np.exp(-np.abs(z) / p["confidence_scale"])
    return np.where(valid, value, np.nan), np.where(valid, conf, np.nan)


def ref_gate(df: pd.DataFrame, p: Mapping[str, float]) -> Ref:
    m_w, e_w = int(p["momentum_window"]), int(p["entropy_window"])
    c = df["close"]
    r = log_returns(df)
    sigma = r.rolling(m_w).std(ddof=1).to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(sigma > 0, np.log(c / c.shift(m_w)).to_numpy() / (sigma * np.sqrt(m_w)), 0.0)
    up = (r > 0).astype(float).where(r.notna()).rolling(e_w).sum().to_numpy()
    down = (r < 0).astype(float).where(r.notna()).rolling(e_w).sum().to_numpy()
    moves = up + down
    with np.errstate(invalid="ignore", divide="ignore"):
        q_up = up / moves
        q_dn = down / moves
        bits = -(
            np.where(q_up > 0, q_up * np.log2(q_up), 0.0) + np.where(q_dn > 0, q_dn * np.log2(q_dn), 0.0)
        )
    h = np.where(moves > 0, bits, 1.0)
    is_open = h <= p["entropy_gate"]
    value = np.where(is_open, np.sign(m) * np.minimum(1.0, np.abs(m) / p["momentum_z_scale"]), 0.0)
    conf = np.where(is_open, 1.0 - h, 0.0)
    valid = ~np.isnan(sigma) & ~np.isnan(up)
    return np.where(valid, value, np.nan), np.where(valid, conf, np.nan)


def ref_multi(df: pd.DataFrame, p: Mapping[str, float]) -> Ref:
    c = df["close"]
    sigma = log_returns(df).rolling(int(p["vol_window"])).std(ddof=1).to_numpy()
    horizons = [int(p["short_horizon"]), int(p["mid_horizon"]), int(p["long_horizon"])]
    w = np.array([p["w_short"], p["w_mid"], p["w_long"]])
    w = w / w.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.stack([np.log(c / c.shift(h)).to_numpy() / (sigma * np.sqrt(h)) for h in horizons])
    score = (w[:, None] * z).sum(axis=0)
    agree = np.abs((w[:, None] * np.sign(z)).sum(axis=0))
    value = np.where(sigma > 0, np.tanh(p["gain"] * score), 0.0)
    conf = np.where(sigma > 0, agree, 0.0)
    valid = ~np.isnan(sigma) & ~np.isnan(z).any(axis=0)
    return np.where(valid, value, np.nan), np.where(valid, conf, np.nan)


_erfc = np.frompyfunc(math.erfc, 1, 1)


def ref_bayes(df: pd.DataFrame, p: Mapping[str, float]) -> Ref:
    n = int(p["window"])
    r = log_returns(df)
    s2 = r.rolling(n).var(ddof=1).to_numpy()
    total = r.rolling(n).sum().to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        tau2 = (p["prior_scale"] * np.sqrt(s2)) ** 2
        precision = 1.0 / tau2 + n / s2
        mean = (total / s2) / precision
        sd = np.sqrt(1.0 / precision)
        z = np.where(s2 > 0, mean / sd, 0.0)
    phi = 0.5 * np.asarray(_erfc(-z / math.sqrt(2.0)), dtype=float)
    value = np.tanh(p["gain"] * z)
    conf = np.abs(2.0 * phi - 1.0)
    valid = ~np.isnan(s2)
    return np.where(valid, value, np.nan), np.where(valid, conf, np.nan)


def ref_breakout(df: pd.DataFrame, p: Mapping[str, float]) -> Ref:
    ch, af, aslow = int(p["channel_window"]), int(p["atr_fast"]), int(p["atr_slow"])
    h, lo, c = df["high"], df["low"], df["close"]
    upper = h.shift(1).rolling(ch).max().to_numpy()
    lower = lo.shift(1).rolling(ch).min().to_numpy()
    pc = c.shift(1)
    tr = pd.concat([h - lo, (h - pc).abs(), (lo - pc).abs()], axis=1).max(axis=1, skipna=False)
    atr_f = tr.rolling(af).mean().to_numpy()
    atr_s = tr.rolling(aslow).mean().to_numpy()
    cv = c.to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.where(cv > upper, (cv - upper) / atr_f, np.where(cv < lower, (cv - lower) / atr_f, 0.0))
        conf = np.where(x != 0, np.minimum(1.0, (atr_f / atr_s) / p["expansion_ref"]), 0.0)
    value = np.tanh(p["gain"] * x)
    valid = ~np.isnan(upper) & ~np.isnan(atr_f) & ~np.isnan(atr_s)
    return np.where(valid, value, np.nan), np.where(valid, conf, np.nan)


def assert_matches_reference(
    name: str,
    symbol: str,
    reference: Callable[[pd.DataFrame, Mapping[str, float]], Ref],
    structural: Mapping[str, int] | None,
    tunable: Mapping[str, float],
    df: pd.DataFrame | None = None,
) -> list[Signal | None]:
    df = candles(symbol) if df is None else df
    model, got = run_model(name, to_bars(df), structural, tunable)
    ref_value, ref_conf = reference(df, params(name, structural, tunable))
    ready = ~np.isnan(ref_value)
    first = int(np.argmax(ready))
    assert ready[first:].all(), "the reference must be defined at every bar after warm-up"
    assert first == model.warmup - 1, f"warm-up: reference starts at bar {first + 1}, model at {model.warmup}"
    for t, sig in enumerate(got):
        if not ready[t]:
            assert sig is None, f"bar {t}: signal before warm-up"
            continue
        assert sig is not None, f"bar {t}: no signal after warm-up"
        assert math.isclose(sig.value, ref_value[t], rel_tol=REL, abs_tol=ABS), (t, sig, ref_value[t])
        assert math.isclose(sig.confidence, ref_conf[t], rel_tol=REL, abs_tol=ABS), (t, sig, ref_conf[t])
    return got


SYMBOLS = ["BTC", "SOL"]


def nonzero_share(got: list[Signal | None]) -> float:
    sigs = [s for s in got if s is not None]
    return sum(s.value != 0.0 for s in sigs) / len(sigs)


# ---------------------------------------------------------------------------------------------------
# Each model against its reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symbol", SYMBOLS)
@pytest.mark.parametrize(
    ("structural", "tunable"),
    [(None, {}), ({"fast_window": 5, "slow_window": 20}, {"gain": 0.7, "confidence_scale": 2.5})],
)
def test_vwma_oscillator_matches_pandas_reference_on_real_candles(
    symbol: str, structural: Mapping[str, int] | None, tunable: Mapping[str, float]
) -> None:
    got = assert_matches_reference(VWMA, symbol, ref_vwma, structural, tunable)
    assert nonzero_share(got) > 0.9


def test_vwma_oscillator_falls_back_to_equal_weights_over_zero_volume_stretches() -> None:
    df = candles("BTC").iloc[:400].copy()
    df.loc[100:179, "volume"] = 0.0  # longer than both windows: all-zero and mixed windows both occur
    df.loc[250:255, "volume"] = 0.0
    assert_matches_reference(VWMA, "BTC", ref_vwma, None, {}, df=df)


@pytest.mark.parametrize("symbol", SYMBOLS)
@pytest.mark.parametrize(
    ("structural", "tunable"),
    [
        (None, {}),
        ({"momentum_window": 12, "entropy_window": 30}, {"momentum_z_scale": 1.3, "entropy_gate": 0.95}),
    ],
)
def test_entropy_gated_momentum_matches_pandas_reference_on_real_candles(
    symbol: str, structural: Mapping[str, int] | None, tunable: Mapping[str, float]
) -> None:
    got = assert_matches_reference(GATE, symbol, ref_gate, structural, tunable)
    share = nonzero_share(got)
    assert 0.0 < share < 1.0, "the gate should be open on some bars and closed on others"


@pytest.mark.parametrize("symbol", SYMBOLS)
@pytest.mark.parametrize(
    ("structural", "tunable"),
    [
        (None, {}),
        (
            {"short_horizon": 3, "mid_horizon": 10, "long_horizon": 40, "vol_window": 30},
            {"w_short": 1.0, "w_mid": 2.0, "w_long": 0.5, "gain": 0.4},
        ),
    ],
)
def test_multi_horizon_momentum_matches_pandas_reference_on_real_candles(
    symbol: str, structural: Mapping[str, int] | None, tunable: Mapping[str, float]
) -> None:
    assert_matches_reference(MULTI, symbol, ref_multi, structural, tunable)


@pytest.mark.parametrize("symbol", SYMBOLS)
@pytest.mark.parametrize(
    ("structural", "tunable"), [(None, {}), ({"window": 20}, {"prior_scale": 1.7, "gain": 2.0})]
)
def test_bayesian_drift_matches_explicit_posterior_reference_on_real_candles(
    symbol: str, structural: Mapping[str, int] | None, tunable: Mapping[str, float]
) -> None:
    assert_matches_reference(BAYES, symbol, ref_bayes, structural, tunable)


@pytest.mark.parametrize("symbol", SYMBOLS)
@pytest.mark.parametrize(
    ("structural", "tunable"),
    [
        (None, {}),
        ({"channel_window": 10, "atr_fast": 5, "atr_slow": 30}, {"gain": 3.0, "expansion_ref": 0.8}),
    ],
)
def test_donchian_breakout_matches_pandas_reference_on_real_candles(
    symbol: str, structural: Mapping[str, int] | None, tunable: Mapping[str, float]
) -> None:
    got = assert_matches_reference(BREAKOUT, symbol, ref_breakout, structural, tunable)
    share = nonzero_share(got)
    assert 0.0 < share < 0.5, "breakouts are occasional"


def test_entropy_gate_opens_when_entropy_equals_the_threshold_and_closes_just_above() -> None:
    closes = [1.0, 1.01, 1.02, 1.01, 1.03]  # returns: up, up, down, up
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    model = make_model(GATE, {"momentum_window": 4, "entropy_window": 4})
    for i, c in enumerate(closes):
        model.update(Bar(3600 * i, c, c, c, c, 1.0))
    opened = model.evaluate({"entropy_gate": h})
    assert opened is not None and opened.value > 0.0
    assert math.isclose(opened.confidence, 1.0 - h, rel_tol=1e-15)
    assert model.evaluate({"entropy_gate": math.nextafter(h, 0.0)}) == Signal(0.0, 0.0)


def test_default_warmup_of_every_model_equals_the_catalog_warmup() -> None:
    for name, spec in CATALOG.items():
        assert make_model(name).warmup == spec.warmup, name


def test_missing_tunable_keys_take_catalog_defaults_and_structural_keys_are_ignored() -> None:
    bars = to_bars(candles("SOL").iloc[:120])
    for name, spec in CATALOG.items():
        model = make_model(name)
        for bar in bars:
            model.update(bar)
        assert model.evaluate({}) == model.evaluate(spec.defaults())


# ---------------------------------------------------------------------------------------------------
# Properties on synthetic paths: bounded, never NaN, flat when nothing moves
# ---------------------------------------------------------------------------------------------------


@st.composite
def bar_paths(draw: st.DrawFn) -> list[Bar]:
    n = draw(st.integers(1, 90))
    kind = draw(st.sampled_from(["random", "constant", "rare_moves", "tiny_moves"]))
    price = draw(st.floats(1e-4, 1e6))
    if kind == "constant":
        rets = [0.0] * n
    elif kind == "rare_moves":
        rets = draw(st.lists(st.sampled_from([0.0, 0.0, 0.0, 0.01, -0.02]), min_size=n, max_size=n))
    elif kind == "tiny_moves":
        rets = draw(st.lists(st.floats(-1e-12, 1e-12), min_size=n, max_size=n))
    else:
        rets = draw(st.lists(st.floats(-0.3, 0.3), min_size=n, max_size=n))
    vol_kind = draw(st.sampled_from(["random", "zero", "some_zero"]))
    if vol_kind == "zero":
        vols = [0.0] * n
    else:
        pick = st.floats(0.0, 1e9) if vol_kind == "random" else st.sampled_from([0.0, 0.0, 5.0, 1e6])
        vols = draw(st.lists(pick, min_size=n, max_size=n))
    wick = draw(st.floats(0.0, 0.05))
    bars = []
    for i, (r, v) in enumerate(zip(rets, vols, strict=True)):
        close = price * math.exp(r)
        hi, lo = max(price, close) * (1.0 + wick), min(price, close) / (1.0 + wick)
        bars.append(Bar(1_600_000_000 + 3600 * i, price, hi, lo, close, v))
        price = close
    return bars


SMALL_STRUCTURAL = {
    VWMA: {"fast_window": st.integers(1, 8), "slow_window": st.integers(2, 12)},
    GATE: {"momentum_window": st.integers(2, 10), "entropy_window": st.integers(1, 10)},
    MULTI: {
        "short_horizon": st.integers(1, 4),
        "mid_horizon": st.integers(1, 8),
        "long_horizon": st.integers(1, 12),
        "vol_window": st.integers(2, 12),
    },
    BAYES: {"window": st.integers(2, 12)},
    BREAKOUT: {
        "channel_window": st.integers(1, 10),
        "atr_fast": st.integers(1, 6),
        "atr_slow": st.integers(1, 12),
    },
}


@st.composite
def model_setups(draw: st.DrawFn) -> tuple[str, dict[str, int] | None, dict[str, float]]:
    name = draw(st.sampled_from(list(CATALOG)))
    structural = draw(st.one_of(st.none(), st.fixed_dictionaries(SMALL_STRUCTURAL[name])))
    tunable: dict[str, float] = {}
    for key, default in CATALOG[name].tunable.items():
        drift = draw(st.floats(0.01, 20.0))  # drift keeps the sign of every default, as the registry's does
        tunable[key] = default * drift
    return name, structural, tunable


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=model_setups(), bars=bar_paths())
def test_every_signal_is_bounded_and_finite_on_any_positive_price_path(
    setup: tuple[str, dict[str, int] | None, dict[str, float]], bars: list[Bar]
) -> None:
    name, structural, tunable = setup
    model = make_model(name, structural)
    for i, bar in enumerate(bars, 1):
        model.update(bar)
        sig = model.evaluate(tunable)
        assert (sig is None) == (i < model.warmup)
        assert model.ready() == (sig is not None)
        if sig is not None:
            assert math.isfinite(sig.value) and -1.0 <= sig.value <= 1.0
            assert math.isfinite(sig.confidence) and 0.0 <= sig.confidence <= 1.0


@settings(max_examples=50, deadline=None)
@given(price=st.floats(1e-6, 1e7), volume=st.sampled_from([0.0, 1.0, 1e8]), n=st.integers(73, 120))
def test_constant_prices_give_flat_signals_and_zero_volatility(price: float, volume: float, n: int) -> None:
    ps = ProductSignals(3600)
    for i in range(n):
        ps.update(Bar(1_600_000_000 + 3600 * i, price, price, price, price, volume))
    sigs = ps.evaluate(VWMA, {})
    assert set(sigs) == set(CATALOG)
    assert all(s == Signal(0.0, 0.0) for s in sigs.values())
    assert ps.volatility.per_candle() == 0.0


def test_volatility_is_exactly_zero_once_a_spike_has_left_the_window() -> None:
    # A running add/subtract variance keeps a rounding residue of a huge value; the model must not.
    tracker = VolatilityTracker(window=5)
    prices = [1.0, 1e6, 1.0] + [1.0] * 6
    for i, p in enumerate(prices):
        tracker.update(Bar(i * 3600, p, p, p, p, 1.0))
    assert tracker.per_candle() == 0.0


# ---------------------------------------------------------------------------------------------------
# Volatility tracker
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("symbol", "window", "interval_s"), [("BTC", 24, 3600), ("SOL", 10, 300)])
def test_volatility_tracker_matches_pandas_rolling_std_and_annualises(
    symbol: str, window: int, interval_s: int
) -> None:
    df = candles(symbol)
    ref = log_returns(df).rolling(window).std(ddof=1).to_numpy()
    tracker = VolatilityTracker(window, interval_s)
    factor = math.sqrt(365 * 86400 / interval_s)
    assert SECONDS_PER_YEAR == 365 * 86400
    for t, bar in enumerate(to_bars(df)):
        tracker.update(bar)
        got, annual = tracker.per_candle(), tracker.annualised()
        if t < window:
            assert got is None and annual is None
            continue
        assert got is not None and annual is not None
        assert math.isclose(got, ref[t], rel_tol=REL, abs_tol=ABS)
        assert math.isclose(annual, ref[t] * factor, rel_tol=REL, abs_tol=ABS)


def test_volatility_tracker_refuses_windows_too_short_for_a_sample_stdev() -> None:
    with pytest.raises(ValueError, match="window"):
        VolatilityTracker(window=1)
    with pytest.raises(ValueError, match="interval_s"):
        VolatilityTracker(interval_s=0)


# ---------------------------------------------------------------------------------------------------
# ProductSignals
# ---------------------------------------------------------------------------------------------------


def test_product_signals_evaluates_exactly_the_ready_models_with_their_own_tunables() -> None:
    bars = to_bars(candles("BTC").iloc[:200])
    ps = ProductSignals(3600, vol_window=24)
    singles = {name: make_model(name) for name in CATALOG}
    tunables = {VWMA: {"gain": 0.3}, BAYES: {"prior_scale": 2.0}}
    for i, bar in enumerate(bars, 1):
        ps.update(bar)
        for m in singles.values():
            m.update(bar)
        got = ps.evaluate(BAYES, tunables)
        expected = {n: m.evaluate(tunables.get(n, {})) for n, m in singles.items()}
        assert got == {n: s for n, s in expected.items() if s is not None}
        assert set(got) == {n for n, spec in CATALOG.items() if i >= spec.warmup}
    assert ps.last_open_time == bars[-1].open_time
    assert ps.volatility.per_candle() is not None


def test_product_signals_refuses_unknown_strategy_and_out_of_order_bar_without_changing_state() -> None:
    bars = to_bars(candles("BTC").iloc[:80])
    ps = ProductSignals(3600)
    for bar in bars:
        ps.update(bar)
    before = ps.evaluate(MULTI, {})
    with pytest.raises(ValueError, match="not after"):
        ps.update(bars[-1])
    with pytest.raises(ValueError, match="not after"):
        ps.update(bars[10])
    assert ps.evaluate(MULTI, {}) == before
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        ps.evaluate("nope", {})
    with pytest.raises(ValueError, match="unknown strategy"):
        ProductSignals(3600, structural_by_strategy={"nope": {}})


def test_product_signals_accepts_structural_overrides() -> None:
    ps = ProductSignals(3600, structural_by_strategy={BAYES: {"window": 10}})
    assert ps.models[BAYES].warmup == 11
    assert ps.models[VWMA].warmup == CATALOG[VWMA].warmup


# ---------------------------------------------------------------------------------------------------
# Construction and input errors
# ---------------------------------------------------------------------------------------------------


def test_make_model_rejects_unknown_name_listing_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'momentum'") as exc:
        make_model("momentum")
    for name in CATALOG:
        assert name in str(exc.value)


def test_unknown_structural_key_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="'fast_windw'.*valid: fast_window, slow_window"):
        make_model(VWMA, {"fast_windw": 3})


@pytest.mark.parametrize("bad", [2.5, "12", True, None])
def test_non_integer_structural_value_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="must be an integer"):
        make_model(BAYES, {"window": bad})  # type: ignore[dict-item]


def test_structural_below_minimum_is_rejected_and_integral_floats_are_accepted() -> None:
    with pytest.raises(ValueError, match="'window' = 1 must be >= 2"):
        make_model(BAYES, {"window": 1})
    model = make_model(BAYES, {"window": 30.0})  # type: ignore[dict-item]
    assert model.structural["window"] == 30 and model.warmup == 31
    assert make_model(BAYES, {"window": np.int64(7)}).warmup == 8  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("name", "tunable"),
    [
        (VWMA, {"confidence_scale": 0.0}),
        (GATE, {"momentum_z_scale": -1.0}),
        (BAYES, {"prior_scale": float("nan")}),
        (BREAKOUT, {"gain": float("inf")}),
        (MULTI, {"w_short": 0.0, "w_mid": 0.0, "w_long": 0.0}),
        (MULTI, {"w_short": -0.1}),
    ],
)
def test_invalid_tunable_values_raise_a_clear_error(name: str, tunable: Mapping[str, float]) -> None:
    model = make_model(name)
    for bar in to_bars(candles("BTC").iloc[:100]):
        model.update(bar)
    with pytest.raises(ValueError, match="must be"):
        model.evaluate(tunable)


@pytest.mark.parametrize(
    "fields",
    [
        (0.0, 1.0, 1.0, 1.0, 1.0),
        (1.0, 1.0, 1.0, -1.0, 1.0),
        (1.0, 1.0, 1.0, float("nan"), 1.0),
        (1.0, 1.0, 1.0, 1.0, -1.0),
        (1.0, 1.0, 1.0, 1.0, float("inf")),
        (1.0, 0.9, 1.0, 1.0, 1.0),
    ],
)
def test_bar_refuses_values_indicators_cannot_use(fields: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="bar at 0"):
        Bar(0, *fields)


def test_model_refuses_a_repeated_bar() -> None:
    model = make_model(GATE)
    bar = Bar(0, 1.0, 1.0, 1.0, 1.0, 1.0)
    model.update(bar)
    with pytest.raises(ValueError, match="feed each closed bar once"):
        model.update(bar)


@pytest.mark.parametrize(("value", "confidence"), [(1.5, 0.5), (0.0, -0.1), (float("nan"), 0.5)])
def test_signal_refuses_out_of_range_values(value: float, confidence: float) -> None:
    with pytest.raises(ValueError):
        Signal(value, confidence)


# ---------------------------------------------------------------------------------------------------
# blend
# ---------------------------------------------------------------------------------------------------

SIGS = {
    VWMA: Signal(0.8, 0.9),
    GATE: Signal(-0.4, 0.5),
    MULTI: Signal(0.2, 0.1),
    BAYES: Signal(0.0, 0.3),
}
WEIGHTS = {VWMA: 0.1, GATE: 0.3, MULTI: 0.1, BAYES: 0.2, BREAKOUT: 0.3}


def test_blend_with_w_one_is_the_selected_signal() -> None:
    assert blend(VWMA, SIGS, WEIGHTS, 1.0) == SIGS[VWMA]


def test_blend_with_w_zero_is_the_weight_renormalised_ensemble_of_ready_others() -> None:
    # BREAKOUT is not ready (absent), so its weight drops out; VWMA is selected, so its weight does too.
    got = blend(VWMA, SIGS, WEIGHTS, 0.0)
    total = 0.3 + 0.1 + 0.2
    assert got is not None
    assert math.isclose(got.value, (0.3 * -0.4 + 0.1 * 0.2 + 0.2 * 0.0) / total, rel_tol=1e-12)
    assert math.isclose(got.confidence, (0.3 * 0.5 + 0.1 * 0.1 + 0.2 * 0.3) / total, rel_tol=1e-12)


def test_blend_mixes_selected_and_ensemble_by_w() -> None:
    ens = blend(GATE, SIGS, WEIGHTS, 0.0)
    got = blend(GATE, SIGS, WEIGHTS, 0.7)
    assert ens is not None and got is not None
    assert math.isclose(got.value, 0.7 * -0.4 + 0.3 * ens.value, rel_tol=1e-12)
    assert math.isclose(got.confidence, 0.7 * 0.5 + 0.3 * ens.confidence, rel_tol=1e-12)


def test_blend_scaling_all_weights_does_not_change_the_result() -> None:
    scaled = {k: 7.0 * v for k, v in WEIGHTS.items()}
    a, b = blend(MULTI, SIGS, WEIGHTS, 0.4), blend(MULTI, SIGS, scaled, 0.4)
    assert a is not None and b is not None
    assert math.isclose(a.value, b.value, rel_tol=1e-12)
    assert math.isclose(a.confidence, b.confidence, rel_tol=1e-12)


def test_blend_without_weighted_ready_others_falls_back_to_the_selected_signal() -> None:
    weights = {VWMA: 1.0, GATE: 0.0, MULTI: -2.0, BREAKOUT: 5.0}  # BAYES missing, BREAKOUT not ready
    assert blend(VWMA, SIGS, weights, 0.3) == SIGS[VWMA]
    assert blend(VWMA, {VWMA: SIGS[VWMA]}, WEIGHTS, 0.0) == SIGS[VWMA]


def test_blend_is_none_when_the_selected_model_is_not_ready() -> None:
    assert blend(BREAKOUT, SIGS, WEIGHTS, 0.5) is None


@pytest.mark.parametrize("w", [-0.1, 1.01, float("nan")])
def test_blend_refuses_w_outside_unit_interval(w: float) -> None:
    with pytest.raises(ValueError, match="hash_trajectory_weight"):
        blend(VWMA, SIGS, WEIGHTS, w)


signals_st = st.builds(Signal, st.floats(-1.0, 1.0), st.floats(0.0, 1.0))


@given(
    sigs=st.dictionaries(st.sampled_from(list(CATALOG)), signals_st, min_size=1),
    weights=st.dictionaries(st.sampled_from(list(CATALOG)), st.floats(-1.0, 1e6)),
    w=st.floats(0.0, 1.0),
)
def test_blend_stays_within_the_range_of_its_inputs(
    sigs: dict[str, Signal], weights: dict[str, float], w: float
) -> None:
    selected = next(iter(sigs))
    got = blend(selected, sigs, weights, w)
    assert got is not None
    values = [s.value for s in sigs.values()]
    confs = [s.confidence for s in sigs.values()]
    assert min(values) - 1e-12 <= got.value <= max(values) + 1e-12
    assert min(confs) - 1e-12 <= got.confidence <= max(confs) + 1e-12
