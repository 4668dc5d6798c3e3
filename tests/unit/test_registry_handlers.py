"""The registry's handler (services/registry/handlers.py) against an in-memory backend: who publishes, who
adopts, what a restart skips, how a lost claim set is recovered, how a dead owner's plan is taken over."""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Sequence

import pytest

from services.registry import handlers
from services.registry.claims import ClaimsLostError, KeyKind
from services.registry.domain import ClaimOutcome, ClaimResult, PlanCandidate
from services.registry.handlers import Held, RegistryState
from services.registry.ledger import Decision, TakeoverOutcome
from shared.config import AppConfig
from shared.messages import Message, PlanPublished, WorkerFinished
from tests.unit.builders import HOUR, T0, candle, config, replay_finished, step_messages

TAKEN = (ClaimOutcome.HASH_TAKEN, ClaimOutcome.FP_TAKEN, ClaimOutcome.ASSET_TAKEN)


class Store:
    """What Redis would hold for every replica: claims and decision records."""

    def __init__(self) -> None:
        self.holds: dict[tuple[str, str], list[tuple[str, int, int]]] = defaultdict(list)
        self.records: dict[tuple[str, int], Decision] = {}
        self.inject: dict[tuple[str, int], Decision] = {}  # recorded by "another replica" just before decide


class FakeBackend:
    def __init__(self, store: Store, instance: str = "0") -> None:
        self.store = store
        self.instance = instance
        self.lose: list[ClaimsLostError] = []
        self.recovered: list[list[Held]] = []
        self.unclaimed: list[tuple[str, int, int, list[tuple[KeyKind, str]]]] = []
        self.takeovers: dict[tuple[str, int], TakeoverOutcome] = {}
        self.claims = 0

    async def claim(self, c: PlanCandidate, fingerprint: str, asset: str | None) -> ClaimResult:
        self.claims += 1
        if self.lose:
            raise self.lose.pop(0)
        keys = [("hash", c.hash), ("fp", fingerprint)] + ([("asset", asset)] if asset else [])
        for i, k in enumerate(keys):
            for p, s, e in self.store.holds[k]:
                if p != c.profile and s < c.epoch_end_s and c.epoch_start_s < e:
                    return ClaimResult(TAKEN[i], p, s, e)
        for k in keys:
            self.store.holds[k].append((c.profile, c.epoch_start_s, c.epoch_end_s))
        return ClaimResult(ClaimOutcome.OK)

    async def lookup(self, profile: str, start_s: int) -> Decision | None:
        return self.store.records.get((profile, start_s))

    async def decide(self, plan: PlanPublished, *, asset_claimed: bool | None) -> Decision:
        key = (plan.profile, int(plan.epoch_start.timestamp()))
        if key in self.store.inject:
            self.store.records[key] = self.store.inject.pop(key)
        if key in self.store.records:
            return dataclasses.replace(self.store.records[key], won=False)
        rec = Decision(plan, self.instance, False, asset_claimed)
        self.store.records[key] = rec
        return dataclasses.replace(rec, won=True)

    async def unclaim(self, profile: str, start_s: int, end_s: int, keys: list[tuple[KeyKind, str]]) -> int:
        self.unclaimed.append((profile, start_s, end_s, keys))
        return len(keys)

    async def recover(self, known: Sequence[Held]) -> str:
        self.recovered.append(list(known))
        return "rebuilt"

    async def takeover(self, profile: str, start_s: int) -> tuple[TakeoverOutcome, PlanPublished | None]:
        outcome = self.takeovers.get((profile, start_s), "WAIT")
        rec = self.store.records.get((profile, start_s))
        return outcome, (rec.plan if rec and outcome == "OK" else None)


def market(hours: int) -> list[Message]:
    cfg = config()
    cs = [candle(p, T0 + h * HOUR, 100 + h + i, close=101 + h + (h % 3) + i) for h in range(hours) for i, p in enumerate(cfg.all_products())]
    return [*step_messages(cs), replay_finished(T0 + (hours - 1) * HOUR, hours)]


async def feed(state: RegistryState, backend: FakeBackend, msgs: Sequence[Message]) -> list[Message]:
    out: list[Message] = []
    for m in msgs:
        out.extend(await handlers.handle(state, m, 0, backend))
    return out


def plans_of(msgs: Sequence[Message]) -> list[PlanPublished]:
    return [m for m in msgs if isinstance(m, PlanPublished)]


@pytest.fixture
def cfg() -> AppConfig:
    return config()


async def test_one_replica_decides_and_publishes_every_epoch(cfg: AppConfig) -> None:
    state = handlers.new_state(cfg)
    backend = FakeBackend(Store())
    out = await feed(state, backend, market(8))
    plans = plans_of(out)
    # profile_a rotates hourly (8 epochs), profile_b every 4 hours (2 epochs)
    assert sorted((p.profile, p.epoch) for p in plans) == sorted(
        [("profile_a", T0 // HOUR + h) for h in range(8)] + [("profile_b", T0 // (4 * HOUR) + k) for k in range(2)]
    )
    assert state.to_mark == plans  # marked published once Kafka acknowledged them
    assert state.stats.decided == state.stats.published == len(plans)
    fin = [m for m in out if isinstance(m, WorkerFinished)]
    assert len(fin) == 1 and fin[0].instance == "0" and fin[0].detail["plans"] == len(plans)
    assert state.metrics.registry.get_sample_value("mp_registry_plans_published_total", {"profile": "profile_a"}) == 8


async def test_second_replica_adopts_and_publishes_nothing(cfg: AppConfig) -> None:
    store = Store()
    first, second = FakeBackend(store, "r1"), FakeBackend(store, "r2")
    s1 = handlers.new_state(cfg, instance="r1")
    s2 = handlers.new_state(cfg, instance="r2")
    p1 = plans_of(await feed(s1, first, market(6)))
    for rec in list(store.records):
        store.records[rec] = dataclasses.replace(store.records[rec], published=True)
    out2 = await feed(s2, second, market(6))
    assert plans_of(out2) == []
    assert second.claims == 0  # every epoch was already decided: no derivation at all
    assert s2.stats.adopted == len(p1) and not s2.watches
    assert {h.plan.id for h in s2.latest.values()} == {h.plan.id for h in s1.latest.values()}


async def test_unpublished_decision_of_another_replica_is_watched_and_taken_over(cfg: AppConfig) -> None:
    store = Store()
    s1, s2 = handlers.new_state(cfg, instance="r1"), handlers.new_state(cfg, instance="r2")
    await feed(s1, FakeBackend(store, "r1"), market(1))  # r1 decides hour 0, then dies before Kafka acks
    b2 = FakeBackend(store, "r2")
    assert plans_of(await feed(s2, b2, market(1))) == []
    assert set(s2.watches) == {("profile_a", T0, 0), ("profile_b", T0, 0)}  # (profile, start, rotation)
    assert await handlers.check_watches(s2, b2, lease_s=60) == []  # within the lease: nothing yet
    for k in s2.watches:
        s2.watches[k] = time.monotonic() - 61
    b2.takeovers = {("profile_a", T0): "OK", ("profile_b", T0): "PUBLISHED"}
    taken = await handlers.check_watches(s2, b2, lease_s=60)
    assert [p.profile for p in plans_of(taken)] == ["profile_a"]
    assert s2.stats.takeovers == 1 and not s2.watches and s2.to_mark == plans_of(taken)


async def test_own_unpublished_decision_is_published_after_a_restart(cfg: AppConfig) -> None:
    store = Store()
    before = plans_of(await feed(handlers.new_state(cfg, instance="r1"), FakeBackend(store, "r1"), market(2)))
    again = handlers.new_state(cfg, instance="r1")  # same instance, fresh process, nothing on the topic
    b = FakeBackend(store, "r1")
    out = plans_of(await feed(again, b, market(2)))
    assert out == before and b.claims == 0


async def test_plans_on_the_topic_are_never_derived_again(cfg: AppConfig) -> None:
    first = plans_of(await feed(handlers.new_state(cfg), FakeBackend(Store()), market(6)))
    state = handlers.new_state(cfg)
    handlers.load_published(state, [p for p in first if p.epoch_start.timestamp() < T0 + 4 * HOUR])
    b = FakeBackend(Store())  # even with Redis empty: published means done
    out = plans_of(await feed(state, b, market(6)))
    assert [(p.profile, p.epoch) for p in out] == [
        ("profile_a", T0 // HOUR + 4),
        ("profile_b", T0 // (4 * HOUR) + 1),
        ("profile_a", T0 // HOUR + 5),
    ]
    assert state.stats.skipped == 5
    # the lookback advanced through the skipped epochs: the continuation is the uninterrupted run's
    assert out == [p for p in first if p.epoch_start.timestamp() >= T0 + 4 * HOUR]


async def test_lost_decision_with_another_plan_gives_back_its_keys(cfg: AppConfig) -> None:
    store = Store()
    state = handlers.new_state(cfg, instance="r2")
    b = FakeBackend(store, "r2")
    other = plans_of(await feed(handlers.new_state(cfg), FakeBackend(Store()), market(1)))[0]  # profile_a hour 0
    winner = other.model_copy(update={"id": "x" * 32, "hash": "c" * 64, "fingerprint": "d" * 64, "random_asset": None})
    store.inject[("profile_a", T0)] = Decision(winner, "r1", True, None)
    await feed(state, b, market(1))
    assert state.latest["profile_a"].plan == winner
    assert state.stats.divergent == 1
    (profile, start, end, keys) = b.unclaimed[0]
    assert (profile, start, end) == ("profile_a", T0, T0 + HOUR)
    assert ("hash", other.hash) in keys and ("fp", other.fingerprint) in keys
    assert ("hash", winner.hash) not in keys


async def test_lost_claim_set_is_recovered_before_claiming_again(cfg: AppConfig) -> None:
    state = handlers.new_state(cfg)
    b = FakeBackend(Store())
    first = plans_of(await feed(state, b, market(1)))
    b.lose = [ClaimsLostError("NOT_READY")]
    second = plans_of(await feed(state, b, market(2)[len(market(1)) - 1 :]))
    assert [(p.profile, p.epoch) for p in second] == [("profile_a", T0 // HOUR + 1)]
    # the recovery got the current plans of every profile, to claim them again first
    assert {h.plan.id for h in b.recovered[0]} == {p.id for p in first}
    assert state.stats.recoveries == {"rebuilt": 1}


async def test_wall_clock_mode_plans_from_the_clock_and_never_goes_back(cfg: AppConfig) -> None:
    state = handlers.new_state(cfg)
    state.plan_on_steps = False
    b = FakeBackend(Store())
    assert plans_of(await feed(state, b, market(3))) == []
    assert state.lookback  # the steps still feed the score's lookback
    now = T0 + 3 * HOUR + 5
    out = plans_of(await handlers.on_clock(state, now, b))
    assert [(p.profile, p.epoch) for p in out] == [("profile_a", now // HOUR), ("profile_b", now // (4 * HOUR))]
    assert plans_of(await handlers.on_clock(state, now + 10, b)) == []
    state.plan_on_steps = True
    late = [candle("BTC/USDC", T0 + 2 * HOUR, 100)]  # a step of an epoch already past
    assert plans_of(await feed(state, b, step_messages(late))) == []


async def test_a_compacted_topic_still_skips_every_published_epoch(cfg: AppConfig) -> None:
    first = plans_of(await feed(handlers.new_state(cfg), FakeBackend(Store()), market(6)))
    published = [p for p in first if p.epoch_start.timestamp() < T0 + 4 * HOUR]
    latest = {p.profile: p for p in published}  # what compaction keeps: the last plan per profile (key)
    state = handlers.new_state(cfg)
    handlers.load_published(state, list(latest.values()))
    out = plans_of(await feed(state, FakeBackend(Store()), market(6)))
    assert out == [p for p in first if p.epoch_start.timestamp() >= T0 + 4 * HOUR]
