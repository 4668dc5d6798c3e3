"""python -m services.execution --profile ID --config FILE --bootstrap HOST:PORT"""

from __future__ import annotations

import sys

from services.execution.bootstrap import bootstrap
from shared.runtime import base_parser, main_entry, run_service, settings_from_args


def main(argv: list[str] | None = None) -> int:
    args = main_entry(argv, "execution", base_parser("execution", needs_profile=True))
    return run_service(bootstrap(settings_from_args(args)).run)


if __name__ == "__main__":
    sys.exit(main())
