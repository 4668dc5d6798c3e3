"""Benchmark: profile-candle evaluations per second of `mpctl backtest`, for 8 profiles and for 1, against a
plain Python loop over the same candles measured in the same run.

    .venv/bin/python scripts/bench_backtest.py [--data DIR] [--source binance] [--start ISO --end ISO | --hours N]
                                               [--profiles 8] [--rotation-s 86400] [--repeat 1] [--out FILE]
                                               [--report [--report-dir DIR]]
                                               [--compare-interpreted | --interpreted]

Closing figures (two years of hourly candles of the eleven Binance assets, not copied into the repository):

    .venv/bin/python scripts/bench_backtest.py --data DIR_OF_THE_FULL_BINANCE_FILES --start 2020-09-22 --end 2022-09-22

- The config is generated here: N variations of the template's profiles (config/coinbase_profiles.yaml), each
  with its own hash settings (base_hash, entropy_seed), its own base assets among the eleven and the others as
  its random-asset pool, the template's strategy weights rotated, and `hash_rotation_interval` = --rotation-s.
- A profile-candle evaluation is one profile evaluating one product's candle: every profile evaluates every
  step, and counts each candle of the step (8 profiles x 17 520 hours x 11 assets is about 1.5 million).
- `backtest_s` is the wall time of the backtest proper (registry plans, strategies, arbiter, paper exchanges,
  from the built schedule to the collected messages); `load_s` (reading the files and building the schedule)
  and `report_s` (writing the output files) are given apart, `command_s` is their sum.
- `backtest_cpu_s` and `evaluations_per_cpu_s`: the same in CPU time (time.process_time), steadier than the
  wall time when other processes share the cores.
- Baseline: a plain Python loop over the same candles (float closes of every product, step by step, a 12/48
  simple moving average crossover per product with running sums, the number of crossings counted), best of
  --repeat; `ratio` = backtest evaluations/s over loop candles/s.
- Compiled modules (scripts/build_native.py, mypyc): `compiled_modules` counts the ones this run imported
  compiled. --interpreted runs their .py instead; --compare-interpreted runs the same again in a subprocess
  with --interpreted and prints `vs_interpreted`: both CPU times, their ratio (`cpu_speedup`) and whether
  both did the same work (`same_counts`). CPU time, because a shared machine moves wall times by up to 2x.
- With several files for one asset in --data (e.g. Coinbase and Binance), --source picks the files to use
  (links in a temporary folder), as `mpctl backtest` needs one file per asset.

Prints one JSON document (and writes it to --out when given), with every figure next to its baseline:
`ratio_vs_plain_loop` (the plain loop of the same run) and `vs_previous` (the ratio of the code before issue 16
item 5 on the same data, profiles and rotation, from PREVIOUS below; `speedup` = this ratio / that one).

Latest figures (2026-12-06 11:58-12:19 UTC, 2 vCPUs, Python 3.11.7, load average 1.0-2.4, the 15 modules
compiled), two years of Binance candles, 8 profiles, rotation 1 day, --report: backtest_cpu_s 4.06-4.17
(369 000-380 000 evaluations per CPU second; main before "less work per step", run alternately: 5.41-5.67 s,
272 000-285 000), 1 profile 1.56-1.65 s; load_s 1.86-1.88, report_s 0.63-0.64, command_s 6.56-6.62. Under load 5:
4.59-4.71 s (327 000-335 000) against 6.08-6.26 s. The figure before issue 16 item 5 was 8.9-9.7 s (150 000-175 000).
--compare-interpreted: 7.75-7.85 s interpreted, 4.08-4.18 s compiled (1.85-1.93). docs/benchmarks.md has the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import build_native  # noqa: E402 (scripts/, beside this file)

if "--interpreted" in sys.argv[1:]:
    build_native.force_interpreted()  # before the project's modules are imported below

from mpctl.backtest import load_schedule, run_backtest, write_report  # noqa: E402
from shared.aligner import Step  # noqa: E402
from shared.candles import FILE_RE  # noqa: E402
from shared.config import AppConfig, parse_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ["BTC", "ETH", "SOL", "XRP", "ADA", "DOT", "LINK", "MATIC", "AVAX", "ATOM", "LTC"]


# The previous figures (the code before issue 16 item 5), keyed by what was run: (steps, candles, profiles,
# rotation_s). Each is the backtest's ratio to the plain loop of its own run (evaluations/s over loop
# candles/s, 8 profiles and 1), the machine-independent form of the figure: printed next to this run's as
# `vs_previous`, with the previous evaluations/s scaled to this run's plain loop. Measured 2026-12-06 by
# running the code before and after alternately (docs/benchmarks.md, Backtest). The plain loop's rate moves by
# a quarter between runs on a shared machine: the gain of the compiled modules is read from --compare-interpreted
# (`vs_interpreted`, CPU times of the same run), not from this.
PREVIOUS: dict[tuple[int, int, int, int], dict[str, float]] = {
    # two years of Binance candles, 2020-09-22 .. 2022-09-22 (the closing figures)
    (17501, 192505, 8, 86400): {"8_profiles": 0.070, "1_profile": 0.020},
    # the bundled 61 days (`make bench`)
    (1458, 16038, 8, 86400): {"8_profiles": 0.059, "1_profile": 0.018},
}


def vs_previous(key: tuple[int, int, int, int], ratios: dict[str, float], loop_rate: float) -> dict[str, Any]:
    """This run's ratios to the plain loop against the previous code's on the same data (None: not measured)."""
    prev = PREVIOUS.get(key)
    if prev is None:
        return {"previous": None, "note": "no previous figure for this data, profiles and rotation"}
    out: dict[str, Any] = {}
    for name, ratio in ratios.items():
        before = prev[name]
        out[name] = {
            "previous_ratio_vs_plain_loop": before,
            "ratio_vs_plain_loop": ratio,
            "previous_evaluations_per_s_at_this_loop_rate": round(before * loop_rate),
            "speedup": round(ratio / before, 3) if before else None,
        }
    return out


def vs_interpreted(argv: list[str], compiled: dict[str, Any]) -> dict[str, Any]:
    """The same run in a subprocess with every module interpreted, and the CPU-time ratios of the two."""
    rest = [a for a in argv if a not in ("--compare-interpreted", "--report")]
    for flag in ("--out", "--report-dir"):
        if flag in rest:
            i = rest.index(flag)
            del rest[i : i + 2]
    run = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *rest, "--interpreted", "--repeat", "1"],
        check=True,
        capture_output=True,
        text=True,
    )
    interpreted = json.loads(run.stdout)
    out: dict[str, Any] = {"compiled_modules": interpreted["compiled_modules"]}
    for key in (k for k in compiled if k.startswith("backtest_")):
        a, b = interpreted[key], compiled[key]
        out[key.removeprefix("backtest_")] = {
            "interpreted_cpu_s": a["backtest_cpu_s"],
            "compiled_cpu_s": b["backtest_cpu_s"],
            "interpreted_evaluations_per_cpu_s": a["evaluations_per_cpu_s"],
            "compiled_evaluations_per_cpu_s": b["evaluations_per_cpu_s"],
            "cpu_speedup": round(a["backtest_cpu_s"] / b["backtest_cpu_s"], 3)
            if b["backtest_cpu_s"]
            else None,
            # The same work both ways: a difference here would be a bug, not noise.
            "same_counts": all(a[n] == b[n] for n in ("evaluations", "intents", "fills", "plans")),
        }
    return out


def bench_config(n: int, rotation_s: int) -> AppConfig:
    """N profiles derived from the template's two, each with its own hash settings, assets and pool."""
    template = yaml.safe_load((ROOT / "config" / "coinbase_profiles.yaml").read_text())["profiles"]
    bases = list(template.values())
    profiles: dict[str, Any] = {}
    for i in range(n):
        p = json.loads(json.dumps(bases[i % len(bases)]))  # a deep copy
        base = [ASSETS[(3 * i + k) % len(ASSETS)] for k in range(4)]
        pool = [a for a in ASSETS if a not in base]
        names = list(p["strategy_config"]["strategy_weights"])
        values = list(p["strategy_config"]["strategy_weights"].values())
        weights = {name: values[(k + i) % len(values)] for k, name in enumerate(names)}
        p["name"] = f"Benchmark profile {i}"
        p["priority"] = i + 1
        p["strategy_config"].update(
            base_assets=[*base, "USDC"], random_asset_pool=pool, strategy_weights=weights
        )
        p["trading_params"]["trading_pairs"] = [f"{a}/USDC" for a in base]
        p["trading_params"]["max_open_positions"] = 4
        p["profile_hash"].update(
            base_hash=f"bench_profile_{i}",
            entropy_seed=round(0.11 + 0.07 * i, 4),
            hash_rotation_interval=rotation_s,
        )
        profiles[f"bench_{i}"] = p
    return parse_config({"profiles": profiles}, source="<bench config>")


def pick_source(data: Path, source: str | None) -> Path:
    """`data` itself, or a temporary folder of links to the files of one source when assets have several."""
    files = [p for p in sorted(data.iterdir()) if FILE_RE.match(p.name)]
    by_base: dict[str, int] = {}
    for p in files:
        m = FILE_RE.match(p.name)
        assert m is not None
        by_base[m.group("base")] = by_base.get(m.group("base"), 0) + 1
    if source is None and all(v == 1 for v in by_base.values()):
        return data
    chosen = [p for p in files if FILE_RE.match(p.name) and p.name.startswith(f"{source or 'binance'}_")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    for p in chosen:
        (tmp / p.name).symlink_to(p.resolve())
    return tmp


def plain_loop(steps: list[Step], repeat: int) -> tuple[float, int]:
    """A 12/48 SMA crossover over every product's closes, step by step (what a minimal backtest loop does)."""
    closes: list[list[float]] = [[float(c.close) for c in s.candles] for s in steps]
    products: list[list[str]] = [[c.product for c in s.candles] for s in steps]
    best = float("inf")
    crossings = 0
    n = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        hist: dict[str, list[float]] = {}
        fast_sum: dict[str, float] = {}
        slow_sum: dict[str, float] = {}
        above: dict[str, bool] = {}
        crossings = 0
        n = 0
        for cs, ps in zip(closes, products, strict=True):
            for product, c in zip(ps, cs, strict=True):
                h = hist.setdefault(product, [])
                h.append(c)
                k = len(h)
                f = fast_sum.get(product, 0.0) + c - (h[k - 13] if k > 12 else 0.0)
                s = slow_sum.get(product, 0.0) + c - (h[k - 49] if k > 48 else 0.0)
                fast_sum[product] = f
                slow_sum[product] = s
                if k >= 48:
                    up = f / 12 > s / 48
                    if up != above.get(product, up):
                        crossings += 1
                    above[product] = up
                n += 1
        best = min(best, time.perf_counter() - t0)
    return best, n


def measure(cfg: AppConfig, steps: list[Step], out_dir: Path | None) -> dict[str, Any]:
    c0 = time.process_time()
    t0 = time.perf_counter()
    data, stats = run_backtest(cfg, steps)
    t1 = time.perf_counter()
    cpu_s = time.process_time() - c0
    report_s = 0.0
    if out_dir is not None:
        write_report(cfg, data, out_dir)  # as `mpctl backtest` writes them
        report_s = time.perf_counter() - t1
    return {
        "profiles": len(cfg.enabled_profiles()),
        "evaluations": stats.evaluations,
        "backtest_s": round(t1 - t0, 3),
        "evaluations_per_s": round(stats.evaluations / (t1 - t0)),
        # CPU time of the backtest proper: on a shared machine it moves much less than the wall time.
        "backtest_cpu_s": round(cpu_s, 3),
        "evaluations_per_cpu_s": round(stats.evaluations / cpu_s) if cpu_s > 0 else None,
        "report_s": round(report_s, 3),
        "intents": len(data.intents),
        "fills": len(data.fills),
        "plans": len(data.plans),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "market")
    ap.add_argument(
        "--source", default=None, help="file source to use when an asset has several (e.g. binance)"
    )
    ap.add_argument("--start", default=None)
    ap.add_argument("--end", default=None)
    ap.add_argument("--hours", type=float, default=None)
    ap.add_argument("--profiles", type=int, default=8)
    ap.add_argument("--rotation-s", type=int, default=86400)
    ap.add_argument("--repeat", type=int, default=3, help="plain-loop repetitions (best kept)")
    ap.add_argument("--report", action="store_true", help="also write the output files (timed as report_s)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument(
        "--report-dir",
        type=Path,
        default=None,
        help="with --report: write the N-profile run's output files here (kept; default a temporary folder), "
        "e.g. to compare two versions' outputs byte for byte",
    )
    ap.add_argument(
        "--interpreted",
        action="store_true",
        help="run the .py of the modules scripts/build_native.py compiles, even where they are built",
    )
    ap.add_argument(
        "--compare-interpreted",
        action="store_true",
        help="then run the same in a subprocess with --interpreted and report the ratio (vs_interpreted)",
    )
    args = ap.parse_args(argv)

    data = pick_source(args.data, args.source)
    start = datetime.fromisoformat(args.start) if args.start else None
    end = datetime.fromisoformat(args.end) if args.end else None
    cfg_n = bench_config(args.profiles, args.rotation_s)
    cfg_1 = bench_config(1, args.rotation_s)  # bench_0 of the N, alone
    t0 = time.perf_counter()
    steps = load_schedule(cfg_n, data, start=start, end=end, hours=args.hours)
    load_s = time.perf_counter() - t0
    products = len({c.product for s in steps for c in s.candles})
    candles = sum(len(s.candles) for s in steps)

    tmp = None
    if args.report:
        tmp = args.report_dir or Path(tempfile.mkdtemp(prefix="bench-out-"))
        tmp.mkdir(parents=True, exist_ok=True)
    many = measure(cfg_n, steps, tmp)
    one = measure(cfg_1, steps, None)
    loop_s, loop_n = plain_loop(steps, args.repeat)
    loop_rate = loop_n / loop_s
    many["command_s"] = round(load_s + many["backtest_s"] + many["report_s"], 3)
    ratios = {
        f"{many['profiles']}_profiles": round(many["evaluations_per_s"] / loop_rate, 4),
        "1_profile": round(one["evaluations_per_s"] / loop_rate, 4),
    }
    result = {
        "data": {
            "folder": str(args.data),
            "steps": len(steps),
            "products": products,
            "candles": candles,
            "first_open": steps[0].candles[0].open_time.isoformat(),
            "last_open": steps[-1].candles[0].open_time.isoformat(),
        },
        "load_s": round(load_s, 3),
        "rotation_s": args.rotation_s,
        f"backtest_{many['profiles']}_profiles": many,
        "backtest_1_profile": one,
        "plain_loop": {"candles": loop_n, "seconds": round(loop_s, 4), "candles_per_s": round(loop_rate)},
        "ratio_vs_plain_loop": ratios,
        "vs_previous": vs_previous(
            (len(steps), candles, many["profiles"], args.rotation_s), ratios, loop_rate
        ),
        # The modules that ran compiled (scripts/build_native.py); none: every module ran interpreted.
        "compiled_modules": len(build_native.compiled_modules()),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
    }
    if args.compare_interpreted:
        result["vs_interpreted"] = vs_interpreted(argv if argv is not None else sys.argv[1:], result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
