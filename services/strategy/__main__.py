"""python -m services.strategy --profile ID --config FILE --bootstrap HOST:PORT [--metrics-port P]
[--metrics-addr ADDR]"""

from __future__ import annotations

import os
import sys

from services.strategy.bootstrap import bootstrap
from shared.runtime import add_metrics_args, base_parser, main_entry, settings_from_args


def main(argv: list[str] | None = None) -> int:
    p = base_parser("strategy", needs_profile=True)
    add_metrics_args(
        p,
        "0: off, the default; env MPCTL_STRATEGY_METRICS_PORT",
        default_port=int(os.environ.get("MPCTL_STRATEGY_METRICS_PORT", "0")),
    )
    args = main_entry(argv, "strategy", p)
    return bootstrap(settings_from_args(args)).run()


if __name__ == "__main__":
    sys.exit(main())
