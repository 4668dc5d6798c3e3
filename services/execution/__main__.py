"""python -m services.execution --profile ID[,ID...] --config FILE --bootstrap HOST:PORT [--metrics-port P]
[--metrics-addr A] [--exchange-api-base URL] [--allow-plaintext-credentials]

With system.mode: live it starts only when MPCTL_LIVE=1 is in its environment (bootstrap.live_consent_problem).
Several profiles (`--profile a,b,c`, MPCTL_PROFILES_PER_PROCESS): one process imports the worker's code
once and forks one worker process per profile (shared/forkhost.py), each the only holder of its own credentials."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from services.execution.bootstrap import ExecutionOptions, bootstrap, live_consent_problem
from shared.runtime import (
    add_metrics_args,
    base_parser,
    main_entry,
    run_service,
    serve_hosted,
    settings_from_args,
)

# What a worker imports once it runs (the snapshots' Redis client, the heartbeat): loaded by a host before it
# forks, so its workers share them.
PRELOAD = ("redis.asyncio", "shared.heartbeat", "concurrent.futures.thread", "queue")


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    p = base_parser("execution", needs_profile=True)
    p.add_argument(
        "--allow-plaintext-credentials",
        action="store_true",
        help="live mode: accept credentials written in the YAML (refused by default; use `mpctl secrets set`)",
    )
    add_metrics_args(p)
    p.add_argument(
        "--exchange-api-base",
        default=None,
        help="live mode: send the exchange's REST calls to this base URL instead of Coinbase's (a test peer)",
    )
    hosted = serve_hosted("execution", p, args_in, main, PRELOAD)
    if hosted is not None:
        return hosted
    args = main_entry(args_in, "execution", p)
    options = ExecutionOptions(
        exchange_api_base=args.exchange_api_base, allow_plaintext_credentials=args.allow_plaintext_credentials
    )
    svc = bootstrap(settings_from_args(args), options)
    problem = live_consent_problem(svc.cfg, os.environ) or svc.live_problem()
    if problem is not None:
        print(f"execution: {problem}", file=sys.stderr)
        return 2
    return run_service(svc.run)


if __name__ == "__main__":
    sys.exit(main())
