"""Signed commands over real Kafka: a service applies a valid one and refuses (and audits) unsigned, badly
signed, stale and replayed ones, judged against the broker's append time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from mpctl.infra import Endpoints
from shared.clock import system_clock
from shared.commands import CommandGate, CommandVerifier, new_command, sign
from shared.kafka import Publisher, StateMachineService, ensure_topics, read_topics
from shared.messages import CommandHandled, ControlCommand, Message
from shared.topics import TopicSpec

KEY = b"integration-command-key-0123456789"


async def test_service_applies_valid_command_and_audits_each_refusal(
    infra: Endpoints, namespace: str
) -> None:
    b = infra.kafka
    commands, audit, dlq = f"{namespace}.control.commands", f"{namespace}.audit", f"{namespace}.dlq"
    await ensure_topics(
        b, [TopicSpec(commands, 1, log_append_time=True), TopicSpec(audit, 1), TopicSpec(dlq, 1)]
    )
    now = datetime.now(UTC)
    good = new_command("kill", "profile_a", key=KEY, now=now)
    unsigned = new_command("pause", "profile_a", key=KEY, now=now).model_copy(update={"signature": None})
    forged = sign(new_command("flatten", "all", key=KEY, now=now), b"attacker-key-0123456789")
    stale = new_command("resume", "profile_a", key=KEY, now=now - timedelta(hours=1))
    pub = Publisher(b, client_id="t")
    await pub.start()
    for c in (good, unsigned, forged, stale, good):  # the last one is a replay
        await pub.send(commands, c, key=c.target)
    await pub.flush()
    await pub.stop()

    applied: list[ControlCommand] = []

    async def handle(msg: Message, partition: int) -> list[Message]:
        assert isinstance(msg, ControlCommand)
        applied.append(msg)
        return []

    svc = StateMachineService(
        name="svc",
        bootstrap=b,
        topics=[commands],
        group_id=f"{namespace}.svc",
        dead_letter_topic=dlq,
        handle=handle,
        route=lambda m: [(audit, None, False)],
        clock=system_clock,
        commands=CommandGate(CommandVerifier(KEY, timedelta(seconds=120)), "svc"),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(svc.run(stop))
    for _ in range(200):
        if svc.loop is not None and svc.loop.processed >= 5:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 20)

    assert [c.id for c in applied] == [good.id]
    verdicts, _ = await read_topics(b, [audit])
    handled = [v for v in verdicts if isinstance(v, CommandHandled)]
    reasons = [h.reason.split(":")[0] for h in handled]
    assert [h.accepted for h in handled] == [True, False, False, False, False]
    assert reasons[1:] == [
        "unsigned command",
        "bad signature",
        "stale",
        "replayed nonce " + good.nonce[:8] + "...",
    ]
    assert all(h.service == "svc" and h.command_id for h in handled)
