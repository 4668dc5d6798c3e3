"""What the arbiter and the execution workers must compute alike for an order: its id and its de-sync delay.

Pure (no I/O, no clock, no randomness): each function's result depends on its arguments only, on every machine
and in every run, which is what makes a replay reproducible and a redelivery harmless.

- `client_order_id(intent_id)`: the exchange order an intent maps to. The same intent always gives the same
  id (a UUID in its 8-4-4-4-12 text form), so a retried or redelivered order is recognised, never sent twice.
- `desync_delay_ms(seed, intent_id, lo, hi)`: the seeded delay an execution worker waits after an order's
  `not_before` before sending it; always within [lo, hi] (lo when hi <= lo). The arbiter predicts each order's
  send time with the same function, and the paper exchange and the live worker wait it.
"""

from __future__ import annotations

import hashlib

from shared.clock import derived_id

__all__ = ["client_order_id", "desync_delay_ms"]


def client_order_id(intent_id: str) -> str:
    """A UUID derived from the intent id: the same intent always maps to the same exchange order."""
    h = derived_id("client-order", intent_id)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def desync_delay_ms(seed: str, intent_id: str, lo: int, hi: int) -> int:
    """Seeded, bounded delay: the same profile and intent always wait the same time (replay is reproducible)."""
    if hi <= lo:
        return lo
    u = int.from_bytes(hashlib.sha256(f"{seed}|desync|{intent_id}".encode()).digest()[:8], "big") / 2**64
    return lo + int(u * (hi - lo + 1))
