"""A strategy worker skips, undecoded, the records of another profile on the plans, order events and decisions
topics (services/strategy/routing.py ForeignKeys); everything else it decodes and judges as before."""

from __future__ import annotations

from services.arbiter.routing import route as arbiter_route
from services.execution.routing import route as execution_route
from services.registry.routing import route as registry_route
from services.strategy.routing import ForeignKeys, Outputs, routes
from shared.messages import OrderDecided, OrderUpdated, PlanPublished, ProfileHalted
from shared.topics import Topics
from tests.unit.builders import config

T = Topics("ns")
PROFILES = ("profile_a", "profile_b", "profile_c")
FOREIGN = ForeignKeys.of(T, PROFILES, "profile_a")


def test_another_profile_s_plans_events_and_decisions_are_skipped() -> None:
    for topic in (T.plans, T.events, T.decisions):
        assert FOREIGN.skips(topic, b"profile_b") and FOREIGN.skips(topic, b"profile_c")


def test_own_records_unkeyed_and_unknown_keys_are_decoded() -> None:
    for topic in (T.plans, T.events, T.decisions):
        assert not FOREIGN.skips(topic, b"profile_a")
        assert not FOREIGN.skips(topic, None)  # a bad record without a key: every worker dead-letters it
        assert not FOREIGN.skips(topic, b"zz-bad-input")
        assert not FOREIGN.skips(topic, b"profile_b ")  # exact keys only


def test_candles_and_commands_are_never_skipped_whatever_their_key() -> None:
    for topic in (T.candles, T.commands, T.state("strategy", "profile_a")):
        assert not FOREIGN.skips(topic, b"profile_b")


def test_every_writer_keys_these_topics_by_the_message_s_profile() -> None:
    """The skip is sound only while each producer keys a profile's records by its id: checked on the routes."""
    cfg = config()
    pid = next(iter(cfg.profiles))
    plan_route = registry_route(PlanPublished.model_construct(profile=pid), T)
    assert (T.plans, pid, False) in plan_route
    update = OrderUpdated.model_construct(profile=pid)
    assert execution_route(update, T, pid)[0] == (T.events, pid, False)
    assert arbiter_route(OrderDecided.model_construct(profile=pid), T)[0] == (T.decisions, pid, False)
    halted = ProfileHalted.model_construct(profile=pid)
    out = Outputs.of(T, 3, pid)
    assert routes(halted, out)[0] == (T.events, pid.encode(), None)
