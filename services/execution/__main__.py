"""python -m services.execution --profile ID --config FILE --bootstrap HOST:PORT [--metrics-port P] [--metrics-addr A]
[--exchange-api-base URL] [--allow-plaintext-credentials]

With system.mode: live it starts only when MPCTL_LIVE=1 is in its environment (bootstrap.live_consent_problem)."""

from __future__ import annotations

import os
import sys

from services.execution.bootstrap import ExecutionOptions, bootstrap, live_consent_problem
from shared.runtime import (
    add_metrics_args,
    base_parser,
    main_entry,
    run_service,
    settings_from_args,
)


def main(argv: list[str] | None = None) -> int:
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
    args = main_entry(argv, "execution", p)
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
