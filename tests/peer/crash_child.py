"""A throw-away execution worker for the crash test: it decrypts its profile's credentials from the store
(key file from MPCTL_SECRETS_KEY_FILE), sends one ExecuteOrder through LiveExecution to the peer, and appends
every event it would publish to a JSON-lines journal. The test kills it with SIGKILL while the peer holds the
answer to the order.

    python -m tests.peer.crash_child --api-base URL --store PATH --profile ID --order ORDER.json --journal OUT.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path

from services.execution.ccxt_adapter import open_exchange
from services.execution.credentials import CredentialStore, key_source_from_env, resolve_credentials
from services.execution.live import LiveExecution
from shared.codec import decode, encode
from shared.config import load_config


async def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    profile = cfg.profiles[args.profile]
    store = CredentialStore.load(args.store)
    store.unlock(key_source_from_env(store.kdf_name))
    creds = resolve_credentials(args.profile, profile, store, allow_plaintext=False)
    port = await open_exchange(
        creds, retry_attempts=0, products=["BTC/USDC"], api_base=args.api_base, timeout_s=60.0
    )
    live = LiveExecution(
        args.profile, profile, port, clock=lambda: datetime.now(UTC), poll_interval_s=0.05, protect=False
    )
    order = decode(Path(args.order).read_bytes())
    print("sending", flush=True)
    events = await live.handle(order)
    with open(args.journal, "ab") as f:
        for e in events:
            f.write(encode(e) + b"\n")
    await port.close()
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for a in ("--api-base", "--store", "--profile", "--order", "--journal", "--config"):
        p.add_argument(a, required=True)
    sys.exit(asyncio.run(main(p.parse_args())))
