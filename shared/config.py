"""Typed, strict configuration: the profiles file (`config/coinbase_profiles.yaml`) and system settings.

Every model forbids unknown keys, so a misspelt key fails at start with a message that names it.
The seed's keys are kept exactly; DESIGN.md section 2 gives each its meaning.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

STRATEGY_NAMES: tuple[str, ...] = (
    "volume_weighted_hash_oscillator",
    "zygot_zalgo_entropy_dual_key_gate",
    "multi_phase_strategy_weight_tensor",
    "quantum_strategy_calculator",
    "entropy_enhanced_trading_executor",
)
StrategyName = Literal[
    "volume_weighted_hash_oscillator",
    "zygot_zalgo_entropy_dual_key_gate",
    "multi_phase_strategy_weight_tensor",
    "quantum_strategy_calculator",
    "entropy_enhanced_trading_executor",
]

PLACEHOLDER_PREFIX = "YOUR_"
DEFAULT_CONFIG = Path("config/coinbase_profiles.yaml")
LOCAL_CONFIG = Path("config/coinbase_profiles_local.yaml")

Asset = Annotated[str, Field(pattern=r"^[A-Z0-9]{2,10}$")]
ProfileId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Percent = Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)]
# Every duration and count has an upper bound: a value no run needs (order_timeout: 1e308) would validate and then
# overflow deep in a service (a timedelta, an int conversion). Durations stop at 30 days unless a key says otherwise.
MAX_DURATION_S = 30 * 86_400.0
Duration = Annotated[float, Field(gt=0.0, le=MAX_DURATION_S, allow_inf_nan=False)]
# Money (quote units): a trillion is more than any account; notional caps may be larger (the sum of all profiles).
MAX_BALANCE = 1e12
MAX_NOTIONAL = 1e15
MAX_PROFILES = 100
MAX_ASSETS = 500  # per list (base assets, pool, pairs): Coinbase lists a few hundred products per quote
_PAIR = re.compile(r"^([A-Z0-9]{2,10})/([A-Z0-9]{2,10})$")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the profile and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


# --------------------------------------------------------------------------------------------- profiles
class ApiCredentials(Strict):
    api_key: SecretStr
    secret: SecretStr
    passphrase: SecretStr | None = None
    sandbox: bool = True
    # Where live credentials come from: this file, or the encrypted store (`mpctl secrets set PROFILE`),
    # in which case the values here stay placeholders. docs/execution.md.
    source: Literal["yaml", "store"] = "yaml"
    # Which Coinbase API: Advanced Trade (CDP keys) or the Exchange API (key, secret, passphrase);
    # default from the credentials' shape.
    exchange: Literal["coinbase", "coinbaseexchange"] | None = None

    def is_placeholder(self) -> bool:
        values = [self.api_key, self.secret] + ([self.passphrase] if self.passphrase else [])
        return any(
            v.get_secret_value().startswith(PLACEHOLDER_PREFIX) or not v.get_secret_value() for v in values
        )


class StrategyConfig(Strict):
    base_assets: list[Asset] = Field(min_length=1, max_length=MAX_ASSETS)
    random_asset_pool: list[Asset] = Field(default_factory=list, max_length=MAX_ASSETS)
    strategy_weights: dict[StrategyName, Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]]
    confidence_threshold: Fraction
    signal_strength_threshold: Fraction
    max_position_size_pct: Percent
    # Divides every position budget: below 0.01 a budget would be over 100 times the configured size.
    risk_adjustment_factor: Annotated[float, Field(ge=0.01, le=100.0, allow_inf_nan=False)]
    # Per-candle stdev of log returns: 10 (1000 % per candle) is already beyond any market.
    entropy_threshold: Annotated[float, Field(ge=0.0, le=10.0, allow_inf_nan=False)]
    hash_trajectory_weight: Fraction
    drift_delta_range: tuple[Fraction, Fraction]

    @field_validator("strategy_weights")
    @classmethod
    def _weights_sum_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("strategy_weights is empty: give a weight to at least one strategy")
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"strategy_weights must sum to 1 (within 1e-6), they sum to {total!r}")
        return v

    @field_validator("drift_delta_range")
    @classmethod
    def _drift_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"drift_delta_range must be [low, high] with low <= high, got {list(v)!r}")
        return v

    @field_validator("base_assets", "random_asset_pool")
    @classmethod
    def _no_duplicates(cls, v: list[str]) -> list[str]:
        dup = sorted({a for a in v if v.count(a) > 1})
        if dup:
            raise ValueError(f"assets listed twice: {dup!r}")
        return v


class TradingParams(Strict):
    trading_pairs: list[str] = Field(min_length=1, max_length=MAX_ASSETS)
    max_open_positions: Annotated[int, Field(ge=1, le=1000)]
    order_timeout: Duration
    retry_attempts: Annotated[int, Field(ge=0, le=20)]
    slippage_tolerance: Annotated[float, Field(ge=0.0, le=0.1, allow_inf_nan=False)]

    @field_validator("trading_pairs")
    @classmethod
    def _pairs_well_formed(cls, v: list[str]) -> list[str]:
        for pair in v:
            if not _PAIR.match(pair):
                raise ValueError(f"trading pair {pair!r} is not of the form BASE/QUOTE (e.g. 'BTC/USDC')")
        return v


class RiskManagement(Strict):
    stop_loss_pct: Percent
    take_profit_pct: Annotated[float, Field(gt=0.0, le=1000.0, allow_inf_nan=False)]
    max_daily_loss_pct: Percent
    max_drawdown_pct: Percent
    # Annualised realised volatility above which no new entries are opened (0.75 = 75 %/year).
    volatility_threshold: Annotated[float, Field(gt=0.0, le=10_000.0, allow_inf_nan=False)]
    # A drawdown or daily-loss halt also sells the profile's positions (reason "halt"), so the loss stops at the
    # limit; false keeps them (only new entries stop).
    close_on_halt: bool = True
    # Live mode: a holding the system did not trade (found in the account, e.g. a manual buy on the website) is
    # shown and reported but never sold by the system; true lets exits (stops, signal, flatten, halt) sell it.
    sell_untracked: bool = False


class ProfileHash(Strict):
    base_hash: str = Field(min_length=1)
    entropy_seed: Annotated[float, Field(allow_inf_nan=False)]
    hash_rotation_interval: Annotated[int, Field(ge=60, le=366 * 86400)]
    hash_complexity_factor: Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)]

    def settings_key(self) -> tuple[str, float]:
        return (self.base_hash, self.entropy_seed)


class PaperAccount(Strict):
    initial_quote_balance: Annotated[float, Field(gt=0.0, le=MAX_BALANCE, allow_inf_nan=False)] = 10_000.0


class Profile(Strict):
    name: str = Field(min_length=1)
    enabled: bool = True
    priority: Annotated[int, Field(ge=0, le=1_000_000)] = 100
    api_credentials: ApiCredentials
    strategy_config: StrategyConfig
    trading_params: TradingParams
    risk_management: RiskManagement
    profile_hash: ProfileHash
    paper: PaperAccount = PaperAccount()

    @property
    def trading_pairs(self) -> list[str]:
        return list(self.trading_params.trading_pairs)

    def check_pairs(self, pid: str, quote: str) -> None:
        assets = set(self.traded_assets())
        for pair in self.trading_params.trading_pairs:
            m = _PAIR.match(pair)
            assert m is not None  # checked by the field validator
            base, q = m.group(1), m.group(2)
            if base == q:
                raise ValueError(
                    f"profiles.{pid}.trading_params.trading_pairs: {pair!r} trades an asset against itself"
                )
            if base not in assets:
                raise ValueError(
                    f"profiles.{pid}.trading_params.trading_pairs: base {base!r} of {pair!r} is not in the "
                    f"profile's assets (base_assets + random_asset_pool = {sorted(assets)!r})"
                )
            if q != quote:
                raise ValueError(
                    f"profiles.{pid}.trading_params.trading_pairs: quote of {pair!r} is {q!r}, "
                    f"but system.quote_asset is {quote!r}"
                )

    def traded_assets(self) -> list[str]:
        """Every asset the profile may trade: base assets and the random pool (an epoch adds one of the pool)."""
        return list(
            dict.fromkeys([*self.strategy_config.base_assets, *self.strategy_config.random_asset_pool])
        )


# --------------------------------------------------------------------------------------------- system
class KafkaSettings(Strict):
    # Every topic and consumer group is prefixed with the namespace, so several runs can share a broker.
    namespace: str = Field(default="mp", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    candle_partitions: Annotated[int, Field(ge=1, le=256)] = 1
    intent_partitions: Annotated[int, Field(ge=1, le=256)] = 3
    replication_factor: Annotated[int, Field(ge=1, le=5)] = 1


class ArbiterSettings(Strict):
    """Cross-profile arbitration (docs/arbiter.md gives each rule and the numbers it uses)."""

    # Opposite sides: another profile's live order or recent fill on the other side within this window blocks.
    conflict_window_s: Annotated[float, Field(ge=0.0, le=86_400.0, allow_inf_nan=False)] = 300.0
    # Crowding: different profiles' orders on one product are sent at least this far apart (event time).
    min_cross_profile_gap_ms: Annotated[int, Field(ge=0, le=600_000)] = 500
    # Exposure: notional (size x last close) of the positions of all profiles, per product and in all;
    # null means no cap. The excess of a buy is trimmed or the buy rejected, as `exposure_action` says.
    max_product_notional: Annotated[float, Field(gt=0.0, le=MAX_NOTIONAL, allow_inf_nan=False)] | None = None
    max_total_notional: Annotated[float, Field(gt=0.0, le=MAX_NOTIONAL, allow_inf_nan=False)] | None = None
    exposure_action: Literal["trim", "reject"] = "trim"
    # An order trimmed or scaled below this notional (quote) is rejected instead.
    min_order_notional: Annotated[float, Field(ge=0.0, le=MAX_BALANCE, allow_inf_nan=False)] = 1.0
    # Correlation guard: Pearson correlation of two profiles' per-step returns over the last
    # `correlation_window_steps` steps (at least `correlation_min_steps`); above the threshold the newer
    # profile's buys are scaled by `correlation_size_scale`.
    correlation_window_steps: Annotated[int, Field(ge=3, le=10_000)] = 48
    correlation_min_steps: Annotated[int, Field(ge=3, le=10_000)] = 24
    correlation_threshold: Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)] = 0.8
    correlation_size_scale: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.5
    # Plan echo: how long (event time) an intent waits for its epoch's plan once a later plan of its profile
    # is known; after that it is rejected (a legitimate intent never waits: its plan was published first).
    plan_wait_s: Annotated[float, Field(ge=0.0, le=30 * 86_400.0, allow_inf_nan=False)] = 86_400.0
    # Internal cross: "report" records what netting two profiles' opposite intents would save; "execute"
    # (paper mode only) nets the intents of one step as an internal transfer at the mid price.
    internal_cross: Literal["report", "execute"] = "report"

    @model_validator(mode="after")
    def _correlation_steps(self) -> ArbiterSettings:
        if self.correlation_min_steps > self.correlation_window_steps:
            raise ValueError(
                f"correlation_min_steps ({self.correlation_min_steps}) must not exceed "
                f"correlation_window_steps ({self.correlation_window_steps})"
            )
        return self


class ExecutionSettings(Strict):
    # Coinbase Advanced Trade's lowest volume tier (published fee schedule): taker 0.60 %, maker 0.40 %.
    taker_fee_rate: Annotated[float, Field(ge=0.0, le=0.05, allow_inf_nan=False)] = 0.006
    maker_fee_rate: Annotated[float, Field(ge=0.0, le=0.05, allow_inf_nan=False)] = 0.004
    # Paper exchange: the most of one candle's base volume a single order may take on that candle (0.1 = 10 %).
    # The rest of a larger order continues on the product's next candles until the profile's order_timeout.
    max_volume_participation: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 0.1
    desync_min_ms: Annotated[int, Field(ge=0, le=600_000)] = 50
    desync_max_ms: Annotated[int, Field(ge=0, le=600_000)] = 1500
    # Live mode: seconds between two account snapshots (AccountSnapshotted) of each profile; one is also
    # published at start and after each order reaches a final state.
    account_snapshot_interval_s: Annotated[float, Field(ge=5.0, le=86_400.0, allow_inf_nan=False)] = 60.0
    # Live mode: seconds between two reconciliations of each profile's orders with the exchange, which also reload
    # the product rules (a product switched to cancel-only gets no order after the next one).
    reconcile_interval_s: Annotated[float, Field(ge=1.0, le=3_600.0, allow_inf_nan=False)] = 60.0
    # Live mode: the execution worker refuses a buy whose limit is more than this % above the latest close of its
    # product on md.candles, and a sell more than this % below it (a forged or corrupt approval; slippage is far
    # smaller). Limits on the safe side (a buy below, a sell above) are never refused: they only may not fill.
    max_price_deviation_pct: Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)] = 10.0

    @model_validator(mode="after")
    def _desync_ordered(self) -> ExecutionSettings:
        if self.desync_min_ms > self.desync_max_ms:
            raise ValueError(
                f"desync_min_ms ({self.desync_min_ms}) must not exceed desync_max_ms ({self.desync_max_ms})"
            )
        return self


class RegistrySettings(Strict):
    # Candles (per product) scored for the sixth asset; an asset with fewer than 3 in the window scores nothing.
    score_lookback_candles: Annotated[int, Field(ge=3, le=10_000)] = 48
    # The hash draws the sixth asset among this many best-scored candidates.
    score_top_k: Annotated[int, Field(ge=1, le=100)] = 3
    max_nonce: Annotated[int, Field(ge=1, le=10_000)] = 64
    claim_grace_s: Annotated[int, Field(ge=0, le=86_400)] = 300
    # What a strategy worker does with open positions when a new epoch's plan takes over:
    # keep them (managed under the new plan: stops, take profit and reversal still apply) or close them.
    on_rotation: Literal["keep", "close"] = "keep"


class StrategySettings(Strict):
    # A fill or order event of a profile for an intent its strategy worker never sent (a manual order) counts
    # only once the arbiter's approving decision for it is seen; with none, it is dead-lettered after this many
    # further steps of event time (docs/operations.md, "Forged order events"). The decision normally comes
    # first; the wait covers a delayed write (broker retry, arbiter fail-over).
    decision_wait_steps: Annotated[int, Field(ge=1, le=10_000)] = 6


class CommandSettings(Strict):
    # A signed command older than this (against the broker's append time) is refused as stale.
    max_age_s: Annotated[float, Field(gt=0.0, le=86_400.0, allow_inf_nan=False)] = 120.0


class StateSettings(Strict):
    # Durable state (docs/architecture.md, "Durable state"): each stateful service writes a signed snapshot of
    # its state and the input offsets it covers to its compacted state topic at most this often (and on a clean
    # stop), so a restart after any length of run resumes from it instead of re-reading inputs retention deleted.
    snapshots: bool = True
    snapshot_interval_s: Annotated[float, Field(gt=0.0, le=86_400.0, allow_inf_nan=False)] = 30.0
    # ... and at the latest after this many input messages, whatever the interval.
    snapshot_every_messages: Annotated[int, Field(ge=1, le=100_000_000)] = 200_000


# Candle intervals Coinbase serves (Advanced Trade REST granularities), in seconds.
INTERVAL_SECONDS: dict[str, int] = {
    "1m": 60,
    "5m": 300,
    "15m": 900,
    "30m": 1800,
    "1h": 3600,
    "2h": 7200,
    "6h": 21600,
    "1d": 86400,
}
Interval = Literal["1m", "5m", "15m", "30m", "1h", "2h", "6h", "1d"]


def _url_with_scheme(value: str, schemes: tuple[str, ...], key: str) -> str:
    m = re.match(r"^([a-z]+)://[^/\s]+", value)
    if not m or m.group(1) not in schemes:
        raise ValueError(f"{key} must be a {' or '.join(schemes)} URL with a host, got {value!r}")
    return value.rstrip("/")


class MarketDataSettings(Strict):
    """Where the market comes from (docs/ingest.md): Coinbase in real time, or a replay of candle files."""

    source: Literal["coinbase", "replay"] = "coinbase"
    interval: Interval = "1h"
    # Coinbase's public endpoints; a test peer or a proxy can stand in.
    rest_url: str = "https://api.coinbase.com"
    ws_url: str = "wss://advanced-trade-ws.coinbase.com"
    # Replay: the folder of candle files (`<source>_<BASE>-<QUOTE>_<interval>.csv[.gz]`).
    data_dir: Path = Path("data/market")
    # A bucket is final once the exchange's time passed its end by grace_s and REST answered for it; one still
    # missing deadline_s after its end raises an alert and its step goes out without it.
    grace_s: Annotated[float, Field(ge=0.0, le=3600.0, allow_inf_nan=False)] = 2.0
    deadline_s: Annotated[float, Field(gt=0.0, le=86_400.0, allow_inf_nan=False)] = 120.0
    # How often REST is asked again while a bucket is not final yet (exchange seconds).
    poll_interval_s: Annotated[float, Field(gt=0.0, le=3600.0, allow_inf_nan=False)] = 2.0
    # On a first start, this many closed buckets of history are published before the live ones (warm-up).
    history_steps: Annotated[int, Field(ge=0, le=10_000)] = 300
    # No websocket frame for this long (real seconds): the feed is stale; new entries stop until it is fresh.
    stale_after_s: Annotated[float, Field(gt=0.0, le=600.0, allow_inf_nan=False)] = 5.0
    # Public REST budget: Coinbase allows about 10 requests/s per IP; stay under it.
    max_requests_per_s: Annotated[float, Field(gt=0.0, le=100.0, allow_inf_nan=False)] = 8.0

    @field_validator("rest_url")
    @classmethod
    def _rest_url(cls, v: str) -> str:
        return _url_with_scheme(v, ("https", "http"), "system.market_data.rest_url")

    @field_validator("ws_url")
    @classmethod
    def _ws_url(cls, v: str) -> str:
        return _url_with_scheme(v, ("wss", "ws"), "system.market_data.ws_url")

    @property
    def interval_s(self) -> int:
        return INTERVAL_SECONDS[self.interval]

    @property
    def live(self) -> bool:
        """The market is the exchange's, in real time: services follow the exchange's clock."""
        return self.source == "coinbase"


class SystemSettings(Strict):
    mode: Literal["paper", "live"] = "paper"
    quote_asset: Asset = "USDC"
    market_data: MarketDataSettings = MarketDataSettings()
    kafka: KafkaSettings = KafkaSettings()
    arbiter: ArbiterSettings = ArbiterSettings()
    execution: ExecutionSettings = ExecutionSettings()
    registry: RegistrySettings = RegistrySettings()
    strategy: StrategySettings = StrategySettings()
    commands: CommandSettings = CommandSettings()
    state: StateSettings = StateSettings()


class AppConfig(Strict):
    system: SystemSettings = SystemSettings()
    profiles: dict[ProfileId, Profile] = Field(min_length=1, max_length=MAX_PROFILES)

    @model_validator(mode="after")
    def _cross_checks(self) -> AppConfig:
        quote = self.system.quote_asset
        for pid, p in self.profiles.items():
            p.check_pairs(pid, quote)
            creds = p.api_credentials
            if self.system.mode == "live" and p.enabled and creds.source == "yaml" and creds.is_placeholder():
                raise ValueError(
                    f"profiles.{pid}.api_credentials: placeholder credentials ('{PLACEHOLDER_PREFIX}...') "
                    "are refused in live mode; store real ones encrypted with `mpctl secrets set "
                    f"{pid}` and set `source: store`, or put them in config/coinbase_profiles_local.yaml"
                )
        if not any(p.enabled for p in self.profiles.values()):
            raise ValueError("no profile is enabled: set `enabled: true` on at least one")
        return self

    # ----------------------------------------------------------------------------- derived views
    def enabled_profiles(self) -> dict[str, Profile]:
        """Enabled profiles in decision order: priority (lower first), then profile id."""
        items = sorted(
            ((pid, p) for pid, p in self.profiles.items() if p.enabled),
            key=lambda kv: (kv[1].priority, kv[0]),
        )
        return dict(items)

    def product(self, asset: str) -> str:
        return f"{asset}/{self.system.quote_asset}"

    def all_products(self) -> list[str]:
        """Every product any enabled profile may trade (pairs, base assets and pool assets), sorted.

        A plan trades its base assets (without the quote) plus the random asset, so each of those needs data,
        whether or not it is listed in `trading_pairs`.
        """
        out: set[str] = set()
        quote = self.system.quote_asset
        for p in self.enabled_profiles().values():
            out.update(p.trading_pairs)
            sc = p.strategy_config
            out.update(self.product(a) for a in [*sc.base_assets, *sc.random_asset_pool] if a != quote)
        return sorted(out)

    def shared_hash_settings(self) -> list[tuple[str, str]]:
        """Pairs of enabled profiles with identical hash settings: a collision the registry resolves at run time."""
        seen: dict[tuple[str, float], str] = {}
        pairs: list[tuple[str, str]] = []
        for pid, p in self.enabled_profiles().items():
            key = p.profile_hash.settings_key()
            if key in seen:
                pairs.append((seen[key], pid))
            else:
                seen[key] = pid
        return pairs


# --------------------------------------------------------------------------------------------- loading
_CREDENTIAL_KEYS = frozenset({"api_credentials", *ApiCredentials.model_fields})


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt?)"
        bad = e.get("input")
        # Only a scalar of a known key is echoed: a mapping or list may hold credentials (e.g. `profiles:`
        # written as a list), and so may an unknown key (e.g. `api_key:` outside `api_credentials:`).
        scalar = bad is None or isinstance(bad, str | int | float | bool)
        # Credentials live under profiles (system.market_data.source is no secret, api_credentials.source may sit
        # beside one).
        secret_loc = (
            bool(e["loc"]) and e["loc"][0] == "profiles" and any(str(x) in _CREDENTIAL_KEYS for x in e["loc"])
        )
        hide = not scalar or e["type"] in ("missing", "extra_forbidden") or secret_loc
        shown = "" if hide else f" (got {bad!r})"
        lines.append(f"{loc or '<root>'}: {msg}{shown}")
    return "\n".join(lines)


def _yaml_error_text(err: yaml.YAMLError) -> str:
    """Where and what, without PyYAML's snippet of the offending line (which may hold a credential)."""
    if isinstance(err, yaml.reader.ReaderError):
        # A control character (a binary file that happens to decode): its position, not the character.
        return f"character {err.position + 1}: a control character, YAML is text (binary file?)"
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = err.problem or err.context or "syntax error"
        context = f" ({err.context})" if err.context and err.problem else ""
        return f"{where}{what}{context}"
    return type(err).__name__


def parse_config(data: Any, *, source: str = "<config>") -> AppConfig:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping with a `profiles:` key, got {type(data).__name__}"
        )
    try:
        return AppConfig.model_validate(data)
    except ValidationError as err:
        problems = _format_error(err)
        # One problem: one line naming the file and it. Several: the file, then one line per problem.
        if err.error_count() == 1:
            raise ConfigError(f"{source}: invalid configuration: {problems}") from None
        raise ConfigError(
            f"{source}: invalid configuration ({err.error_count()} problems)\n{problems}"
        ) from None


# The last file parsed, by path and content: a service loads its file more than once while it starts (checked,
# then used), and a forked host's workers (shared/forkhost.py) find the host's parse. Parsing a 32-profile file
# takes about 0.2 s of CPU, a 100-profile one about 0.6 s. AppConfig is frozen, so sharing the object is safe.
_last_parsed: tuple[str, bytes, AppConfig] | None = None


def load_config(path: str | Path | None = None) -> AppConfig:
    """Load a profiles file. Without a path, the local file is used when present, else the template. The file is
    read every time; it is parsed again only when its content changed since the last load of that path."""
    global _last_parsed
    p = Path(path) if path is not None else (LOCAL_CONFIG if LOCAL_CONFIG.exists() else DEFAULT_CONFIG)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read configuration: {err.strerror}") from None
    last = _last_parsed
    if last is not None and last[0] == str(p) and last[1] == raw:
        return last[2]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{p}: not a YAML text file: byte 0x{raw[err.start]:02x} at offset {err.start} is not UTF-8 "
            "(binary file?)"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {_yaml_error_text(err)}") from None
    except RecursionError:
        # PyYAML composes nested collections recursively: thousands of '[' exhaust the stack.
        raise ConfigError(f"{p}: not valid YAML: nested too deeply") from None
    cfg = parse_config(data, source=str(p))
    _last_parsed = (str(p), raw, cfg)
    return cfg


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def live_source_problem(
    cfg: AppConfig, *, source: str | None = None, exchange_url: str | None = None
) -> str | None:
    """Why this run must not start, or None: live orders priced from replayed candles would trade real money on
    years-old prices. A loopback exchange (a test peer) may take a replay's orders."""
    src = source or cfg.system.market_data.source
    if cfg.system.mode != "live" or src != "replay":
        return None
    if exchange_url is not None:
        from urllib.parse import urlparse

        if urlparse(exchange_url).hostname in LOOPBACK_HOSTS:
            return None
    return (
        "system.mode: live with market data source 'replay' is refused: live orders would be priced from recorded "
        "candles, not the market; use system.market_data.source: coinbase (or system.mode: paper to replay)"
    )


def config_warnings(cfg: AppConfig) -> list[str]:
    warnings = []
    for a, b in cfg.shared_hash_settings():
        warnings.append(
            f"profiles {a} and {b} share hash settings (base_hash, entropy_seed): a hash collision, "
            f"resolved at run time by bumping {b}'s nonce"
        )
    for pid, p in cfg.enabled_profiles().items():
        if not math.isclose(sum(p.strategy_config.strategy_weights.values()), 1.0, abs_tol=1e-9):
            warnings.append(f"profiles.{pid}.strategy_config.strategy_weights sum is only within 1e-6 of 1")
    return warnings
