"""python -m services.monitor --namespace NS --bootstrap HOST:PORT [--audit-file F] [--metrics-port P] [--webhook URL]"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.monitor.bootstrap import MonitorOptions, bootstrap
from shared.runtime import base_parser, main_entry, run_service, settings_from_args


def parser() -> argparse.ArgumentParser:
    p = base_parser("monitor")
    p.add_argument(
        "--audit-file", type=Path, default=None, help="append the audit topic to this JSON-lines file"
    )
    p.add_argument(
        "--alerts-file", type=Path, default=None, help="also append every alert to this JSON-lines file"
    )
    p.add_argument(
        "--webhook",
        action="append",
        default=[],
        help="POST alerts as JSON to this URL (repeatable; also MPCTL_ALERT_WEBHOOKS, comma-separated)",
    )
    p.add_argument("--webhook-attempts", type=int, default=3)
    p.add_argument("--webhook-timeout", type=float, default=3.0, help="seconds per attempt")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ["MPCTL_MONITOR_METRICS_PORT"])
        if os.environ.get("MPCTL_MONITOR_METRICS_PORT")
        else None,
        help="serve Prometheus metrics on 127.0.0.1:PORT (0: any free port; default: none)",
    )
    p.add_argument(
        "--metrics-addr", default="127.0.0.1", help="address to serve metrics on (0.0.0.0 in a container)"
    )
    p.add_argument("--lag-interval", type=float, default=15.0, help="seconds between lag and health polls")
    p.add_argument(
        "--lag-threshold", type=int, default=1000, help="alert when a group's total lag exceeds this"
    )
    p.add_argument("--correlation-threshold", type=float, default=0.9)
    p.add_argument(
        "--correlation-window", type=int, default=48, help="steps in the rolling return correlation"
    )
    p.add_argument("--drain", action="store_true", help="exit once caught up with the topics' current end")
    p.add_argument(
        "--snapshot-file", type=Path, default=None, help="write the tracked per-profile view as JSON"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = main_entry(argv, "monitor", parser())
    env_hooks = [u.strip() for u in os.environ.get("MPCTL_ALERT_WEBHOOKS", "").split(",") if u.strip()]
    options = MonitorOptions(
        audit_file=args.audit_file,
        alerts_file=args.alerts_file,
        webhooks=tuple([*args.webhook, *env_hooks]),
        webhook_attempts=args.webhook_attempts,
        webhook_timeout_s=args.webhook_timeout,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        lag_interval_s=args.lag_interval,
        lag_threshold=args.lag_threshold,
        correlation_threshold=args.correlation_threshold,
        correlation_window=args.correlation_window,
        drain=args.drain,
        snapshot_file=args.snapshot_file,
    )
    return run_service(bootstrap(settings_from_args(args), options).run)


if __name__ == "__main__":
    sys.exit(main())
