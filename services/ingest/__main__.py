"""python -m services.ingest [--source coinbase|replay] [--data DIR [--hours N | --start/--end] [--speed X]]
[--rest-url URL] [--ws-url URL] [--interval 1m..1d] [--metrics-port P] [--metrics-addr A]

`--source` defaults to `replay` when `--data` is given, else to `system.market_data.source`."""

from __future__ import annotations

import argparse
import math
import sys
from datetime import datetime
from pathlib import Path

from services.ingest.bootstrap import LiveSourceOptions, ReplayOptions, bootstrap, bootstrap_live
from services.ingest.live_domain import IngestError
from shared.candles import CandleFileError
from shared.config import INTERVAL_SECONDS
from shared.runtime import add_metrics_args, base_parser, main_entry, run_service, settings_from_args


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(v) and 0 < v <= 1_000_000):
        raise argparse.ArgumentTypeError(f"must be a number above 0 and at most 1,000,000, got {text!r}")
    return v


def _speed(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _positive(text)


def _iso_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO time (e.g. 2021-08-01T00:00:00+00:00): {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    p = base_parser("ingest")
    p.add_argument(
        "--data", default=None, help="replay: folder of candle files (default: system.market_data.data_dir)"
    )
    p.add_argument("--hours", type=_positive, default=None, help="replay: the first N hours of the data")
    p.add_argument("--start", type=_iso_time, default=None, help="replay: ISO time of the first candle")
    p.add_argument("--end", type=_iso_time, default=None, help="replay: ISO time before which candles go out")
    p.add_argument(
        "--speed", type=_speed, default=0.0, help="replay: N times real time (0: as fast as possible)"
    )
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
    settings = settings_from_args(args)
    try:
        cfg = settings.load()
    except ValueError as err:
        print(f"ingest: {err}", file=sys.stderr)
        return 2
    source = args.source or ("replay" if args.data is not None else cfg.system.market_data.source)
    if source == "coinbase":
        try:
            cli = LiveSourceOptions(interval=args.interval, rest_url=args.rest_url, ws_url=args.ws_url)
            live = bootstrap_live(settings, cli, overrides={"config": cfg})
            return run_service(live.run)
        except IngestError as err:
            print(f"ingest: {err}", file=sys.stderr)
            return 2
    options = ReplayOptions(
        data_dir=Path(args.data if args.data is not None else cfg.system.market_data.data_dir),
        start=args.start,
        end=args.end,
        hours=args.hours,
        speed=args.speed,
    )
    svc = bootstrap(settings, options, overrides={"config": cfg})
    try:
        svc.load()
    except (CandleFileError, ValueError) as err:
        # A bad data file is the user's to fix: say which file and line, without a traceback.
        print(f"ingest: {err}", file=sys.stderr)
        return 2
    return run_service(svc.run)


if __name__ == "__main__":
    sys.exit(main())
