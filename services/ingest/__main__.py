"""python -m services.ingest [--source coinbase|replay] [--data DIR [--hours N | --start/--end] [--speed X]]
[--rest-url URL] [--ws-url URL] [--interval 1m..1d] [--metrics-port P] [--metrics-addr A]

`--source` defaults to `replay` when `--data` is given, else to `system.market_data.source`."""

from __future__ import annotations

import sys

from services.ingest.bootstrap import bootstrap, bootstrap_live
from services.ingest.live_domain import IngestError
from shared.candles import CandleFileError
from shared.config import INTERVAL_SECONDS
from shared.runtime import add_metrics_args, base_parser, main_entry, run_service, settings_from_args


def main(argv: list[str] | None = None) -> int:
    p = base_parser("ingest")
    p.add_argument(
        "--data", default=None, help="replay: folder of candle files (default: system.market_data.data_dir)"
    )
    p.add_argument("--hours", default=None)
    p.add_argument("--start", default=None)
    p.add_argument("--end", default=None)
    p.add_argument("--speed", default="0")
    p.add_argument(
        "--rest-url", default=None, help="coinbase: REST base URL (default: system.market_data.rest_url)"
    )
    p.add_argument(
        "--ws-url", default=None, help="coinbase: websocket URL (default: system.market_data.ws_url)"
    )
    p.add_argument(
        "--interval", default=None, choices=list(INTERVAL_SECONDS), help="coinbase: candle interval"
    )
    add_metrics_args(p)
    args = main_entry(argv, "ingest", p)
    settings = settings_from_args(
        args,
        data=args.data,
        hours=args.hours,
        start=args.start,
        end=args.end,
        speed=args.speed,
        rest_url=args.rest_url,
        ws_url=args.ws_url,
        interval=args.interval,
        metrics_port=str(args.metrics_port),
        metrics_addr=args.metrics_addr,
    )
    try:
        cfg = settings.load()
    except ValueError as err:
        print(f"ingest: {err}", file=sys.stderr)
        return 2
    source = args.source or ("replay" if args.data is not None else cfg.system.market_data.source)
    if source == "coinbase":
        try:
            live = bootstrap_live(settings, overrides={"config": cfg})
            return run_service(live.run)
        except IngestError as err:
            print(f"ingest: {err}", file=sys.stderr)
            return 2
    if args.data is None:
        settings = settings.model_copy(
            update={"extra": settings.extra | {"data": str(cfg.system.market_data.data_dir)}}
        )
    svc = bootstrap(settings, overrides={"config": cfg})
    try:
        svc.load()
    except (CandleFileError, ValueError) as err:
        # A bad data file is the user's to fix: say which file and line, without a traceback.
        print(f"ingest: {err}", file=sys.stderr)
        return 2
    return run_service(svc.run)


if __name__ == "__main__":
    sys.exit(main())
