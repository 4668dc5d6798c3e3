"""The error table (services/execution/ccxt_errors.py): every ccxt class and HTTP status maps to retry, reject or
halt; our hierarchy (services/execution/errors.py) imports no exchange library."""

from __future__ import annotations

import pytest
from ccxt.base import errors as cx

from services.execution.ccxt_errors import CLASS_RULES, rule_for, table_rows, translate
from services.execution.errors import HaltError, RejectedError, RetryableError


def tagged(exc: BaseException, status: int | None) -> BaseException:
    if status is not None:
        exc.http_status = status  # type: ignore[attr-defined]  # as the adapter's hooks do
    return exc


# (exception, HTTP status the adapter saw, outcome, kind)
CASES: list[tuple[BaseException, int | None, str, str]] = [
    # network and server side: retry
    (cx.RequestTimeout("coinbase POST /orders"), None, "retry", "timeout"),
    (cx.NetworkError("reset"), None, "retry", "network"),
    (cx.ExchangeNotAvailable("coinbaseexchange GET /orders 503"), 503, "retry", "unavailable"),
    (cx.ExchangeNotAvailable("down"), None, "retry", "unavailable"),
    (cx.OnMaintenance("under maintenance"), None, "retry", "maintenance"),
    (cx.RateLimitExceeded('coinbase {"error":"rate_limit_exceeded"}'), 429, "retry", "rate_limited"),
    (cx.RateLimitExceeded("slow down"), None, "retry", "rate_limited"),
    (cx.DDoSProtection("cloudflare"), None, "retry", "rate_limited"),
    (cx.BadResponse("not json"), None, "retry", "bad_response"),
    (cx.NullResponse("empty"), None, "retry", "bad_response"),
    (cx.CancelPending("pending"), None, "retry", "cancel_pending"),
    # a 500 with a JSON body: ccxt says ExchangeError, the status says retry
    (cx.ExchangeError('coinbase {"error":"internal_server_error"}'), 500, "retry", "server_error"),
    (cx.ExchangeError("bad gateway"), 502, "retry", "server_error"),
    (cx.RequestTimeout("gateway timeout"), 504, "retry", "timeout"),
    (TimeoutError(), None, "retry", "timeout"),
    (ConnectionResetError("peer reset"), None, "retry", "network"),
    # the order cannot be placed: reject
    (cx.InsufficientFunds("Insufficient balance in source account"), None, "reject", "insufficient_funds"),
    (cx.InsufficientFunds("Insufficient funds"), 400, "reject", "insufficient_funds"),
    (cx.InvalidOrder("size is too small"), 400, "reject", "invalid_order"),
    (cx.OrderNotFound("NotFound"), 404, "reject", "order_not_found"),
    (cx.DuplicateOrderId("dup"), None, "reject", "duplicate_client_id"),
    (cx.BadSymbol("unknown market"), None, "reject", "bad_symbol"),
    (cx.BadRequest("INVALID_ARGUMENT"), None, "reject", "bad_request"),
    (cx.MarketClosed("closed"), None, "reject", "market_closed"),
    (cx.ExchangeError("INVALID_SIZE_PRECISION"), 200, "reject", "exchange_error"),
    (cx.ExchangeError("coinbaseexchange price too precise"), 400, "reject", "exchange_error"),
    # the profile cannot trade safely: halt
    (cx.AuthenticationError("coinbase GET 401 Unauthorized"), 401, "halt", "authentication"),
    (cx.AuthenticationError("invalid_token"), None, "halt", "authentication"),
    (cx.PermissionDenied("PERMISSION_DENIED Missing required scopes"), 403, "halt", "permission"),
    (cx.PermissionDenied("scope"), None, "halt", "permission"),
    (cx.AccountNotEnabled("not enabled"), None, "halt", "permission"),
    (cx.AccountSuspended("suspended"), None, "halt", "account_suspended"),
    # Coinbase Exchange answers 403 without a JSON message: ccxt says ExchangeNotAvailable, the status says halt
    (cx.ExchangeNotAvailable("coinbaseexchange GET /orders 403 Forbidden"), 403, "halt", "permission"),
    (cx.InvalidNonce("request timestamp expired"), None, "halt", "clock_skew"),
    # Exchange API: clock skew arrives as a plain 400 ExchangeError; the text decides
    (cx.ExchangeError("coinbaseexchange request timestamp expired"), 400, "halt", "clock_skew"),
    (cx.ExchangeError('coinbaseexchange {"message":"invalid signature"}'), 400, "halt", "authentication"),
    (cx.ArgumentsRequired("apiKey should contain the name"), None, "halt", "configuration"),
    (cx.NotSupported("no sandbox"), None, "halt", "configuration"),
    (cx.ExchangeClosedByUser("closed"), None, "halt", "closed"),
    (ValueError("bug"), None, "halt", "internal"),
    (KeyError("bug"), None, "halt", "internal"),
]


@pytest.mark.parametrize(
    ("exc", "status", "outcome", "kind"), CASES, ids=[f"{type(c[0]).__name__}-{c[1]}" for c in CASES]
)
def test_table(exc: BaseException, status: int | None, outcome: str, kind: str) -> None:
    err = translate(tagged(exc, status))
    assert err.outcome == outcome, err.reason
    assert err.kind == kind
    assert {"retry": RetryableError, "reject": RejectedError, "halt": HaltError}[outcome] is type(err)
    if status is not None:
        assert err.http_status == status
        assert f"HTTP {status}" in err.reason


def test_explicit_status_argument_wins_over_tag() -> None:
    exc = tagged(cx.ExchangeError("x"), 400)
    assert rule_for(exc).outcome == "reject"
    assert rule_for(exc, 503).outcome == "retry"


def test_no_class_is_shadowed_by_an_earlier_parent() -> None:
    # Rules are tried in order: a class listed after one of its ancestors would never be reached.
    for i, (cls, _) in enumerate(CLASS_RULES):
        for earlier, _ in CLASS_RULES[:i]:
            assert not issubclass(cls, earlier), f"{cls.__name__} is shadowed by {earlier.__name__}"


def test_every_ccxt_error_class_has_a_defined_outcome() -> None:
    import inspect

    members = inspect.getmembers(cx, inspect.isclass)
    classes = [c for _, c in members if issubclass(c, BaseException) and issubclass(c, cx.BaseError)]
    assert len(classes) > 30
    for cls in classes:
        assert rule_for(cls("x")).outcome in ("retry", "reject", "halt")


def test_translate_keeps_our_errors_and_redacts_library_text() -> None:
    ours = RejectedError("below minimum", kind="below_minimum")
    assert translate(ours) is ours
    secret = "SEKRIT-passphrase-0xdeadbeef"
    err = translate(
        tagged(cx.AuthenticationError(f"coinbaseexchange invalid key {secret}"), 401),
        redact=lambda t: t.replace(secret, "***"),
    )
    assert secret not in err.reason and "***" in err.reason
    # Text of non-ccxt exceptions may hold anything: only the type is kept.
    bug = translate(RuntimeError(f"oops {secret}"))
    assert secret not in bug.reason and "RuntimeError" in bug.reason


def test_long_library_messages_are_shortened() -> None:
    err = translate(cx.ExchangeError("x" * 5000))
    assert len(err.reason) < 500


def test_table_rows_cover_statuses_and_classes() -> None:
    rows = table_rows()
    names = [r[0] for r in rows]
    assert (
        "HTTP 429" in names
        and "HTTP 401" in names
        and "InsufficientFunds" in names
        and "RequestTimeout" in names
    )
    assert {r[1] for r in rows} == {"retry", "reject", "halt"}


def test_docs_list_every_row_of_the_table() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "execution.md").read_text()
    for name, outcome, _ in table_rows():
        assert f"| {name} | {outcome} |" in doc, f"docs/execution.md lacks the row {name} -> {outcome}"


def test_the_error_hierarchy_loads_without_ccxt() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import services.execution.errors, services.execution.ports; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ccxt'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
