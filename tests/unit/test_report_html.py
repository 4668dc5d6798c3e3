"""The HTML report from a small synthetic run directory: self-contained, charts drawn, numbers right."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from mpctl import commands_ops
from services.monitor.metrics import pearson, simple_returns
from services.monitor.report_html import (
    correlation_matrix,
    drawdown_series,
    load_run,
    nice_ticks,
    render_report,
    trade_rows,
    write_report,
)
from tests.unit.synthetic_run import build_run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    build_run(tmp_path / "run")
    return tmp_path / "run"


def test_report_is_self_contained_and_has_every_section(run_dir: Path) -> None:
    page = render_report(load_run(run_dir))
    assert page.startswith("<!DOCTYPE html>")
    # Nothing to fetch at view time: no script, no external reference of any kind.
    assert "<script" not in page
    assert not re.search(r"""(src|href)\s*=""", page)
    assert "http://" not in page and "https://" not in page and "@import" not in page
    for heading in (
        "Profiles",
        "Equity and drawdown",
        "Correlation of the profiles' step returns",
        "Exits by reason",
        "Arbiter",
        "Plans per epoch",
        "Trades",
        "Alerts",
    ):
        assert f"<h2>{heading}</h2>" in page
    # Two line charts with one path per profile each (the drawdown chart adds a filled area per profile).
    paths = re.findall(r'<path d="M[0-9.]+,[0-9.]+ L', page)
    assert len(paths) >= 2 + 2 * 2
    assert page.count("<svg") >= 4  # equity, drawdown, decisions, strategy timeline


def test_report_escapes_text_from_the_run(run_dir: Path) -> None:
    page = render_report(load_run(run_dir))
    assert "&lt;profile_a&gt; sell" in page  # a decision's reason
    assert "<profile_a>" not in page


def test_report_numbers(run_dir: Path) -> None:
    run = load_run(run_dir)
    rows = trade_rows(run.fills)
    sells = [r for r in rows if r["side"] == "sell"]
    assert [float(r["pnl"]) for r in sells] == [
        pytest.approx(10.0),
        pytest.approx(-10.0),
    ]  # (41000-40000)*0.01, (29-30)*10
    curves = {
        pid: [(float(i), float(v)) for i, (_, v) in enumerate(p["equity_curve"])]
        for pid, p in run.summary["profiles"].items()
    }
    m = correlation_matrix(curves)
    expected = pearson(
        simple_returns([v for _, v in curves["profile_a"]]),
        simple_returns([v for _, v in curves["profile_b"]]),
    )
    assert m[("profile_a", "profile_b")] == pytest.approx(expected)
    assert m[("profile_a", "profile_b")] == m[("profile_b", "profile_a")]
    assert m[("profile_a", "profile_a")] == 1.0
    dd = drawdown_series([(0, 100.0), (1, 110.0), (2, 99.0), (3, 120.0)], 100.0)
    assert [round(v, 6) for _, v in dd] == [0.0, 0.0, -10.0, 0.0]
    assert nice_ticks(9950, 10100) == [9950, 10000, 10050, 10100]


def test_correlation_is_none_for_a_flat_curve() -> None:
    flat = [(float(i), 100.0) for i in range(10)]
    moving = [(float(i), 100.0 + i * (-1) ** i) for i in range(10)]
    assert correlation_matrix({"a": flat, "b": moving})[("a", "b")] is None


def test_mpctl_report_writes_the_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    commands_ops.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "elsewhere" / "r.html"
    args = parser.parse_args(["report", "--run", str(run_dir), "--out", str(out)])
    assert args.handler(args) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert str(out) in capsys.readouterr().out
    assert write_report(run_dir) == run_dir / "report.html"


def test_mpctl_report_on_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    commands_ops.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "--run", str(tmp_path)])
    assert args.handler(args) == 1
    assert "summary.json not found" in capsys.readouterr().err


def test_report_shows_exits_by_reason_and_halts(run_dir: Path) -> None:
    path = run_dir / "summary.json"
    path.write_text(json.dumps(json.loads(path.read_text()), sort_keys=True))  # as the collector writes it
    page = render_report(load_run(run_dir))
    section = page[page.index("<h2>Exits by reason</h2>") : page.index("Sell orders with at least one fill")]
    heads = re.findall(r"<th>([^<]*)</th>", section)
    assert heads == [
        "profile",
        "exit signal",
        "stop loss",
        "take profit",
        "flatten",
        "halt",
        "manual",
        "orders timed out",
    ]
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", section)]
    assert ["profile_a", "0", "0", "1", "0", "0", "0", "0"] in cells
    assert ["profile_b", "1", "0", "0", "0", "0", "0", "1"] in cells
    assert "1 halt(s)" in page and "daily_loss" in page


def test_printed_table_shows_exits_by_reason_and_the_fill_based_pairs(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mpctl.commands_demo import print_table

    summary = load_run(run_dir).summary
    summary["counters"].update(delayed=0, internal_cross_opportunities=0)
    summary["desync"] = {
        "gaps": {"pairs": 1, "min_ms": 600.0, "median_ms": 600.0, "p95_ms": 600.0},
        "min_cross_profile_gap_ms": 500,
        "below_min": 0,
        "opposite_side_pairs_within_window": 0,
        "protective_opposite_pairs_within_window": 2,
    }
    print_table(summary)
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("exits by reason"))
    assert head.split() == [
        "exits",
        "by",
        "reason",
        "exit_signal",
        "stop_loss",
        "take_profit",
        "flatten",
        "halt",
        "manual",
        "timed_out",
    ]
    exits = lines[lines.index(head) + 1 :]
    assert next(line for line in exits if line.startswith("profile_b ")).split() == [
        "profile_b",
        "1",
        "0",
        "0",
        "0",
        "0",
        "0",
        "1",
    ]
    assert any("opposite-side pairs (from the fills" in line and "protective exits" in line for line in lines)
