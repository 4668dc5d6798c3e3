"""`mpctl live check`: the pre-flight of a `system.mode: live` config, run by `mpctl run --live` before it starts
anything. For every enabled profile (or the `--profile` ones) it checks, against the exchange:

- clock: the local clock is within `--max-clock-skew` seconds (default 5) of the exchange's;
- key: the key authenticates;
- permissions: the key may view and trade, and may NOT transfer or withdraw (a trading key must not move funds);
- account: no two profiles use the same key or the same portfolio (they would not be independent);
- products: every product the profile may trade is online (not cancel-only, post-only, limit-only, disabled);
- balance: the free quote balance covers the largest entry the strategy may open and each product's minimum order.

It places nothing and prints no secret (a key shows as its last characters). Exit 0 only when every check passes,
1 when one fails, 2 when the check cannot run (bad config, unreadable credentials store).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_UP, Decimal
from typing import Any, Literal

from mpctl.commands_exchange import _num, add_access_args, explain, load_store
from services.execution.ccxt_adapter import CcxtExchange, open_exchange, profile_products
from services.execution.credentials import (
    CredentialsError,
    CredentialStore,
    ResolvedCredentials,
    key_format_problems,
    resolve_credentials,
)
from services.execution.errors import ExecutionError
from services.execution.ports import Balance, MarketInfo
from shared.config import AppConfig, ConfigError, Profile, load_config

# Coinbase accepts an Exchange API signature up to 30 s old, but order and fill times, the candle the strategy
# acts on and the conflict window are compared across machines: a few seconds is the most we accept.
DEFAULT_MAX_SKEW_S = 5.0

Status = Literal["ok", "warn", "FAIL"]
API_NAMES = {"coinbase": "Advanced Trade", "coinbaseexchange": "Exchange API"}
BALANCE_RULE = (
    "the free {quote} must cover the largest entry, equity x max_position_size_pct / 100 / "
    "risk_adjustment_factor (the strategy's size at full confidence; equity = the {quote} balance, plus the traded "
    "holdings at the exchange's listed price only with risk_management.sell_untracked: holdings the system did "
    "not trade are not its equity), and the largest minimum order of the profile's products"
)


def register(sub: Any) -> None:
    p = sub.add_parser("live", help="live trading: the pre-flight check (places nothing)")
    ss = p.add_subparsers(dest="live_command", required=True)
    c = ss.add_parser(
        "check",
        help="pre-flight of a system.mode: live config: keys, permissions, accounts, products, balances, clock",
    )
    add_access_args(c)
    c.add_argument(
        "--profile",
        action="append",
        default=None,
        metavar="P",
        help="check only this enabled profile (repeatable; default: every enabled profile)",
    )
    c.add_argument(
        "--max-clock-skew",
        type=float,
        default=DEFAULT_MAX_SKEW_S,
        metavar="S",
        help=f"largest accepted difference between the local and the exchange's clock (default {DEFAULT_MAX_SKEW_S:g} s)",
    )
    c.set_defaults(handler=run_live_check)


# ------------------------------------------------------------------------------------------ results
@dataclass
class Row:
    check: str
    status: Status
    detail: str
    fix: str = ""  # what to do about a failure or warning


@dataclass
class ProfileCheck:
    """One profile's pre-flight: what it trades with (never a secret) and each check's outcome."""

    profile: str
    exchange: str = ""
    key: str = "-"  # the key's last characters: enough to recognise it, useless to anyone else
    source: str = ""
    portfolio: str | None = None
    products: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    rule: str = ""
    key_value: str = field(default="", repr=False)  # compared across profiles, never printed

    def add(self, check: str, status: Status, detail: str, fix: str = "") -> None:
        self.rows.append(Row(check, status, detail, fix))

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]


@dataclass
class Preflight:
    checks: list[ProfileCheck]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not any(c.failures for c in self.checks)


def key_label(api_key: str) -> str:
    """A key as printed: its last 6 characters (a CDP key name's last segment, an Exchange API key)."""
    tail = api_key.rsplit("/", 1)[-1]
    return f"...{tail[-6:]}" if len(tail) > 6 else "..."


# ------------------------------------------------------------------------------------------ one profile
async def check_profile(
    pid: str,
    profile: Profile,
    creds: ResolvedCredentials,
    *,
    quote: str,
    api_base: str | None,
    timeout_s: float,
    max_skew_s: float,
) -> ProfileCheck:
    pc = ProfileCheck(
        pid,
        exchange=creds.exchange,
        key=key_label(creds.api_key.get_secret_value()),
        source=creds.source,
        products=profile_products(profile, quote),
        key_value=creds.api_key.get_secret_value(),
    )
    problems = key_format_problems(creds.exchange, creds)
    if problems:
        pc.add(
            "key",
            "FAIL",
            "; ".join(problems),
            f"store the key again as Coinbase gave it: `mpctl secrets set {pid}`",
        )
        return pc
    port: CcxtExchange | None = None
    skew: float | None = None
    try:
        # Markets last: on Advanced Trade their loading makes a signed call, and the clock is read first.
        port = await open_exchange(
            creds,
            retry_attempts=1,
            products=pc.products,
            api_base=api_base,
            timeout_s=timeout_s,
            base_delay_s=0.2,
            load=False,
        )
        skew = (datetime.now(UTC) - await port.server_time()).total_seconds()
        if abs(skew) > max_skew_s:
            pc.add(
                "clock",
                "FAIL",
                f"the local clock is {skew:+.1f} s off the exchange's (limit {max_skew_s:g} s)",
                "synchronise the clock (NTP: `timedatectl set-ntp true`, or chrony), then check again",
            )
        else:
            pc.add("clock", "ok", f"{skew:+.1f} s off the exchange's (limit {max_skew_s:g} s)")
        perms = await port.key_permissions()
        pc.add("key", "ok", f"authenticated ({API_NAMES.get(creds.exchange, creds.exchange)})")
        pc.portfolio = perms.portfolio
        if perms.note:
            pc.add(
                "permissions",
                "warn",
                "not reported by the Exchange API",
                "check in Coinbase Exchange (Settings > API) that the key has View and Trade and NOT Transfer",
            )
        else:
            yes = {True: "yes", False: "no", None: "unknown"}
            detail = f"view {yes[perms.can_view]}, trade {yes[perms.can_trade]}, transfer {yes[perms.can_transfer]}"
            if perms.can_transfer is not False:
                pc.add(
                    "permissions",
                    "FAIL",
                    f"{detail}: the key can move funds (transfers, withdrawals)"
                    if perms.can_transfer
                    else f"{detail}: the exchange did not say whether the key can move funds",
                    "a trading key must not be able to move funds: create a key with View and Trade only, "
                    f"store it with `mpctl secrets set {pid}`, and delete this one at Coinbase",
                )
            elif not (perms.can_view and perms.can_trade):
                pc.add(
                    "permissions",
                    "FAIL",
                    f"{detail}: the key cannot {'trade' if not perms.can_trade else 'view'}",
                    "create a key with View and Trade on this profile's portfolio and store it with "
                    f"`mpctl secrets set {pid}`",
                )
            else:
                pc.add("permissions", "ok", detail)
        balances = await port.balances()
        markets = await port.load_markets(pc.products)
    except ExecutionError as err:
        # A refused signature or timestamp is the key's (or the clock's) problem; anything else the exchange's.
        key_kinds = ("authentication", "permission", "clock_skew")
        pc.add("key" if err.kind in key_kinds else "exchange", "FAIL", err.reason)
        pc.rows[-1].fix = explain(err, skew)
        return pc
    finally:
        if port is not None:
            await port.close()
    _check_products(pc, markets)
    _check_balance(pc, profile, balances, markets, quote)
    return pc


def _check_products(pc: ProfileCheck, markets: dict[str, MarketInfo]) -> None:
    missing = [p for p in pc.products if p not in markets]
    closed = [(p, markets[p].status) for p in pc.products if p in markets and markets[p].status != "online"]
    for prod in missing:
        pc.add(
            "products",
            "FAIL",
            f"{prod} is not listed for this account",
            "remove it from the profile's trading_pairs, base_assets and random_asset_pool",
        )
    for prod, status in closed:
        pc.add(
            "products",
            "FAIL",
            f"{prod} is {status} at the exchange, not online",
            f"wait until Coinbase has {prod} online again, or remove it from the profile's trading_pairs, "
            "base_assets and random_asset_pool",
        )
    if not missing and not closed:
        pc.add("products", "ok", f"{len(pc.products)} online: {', '.join(pc.products)}")


def _money(d: Decimal) -> str:
    return _num(d.quantize(Decimal("0.01"), rounding=ROUND_UP)) if d >= 1 else _num(d)


def _check_balance(
    pc: ProfileCheck,
    profile: Profile,
    balances: dict[str, Balance],
    markets: dict[str, MarketInfo],
    quote: str,
) -> None:
    pc.rule = BALANCE_RULE.format(quote=quote)
    qb = balances.get(quote)
    free = qb.free if qb is not None else Decimal(0)
    equity = qb.total if qb is not None else Decimal(0)
    unpriced: list[str] = []
    for asset, b in balances.items():
        m = markets.get(f"{asset}/{quote}")
        if asset == quote or m is None or b.total == 0 or not profile.risk_management.sell_untracked:
            continue  # the strategy's equity leaves holdings it did not trade out (services/strategy/domain.py)
        if m.price is None:
            unpriced.append(asset)
        else:
            equity += b.total * m.price
    sc = profile.strategy_config
    entry = equity * Decimal(str(sc.max_position_size_pct)) / 100 / Decimal(str(sc.risk_adjustment_factor))
    # The smallest order each product takes, in quote: its minimum notional, or its minimum size at its price.
    minimums = {
        p: max(
            m.min_notional or Decimal(0),
            m.min_size * m.price if m.min_size is not None and m.price is not None else Decimal(0),
        )
        for p, m in markets.items()
    }
    min_product = max(minimums, key=lambda p: minimums[p], default=None)
    min_order = minimums[min_product] if min_product is not None else Decimal(0)
    need = max(entry, min_order)
    why = (
        f"largest entry {_money(entry)} = equity {_money(equity)} x {sc.max_position_size_pct:g}% / "
        f"{sc.risk_adjustment_factor:g}"
    )
    if min_product is not None:
        why += f"; largest minimum order {_money(min_order)} ({min_product})"
    if unpriced:
        why += f"; {', '.join(sorted(unpriced))} not counted (no price listed)"
    if free >= need and free > 0:
        pc.add("balance", "ok", f"{quote} free {_money(free)} >= {_money(need)} needed: {why}")
    else:
        pc.add(
            "balance",
            "FAIL",
            f"{quote} free {_money(free)} < {_money(need)} needed: {why}",
            f"add at least {_money(need - free)} {quote} to this profile's portfolio (or free it from open "
            "orders), or lower strategy_config.max_position_size_pct",
        )


# ------------------------------------------------------------------------------------------ across profiles
def check_independence(checks: list[ProfileCheck]) -> None:
    """No two profiles on one key or one portfolio: their balances, orders and risk would be one account's."""
    by_key: dict[str, list[str]] = {}
    by_portfolio: dict[str, list[str]] = {}
    for c in checks:
        if c.key_value:
            by_key.setdefault(c.key_value, []).append(c.profile)
        if c.portfolio:
            by_portfolio.setdefault(c.portfolio, []).append(c.profile)
    for c in checks:
        if not c.key_value or not any(r.check == "key" and r.status == "ok" for r in c.rows):
            continue  # nothing was learnt about this key's account
        others_key = [p for p in by_key.get(c.key_value, []) if p != c.profile]
        others_pf = [p for p in by_portfolio.get(c.portfolio or "", []) if p != c.profile]
        fix = (
            "give each profile its own portfolio (Coinbase: Portfolios > New portfolio) and a key created in "
            f"that portfolio; store it with `mpctl secrets set {c.profile}`"
        )
        why = ": two profiles on one account are not independent (one balance, one risk, self-trades)"
        if others_key:
            both = " and ".join([c.profile, *others_key])
            c.add("account", "FAIL", f"{both} use the same API key ({c.key}){why}", fix)
        if others_pf:
            both = " and ".join([c.profile, *others_pf])
            c.add("account", "FAIL", f"{both} trade the same portfolio {c.portfolio}{why}", fix)
        if not others_key and not others_pf:
            if c.portfolio:
                c.add("account", "ok", f"portfolio {c.portfolio}, used by no other profile")
            else:
                c.add(
                    "account",
                    "warn",
                    "the exchange did not name the key's portfolio: not compared with the other profiles",
                    "make sure no other profile trades this key's portfolio",
                )


# ------------------------------------------------------------------------------------------ the whole check
class PreflightError(Exception):
    """The pre-flight cannot run (not a live config, unknown profile, unreadable store)."""


def selected_profiles(cfg: AppConfig, wanted: list[str] | None) -> dict[str, Profile]:
    if cfg.system.mode != "live":
        raise PreflightError(
            f"system.mode is {cfg.system.mode!r}: the pre-flight checks a live config; set system.mode: live"
        )
    enabled = cfg.enabled_profiles()
    if not wanted:
        if not enabled:
            raise PreflightError("no enabled profile in the config: nothing would trade")
        return dict(enabled)
    unknown = [p for p in wanted if p not in enabled]
    if unknown:
        raise PreflightError(
            f"--profile {', '.join(unknown)}: not an enabled profile (have {sorted(enabled)})"
        )
    return {p: enabled[p] for p in dict.fromkeys(wanted)}


async def preflight(
    cfg: AppConfig,
    *,
    profiles: list[str] | None = None,
    store: CredentialStore | None,
    allow_plaintext: bool = False,
    api_base: str | None = None,
    timeout_s: float = 10.0,
    max_skew_s: float = DEFAULT_MAX_SKEW_S,
) -> Preflight:
    """Every check of every selected profile (the profiles side by side: each has its own client and key)."""
    chosen = selected_profiles(cfg, profiles)
    quote = cfg.system.quote_asset

    async def one(pid: str, profile: Profile) -> ProfileCheck:
        try:
            creds = resolve_credentials(pid, profile, store, allow_plaintext)
        except CredentialsError as err:
            pc = ProfileCheck(pid, products=profile_products(profile, quote))
            pc.add("key", "FAIL", "no usable credentials", str(err))
            return pc
        return await check_profile(
            pid, profile, creds, quote=quote, api_base=api_base, timeout_s=timeout_s, max_skew_s=max_skew_s
        )

    checks = list(await asyncio.gather(*(one(pid, p) for pid, p in chosen.items())))
    check_independence(checks)
    return Preflight(checks)


ORDER = ("clock", "key", "permissions", "account", "products", "balance", "exchange")


def _in_order(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: ORDER.index(r.check) if r.check in ORDER else len(ORDER))


def print_preflight(result: Preflight, out: Callable[[str], None] = print) -> None:
    """A table per profile, then every failure with what to do, then the verdict."""
    for c in result.checks:
        api = API_NAMES.get(c.exchange, c.exchange or "-")
        src = {"store": "the encrypted store", "yaml": "the YAML (plaintext)"}.get(c.source, "-")
        out(f"{c.profile}: {api}, key {c.key}, portfolio {c.portfolio or '-'}, credentials from {src}")
        rows = _in_order(c.rows)
        width = max([len("check"), *(len(r.check) for r in rows)])
        out(f"  {'check'.ljust(width)}  {'result':<6}  detail")
        for r in rows:
            out(f"  {r.check.ljust(width)}  {r.status:<6}  {r.detail}")
        if c.rule:
            out(f"  balance rule: {c.rule}")
        out("")
    problems = [(c, r) for c in result.checks for r in _in_order(c.rows) if r.status in ("FAIL", "warn")]
    for c, r in problems:
        out(f"{r.status:<4} {c.profile} {r.check}: {r.detail}. What to do: {r.fix}")
    n = sum(len(c.failures) for c in result.checks)
    if result.ok:
        out(
            f"pre-flight passed: {len(result.checks)} profile(s) ready for `mpctl run --live`; nothing was placed"
        )
    else:
        out(f"pre-flight FAILED: {n} problem(s) above; nothing was placed")


def print_going_live(result: Preflight, venue: str, out: Callable[[str], None] = print) -> None:
    """What `mpctl run --live` will trade, with which account (never a secret)."""
    out(f"going live: real orders to {venue}")
    cols = ["profile", "api", "key", "portfolio", "products"]
    rows = [
        [
            c.profile,
            f"{API_NAMES.get(c.exchange, c.exchange)} ({c.exchange})",
            c.key,
            c.portfolio or "-",
            ", ".join(c.products),
        ]
        for c in result.checks
    ]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(cols)]
    out("  " + "  ".join(h.ljust(w) for h, w in zip(cols, widths, strict=True)).rstrip())
    for r in rows:
        out("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def run_live_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.max_clock_skew <= 0:
        print(f"error: --max-clock-skew must be positive, got {args.max_clock_skew:g}", file=sys.stderr)
        return 2
    try:
        selected_profiles(cfg, args.profile)  # before the store is unlocked: a typo costs no passphrase
        store = load_store(args.store)
        result = asyncio.run(
            preflight(
                cfg,
                profiles=args.profile,
                store=store,
                allow_plaintext=args.allow_plaintext_credentials,
                api_base=args.api_base,
                timeout_s=args.timeout,
                max_skew_s=args.max_clock_skew,
            )
        )
    except (PreflightError, CredentialsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_preflight(result)
    return 0 if result.ok else 1
