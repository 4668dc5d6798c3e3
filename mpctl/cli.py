"""`mpctl`: the operator's command line. Each sub-command module registers itself here."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from shared.broker_noise import install_broker_noise_filter

Handler = Callable[[argparse.Namespace], int]


# Command -> the module that registers it. `mpctl backtest ...` imports only mpctl.backtest: importing every
# command (ccxt among them) costs about a second, which a short command would otherwise pay each time.
COMMAND_MODULES: dict[str, str] = {
    "config": "mpctl.commands_config",
    "infra": "mpctl.infra",
    "demo": "mpctl.commands_demo",
    "run": "mpctl.commands_run",
    "compose": "mpctl.compose",
    "plans": "mpctl.commands_plans",
    "lag": "mpctl.commands_ops",
    "status": "mpctl.commands_ops",
    "report": "mpctl.commands_ops",
    "selftest": "mpctl.selftest",
    "send": "mpctl.commands_send",
    "secrets": "mpctl.commands_secrets",
    "exchange": "mpctl.commands_exchange",
    "live": "mpctl.commands_live",
    "k8s": "mpctl.k8s",
    "backtest": "mpctl.backtest",
    "audit": "mpctl.audit",
    "bus": "mpctl.commands_bus",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or with `only` that command (when it names one)."""
    parser = argparse.ArgumentParser(prog="mpctl", description="Multi-profile Coinbase trading system")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = (
        [COMMAND_MODULES[only]] if only in COMMAND_MODULES else list(dict.fromkeys(COMMAND_MODULES.values()))
    )
    for name in wanted:
        importlib.import_module(name).register(sub)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def setup_cli_logging() -> None:
    """The commands set up no logging: Python prints WARNING and up on stderr (`logging.lastResort`). That
    handler gets the filter that collapses a broker outage's connection errors (shared/broker_noise.py), which
    the commands' own Kafka clients (a demo's progress readers) would otherwise print by the thousand."""
    if logging.lastResort is not None:
        install_broker_noise_filter(logging.lastResort)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_cli_logging()
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    # SIGTERM and SIGHUP stop a command as Ctrl-C does: its `finally` blocks run (a demo stops its services,
    # a run collects). Commands that handle them themselves (`mpctl run`) install their own handlers.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
