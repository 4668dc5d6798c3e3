"""A run's report as one self-contained HTML page: inline CSS, SVG charts drawn here in Python, no script and no
URL to fetch, so it opens the same offline, from a mail attachment or a CI artefact.

Input is a run directory as `mpctl demo` writes it (summary.json, orders/fills/decisions/plans.jsonl, and when
present run.json and alerts.jsonl). Sections: per-profile summary, equity curves, drawdowns, correlation matrix
of the profiles' step returns, arbiter statistics, plans per epoch (timeline and table), trades, alerts.

Everything here is pure except `load_run` and `write_report`.
"""

from __future__ import annotations

import html
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from services.monitor.domain import exit_reason_order
from services.monitor.metrics import pearson
from shared.book import simple_returns

PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
]
MAX_POINTS = 1500
Point = tuple[float, float]


@dataclass
class RunFiles:
    summary: dict[str, Any]
    orders: list[dict[str, Any]] = field(default_factory=list)
    fills: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    run_info: dict[str, Any] = field(default_factory=dict)
    name: str = ""


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def load_run(run_dir: Path) -> RunFiles:
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path} not found: is {run_dir} a run directory (mpctl demo --out)?")
    run_info = orjson.loads((run_dir / "run.json").read_bytes()) if (run_dir / "run.json").exists() else {}
    return RunFiles(
        summary=orjson.loads(summary_path.read_bytes()),
        orders=_jsonl(run_dir / "orders.jsonl"),
        fills=_jsonl(run_dir / "fills.jsonl"),
        decisions=_jsonl(run_dir / "decisions.jsonl"),
        plans=_jsonl(run_dir / "plans.jsonl"),
        alerts=_jsonl(run_dir / "alerts.jsonl"),
        run_info=run_info,
        name=run_dir.name,
    )


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    target = out or run_dir / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_report(load_run(run_dir)), encoding="utf-8")
    return target


# ------------------------------------------------------------------------------------------ numbers
def _ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _iso(t: float, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return datetime.fromtimestamp(t, UTC).strftime(fmt)


def equity_series(profile: dict[str, Any]) -> list[Point]:
    return [(_ts(t), float(v)) for t, v in profile.get("equity_curve", [])]


def drawdown_series(equity: Sequence[Point], initial: float) -> list[Point]:
    """Percent below the running peak (the peak starts at the initial equity), as negative numbers."""
    peak = initial
    out = []
    for t, e in equity:
        peak = max(peak, e)
        out.append((t, -((peak - e) / peak * 100.0) if peak > 0 else 0.0))
    return out


def correlation_matrix(curves: dict[str, list[Point]]) -> dict[tuple[str, str], float | None]:
    """Pearson correlation of the profiles' step returns, on the steps both curves have."""
    out: dict[tuple[str, str], float | None] = {}
    names = sorted(curves)
    for a in names:
        out[(a, a)] = 1.0 if len(curves[a]) > 3 else None
    for a, b in itertools.combinations(names, 2):
        da, db = dict(curves[a]), dict(curves[b])
        common = sorted(set(da) & set(db))
        ra = simple_returns([da[t] for t in common])
        rb = simple_returns([db[t] for t in common])
        out[(a, b)] = out[(b, a)] = pearson(ra, rb)
    return out


def trade_rows(fills: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fills in time order, each sell with its realised PnL at average cost (fees apart)."""
    pos: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    avg: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    rows = []
    for f in sorted(fills, key=lambda f: (f["event_time"], f["profile"], f["fill_id"])):
        k = (f["profile"], f["product"])
        size, price = Decimal(f["size"]), Decimal(f["price"])
        pnl: Decimal | None = None
        if f["side"] == "buy":
            new = pos[k] + size
            avg[k] = (avg[k] * pos[k] + size * price) / new if new else Decimal(0)
            pos[k] = new
        else:
            sold = min(size, pos[k])
            pnl = (price - avg[k]) * sold
            pos[k] -= sold
        rows.append({**f, "notional": size * price, "pnl": pnl})
    return rows


def _downsample(points: Sequence[Point], limit: int = MAX_POINTS) -> list[Point]:
    if len(points) <= limit:
        return list(points)
    step = math.ceil(len(points) / limit)
    out = list(points[::step])
    if out[-1] != points[-1]:
        out.append(points[-1])
    return out


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) * 0.01 or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 0.5:
        ticks.append(round(v, 10))
        v += step
    return ticks


# ------------------------------------------------------------------------------------------ SVG
@dataclass(frozen=True)
class Series:
    name: str
    color: str
    points: list[Point]


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    y_label: str,
    width: int = 1100,
    height: int = 320,
    y_fmt: Callable[[float], str] = lambda v: f"{v:,.0f}",
    area: bool = False,
) -> str:
    """An SVG line chart (one path per series) with axes, grid, ticks and a legend."""
    left, right, top, bottom = 78, 16, 34, 42
    pw, ph = width - left - right, height - top - bottom
    pts = [p for s in series for p in s.points]
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="20" class="ctitle">{html.escape(title)}</text>',
    ]
    if not pts:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="muted">no data</text></svg>'
        )
        return "".join(parts)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    if x1 <= x0:
        x1 = x0 + 3600
    ylo, yhi = min(p[1] for p in pts), max(p[1] for p in pts)
    if area:
        ylo, yhi = min(ylo, 0.0), max(yhi, 0.0)
    yt = nice_ticks(ylo, yhi)
    ylo, yhi = min(ylo, yt[0]), max(yhi, yt[-1])
    if yhi <= ylo:
        yhi = ylo + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (yhi - y) / (yhi - ylo) * ph

    for v in yt:
        y = sy(v)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" class="grid"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{html.escape(y_fmt(v))}</text>'
        )
    span = x1 - x0
    fmt = "%m-%d %H:%M" if span < 3 * 86400 else "%Y-%m-%d"
    for i in range(6):
        x = x0 + span * i / 5
        parts.append(f'<line x1="{sx(x):.1f}" y1="{top}" x2="{sx(x):.1f}" y2="{top + ph}" class="grid"/>')
        anchor = "start" if i == 0 else "end" if i == 5 else "middle"
        parts.append(
            f'<text x="{sx(x):.1f}" y="{top + ph + 16}" text-anchor="{anchor}" class="tick">{_iso(x, fmt)}</text>'
        )
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>')
    parts.append(
        f'<text transform="translate(14 {top + ph / 2:.0f}) rotate(-90)" text-anchor="middle" class="tick">'
        f"{html.escape(y_label)}</text>"
    )
    for s in series:
        p = _downsample(s.points)
        if not p:
            continue
        d = "M" + " L".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in p)
        if area:
            base = sy(0.0)
            parts.append(
                f'<path d="{d} L{sx(p[-1][0]):.1f},{base:.1f} L{sx(p[0][0]):.1f},{base:.1f} Z" '
                f'fill="{s.color}" fill-opacity="0.12" stroke="none"/>'
            )
        parts.append(
            f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="1.6" class="series">'
            f"<title>{html.escape(s.name)}</title></path>"
        )
    lx = left + 10
    for i, s in enumerate(series):
        y = top + 14 + i * 16
        parts.append(f'<rect x="{lx}" y="{y - 9}" width="12" height="3" fill="{s.color}"/>')
        parts.append(f'<text x="{lx + 18}" y="{y - 4}" class="legend">{html.escape(s.name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(items: Sequence[tuple[str, int, str]], *, title: str, width: int = 700) -> str:
    """Horizontal bars: (label, value, color)."""
    bar_h, gap, left, top = 20, 6, 260, 30
    height = top + len(items) * (bar_h + gap) + 10
    vmax = max((v for _, v, _ in items), default=0) or 1
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}"><text x="4" y="18" class="ctitle">{html.escape(title)}</text>'
    ]
    if not items:
        parts.append(f'<text x="4" y="{top + 14}" class="muted">no decision</text>')
    for i, (label, v, color) in enumerate(items):
        y = top + i * (bar_h + gap)
        w = (width - left - 60) * v / vmax
        parts.append(
            f'<text x="{left - 8}" y="{y + 14}" text-anchor="end" class="tick">{html.escape(label)}</text>'
        )
        parts.append(f'<rect x="{left}" y="{y}" width="{max(w, 1):.1f}" height="{bar_h}" fill="{color}"/>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 14}" class="tick">{v}</text>')
    parts.append("</svg>")
    return "".join(parts)


def strategy_timeline(plans: Sequence[dict[str, Any]], profiles: Sequence[str], *, width: int = 1100) -> str:
    """One lane per profile, one rectangle per epoch coloured by the epoch's strategy."""
    lane_h, left, top = 26, 120, 30
    strategies = sorted({p["strategy"] for p in plans})
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(strategies)}
    height = top + len(profiles) * (lane_h + 6) + 24 + 18 * math.ceil(len(strategies) / 2)
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="strategy per epoch"><text x="4" y="18" class="ctitle">Strategy per epoch</text>'
    ]
    spans = [
        (_ts(p["epoch_start"]), _ts(p["epoch_end"])) for p in plans if "epoch_start" in p and "epoch_end" in p
    ]
    if not spans:
        parts.append(f'<text x="4" y="{top + 14}" class="muted">no plan</text></svg>')
        return "".join(parts)
    x0, x1 = min(s for s, _ in spans), max(e for _, e in spans)
    pw = width - left - 16

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0 or 1) * pw

    for i, pid in enumerate(profiles):
        y = top + i * (lane_h + 6)
        parts.append(
            f'<text x="{left - 8}" y="{y + 17}" text-anchor="end" class="tick">{html.escape(pid)}</text>'
        )
        for p in (p for p in plans if p["profile"] == pid and "epoch_start" in p):
            a, b = sx(_ts(p["epoch_start"])), sx(_ts(p["epoch_end"]))
            tip = f"{p['profile']} epoch {p['epoch']}: {p['strategy']}, nonce {p['nonce']}, random asset {p.get('random_asset')}"
            parts.append(
                f'<rect x="{a:.1f}" y="{y}" width="{max(b - a, 0.5):.1f}" height="{lane_h}" fill="{colors[p["strategy"]]}">'
                f"<title>{html.escape(tip)}</title></rect>"
            )
    ly = top + len(profiles) * (lane_h + 6) + 14
    for i, s in enumerate(strategies):
        x = left + (i % 2) * 420
        y = ly + (i // 2) * 18
        parts.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{colors[s]}"/>')
        parts.append(f'<text x="{x + 18}" y="{y}" class="legend">{html.escape(s)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------ HTML
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1160px;color:#1b1f24;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dee4;padding-bottom:4px}
.muted{color:#6a737d;fill:#6a737d} table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d8dee4;padding:3px 8px;text-align:left;vertical-align:top} th{background:#f3f5f7;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} .pos{color:#1a7f37} .neg{color:#cf222e}
.chart{display:block;margin:8px 0;max-width:100%;height:auto} .grid{stroke:#eaeef2;stroke-width:1}
.frame{fill:none;stroke:#afb8c1} .tick{font-size:11px;fill:#57606a} .legend{font-size:12px;fill:#24292f}
.ctitle{font-size:13px;font-weight:600;fill:#24292f} details{margin:6px 0} summary{cursor:pointer;color:#0969da}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #d8dee4;border-radius:6px;padding:8px 12px;min-width:150px}
.card b{display:block;font-size:18px}
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>")
        for i, v in enumerate(r):
            raw = isinstance(v, Raw)
            cell = v.html if isinstance(v, Raw) else _e(v)
            cls = ' class="num"' if i in numeric and not raw else ""
            out.append(f"<td{cls}>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


@dataclass(frozen=True)
class Raw:
    html: str


def _signed(v: float | Decimal | None, digits: int = 2) -> Raw:
    if v is None:
        return Raw("")
    f = float(v)
    cls = "pos" if f > 0 else "neg" if f < 0 else ""
    return Raw(f'<span class="{cls}" style="float:right">{f:,.{digits}f}</span>')


def _corr_cell(v: float | None) -> Raw:
    if v is None:
        return Raw('<span class="muted">n/a</span>')
    # Red for positive (profiles moving together, what the system tries to avoid), blue for negative.
    alpha = min(1.0, abs(v))
    rgb = "207,34,46" if v >= 0 else "9,105,218"
    return Raw(
        f'<div style="background:rgba({rgb},{alpha * 0.55:.2f});text-align:right;padding:0 4px">{v:+.2f}</div>'
    )


def render_report(run: RunFiles, *, generated_at: datetime | None = None) -> str:
    s = run.summary
    profiles: dict[str, Any] = s.get("profiles", {})
    pids = list(profiles)
    colors = {pid: PALETTE[i % len(PALETTE)] for i, pid in enumerate(pids)}
    curves = {pid: equity_series(p) for pid, p in profiles.items()}
    drawdowns = {
        pid: drawdown_series(curves[pid], float(p.get("initial_equity", 0) or 0))
        for pid, p in profiles.items()
    }
    counters = s.get("counters", {})
    span = s.get("span", {})
    gen = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = f"Run report {run.name}".strip()
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">namespace {_e(run.run_info.get("namespace", "?"))} · mode {_e(s.get("settings", {}).get("mode", "?"))} · '
        f"candles {_e(span.get('first_candle'))} → {_e(span.get('last_close'))} ({_e(span.get('steps'))} steps) · "
        f"conflict window {_e(s.get('settings', {}).get('conflict_window_s'))} s · generated {gen}</p>",
    ]

    # Summary cards and table.
    parts.append('<div class="cards">')
    for label, key in (
        ("intents", "intents"),
        ("approved", "approved"),
        ("rejected", "rejected"),
        ("collisions resolved", "collisions_resolved"),
        ("plans", "plans"),
        ("halts", "halts"),
    ):
        parts.append(
            f'<div class="card"><span class="muted">{_e(label)}</span><b>{_e(counters.get(key, 0))}</b></div>'
        )
    parts.append(f'<div class="card"><span class="muted">alerts</span><b>{len(run.alerts)}</b></div></div>')
    parts.append("<h2>Profiles</h2>")
    rows = []
    for pid, p in profiles.items():
        rows.append(
            [
                Raw(f'<span style="color:{colors[pid]}">■</span>&nbsp;{_e(pid)}'),
                p.get("strategy"),
                p.get("trades"),
                f"{float(p.get('win_rate', 0)):.1%}",
                _signed(Decimal(str(p.get("realized_pnl", 0)))),
                f"{float(p.get('fees', 0)):,.2f}",
                f"{float(p.get('initial_equity', 0)):,.2f}",
                f"{float(p.get('final_equity', 0)):,.2f}",
                _signed(p.get("return_pct")),
                f"{float(p.get('max_drawdown_pct', 0)):.2f}",
                len(p.get("halts", [])),
                Raw("<br>".join(f"{_e(k)} {_e(v)}" for k, v in p.get("open_positions", {}).items()) or "-"),
            ]
        )
    parts.append(
        _table(
            [
                "profile",
                "strategy (most epochs)",
                "trades",
                "win rate",
                "realised PnL",
                "fees",
                "initial equity",
                "final equity",
                "return %",
                "max DD %",
                "halts",
                "open positions",
            ],
            rows,
            numeric={2, 3, 5, 6, 7, 9, 10},
        )
    )

    exits = {
        pid: p["exits_by_reason"] for pid, p in profiles.items() if isinstance(p.get("exits_by_reason"), dict)
    }
    if exits:
        parts.append("<h2>Exits by reason</h2>")
        reasons = exit_reason_order(r for e in exits.values() for r in e)
        parts.append(
            _table(
                ["profile", *(r.replace("_", " ") for r in reasons), "orders timed out"],
                [
                    [pid, *(e.get(r, 0) for r in reasons), profiles[pid].get("orders_timed_out", 0)]
                    for pid, e in exits.items()
                ],
                numeric=set(range(1, len(reasons) + 2)),
            )
        )
        parts.append(
            '<p class="muted">Sell orders with at least one fill, by the reason of their intent; orders '
            "cancelled at order_timeout with what was left unfilled.</p>"
        )
    halts = [(pid, h) for pid, p in profiles.items() for h in p.get("halts", []) if isinstance(h, dict)]
    if halts:
        parts.append(f"<details><summary>{len(halts)} halt(s)</summary>")
        parts.append(
            _table(
                ["time", "profile", "kind", "until", "reason"],
                [
                    [
                        h.get("event_time", h.get("at")),
                        pid,
                        h.get("kind", "-"),
                        h.get("until") or "-",
                        h.get("reason"),
                    ]
                    for pid, h in halts
                ],
            )
        )
        parts.append("</details>")

    parts.append("<h2>Equity and drawdown</h2>")
    parts.append(
        line_chart(
            [Series(pid, colors[pid], curves[pid]) for pid in pids],
            title="Equity per profile (quote currency, at each step close)",
            y_label="equity",
        )
    )
    parts.append(
        line_chart(
            [Series(pid, colors[pid], drawdowns[pid]) for pid in pids],
            title="Drawdown from the running peak (%)",
            y_label="drawdown %",
            y_fmt=lambda v: f"{v:.2f}",
            area=True,
            height=240,
        )
    )

    parts.append("<h2>Correlation of the profiles' step returns</h2>")
    corr = correlation_matrix(curves)
    parts.append(
        _table(["", *pids], [[pid, *(_corr_cell(corr.get((pid, q))) for q in pids)] for pid in pids])
    )
    parts.append(
        '<p class="muted">Pearson correlation of simple returns between consecutive step closes; n/a when '
        "a profile's equity never moved (no position held).</p>"
    )

    parts.append("<h2>Arbiter</h2>")
    by = Counter((d.get("verdict", "?"), d.get("rule", "?")) for d in run.decisions)
    vcolor = {"approved": "#2ca02c", "rejected": "#d62728", "delayed": "#ff7f0e"}
    items = [
        (f"{v} · {r}", n, vcolor.get(v, "#7f7f7f")) for (v, r), n in sorted(by.items(), key=lambda x: -x[1])
    ]
    parts.append(bar_chart(items, title="Decisions by verdict and rule"))
    per_profile = Counter((str(d.get("profile")), str(d.get("verdict"))) for d in run.decisions)
    verdicts = sorted({v for _, v in per_profile})
    parts.append(
        _table(
            ["profile", *verdicts],
            [[pid, *(per_profile.get((pid, v), 0) for v in verdicts)] for pid in pids],
            numeric=set(range(1, len(verdicts) + 1)),
        )
    )
    rejected = [d for d in run.decisions if d.get("verdict") == "rejected"]
    if rejected:
        parts.append(f"<details><summary>{len(rejected)} rejection(s)</summary>")
        parts.append(
            _table(
                ["time", "profile", "product", "side", "rule", "conflicting profile", "reason"],
                [
                    [
                        d.get("event_time"),
                        d.get("profile"),
                        d.get("product"),
                        d.get("side"),
                        d.get("rule"),
                        d.get("conflicting_profile"),
                        d.get("reason"),
                    ]
                    for d in rejected[:2000]
                ],
            )
        )
        parts.append("</details>")

    parts.append("<h2>Plans per epoch</h2>")
    parts.append(strategy_timeline(run.plans, pids))
    prow = []
    for pid in pids:
        mine = [p for p in run.plans if p.get("profile") == pid]
        strat = Counter(p["strategy"] for p in mine)
        rnd = Counter(p.get("random_asset") for p in mine if p.get("random_asset"))
        prow.append(
            [
                pid,
                len(mine),
                ", ".join(f"{k} {v}" for k, v in strat.most_common()),
                ", ".join(f"{k} {v}" for k, v in rnd.most_common(5)) or "-",
                sum(int(p.get("collisions", 0)) for p in mine),
                max((int(p.get("nonce", 0)) for p in mine), default=0),
            ]
        )
    parts.append(
        _table(
            ["profile", "epochs", "strategies (epochs)", "random assets (top 5)", "collisions", "max nonce"],
            prow,
            numeric={1, 4, 5},
        )
    )
    parts.append(f"<details><summary>every plan ({len(run.plans)})</summary>")
    parts.append(
        _table(
            [
                "epoch start",
                "profile",
                "epoch",
                "strategy",
                "assets",
                "random asset",
                "nonce",
                "collisions",
                "fingerprint",
            ],
            [
                [
                    p.get("epoch_start"),
                    p.get("profile"),
                    p.get("epoch"),
                    p.get("strategy"),
                    " ".join(p.get("assets", [])),
                    p.get("random_asset") or "-",
                    p.get("nonce"),
                    p.get("collisions", 0),
                    str(p.get("fingerprint", ""))[:12],
                ]
                for p in sorted(run.plans, key=lambda p: (p.get("epoch_start", ""), p.get("profile", "")))
            ],
            numeric={2, 6, 7},
        )
    )
    parts.append("</details>")

    parts.append("<h2>Trades</h2>")
    trades = trade_rows(run.fills)
    if trades:
        parts.append(
            _table(
                ["time", "profile", "product", "side", "size", "price", "notional", "fee", "realised PnL"],
                [
                    [
                        t["event_time"],
                        t["profile"],
                        t["product"],
                        t["side"],
                        t["size"],
                        f"{float(t['price']):,.6g}",
                        f"{float(t['notional']):,.2f}",
                        f"{float(t['fee']):,.4f}",
                        _signed(t["pnl"]),
                    ]
                    for t in trades[:5000]
                ],
                numeric={4, 5, 6, 7},
            )
        )
        if len(trades) > 5000:
            parts.append(f'<p class="muted">first 5000 of {len(trades)} fills; all are in fills.jsonl</p>')
    else:
        parts.append('<p class="muted">no fill in this run</p>')
    statuses = Counter(o.get("status") for o in run.orders)
    if statuses:
        parts.append(
            '<p class="muted">order events: '
            + ", ".join(f"{_e(k)} {v}" for k, v in sorted(statuses.items()))
            + "</p>"
        )

    parts.append("<h2>Alerts</h2>")
    if run.alerts:
        kinds = Counter(a.get("kind") for a in run.alerts)
        parts.append(_table(["kind", "count"], sorted(kinds.items()), numeric={1}))
        parts.append(
            _table(
                ["time", "severity", "kind", "summary"],
                [
                    [a.get("event_time"), a.get("severity"), a.get("kind"), a.get("summary")]
                    for a in run.alerts[-200:]
                ],
            )
        )
    else:
        parts.append(
            '<p class="muted">no alerts file in this run directory (the monitor writes alerts.jsonl)</p>'
        )
    parts.append("</body></html>")
    return "".join(parts) + "\n"
