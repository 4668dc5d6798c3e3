"""Cross-profile arbitration (services/arbiter/domain.py): barriers, priority, plan echo, opposite sides,
internal crosses, crowding, exposure caps, correlation guard, idempotence and arrival-order independence."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.arbiter.bootstrap import bootstrap
from services.arbiter.domain import ArbiterState, decide, new_state, on_step_marker, pearson
from shared.bus import KafkaAccess
from shared.config import AppConfig
from shared.messages import (
    CorrelationAlert,
    ExecuteOrder,
    InternalCrossOpportunity,
    Message,
    OrderDecided,
    PlaceOrder,
    StepCompleted,
    WorkerFinished,
)
from shared.orders import client_order_id, desync_delay_ms
from shared.runtime import ServiceSettings
from shared.topics import Topics
from tests.unit.builders import (
    HEX64,
    HOUR,
    T0,
    D,
    candle,
    config,
    dt,
    of_type,
    place_order,
    plan,
    replay_finished,
    step_completed,
    watermark,
)

A, B = "profile_a", "profile_b"  # priorities 1 and 2 in the config; rotation 1 h and 4 h
OTHER = "cd" * 32


@pytest.fixture(scope="module")
def cfg() -> AppConfig:
    return config()


def with_arbiter(cfg: AppConfig, **values: Any) -> AppConfig:
    arbiter = cfg.system.arbiter.model_copy(update=values)
    return cfg.model_copy(update={"system": cfg.system.model_copy(update={"arbiter": arbiter})})


def with_execution(cfg: AppConfig, **values: Any) -> AppConfig:
    ex = cfg.system.execution.model_copy(update=values)
    return cfg.model_copy(update={"system": cfg.system.model_copy(update={"execution": ex})})


def with_priorities(cfg: AppConfig, **prio: int) -> AppConfig:
    profiles = {
        pid: p.model_copy(update={"priority": prio.get(pid, p.priority)}) for pid, p in cfg.profiles.items()
    }
    return cfg.model_copy(update={"profiles": profiles})


def rotation(state: ArbiterState, profile: str) -> int:
    return state.rotation_s.get(profile, HOUR)


def intent(state: ArbiterState, profile: str, side: str, t: int = T0, **kw: Any) -> PlaceOrder:
    """A strategy's intent at step t, with the epoch of the profile's own rotation."""
    return place_order(profile, side, step=t, epoch=kw.pop("epoch", t // rotation(state, profile)), **kw)


def plans_at(state: ArbiterState, t: int, **kw: Any) -> list[Message]:
    out: list[Message] = []
    for pid in state.profiles:
        r = rotation(state, pid)
        out.append(plan(pid, t // r, interval=r, **kw))
    return out


def market(t: int, prices: dict[str, Any] | None = None) -> list[Message]:
    """Step t's candles (open = close = price) and its watermark on the (single) candle partition."""
    out: list[Message] = [candle(p, t, v, v, v, v) for p, v in sorted((prices or {}).items())]
    return [*out, watermark(t)]


def markers(
    state: ArbiterState, t: int, profiles: Iterable[str] | None = None, **kw: Any
) -> list[tuple[Message, int]]:
    return [
        (step_completed(p, t, **kw), part)
        for p in (profiles or state.profiles)
        for part in range(state.n_partitions)
    ]


def feed(state: ArbiterState, msgs: Iterable[Message | tuple[Message, int]]) -> list[Message]:
    out: list[Message] = []
    for m in msgs:
        msg, part = m if isinstance(m, tuple) else (m, 0)
        out.extend(decide(state, msg, part))
    return out


def step(
    state: ArbiterState, t: int, *intents: PlaceOrder, prices: dict[str, Any] | None = None
) -> list[Message]:
    """One complete event-time step: plans, market data, the intents, every profile's marker everywhere."""
    return feed(state, [*plans_at(state, t), *market(t, prices), *intents, *markers(state, t)])


def verdicts(out: list[Message]) -> dict[str, OrderDecided]:
    return {d.profile: d for d in of_type(out, OrderDecided)}


def orders(out: list[Message]) -> dict[str, ExecuteOrder]:
    return {o.profile: o for o in of_type(out, ExecuteOrder)}


# ------------------------------------------------------------------------------------------ opposite side
def test_second_profile_opposite_side_within_window_is_rejected_naming_both(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, conflict_window_s=2 * HOUR))
    first = step(state, T0, intent(state, A, "buy"))
    assert verdicts(first)[A].verdict == "approved"
    out = step(state, T0 + HOUR, intent(state, B, "sell", T0 + HOUR))
    d = verdicts(out)[B]
    assert d.verdict == "rejected"
    assert d.rule == "opposite_side"
    assert d.conflicting_profile == A
    assert A in d.reason and B in d.reason
    assert d.details["opposite_side"]["conflicts"][0]["profile"] == A
    assert of_type(out, ExecuteOrder) == []


def test_opposite_side_outside_window_is_approved(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, conflict_window_s=2 * HOUR))
    step(state, T0, intent(state, A, "buy"))
    out = step(state, T0 + 3 * HOUR, intent(state, B, "sell", T0 + 3 * HOUR))
    assert verdicts(out)[B].verdict == "approved"
    assert [e.profile for e in of_type(out, ExecuteOrder)] == [B]


def test_recent_fill_counts_until_a_window_after_the_latest_end(cfg: AppConfig) -> None:
    # An order sent late (constant 30 s de-sync here) is live until send + order_timeout (45 s for A), then
    # a recent fill for the window.
    c = with_execution(
        with_arbiter(cfg, conflict_window_s=HOUR - 10), desync_min_ms=30_000, desync_max_ms=30_000
    )
    state = new_state(c)
    step(state, T0, intent(state, A, "buy"))
    # B's sell an hour later: 3590 s after A's decision, but only 3525 s after A's latest end.
    out = step(state, T0 + HOUR, intent(state, B, "sell", T0 + HOUR))
    assert verdicts(out)[B].rule == "opposite_side"


def with_order_timeout(cfg: AppConfig, seconds: float, *profiles: str) -> AppConfig:
    updated = {
        pid: p.model_copy(
            update={"trading_params": p.trading_params.model_copy(update={"order_timeout": seconds})}
        )
        for pid, p in cfg.profiles.items()
        if not profiles or pid in profiles
    }
    return cfg.model_copy(update={"profiles": {**cfg.profiles, **updated}})


def test_order_blocks_the_other_side_for_its_whole_working_life(cfg: AppConfig) -> None:
    # A's buy is sent 30 s after its decision and may keep filling for order_timeout (3 h) after the send:
    # another profile's sell an hour, then two hours later (after A's send, before send + timeout) is rejected.
    c = with_order_timeout(with_execution(cfg, desync_min_ms=30_000, desync_max_ms=30_000), 3 * HOUR, A)
    state = new_state(c)
    assert cfg.system.arbiter.conflict_window_s < HOUR
    buy = intent(state, A, "buy")
    step(state, T0, buy)
    send = buy.event_time + timedelta(seconds=30)
    for k in (1, 2, 3):
        t = T0 + k * HOUR
        d = verdicts(step(state, t, intent(state, B, "sell", t)))[B]
        assert (d.verdict, d.rule, d.conflicting_profile) == ("rejected", "opposite_side", A), k
        (conflict,) = d.details["opposite_side"]["conflicts"]
        assert conflict["send"] == send.isoformat()
        assert conflict["until"] == (send + timedelta(hours=3)).isoformat()  # send + order_timeout


def test_order_blocks_the_window_after_its_latest_end_then_no_longer(cfg: AppConfig) -> None:
    window = cfg.system.arbiter.conflict_window_s
    c = with_order_timeout(
        with_execution(cfg, desync_min_ms=30_000, desync_max_ms=30_000), 2 * HOUR - 30 - window + 1, A
    )
    state = new_state(c)
    step(state, T0, intent(state, A, "buy"))
    # A's latest end + window = T0 + 2 h + 1 s: B's sell at T0 + 2 h is still blocked.
    t = T0 + 2 * HOUR
    assert verdicts(step(state, t, intent(state, B, "sell", t)))[B].rule == "opposite_side"
    # Another run, one second shorter: end + window = T0 + 2 h exactly, and B's sell is approved.
    c = with_order_timeout(
        with_execution(cfg, desync_min_ms=30_000, desync_max_ms=30_000), 2 * HOUR - 30 - window, A
    )
    state = new_state(c)
    step(state, T0, intent(state, A, "buy"))
    assert verdicts(step(state, t, intent(state, B, "sell", t)))[B].verdict == "approved"


def test_working_life_uses_the_order_timeout_of_the_orders_own_profile(cfg: AppConfig) -> None:
    # B's orders time out fast, A's slowly: only A's working order holds the other side back.
    c = with_order_timeout(with_order_timeout(cfg, 3 * HOUR, A), 10, B)
    state = new_state(c)
    step(state, T0, intent(state, B, "sell"))
    t = T0 + HOUR
    assert verdicts(step(state, t, intent(state, A, "buy", t)))[A].verdict == "approved"
    t = T0 + 2 * HOUR
    assert verdicts(step(state, t, intent(state, B, "sell", t)))[B].rule == "opposite_side"


def test_execute_mode_rejects_against_an_earlier_order_still_working(cfg: AppConfig) -> None:
    # Netting is for the intents of one step only: an order of an earlier step still working is a conflict.
    state = new_state(with_order_timeout(with_arbiter(cfg, internal_cross="execute"), 3 * HOUR, A))
    step(state, T0, intent(state, A, "buy"))
    t = T0 + 2 * HOUR
    out = step(state, t, intent(state, B, "sell", t))
    assert verdicts(out)[B].rule == "opposite_side"
    assert [o.executed for o in of_type(out, InternalCrossOpportunity)] == [False]


def test_default_window_is_shorter_than_an_hourly_step(cfg: AppConfig) -> None:
    assert cfg.system.arbiter.conflict_window_s < HOUR
    state = new_state(cfg)
    step(state, T0, intent(state, A, "buy"))
    out = step(state, T0 + HOUR, intent(state, B, "sell", T0 + HOUR))
    assert verdicts(out)[B].verdict == "approved"


def test_opposite_side_on_another_product_is_approved(cfg: AppConfig) -> None:
    state = new_state(cfg)
    out = step(state, T0, intent(state, A, "buy"), intent(state, B, "sell", product="ETH/USDC"))
    assert {d.profile: d.verdict for d in of_type(out, OrderDecided)} == {A: "approved", B: "approved"}


def test_same_profile_opposite_sides_is_not_a_cross_profile_wash(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, conflict_window_s=2 * HOUR))
    step(state, T0, intent(state, A, "buy"))
    out = step(state, T0 + HOUR, intent(state, A, "sell", T0 + HOUR))
    assert verdicts(out)[A].verdict == "approved"
    t = T0 + 2 * HOUR
    out = step(
        state,
        t,
        intent(state, B, "buy", t, product="ETH/USDC"),
        intent(state, B, "sell", t, product="ETH/USDC"),
    )
    assert [d.verdict for d in of_type(out, OrderDecided)] == ["approved", "approved"]


def test_rejected_intent_does_not_count_as_live(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, conflict_window_s=2 * HOUR))
    step(state, T0, intent(state, A, "buy"))
    assert verdicts(step(state, T0 + HOUR, intent(state, B, "sell", T0 + HOUR)))[B].verdict == "rejected"
    out = step(state, T0 + 2 * HOUR, intent(state, A, "buy", T0 + 2 * HOUR))
    assert verdicts(out)[A].verdict in ("approved", "delayed")


# ------------------------------------------------------------------------------------------ internal cross
def test_opposite_intents_of_one_step_report_an_internal_cross_with_its_savings(cfg: AppConfig) -> None:
    state = new_state(cfg)
    buy = intent(state, A, "buy", size="0.5", price="100")
    sell = intent(state, B, "sell", size="0.3", price="100")
    out = step(state, T0, buy, sell)
    assert verdicts(out)[B].rule == "opposite_side"
    (opp,) = of_type(out, InternalCrossOpportunity)
    assert (opp.buyer, opp.seller, opp.buy_intent_id, opp.sell_intent_id) == (
        A,
        B,
        buy.intent_id,
        sell.intent_id,
    )
    assert opp.size == D("0.3") and opp.executed is False
    fee_rate = D(cfg.system.execution.taker_fee_rate)
    slip = D(cfg.profiles[A].trading_params.slippage_tolerance) + D(
        cfg.profiles[B].trading_params.slippage_tolerance
    )
    assert opp.fee_saving == D("30") * 2 * fee_rate == D("0.36")
    assert opp.slippage_saving == D("30") * slip == D("0.105")
    assert opp.saving == D("0.465")
    assert state.savings["total"] == D("0.465") and state.savings["opportunities"] == 1


def test_execute_mode_nets_one_steps_opposite_intents_as_internal_transfers(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, internal_cross="execute"))
    buy = intent(state, A, "buy", size="0.5", price="100")
    sell = intent(state, B, "sell", size="0.3", price="100")
    out = step(state, T0, buy, sell)
    v, o = verdicts(out), orders(out)
    assert v[B].verdict == "approved" and v[B].rule == "internal_cross" and v[B].conflicting_profile == A
    assert v[A].rule == "internal_cross"
    assert (o[A].size, o[A].internal_size, o[A].counterparties) == (D("0.5"), D("0.3"), [B])
    assert (o[B].size, o[B].internal_size, o[B].counterparties) == (D("0.3"), D("0.3"), [A])
    assert o[B].not_before == sell.event_time  # nothing goes to the exchange: no de-sync wait
    (opp,) = of_type(out, InternalCrossOpportunity)
    assert opp.executed is True and opp.size == D("0.3")


def test_execute_mode_still_rejects_against_an_order_of_an_earlier_step(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, internal_cross="execute", conflict_window_s=2 * HOUR))
    step(state, T0, intent(state, A, "buy"))
    out = step(state, T0 + HOUR, intent(state, B, "sell", T0 + HOUR))
    assert verdicts(out)[B].rule == "opposite_side"  # A's order is already sent: nothing left to net
    assert [o.executed for o in of_type(out, InternalCrossOpportunity)] == [False]


def test_execute_mode_is_refused_in_live_mode(cfg: AppConfig) -> None:
    live = with_arbiter(cfg, internal_cross="execute").model_copy(
        update={
            "system": with_arbiter(cfg, internal_cross="execute").system.model_copy(update={"mode": "live"})
        }
    )
    with pytest.raises(ValueError, match="paper-mode option"):
        new_state(live)


# ------------------------------------------------------------------------------------------ barriers
def test_intents_held_until_every_profile_completed_the_step_on_every_partition(cfg: AppConfig) -> None:
    state = new_state(cfg)
    assert (
        feed(state, [*plans_at(state, T0), *market(T0), intent(state, A, "buy"), *markers(state, T0, [A])])
        == []
    )
    assert feed(state, markers(state, T0 - HOUR, [B])) == []  # an older step of B is not enough
    assert (
        feed(state, [(step_completed(B, T0), 0), (step_completed(B, T0), 1)]) == []
    )  # partition 2 is missing
    out = feed(state, [(step_completed(B, T0), 2)])
    assert [d.verdict for d in of_type(out, OrderDecided)] == ["approved"]


def test_intents_wait_for_the_market_data_of_their_step(cfg: AppConfig) -> None:
    state = new_state(cfg)
    assert (
        feed(state, [*plans_at(state, T0), *market(T0 - HOUR), intent(state, A, "buy"), *markers(state, T0)])
        == []
    )
    out = feed(state, [watermark(T0)])
    assert [d.verdict for d in of_type(out, OrderDecided)] == ["approved"]


def test_later_marker_releases_earlier_steps_in_step_order(cfg: AppConfig) -> None:
    state = new_state(cfg)
    feed(state, [*plans_at(state, T0), *plans_at(state, T0 + HOUR), *market(T0), *market(T0 + HOUR)])
    i1 = intent(state, B, "buy")
    i2 = intent(state, A, "buy", T0 + HOUR)
    assert feed(state, [i1, i2, *markers(state, T0 + HOUR, [A])]) == []
    out = feed(state, markers(state, T0, [B]))
    assert [d.intent_id for d in of_type(out, OrderDecided)] == [i1.intent_id]
    out = feed(state, markers(state, T0 + HOUR, [B]))
    assert [d.intent_id for d in of_type(out, OrderDecided)] == [i2.intent_id]


def test_intents_of_several_steps_released_together_are_decided_in_step_order(cfg: AppConfig) -> None:
    state = new_state(cfg)
    feed(state, [*plans_at(state, T0), *plans_at(state, T0 + HOUR), *market(T0), *market(T0 + HOUR)])
    late = intent(state, A, "buy", T0 + HOUR)
    early = intent(state, B, "buy", T0, product="ETH/USDC")
    feed(state, [late, early, *markers(state, T0 + HOUR, [A])])
    out = feed(state, markers(state, T0 + HOUR, [B]))
    assert [d.intent_id for d in of_type(out, OrderDecided)] == [early.intent_id, late.intent_id]


def test_steps_across_products_are_decided_in_priority_order(cfg: AppConfig) -> None:
    state = new_state(with_priorities(cfg, profile_a=5, profile_b=0))
    a, b = intent(state, A, "buy"), intent(state, B, "buy", product="ETH/USDC")
    out = feed(state, [*plans_at(state, T0), *market(T0), (a, 0), (b, 1), *markers(state, T0)])
    assert [d.profile for d in of_type(out, OrderDecided)] == [B, A]


# ------------------------------------------------------------------------------------------ plan echo
def test_intent_waits_for_its_plan_then_is_decided(cfg: AppConfig) -> None:
    state = new_state(cfg)
    i = intent(state, A, "buy")
    assert feed(state, [*market(T0), i, *markers(state, T0)]) == []
    out = feed(state, plans_at(state, T0))
    d = verdicts(out)[A]
    assert d.verdict == "approved" and d.details["plan_echo"]["registered"] == HEX64


def test_forged_fingerprint_is_rejected_naming_both(cfg: AppConfig) -> None:
    state = new_state(cfg)
    out = step(state, T0, intent(state, A, "buy", fingerprint=OTHER))
    d = verdicts(out)[A]
    assert (d.verdict, d.rule) == ("rejected", "plan_echo")
    assert OTHER[:12] in d.reason and HEX64[:12] in d.reason
    assert of_type(out, ExecuteOrder) == []


def test_stale_intent_after_a_rotation_is_rejected(cfg: AppConfig) -> None:
    state = new_state(cfg)
    # profile_a rotates hourly: an intent for the step T0+1h that carries epoch T0's plan is stale.
    t = T0 + HOUR
    out = step(state, t, intent(state, A, "buy", t, epoch=T0 // HOUR))
    d = verdicts(out)[A]
    assert (d.rule, d.details["plan_echo"]["step_epoch"]) == ("plan_echo", t // HOUR)
    assert "stale" in d.reason


def test_intent_of_a_profile_that_never_reached_its_step_is_rejected_without_waiting(cfg: AppConfig) -> None:
    state = new_state(cfg)
    feed(state, [*plans_at(state, T0), *market(T0), *market(T0 + HOUR), *markers(state, T0, final=True)])
    forged = intent(state, A, "buy", T0 + HOUR)  # A finished at T0: no plan of epoch T0+1h was ever needed
    out = feed(state, [forged])
    assert verdicts(out)[A].rule == "plan_echo"


def test_lost_plan_is_given_up_after_plan_wait(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, plan_wait_s=2 * HOUR))
    msgs: list[Message | tuple[Message, int]] = []
    for k in range(4):
        msgs += market(T0 + k * HOUR)
    # A completed T0 (so its plan of T0 should exist) but that plan is never read (lost, e.g. compacted).
    msgs += [intent(state, A, "buy"), *markers(state, T0)]
    assert feed(state, msgs) == []
    assert feed(state, [plan(A, (T0 + 3 * HOUR) // HOUR), *markers(state, T0 + HOUR)]) == []  # a later plan
    out = feed(state, markers(state, T0 + 2 * HOUR))  # plan_wait_s of event time later
    assert verdicts(out)[A].rule == "plan_echo"


def test_manual_intent_needs_no_plan(cfg: AppConfig) -> None:
    state = new_state(cfg)
    manual = intent(state, A, "buy", reason="manual", fingerprint="manual", epoch=0)
    out = feed(state, [*market(T0), manual, *markers(state, T0)])
    d = verdicts(out)[A]
    assert d.verdict == "approved" and d.details["plan_echo"] == {"skipped": "manual intent"}
    assert orders(out)[A].profile_hash is None  # the worker seeds its delay with the base hash


def test_approved_order_carries_the_plan_hash_as_de_sync_seed(cfg: AppConfig) -> None:
    state = new_state(cfg)
    out = step(state, T0, intent(state, A, "buy"))
    assert orders(out)[A].profile_hash == HEX64


# ------------------------------------------------------------------------------------------ crowding
def test_same_side_intents_are_spaced_by_the_minimum_gap(cfg: AppConfig) -> None:
    c = with_execution(with_arbiter(cfg, min_cross_profile_gap_ms=700), desync_min_ms=100, desync_max_ms=100)
    state = new_state(c)
    a, b = intent(state, A, "buy"), intent(state, B, "buy")
    out = step(state, T0, a, b)
    v, o = verdicts(out), orders(out)
    assert v[A].verdict == "approved" and o[A].not_before == a.event_time
    assert (v[B].verdict, v[B].rule) == ("delayed", "crowding")
    assert v[B].not_before == o[B].not_before == b.event_time + timedelta(milliseconds=700)
    assert v[B].details["crowding"]["pushed_ms"] == 700
    # The two orders reach the exchange 700 ms apart: not_before + the same 100 ms de-sync each.


def test_crowding_uses_the_workers_own_de_sync_prediction(cfg: AppConfig) -> None:
    c = with_arbiter(cfg, min_cross_profile_gap_ms=2000)
    state = new_state(c)
    a, b = intent(state, A, "buy"), intent(state, B, "buy")
    o = orders(step(state, T0, a, b))
    ex = c.system.execution
    send = {
        p: o[p].not_before
        + timedelta(milliseconds=desync_delay_ms(HEX64, o[p].intent_id, ex.desync_min_ms, ex.desync_max_ms))
        for p in (A, B)
    }
    assert abs(send[A] - send[B]) >= timedelta(milliseconds=2000)


def test_no_gap_is_needed_between_one_profiles_own_orders(cfg: AppConfig) -> None:
    c = with_execution(with_arbiter(cfg, min_cross_profile_gap_ms=700), desync_min_ms=100, desync_max_ms=100)
    state = new_state(c)
    out = step(
        state,
        T0,
        intent(state, A, "buy"),
        intent(state, A, "buy", product="ETH/USDC"),
        intent(state, A, "sell", product="SOL/USDC"),
    )
    assert {d.verdict for d in of_type(out, OrderDecided)} == {"approved"}


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([A, B]), st.sampled_from(["BTC/USDC", "ETH/USDC"]), st.integers(0, 3)),
        min_size=1,
        max_size=12,
        unique=True,
    )
)
def test_every_pair_of_profiles_orders_on_a_product_is_at_least_the_gap_apart(
    picks: list[tuple[str, str, int]],
) -> None:
    c = with_arbiter(config(), min_cross_profile_gap_ms=900)
    state = new_state(c)
    ex = c.system.execution
    sends: list[tuple[str, str, int]] = []
    for k in range(4):
        t = T0 + k * HOUR
        intents = [intent(state, p, "buy", t, product=prod) for p, prod, kk in picks if kk == k]
        for o in of_type(step(state, t, *intents), ExecuteOrder):
            delay = desync_delay_ms(o.profile_hash or "", o.intent_id, ex.desync_min_ms, ex.desync_max_ms)
            sends.append((o.profile, o.product, round((o.not_before.timestamp()) * 1000) + delay))
    for p1, prod1, s1 in sends:
        for p2, prod2, s2 in sends:
            if p1 != p2 and prod1 == prod2:
                assert abs(s1 - s2) >= 900


# ------------------------------------------------------------------------------------------ exposure
def test_buy_beyond_the_product_cap_is_trimmed(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, max_product_notional=150.0))
    out = step(state, T0, intent(state, A, "buy", size="1", price="100"), prices={"BTC/USDC": 100})
    assert verdicts(out)[A].verdict == "approved"
    out = step(
        state, T0 + HOUR, intent(state, B, "buy", T0 + HOUR, size="1", price="100"), prices={"BTC/USDC": 100}
    )
    d, o = verdicts(out)[B], orders(out)[B]
    assert (d.rule, d.size, d.requested_size, o.size) == ("exposure_cap", D("0.5"), D("1"), D("0.5"))
    assert d.details["exposure_cap"]["binding"] == "max_product_notional"
    assert d.details["exposure_cap"]["product_exposure"] == "100.00000000"


def test_reject_action_rejects_the_excess_and_sells_are_never_capped(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, max_product_notional=150.0, exposure_action="reject"))
    step(state, T0, intent(state, A, "buy", size="1", price="100"), prices={"BTC/USDC": 100})
    t = T0 + HOUR
    out = step(state, t, intent(state, B, "buy", t, size="1", price="100"), prices={"BTC/USDC": 100})
    assert (verdicts(out)[B].verdict, verdicts(out)[B].rule) == ("rejected", "exposure_cap")
    out = step(
        state, t + HOUR, intent(state, A, "sell", t + HOUR, size="1", price="300"), prices={"BTC/USDC": 300}
    )
    assert verdicts(out)[A].verdict == "approved"


def test_total_cap_spans_products_at_their_marks(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, max_total_notional=250.0))
    step(state, T0, intent(state, A, "buy", size="1", price="100"), prices={"BTC/USDC": 100, "ETH/USDC": 50})
    t = T0 + HOUR
    # BTC is now worth 180: 70 of room left for B's ETH buy (2 x 50 asked).
    out = step(
        state,
        t,
        intent(state, B, "buy", t, product="ETH/USDC", size="2", price="50"),
        prices={"BTC/USDC": 180, "ETH/USDC": 50},
    )
    d = verdicts(out)[B]
    assert (d.rule, d.size) == ("exposure_cap", D("1.4"))
    assert d.details["exposure_cap"]["binding"] == "max_total_notional"


def test_trim_below_min_notional_is_a_rejection(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, max_product_notional=100.5, min_order_notional=1.0))
    step(state, T0, intent(state, A, "buy", size="1", price="100"), prices={"BTC/USDC": 100})
    t = T0 + HOUR
    out = step(state, t, intent(state, B, "buy", t, size="1", price="100"), prices={"BTC/USDC": 100})
    assert (verdicts(out)[B].verdict, verdicts(out)[B].rule) == ("rejected", "exposure_cap")


# ------------------------------------------------------------------------------------------ correlation
def test_pearson() -> None:
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1, 2], [1, 2]) is None


def test_correlated_profiles_raise_an_alert_and_the_newer_ones_buys_are_scaled(cfg: AppConfig) -> None:
    c = with_arbiter(
        cfg,
        correlation_window_steps=6,
        correlation_min_steps=4,
        correlation_threshold=0.8,
        correlation_size_scale=0.5,
        min_cross_profile_gap_ms=0,
    )
    state = new_state(c)
    # Both profiles hold 1 BTC from T0 on; the price moves; their returns move together.
    step(
        state,
        T0,
        intent(state, A, "buy", product="BTC/USDC"),
        intent(state, B, "buy", product="BTC/USDC"),
        prices={"BTC/USDC": 100},
    )
    alerts: list[CorrelationAlert] = []
    for k, px in enumerate([103, 101, 106, 104], start=1):
        alerts += of_type(step(state, T0 + k * HOUR, prices={"BTC/USDC": px}), CorrelationAlert)
    t = T0 + 5 * HOUR
    out = step(
        state,
        t,
        intent(state, A, "buy", t, product="ETH/USDC", size="1", price="10"),
        intent(state, B, "buy", t, product="ETH/USDC", size="1", price="10"),
        prices={"BTC/USDC": 108},
    )
    alerts += of_type(out, CorrelationAlert)
    (alert,) = alerts
    assert (alert.state, alert.profile, alert.other_profile) == ("breach", B, A)
    assert alert.correlation == pytest.approx(1.0)
    v = verdicts(out)
    assert v[A].size == D("1") and v[A].rule == "approved"
    assert (v[B].rule, v[B].size, v[B].requested_size) == ("correlation_guard", D("0.5"), D("1"))
    assert v[B].details["correlation_guard"]["correlations"][A] == pytest.approx(1.0)


def test_no_correlation_without_positions(cfg: AppConfig) -> None:
    state = new_state(with_arbiter(cfg, correlation_window_steps=4, correlation_min_steps=3))
    for k, px in enumerate([100, 103, 101, 106, 104]):
        assert of_type(step(state, T0 + k * HOUR, prices={"BTC/USDC": px}), CorrelationAlert) == []
    out = step(state, T0 + 5 * HOUR, intent(state, B, "buy", T0 + 5 * HOUR), prices={"BTC/USDC": 100})
    assert verdicts(out)[B].rule == "approved" and state.correlations[(A, B)] is None


# ------------------------------------------------------------------------------------------ priority, order
def _sources(state: ArbiterState, winner_first: list[PlaceOrder]) -> list[list[tuple[Message, int]]]:
    """Every stream the arbiter reads, each in its own order: plans, candles, and per (partition, profile)
    the profile's intents there followed by its marker."""
    srcs: list[list[tuple[Message, int]]] = [
        [(m, 0) for m in plans_at(state, T0)],
        [(m, 0) for m in market(T0)],
    ]
    for part in range(state.n_partitions):
        for pid in state.profiles:
            mine: list[tuple[Message, int]] = [
                (i, part) for i in winner_first if i.profile == pid and part == 0
            ]
            srcs.append([*mine, (step_completed(pid, T0), part)])
    return srcs


def _interleave(srcs: list[list[tuple[Message, int]]], rnd: random.Random) -> list[tuple[Message, int]]:
    queues = [list(s) for s in srcs if s]
    out: list[tuple[Message, int]] = []
    while queues:
        q = rnd.choice(queues)
        out.append(q.pop(0))
        if not q:
            queues.remove(q)
    return out


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.booleans())
def test_priority_decides_who_is_served_whatever_the_arrival_order(rnd: random.Random, b_first: bool) -> None:
    c = config()
    if b_first:
        c = with_priorities(c, profile_a=5, profile_b=0)
    winner, loser = (B, A) if b_first else (A, B)
    state = new_state(c)
    intents = [intent(state, A, "buy"), intent(state, B, "sell")]
    out = feed(state, _interleave(_sources(state, intents), rnd))
    v = verdicts(out)
    assert v[winner].verdict in ("approved", "delayed")
    assert (v[loser].verdict, v[loser].rule, v[loser].conflicting_profile) == (
        "rejected",
        "opposite_side",
        winner,
    )
    assert [e.profile for e in of_type(out, ExecuteOrder)] == [winner]
    assert [d.profile for d in of_type(out, OrderDecided)] == [winner, loser]


def _scenario(state: ArbiterState) -> list[list[tuple[Message, int]]]:
    """Four steps, three products over three partitions, both profiles: every rule has something to do."""
    parts = {"BTC/USDC": 0, "ETH/USDC": 1, "SOL/USDC": 2}
    prices: list[dict[str, Any]] = [
        {"BTC/USDC": 100, "ETH/USDC": 10, "SOL/USDC": 5},
        {"BTC/USDC": 104, "ETH/USDC": 9, "SOL/USDC": 5.5},
        {"BTC/USDC": 102, "ETH/USDC": 11, "SOL/USDC": 5.2},
        {"BTC/USDC": 107, "ETH/USDC": 10, "SOL/USDC": 5.1},
    ]
    plan_src = [(m, 0) for k in range(4) for m in plans_at(state, T0 + k * HOUR)]
    candle_src = [(m, 0) for k in range(4) for m in market(T0 + k * HOUR, prices[k])]
    script: dict[int, list[tuple[str, ...]]] = {
        0: [(A, "buy", "BTC/USDC"), (B, "buy", "BTC/USDC"), (B, "buy", "ETH/USDC")],
        1: [(A, "sell", "BTC/USDC"), (B, "buy", "SOL/USDC"), (A, "buy", "ETH/USDC")],
        2: [(B, "sell", "BTC/USDC"), (A, "buy", "BTC/USDC"), (A, "buy", "SOL/USDC"), (B, "sell", "ETH/USDC")],
        3: [(A, "sell", "SOL/USDC"), (B, "buy", "ETH/USDC"), (A, "buy", "ETH/USDC", "forged")],
    }
    per: dict[tuple[int, str], list[tuple[Message, int]]] = {
        (p, pid): [] for p in range(3) for pid in state.profiles
    }
    for k in range(4):
        t = T0 + k * HOUR
        for row in script[k]:
            pid, side, product = row[:3]
            fp = OTHER if len(row) > 3 else HEX64
            i = intent(
                state, pid, side, t, product=product, size="2", price=prices[k][product], fingerprint=fp
            )
            per[(parts[product], pid)].append((i, parts[product]))
        for p in range(3):
            for pid in state.profiles:
                per[(p, pid)].append((step_completed(pid, t, final=k == 3), p))
    return [plan_src, candle_src, *per.values()]


def _decisions(out: list[Message]) -> dict[str, dict[str, Any]]:
    return {m.id: m.model_dump() for m in out if not isinstance(m, WorkerFinished)}


@settings(max_examples=25, deadline=None)
@given(st.randoms(use_true_random=False))
def test_decisions_do_not_depend_on_the_arrival_order_across_topics_and_partitions(
    rnd: random.Random,
) -> None:
    c = with_arbiter(
        config(),
        conflict_window_s=2 * HOUR,
        max_total_notional=400.0,
        min_cross_profile_gap_ms=800,
        correlation_window_steps=4,
        correlation_min_steps=3,
    )
    reference = new_state(c)
    srcs = _scenario(reference)
    expected = _decisions(feed(reference, [m for s in srcs for m in s]))
    state = new_state(c)
    got = _decisions(feed(state, _interleave(srcs, rnd)))
    assert got == expected
    rules = {(d["verdict"], d["rule"]) for d in expected.values() if d["type"] == "OrderDecided"}
    assert ("rejected", "opposite_side") in rules and ("rejected", "plan_echo") in rules
    assert any(r == "exposure_cap" for _, r in rules) and ("delayed", "crowding") in rules


# ------------------------------------------------------------------------------------------ idempotence
def test_redelivered_intent_gets_the_identical_decision_and_messages(cfg: AppConfig) -> None:
    state = new_state(cfg)
    i = intent(state, A, "buy")
    first = step(state, T0, i)
    counts = dict(state.counts)
    again = feed(state, [i])
    assert [m.model_dump() for m in again] == [
        m.model_dump() for m in first if not isinstance(m, WorkerFinished)
    ]
    assert state.counts == counts  # decided once, counted once


def test_redelivered_rejected_intent_gets_the_same_rejection_and_opportunity(cfg: AppConfig) -> None:
    state = new_state(cfg)
    a, b = intent(state, A, "buy"), intent(state, B, "sell")
    out = step(state, T0, a, b)
    mine = [m for m in out if getattr(m, "intent_id", None) == b.intent_id]
    assert [type(m) for m in mine] == [OrderDecided, InternalCrossOpportunity]
    assert feed(state, [b]) == mine


def test_intent_redelivered_while_held_is_decided_once(cfg: AppConfig) -> None:
    state = new_state(cfg)
    i = intent(state, A, "buy")
    assert feed(state, [*plans_at(state, T0), *market(T0), i, i, *markers(state, T0, [A])]) == []
    out = feed(state, [i, *markers(state, T0, [B])])
    assert len(of_type(out, OrderDecided)) == 1
    assert len(of_type(out, ExecuteOrder)) == 1


def test_unknown_profile_is_rejected_without_an_order(cfg: AppConfig) -> None:
    state = new_state(cfg)
    out = feed(state, [place_order("profile_z", "buy", step=T0)])
    (d,) = of_type(out, OrderDecided)
    assert (d.verdict, d.rule) == ("rejected", "unknown_profile")
    assert "profile_z" in d.reason
    assert of_type(out, ExecuteOrder) == []


def test_disabled_profile_is_unknown_and_does_not_hold_steps(cfg: AppConfig) -> None:
    profiles = dict(cfg.profiles)
    profiles[B] = profiles[B].model_copy(update={"enabled": False})
    state = new_state(cfg.model_copy(update={"profiles": profiles}))
    out = feed(state, [place_order(B, "buy", step=T0)])
    assert verdicts(out)[B].rule == "unknown_profile"
    out = step(state, T0, intent(state, A, "buy"))
    assert verdicts(out)[A].verdict == "approved"


def test_client_order_id_is_a_deterministic_uuid_of_the_intent(cfg: AppConfig) -> None:
    iid = place_order(A, "buy", step=T0).intent_id
    coid = client_order_id(iid)
    assert str(uuid.UUID(coid)) == coid
    assert client_order_id(iid) == coid
    assert client_order_id(place_order(A, "sell", step=T0).intent_id) != coid
    outs = []
    for _ in range(2):
        s = new_state(cfg)
        outs.append(step(s, T0, intent(s, A, "buy")))
    first, second = (of_type(o, ExecuteOrder)[0] for o in outs)
    assert first.client_order_id == second.client_order_id == coid
    assert first.id == second.id


def test_approved_order_carries_the_intent(cfg: AppConfig) -> None:
    state = new_state(cfg)
    i = intent(state, A, "sell", size="0.25", price="123.5", product="ETH/USDC")
    (order,) = of_type(step(state, T0, i), ExecuteOrder)
    assert (order.intent_id, order.profile, order.product, order.side) == (i.intent_id, A, "ETH/USDC", "sell")
    assert order.size == i.size and order.reference_price == i.reference_price
    assert order.not_before == i.event_time and order.event_time == i.event_time
    assert order.step_time == i.step_time and order.internal_size == 0
    assert order.intent_reason == i.reason


def test_approved_order_carries_the_intents_reason(cfg: AppConfig) -> None:
    state = new_state(cfg)
    i = intent(state, A, "sell", reason="stop_loss")
    (order,) = of_type(step(state, T0, i), ExecuteOrder)
    assert order.intent_reason == "stop_loss" and order.reason == "stop_loss"


# ------------------------------------------------------------------------------------------ finish
def test_worker_finished_per_partition_after_every_profile_final_marker(cfg: AppConfig) -> None:
    state = new_state(cfg)
    held = intent(state, B, "buy")
    feed(
        state,
        [
            *plans_at(state, T0),
            *market(T0),
            held,
            *markers(state, T0, [B]),
            *markers(state, T0, [B], final=True),
        ],
    )
    out = feed(state, markers(state, T0, [A], final=True))
    # Partition 1 holds no intent: it finishes with A's final marker there. Partitions 0 (B's intent) and 2
    # finish once the intent is decided, which needs A's final marker on partition 2 too.
    assert [type(m).__name__ for m in out] == [
        "WorkerFinished",
        "OrderDecided",
        "ExecuteOrder",
        "WorkerFinished",
        "WorkerFinished",
    ]
    assert [m.instance for m in of_type(out, WorkerFinished)] == ["partition-1", "partition-0", "partition-2"]
    assert feed(state, markers(state, T0, final=True)) == []  # once per partition


def test_finished_profile_no_longer_holds_steps_back(cfg: AppConfig) -> None:
    state = new_state(cfg)
    feed(state, markers(state, T0 - HOUR, [B], final=True))
    out = feed(state, [*plans_at(state, T0), *market(T0), intent(state, A, "buy"), *markers(state, T0, [A])])
    assert verdicts(out)[A].verdict == "approved"


def test_market_end_releases_steps_without_a_watermark(cfg: AppConfig) -> None:
    state = new_state(cfg)
    i = intent(state, A, "buy")
    assert feed(state, [*plans_at(state, T0), i, *markers(state, T0)]) == []
    out = feed(state, [replay_finished(T0 - HOUR, 0)])
    assert verdicts(out)[A].verdict == "approved"


def test_event_time_of_a_delayed_order_is_unchanged(cfg: AppConfig) -> None:
    c = with_execution(with_arbiter(cfg, min_cross_profile_gap_ms=700), desync_min_ms=100, desync_max_ms=100)
    state = new_state(c)
    out = step(state, T0, intent(state, A, "buy"), intent(state, B, "buy"))
    o = orders(out)[B]
    assert o.event_time == dt(T0 + HOUR) and o.not_before > o.event_time
    assert Decimal(0) == o.internal_size


# ------------------------------------------------------------------------------------------ wiring
def test_service_routes_every_output_and_counts_what_it_publishes(cfg: AppConfig) -> None:
    svc = bootstrap(
        ServiceSettings(kafka=KafkaAccess(servers="unused:0")), overrides={"config": cfg}
    )  # connects nothing
    t = Topics(cfg.system.kafka.namespace)
    assert svc.inputs == [t.intents, t.plans, t.candles]
    state = svc.state
    out = step(state, T0, intent(state, A, "buy"), intent(state, B, "sell"))
    routes = {type(m).__name__: svc.route(m) for m in out}
    assert routes["OrderDecided"] == [(t.decisions, B, False), (t.audit, B, False)]
    assert routes["ExecuteOrder"] == [(t.approved(A), "BTC/USDC", False)]
    assert routes["InternalCrossOpportunity"] == [(t.audit, B, False)]
    for m in out:
        svc.metrics.observe(m)
    value = svc.metrics.registry.get_sample_value
    assert value("mp_arbiter_decided_total", {"rule": "opposite_side", "verdict": "rejected"}) == 1.0
    assert value("mp_arbiter_internal_cross_opportunities_total", {"executed": "false"}) == 1.0
    assert value("mp_arbiter_internal_cross_savings_total", {"kind": "fees"}) == pytest.approx(
        float(D("0.1") * 100 * 2 * D(cfg.system.execution.taker_fee_rate))
    )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["", "buy", "sell"]), st.sampled_from(["", "buy", "sell"])), max_size=6
    )
)
def test_on_step_marker_is_decide_of_the_marker_message(sides: list[tuple[str, str]]) -> None:
    """arbiter.on_step_marker (the backtest's held markers, no message built) gives what decide gives for the
    profile's StepCompleted, and leaves the same state; an unknown profile's marker is ignored both ways."""
    c = config()
    by_msg, by_values = new_state(c), new_state(c)
    for k, (side_a, side_b) in enumerate(sides):
        t = T0 + k * HOUR
        intents = [intent(by_msg, pid, side, t) for pid, side in ((A, side_a), (B, side_b)) if side]
        inputs = [*plans_at(by_msg, t), *market(t, {"BTC/USDC": 100 + k}), *intents]
        assert feed(by_msg, inputs) == feed(by_values, inputs)
        for msg, part in [*markers(by_msg, t), (step_completed("nobody", t), 0)]:
            assert isinstance(msg, StepCompleted)
            got = on_step_marker(by_values, msg.profile, t, part)
            assert decide(by_msg, msg, part) == got
        assert {p: (ps.marks, ps.final) for p, ps in by_msg.partitions.items()} == {
            p: (ps.marks, ps.final) for p, ps in by_values.partitions.items()
        }
        assert by_msg.buffer == by_values.buffer and by_msg.decided == by_values.decided
        assert list(by_msg.pending_closes) == list(by_values.pending_closes)
        assert {p: list(r) for p, r in by_msg.returns.items()} == {
            p: list(r) for p, r in by_values.returns.items()
        }
