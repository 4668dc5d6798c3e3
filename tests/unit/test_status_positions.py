"""`mpctl status` shows what an account holds that the system did not trade, apart from its own positions."""

from __future__ import annotations

from pathlib import Path

import orjson

from mpctl.commands_ops import _positions_cell, _profiles_from_files


def _summary(untracked: dict[str, str] | None) -> dict[str, object]:
    prof: dict[str, object] = {
        "trades": 2,
        "win_rate": 0.5,
        "realized_pnl": "1.5",
        "final_equity": "1001.5",
        "max_drawdown_pct": 0.1,
        "open_positions": {"ETH/USDC": "0.25"},
        "halts": [],
    }
    if untracked is not None:
        prof["untracked_holdings"] = untracked
    return {"profiles": {"profile_a": prof}}


def test_status_lists_untracked_holdings_after_the_systems_positions(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_bytes(orjson.dumps(_summary({"BTC": "0.5"})))
    (p,) = _profiles_from_files(tmp_path).values()
    assert p["untracked_holdings"] == {"BTC": "0.5"}
    assert _positions_cell(p) == "ETH/USDC=0.25 BTC=0.5 (untracked)"


def test_status_of_a_run_without_account_snapshots_shows_its_positions_only(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_bytes(orjson.dumps(_summary(None)))  # an older run's summary
    (p,) = _profiles_from_files(tmp_path).values()
    assert p["untracked_holdings"] == {}
    assert _positions_cell(p) == "ETH/USDC=0.25"
    assert _positions_cell({"open_positions": {}, "untracked_holdings": {}}) == "-"
