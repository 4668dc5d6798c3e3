"""python -m services.ingest --data DIR [--hours N | --start/--end] [--speed X]"""

from __future__ import annotations

import sys

from services.ingest.bootstrap import bootstrap
from shared.candles import CandleFileError
from shared.runtime import base_parser, main_entry, run_service, settings_from_args


def main(argv: list[str] | None = None) -> int:
    p = base_parser("ingest")
    p.add_argument("--data", default="data/market")
    p.add_argument("--hours", default=None)
    p.add_argument("--start", default=None)
    p.add_argument("--end", default=None)
    p.add_argument("--speed", default="0")
    args = main_entry(argv, "ingest", p)
    svc = bootstrap(
        settings_from_args(args, data=args.data, hours=args.hours, start=args.start, end=args.end, speed=args.speed)
    )
    try:
        svc.load()
    except (CandleFileError, ValueError) as err:
        # A bad data file is the user's to fix: say which file and line, without a traceback.
        print(f"ingest: {err}", file=sys.stderr)
        return 2
    return run_service(svc.run)


if __name__ == "__main__":
    sys.exit(main())
