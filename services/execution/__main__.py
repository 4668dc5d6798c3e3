"""python -m services.execution --profile ID --config FILE --bootstrap HOST:PORT"""

from __future__ import annotations

import sys

from services.execution.bootstrap import bootstrap
from shared.runtime import base_parser, main_entry, run_service, settings_from_args


def main(argv: list[str] | None = None) -> int:
    p = base_parser("execution", needs_profile=True)
    p.add_argument(
        "--allow-plaintext-credentials",
        action="store_true",
        help="live mode: accept credentials written in the YAML (refused by default; use `mpctl secrets set`)",
    )
    args = main_entry(argv, "execution", p)
    flag = "1" if args.allow_plaintext_credentials else None
    return run_service(bootstrap(settings_from_args(args, allow_plaintext_credentials=flag)).run)


if __name__ == "__main__":
    sys.exit(main())
