"""Four registry processes race over the same replayed epochs (issue 3, "Races").

Nine profiles: three with identical hash settings, two more with identical ones, two with 2-hour and 4-hour
rotation (epochs overlapping several hourly ones), the rest alone; a pool of nine random assets for at most nine
profiles at once. Every replica derives every epoch; the decision records let exactly one publish each plan.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mpctl.commands_plans import current_plans, plans_table
from mpctl.infra import Endpoints
from shared.messages import PlanPublished, WorkerFinished
from tests.integration.test_registry_harness import Check, ProfileSpec, Run, outcome, schedule, write_config

HOURS = 72
REPLICAS = ["r1", "r2", "r3", "r4"]
SPECS = {
    "alpha": ProfileSpec("shared_trading_hash"),
    "bravo": ProfileSpec("shared_trading_hash"),
    "charlie": ProfileSpec("shared_trading_hash"),
    "delta": ProfileSpec("pair_hash", seed=0.7),
    "echo": ProfileSpec("pair_hash", seed=0.7),
    "foxtrot": ProfileSpec("foxtrot_hash", seed=0.1),
    "golf": ProfileSpec("golf_hash", seed=0.2, interval=7200),
    "hotel": ProfileSpec("hotel_hash", seed=0.3, interval=14400),
    "india": ProfileSpec("india_hash", seed=0.9),
}


async def race(
    infra: Endpoints, tmp: Path, ns: str
) -> tuple[list[PlanPublished], dict[str, WorkerFinished], Run]:
    config = write_config(tmp / "race.yaml", SPECS)
    run = Run(infra, ns, config, tmp / f"logs-{ns}")
    await run.setup()
    for r in REPLICAS:
        run.start_registry(r)
    steps = schedule(run.cfg, HOURS)
    # The candles arrive while the replicas start and read: they race through the whole history.
    await run.publish(steps, finish_with=steps)
    finished = await run.wait_finished(REPLICAS, timeout=45)
    return await run.plans(), finished, run


@pytest.mark.timeout(120)
async def test_four_replicas_race_to_one_plan_per_profile_and_epoch(infra: Endpoints, tmp_path: Path) -> None:
    t0 = time.monotonic()
    outcomes = []
    report: dict[str, object] = {}
    for n in (1, 2):
        ns = f"race{n}{int(time.time() * 1000) % 10**8}"
        plans, finished, run = await race(infra, tmp_path, ns)
        try:
            check = Check(plans)
            unique = check.unique()
            # every profile: one plan for every epoch the replay touched
            for pid, spec in SPECS.items():
                expected = {s.time_s // spec.interval for s in schedule(run.cfg, HOURS)}
                got = {e for (p, e) in unique if p == pid}
                assert got == expected, (pid, sorted(expected - got), sorted(got - expected))
            check.no_overlapping_duplicates(pool_allows=True)
            # only one replica published each plan: no (profile, epoch) on the topic twice
            dup = {k: v for k, v in check.messages_per_epoch.items() if v > 1}
            assert not dup, f"plans published more than once: {dup}"
            detail = {inst: f.detail for inst, f in finished.items()}
            assert sum(int(d["plans"]) for d in detail.values()) == len(unique)
            assert sum(int(d["decided"]) for d in detail.values()) == len(unique)
            # each replica saw every epoch: it decided it, adopted another's decision, or found it published
            for d in detail.values():
                assert int(d["decided"]) + int(d["adopted"]) + int(d["skipped"]) == len(unique)
            collisions = sum(p.nonce for p in unique.values())
            assert collisions == sum(int(d["collisions"]) for d in detail.values())
            assert collisions > 0, "profiles with identical hash settings must collide"
            refused: Counter[str] = Counter()
            decided_path: Counter[str] = Counter()
            for d in detail.values():
                refused.update({k: int(v) for k, v in dict(d["refused"]).items()})
                decided_path.update({k: int(v) for k, v in dict(d["refused_decided"]).items()})
            # the refusals on the paths that were recorded are those of a sequential run: the same every run
            assert decided_path["HASH_TAKEN"] + decided_path["FP_TAKEN"] == collisions
            outcomes.append(outcome(unique.values()) | {("refusals", tuple(sorted(decided_path.items())))})
            report[ns] = {
                "plans": len(unique),
                "collisions_resolved": collisions,
                "claims_refused_all_resolutions": dict(refused),
                "claims_refused_recorded_paths": dict(decided_path),
                "per_replica": detail,
                "without_random_asset": sum(1 for p in unique.values() if p.random_asset is None),
            }
            if n == 1:
                # `mpctl plans` on a running namespace: the current plan of every profile
                rows = await current_plans(namespace=ns, bootstrap=infra.kafka)
                assert [r["profile"] for r in rows] == sorted(SPECS)
                text = plans_table(rows)
                assert "alpha" in text and "fingerprint" in text
        finally:
            await run.close()
    assert outcomes[0] == outcomes[1], "two runs over the same data decided different plans"
    report["seconds"] = round(time.monotonic() - t0, 1)
    print("\nRACE REPORT " + json.dumps(report, sort_keys=True), file=sys.stderr)
