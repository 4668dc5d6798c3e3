"""`mpctl send rotate` acts (issue 7): registry replicas over real Kafka and Redis derive an early rotation for the
targeted profile at the first step published after the signed command, exactly one replica publishes it, the
claims stay unique, `all` rotates every profile, and a restarted registry reaches the same rotations."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from pathlib import Path

import pytest

from mpctl.infra import Endpoints
from shared.clock import system_clock
from shared.commands import KEY_ENV, new_command
from shared.kafka import read_topics
from shared.messages import CommandHandled, PlanPublished
from tests.integration.test_registry_harness import ProfileSpec, Run, schedule, write_config

KEY = "integration-rotate-key-0123456789"
SPECS = {
    "alpha": ProfileSpec("alpha_hash", seed=0.1, interval=3600),
    "golf": ProfileSpec("golf_hash", seed=0.2, interval=7200),
    "hotel": ProfileSpec("hotel_hash", seed=0.3, interval=14400),
}


def by_slot(plans: list[PlanPublished]) -> Counter[tuple[str, int, int]]:
    return Counter((p.profile, int(p.epoch_start.timestamp()), p.rotation) for p in plans)


def assert_claims_unique(plans: list[PlanPublished]) -> None:
    """No two profiles hold one hash or fingerprint over overlapping intervals (rotated plans included)."""
    for a, b in itertools.combinations({p.id: p for p in plans}.values(), 2):
        if a.profile != b.profile and a.epoch_start < b.epoch_end and b.epoch_start < a.epoch_end:
            assert a.hash != b.hash and a.fingerprint != b.fingerprint, (
                a.profile,
                a.epoch,
                b.profile,
                b.epoch,
            )


async def send_rotate(run: Run, target: str) -> str:
    assert run.publisher is not None
    cmd = new_command("rotate", target, key=KEY.encode(), now=system_clock())
    await run.publisher.send(run.topics.commands, cmd, key=target)
    await run.publisher.flush()
    return cmd.id


@pytest.mark.timeout(180)
async def test_rotate_command_gives_one_new_plan_per_target_and_a_restart_reaches_the_same(
    infra: Endpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)  # inherited by the registry processes
    config = write_config(tmp_path / "rotate.yaml", SPECS)
    run = Run(infra, f"rot{uuid.uuid4().hex[:8]}", config, tmp_path / "logs")
    try:
        await run.setup()
        for inst in ("r1", "r2"):
            run.start_registry(inst)
        steps = schedule(run.cfg, 24)
        await run.publish(steps[:9])
        await run.wait_plans(lambda ps: {p.profile for p in ps} == set(SPECS) and len(ps) >= 9 + 5 + 3)
        one = await send_rotate(run, "hotel")  # appended after step 8, before step 9 is published
        await run.publish(steps[9:13])
        plans = await run.wait_plans(lambda ps: any(p.rotation for p in ps))
        rotated = [p for p in plans if p.rotation]
        assert [(p.profile, p.rotation, p.epoch_start.timestamp(), p.rotation_commands) for p in rotated] == [
            ("hotel", 1, steps[9].time_s, [one])
        ]
        scheduled = next(
            p for p in plans if p.profile == "hotel" and p.epoch == rotated[0].epoch and not p.rotation
        )
        assert rotated[0].hash != scheduled.hash and rotated[0].epoch_end == scheduled.epoch_end

        every = await send_rotate(run, "all")
        await run.publish(steps[13:], finish_with=steps)
        finished = await run.wait_finished(["r1", "r2"])
        plans = await run.plans()
        second = sorted((p.profile, p.rotation) for p in plans if every in p.rotation_commands)
        assert second == [
            ("alpha", 1),
            ("golf", 1),
            ("hotel", 1 if steps[13].time_s // 14400 != steps[9].time_s // 14400 else 2),
        ]
        assert {p.epoch_start.timestamp() for p in plans if every in p.rotation_commands} == {
            steps[13].time_s
        }
        assert max(by_slot(plans).values()) == 1, "a plan was published twice (two replicas)"
        assert_claims_unique(plans)
        assert (
            sum(int(f.detail["rotations"]) for f in finished.values()) == 2 * 4
        )  # each replica applied all 4
        assert sum(int(f.detail["plans"]) for f in finished.values()) == len(plans)

        # Every registry judged the commands and audited its verdicts.
        audit, _ = await read_topics(infra.kafka, [run.topics.audit])
        verdicts = {
            (v.command_id, v.accepted)
            for v in audit
            if isinstance(v, CommandHandled) and v.service == "registry"
        }
        assert verdicts == {(one, True), (every, True)}

        # A restarted registry re-reads candles and commands: the same rotations, each found on the topic.
        for inst in ("r1", "r2"):
            run.stop(inst)
            del run.procs[inst]  # stopped on purpose: no longer expected alive
        run.start_registry("r3")
        again = (await run.wait_finished(["r3"]))["r3"]
        assert (again.detail["plans"], again.detail["rotations"], again.detail["skipped"]) == (
            0,
            4,
            len(plans),
        )
        assert by_slot(await run.plans()) == by_slot(plans)
    finally:
        await run.close()
