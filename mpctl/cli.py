"""`mpctl`: the operator's command line. Each sub-command module registers itself here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    import mpctl.backtest as backtest
    import mpctl.commands_config as commands_config
    import mpctl.commands_demo as commands_demo
    import mpctl.commands_exchange as commands_exchange
    import mpctl.commands_ops as commands_ops
    import mpctl.commands_plans as commands_plans
    import mpctl.commands_secrets as commands_secrets
    import mpctl.commands_send as commands_send
    import mpctl.compose as compose
    import mpctl.infra as infra
    import mpctl.k8s as k8s
    import mpctl.selftest as selftest

    parser = argparse.ArgumentParser(prog="mpctl", description="Multi-profile Coinbase trading system")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (commands_config, infra, commands_demo, compose, commands_plans, commands_ops, selftest, commands_send, commands_secrets, commands_exchange, k8s, backtest):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
