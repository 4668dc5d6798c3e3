"""The HTML report from a small synthetic run directory: self-contained, charts drawn, numbers right."""

from __future__ import annotations

import argparse
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
