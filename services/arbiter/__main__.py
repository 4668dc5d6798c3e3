"""python -m services.arbiter --config FILE --bootstrap HOST:PORT [--metrics-port P] [--metrics-addr A] [--instance N]

Several may run at once (same namespace): they share the intents partitions (docs/arbiter.md)."""

from __future__ import annotations

import sys

from services.arbiter.bootstrap import bootstrap
from shared.runtime import (
    add_metrics_args,
    base_parser,
    main_entry,
    run_service,
    settings_from_args,
)


def main(argv: list[str] | None = None) -> int:
    p = base_parser("arbiter")
    add_metrics_args(p, "0: off, so several arbiters never clash")
    args = main_entry(argv, "arbiter", p)
    return run_service(bootstrap(settings_from_args(args)).run)


if __name__ == "__main__":
    sys.exit(main())
