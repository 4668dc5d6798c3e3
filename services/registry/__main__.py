"""python -m services.registry --config FILE --bootstrap HOST:PORT --redis-url URL [--instance N]
[--metrics-port P] [--metrics-addr A] [--publish-lease-s S] [--clock auto|event|wall]"""

from __future__ import annotations

import sys

from pydantic import ValidationError

from services.registry.bootstrap import RegistryOptions, bootstrap
from shared.runtime import (
    add_metrics_args,
    base_parser,
    main_entry,
    run_service,
    settings_from_args,
)


def main(argv: list[str] | None = None) -> int:
    p = base_parser("registry")
    add_metrics_args(p, "0: off, so parallel replicas never clash")
    p.add_argument(
        "--publish-lease-s",
        type=float,
        default=10.0,
        help="seconds a decided plan may stay unpublished by its owner before another replica publishes it",
    )
    p.add_argument(
        "--clock",
        choices=("auto", "event", "wall"),
        default="auto",
        help="epochs follow the candles' event time (replay) or wall time (live); auto: wall in live mode",
    )
    args = main_entry(argv, "registry", p)
    try:
        options = RegistryOptions(publish_lease_s=args.publish_lease_s, clock=args.clock)
    except ValidationError as err:
        p.error(f"--publish-lease-s: {err.errors()[0]['msg']}, got {args.publish_lease_s}")
    return run_service(bootstrap(settings_from_args(args), options).run)


if __name__ == "__main__":
    sys.exit(main())
