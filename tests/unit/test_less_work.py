"""The backtest's per-step shortcuts (issue 16 item 5, "less work per step"): each gives what it replaces.

- `shared.aligner.candle_floats`: the candles' `float(Decimal)` conversions, once per step for the registry and
  the strategies' indicators;
- `Bar` and `Signal` built by their own `__init__` (compiled when the module is): the dataclass's fields,
  checks, equality, hashing, `replace` and pickling, whichever way the module runs;
- the registry's enabled profiles, computed once per config object;
- the backtest's relaxed cyclic-collector thresholds, restored after the run.
"""

from __future__ import annotations

import dataclasses
import gc
import pickle
from decimal import Decimal
from pathlib import Path
from types import FunctionType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import services.strategy.signals as signals
from mpctl.backtest import _gc_relaxed
from services.registry import handlers as registry
from services.strategy.signals import Bar, Signal, _signal
from shared.aligner import candle_floats
from shared.config import AppConfig, load_config
from tests.unit.builders import HOUR, T0, candle

THREE = Path(__file__).resolve().parents[2] / "config" / "examples" / "three_profiles.yaml"
prices = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("1e9"), places=8)
volumes = st.decimals(min_value=Decimal(0), max_value=Decimal("1e12"), places=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(prices, prices, prices, prices, volumes), min_size=1, max_size=12))
def test_candle_floats_are_each_candles_float_conversions_in_order(
    rows: list[tuple[Decimal, Decimal, Decimal, Decimal, Decimal]],
) -> None:
    candles = []
    for k, (a, b, c, d, v) in enumerate(rows):
        lo, o, cl, hi = sorted((a, b, c, d))
        candles.append(candle(f"A{k}/USDC", T0, o, high=hi, low=lo, close=cl, volume=v))
    got = candle_floats(tuple(candles))
    want = [(float(c.open), float(c.high), float(c.low), float(c.close), float(c.volume)) for c in candles]
    assert got == want
    # Bit for bit (== would let -0.0 equal 0.0; no NaN can occur: candles are finite).
    assert [tuple(x.hex() for x in t) for t in got] == [tuple(x.hex() for x in t) for t in want]


def test_candle_floats_keeps_the_last_tuple_and_recomputes_for_another() -> None:
    one = (candle("BTC/USDC", T0, 100, close=101),)
    other = (candle("BTC/USDC", T0 + HOUR, 200, close=201),)
    first = candle_floats(one)
    assert candle_floats(one) is first  # the same tuple: the same floats, not converted again
    again = candle_floats(other)
    assert again is not first and again[0][3] == 201.0
    copy = tuple([*one])  # an equal tuple that is another object: converted again, the same values
    assert copy is not one and candle_floats(copy) == first


def test_native_flag_says_whether_the_signals_module_runs_compiled() -> None:
    compiled = not isinstance(signals._probe, FunctionType)
    assert signals._NATIVE is compiled
    assert compiled == (signals.__file__ or "").endswith((".so", ".pyd"))


@settings(max_examples=300, deadline=None)
@given(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
)
def test_signal_init_checks_and_stores_as_the_dataclass_did(value: float, confidence: float) -> None:
    ok = -1.0 <= value <= 1.0 and 0.0 <= confidence <= 1.0
    if not ok:
        with pytest.raises(ValueError, match="signal (value|confidence)"):
            Signal(value, confidence)
        return
    s = Signal(value, confidence)
    assert (s.value, s.confidence) == (value, confidence)
    assert s == Signal(value=value, confidence=confidence) and hash(s) == hash(Signal(value, confidence))
    assert repr(s) == f"Signal(value={value!r}, confidence={confidence!r})"
    assert [f.name for f in dataclasses.fields(s)] == ["value", "confidence"]
    assert dataclasses.replace(s, value=0.0) == Signal(0.0, confidence)
    assert pickle.loads(pickle.dumps(s)) == s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.value = 0.5  # type: ignore[misc]


@settings(max_examples=200, deadline=None)
@given(st.floats(width=64), st.floats(width=64))
def test_signal_helper_clamps_into_a_valid_signal(value: float, confidence: float) -> None:
    s = _signal(value, confidence)
    assert -1.0 <= s.value <= 1.0 and 0.0 <= s.confidence <= 1.0


def test_bar_init_checks_and_stores_as_the_dataclass_did() -> None:
    b = Bar(7, 1.0, 2.0, 0.5, 1.5, 3.0)
    assert (b.open_time, b.open, b.high, b.low, b.close, b.volume) == (7, 1.0, 2.0, 0.5, 1.5, 3.0)
    assert b == Bar(open_time=7, open=1.0, high=2.0, low=0.5, close=1.5, volume=3.0)
    assert hash(b) == hash(Bar(7, 1.0, 2.0, 0.5, 1.5, 3.0))
    assert repr(b) == "Bar(open_time=7, open=1.0, high=2.0, low=0.5, close=1.5, volume=3.0)"
    assert dataclasses.replace(b, close=1.75).close == 1.75
    assert pickle.loads(pickle.dumps(b)) == b
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.close = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="open 0.0 must be a positive finite price"):
        Bar(7, 0.0, 2.0, 0.5, 1.5, 3.0)
    with pytest.raises(ValueError, match="volume -1.0"):
        Bar(7, 1.0, 2.0, 0.5, 1.5, -1.0)
    with pytest.raises(ValueError, match="high 0.5 is below low 2.0"):
        Bar(7, 1.0, 0.5, 2.0, 1.5, 3.0)


def test_registry_enabled_profiles_are_the_configs_and_follow_another_config() -> None:
    cfg = load_config(THREE)
    got = registry._enabled(cfg)
    assert list(got.items()) == list(cfg.enabled_profiles().items())
    assert len(got) == 3
    assert registry._enabled(cfg) is got  # computed once for this config
    data = cfg.model_dump()
    first = next(iter(got))
    data["profiles"][first]["enabled"] = False
    other = AppConfig.model_validate(data)
    assert list(registry._enabled(other).items()) == list(other.enabled_profiles().items())
    assert first not in registry._enabled(other)
    assert list(registry._enabled(cfg)) == list(got)  # back to the first config: its own again


def test_gc_thresholds_are_relaxed_during_the_run_and_restored() -> None:
    before = gc.get_threshold()
    with _gc_relaxed(12345):
        assert gc.get_threshold() == (max(before[0], 12345), *before[1:])
    assert gc.get_threshold() == before
    with pytest.raises(RuntimeError), _gc_relaxed(12345):
        raise RuntimeError("restored on an error too")
    assert gc.get_threshold() == before


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=8), max_size=8))
def test_canonical_strings_is_the_canonical_json_of_a_list_of_strings(items: list[str]) -> None:
    from services.registry.domain import _canonical, _canonical_strings

    assert _canonical_strings(items) == _canonical(items)


def test_step_init_stores_as_the_dataclass_did() -> None:
    import shared.aligner as aligner
    from shared.aligner import Step

    assert aligner._NATIVE is (not isinstance(aligner._probe, FunctionType))
    cs = (candle("BTC/USDC", T0, 100, close=101),)
    s = Step(T0, HOUR, cs)
    assert (s.time_s, s.interval_s, s.candles, s.published_s) == (T0, HOUR, cs, None)
    assert s == Step(time_s=T0, interval_s=HOUR, candles=cs, published_s=None) != Step(T0, HOUR, cs, 1.5)
    assert hash(s) == hash(Step(T0, HOUR, cs))
    assert repr(s).startswith(f"Step(time_s={T0}, interval_s={HOUR}, candles=(")
    assert dataclasses.replace(s, published_s=2.0).published_s == 2.0
    assert pickle.loads(pickle.dumps(s)) == s
    assert s.close_s == T0 + HOUR
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.time_s = 0  # type: ignore[misc]
