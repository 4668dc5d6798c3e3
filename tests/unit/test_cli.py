"""mpctl's entry point: one table says which module registers each command, so a command imports only its own."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from mpctl.cli import COMMAND_MODULES, build_parser


def _choices(parser: argparse.ArgumentParser) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def test_every_registered_command_is_in_the_table_and_nothing_else() -> None:
    assert _choices(build_parser()) == set(COMMAND_MODULES)


@pytest.mark.parametrize("command", sorted(COMMAND_MODULES))
def test_each_command_alone_registers_itself(command: str) -> None:
    assert command in _choices(build_parser(command))


def test_backtest_does_not_load_ccxt() -> None:
    # ccxt is the exchange adapters' business; a backtest (paper only) must not pay for importing it.
    code = "import sys; from mpctl.cli import build_parser; build_parser('backtest'); print('ccxt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
