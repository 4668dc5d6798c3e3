"""Configuration: the template, every refusal (naming profile and key), secrets, warnings, `mpctl config validate`.

Pure unit tests: no network, no Kafka, no Redis.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from shared.config import (
    DEFAULT_CONFIG,
    LOCAL_CONFIG,
    STRATEGY_NAMES,
    AppConfig,
    ConfigError,
    config_warnings,
    live_source_problem,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "config" / "coinbase_profiles.yaml"
EXAMPLES = ROOT / "config" / "examples"
BUNDLED_ASSETS = {"BTC", "ETH", "SOL", "XRP", "ADA", "DOT", "LINK", "MATIC", "AVAX", "ATOM", "LTC"}

# The seed's `profile_a`, copied key by key from seed/000_8a9a891174e52607.txt ("Profile Configuration").
SEED_PROFILE_A: dict[str, Any] = {
    "name": "Primary Trading Profile",
    "enabled": True,
    "priority": 1,
    "api_credentials": {
        "api_key": "YOUR_COINBASE_API_KEY_PROFILE_A",
        "secret": "YOUR_COINBASE_SECRET_PROFILE_A",
        "passphrase": "YOUR_COINBASE_PASSPHRASE_PROFILE_A",
        "sandbox": True,
    },
    "strategy_config": {
        "base_assets": ["BTC", "ETH", "SOL", "USDC", "XRP"],
        "random_asset_pool": ["ADA", "DOT", "LINK", "MATIC", "AVAX", "UNI", "ATOM", "LTC"],
        "strategy_weights": {
            "volume_weighted_hash_oscillator": 0.30,
            "zygot_zalgo_entropy_dual_key_gate": 0.25,
            "multi_phase_strategy_weight_tensor": 0.20,
            "quantum_strategy_calculator": 0.15,
            "entropy_enhanced_trading_executor": 0.10,
        },
        "confidence_threshold": 0.75,
        "signal_strength_threshold": 0.65,
        "max_position_size_pct": 8.0,
        "risk_adjustment_factor": 1.2,
        "entropy_threshold": 0.003,
        "hash_trajectory_weight": 0.85,
        "drift_delta_range": [0.001, 0.005],
    },
    "trading_params": {
        "trading_pairs": ["BTC/USDC", "ETH/USDC", "SOL/USDC", "XRP/USDC"],
        "max_open_positions": 4,
        "order_timeout": 45,
        "retry_attempts": 3,
        "slippage_tolerance": 0.0015,
    },
    "risk_management": {
        "stop_loss_pct": 2.5,
        "take_profit_pct": 6.0,
        "max_daily_loss_pct": 4.0,
        "max_drawdown_pct": 12.0,
        "volatility_threshold": 0.75,
    },
    "profile_hash": {
        "base_hash": "profile_a_primary_trading",
        "entropy_seed": 0.42,
        "hash_rotation_interval": 3600,
        "hash_complexity_factor": 1.1,
    },
}

# Distinctive fake credentials: none of these strings may ever appear in an error message or a repr.
FAKE_KEY = "fakekey-7Qz9Xw3LmN8pVb2R"
FAKE_SECRET = "fakesecret-Hq4Jt6Yu1Io0Pa5S"
FAKE_PASS = "fakepass-Dk8Fg2Hj7Kl3Zx9C"
FAKES = (FAKE_KEY, FAKE_SECRET, FAKE_PASS)


# --------------------------------------------------------------------------------------------- helpers
def template_data() -> dict[str, Any]:
    data = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def one_profile(pid: str = "profile_a") -> dict[str, Any]:
    """A valid file with a single profile (the seed's profile_a under the id `pid`)."""
    return {"profiles": {pid: copy.deepcopy(SEED_PROFILE_A)}}


def refused(data: Any, *fragments: str) -> str:
    """Parse `data`, require a ConfigError whose message holds every fragment; return the message."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="test.yaml")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message:\n{message}"
    return message


def plain(value: Any) -> Any:
    """Model dump -> plain YAML-like data: secrets revealed, tuples as lists."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_validate(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpctl.cli", "config", "validate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --------------------------------------------------------------------------------------------- the template
def test_template_file_holds_the_seed_profile_a_exactly() -> None:
    assert template_data()["profiles"]["profile_a"] == SEED_PROFILE_A


def test_template_loads_and_keeps_every_seed_value_of_profile_a() -> None:
    cfg = load_config(TEMPLATE)
    loaded = plain(cfg.profiles["profile_a"].model_dump(exclude_unset=True))
    assert loaded == SEED_PROFILE_A
    # YAML ints stay ints where the seed wrote ints, floats stay floats.
    assert cfg.profiles["profile_a"].profile_hash.hash_rotation_interval == 3600
    assert cfg.profiles["profile_a"].trading_params.order_timeout == 45


def test_template_has_profile_b_with_its_own_hash_settings_and_no_warnings() -> None:
    cfg = load_config(TEMPLATE)
    assert list(cfg.enabled_profiles()) == ["profile_a", "profile_b"]
    a, b = cfg.profiles["profile_a"].profile_hash, cfg.profiles["profile_b"].profile_hash
    assert a.settings_key() != b.settings_key()
    assert config_warnings(cfg) == []
    assert cfg.system.mode == "paper"


def test_template_seed_example_of_custom_sections_validates() -> None:
    # The seed's "Advanced Configuration" snippets, applied to profile_a, are valid too.
    data = one_profile()
    sc = data["profiles"]["profile_a"]
    sc["strategy_config"]["strategy_weights"] = {
        "volume_weighted_hash_oscillator": 0.40,
        "zygot_zalgo_entropy_dual_key_gate": 0.30,
        "multi_phase_strategy_weight_tensor": 0.20,
        "quantum_strategy_calculator": 0.05,
        "entropy_enhanced_trading_executor": 0.05,
    }
    sc["profile_hash"] = {
        "base_hash": "custom_profile_hash",
        "entropy_seed": 0.75,
        "hash_rotation_interval": 1800,
        "hash_complexity_factor": 1.5,
    }
    sc["risk_management"] = {
        "stop_loss_pct": 1.5,
        "take_profit_pct": 8.0,
        "max_daily_loss_pct": 3.0,
        "max_drawdown_pct": 10.0,
        "volatility_threshold": 0.85,
    }
    cfg = parse_config(data)
    assert cfg.profiles["profile_a"].profile_hash.hash_rotation_interval == 1800


# --------------------------------------------------------------------------------------------- defaults
def test_file_with_only_profiles_gets_every_system_default() -> None:
    cfg = parse_config(one_profile())
    assert cfg.system.mode == "paper"
    assert cfg.system.quote_asset == "USDC"
    assert cfg.system.arbiter.conflict_window_s == 300.0
    assert cfg.system.kafka.namespace == "mp"
    assert cfg.system.kafka.candle_partitions == 1
    assert cfg.system.kafka.intent_partitions == 3
    assert cfg.system.execution.taker_fee_rate == 0.006
    assert cfg.system.execution.desync_min_ms <= cfg.system.execution.desync_max_ms
    assert cfg.system.registry.max_nonce == 64
    assert cfg.profiles["profile_a"].paper.initial_quote_balance == 10_000.0


def test_partial_system_section_keeps_other_defaults() -> None:
    data = one_profile()
    data["system"] = {"arbiter": {"conflict_window_s": 60}}
    cfg = parse_config(data)
    assert cfg.system.arbiter.conflict_window_s == 60.0
    assert cfg.system.execution.taker_fee_rate == 0.006


def test_profile_optional_keys_have_defaults() -> None:
    data = one_profile()
    p = data["profiles"]["profile_a"]
    del p["enabled"], p["priority"]
    del p["api_credentials"]["passphrase"], p["api_credentials"]["sandbox"]
    del p["strategy_config"]["random_asset_pool"]
    p["trading_params"]["trading_pairs"] = ["BTC/USDC"]
    prof = parse_config(data).profiles["profile_a"]
    assert prof.enabled is True
    assert prof.priority == 100
    assert prof.api_credentials.passphrase is None
    assert prof.api_credentials.sandbox is True
    assert prof.strategy_config.random_asset_pool == []


def test_all_products_include_base_assets_missing_from_trading_pairs() -> None:
    # The plan trades every base asset (minus the quote), so ingest must replay it even if no pair lists it.
    data = one_profile()
    data["profiles"]["profile_a"]["trading_params"]["trading_pairs"] = ["BTC/USDC"]
    products = parse_config(data).all_products()
    assert {"BTC/USDC", "ETH/USDC", "SOL/USDC", "XRP/USDC", "ADA/USDC"} <= set(products)
    assert "USDC/USDC" not in products


# --------------------------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(
    ("section", "bad_key"),
    [
        (None, "enabeld"),
        ("api_credentials", "api_secret"),
        ("strategy_config", "confidence_treshold"),
        ("trading_params", "max_open_position"),
        ("risk_management", "stop_loss"),
        ("profile_hash", "base_hsh"),
        ("paper", "initial_balance"),
    ],
)
def test_misspelt_key_is_refused_naming_profile_and_key(section: str | None, bad_key: str) -> None:
    data = one_profile("profile_x")
    target = data["profiles"]["profile_x"]
    if section is not None:
        target = target.setdefault(section, {})
    target[bad_key] = "x"
    where = "profiles.profile_x" + (f".{section}" if section else "") + f".{bad_key}"
    refused(data, where, "unknown key")


@pytest.mark.parametrize(
    ("system", "where"),
    [
        ({"conflict_window_s": 10}, "system.conflict_window_s"),
        ({"arbiter": {"conflict_window": 10}}, "system.arbiter.conflict_window"),
        ({"kafka": {"namespaces": "x"}}, "system.kafka.namespaces"),
        ({"execution": {"taker_fee": 0.001}}, "system.execution.taker_fee"),
        ({"registry": {"top_k": 3}}, "system.registry.top_k"),
    ],
)
def test_misspelt_system_key_is_refused_naming_the_key(system: dict[str, Any], where: str) -> None:
    data = one_profile()
    data["system"] = system
    refused(data, where, "unknown key")


def test_unknown_top_level_key_is_refused() -> None:
    data = one_profile()
    data["profile"] = {}
    refused(data, "profile: unknown key")


# --------------------------------------------------------------------------------------------- weights
def _weights(data: dict[str, Any], pid: str = "profile_a") -> dict[str, float]:
    weights: dict[str, float] = data["profiles"][pid]["strategy_config"]["strategy_weights"]
    return weights


def test_weights_not_summing_to_one_are_refused_with_the_sum() -> None:
    data = one_profile("profile_w")
    _weights(data, "profile_w")["quantum_strategy_calculator"] = 0.25  # sum 1.10
    refused(data, "profiles.profile_w.strategy_config.strategy_weights", "sum to 1", "1.1")


@pytest.mark.parametrize("delta", [5e-7, -5e-7])
def test_weights_within_1e6_of_one_are_accepted(delta: float) -> None:
    data = one_profile()
    _weights(data)["volume_weighted_hash_oscillator"] = 0.30 + delta
    cfg = parse_config(data)
    assert math.isclose(sum(cfg.profiles["profile_a"].strategy_config.strategy_weights.values()), 1 + delta)


@pytest.mark.parametrize("delta", [2e-6, -2e-6])
def test_weights_beyond_1e6_of_one_are_refused(delta: float) -> None:
    data = one_profile()
    _weights(data)["volume_weighted_hash_oscillator"] = 0.30 + delta
    refused(data, "profiles.profile_a.strategy_config.strategy_weights", "sum to 1")


def test_unknown_strategy_name_in_weights_is_refused_naming_it() -> None:
    data = one_profile("profile_s")
    _weights(data, "profile_s")["momentum_magic"] = 0.0
    refused(data, "profiles.profile_s.strategy_config.strategy_weights", "momentum_magic")


def test_empty_weights_are_refused() -> None:
    data = one_profile()
    data["profiles"]["profile_a"]["strategy_config"]["strategy_weights"] = {}
    refused(data, "profiles.profile_a.strategy_config.strategy_weights", "empty")


def test_a_subset_of_strategies_is_allowed() -> None:
    data = one_profile()
    data["profiles"]["profile_a"]["strategy_config"]["strategy_weights"] = {
        "quantum_strategy_calculator": 1.0
    }
    assert parse_config(data).profiles["profile_a"].strategy_config.strategy_weights == {
        "quantum_strategy_calculator": 1.0
    }


def test_negative_weight_is_refused() -> None:
    data = one_profile()
    w = _weights(data)
    w["volume_weighted_hash_oscillator"] = 0.50
    w["entropy_enhanced_trading_executor"] = -0.10
    refused(
        data, "profiles.profile_a.strategy_config.strategy_weights.entropy_enhanced_trading_executor", "-0.1"
    )


_WEIGHT_VECTORS = st.lists(
    st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=len(STRATEGY_NAMES),
)


@settings(max_examples=150, deadline=None)
@given(raw=_WEIGHT_VECTORS)
def test_random_weight_vectors_normalised_to_one_are_accepted(raw: list[float]) -> None:
    total = sum(raw)
    weights = {name: x / total for name, x in zip(STRATEGY_NAMES, raw, strict=False)}
    data = one_profile()
    data["profiles"]["profile_a"]["strategy_config"]["strategy_weights"] = weights
    parsed = parse_config(data).profiles["profile_a"].strategy_config.strategy_weights
    assert dict(parsed) == weights


@settings(max_examples=150, deadline=None)
@given(raw=_WEIGHT_VECTORS, eps=st.floats(min_value=2e-6, max_value=0.2), up=st.booleans())
def test_random_weight_vectors_perturbed_beyond_1e6_are_refused(
    raw: list[float], eps: float, up: bool
) -> None:
    total = sum(raw)
    normalised = [x / total for x in raw]
    if up and max(normalised) * (1 + eps) > 1.0:
        up = False  # scaling up would push one weight past 1: perturb downwards instead
    factor = 1 + eps if up else 1 - eps
    weights = {name: x * factor for name, x in zip(STRATEGY_NAMES, normalised, strict=False)}
    assert abs(sum(weights.values()) - 1) > 1e-6
    data = one_profile()
    data["profiles"]["profile_a"]["strategy_config"]["strategy_weights"] = weights
    refused(data, "profiles.profile_a.strategy_config.strategy_weights", "sum to 1")


# --------------------------------------------------------------------------------------------- ranges
@pytest.mark.parametrize(
    ("section", "key", "value", "shown"),
    [
        ("risk_management", "stop_loss_pct", -2.5, "-2.5"),
        ("risk_management", "stop_loss_pct", 0, "0"),
        ("risk_management", "take_profit_pct", -1.0, "-1.0"),
        ("risk_management", "max_daily_loss_pct", 0, "0"),
        ("risk_management", "max_drawdown_pct", 120.0, "120.0"),
        ("risk_management", "volatility_threshold", -0.1, "-0.1"),
        ("strategy_config", "max_position_size_pct", 150.0, "150.0"),
        ("strategy_config", "max_position_size_pct", -8.0, "-8.0"),
        ("strategy_config", "confidence_threshold", 1.5, "1.5"),
        ("strategy_config", "signal_strength_threshold", -0.2, "-0.2"),
        ("strategy_config", "hash_trajectory_weight", 1.01, "1.01"),
        ("strategy_config", "entropy_threshold", -0.003, "-0.003"),
        ("strategy_config", "risk_adjustment_factor", 0, "0"),
        ("trading_params", "max_open_positions", 0, "0"),
        ("trading_params", "retry_attempts", -1, "-1"),
        ("trading_params", "slippage_tolerance", 0.5, "0.5"),
        ("trading_params", "order_timeout", 0, "0"),
        ("profile_hash", "hash_rotation_interval", 10, "10"),
        ("profile_hash", "hash_complexity_factor", 0, "0"),
    ],
)
def test_out_of_range_value_is_refused_naming_profile_key_and_value(
    section: str, key: str, value: float, shown: str
) -> None:
    data = one_profile("profile_r")
    data["profiles"]["profile_r"][section][key] = value
    refused(data, f"profiles.profile_r.{section}.{key}", f"(got {shown})")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("profile_hash", "entropy_seed", math.nan),
        ("profile_hash", "entropy_seed", math.inf),
        ("risk_management", "take_profit_pct", math.inf),
        ("risk_management", "volatility_threshold", math.inf),
        ("strategy_config", "entropy_threshold", math.nan),
        ("strategy_config", "risk_adjustment_factor", math.inf),
        ("trading_params", "order_timeout", math.inf),
    ],
)
def test_nan_and_inf_values_are_refused(section: str, key: str, value: float) -> None:
    data = one_profile("profile_n")
    data["profiles"]["profile_n"][section][key] = value
    refused(data, f"profiles.profile_n.{section}.{key}", "finite")


def test_nan_written_in_yaml_is_refused(tmp_path: Path) -> None:
    text = TEMPLATE.read_text(encoding="utf-8").replace("entropy_seed: 0.42", "entropy_seed: .nan")
    path = tmp_path / "nan.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"profiles\.profile_a\.profile_hash\.entropy_seed.*finite"):
        load_config(path)


def test_nan_in_drift_range_is_refused() -> None:
    data = one_profile()
    data["profiles"]["profile_a"]["strategy_config"]["drift_delta_range"] = [math.nan, 0.005]
    refused(data, "profiles.profile_a.strategy_config.drift_delta_range")


def test_reversed_drift_range_is_refused_with_the_values() -> None:
    data = one_profile("profile_d")
    data["profiles"]["profile_d"]["strategy_config"]["drift_delta_range"] = [0.005, 0.001]
    refused(data, "profiles.profile_d.strategy_config.drift_delta_range", "low <= high", "[0.005, 0.001]")


def test_drift_range_of_wrong_length_is_refused() -> None:
    data = one_profile()
    data["profiles"]["profile_a"]["strategy_config"]["drift_delta_range"] = [0.001]
    refused(data, "profiles.profile_a.strategy_config.drift_delta_range")


def test_desync_bounds_reversed_are_refused() -> None:
    data = one_profile()
    data["system"] = {"execution": {"desync_min_ms": 2000, "desync_max_ms": 100}}
    refused(data, "system.execution", "desync_min_ms", "desync_max_ms")


def test_wrong_type_is_refused_naming_key() -> None:
    data = one_profile()
    data["profiles"]["profile_a"]["trading_params"]["max_open_positions"] = "four"
    refused(data, "profiles.profile_a.trading_params.max_open_positions", "'four'")


# --------------------------------------------------------------------------------------------- upper bounds
# Every duration, count and amount has a ceiling, so an absurd value is refused here instead of overflowing in a
# service (order_timeout: 1e308 validated, then made the backtest's timedelta overflow). The one unbounded number
# is entropy_seed: any finite float is a hash input, never arithmetic.
UNBOUNDED_NUMBERS = {"ProfileHash.entropy_seed"}


def _schema_numbers_and_lists() -> list[Any]:
    """(Model.key, the key's JSON schema) of every number, integer, list and mapping in the config model."""
    found: list[Any] = []
    schema = AppConfig.model_json_schema()
    models = {"AppConfig": schema, **schema["$defs"]}
    for model, definition in models.items():
        for key, prop in definition.get("properties", {}).items():
            for variant in prop.get("anyOf", [prop]):
                where = f"{model}.{key}"
                kinds = ("number", "integer", "array", "object")
                if variant.get("type") in kinds and "$ref" not in variant and where not in UNBOUNDED_NUMBERS:
                    found.append(pytest.param(where, variant, id=where))
    return found


@pytest.mark.parametrize(("where", "prop"), _schema_numbers_and_lists())
def test_every_number_and_list_of_the_config_has_an_upper_bound(where: str, prop: dict[str, Any]) -> None:
    kind = prop["type"]
    if kind in ("number", "integer"):
        assert "maximum" in prop or "exclusiveMaximum" in prop, f"{where} has no upper bound"
    elif kind == "array":
        assert "maxItems" in prop, f"{where} has no most items"
    elif "propertyNames" not in prop:  # a mapping with a closed set of keys is bounded by it
        assert "maxProperties" in prop, f"{where} has no most entries"


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, key = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[key] = value


P = "profiles.profile_u"
UPPER_BOUNDS = [
    # (key, highest accepted value, a refused value, how the refused value is shown)
    (f"{P}.trading_params.order_timeout", 30 * 86_400, 1e308, "1e+308"),
    (f"{P}.trading_params.order_timeout", 30 * 86_400, 30 * 86_400 + 1, "2592001"),
    (f"{P}.strategy_config.risk_adjustment_factor", 100, 1e9, "1000000000.0"),
    (f"{P}.strategy_config.entropy_threshold", 10, 11, "11"),
    (f"{P}.risk_management.volatility_threshold", 10_000, 1e300, "1e+300"),
    (f"{P}.paper.initial_quote_balance", 1e12, 1e13, "10000000000000.0"),
    ("system.arbiter.max_product_notional", 1e15, 1e16, "1e+16"),
    ("system.arbiter.max_total_notional", 1e15, 1e308, "1e+308"),
    ("system.arbiter.min_order_notional", 1e12, 1e13, "10000000000000.0"),
    ("system.state.snapshot_every_messages", 100_000_000, 10**12, "1000000000000"),
]


@pytest.mark.parametrize(("key", "highest", "bad", "shown"), UPPER_BOUNDS)
def test_a_value_above_its_bound_is_refused_in_one_line_naming_key_and_value(
    key: str, highest: float, bad: float, shown: str
) -> None:
    data = one_profile("profile_u")
    _set(data, key, highest)
    parse_config(data)  # the bound itself is accepted
    _set(data, key, bad)
    message = refused(data, key, f"(got {shown})", "less than or equal to")
    assert message.startswith("test.yaml: invalid configuration: ") and "\n" not in message


def test_a_value_below_the_lowest_risk_adjustment_factor_is_refused() -> None:
    data = one_profile("profile_u")
    _set(data, f"{P}.strategy_config.risk_adjustment_factor", 0.001)
    refused(data, f"{P}.strategy_config.risk_adjustment_factor", "(got 0.001)")


@pytest.mark.parametrize("key", ["base_assets", "random_asset_pool"])
def test_more_than_500_assets_in_a_list_are_refused(key: str) -> None:
    data = one_profile("profile_u")
    data["profiles"]["profile_u"]["strategy_config"][key] = [f"A{i:03d}" for i in range(501)]
    refused(data, f"{P}.strategy_config.{key}", "at most 500")


def test_more_than_500_trading_pairs_are_refused() -> None:
    data = one_profile("profile_u")
    data["profiles"]["profile_u"]["trading_params"]["trading_pairs"] = [f"A{i:03d}/USDC" for i in range(501)]
    refused(data, f"{P}.trading_params.trading_pairs", "at most 500")


def test_more_than_100_profiles_are_refused() -> None:
    data = {"profiles": {f"p{i}": copy.deepcopy(SEED_PROFILE_A) for i in range(101)}}
    refused(data, "profiles", "at most 100")


# --------------------------------------------------------------------------------------------- assets, pairs
def test_empty_base_assets_are_refused() -> None:
    data = one_profile("profile_e")
    data["profiles"]["profile_e"]["strategy_config"]["base_assets"] = []
    refused(data, "profiles.profile_e.strategy_config.base_assets")


@pytest.mark.parametrize("key", ["base_assets", "random_asset_pool"])
def test_duplicate_assets_are_refused_naming_them(key: str) -> None:
    data = one_profile("profile_u")
    sc = data["profiles"]["profile_u"]["strategy_config"]
    sc[key] = [*sc[key], sc[key][0]]
    refused(data, f"profiles.profile_u.strategy_config.{key}", "listed twice", repr(sc[key][0]))


def test_malformed_asset_is_refused() -> None:
    data = one_profile()
    data["profiles"]["profile_a"]["strategy_config"]["base_assets"] = ["BTC", "eth"]
    refused(data, "profiles.profile_a.strategy_config.base_assets.1", "'eth'")


def test_pair_whose_base_is_not_an_asset_of_the_profile_is_refused() -> None:
    data = one_profile("profile_p")
    data["profiles"]["profile_p"]["trading_params"]["trading_pairs"] = ["BTC/USDC", "DOGE/USDC"]
    refused(data, "profiles.profile_p.trading_params.trading_pairs", "'DOGE'", "DOGE/USDC")


def test_pair_with_a_pool_asset_as_base_is_accepted() -> None:
    data = one_profile()
    data["profiles"]["profile_a"]["trading_params"]["trading_pairs"] = ["BTC/USDC", "ADA/USDC"]
    assert parse_config(data).profiles["profile_a"].trading_pairs == ["BTC/USDC", "ADA/USDC"]


@pytest.mark.parametrize("pair", ["BTCUSDC", "BTC-USDC", "btc/usdc", "BTC/", "/USDC", "BTC/USDC/ETH", ""])
def test_malformed_pair_is_refused_naming_it(pair: str) -> None:
    data = one_profile("profile_m")
    data["profiles"]["profile_m"]["trading_params"]["trading_pairs"] = ["ETH/USDC", pair]
    refused(data, "profiles.profile_m.trading_params.trading_pairs", repr(pair), "BASE/QUOTE")


def test_pair_with_another_quote_is_refused() -> None:
    data = one_profile("profile_q")
    data["profiles"]["profile_q"]["trading_params"]["trading_pairs"] = ["BTC/USDC", "ETH/USDT"]
    refused(data, "profiles.profile_q.trading_params.trading_pairs", "ETH/USDT", "'USDT'", "quote_asset")


def test_pair_of_an_asset_against_itself_is_refused() -> None:
    data = one_profile()
    data["profiles"]["profile_a"]["trading_params"]["trading_pairs"] = ["USDC/USDC"]
    refused(data, "profiles.profile_a.trading_params.trading_pairs", "USDC/USDC")


def test_other_quote_asset_is_honoured() -> None:
    data = one_profile()
    data["system"] = {"quote_asset": "USDT"}
    data["profiles"]["profile_a"]["trading_params"]["trading_pairs"] = ["BTC/USDT"]
    cfg = parse_config(data)
    assert "BTC/USDT" in cfg.all_products()


def test_empty_trading_pairs_are_refused() -> None:
    data = one_profile()
    data["profiles"]["profile_a"]["trading_params"]["trading_pairs"] = []
    refused(data, "profiles.profile_a.trading_params.trading_pairs")


def test_bad_profile_id_is_refused_naming_it() -> None:
    data = {"profiles": {"Profile-A": copy.deepcopy(SEED_PROFILE_A)}}
    refused(data, "Profile-A")


def test_missing_section_is_refused_naming_profile_and_section() -> None:
    data = one_profile("profile_z")
    del data["profiles"]["profile_z"]["risk_management"]
    refused(data, "profiles.profile_z.risk_management", "Field required")


# --------------------------------------------------------------------------------------------- profiles, modes
def test_no_enabled_profile_is_refused() -> None:
    data = template_data()
    for p in data["profiles"].values():
        p["enabled"] = False
    refused(data, "no profile is enabled")


def test_empty_profiles_are_refused() -> None:
    refused({"profiles": {}}, "profiles")


def test_missing_profiles_key_is_refused() -> None:
    refused({"system": {}}, "profiles", "Field required")


def test_disabled_profile_is_kept_but_not_enabled() -> None:
    data = template_data()
    data["profiles"]["profile_b"]["enabled"] = False
    cfg = parse_config(data)
    assert set(cfg.profiles) == {"profile_a", "profile_b"}
    assert list(cfg.enabled_profiles()) == ["profile_a"]


def test_enabled_profiles_are_ordered_by_priority_then_id() -> None:
    data = template_data()
    data["profiles"]["profile_a"]["priority"] = 5
    data["profiles"]["profile_b"]["priority"] = 2
    assert list(parse_config(data).enabled_profiles()) == ["profile_b", "profile_a"]


def test_placeholder_credentials_are_accepted_in_paper_mode() -> None:
    data = template_data()
    data["system"] = {"mode": "paper"}
    cfg = parse_config(data)
    assert cfg.profiles["profile_a"].api_credentials.is_placeholder()


def test_placeholder_credentials_are_refused_in_live_mode_saying_why() -> None:
    data = template_data()
    data["system"] = {"mode": "live"}
    refused(data, "profiles.profile_a.api_credentials", "placeholder", "live mode")


def test_empty_credential_counts_as_placeholder_in_live_mode() -> None:
    data = one_profile("profile_l")
    creds = data["profiles"]["profile_l"]["api_credentials"]
    creds.update(api_key=FAKE_KEY, secret="", passphrase=FAKE_PASS)
    data["system"] = {"mode": "live"}
    message = refused(data, "profiles.profile_l.api_credentials", "live mode")
    assert not any(f in message for f in FAKES)


def test_placeholder_of_a_disabled_profile_is_fine_in_live_mode() -> None:
    data = template_data()
    data["system"] = {"mode": "live"}
    creds = data["profiles"]["profile_a"]["api_credentials"]
    creds.update(api_key=FAKE_KEY, secret=FAKE_SECRET, passphrase=FAKE_PASS)
    data["profiles"]["profile_b"]["enabled"] = False
    cfg = parse_config(data)
    assert cfg.system.mode == "live"
    assert list(cfg.enabled_profiles()) == ["profile_a"]


def test_real_credentials_are_accepted_in_live_mode() -> None:
    data = one_profile()
    data["system"] = {"mode": "live"}
    data["profiles"]["profile_a"]["api_credentials"].update(
        api_key=FAKE_KEY, secret=FAKE_SECRET, passphrase=FAKE_PASS
    )
    creds = parse_config(data).profiles["profile_a"].api_credentials
    assert creds.api_key.get_secret_value() == FAKE_KEY
    assert not creds.is_placeholder()


# --------------------------------------------------------------------------------------------- files
def test_non_mapping_top_level_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- profile_a\n- profile_b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="top level must be a mapping") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_invalid_yaml_is_refused_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("profiles:\n  profile_a: [unclosed\n  profile_b: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "line " in str(info.value)


def test_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError, match="cannot read configuration") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_a_binary_file_is_refused_naming_the_file_and_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "photo.yaml"
    head = b"profiles:\n  "
    path.write_bytes(head + b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: not a YAML text file: byte 0x89 at offset {len(head)} is not UTF-8 (binary file?)"
    )


def test_a_file_with_a_control_character_is_refused_naming_its_position(tmp_path: Path) -> None:
    path = tmp_path / "ctl.yaml"
    path.write_bytes(b"profiles: \x01\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (
        str(info.value)
        == f"{path}: not valid YAML: character 11: a control character, YAML is text (binary file?)"
    )


def test_a_file_nested_too_deeply_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("profiles: " + "[" * 50_000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML: nested too deeply") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_a_folder_given_as_the_config_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration") as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_one_problem_is_one_line_naming_file_key_and_value() -> None:
    data = one_profile()
    data["profiles"]["profile_a"]["trading_params"]["order_timeout"] = 1e308
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="my/file.yaml")
    assert str(info.value) == (
        "my/file.yaml: invalid configuration: profiles.profile_a.trading_params.order_timeout: "
        "Input should be less than or equal to 2592000 (got 1e+308)"
    )


def test_error_message_names_the_file() -> None:
    data = one_profile()
    data["profiles"]["profile_a"]["enabeld"] = True
    with pytest.raises(ConfigError, match=r"^my/file\.yaml: invalid configuration"):
        parse_config(data, source="my/file.yaml")


def test_several_problems_are_all_reported() -> None:
    data = one_profile()
    p = data["profiles"]["profile_a"]
    p["risk_management"]["stop_loss_pct"] = -1
    p["strategy_config"]["confidence_threshold"] = 2
    message = refused(data, "stop_loss_pct", "confidence_threshold")
    assert message.splitlines()[0] == "test.yaml: invalid configuration (2 problems)"


# --------------------------------------------------------------------------------------------- local file rule
def test_load_config_without_path_prefers_the_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = template_data()
    local = copy.deepcopy(template)
    local["profiles"]["profile_a"]["name"] = "Local Copy"
    write_yaml(tmp_path / DEFAULT_CONFIG, template)
    write_yaml(tmp_path / LOCAL_CONFIG, local)
    monkeypatch.chdir(tmp_path)
    assert load_config(None).profiles["profile_a"].name == "Local Copy"
    assert load_config().profiles["profile_a"].name == "Local Copy"


def test_load_config_without_path_uses_the_template_when_no_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_yaml(tmp_path / DEFAULT_CONFIG, template_data())
    monkeypatch.chdir(tmp_path)
    assert load_config(None).profiles["profile_a"].name == "Primary Trading Profile"


def test_explicit_path_wins_over_the_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = template_data()
    local["profiles"]["profile_a"]["name"] = "Local Copy"
    write_yaml(tmp_path / LOCAL_CONFIG, local)
    monkeypatch.chdir(tmp_path)
    assert load_config(TEMPLATE).profiles["profile_a"].name == "Primary Trading Profile"


def test_broken_local_file_is_reported_not_silently_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_yaml(tmp_path / DEFAULT_CONFIG, template_data())
    (tmp_path / LOCAL_CONFIG).write_text("profiles: [\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="coinbase_profiles_local.yaml"):
        load_config(None)


def test_local_file_is_ignored_by_git() -> None:
    gitignore = (ROOT / ".gitignore").read_text(encoding="utf-8")
    assert "coinbase_profiles_local.yaml" in gitignore


# --------------------------------------------------------------------------------------------- secrets
def _data_with_fake_credentials() -> dict[str, Any]:
    data = template_data()
    for p in data["profiles"].values():
        p["api_credentials"].update(api_key=FAKE_KEY, secret=FAKE_SECRET, passphrase=FAKE_PASS)
    return data


def test_repr_and_dumps_of_a_loaded_config_never_show_credentials() -> None:
    cfg = parse_config(_data_with_fake_credentials())
    shown = [
        repr(cfg),
        str(cfg),
        repr(cfg.profiles["profile_a"]),
        repr(cfg.profiles["profile_a"].api_credentials),
        cfg.model_dump_json(),
        str(cfg.model_dump()),
    ]
    for text in shown:
        for fake in FAKES:
            assert fake not in text


def _secret_error_cases() -> list[tuple[str, Any]]:
    cases: list[tuple[str, Any]] = []

    def case(name: str, mutate: Any) -> None:
        data = _data_with_fake_credentials()
        mutate(data)
        cases.append((name, data))

    case(
        "live mode, other profile placeholder",
        lambda d: (
            d.update(system={"mode": "live"})
            or d["profiles"]["profile_b"]["api_credentials"].update(secret="YOUR_X")
        ),
    )
    case(
        "unknown key inside api_credentials",
        lambda d: d["profiles"]["profile_a"]["api_credentials"].update(api_secret=FAKE_SECRET),
    )
    case(
        "credential of wrong type",
        lambda d: d["profiles"]["profile_a"]["api_credentials"].update(sandbox=FAKE_KEY),
    )
    case("api_key outside its section", lambda d: d["profiles"]["profile_a"].update(api_key=FAKE_KEY))
    case(
        "credentials as a string",
        lambda d: d["profiles"]["profile_a"].update(api_credentials=f"{FAKE_KEY}:{FAKE_SECRET}"),
    )
    case(
        "credentials as a list",
        lambda d: d["profiles"]["profile_a"].update(api_credentials=[FAKE_KEY, FAKE_SECRET, FAKE_PASS]),
    )
    case("profiles as a list", lambda d: d.update(profiles=list(d["profiles"].values())))
    case("profile as a list", lambda d: d["profiles"].update(profile_a=[d["profiles"]["profile_a"]]))
    case(
        "misspelt section holding credentials",
        lambda d: d["profiles"]["profile_a"].update(
            api_credential=d["profiles"]["profile_a"].pop("api_credentials")
        ),
    )
    case(
        "bad value next to credentials",
        lambda d: d["profiles"]["profile_a"]["risk_management"].update(stop_loss_pct=-1),
    )
    return cases


@pytest.mark.parametrize(("name", "data"), _secret_error_cases(), ids=[c[0] for c in _secret_error_cases()])
def test_config_error_never_contains_a_credential_value(name: str, data: Any) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="secret.yaml")
    message = str(info.value) + repr(info.value)
    for fake in FAKES:
        assert fake not in message, f"{name}: credential leaked in\n{message}"


@pytest.mark.parametrize(
    "broken_line",
    [
        f'      api_key: "{FAKE_KEY}\n',  # unterminated quote
        f"      api_key: {FAKE_KEY}: {FAKE_SECRET}\n",  # mapping value where none is allowed
        f"      api_key: [{FAKE_KEY}\n",  # unclosed flow sequence
    ],
)
def test_yaml_error_never_quotes_the_offending_credential_line(tmp_path: Path, broken_line: str) -> None:
    lines = TEMPLATE.read_text(encoding="utf-8").splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if "api_key:" in line)
    lines[index] = broken_line
    path = tmp_path / "broken_secret.yaml"
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    message = str(info.value)
    for fake in FAKES:
        assert fake not in message
    assert "line " in message


# --------------------------------------------------------------------------------------------- warnings
def test_shared_hash_settings_give_a_warning_naming_both_profiles() -> None:
    data = template_data()
    data["profiles"]["profile_b"]["profile_hash"]["base_hash"] = "profile_a_primary_trading"
    data["profiles"]["profile_b"]["profile_hash"]["entropy_seed"] = 0.42
    cfg = parse_config(data)
    assert cfg.shared_hash_settings() == [("profile_a", "profile_b")]
    warnings = config_warnings(cfg)
    assert len(warnings) == 1
    assert "profile_a" in warnings[0] and "profile_b" in warnings[0]
    assert "collision" in warnings[0]


def test_same_base_hash_with_other_seed_is_no_shared_setting() -> None:
    data = template_data()
    data["profiles"]["profile_b"]["profile_hash"]["base_hash"] = "profile_a_primary_trading"
    assert config_warnings(parse_config(data)) == []


def test_shared_hash_settings_of_a_disabled_profile_do_not_warn() -> None:
    data = template_data()
    data["profiles"]["profile_b"]["profile_hash"] = copy.deepcopy(
        data["profiles"]["profile_a"]["profile_hash"]
    )
    data["profiles"]["profile_b"]["enabled"] = False
    assert config_warnings(parse_config(data)) == []


def test_three_profiles_sharing_hash_settings_warn_for_each_later_one() -> None:
    data = template_data()
    shared = data["profiles"]["profile_a"]["profile_hash"]
    data["profiles"]["profile_b"]["profile_hash"] = copy.deepcopy(shared)
    data["profiles"]["profile_c"] = copy.deepcopy(data["profiles"]["profile_b"])
    data["profiles"]["profile_c"]["priority"] = 3
    cfg = parse_config(data)
    assert cfg.shared_hash_settings() == [("profile_a", "profile_b"), ("profile_a", "profile_c")]
    assert len(config_warnings(cfg)) == 2


# --------------------------------------------------------------------------------------------- examples
EXAMPLE_FILES = ["minimal.yaml", "shared_hash.yaml", "three_profiles.yaml"]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_config_validates(name: str) -> None:
    cfg = load_config(EXAMPLES / name)
    assert isinstance(cfg, AppConfig)
    assert cfg.system.mode == "paper"


def test_minimal_example_has_only_profiles_and_one_profile() -> None:
    raw = yaml.safe_load((EXAMPLES / "minimal.yaml").read_text(encoding="utf-8"))
    assert list(raw) == ["profiles"]
    cfg = load_config(EXAMPLES / "minimal.yaml")
    assert len(cfg.profiles) == 1
    assert cfg.system.arbiter.conflict_window_s == 300.0
    assert config_warnings(cfg) == []


def test_shared_hash_example_has_identical_hash_settings_and_warns() -> None:
    cfg = load_config(EXAMPLES / "shared_hash.yaml")
    a, b = cfg.profiles["profile_a"], cfg.profiles["profile_b"]
    assert a.profile_hash == b.profile_hash
    assert cfg.shared_hash_settings() == [("profile_a", "profile_b")]
    assert any("profile_a" in w and "profile_b" in w for w in config_warnings(cfg))


def test_shared_hash_example_trades_only_assets_with_bundled_data() -> None:
    cfg = load_config(EXAMPLES / "shared_hash.yaml")
    for pid, p in cfg.profiles.items():
        assets = set(p.traded_assets()) - {cfg.system.quote_asset}
        assert assets <= BUNDLED_ASSETS, f"{pid}: {sorted(assets - BUNDLED_ASSETS)} have no bundled candles"
    assert {prod.split("/")[0] for prod in cfg.all_products()} <= BUNDLED_ASSETS


def test_three_profiles_example_adds_profile_c_on_profile_a_products() -> None:
    cfg = load_config(EXAMPLES / "three_profiles.yaml")
    template = load_config(TEMPLATE)
    assert list(cfg.enabled_profiles()) == ["profile_a", "profile_b", "profile_c"]
    assert cfg.profiles["profile_a"] == template.profiles["profile_a"]
    assert cfg.profiles["profile_b"] == template.profiles["profile_b"]
    a, c = cfg.profiles["profile_a"], cfg.profiles["profile_c"]
    assert c.trading_pairs == a.trading_pairs
    assert c.strategy_config.base_assets == a.strategy_config.base_assets
    assert c.profile_hash.settings_key() not in {
        p.profile_hash.settings_key() for p in (a, cfg.profiles["profile_b"])
    }
    assert config_warnings(cfg) == []


# --------------------------------------------------------------------------------------------- mpctl config validate
def test_mpctl_validate_template_exits_0_with_ok() -> None:
    result = run_validate(str(TEMPLATE))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "profile_a" in result.stdout and "profile_b" in result.stdout
    assert "warning" not in result.stderr


def test_mpctl_validate_bad_file_exits_1_with_the_message(tmp_path: Path) -> None:
    data = template_data()
    data["profiles"]["profile_b"]["risk_management"]["stop_los_pct"] = 2.0
    path = write_yaml(tmp_path / "bad.yaml", data)
    result = run_validate(str(path))
    assert result.returncode == 1
    assert "OK" not in result.stdout
    assert "INVALID" in result.stderr
    assert "profiles.profile_b.risk_management.stop_los_pct" in result.stderr
    assert str(path) in result.stderr


def test_mpctl_validate_missing_file_exits_1(tmp_path: Path) -> None:
    result = run_validate(str(tmp_path / "absent.yaml"))
    assert result.returncode == 1
    assert "cannot read configuration" in result.stderr


def test_mpctl_validate_warns_on_shared_hash_settings() -> None:
    result = run_validate(str(EXAMPLES / "shared_hash.yaml"))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "warning" in result.stderr
    assert "profile_a" in result.stderr and "profile_b" in result.stderr


def test_mpctl_validate_without_file_uses_the_local_file(tmp_path: Path) -> None:
    write_yaml(tmp_path / DEFAULT_CONFIG, template_data())
    local = template_data()
    local["profiles"]["profile_b"]["risk_management"]["stop_loss_pct"] = -1
    write_yaml(tmp_path / LOCAL_CONFIG, local)
    result = run_validate(cwd=tmp_path)
    assert result.returncode == 1
    assert "coinbase_profiles_local.yaml" in result.stderr
    assert "profiles.profile_b.risk_management.stop_loss_pct" in result.stderr


def test_mpctl_validate_never_prints_credentials(tmp_path: Path) -> None:
    data = _data_with_fake_credentials()
    data["profiles"]["profile_a"]["api_credentials"]["api_secret"] = FAKE_SECRET
    path = write_yaml(tmp_path / "creds.yaml", data)
    bad = run_validate(str(path))
    assert bad.returncode == 1
    del data["profiles"]["profile_a"]["api_credentials"]["api_secret"]
    good = run_validate(str(write_yaml(tmp_path / "creds_ok.yaml", data)))
    assert good.returncode == 0, good.stderr
    for result in (bad, good):
        for fake in FAKES:
            assert fake not in result.stdout + result.stderr


def test_live_mode_accepts_placeholders_when_credentials_come_from_the_encrypted_store() -> None:
    data = template_data()
    data["system"] = {"mode": "live"}
    for p in data["profiles"].values():
        p["api_credentials"]["source"] = "store"
    cfg = parse_config(data)
    assert {p.api_credentials.source for p in cfg.profiles.values()} == {"store"}
    data["profiles"]["profile_b"]["api_credentials"]["source"] = "yaml"
    refused(data, "profile_b", "api_credentials", "placeholder", "source: store")


# ------------------------------------------------------------------------------------------ market data
def test_market_data_defaults_to_coinbase_hourly_on_the_public_endpoints() -> None:
    md = parse_config(one_profile()).system.market_data
    assert (md.source, md.interval, md.interval_s) == ("coinbase", "1h", 3600)
    assert md.rest_url == "https://api.coinbase.com" and md.ws_url == "wss://advanced-trade-ws.coinbase.com"
    assert md.live


@pytest.mark.parametrize(
    ("market_data", "fragments"),
    [
        ({"interval": "3m"}, ("market_data.interval", "3m")),
        ({"source": "kraken"}, ("market_data.source", "kraken")),
        ({"rest_url": "ftp://x.example"}, ("rest_url", "ftp://x.example")),
        (
            {"ws_url": "https://advanced-trade-ws.coinbase.com"},
            ("ws_url", "https://advanced-trade-ws.coinbase.com"),
        ),
        ({"grace_s": -1}, ("grace_s",)),
        ({"intervall": "1h"}, ("intervall",)),
    ],
)
def test_bad_market_data_settings_are_refused_naming_key_and_value(
    market_data: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    data = one_profile()
    data["system"] = {"market_data": market_data}
    refused(data, *fragments)


@pytest.mark.parametrize(
    ("mode", "source", "exchange_url", "refused_"),
    [
        ("live", "replay", None, True),
        ("live", "replay", "https://api.coinbase.com", True),
        ("live", "replay", "http://127.0.0.1:8123", False),  # a loopback test peer, as the live pipeline test
        ("live", "coinbase", None, False),
        ("paper", "replay", None, False),
    ],
)
def test_live_mode_on_a_replay_is_refused_unless_the_exchange_is_a_loopback_peer(
    mode: str, source: str, exchange_url: str | None, refused_: bool
) -> None:
    data = one_profile()
    data["system"] = {"mode": "paper", "market_data": {"source": source}}
    cfg = parse_config(data)
    cfg = cfg.model_copy(update={"system": cfg.system.model_copy(update={"mode": mode})})
    problem = live_source_problem(cfg, exchange_url=exchange_url)
    assert (problem is not None) == refused_
    if problem:
        assert "replay" in problem and "coinbase" in problem
