"""`mpctl config validate FILE`: the verdict on a profiles file, with every problem named."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from shared.config import AppConfig, ConfigError, config_warnings, load_config


def register(sub: Any) -> None:
    p = sub.add_parser("config", help="check configuration files")
    csub = p.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="validate a profiles file (exit 1 on error)")
    v.add_argument(
        "file", type=Path, nargs="?", default=None, help="default: the local file, else the template"
    )
    v.set_defaults(handler=validate)


def load_for_command(path: Path | None) -> AppConfig | None:
    """The profiles file for a command: None (after saying why on stderr) when it is invalid; warnings printed."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        print(f"INVALID: {err}", file=sys.stderr)
        return None
    for w in config_warnings(cfg):
        print(f"warning: {w}", file=sys.stderr)
    return cfg


def validate(args: argparse.Namespace) -> int:
    cfg = load_for_command(args.file)
    if cfg is None:
        return 1
    enabled = list(cfg.enabled_profiles())
    print(
        f"OK: {args.file or 'default config'}: {len(cfg.profiles)} profile(s), enabled {enabled}, "
        f"mode {cfg.system.mode}, products {len(cfg.all_products())}"
    )
    return 0
