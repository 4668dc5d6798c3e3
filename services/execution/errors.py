"""What an exchange error means for the execution worker: retry, reject the order, or halt the profile. Our own
small hierarchy, pure: the adapters translate their library's errors into it (ccxt's: ccxt_errors.py, a table).

Outcomes:
- RetryableError: the request may succeed later (network, 5xx, 429, maintenance). Retried with backoff up to
  `retry_attempts`; an order create is resent with the same client order id, which cannot make a second order
  (Advanced Trade de-duplicates it; on the Exchange API the adapter looks it up first).
- RejectedError: this order cannot be placed (insufficient funds, invalid size or price, unknown product). The
  worker emits an order event with status `rejected` and the reason; nothing else stops.
- HaltError: the profile cannot trade safely (bad or revoked key, missing permission, clock skew, adapter bug).
  The worker halts the profile and alerts; retrying would only repeat the failure.

Messages never carry credentials: the translation applies a `redact` callable (the adapter passes one that masks
the profile's key, secret and passphrase) to any text taken from the underlying exception.
"""

from __future__ import annotations

from typing import Literal

Outcome = Literal["retry", "reject", "halt"]


class ExecutionError(Exception):
    """Base of our hierarchy. `reason` is a short, secret-free sentence fit for an order event or an alert."""

    outcome: Outcome = "halt"

    def __init__(self, reason: str, *, kind: str = "", http_status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.http_status = http_status


class RetryableError(ExecutionError):
    outcome: Outcome = "retry"


class RejectedError(ExecutionError):
    outcome: Outcome = "reject"


class HaltError(ExecutionError):
    outcome: Outcome = "halt"


class UnknownOrderStateError(RetryableError):
    """Retries ran out while the exchange may hold the order: nothing may be resent until a lookup settles it."""


class NotOwnerError(Exception):
    """Raised by a send guard: this worker no longer holds the order's partition of its consumer group (a paused
    worker another member took over from), so nothing was sent and the order is its new owner's. Not an
    ExecutionError: no table translates it and no order event follows from it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
