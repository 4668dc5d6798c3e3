"""The HTML report of a real demo run, opened in headless Chromium (Debian's `chromium`): it loads without
console errors, the SVG charts have their paths, and a screenshot is kept in test-artifacts/report.png."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mpctl.infra import Endpoints
from services.monitor.report_html import write_report

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CONSOLE = re.compile(r":CONSOLE[:(]")  # Chromium's log line for every console message and uncaught error


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() == 0 and not os.environ.get("MPCTL_SKIP_CHROMIUM"):
        subprocess.run(["bash", str(ROOT / "scripts" / "ensure-chromium.sh")], check=False, timeout=900)
        for name in ("chromium", "chromium-browser"):
            found = shutil.which(name)
            if found:
                return found
    pytest.skip(
        "chromium is not installed and could not be installed (scripts/ensure-chromium.sh needs root and apt)"
    )


def run_chromium(
    binary: str, profile: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE.search(line)]


@pytest.mark.timeout(900)
def test_report_renders_in_headless_chromium(infra: Endpoints, tmp_path: Path) -> None:
    binary = chromium()
    out = tmp_path / "demo"
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=infra.kafka.servers, REDIS_URL=infra.redis_url, CI="true")
    demo = subprocess.run(
        [sys.executable, "-m", "mpctl.cli", "demo", "--out", str(out), "--hours", "480"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert demo.returncode == 0, demo.stderr
    report = write_report(out)
    url = report.resolve().as_uri()

    dom = run_chromium(binary, tmp_path / "p1", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_lines(dom.stderr) == [], console_lines(dom.stderr)
    html = dom.stdout
    svgs = re.findall(r"<svg\b.*?</svg>", html, flags=re.S)
    assert len(svgs) >= 4
    equity, drawdown = svgs[0], svgs[1]
    for chart in (equity, drawdown):
        paths = re.findall(r'<path d="(M[^"]+)"', chart)
        assert len(paths) >= 2, "one path per profile"
        assert all(p.count("L") > 100 for p in paths), "a path per profile with a point per step"
    assert "profile_a" in html and "profile_b" in html

    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "report.png"
    png.unlink(missing_ok=True)
    shot = run_chromium(
        binary, tmp_path / "p2", f"--screenshot={png}", "--window-size=1400,2000", "--hide-scrollbars", url
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert console_lines(shot.stderr) == []
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a drawn page, not a blank one


def test_console_error_detection_works(tmp_path: Path) -> None:
    """The check above would see an error: a page that logs one is caught."""
    binary = chromium()
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><script>console.error("boom"); missing();</script></body></html>'
    )
    r = run_chromium(binary, tmp_path / "p", "--dump-dom", bad.resolve().as_uri())
    lines = console_lines(r.stderr)
    assert any('"boom"' in x for x in lines) and any("ReferenceError" in x for x in lines)
