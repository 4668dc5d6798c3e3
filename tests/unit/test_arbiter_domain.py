"""Cross-profile arbitration (services/arbiter/domain.py): wash-trade prevention, step barriers, priority."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.arbiter.domain import ArbiterState, client_order_id, decide, new_state
from shared.config import AppConfig, ArbiterSettings
from shared.messages import ExecuteOrder, Message, OrderDecided, PlaceOrder, WorkerFinished
from tests.unit.builders import HOUR, T0, config, of_type, place_order, step_completed

A, B = "profile_a", "profile_b"  # priorities 1 and 2 in the config


@pytest.fixture(scope="module")
def cfg() -> AppConfig:
    return config()


def with_window(cfg: AppConfig, seconds: float) -> AppConfig:
    system = cfg.system.model_copy(update={"arbiter": ArbiterSettings(conflict_window_s=seconds)})
    return cfg.model_copy(update={"system": system})


def with_priorities(cfg: AppConfig, **prio: int) -> AppConfig:
    profiles = {
        pid: p.model_copy(update={"priority": prio.get(pid, p.priority)}) for pid, p in cfg.profiles.items()
    }
    return cfg.model_copy(update={"profiles": profiles})


def run(state: ArbiterState, msgs: list[Message], partition: int = 0) -> list[Message]:
    out: list[Message] = []
    for m in msgs:
        out.extend(decide(state, m, partition))
    return out


def step(state: ArbiterState, t: int, *intents: PlaceOrder, partition: int = 0) -> list[Message]:
    """One event-time step: the intents, then every enabled profile's marker."""
    return run(state, [*intents, *(step_completed(p, t) for p in state.profiles)], partition)


def verdicts(out: list[Message]) -> dict[str, OrderDecided]:
    return {d.profile: d for d in of_type(out, OrderDecided)}


# ------------------------------------------------------------------------------------------ opposite side
def test_second_profile_opposite_side_within_window_is_rejected_naming_both(cfg: AppConfig) -> None:
    state = new_state(with_window(cfg, 2 * HOUR))
    first = step(state, T0, place_order(A, "buy", step=T0))
    assert verdicts(first)[A].verdict == "approved"
    out = step(state, T0 + HOUR, place_order(B, "sell", step=T0 + HOUR))
    d = verdicts(out)[B]
    assert d.verdict == "rejected"
    assert d.rule == "opposite_side"
    assert d.conflicting_profile == A
    assert A in d.reason and B in d.reason
    assert of_type(out, ExecuteOrder) == []


def test_opposite_side_outside_window_is_approved(cfg: AppConfig) -> None:
    state = new_state(with_window(cfg, 2 * HOUR))
    step(state, T0, place_order(A, "buy", step=T0))
    out = step(state, T0 + 3 * HOUR, place_order(B, "sell", step=T0 + 3 * HOUR))
    assert verdicts(out)[B].verdict == "approved"
    assert [e.profile for e in of_type(out, ExecuteOrder)] == [B]


def test_default_window_is_shorter_than_an_hourly_step(cfg: AppConfig) -> None:
    assert cfg.system.arbiter.conflict_window_s < HOUR
    state = new_state(cfg)
    step(state, T0, place_order(A, "buy", step=T0))
    out = step(state, T0 + HOUR, place_order(B, "sell", step=T0 + HOUR))
    assert verdicts(out)[B].verdict == "approved"


def test_opposite_side_on_another_product_is_approved(cfg: AppConfig) -> None:
    state = new_state(cfg)
    out = step(state, T0, place_order(A, "buy", step=T0), place_order(B, "sell", step=T0, product="ETH/USDC"))
    assert {d.profile: d.verdict for d in of_type(out, OrderDecided)} == {A: "approved", B: "approved"}


def test_same_side_of_two_profiles_is_approved(cfg: AppConfig) -> None:
    state = new_state(cfg)
    out = step(state, T0, place_order(A, "buy", step=T0), place_order(B, "buy", step=T0))
    assert {d.profile: d.verdict for d in of_type(out, OrderDecided)} == {A: "approved", B: "approved"}
    assert sorted(e.profile for e in of_type(out, ExecuteOrder)) == [A, B]


def test_same_profile_opposite_sides_is_not_a_cross_profile_wash(cfg: AppConfig) -> None:
    state = new_state(with_window(cfg, 2 * HOUR))
    step(state, T0, place_order(A, "buy", step=T0))
    out = step(state, T0 + HOUR, place_order(A, "sell", step=T0 + HOUR))
    assert verdicts(out)[A].verdict == "approved"
    # ... and a buy and a sell of one profile in one step are both approved too.
    out = step(
        state,
        T0 + 2 * HOUR,
        place_order(B, "buy", step=T0 + 2 * HOUR, product="ETH/USDC"),
        place_order(B, "sell", step=T0 + 2 * HOUR, product="ETH/USDC"),
    )
    assert [d.verdict for d in of_type(out, OrderDecided)] == ["approved", "approved"]


def test_rejected_intent_does_not_count_as_live(cfg: AppConfig) -> None:
    state = new_state(with_window(cfg, 2 * HOUR))
    step(state, T0, place_order(A, "buy", step=T0))
    assert verdicts(step(state, T0 + HOUR, place_order(B, "sell", step=T0 + HOUR)))[B].verdict == "rejected"
    # A second buy of another profile is not blocked by B's rejected sell.
    out = step(state, T0 + HOUR + 60, place_order(A, "buy", step=T0 + HOUR + 60))
    assert verdicts(out)[A].verdict == "approved"


# ------------------------------------------------------------------------------------------ step barrier
def test_intents_held_until_every_enabled_profile_completed_the_step(cfg: AppConfig) -> None:
    state = new_state(cfg)
    assert run(state, [place_order(A, "buy", step=T0), step_completed(A, T0)]) == []
    assert run(state, [step_completed(B, T0 - HOUR)]) == []  # an older step of B is not enough
    out = run(state, [step_completed(B, T0)])
    assert [d.verdict for d in of_type(out, OrderDecided)] == ["approved"]


def test_markers_are_counted_per_partition(cfg: AppConfig) -> None:
    state = new_state(cfg)
    run(state, [place_order(A, "buy", step=T0)], partition=0)
    assert run(state, [step_completed(A, T0), step_completed(B, T0)], partition=1) == []
    assert (
        len(of_type(run(state, [step_completed(A, T0), step_completed(B, T0)], partition=0), OrderDecided))
        == 1
    )


def test_later_marker_releases_earlier_steps_in_step_order(cfg: AppConfig) -> None:
    state = new_state(cfg)
    i1 = place_order(B, "buy", step=T0)
    i2 = place_order(A, "buy", step=T0 + HOUR)
    # A's marker for T0+1h says A is past T0 too, so B's T0 intent goes as soon as B completes T0.
    assert run(state, [i1, i2, step_completed(A, T0 + HOUR)]) == []
    out = run(state, [step_completed(B, T0)])
    assert [d.intent_id for d in of_type(out, OrderDecided)] == [i1.intent_id]
    out = run(state, [step_completed(B, T0 + HOUR)])
    assert [d.intent_id for d in of_type(out, OrderDecided)] == [i2.intent_id]


def test_intents_of_several_steps_released_together_are_decided_in_step_order(cfg: AppConfig) -> None:
    state = new_state(cfg)
    late = place_order(A, "buy", step=T0 + HOUR)
    early = place_order(B, "buy", step=T0)
    run(state, [late, early, step_completed(A, T0 + HOUR)])
    out = run(state, [step_completed(B, T0 + HOUR)])
    assert [d.intent_id for d in of_type(out, OrderDecided)] == [early.intent_id, late.intent_id]


def _arrivals(order: list[str], intents: dict[str, PlaceOrder]) -> list[Message]:
    """Map a permutation of profile names (each twice) to messages: a profile's intent precedes its marker."""
    seen: set[str] = set()
    msgs: list[Message] = []
    for p in order:
        msgs.append(step_completed(p, T0) if p in seen else intents[p])
        seen.add(p)
    return msgs


@settings(max_examples=60, deadline=None)
@given(st.permutations([A, A, B, B]), st.booleans())
def test_priority_decides_who_is_served_whatever_the_arrival_order(order: list[str], b_first: bool) -> None:
    cfg = config()
    if b_first:
        cfg = with_priorities(cfg, profile_a=5, profile_b=0)
    winner, loser = (B, A) if b_first else (A, B)
    state = new_state(cfg)
    intents = {A: place_order(A, "buy", step=T0), B: place_order(B, "sell", step=T0)}
    out = run(state, _arrivals(order, intents))
    v = verdicts(out)
    assert v[winner].verdict == "approved"
    assert v[loser].verdict == "rejected"
    assert v[loser].rule == "opposite_side"
    assert v[loser].conflicting_profile == winner
    assert [e.profile for e in of_type(out, ExecuteOrder)] == [winner]
    assert [d.profile for d in of_type(out, OrderDecided)] == [winner, loser]  # decided in priority order


# ------------------------------------------------------------------------------------------ idempotence
def test_redelivered_intent_gets_the_identical_decision_and_messages(cfg: AppConfig) -> None:
    state = new_state(cfg)
    intent = place_order(A, "buy", step=T0)
    first = step(state, T0, intent)
    counts = dict(state.counts)
    again = run(state, [intent])
    assert again == first
    assert [m.model_dump() for m in again] == [m.model_dump() for m in first]
    assert state.counts == counts  # decided once, counted once


def test_redelivered_rejected_intent_gets_the_same_rejection(cfg: AppConfig) -> None:
    state = new_state(cfg)
    a, b = place_order(A, "buy", step=T0), place_order(B, "sell", step=T0)
    out = step(state, T0, a, b)
    rejection = [m for m in out if isinstance(m, OrderDecided) and m.profile == B]
    assert run(state, [b]) == rejection


def test_intent_redelivered_while_held_is_decided_once(cfg: AppConfig) -> None:
    state = new_state(cfg)
    intent = place_order(A, "buy", step=T0)
    assert run(state, [intent, intent, step_completed(A, T0)]) == []
    out = run(state, [intent, step_completed(B, T0)])
    assert len(of_type(out, OrderDecided)) == 1
    assert len(of_type(out, ExecuteOrder)) == 1


def test_unknown_profile_is_rejected_without_an_order(cfg: AppConfig) -> None:
    state = new_state(cfg)
    out = run(state, [place_order("profile_z", "buy", step=T0)])
    (d,) = of_type(out, OrderDecided)
    assert d.verdict == "rejected"
    assert d.rule == "unknown_profile"
    assert "profile_z" in d.reason
    assert of_type(out, ExecuteOrder) == []


def test_disabled_profile_is_unknown_and_does_not_hold_steps(cfg: AppConfig) -> None:
    profiles = dict(cfg.profiles)
    profiles[B] = profiles[B].model_copy(update={"enabled": False})
    state = new_state(cfg.model_copy(update={"profiles": profiles}))
    out = run(state, [place_order(B, "buy", step=T0)])
    assert verdicts(out)[B].rule == "unknown_profile"
    out = run(state, [place_order(A, "buy", step=T0), step_completed(A, T0)])
    assert verdicts(out)[A].verdict == "approved"


def test_client_order_id_is_a_deterministic_uuid_of_the_intent(cfg: AppConfig) -> None:
    iid = place_order(A, "buy", step=T0).intent_id
    coid = client_order_id(iid)
    assert str(uuid.UUID(coid)) == coid
    assert client_order_id(iid) == coid
    assert client_order_id(place_order(A, "sell", step=T0).intent_id) != coid
    # The arbiter's order carries it, and a second arbiter (restart) derives the same.
    outs = [step(new_state(cfg), T0, place_order(A, "buy", step=T0)) for _ in range(2)]
    orders = [of_type(o, ExecuteOrder)[0] for o in outs]
    assert orders[0].client_order_id == orders[1].client_order_id == coid
    assert orders[0].id == orders[1].id


def test_approved_order_carries_the_intent(cfg: AppConfig) -> None:
    state = new_state(cfg)
    intent = place_order(A, "sell", step=T0, size="0.25", price="123.5", product="ETH/USDC")
    (order,) = of_type(step(state, T0, intent), ExecuteOrder)
    assert (order.intent_id, order.profile, order.product, order.side) == (
        intent.intent_id,
        A,
        "ETH/USDC",
        "sell",
    )
    assert order.size == intent.size and order.reference_price == intent.reference_price
    assert order.not_before == intent.event_time
    assert order.step_time == intent.step_time


# ------------------------------------------------------------------------------------------ finish
def test_worker_finished_only_after_every_profile_final_marker(cfg: AppConfig) -> None:
    state = new_state(cfg)
    held = place_order(B, "buy", step=T0)
    assert run(state, [held, step_completed(B, T0), step_completed(B, T0, final=True)]) == []
    out = run(state, [step_completed(A, T0, final=True)])
    assert [type(m).__name__ for m in out] == ["OrderDecided", "ExecuteOrder", "WorkerFinished"]
    (wf,) = of_type(out, WorkerFinished)
    assert wf.service == "arbiter" and wf.instance == "partition-0"
    # Once per partition: redelivered final markers produce nothing more.
    assert run(state, [step_completed(A, T0, final=True), step_completed(B, T0, final=True)]) == []
    # Another partition finishes on its own.
    out1 = run(state, [step_completed(A, T0, final=True), step_completed(B, T0, final=True)], partition=1)
    assert [m.instance for m in of_type(out1, WorkerFinished)] == ["partition-1"]


def test_finished_profile_no_longer_holds_steps_back(cfg: AppConfig) -> None:
    state = new_state(cfg)
    run(state, [step_completed(B, T0 - HOUR, final=True)])
    out = run(state, [place_order(A, "buy", step=T0), step_completed(A, T0)])
    assert verdicts(out)[A].verdict == "approved"
