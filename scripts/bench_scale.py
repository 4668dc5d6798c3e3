"""A replay with many profiles on this machine (#16 item 4): `mpctl demo` with N generated profiles
(bench_pipeline.bench_config), its workers in forked hosts of `--per-process` profiles (MPCTL_PROFILES_PER_PROCESS),
the whole process tree's memory sampled every second, then DESIGN.md's invariants and `mpctl audit` checked on the
run's files (tests/e2e/test_demo.py, check_invariants).

    .venv/bin/python scripts/bench_scale.py [--profiles 100] [--per-process 25] [--hours 168] [--shared-loop]
        [--out DIR]

Prints one JSON document: the run's wall time, the replay's time (the demo's own figure) and steps per second,
order events (orders.jsonl: every status of every order) and fills, the peak of the summed RSS and PSS of every
process the demo started (the broker and Redis not included: they are given by the environment or started
before), the invariants' verdict and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_pipeline import bench_config, tree_memory_kib  # noqa: E402

from mpctl.stack import PROFILES_PER_PROCESS_ENV  # noqa: E402
from shared.runtime import SHARED_LOOP_ENV  # noqa: E402
from tests.e2e.test_demo import check_invariants, jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profiles", type=int, default=100)
    p.add_argument("--per-process", type=int, default=25, help="profiles per forked host (1: a process each)")
    p.add_argument("--hours", type=float, default=168.0)
    p.add_argument(
        "--shared-loop",
        action="store_true",
        help=f"the strategy hosts run their profiles on one event loop ({SHARED_LOOP_ENV}=1) instead of forking",
    )
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "scale")
    p.add_argument("--timeout", type=float, default=3600.0)
    args = p.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "profiles.yaml"
    cfg_file.write_text(yaml.safe_dump(bench_config(args.profiles), sort_keys=False), encoding="utf-8")
    env = dict(os.environ, CI="true", **{PROFILES_PER_PROCESS_ENV: str(args.per_process)})
    env[SHARED_LOOP_ENV] = "1" if args.shared_loop else ""
    cmd = [sys.executable, "-m", "mpctl.cli", "demo", "--out", str(out / "run"), "--config", str(cfg_file)]
    cmd += ["--hours", str(args.hours)]
    load_before = [round(x, 2) for x in os.getloadavg()]
    peak = {"rss": 0, "pss": 0, "processes": 0}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            got = tree_memory_kib(proc.pid)
            if got is not None:
                peak["rss"], peak["pss"] = max(peak["rss"], got[0]), max(peak["pss"], got[1])
                peak["processes"] = max(peak["processes"], got[2])
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, _ = proc.communicate(timeout=args.timeout)
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
    wall_s = time.monotonic() - t0
    (out / "demo.out").write_bytes(stdout)
    result: dict[str, Any] = {
        "profiles": args.profiles,
        "per_process": args.per_process,
        "shared_loop": args.shared_loop,
        "hours": args.hours,
        "exit_code": proc.returncode,
        "wall_s": round(wall_s, 1),
        "peak_rss_mib": round(peak["rss"] / 1024, 1),
        "peak_pss_mib": round(peak["pss"] / 1024, 1),
        "peak_processes": peak["processes"],
        "load_avg": {"start": load_before, "end": [round(x, 2) for x in os.getloadavg()]},
    }
    if proc.returncode == 0:
        run = out / "run"
        summary = json.loads((run / "summary.json").read_text())
        plans = jsonl(run / "plans.jsonl")
        # The replay's own time (the demo's last line: "outputs in DIR (808.5 s)"), startup and stop apart.
        replay_s = re.findall(rb"outputs in .* \(([0-9.]+) s\)", stdout)
        steps = round(args.hours)  # hourly candles: one step each
        if replay_s:
            result |= {"replay_s": float(replay_s[-1]), "steps_per_s": round(steps / float(replay_s[-1]), 3)}
        result |= {
            "plans": len(plans),
            "orders": len(jsonl(run / "orders.jsonl")),
            "fills": len(jsonl(run / "fills.jsonl")),
            "counters": {
                k: summary["counters"].get(k) for k in ("intents", "approved", "rejected", "delayed")
            },
        }
        try:
            check_invariants(run, summary, config=cfg_file)
            result["invariants"] = "hold"
        except AssertionError as err:
            result["invariants"] = f"broken: {str(err)[:500]}"
        result["steps"] = steps
        result["epochs_of_plans"] = len({p["epoch"] for p in plans})
    print(json.dumps(result, indent=2))
    return 0 if proc.returncode == 0 and result.get("invariants") == "hold" else 1


if __name__ == "__main__":
    sys.exit(main())
