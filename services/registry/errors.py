"""The registry's errors, re-exported by services/registry/domain.py (where they are used and documented).

Apart from domain.py because mypyc compiles that module (scripts/native_modules.txt) and cannot compile a
subclass of a built-in exception other than Exception; here they stay ordinary classes. Pure: no I/O.
"""

from __future__ import annotations

__all__ = ["ClaimsLostError", "NonceExhaustedError"]


class NonceExhaustedError(RuntimeError):
    """No unique plan within nonces 0..max_nonce."""


class ClaimsLostError(RuntimeError):
    """A guarded claim found that Redis no longer holds the state this registry built on.

    ``reason`` is ``NOT_READY`` (the ready key is gone: Redis was flushed, restarted without persistence or
    evicted keys; nobody has rebuilt yet) or ``STALE`` (another replica rebuilt: ``generation`` is the new
    one). Nothing was written. The registry recovers (docs/registry.md section 12) and claims again.
    """

    def __init__(self, reason: str, generation: str | None = None) -> None:
        super().__init__(
            f"registry claims lost ({reason}"
            + (f", live generation {generation}" if generation else "")
            + "): rebuild from the plans topic before claiming"
        )
        self.reason = reason
        self.generation = generation
