"""The five strategies' names and parameters, shared by the registry (which drifts and fingerprints them)
and the strategy workers (which run them). The formulas are in docs/strategies.md.

Parameters are of two kinds:
- structural (window lengths, integers): fixed per strategy, part of the fingerprint, never drifted, because
  incremental indicators are built around them (and a drift of a fraction of a percent cannot move a
  window of a few dozen candles anyway);
- tunable (floats): each is drifted per profile and epoch as p * (1 +/- c*d) (DESIGN.md section 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.config import STRATEGY_NAMES


@dataclass(frozen=True)
class StrategySpec:
    name: str
    summary: str
    structural: Mapping[str, int]
    tunable: Mapping[str, float]
    warmup: int = field(default=0)

    def defaults(self) -> dict[str, float]:
        out: dict[str, float] = {k: float(v) for k, v in self.structural.items()}
        out.update(self.tunable)
        return out


CATALOG: dict[str, StrategySpec] = {
    s.name: s
    for s in (
        StrategySpec(
            "volume_weighted_hash_oscillator",
            "volume-weighted price oscillator: fast VWMA against slow VWMA, scaled by volatility",
            structural={"fast_window": 12, "slow_window": 48},
            tunable={"gain": 1.5, "confidence_scale": 1.0},
            warmup=49,
        ),
        StrategySpec(
            "zygot_zalgo_entropy_dual_key_gate",
            "dual-key gate: momentum must be strong AND the return-sign entropy low (an ordered market)",
            structural={"momentum_window": 24, "entropy_window": 24},
            tunable={"momentum_z_scale": 2.0, "entropy_gate": 0.85},
            warmup=25,
        ),
        StrategySpec(
            "multi_phase_strategy_weight_tensor",
            "multi-horizon momentum blend: volatility-normalised returns over 6, 24 and 72 candles",
            structural={"short_horizon": 6, "mid_horizon": 24, "long_horizon": 72, "vol_window": 72},
            tunable={"w_short": 0.2, "w_mid": 0.3, "w_long": 0.5, "gain": 1.0},
            warmup=73,
        ),
        StrategySpec(
            "quantum_strategy_calculator",
            "Bayesian drift estimator: normal-normal posterior of the mean log return over a window",
            structural={"window": 48},
            tunable={"prior_scale": 0.25, "gain": 1.0},
            warmup=49,
        ),
        StrategySpec(
            "entropy_enhanced_trading_executor",
            "volatility breakout: close beyond the prior Donchian channel, in units of ATR, when ATR expands",
            structural={"channel_window": 24, "atr_fast": 14, "atr_slow": 48},
            tunable={"gain": 1.0, "expansion_ref": 1.5},
            warmup=49,
        ),
    )
}

assert tuple(CATALOG) == STRATEGY_NAMES, "the catalog must list exactly the configured strategy names"
