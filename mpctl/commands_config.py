"""`mpctl config validate FILE`: the verdict on a profiles file, with every problem named."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from shared.config import ConfigError, config_warnings, load_config


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="check configuration files")
    csub = p.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="validate a profiles file (exit 1 on error)")
    v.add_argument(
        "file", type=Path, nargs="?", default=None, help="default: the local file, else the template"
    )
    v.set_defaults(handler=validate)


def validate(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return 1
    for w in config_warnings(cfg):
        print(f"warning: {w}", file=sys.stderr)
    enabled = list(cfg.enabled_profiles())
    print(
        f"OK: {args.file or 'default config'}: {len(cfg.profiles)} profile(s), enabled {enabled}, "
        f"mode {cfg.system.mode}, products {len(cfg.all_products())}"
    )
    return 0
