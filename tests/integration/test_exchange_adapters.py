"""Real ccxt (`coinbase` and `coinbaseexchange`) against the local Coinbase peer on loopback.

The peer verifies every private request's signature with the key of the profile it names and records which key
signed each order, so these tests prove: one order per client order id whatever the retries, redeliveries,
timeouts and crashes; the error table on real responses; the rate limiter; rounding and minimums; partial
fills; order_timeout; no order of a profile signed with another profile's key; and no credential in any log.
No Kafka or Redis is needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from services.execution.ccxt_adapter import CcxtExchange, RateLimit, open_exchange
from services.execution.credentials import (
    ENV_KEY_FILE,
    CredentialStore,
    KeySource,
    ResolvedCredentials,
    StoredCredentials,
    new_key_file,
)
from services.execution.errors import HaltError, RejectedError, RetryableError, UnknownOrderStateError
from services.execution.live import LiveExecution
from services.execution.reconcile import known_from_events
from shared.clock import derived_id
from shared.codec import decode, encode
from shared.config import AppConfig, parse_config
from shared.messages import ExecuteOrder, Message, OrderFilled, OrderUpdated, ProfileHalted
from tests.peer.coinbase_peer import AdvancedKeyMaterial, CoinbasePeer, ExchangeKeyMaterial, PeerOrder

REPO = Path(__file__).resolve().parents[2]
D = Decimal
APIS = ["coinbase", "coinbaseexchange"]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def no_secret_in_logs(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> Iterator[list[str]]:
    """Every test: everything logged (DEBUG and up, ccxt included) and printed is scanned for the credentials."""
    caplog.set_level(logging.DEBUG)
    secrets_used: list[str] = []
    yield secrets_used
    out = capsys.readouterr()
    text = caplog.text + out.out + out.err
    for v in secrets_used:
        pieces = [v] + [line for line in v.splitlines() if len(line) > 20 and "-----" not in line]
        for piece in pieces:
            assert piece not in text, "a credential appeared in the logs or the output"


def creds_for(peer: CoinbasePeer, api: str, profile: str, secrets_used: list[str]) -> ResolvedCredentials:
    if api == "coinbase":
        a: AdvancedKeyMaterial = peer.add_advanced_profile(profile)
        secrets_used += [a.key_name, a.private_pem]
        return ResolvedCredentials(
            profile, SecretStr(a.key_name), SecretStr(a.private_pem), None, False, "coinbase", "store"
        )
    e: ExchangeKeyMaterial = peer.add_exchange_profile(profile)
    secrets_used += [e.api_key, e.secret_b64, e.passphrase]
    return ResolvedCredentials(
        profile,
        SecretStr(e.api_key),
        SecretStr(e.secret_b64),
        SecretStr(e.passphrase),
        True,
        "coinbaseexchange",
        "store",
    )


async def adapter(peer: CoinbasePeer, creds: ResolvedCredentials, **kw: Any) -> CcxtExchange:
    kw.setdefault("retry_attempts", 3)
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("base_delay_s", 0.01)
    return await open_exchange(
        creds, products=["BTC/USDC", "ETH/USDC", "SOL/USDC"], api_base=peer.base_url, **kw
    )


def coid(tag: str) -> str:
    h = derived_id("client-order", tag)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def app_config(order_timeout: float = 1.0) -> AppConfig:
    data = yaml.safe_load((REPO / "config" / "coinbase_profiles.yaml").read_text())
    for p in data["profiles"].values():
        p["api_credentials"]["sandbox"] = False
        p["trading_params"]["order_timeout"] = order_timeout
        p["trading_params"]["slippage_tolerance"] = 0.001
    return parse_config(data)


def execute(
    profile: str,
    tag: str,
    *,
    side: str = "buy",
    size: str = "0.01",
    price: str = "60000",
    product: str = "BTC/USDC",
) -> ExecuteOrder:
    now = datetime.now(UTC)
    return ExecuteOrder(
        id=derived_id("execute", profile, tag),
        event_time=now,
        correlation_id=f"test:{tag}",
        intent_id=derived_id("intent", profile, tag),
        client_order_id=coid(f"{profile}:{tag}"),
        profile=profile,
        product=product,
        side="sell" if side == "sell" else "buy",
        size=D(size),
        reference_price=D(price),
        reason="entry",
        step_time=now,
        not_before=now,
    )


def orders_with(peer: CoinbasePeer, client_id: str) -> list[PeerOrder]:
    return [o for o in peer.orders if o.client_id == client_id]


def posts(peer: CoinbasePeer) -> int:
    return sum(
        1 for r in peer.requests if r.method == "POST" and r.path in ("/orders", "/api/v3/brokerage/orders")
    )


def live(profile: str, port: CcxtExchange, cfg: AppConfig | None = None) -> LiveExecution:
    c = cfg or app_config()
    # Without resting protective orders: these tests count the orders they send (tests/integration/
    # test_live_protective.py covers those).
    return LiveExecution(
        profile,
        c.profiles[profile],
        port,
        clock=lambda: datetime.now(UTC),
        poll_interval_s=0.05,
        protect=False,
    )


def of(msgs: list[Message], cls: type[Any]) -> list[Any]:
    return [m for m in msgs if isinstance(m, cls)]


# ------------------------------------------------------------------------------------------ orders
@pytest.mark.parametrize("api", APIS)
async def test_order_round_trip_with_rounding(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs))
    try:
        o = await port.create_order(
            coid("rt"), "BTC/USDC", "buy", D("0.0123456789"), limit_price=D("60000.129")
        )
        (po,) = peer.orders
        assert po.client_id == coid("rt") and po.size == D("0.01234567") and po.limit_price == D("60000.12")
        o = await port.fetch_order(o)
        assert o.status == "filled" and o.filled_size == D("0.01234567") and o.client_order_id == coid("rt")
        fills = await port.fetch_fills(order=o)
        assert [f.size for f in fills] == [D("0.01234567")] and fills[
            0
        ].exchange_order_id == o.exchange_order_id
        assert await port.fetch_order_by_client_id(coid("rt"), "BTC/USDC") == o
        assert await port.fetch_order_by_client_id(coid("absent"), "BTC/USDC") is None
        bal = await port.balances()
        assert bal["USDC"].total < D("100000") and bal["BTC"].total == D("1.01234567")
    finally:
        await port.close()


@pytest.mark.parametrize("api", APIS)
async def test_below_minimum_is_rejected_and_not_sent(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs))
    try:
        with pytest.raises(RejectedError, match="below minimum") as ei:
            # Advanced: under base_min_size 0.00001 BTC; Exchange: notional under min_market_funds 1 USDC.
            await port.create_order(coid("tiny"), "BTC/USDC", "buy", D("0.000009"), limit_price=D("100"))
        assert "not sent" in ei.value.reason
        with pytest.raises(RejectedError, match="not a market"):
            await port.create_order(coid("doge"), "DOGE/USDC", "buy", D("1"), limit_price=D("1"))
        assert posts(peer) == 0 and peer.orders == []
    finally:
        await port.close()


# ------------------------------------------------------------------------------------------ never twice
@pytest.mark.parametrize("api", APIS)
async def test_timeout_after_accept_then_retry_makes_exactly_one_order(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs), timeout_s=0.5)
    peer.hang_after_accept(2.0)
    try:
        o = await port.create_order(coid("hang"), "BTC/USDC", "buy", D("0.01"), limit_price=D("60000"))
    finally:
        await port.close()
    (po,) = orders_with(peer, coid("hang"))
    assert o.exchange_order_id == po.order_id and len(peer.orders) == 1
    assert port.retries >= 1
    if api == "coinbaseexchange":
        assert posts(peer) == 1  # the lookup found the order: never resent
    else:
        assert posts(peer) == 2  # resent with the same client_order_id: de-duplicated by the exchange


@pytest.mark.parametrize("api", APIS)
async def test_redelivered_order_is_never_placed_twice(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs))
    try:
        first = await port.create_order(
            coid("redeliver"), "BTC/USDC", "buy", D("0.01"), limit_price=D("60000")
        )
        again = await port.create_order(
            coid("redeliver"), "BTC/USDC", "buy", D("0.01"), limit_price=D("60000")
        )
        # The worker above the port: a redelivered ExecuteOrder of a finished intent produces nothing at all.
        ex = live("profile_a", port)
        msg = execute("profile_a", "redeliver-live")
        out1 = await ex.handle(msg)
        n = len(peer.orders)
        assert await ex.handle(msg) == []
        assert len(peer.orders) == n
    finally:
        await port.close()
    assert first.exchange_order_id == again.exchange_order_id
    assert len(orders_with(peer, coid("redeliver"))) == 1
    assert [u.status for u in of(out1, OrderUpdated)] == ["submitted", "filled"]


async def test_exchange_api_itself_does_not_deduplicate(
    peer: CoinbasePeer, no_secret_in_logs: list[str]
) -> None:
    """Control: without the lookup, the Exchange API makes a second order for a repeated client_oid."""
    port = await adapter(peer, creds_for(peer, "coinbaseexchange", "profile_a", no_secret_in_logs))
    port.lookup_before_send = False
    try:
        await port.create_order(coid("dup"), "BTC/USDC", "buy", D("0.01"), limit_price=D("60000"))
        await port.create_order(coid("dup"), "BTC/USDC", "buy", D("0.01"), limit_price=D("60000"))
    finally:
        await port.close()
    assert len(orders_with(peer, coid("dup"))) == 2


# ------------------------------------------------------------------------------------------ error table
ADV_429 = {
    "error": "rate_limit_exceeded",
    "error_details": "Too many requests",
    "message": "Too many requests",
}
ADV_500 = {"error": "internal_server_error", "message": "Internal server error"}


def fault_body(api: str, status: int) -> Any:
    if api == "coinbase":
        return {429: ADV_429, 500: ADV_500, 503: "Service Unavailable", 401: "Unauthorized\n"}[status]
    return {
        429: {"message": "Private rate limit exceeded"},
        500: {"message": "Internal server error"},
        503: "",
        401: {"message": "Invalid API Key"},
    }[status]


ORDER_PATH = {"coinbase": r"^/api/v3/brokerage/orders$", "coinbaseexchange": r"^/orders$"}


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("status", [429, 500, 503])
async def test_transient_errors_are_retried_to_one_order(
    peer: CoinbasePeer, api: str, status: int, no_secret_in_logs: list[str]
) -> None:
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs))
    peer.inject("POST", ORDER_PATH[api], status, fault_body(api, status), times=2)
    try:
        o = await port.create_order(coid(f"t{status}"), "BTC/USDC", "buy", D("0.01"), limit_price=D("60000"))
    finally:
        await port.close()
    assert len(peer.orders) == 1 and peer.orders[0].order_id == o.exchange_order_id
    assert port.retries == 2


@pytest.mark.parametrize("api", APIS)
async def test_retries_exhausted_leave_the_order_state_unknown(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs), retry_attempts=2)
    peer.inject("POST", ORDER_PATH[api], 500, fault_body(api, 500), times=99)
    peer.inject("GET", r"accounts", 500, fault_body(api, 500), times=99)
    try:
        with pytest.raises(UnknownOrderStateError, match="gave up after 3 attempts"):
            await port.create_order(coid("gone"), "BTC/USDC", "buy", D("0.01"), limit_price=D("60000"))
        with pytest.raises(RetryableError, match="server error"):
            await port.balances()
    finally:
        await port.close()
    assert peer.orders == []


@pytest.mark.parametrize("api", APIS)
async def test_rejections_become_rejected_events(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs))
    ex = live("profile_a", port)
    try:
        with pytest.raises(RejectedError) as ei:
            await port.create_order(coid("broke"), "BTC/USDC", "buy", D("100"), limit_price=D("60000"))
        assert ei.value.kind == "insufficient_funds"
        out = await ex.handle(execute("profile_a", "broke", size="100"))
        tiny = await ex.handle(execute("profile_a", "tiny", size="0.000001", price="1"))
    finally:
        await port.close()
    assert [(u.status, "insufficient funds" in u.reason) for u in of(out, OrderUpdated)] == [
        ("submitted", False),
        ("rejected", True),
    ]
    assert (
        of(tiny, OrderUpdated)[-1].status == "rejected"
        and "below minimum" in of(tiny, OrderUpdated)[-1].reason
    )
    assert peer.orders == [] and ex.halted is None


@pytest.mark.parametrize("api", APIS)
async def test_missing_trade_permission_halts_the_profile(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs))
    peer.account_of("profile_a").can_trade = False
    ex = live("profile_a", port)
    try:
        out = await ex.handle(execute("profile_a", "p1"))
        later = await ex.handle(execute("profile_a", "p2"))
    finally:
        await port.close()
    (halted,) = of(out, ProfileHalted)
    assert "permission" in halted.reason and ex.halted is not None
    assert of(out, OrderUpdated)[-1].status == "rejected"
    assert of(later, OrderUpdated)[-1].reason.startswith("profile halted")
    assert posts(peer) == 1  # the second order never reached the exchange


@pytest.mark.parametrize("api", APIS)
async def test_refused_key_halts(peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]) -> None:
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs))
    peer.inject("GET", "accounts", 401, fault_body(api, 401))
    try:
        with pytest.raises(HaltError) as ei:
            await port.balances()
    finally:
        await port.close()
    assert ei.value.kind == "authentication" and ei.value.http_status == 401


@pytest.mark.parametrize("api", APIS)
async def test_clock_skew_is_refused_and_halts(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs))
    peer.clock_offset_s = 600.0
    try:
        with pytest.raises(HaltError) as ei:
            await port.balances()
        skew = (datetime.now(UTC) - await port.server_time()).total_seconds()
    finally:
        await port.close()
    # Exchange API names the cause; Advanced Trade answers a plain 401 (`mpctl exchange check` measures the skew).
    assert ei.value.kind == ("clock_skew" if api == "coinbaseexchange" else "authentication")
    assert skew < -590


# ------------------------------------------------------------------------------------------ rate limiting
@pytest.mark.parametrize("api", APIS)
async def test_rate_limiter_keeps_under_the_exchange_limit(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    peer.rate_limit_per_s = 10
    creds = creds_for(peer, api, "profile_a", no_secret_in_logs)
    port = await adapter(peer, creds, limit=RateLimit(rate=4, burst=4), retry_attempts=0)
    key = peer.account_of("profile_a").key_id
    try:
        await asyncio.gather(*(port.balances() for _ in range(16)))
    finally:
        await port.close()
    assert not [r for r in peer.requests if r.status == 429]
    assert 0 < peer.max_rate(key) <= 8

    # Control: without our limiter the peer does refuse, and the adapter retries through it.
    fast = await adapter(peer, creds, limit=RateLimit(rate=1000, burst=1000), retry_attempts=0)
    try:
        results = await asyncio.gather(*(fast.balances() for _ in range(30)), return_exceptions=True)
    finally:
        await fast.close()
    assert any(isinstance(r, RetryableError) and r.kind == "rate_limited" for r in results)


# ------------------------------------------------------------------------------------------ fills and timeouts
@pytest.mark.parametrize("api", APIS)
async def test_partial_fill_then_order_timeout_cancels_the_rest(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    peer.fill_plan = [D("0.4")]
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs))
    ex = live("profile_a", port, app_config(order_timeout=0.5))
    try:
        out = await ex.handle(execute("profile_a", "partial", size="0.01"))
    finally:
        await port.close()
    (po,) = peer.orders
    assert po.status == "CANCELLED" and po.filled == D("0.004")
    fills = of(out, OrderFilled)
    assert [f.size for f in fills] == [D("0.004")]
    last = of(out, OrderUpdated)[-1]
    assert last.status == "cancelled" and last.filled_size == D("0.004") and "order_timeout" in last.reason


@pytest.mark.parametrize("api", APIS)
async def test_partial_fills_completed_while_tracking(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    peer.fill_plan = [D("0.25")]
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs))
    ex = live("profile_a", port, app_config(order_timeout=5.0))

    async def fill_later() -> None:
        while not peer.orders:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        peer.fill(peer.orders[0], D("0.005"))
        await asyncio.sleep(0.2)
        peer.fill(peer.orders[0])

    try:
        out, _ = await asyncio.gather(ex.handle(execute("profile_a", "pf", size="0.02")), fill_later())
        assert await ex.reconcile() == []
    finally:
        await port.close()
    fills = of(out, OrderFilled)
    assert sorted(f.size for f in fills) == [D("0.005"), D("0.005"), D("0.01")]
    assert len({f.fill_id for f in fills}) == 3
    assert of(out, OrderUpdated)[-1].status == "filled" and of(out, OrderUpdated)[-1].filled_size == D("0.02")
    assert "partially_filled" in [u.status for u in of(out, OrderUpdated)]


@pytest.mark.parametrize("api", APIS)
async def test_unfilled_order_is_cancelled_at_order_timeout(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    peer.fill_plan = []
    port = await adapter(peer, creds_for(peer, api, "profile_a", no_secret_in_logs))
    ex = live("profile_a", port, app_config(order_timeout=0.3))
    try:
        out = await ex.handle(execute("profile_a", "idle"))
    finally:
        await port.close()
    assert peer.orders[0].status == "CANCELLED"
    assert [u.status for u in of(out, OrderUpdated)] == ["submitted", "cancelled"] and of(
        out, OrderFilled
    ) == []


# ------------------------------------------------------------------------------------------ key isolation
async def test_no_order_is_signed_with_another_profiles_key(
    peer: CoinbasePeer, no_secret_in_logs: list[str]
) -> None:
    cfg = app_config()
    profiles = {"profile_a": "coinbase", "profile_b": "coinbase"}
    exchange_profiles = {"xprof_a": "coinbaseexchange", "xprof_b": "coinbaseexchange"}
    data = yaml.safe_load((REPO / "config" / "coinbase_profiles.yaml").read_text())
    for name in exchange_profiles:  # two more profiles, on the Exchange API
        data["profiles"][name] = data["profiles"]["profile_a"] | {"name": name}
    cfg = parse_config(data)
    creds = {
        p: creds_for(peer, api, p, no_secret_in_logs) for p, api in (profiles | exchange_profiles).items()
    }
    ports = {p: await adapter(peer, c) for p, c in creds.items()}
    sent: dict[str, str] = {}  # client order id -> profile
    try:

        async def run(p: str) -> None:
            ex = LiveExecution(
                p,
                cfg.profiles[p],
                ports[p],
                clock=lambda: datetime.now(UTC),
                poll_interval_s=0.05,
                protect=False,
            )
            for i in range(4):
                msg = execute(p, f"iso{i}", size="0.001")
                sent[msg.client_order_id] = p
                await ex.handle(msg)

        await asyncio.gather(*(run(p) for p in ports))
        # A misconfigured profile: profile_a's key name with profile_b's private key. Every request is refused.
        wrong = ResolvedCredentials(
            "profile_a",
            creds["profile_a"].api_key,
            creds["profile_b"].secret,
            None,
            False,
            "coinbase",
            "store",
        )
        with pytest.raises(HaltError):
            bad = await adapter(peer, wrong, load=False)
            try:
                await bad.balances()
            finally:
                await bad.close()
    finally:
        for port in ports.values():
            await port.close()
    assert len(peer.orders) == 16
    key_of = {a.profile: a.key_id for a in peer.accounts.values()}
    for o in peer.orders:
        owner = sent[o.client_id]
        assert o.signed_by == key_of[owner], f"order {o.client_id} of {owner} was signed by {o.profile}'s key"
        assert o.profile == owner
    assert any("does not verify with the key of profile profile_a" in why for why in peer.rejected_auth)


# ------------------------------------------------------------------------------------------ crash and reconciliation
def write_config(tmp: Path, order_timeout: float = 2.0) -> Path:
    data = yaml.safe_load((REPO / "config" / "coinbase_profiles.yaml").read_text())
    for p in data["profiles"].values():
        p["api_credentials"]["sandbox"] = False
        p["trading_params"]["order_timeout"] = order_timeout
    path = tmp / "profiles.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class CrashRun:
    config: Path
    store: Path
    key_file: Path
    journal: Path


def crash_setup(tmp: Path, peer: CoinbasePeer, api: str, secrets_used: list[str]) -> CrashRun:
    c = creds_for(peer, api, "profile_a", secrets_used)
    kf = tmp / "store.key"
    new_key_file(kf)
    store = CredentialStore.create(tmp / "credentials.enc", KeySource.from_key_file(kf))
    store.put("profile_a", StoredCredentials(c.api_key, c.secret, c.passphrase))
    # A second profile in the same store: the child must decrypt profile_a's entry only.
    other = creds_for(peer, api, "profile_b", secrets_used)
    store.put("profile_b", StoredCredentials(other.api_key, other.secret, other.passphrase))
    store.save()
    return CrashRun(write_config(tmp), tmp / "credentials.enc", kf, tmp / "journal.jsonl")


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("restart", ["redelivery_first", "reconcile_first"])
async def test_sigkill_between_send_and_answer(
    peer: CoinbasePeer, api: str, restart: str, tmp_path: Path, no_secret_in_logs: list[str]
) -> None:
    run = crash_setup(tmp_path, peer, api, no_secret_in_logs)
    peer.fill_plan = []  # the fill happens while the worker is dead
    peer.hang_after_accept(30.0)
    msg = execute("profile_a", f"crash-{api}-{restart}")
    order_file = tmp_path / "order.json"
    order_file.write_bytes(encode(msg))
    env = dict(os.environ, PYTHONPATH=str(REPO), **{ENV_KEY_FILE: str(run.key_file)})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.peer.crash_child",
        "--api-base", peer.base_url, "--store", str(run.store), "--profile", "profile_a",
        "--order", str(order_file), "--journal", str(run.journal), "--config", str(run.config),
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(600):  # the peer has accepted the order and holds the answer
            if peer.orders:
                break
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert peer.orders, f"child never placed its order: {(await proc.communicate())[1].decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.returncode is None:
            proc.kill()
        _, err = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    for v in no_secret_in_logs:
        assert v not in err.decode()
    (po,) = peer.orders
    peer.fill(po, D("0.004"))
    peer.fill(po)  # filled in two parts while the worker was down

    # Restart: state from what was published before the crash (nothing: the child died inside handle()).
    journal = [decode(line) for line in run.journal.read_bytes().splitlines()] if run.journal.exists() else []
    assert journal == []
    cfg = app_config(order_timeout=2.0)
    c = creds_for_existing(peer, api, run)
    port = await adapter(peer, c)
    ex = live("profile_a", port, cfg)
    ex.apply_all(journal)
    events: list[Message] = []
    try:
        if restart == "reconcile_first":
            # A worker that had published `submitted` before sending: reconciliation finds the order by its id.
            ex.apply_all(ex_submitted(msg))
            events += await ex.reconcile()
            events += await ex.handle(msg)  # the redelivered command: already final, nothing happens
        else:
            events += await ex.handle(msg)  # the uncommitted command is redelivered
            events += await ex.reconcile()
        events += await ex.handle(msg)  # and once more, for good measure
        events += await ex.reconcile()
    finally:
        await port.close()
    assert len(peer.orders) == 1  # exactly one order at the exchange
    fills = of(events, OrderFilled)
    assert len(fills) == 2 and len({f.fill_id for f in fills}) == 2
    assert sum(f.size for f in fills) == po.size  # counted once
    finals = [u for u in of(events, OrderUpdated) if u.status == "filled"]
    assert len(finals) == 1 and finals[0].filled_size == po.size
    state = known_from_events("profile_a", journal + events)
    assert state[msg.client_order_id].filled_from_fills == po.size


def creds_for_existing(peer: CoinbasePeer, api: str, run: CrashRun) -> ResolvedCredentials:
    store = CredentialStore.load(run.store)
    store.unlock(KeySource.from_key_file(run.key_file))
    s = store.get("profile_a")
    return ResolvedCredentials(
        "profile_a", s.api_key, s.secret, s.passphrase, api == "coinbaseexchange", api, "store"
    )  # type: ignore[arg-type]


def ex_submitted(msg: ExecuteOrder) -> list[Message]:
    from services.execution.reconcile import KnownOrder, order_update

    return [order_update(KnownOrder.from_execute(msg), "submitted", datetime.now(UTC))]


@pytest.mark.parametrize("api", APIS)
async def test_reconcile_finds_what_happened_while_down(
    peer: CoinbasePeer, api: str, no_secret_in_logs: list[str]
) -> None:
    peer.fill_plan = []
    c = creds_for(peer, api, "profile_a", no_secret_in_logs)
    port = await adapter(peer, c)
    ex = live("profile_a", port, app_config(order_timeout=30.0))
    a, b = execute("profile_a", "down-a"), execute("profile_a", "down-b")
    published: list[Message] = []
    try:
        # Two orders accepted and left open; the worker's tracking is interrupted (it "goes down").
        for m in (a, b):
            o = await port.create_order(
                m.client_order_id, m.product, m.side, m.size, limit_price=ex.limit_price(m)
            )
            published += ex_submitted(m)
            assert o.status == "open"
        pa, pb = peer.orders
        peer.fill(pa)  # filled while down
        peer.cancel_on_site(pb)  # cancelled on Coinbase's website
        hand = await port.create_order(coid("by-hand"), "BTC/USDC", "sell", D("0.01"), limit_price=D("70000"))
        fresh = live("profile_a", port, app_config(order_timeout=30.0))
        fresh.apply_all(published)
        events = await fresh.reconcile()
        again = await fresh.reconcile()
    finally:
        await port.close()
    assert [(type(e).__name__, getattr(e, "status", "")) for e in events] == [
        ("OrderFilled", ""),
        ("OrderUpdated", "filled"),
        ("OrderUpdated", "cancelled"),
    ] or sorted((type(e).__name__, getattr(e, "status", "")) for e in events) == sorted(
        [("OrderFilled", ""), ("OrderUpdated", "filled"), ("OrderUpdated", "cancelled")]
    )
    assert again == []
    rec = fresh.last_reconciliation
    assert rec is not None and [u.exchange_order_id for u in rec.unknown_orders] == [hand.exchange_order_id]


# ------------------------------------------------------------------------------------------ mpctl exchange check
@pytest.mark.parametrize("api", APIS)
async def test_exchange_check(
    peer: CoinbasePeer,
    api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_secret_in_logs: list[str],
) -> None:
    import argparse

    from mpctl.commands_exchange import check, register

    run = crash_setup(tmp_path, peer, api, no_secret_in_logs)
    monkeypatch.setenv(ENV_KEY_FILE, str(run.key_file))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "exchange",
            "check",
            "profile_a",
            "--config",
            str(run.config),
            "--store",
            str(run.store),
            "--api-base",
            peer.base_url,
        ]
    )

    code = await asyncio.to_thread(args.handler, args)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "authenticated; balances:" in out and "USDC" in out and "product BTC/USDC: size step" in out
    assert "nothing was placed" in out and peer.orders == [] and posts(peer) == 0

    peer.clock_offset_s = 120.0
    code = await asyncio.to_thread(args.handler, args)
    out = capsys.readouterr().out
    assert code == 1 and re.search(r"local clock is -1(19|20)\.\d s off", out) and "NTP" in out
    peer.clock_offset_s = 0.0

    if api == "coinbase":
        peer.account_of("profile_a").can_trade = False
        code = await asyncio.to_thread(args.handler, args)
        out = capsys.readouterr().out
        assert code == 1 and "FAIL  permission trade: False" in out
        peer.account_of("profile_a").can_trade = True

    # Wrong key format: explained, nothing sent.
    c = creds_for_existing(peer, api, run)
    bad = ResolvedCredentials(
        "profile_a", SecretStr("not-a-key/"), c.secret, c.passphrase, False, api, "store"
    )  # type: ignore[arg-type]
    n = len(peer.requests)
    assert await check("profile_a", bad, products=["BTC/USDC"], api_base=peer.base_url, timeout_s=2.0) == 1
    out = capsys.readouterr().out
    assert "FAIL  key format" in out and len(peer.requests) == n


# ------------------------------------------------------------------------------------------ write-ahead
@pytest.mark.parametrize("write_ahead", [True, False])
async def test_write_ahead_covers_an_order_the_exchange_forgets(
    peer: CoinbasePeer, write_ahead: bool, no_secret_in_logs: list[str]
) -> None:
    """Exchange API: the worker dies while its order is in flight, then the order is cancelled unfilled and the
    exchange forgets it (404). With write-ahead the restart knows the order and never resends it; without it, the
    redelivered command finds nothing and sends a second order (the control case)."""
    peer.fill_plan = []
    peer.exchange_forgets_unfilled_cancels = True
    peer.hang_after_accept(30.0)
    c = creds_for(peer, "coinbaseexchange", "profile_a", no_secret_in_logs)
    port = await adapter(peer, c)
    journal: list[Message] = []  # stands for orders.events
    orders_at_write: list[int] = []

    async def publish(msgs: list[Message]) -> None:
        orders_at_write.append(len(peer.orders))
        journal.extend(msgs)

    first = live("profile_a", port)
    if write_ahead:
        first.write_ahead = publish
    msg = execute("profile_a", f"forgotten-{write_ahead}")
    task = asyncio.create_task(first.handle(msg))
    try:
        while not peer.orders:
            await asyncio.sleep(0.01)
        task.cancel()  # the worker dies between send and answer: handle() never returns its events
        with pytest.raises(asyncio.CancelledError):
            await task
        peer.cancel_on_site(peer.orders[0])
        restarted = live("profile_a", port)
        restarted.apply_all(journal)
        events = await restarted.reconcile()
        events += await restarted.handle(msg)  # the uncommitted command is redelivered
    finally:
        await port.close()
    if write_ahead:
        assert orders_at_write == [0]  # published before anything was sent
        assert len(peer.orders) == 1
        assert [u.status for u in of(events, OrderUpdated)] == ["rejected"]
    else:
        assert len(peer.orders) == 2  # what write-ahead prevents
