"""The registry's pure core: how a profile's plan for one epoch is derived and resolved.

Nothing here touches Redis or Kafka. Every formula is written out in docs/registry.md so that a plan can be
reproduced by hand; DESIGN.md section 2 gives the meaning of each configuration key.

Overview, for one profile and one epoch:

1. ``epoch = floor(t / hash_rotation_interval)``; the epoch covers ``[epoch*interval, (epoch+1)*interval)``
   seconds of event time.
2. ``H = SHA-256("{base_hash}|{entropy_seed!r}|{epoch}|{nonce}")`` (hex), nonce starting at 0.
3. The first 8 bytes of H pick the strategy by the cumulative ``strategy_weights``.
4. The strategy's tunable parameters are drifted by hash-drawn fractions; structural ones are kept.
5. The pool assets are scored (entropy of recent log returns times log mean quote volume), ranked, and the
   hash picks the preferred one among the ``score_top_k`` best.
6. The fingerprint ``F = SHA-256(canonical JSON of strategy, quantised parameters, sorted assets)``.
7. The claims (hash, fingerprint, random asset) are tried in a fixed order; a hash or fingerprint already held
   by another profile bumps the nonce (a counted collision), a random asset already held moves to the next
   candidate asset.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any, Literal, cast

# The registry's errors live apart: mypyc compiles this module (scripts/native_modules.txt) and cannot compile a
# subclass of RuntimeError; the names stay importable from here.
# Compiled by mypyc (scripts/build_native.py): its classes must still pickle as plain ones do (state snapshots
# restore them without __init__), which mypyc's generated __init__ honours only with interpreted subclasses
# allowed too.
from mypy_extensions import mypyc_attr

from services.registry.errors import ClaimsLostError as ClaimsLostError
from services.registry.errors import NonceExhaustedError as NonceExhaustedError
from shared.config import STRATEGY_NAMES, Profile, RegistrySettings, StrategyName
from shared.messages import PlanPublished
from shared.native import reduce_frozen
from shared.strategy_catalog import CATALOG

__all__ = [
    "ENTROPY_BINS",
    "ClaimOutcome",
    "ClaimResult",
    "ClaimsLostError",
    "Conflict",
    "Decision",
    "Held",
    "Holding",
    "KeyKind",
    "NonceExhaustedError",
    "PlanCandidate",
    "ResolvedPlan",
    "TakeoverOutcome",
    "candidate_assets",
    "choose_strategy",
    "derive_candidate",
    "drift_parameters",
    "epoch_bounds",
    "epoch_of",
    "fingerprint",
    "hash_fraction",
    "products_of",
    "profile_hash",
    "quantise",
    "rank_candidates",
    "resolve_plan",
    "resolve_plan_async",
    "score_asset",
    "strategy_fraction",
]

ENTROPY_BINS = 10
_TWO_64 = 2**64
_BELOW_ONE = math.nextafter(1.0, 0.0)


# ------------------------------------------------------------------------------------------ epochs
def epoch_of(t_s: int, interval_s: int) -> int:
    """The epoch containing event time ``t_s`` (Unix seconds): ``floor(t_s / interval_s)``."""
    if interval_s <= 0:
        raise ValueError(f"epoch interval must be positive, got {interval_s!r}")
    return t_s // interval_s


def epoch_bounds(epoch: int, interval_s: int) -> tuple[int, int]:
    """``(start_s, end_s)`` of an epoch: the half-open interval ``[epoch*interval, (epoch+1)*interval)``."""
    if interval_s <= 0:
        raise ValueError(f"epoch interval must be positive, got {interval_s!r}")
    return epoch * interval_s, (epoch + 1) * interval_s


# ------------------------------------------------------------------------------------------ hashing
def profile_hash(base_hash: str, entropy_seed: float, epoch: int, nonce: int, rotation: int = 0) -> str:
    """H: lower-case hex SHA-256 of the UTF-8 bytes of ``f"{base_hash}|{entropy_seed!r}|{epoch}|{nonce}"``,
    and for the k-th early rotation inside the epoch (k >= 1, an operator's ``rotate``) of
    ``f"{base_hash}|{entropy_seed!r}|{epoch}|{nonce}|r{k}"`` (the scheduled plan's text is unchanged).

    ``entropy_seed`` is written with Python's ``repr`` of the float (the shortest decimal string that reads
    back to the same double, identical on every machine): 0.42 -> ``0.42``, 1 -> ``1.0``, 1e-7 -> ``1e-07``.
    Example: ``profile_a_primary_trading|0.42|475000|0``.
    """
    if rotation < 0:
        raise ValueError(f"rotation must be >= 0, got {rotation!r}")
    text = f"{base_hash}|{float(entropy_seed)!r}|{int(epoch)}|{int(nonce)}"
    if rotation:
        text += f"|r{int(rotation)}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fraction_of(first8: bytes) -> float:
    """``int.from_bytes(first8, "big") / 2**64`` (correctly rounded); a value that rounds to 1.0 is clamped
    to the largest double below 1, so the result is always in [0, 1)."""
    u = int.from_bytes(first8, "big") / _TWO_64
    return u if u < 1.0 else _BELOW_ONE


def _hash_bytes(h_hex: str) -> bytes:
    raw = bytes.fromhex(h_hex)
    if len(raw) != 32:
        raise ValueError(f"a profile hash is 64 hex digits, got {h_hex!r}")
    return raw


def strategy_fraction(h_hex: str) -> float:
    """u in [0, 1) used for the strategy choice: the first 8 bytes of H itself, big-endian, / 2**64."""
    return _fraction_of(_hash_bytes(h_hex)[:8])


def hash_fraction(h_hex: str, label: str) -> float:
    """u in [0, 1) for one labelled draw: first 8 bytes (big-endian) / 2**64 of
    ``SHA-256(h_hex.encode("ascii") + b"|" + label.encode("utf-8"))``.

    Labels in use: ``drift:<param>``, ``sign:<param>``, ``asset``.
    """
    _hash_bytes(h_hex)  # validates
    digest = hashlib.sha256(h_hex.encode("ascii") + b"|" + label.encode("utf-8")).digest()
    return _fraction_of(digest[:8])


# ------------------------------------------------------------------------------------------ strategy
def choose_strategy(h_hex: str, weights: Mapping[StrategyName, float] | Mapping[str, float]) -> str:
    """The strategy whose cumulative-weight interval contains ``u = strategy_fraction(H)``.

    Strategies are walked in catalog order (``STRATEGY_NAMES``); zero or missing weights are skipped. The
    first strategy with ``u < cumulative`` wins; when the weights sum to slightly less than 1 and u falls
    beyond the sum, the last strategy with a positive weight wins.
    """
    weights = cast(Mapping[str, float], weights)
    unknown = sorted(set(weights) - set(STRATEGY_NAMES))
    if unknown:
        raise ValueError(
            f"unknown strategies in strategy_weights: {unknown!r}; known: {list(STRATEGY_NAMES)!r}"
        )
    u = strategy_fraction(h_hex)
    cumulative = 0.0
    last: str | None = None
    for name in STRATEGY_NAMES:
        w = float(weights.get(name, 0.0))
        if not w > 0.0:
            continue
        cumulative += w
        last = name
        if u < cumulative:
            return name
    if last is None:
        raise ValueError("strategy_weights gives no strategy a positive weight")
    return last


def drift_parameters(
    h_hex: str, strategy: str, drift_range: tuple[float, float], complexity: float
) -> dict[str, float]:
    """The strategy's parameters for this hash: structural ones unchanged (as floats), each tunable one
    ``p * (1 + s*c*d)`` with ``d = lo + (hi - lo) * hash_fraction(H, "drift:<name>")``,
    ``s = +1 if hash_fraction(H, "sign:<name>") < 0.5 else -1`` and ``c = complexity``.

    Keys come structural first, then tunable, each in catalog order.
    """
    spec = CATALOG.get(strategy)
    if spec is None:
        raise ValueError(f"unknown strategy {strategy!r}; known: {list(CATALOG)!r}")
    lo, hi = float(drift_range[0]), float(drift_range[1])
    if lo > hi:
        raise ValueError(f"drift_delta_range must be [low, high] with low <= high, got {[lo, hi]!r}")
    c = float(complexity)
    out: dict[str, float] = {name: float(v) for name, v in spec.structural.items()}
    for name, p in spec.tunable.items():
        d = lo + (hi - lo) * hash_fraction(h_hex, f"drift:{name}")
        s = 1.0 if hash_fraction(h_hex, f"sign:{name}") < 0.5 else -1.0
        out[name] = float(p) * (1.0 + s * c * d)
    return out


# ------------------------------------------------------------------------------------------ asset scoring
def _bin_index(x: float, lo: float, hi: float, bins: int) -> int:
    """numpy.histogram's bin for x in [lo, hi] with ``bins`` equal-width bins (edges ``lo + i*(hi-lo)/bins``,
    the last edge exactly ``hi``; bins are half-open except the last, which includes ``hi``)."""
    step = (hi - lo) / bins

    def edge(i: int) -> float:
        return hi if i == bins else i * step + lo

    i = int((x - lo) * (bins / (hi - lo)))
    i = min(max(i, 0), bins - 1)
    if x < edge(i):
        i -= 1
    elif i != bins - 1 and x >= edge(i + 1):
        i += 1
    return i


def _bin_counts(xs: Sequence[float], lo: float, hi: float, bins: int) -> list[int]:
    """How many of xs fall in each bin: ``_bin_index`` for each, with the edges and the scale computed once
    (the same arithmetic, so the same bins; it runs for every asset at every epoch start)."""
    step = (hi - lo) / bins
    edges = [i * step + lo for i in range(bins)] + [hi]
    scale = bins / (hi - lo)
    last = bins - 1
    counts = [0] * bins
    for x in xs:
        i = int((x - lo) * scale)
        i = 0 if i < 0 else last if i > last else i
        if x < edges[i]:
            i -= 1
        elif i != last and x >= edges[i + 1]:
            i += 1
        counts[i] += 1
    return counts


def score_asset(closes: Sequence[float], volumes: Sequence[float]) -> float | None:
    """How worth trading a product looked over the given candles (the caller passes the last
    ``score_lookback_candles``), or None when it cannot be scored.

    None when there are fewer than 3 candles or any close is not positive and finite (or any volume negative
    or not finite). Otherwise, with ``r_i = ln(close_i) - ln(close_{i-1})``:

    - E = Shannon entropy of the histogram of r in 10 equal-width bins between min(r) and max(r)
      (numpy.histogram's bins), divided by ln(10), so E is in [0, 1]; all returns equal -> E = 0;
    - score = E * ln(1 + mean(close_i * volume_i)) (mean quote volume per candle).

    Why: a product whose returns are spread out (no single regime dominates) and that really trades (quote
    turnover) is worth giving a profile; a flat or illiquid product scores near zero.
    """
    if len(closes) != len(volumes):
        raise ValueError(f"closes and volumes differ in length ({len(closes)} != {len(volumes)})")
    n = len(closes)
    if n < 3:
        return None
    cs = [float(c) for c in closes]
    vs = [float(v) for v in volumes]
    if any(not (math.isfinite(c) and c > 0.0) for c in cs) or any(
        not (math.isfinite(v) and v >= 0.0) for v in vs
    ):
        return None
    logs = [math.log(c) for c in cs]
    returns = [logs[i] - logs[i - 1] for i in range(1, n)]
    lo, hi = min(returns), max(returns)
    entropy = 0.0
    if hi > lo:
        counts = _bin_counts(returns, lo, hi, ENTROPY_BINS)
        total = len(returns)
        for k in counts:
            if k:
                p = k / total
                entropy -= p * math.log(p)
        entropy /= math.log(ENTROPY_BINS)
    mean_quote_volume = math.fsum(c * v for c, v in zip(cs, vs, strict=True)) / n
    return entropy * math.log1p(mean_quote_volume)


def rank_candidates(scores: Mapping[str, float | None], top_k: int, h_hex: str) -> list[str]:
    """Scored assets in the order they are tried as the random asset.

    Unscored (None or NaN) assets are dropped; the rest are sorted by (-score, asset). The best
    ``k = min(top_k, n)`` are rotated so that index ``floor(hash_fraction(H, "asset") * k)`` comes first (the
    hash picks the preferred one among the best, the others follow in order, wrapping round); the remaining
    assets follow in score order, so there is always a deterministic next candidate.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k!r}")
    scored = [(float(s), a) for a, s in scores.items() if s is not None and not math.isnan(float(s))]
    ranked = [a for _, a in sorted(scored, key=lambda sa: (-sa[0], sa[1]))]
    k = min(top_k, len(ranked))
    if k == 0:
        return []
    i = min(math.floor(hash_fraction(h_hex, "asset") * k), k - 1)
    top = ranked[:k]
    return top[i:] + top[:i] + ranked[k:]


# ------------------------------------------------------------------------------------------ fingerprint
def quantise(x: float) -> float:
    """x rounded to 4 significant digits: ``float(format(x, ".3e"))`` (round half to even on the exact
    binary value); -0.0 becomes 0.0."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"cannot quantise a non-finite parameter value {x!r}")
    q = float(format(x, ".3e"))
    return 0.0 if q == 0.0 else q


def canonical_json(strategy: str, params: Mapping[str, float], assets: Sequence[str]) -> str:
    """The fingerprinted text: JSON with sorted keys and no spaces, floats in Python's shortest repr."""
    body = {
        "assets": sorted(assets),
        "parameters": {k: quantise(v) for k, v in params.items()},
        "strategy": strategy,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def fingerprint(strategy: str, params: Mapping[str, float], assets: Sequence[str]) -> str:
    """F: lower-case hex SHA-256 of the UTF-8 bytes of ``canonical_json(strategy, params, assets)``."""
    return hashlib.sha256(canonical_json(strategy, params, assets).encode("utf-8")).hexdigest()


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class _Fingerprints:
    """``fingerprint(strategy, params, assets)`` for the asset sets one candidate tries in turn, with the
    parameters quantised and encoded once. The text is canonical_json's: its keys, sorted, are assets,
    parameters, strategy, so it is the concatenation of their encodings (tests/unit/test_registry_domain.py)."""

    def __init__(self, strategy: str, params: Mapping[str, float]) -> None:
        quantised = {k: quantise(v) for k, v in params.items()}
        self._tail = f',"parameters":{_canonical(quantised)},"strategy":{_canonical(strategy)}}}'

    def __call__(self, assets: Sequence[str]) -> str:
        text = f'{{"assets":{_canonical_strings(sorted(assets))}{self._tail}'
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _canonical_strings(items: list[str]) -> str:
    """`_canonical(items)` for a list of strings (asset names): the JSON encoder writes such a list as its items,
    each through `encode_basestring_ascii` (what `ensure_ascii` selects), joined by the "," separator, in
    brackets; written out here without the encoder's set-up (json.dumps was a third of a plan's fingerprints).
    tests/unit/test_less_work.py compares the two on any strings."""
    return "[" + ",".join([encode_basestring_ascii(x) for x in items]) + "]"


# ------------------------------------------------------------------------------------------ candidates
@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class PlanCandidate:
    """One derivation (profile, epoch, nonce) before any claim."""

    profile: str
    epoch: int
    epoch_start_s: int
    epoch_end_s: int
    hash: str
    nonce: int
    strategy: str
    parameters: dict[str, float] = field(hash=False)
    blend_weight: float
    base_assets: tuple[str, ...]  # traded base assets: the profile's base_assets without the quote asset
    asset_candidates: tuple[str, ...]  # random-asset candidates in the order they are tried
    rotation: int = 0  # k-th early rotation inside the epoch (0: the scheduled plan)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


def derive_candidate(
    profile_id: str,
    profile: Profile,
    epoch: int,
    nonce: int,
    scores: Mapping[str, float | None],
    settings: RegistrySettings,
    quote_asset: str,
    *,
    rotation: int = 0,
    start_s: int | None = None,
) -> PlanCandidate:
    """Derive the plan candidate of one profile for one epoch and nonce.

    ``rotation`` k >= 1 with ``start_s`` (the rotation step, inside the epoch): the k-th early rotation, whose
    interval is ``[start_s, epoch end)``; its hash has the ``|r{k}`` suffix (``profile_hash``).

    ``scores`` maps asset (e.g. ``"ADA"``, not the product) to ``score_asset(...)``; only the profile's
    ``random_asset_pool`` minus its base assets and the quote asset are candidates, and a pool asset missing
    from ``scores`` counts as unscored.
    """
    ph = profile.profile_hash
    sc = profile.strategy_config
    epoch_start_s, end_s = epoch_bounds(epoch, ph.hash_rotation_interval)
    if start_s is None:
        start_s = epoch_start_s
    elif not epoch_start_s <= start_s < end_s:
        raise ValueError(f"rotation start {start_s} is outside epoch {epoch} [{epoch_start_s}, {end_s})")
    h = profile_hash(ph.base_hash, ph.entropy_seed, epoch, nonce, rotation)
    strategy = choose_strategy(h, sc.strategy_weights)
    params = drift_parameters(h, strategy, sc.drift_delta_range, ph.hash_complexity_factor)
    base = tuple(a for a in dict.fromkeys(sc.base_assets) if a != quote_asset)
    excluded = set(base) | {quote_asset}
    pool_scores = {a: scores.get(a) for a in sc.random_asset_pool if a not in excluded}
    candidates = tuple(rank_candidates(pool_scores, settings.score_top_k, h))
    return PlanCandidate(
        profile=profile_id,
        epoch=epoch,
        epoch_start_s=start_s,
        epoch_end_s=end_s,
        hash=h,
        nonce=nonce,
        strategy=strategy,
        parameters=params,
        blend_weight=float(sc.hash_trajectory_weight),
        base_assets=base,
        asset_candidates=candidates,
        rotation=rotation,
    )


def candidate_assets(candidate: PlanCandidate, random_asset: str | None) -> list[str]:
    """The traded asset set: base assets (without the quote) plus the random asset when there is one."""
    out = list(candidate.base_assets)
    if random_asset is not None and random_asset not in out:
        out.append(random_asset)
    return out


def products_of(assets: Sequence[str], quote_asset: str) -> list[str]:
    """``BASE/QUOTE`` product of each asset, in the given order."""
    return [f"{a}/{quote_asset}" for a in assets]


# ------------------------------------------------------------------------------------------ claims
class ClaimOutcome(enum.Enum):
    """What a claim attempt answered. The names are what the Redis script returns."""

    OK = "OK"
    HASH_TAKEN = "HASH_TAKEN"
    FP_TAKEN = "FP_TAKEN"
    ASSET_TAKEN = "ASSET_TAKEN"


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class ClaimResult:
    """A claim's outcome and, when taken, which profile holds the key over which interval."""

    outcome: ClaimOutcome
    holder: str | None = None
    holder_start_s: int | None = None
    holder_end_s: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is ClaimOutcome.OK

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class Conflict:
    """One refused claim during resolution (for logs, audit and metrics)."""

    nonce: int
    outcome: ClaimOutcome
    holder: str | None
    asset: str | None
    fingerprint: str

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class ResolvedPlan:
    """A claimed plan: everything PlanPublished needs (times are Unix seconds of event time)."""

    profile: str
    epoch: int
    epoch_start_s: int
    epoch_end_s: int
    hash: str
    nonce: int
    strategy: str
    parameters: dict[str, float] = field(hash=False)
    blend_weight: float
    assets: tuple[str, ...]
    random_asset: str | None
    products: tuple[str, ...]
    fingerprint: str
    collisions: int  # nonce bumps (hash or fingerprint held by another profile); always equals nonce
    asset_candidates: tuple[str, ...]  # of the final nonce, in the order they were tried
    asset_shared: bool  # every candidate was held: the first one is shared (not claimed)
    rotation: int = 0
    # diagnostic only (not compared): which claims were refused on the way, in order. Replicas racing for the
    # same profile agree on the plan but may see different holders on the way.
    conflicts: tuple[Conflict, ...] = field(default=(), compare=False)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


# ------------------------------------------------------------------------------------------ the store's types
# What the claims and decision records hold, whichever store keeps them (Redis: claims.py and ledger.py; memory:
# memory.py); the store's interface is services/registry/ports.py.

KeyKind = Literal["hash", "fp", "asset"]
TakeoverOutcome = Literal["OK", "PUBLISHED", "GONE", "WAIT"]


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class Holding:
    """One claim member: ``profile`` holds the key over ``[start_s, end_s)`` of event time."""

    profile: str
    start_s: int
    end_s: int

    @staticmethod
    def parse(member: str) -> Holding:
        profile, start, end = member.rsplit("|", 2)
        return Holding(profile, int(start), int(end))

    def sort_key(self) -> tuple[int, int, str]:
        return (self.start_s, self.end_s, self.profile)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class Decision:
    """The recorded plan of one (profile, epoch). ``won``: this call created the record."""

    plan: PlanPublished
    owner: str
    published: bool
    asset_claimed: bool | None
    won: bool = False

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class Held:
    """A profile's current plan as this process knows it (for recoveries)."""

    plan: PlanPublished
    owner: str
    asset_claimed: bool | None  # None: unknown (read back from the topic)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
@dataclass(frozen=True)
class _ClaimRequest:
    candidate: PlanCandidate
    fingerprint: str
    asset: str | None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Compiled, unpickling would assign the frozen fields through setattr: see shared/native.py.
        return reduce_frozen(self)


def _as_result(outcome: ClaimOutcome | ClaimResult) -> ClaimResult:
    return outcome if isinstance(outcome, ClaimResult) else ClaimResult(outcome)


def _resolution(
    profile_id: str,
    profile: Profile,
    epoch: int,
    scores: Mapping[str, float | None],
    settings: RegistrySettings,
    quote_asset: str,
    rotation: int = 0,
    start_s: int | None = None,
) -> Generator[_ClaimRequest, ClaimResult, ResolvedPlan]:
    """The resolution loop without I/O: yields claim requests, receives their results."""
    collisions = 0
    conflicts: list[Conflict] = []

    def done(c: PlanCandidate, fp: str, asset: str | None, shared: bool) -> ResolvedPlan:
        assets = candidate_assets(c, asset)
        return ResolvedPlan(
            profile=profile_id,
            epoch=epoch,
            epoch_start_s=c.epoch_start_s,
            epoch_end_s=c.epoch_end_s,
            hash=c.hash,
            nonce=c.nonce,
            strategy=c.strategy,
            parameters=dict(c.parameters),
            blend_weight=c.blend_weight,
            assets=tuple(assets),
            random_asset=asset,
            products=tuple(products_of(assets, quote_asset)),
            fingerprint=fp,
            collisions=collisions,
            asset_candidates=c.asset_candidates,
            asset_shared=shared,
            rotation=rotation,
            conflicts=tuple(conflicts),
        )

    for nonce in range(settings.max_nonce + 1):
        c = derive_candidate(
            profile_id,
            profile,
            epoch,
            nonce,
            scores,
            settings,
            quote_asset,
            rotation=rotation,
            start_s=start_s,
        )
        collided = False
        fingerprint_of = _Fingerprints(c.strategy, c.parameters)
        for asset in c.asset_candidates:
            fp = fingerprint_of(candidate_assets(c, asset))
            res = yield _ClaimRequest(c, fp, asset)
            if res.outcome is ClaimOutcome.OK:
                return done(c, fp, asset, shared=False)
            conflicts.append(Conflict(nonce, res.outcome, res.holder, asset, fp))
            if res.outcome is ClaimOutcome.ASSET_TAKEN:
                continue
            collided = True
            break
        if collided:
            collisions += 1
            continue
        # No candidate at all (no data) -> no random asset; every candidate held -> the first one, shared.
        shared_asset = c.asset_candidates[0] if c.asset_candidates else None
        fp = fingerprint_of(candidate_assets(c, shared_asset))
        res = yield _ClaimRequest(c, fp, None)
        if res.outcome is ClaimOutcome.OK:
            return done(c, fp, shared_asset, shared=shared_asset is not None)
        if res.outcome is ClaimOutcome.ASSET_TAKEN:
            raise ValueError(
                f"registry: claim of profile {profile_id!r} epoch {epoch} without an asset answered ASSET_TAKEN"
            )
        conflicts.append(Conflict(nonce, res.outcome, res.holder, shared_asset, fp))
        collisions += 1

    last = conflicts[-1] if conflicts else None
    detail = f"; last refusal: {last.outcome.name} held by {last.holder!r}" if last else ""
    raise NonceExhaustedError(
        f"registry: profile {profile_id!r} epoch {epoch}: no unique plan within nonces 0..{settings.max_nonce} "
        f"({collisions} collisions{detail}). Another profile holds every hash/fingerprint tried: give this "
        "profile different profile_hash settings or strategy_weights, or raise system.registry.max_nonce"
    )


def resolve_plan(
    profile_id: str,
    profile: Profile,
    epoch: int,
    scores: Mapping[str, float | None],
    settings: RegistrySettings,
    quote_asset: str,
    try_claim: Callable[[PlanCandidate, str, str | None], ClaimOutcome | ClaimResult],
    *,
    rotation: int = 0,
    start_s: int | None = None,
) -> ResolvedPlan:
    """Resolve the profile's plan for an epoch, claiming through ``try_claim(candidate, fingerprint, asset)``.

    For nonce = 0..max_nonce: derive the candidate; for each asset candidate in order, claim (hash,
    fingerprint of the asset set with that asset, asset): OK -> done; HASH_TAKEN or FP_TAKEN -> a collision,
    next nonce; ASSET_TAKEN -> next asset candidate. When every candidate asset is held, claim hash and
    fingerprint only (asset None), sharing the first candidate (``asset_shared=True``); with no candidate at
    all, the plan has no random asset. Beyond max_nonce: NonceExhaustedError naming profile and epoch.
    ``rotation``/``start_s``: an early rotation (``derive_candidate``), claimed over ``[start_s, epoch end)``.
    """
    gen = _resolution(profile_id, profile, epoch, scores, settings, quote_asset, rotation, start_s)
    try:
        req = next(gen)
        while True:
            req = gen.send(_as_result(try_claim(req.candidate, req.fingerprint, req.asset)))
    except StopIteration as stop:
        result: ResolvedPlan = stop.value
        return result


async def resolve_plan_async(
    profile_id: str,
    profile: Profile,
    epoch: int,
    scores: Mapping[str, float | None],
    settings: RegistrySettings,
    quote_asset: str,
    try_claim: Callable[[PlanCandidate, str, str | None], Awaitable[ClaimOutcome | ClaimResult]],
    *,
    rotation: int = 0,
    start_s: int | None = None,
) -> ResolvedPlan:
    """``resolve_plan`` with an awaitable ``try_claim`` (e.g. ``RedisClaims.claim``); same order, same result."""
    gen = _resolution(profile_id, profile, epoch, scores, settings, quote_asset, rotation, start_s)
    try:
        req = next(gen)
        while True:
            req = gen.send(_as_result(await try_claim(req.candidate, req.fingerprint, req.asset)))
    except StopIteration as stop:
        result: ResolvedPlan = stop.value
        return result
