"""Benchmark: what each profile costs at rest, startup time and memory of its strategy and execution workers, for
several profile counts, one process per worker (the baseline, as `mpctl demo` starts them by default) against
forked hosts (`--profile a,b,...`, MPCTL_PROFILES_PER_PROCESS; shared/forkhost.py), in the same run; mode
"shared" runs the strategy workers as tasks of one process (`--shared-loop`, shared/loophost.py) and the
execution workers in a forked host; mode "before" runs another checkout's code (`--before-tree`) a process per
worker.

    .venv/bin/python scripts/bench_footprint.py [--profiles 2,8,32] [--modes before,process,hosted,shared]
        [--before-tree DIR] [--settle 5]
        [--json reports/bench/footprint.json]

For each profile count N and each mode, in a fresh namespace: the strategy and execution workers of N profiles
(bench_pipeline.bench_config's profiles) are started, and startup = seconds until every one of them is "up"
(its consumer group has a member and its heartbeat is fresh: the monitor's health view). After `--settle`
seconds at rest, RSS and PSS of every worker process and its children (/proc/<pid>/smaps_rollup) are summed:
per profile = total / N. RSS counts shared pages (the interpreter, libraries, and in a forked host everything
imported before the fork) once per process; PSS divides each shared page among the processes that map it, so
the PSS total is what the stack really takes. The load average before each run is kept with its figures.

Prints one JSON document (written to `--json` too) and a table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_pipeline import bench_config, descendants, proc_memory_kib  # noqa: E402

from mpctl import infra  # noqa: E402
from mpctl.stack import (  # noqa: E402
    Stack,
    create_topics,  # noqa: E402
    tail,
)
from services.monitor.health import fetch_health  # noqa: E402
from shared.bus import KafkaAccess  # noqa: E402
from shared.config import parse_config  # noqa: E402
from shared.kafka import delete_topics  # noqa: E402
from shared.topics import declared_topics  # noqa: E402

MIB = 1024.0


def stack_memory(stack: Stack) -> dict[str, Any]:
    per_kind: dict[str, list[int]] = {}
    processes = 0
    for proc in stack.procs:
        kind = proc.name.split(".")[0]
        acc = per_kind.setdefault(kind, [0, 0])
        for pid in descendants(proc.popen.pid):
            got = proc_memory_kib(pid)
            if got is not None:
                acc[0] += got[0]
                acc[1] += got[1]
                processes += 1
    rss = sum(v[0] for v in per_kind.values())
    pss = sum(v[1] for v in per_kind.values())
    return {
        "processes": processes,
        "rss_mib": round(rss / MIB, 1),
        "pss_mib": round(pss / MIB, 1),
        "by_kind_mib": {
            k: {"rss": round(v[0] / MIB, 1), "pss": round(v[1] / MIB, 1)} for k, v in per_kind.items()
        },
    }


async def wait_up(
    bootstrap: KafkaAccess, cfg: Any, ns: str, stack: Stack, wanted: set[str], timeout: float
) -> float:
    t0 = time.monotonic()
    while True:
        dead = stack.dead()
        if dead:
            d = dead[0]
            raise RuntimeError(f"{d.name} exited with {d.popen.returncode}:\n{tail(d.log)}")
        up = {h.name for h in await fetch_health(bootstrap, cfg, ns) if h.state == "up"}
        if wanted <= up:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"not up after {timeout:.0f} s: missing {sorted(wanted - up)[:5]}...")
        await asyncio.sleep(0.25)


async def one_run(
    endpoints: infra.Endpoints,
    n: int,
    mode: str,
    *,
    settle: float,
    timeout: float,
    log_root: Path,
    before_tree: Path | None = None,
) -> dict[str, Any]:
    ns = f"foot{n}{mode[0]}{uuid.uuid4().hex[:6]}"
    raw_cfg = bench_config(n)
    raw_cfg["system"] = {"kafka": {"namespace": ns}}
    cfg = parse_config(raw_cfg, source=f"<footprint {n}>")
    log_dir = log_root / ns
    log_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = log_dir / "profiles.yaml"
    cfg_file.write_text(yaml.safe_dump(raw_cfg, sort_keys=False), encoding="utf-8")
    specs = declared_topics(cfg, ns)
    bootstrap = endpoints.kafka
    await create_topics(endpoints, cfg, ns)  # with the namespace's principals and ACLs
    common = ["--bootstrap", bootstrap.servers, "--redis-url", endpoints.redis_url, "--source", "replay"]
    common += ["--namespace", ns, "--config", str(cfg_file), "--log-level", "WARNING"]
    pids = cfg.enabled_profiles()
    wanted = {f"{k}.{p}" for p in pids for k in ("strategy", "execution")}
    stack = Stack(bus=endpoints.bus)
    load = [round(x, 2) for x in os.getloadavg()]
    # "before": the baseline's code (another checkout, e.g. the main branch's), a process per worker.
    # PYTHONSAFEPATH: `python -m` would otherwise put the working directory (this checkout) before PYTHONPATH, and
    # the baseline's modules would be this code's.
    env = (
        {"PYTHONPATH": str(before_tree), "PYTHONSAFEPATH": "1"} if mode == "before" and before_tree else None
    )
    try:
        if mode in ("process", "before"):
            for p in pids:
                stack.start(
                    f"execution.{p}", ["services.execution", *common, "--profile", p], log_dir, env=env
                )
                stack.start(f"strategy.{p}", ["services.strategy", *common, "--profile", p], log_dir, env=env)
        else:
            every = ",".join(pids)
            stack.start("execution.host", ["services.execution", *common, "--profile", every], log_dir)
            shared = ["--shared-loop"] if mode == "shared" else []
            stack.start("strategy.host", ["services.strategy", *common, "--profile", every, *shared], log_dir)
        startup_s = await wait_up(bootstrap, cfg, ns, stack, wanted, timeout)
        await asyncio.sleep(settle)
        mem = stack_memory(stack)
    finally:
        stack.stop()
        await delete_topics(bootstrap, [s.name for s in specs])
    return {
        "profiles": n,
        "mode": mode,
        "startup_s": round(startup_s, 2),
        "memory": mem,
        "rss_per_profile_mib": round(mem["rss_mib"] / n, 1),
        "pss_per_profile_mib": round(mem["pss_mib"] / n, 1),
        "load_avg_before": load,
    }


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| profiles | mode | processes | startup s | RSS MiB | PSS MiB | RSS/profile | PSS/profile | load before |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["runs"]:
        m = r["memory"]
        lines.append(
            f"| {r['profiles']} | {r['mode']} | {m['processes']} | {r['startup_s']} | {m['rss_mib']} | "
            f"{m['pss_mib']} | {r['rss_per_profile_mib']} | {r['pss_per_profile_mib']} | "
            f"{', '.join(str(x) for x in r['load_avg_before'])} |"
        )
    return lines


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    endpoints = await asyncio.to_thread(infra.resolve_endpoints, None, lambda m: print(m, file=sys.stderr))
    counts = [int(x) for x in args.profiles.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs = []
    for n in counts:
        for mode in modes:
            print(f"[footprint] {n} profiles, {mode}", file=sys.stderr)
            runs.append(
                await one_run(
                    endpoints,
                    n,
                    mode,
                    settle=args.settle,
                    timeout=args.timeout,
                    log_root=Path(args.logs),
                    before_tree=args.before_tree,
                )
            )
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profiles", default="2,8,32", help="comma-separated profile counts")
    p.add_argument(
        "--modes",
        default="process,hosted,shared",
        help="before (--before-tree's code, a process per worker), process (this code, a process per worker), "
        "hosted (this code, one forked host per kind), shared (the strategies on one shared loop, the execution "
        "workers in a forked host)",
    )
    p.add_argument(
        "--before-tree",
        type=Path,
        default=None,
        help="a checkout of the code to compare with (mode 'before'; e.g. a worktree of the main branch)",
    )
    p.add_argument("--settle", type=float, default=5.0, help="seconds at rest after startup before measuring")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", default=str(ROOT / "reports" / "bench" / "footprint.json"))
    p.add_argument("--logs", default=str(ROOT / "reports" / "bench" / "logs"))
    args = p.parse_args(argv)
    os.chdir(ROOT)
    for m in args.modes.split(","):
        if m.strip() not in ("before", "process", "hosted", "shared"):
            p.error(f"unknown mode {m!r}")
        if m.strip() == "before" and args.before_tree is None:
            p.error("mode 'before' needs --before-tree")
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    print("\n".join(table(result)), file=sys.stderr)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
