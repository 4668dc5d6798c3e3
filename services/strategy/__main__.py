"""python -m services.strategy --profile ID --config FILE --bootstrap HOST:PORT"""

from __future__ import annotations

import sys

from services.strategy.bootstrap import bootstrap
from shared.runtime import base_parser, main_entry, settings_from_args


def main(argv: list[str] | None = None) -> int:
    p = base_parser("strategy", needs_profile=True)
    p.add_argument("--web-port", default="0")
    args = main_entry(argv, "strategy", p)
    return bootstrap(settings_from_args(args, web_port=args.web_port)).run()


if __name__ == "__main__":
    sys.exit(main())
