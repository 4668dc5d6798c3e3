"""python -m services.strategy --profile ID --config FILE --bootstrap HOST:PORT [--metrics-port P]
[--metrics-addr ADDR]"""

from __future__ import annotations

import os
import sys

from services.strategy.bootstrap import bootstrap
from shared.runtime import base_parser, main_entry, settings_from_args


def main(argv: list[str] | None = None) -> int:
    p = base_parser("strategy", needs_profile=True)
    p.add_argument("--web-port", default="0")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("MPCTL_STRATEGY_METRICS_PORT", "0")),
        help="serve Prometheus metrics on ADDR:PORT (0: off, the default; env MPCTL_STRATEGY_METRICS_PORT)",
    )
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    args = main_entry(argv, "strategy", p)
    if args.metrics_port < 0 or args.metrics_port > 65535:
        p.error(f"--metrics-port must be 0..65535, got {args.metrics_port}")
    settings = settings_from_args(
        args, web_port=args.web_port, metrics_port=args.metrics_port, metrics_addr=args.metrics_addr
    )
    return bootstrap(settings).run()


if __name__ == "__main__":
    sys.exit(main())
