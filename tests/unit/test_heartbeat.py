"""shared/heartbeat.py and the heartbeat side of services/monitor/health.py (pure parts)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.monitor.health import ExpectedService, GroupInfo, health_rows, service_health
from shared.heartbeat import INTERVAL_ENV, heartbeat_interval, heartbeat_state
from shared.messages import ServiceHeartbeat
from tests.unit.builders import T0, dt


def beat(
    service: str, at: int, *, instance: str = "0", interval: float = 5.0, stopping: bool = False
) -> ServiceHeartbeat:
    return ServiceHeartbeat(
        id=f"{service}-{instance}-{at}",
        event_time=dt(at),
        correlation_id="hb",
        service=service,
        instance=instance,
        started_at=dt(T0),
        interval_s=interval,
        stopping=stopping,
    )


def test_a_beat_is_up_within_three_intervals_then_down() -> None:
    b = beat("registry", T0)
    assert heartbeat_state(b, dt(T0) + timedelta(seconds=15)).state == "up"
    assert heartbeat_state(b, dt(T0) + timedelta(seconds=15.1)).state == "down"
    assert heartbeat_state(b, dt(T0) + timedelta(seconds=4), threshold_s=3).state == "down"
    assert heartbeat_state(beat("registry", T0, stopping=True), dt(T0)).state == "down"


def test_interval_from_the_environment_names_the_key_and_the_bad_value() -> None:
    assert heartbeat_interval({}) == 5.0
    assert heartbeat_interval({INTERVAL_ENV: "0"}) == 0.0
    assert heartbeat_interval({INTERVAL_ENV: "0.5"}) == 0.5
    for bad in ("fast", "-1", "0.001"):
        with pytest.raises(ValueError, match=f"{INTERVAL_ENV}.*{bad!r}"):
            heartbeat_interval({INTERVAL_ENV: bad})


def test_beats_decide_the_state_and_services_without_beats_keep_the_group_rule() -> None:
    expected = [
        ExpectedService("ingest", None, "producer only"),
        ExpectedService("registry", "ns.registry", group_optional=True),
        ExpectedService("arbiter", "ns.arbiter"),
        ExpectedService("monitor", "ns.monitor"),
    ]
    groups = {
        "ns.arbiter": GroupInfo("ns.arbiter", "Empty", "consumer"),
        "ns.monitor": GroupInfo("ns.monitor", "Empty", "consumer"),
    }
    beats = {
        "ingest": {"0": beat("ingest", T0 + 58)},
        # two replicas: one fresh is enough
        "registry": {"a": beat("registry", T0), "b": beat("registry", T0 + 59, instance="b")},
        "arbiter": {"0": beat("arbiter", T0 + 30)},
    }
    health = {h.name: h for h in service_health(expected, groups, beats, now=dt(T0 + 60))}
    assert {n: h.state for n, h in health.items()} == {
        "ingest": "up",
        "registry": "up",
        "arbiter": "down",  # its last beat is 30 s old: killed, even though Kafka may still list the member
        "monitor": "down",  # no beat: the group rule (Empty group)
    }
    assert health["registry"].instances_up == 1 and health["registry"].beat_age_s == 1.0
    assert health["arbiter"].note == "no beat for 30.0 s (instance 0)"
    rows = {r[0]: r for r in health_rows(health.values())}
    assert rows["ingest"][:3] == ["ingest", "up", "2.0s"] and rows["monitor"][2] == "-"
