"""ccxt's errors in our hierarchy (errors.py), by a table: the only place besides ccxt_adapter.py that imports ccxt.

ccxt raises a rich hierarchy (ccxt.base.errors) and, for Coinbase, often decides the class from the response
body rather than the HTTP status (a 500 with a JSON body becomes a plain ExchangeError; Coinbase Exchange's
403 becomes ExchangeNotAvailable). The adapter therefore tags every ccxt exception with the HTTP status it came
with (`http_status`), and `translate` reads, in order: a few Coinbase texts (MESSAGE_RULES), the status
(STATUS_RULES), then the class (CLASS_RULES, most specific first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from ccxt.base import errors as cx

from services.execution.errors import ExecutionError, HaltError, Outcome, RejectedError, RetryableError

# How much of a library's message is kept in ours: enough to see the exchange's words, never a whole body.
MAX_DETAIL = 300

_CLASS: dict[Outcome, type[ExecutionError]] = {
    "retry": RetryableError,
    "reject": RejectedError,
    "halt": HaltError,
}


@dataclass(frozen=True)
class Rule:
    outcome: Outcome
    kind: str
    why: str


# Coinbase's own words that say more than the class or status: matched (case-insensitive) in the text of a ccxt
# error before anything else. Exchange API answers clock skew with a 400, which would otherwise read "rejected".
MESSAGE_RULES: tuple[tuple[str, Rule], ...] = (
    (
        "timestamp expired",
        Rule("halt", "clock_skew", "request timestamp refused: the local clock is off (check NTP)"),
    ),
    (
        "invalid signature",
        Rule("halt", "authentication", "signature refused: the secret does not belong to this key"),
    ),
    ("invalid passphrase", Rule("halt", "authentication", "the passphrase does not belong to this key")),
    ("invalid api key", Rule("halt", "authentication", "unknown API key")),
)

# HTTP statuses that decide by themselves, whatever class ccxt chose (see module docstring).
STATUS_RULES: dict[int, Rule] = {
    401: Rule(
        "halt", "authentication", "the exchange refused the key (401): wrong, revoked or malformed key"
    ),
    403: Rule("halt", "permission", "the key lacks a permission for this call (403), e.g. trade or view"),
    429: Rule("retry", "rate_limited", "rate limited by the exchange (429)"),
    500: Rule("retry", "server_error", "exchange server error (500)"),
    502: Rule("retry", "server_error", "exchange gateway error (502)"),
    503: Rule("retry", "unavailable", "exchange unavailable (503)"),
    504: Rule("retry", "timeout", "exchange gateway timeout (504)"),
}

# ccxt classes, most specific first: the first class the exception is an instance of decides.
CLASS_RULES: tuple[tuple[type[BaseException], Rule], ...] = (
    (cx.AccountSuspended, Rule("halt", "account_suspended", "the account is suspended")),
    (cx.PermissionDenied, Rule("halt", "permission", "the key lacks a permission for this call")),
    (cx.AuthenticationError, Rule("halt", "authentication", "the exchange refused the key")),
    (
        cx.ArgumentsRequired,
        Rule("halt", "configuration", "the request could not be built (key format or adapter bug)"),
    ),
    (cx.NotSupported, Rule("halt", "configuration", "the exchange does not support this call")),
    (cx.InvalidProxySettings, Rule("halt", "configuration", "invalid proxy settings")),
    (cx.ExchangeClosedByUser, Rule("halt", "closed", "the exchange client was closed")),
    (cx.InsufficientFunds, Rule("reject", "insufficient_funds", "insufficient funds")),
    (cx.OrderNotFound, Rule("reject", "order_not_found", "order not found at the exchange")),
    (cx.DuplicateOrderId, Rule("reject", "duplicate_client_id", "the client order id is already in use")),
    (cx.InvalidOrder, Rule("reject", "invalid_order", "the exchange refused the order")),
    (cx.BadSymbol, Rule("reject", "bad_symbol", "unknown or disabled product")),
    (cx.MarketClosed, Rule("reject", "market_closed", "the market is closed")),
    (cx.BadRequest, Rule("reject", "bad_request", "the exchange refused the request")),
    (cx.OperationRejected, Rule("reject", "rejected", "the exchange refused the operation")),
    (cx.ChecksumError, Rule("retry", "network", "inconsistent data from the exchange")),
    (
        cx.InvalidNonce,
        Rule("halt", "clock_skew", "request timestamp refused: the local clock is off (check NTP)"),
    ),
    (cx.RateLimitExceeded, Rule("retry", "rate_limited", "rate limited by the exchange")),
    (cx.DDoSProtection, Rule("retry", "rate_limited", "throttled by the exchange's DDoS protection")),
    (cx.OnMaintenance, Rule("retry", "maintenance", "the exchange is under maintenance")),
    (cx.RequestTimeout, Rule("retry", "timeout", "no answer in time (the request may have been executed)")),
    (cx.ExchangeNotAvailable, Rule("retry", "unavailable", "the exchange is unreachable or unavailable")),
    (cx.NetworkError, Rule("retry", "network", "network error")),
    (cx.BadResponse, Rule("retry", "bad_response", "unreadable answer (the request may have been executed)")),
    (cx.CancelPending, Rule("retry", "cancel_pending", "a cancel is still pending")),
    (cx.OperationFailed, Rule("retry", "network", "the operation failed in transit")),
    (cx.ExchangeError, Rule("reject", "exchange_error", "the exchange returned an error")),
    (cx.BaseError, Rule("halt", "unexpected", "unexpected exchange client error")),
    # Outside ccxt: transport failures are worth a retry; anything else is a bug and stops the profile.
    (
        asyncio.TimeoutError,
        Rule("retry", "timeout", "no answer in time (the request may have been executed)"),
    ),
    (ConnectionError, Rule("retry", "network", "connection error")),
    (OSError, Rule("retry", "network", "operating system I/O error")),
)

FALLBACK = Rule("halt", "internal", "internal error in the execution adapter")


def rule_for(exc: BaseException, http_status: int | None = None) -> Rule:
    """The table lookup alone: Coinbase's words, then the status (when known), then the first matching class."""
    status = http_status if http_status is not None else getattr(exc, "http_status", None)
    if isinstance(exc, cx.BaseError):
        text = str(exc).lower()
        for needle, rule in MESSAGE_RULES:
            if needle in text:
                return rule
    if isinstance(status, int) and status in STATUS_RULES:
        return STATUS_RULES[status]
    for cls, rule in CLASS_RULES:
        if isinstance(exc, cls):
            return rule
    return FALLBACK


def _no_redaction(text: str) -> str:
    return text


def translate(
    exc: BaseException,
    *,
    http_status: int | None = None,
    redact: Callable[[str], str] = _no_redaction,
    context: str = "",
) -> ExecutionError:
    """Our error for `exc` (already ours: returned unchanged). The reason names the rule, then the library's
    words, shortened and redacted."""
    if isinstance(exc, ExecutionError):
        return exc
    status = http_status if http_status is not None else getattr(exc, "http_status", None)
    rule = rule_for(exc, status)
    # Non-ccxt exceptions are bugs or transport failures: their text may hold anything, so only the type is kept.
    detail = redact(str(exc)) if isinstance(exc, cx.BaseError) else ""
    detail = " ".join(detail.split())[:MAX_DETAIL]
    parts = [f"{context}: " if context else "", rule.why, f" [{type(exc).__name__}"]
    parts.append(f", HTTP {status}]" if isinstance(status, int) else "]")
    if detail:
        parts.append(f": {detail}")
    return _CLASS[rule.outcome](
        "".join(parts), kind=rule.kind, http_status=status if isinstance(status, int) else None
    )


def table_rows() -> list[tuple[str, Outcome, str]]:
    """The table as text rows (docs/execution.md is generated from the same data)."""
    rows: list[tuple[str, Outcome, str]] = [(f'text "{t}"', r.outcome, r.why) for t, r in MESSAGE_RULES]
    rows += [(f"HTTP {s}", r.outcome, r.why) for s, r in STATUS_RULES.items()]
    rows += [(cls.__name__, r.outcome, r.why) for cls, r in CLASS_RULES]
    rows.append(("anything else", FALLBACK.outcome, FALLBACK.why))
    return rows
