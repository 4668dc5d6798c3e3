"""`mpctl exchange check PROFILE`: a live smoke test of one profile's Coinbase access. It authenticates, shows
the exchange's clock against ours, the key's permissions, the balances and the profile's products with their
trading rules. It places nothing. Each failure is explained: wrong key format, clock skew, missing permission,
refused key, unreachable exchange.

Credentials come as the execution worker gets them (encrypted store first; plaintext YAML values only with
--allow-plaintext-credentials).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from services.execution.ccxt_adapter import CcxtExchange, open_exchange, profile_products
from services.execution.credentials import (
    CredentialsError,
    CredentialStore,
    ResolvedCredentials,
    default_store_path,
    key_format_problems,
    resolve_credentials,
)
from services.execution.errors import ExecutionError, HaltError
from shared.config import ConfigError, load_config

# Coinbase refuses an Exchange API signature older than 30 s; an Advanced Trade JWT lives 120 s.
SKEW_WARN_S = 5.0
SKEW_FAIL_S = 30.0


def register(sub: Any) -> None:
    p = sub.add_parser("exchange", help="live exchange access checks (places nothing)")
    ss = p.add_subparsers(dest="exchange_command", required=True)
    c = ss.add_parser("check", help="authenticate, list balances and the profile's products; place nothing")
    c.add_argument("profile")
    add_access_args(c)
    c.set_defaults(handler=run_check)


def add_access_args(c: argparse.ArgumentParser) -> None:
    """What a command that talks to the exchange with the profiles' keys takes (exchange check, live check)."""
    c.add_argument(
        "--config", type=Path, default=None, help="profiles file (default: local file, else template)"
    )
    c.add_argument(
        "--store", type=Path, default=None, help=f"credentials store (default: {default_store_path()})"
    )
    c.add_argument(
        "--allow-plaintext-credentials",
        action="store_true",
        help="accept real credentials written in the YAML",
    )
    c.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    # Tests point the check at a local Coinbase peer; not for users.
    c.add_argument("--api-base", default=None, help=argparse.SUPPRESS)


def _num(d: Decimal) -> str:
    return format(d.normalize(), "f")  # 10, not 1E+1


def _print(status: str, text: str) -> None:
    print(f"{status:<5} {text}")


def explain(err: ExecutionError, skew_s: float | None) -> str:
    """What an error most likely means for someone setting a key up."""
    skew = (
        f" The local clock is {skew_s:+.0f} s off the exchange's: fix it first (NTP)."
        if skew_s is not None and abs(skew_s) >= SKEW_FAIL_S
        else ""
    )
    if err.kind == "clock_skew":
        return (
            "the exchange refused the request's timestamp: the local clock is off. Synchronise it (NTP)."
            + skew
        )
    if err.kind == "authentication":
        return (
            "the exchange refused the key. Check that the key and secret belong together and are not revoked, "
            "that the key is for this API (a CDP key is Advanced Trade, `coinbase`; a key with a passphrase is the "
            "Exchange API, `coinbaseexchange`), the passphrase, and the key's IP allowlist." + skew
        )
    if err.kind == "permission":
        return (
            "the key lacks a permission for this call: give it 'view' and 'trade' on the profile's portfolio."
        )
    if err.kind == "configuration":
        return err.reason
    if err.outcome == "retry":
        return "the exchange did not answer properly (network, outage or rate limit); try again later."
    return err.reason


async def check(
    profile_id: str,
    creds: ResolvedCredentials,
    *,
    products: list[str],
    api_base: str | None,
    timeout_s: float,
) -> int:
    failures = 0
    problems = key_format_problems(creds.exchange, creds)
    _print(
        "info",
        f"profile {profile_id}: {creds.exchange}{' (sandbox)' if creds.sandbox and creds.exchange == 'coinbaseexchange' else ''}, credentials from the {creds.source}",
    )
    if problems:
        for p in problems:
            _print("FAIL", f"key format: {p}")
        return 1
    _print("ok", "key format")
    port: CcxtExchange | None = None
    skew: float | None = None
    try:
        # Markets later: on Advanced Trade their loading makes a signed call, and the clock must be read first.
        port = await open_exchange(
            creds,
            retry_attempts=1,
            products=products,
            api_base=api_base,
            timeout_s=timeout_s,
            base_delay_s=0.2,
            load=False,
        )
        server = await port.server_time()
        skew = (datetime.now(UTC) - server).total_seconds()
        if abs(skew) >= SKEW_FAIL_S:
            _print(
                "FAIL",
                f"clock: local clock is {skew:+.1f} s off the exchange's; signatures will be refused. Synchronise it (NTP).",
            )
            failures += 1
        elif abs(skew) >= SKEW_WARN_S:
            _print("warn", f"clock: local clock is {skew:+.1f} s off the exchange's")
        else:
            _print("ok", f"clock: {skew:+.1f} s off the exchange's")
        perms = await port.key_permissions()
        if perms.note:
            _print("info", f"permissions: {perms.note}")
        else:
            _print("ok" if perms.can_view else "FAIL", f"permission view: {perms.can_view}")
            _print("ok" if perms.can_trade else "FAIL", f"permission trade: {perms.can_trade}")
            if perms.can_transfer:
                _print("warn", "permission transfer: true; a trading key needs no transfer right, remove it")
            failures += (not perms.can_view) + (not perms.can_trade)
        balances = await port.balances()
        _print("ok", "authenticated; balances:")
        shown = [b for b in balances.values() if b.total != 0] or list(balances.values())
        for b in sorted(shown, key=lambda x: x.asset):
            print(
                f"        {b.asset:<6} total {_num(b.total)}  free {_num(b.free)}  in orders {_num(b.used)}"
            )
        markets = await port.load_markets(products)
        for prod in products:
            m = markets.get(prod)
            if m is None:
                _print("FAIL", f"product {prod}: not listed for this account")
                failures += 1
                continue
            rules = f"size step {_num(m.size_increment)}, price step {_num(m.price_increment)}"
            if m.min_size is not None:
                rules += f", min size {_num(m.min_size)} {m.base}"
            if m.min_notional is not None:
                rules += f", min notional {_num(m.min_notional)} {m.quote}"
            online = m.status == "online"
            _print("ok" if online else "FAIL", f"product {prod}: {rules}{'' if online else f' ({m.status})'}")
            failures += not online
    except HaltError as err:
        _print("FAIL", err.reason)
        _print("why", explain(err, skew))
        return 1
    except ExecutionError as err:
        _print("FAIL", err.reason)
        _print("why", explain(err, skew))
        return 1
    finally:
        if port is not None:
            await port.close()
    _print("info", "nothing was placed")
    return 1 if failures else 0


def load_store(path: Path | None) -> CredentialStore | None:
    """The user's encrypted store (default path unless given), unlocked, or None when there is none. Raises
    CredentialsError (wrong passphrase or key file, tampered file) with the reason."""
    from mpctl.commands_secrets import open_store

    where = path or default_store_path()
    return open_store(where, create=False) if where.exists() else None


def run_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    profile = cfg.profiles.get(args.profile)
    if profile is None:
        print(
            f"error: no profile {args.profile!r} in the config (have {sorted(cfg.profiles)})", file=sys.stderr
        )
        return 2
    try:
        store = load_store(args.store)
        creds = resolve_credentials(args.profile, profile, store, args.allow_plaintext_credentials)
    except CredentialsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    products = profile_products(profile, cfg.system.quote_asset)
    return asyncio.run(
        check(args.profile, creds, products=products, api_base=args.api_base, timeout_s=args.timeout)
    )
