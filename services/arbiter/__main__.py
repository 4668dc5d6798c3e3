"""python -m services.arbiter --config FILE --bootstrap HOST:PORT"""

from __future__ import annotations

import sys

from services.arbiter.bootstrap import bootstrap
from shared.runtime import base_parser, main_entry, run_service, settings_from_args


def main(argv: list[str] | None = None) -> int:
    args = main_entry(argv, "arbiter", base_parser("arbiter"))
    return run_service(bootstrap(settings_from_args(args)).run)


if __name__ == "__main__":
    sys.exit(main())
