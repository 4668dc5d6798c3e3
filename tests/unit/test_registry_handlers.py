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
from services.registry.memory import MemoryRegistry
from shared.config import AppConfig
from shared.messages import CandleClosed, Message, PlanPublished, WorkerFinished
from tests.unit.builders import HOUR, T0, candle, config, replay_finished, step_messages

TAKEN = (ClaimOutcome.HASH_TAKEN, ClaimOutcome.FP_TAKEN, ClaimOutcome.ASSET_TAKEN)


class Store:
    """What Redis would hold for every replica: claims and decision records."""

    def __init__(self) -> None:
        self.holds: dict[tuple[str, str], list[tuple[str, int, int]]] = defaultdict(list)
        self.records: dict[tuple[str, int] | tuple[str, int, int], Decision] = {}
        self.inject: dict[
            tuple[str, int] | tuple[str, int, int], Decision
        ] = {}  # recorded by "another replica" just before decide


class FakeBackend:
    def __init__(self, store: Store, instance: str = "0") -> None:
        self.store = store
        self.instance = instance
        self.lose: list[ClaimsLostError] = []
        self.recovered: list[list[Held]] = []
        self.unclaimed: list[tuple[str, int, int, list[tuple[KeyKind, str]]]] = []
        self.takeovers: dict[tuple[str, int], TakeoverOutcome] = {}
        self.claims = 0
        self.claimed_starts: list[int] = []

    def claims_before(self, end_s: int) -> int:
        """Claims for epochs starting before ``end_s`` (the last step plans the next epoch ahead)."""
        return sum(1 for s in self.claimed_starts if s < end_s)

    async def claim(self, c: PlanCandidate, fingerprint: str, asset: str | None) -> ClaimResult:
        self.claims += 1
        self.claimed_starts.append(c.epoch_start_s)
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

    async def lookup(self, profile: str, start_s: int, rotation: int = 0) -> Decision | None:
        return self.store.records.get(self._key(profile, start_s, rotation))

    @staticmethod
    def _key(profile: str, start_s: int, rotation: int) -> tuple[str, int] | tuple[str, int, int]:
        # Like the ledger: an early rotation has its own record, the scheduled plan's key is unchanged.
        return (profile, start_s, rotation) if rotation else (profile, start_s)

    async def decide(self, plan: PlanPublished, *, asset_claimed: bool | None) -> Decision:
        key = self._key(plan.profile, int(plan.epoch_start.timestamp()), plan.rotation)
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

    async def takeover(
        self, profile: str, start_s: int, rotation: int = 0
    ) -> tuple[TakeoverOutcome, PlanPublished | None]:
        outcome = self.takeovers.get((profile, start_s), "WAIT")
        rec = self.store.records.get((profile, start_s))
        return outcome, (rec.plan if rec and outcome == "OK" else None)


def market(hours: int) -> list[Message]:
    cfg = config()
    cs = [
        candle(p, T0 + h * HOUR, 100 + h + i, close=101 + h + (h % 3) + i)
        for h in range(hours)
        for i, p in enumerate(cfg.all_products())
    ]
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
        [("profile_a", T0 // HOUR + h) for h in range(8)]
        + [("profile_b", T0 // (4 * HOUR) + k) for k in range(2)]
    )
    assert state.to_mark == plans  # marked published once Kafka acknowledged them
    assert state.stats.decided == state.stats.published == len(plans)
    fin = [m for m in out if isinstance(m, WorkerFinished)]
    assert len(fin) == 1 and fin[0].instance == "0" and fin[0].detail["plans"] == len(plans)
    assert (
        state.metrics.registry.get_sample_value("mp_registry_plans_published_total", {"profile": "profile_a"})
        == 8
    )


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
    # Every epoch with a step was already decided: no derivation at all (the epoch after the last step is
    # planned ahead and given back at the end).
    assert second.claims_before(T0 + 6 * HOUR) == 0
    assert [u[1] for u in second.unclaimed] == sorted(set(second.claimed_starts)) == [T0 + 6 * HOUR]
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
    assert out == before and b.claims_before(T0 + 2 * HOUR) == 0


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
    other = plans_of(await feed(handlers.new_state(cfg), FakeBackend(Store()), market(1)))[
        0
    ]  # profile_a hour 0
    winner = other.model_copy(
        update={"id": "x" * 32, "hash": "c" * 64, "fingerprint": "d" * 64, "random_asset": None}
    )
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
    assert [(p.profile, p.epoch) for p in out] == [
        ("profile_a", now // HOUR),
        ("profile_b", now // (4 * HOUR)),
    ]
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


# ------------------------------------------------------------------------------------------ early rotations
KEY = b"r" * 32


def published_ms(msg: Message) -> int:
    """Kafka time of a market-data record in these tests: step h (hours after T0) is published at (h + 1) s."""
    t = (
        getattr(msg, "open_time", None)
        or getattr(msg, "step_time", None)
        or getattr(msg, "last_step_time", None)
    )
    return ((int(t.timestamp()) - T0) // HOUR + 1) * 1000 if t is not None else 0


async def feed_timed(
    state: RegistryState,
    backend: FakeBackend,
    msgs: Sequence[Message],
    commands: Sequence[tuple[int, Message]] = (),
) -> list[Message]:
    """Market data with their publication times; each command (appended at ms) is read before the first
    record published after it, as the service reads the commands topic up to its end before each batch."""
    todo = sorted(commands, key=lambda c: c[0])
    out: list[Message] = []
    for m in msgs:
        ms = published_ms(m)
        while todo and todo[0][0] <= ms:
            at, cmd = todo.pop(0)
            out.extend(await handlers.handle(state, cmd, 0, backend, published_ms=at))
        out.extend(await handlers.handle(state, m, 0, backend, published_ms=ms))
    return out


def rotate(target: str) -> Message:
    from shared.commands import new_command
    from tests.unit.builders import dt

    return new_command("rotate", target, key=KEY, now=dt(T0))


def overlapping_duplicates(plans: Sequence[PlanPublished]) -> list[tuple[str, str]]:
    """Pairs of different profiles holding one hash or fingerprint over overlapping intervals."""
    bad = []
    for a in plans:
        for b in plans:
            overlap = a.profile < b.profile and a.epoch_start < b.epoch_end and b.epoch_start < a.epoch_end
            if overlap and (a.hash == b.hash or a.fingerprint == b.fingerprint):
                bad.append((a.profile, b.profile))
    return bad


async def test_rotate_command_publishes_a_new_plan_for_its_profile_at_the_first_step_published_after_it(
    cfg: AppConfig,
) -> None:
    state = handlers.new_state(cfg)
    cmd = rotate("profile_b")
    # Appended at 2.5 s: steps h=0,1 were published before (1 s, 2 s), step h=2 after (3 s).
    out = await feed_timed(state, FakeBackend(Store()), market(8), [(2500, cmd)])
    plans = plans_of(out)
    rotated = [p for p in plans if p.rotation]
    assert [(p.profile, p.rotation, p.epoch_start.timestamp(), p.rotation_commands) for p in rotated] == [
        ("profile_b", 1, T0 + 2 * HOUR, [cmd.id])
    ]
    scheduled = next(
        p for p in plans if p.profile == "profile_b" and p.epoch == rotated[0].epoch and not p.rotation
    )
    assert rotated[0].epoch_end == scheduled.epoch_end and rotated[0].hash != scheduled.hash
    assert rotated[0].id != scheduled.id
    assert len([p for p in plans if p.profile == "profile_a"]) == 8  # profile_a: its hourly plans only
    assert overlapping_duplicates(plans) == []
    assert state.stats.rotations == 1 and state.stats.as_dict()["rotations"] == 1
    assert (
        state.metrics.registry.get_sample_value("mp_registry_rotations_total", {"profile": "profile_b"}) == 1
    )


async def test_rotate_all_rotates_every_enabled_profile_once_and_twice_counts_up(cfg: AppConfig) -> None:
    state = handlers.new_state(cfg)
    first, second = rotate("all"), rotate("all")
    out = await feed_timed(
        state, FakeBackend(Store()), market(4), [(1500, first), (1600, second), (2500, rotate("all"))]
    )
    rotated = sorted(
        (p.profile, p.rotation, int(p.epoch_start.timestamp()) - T0) for p in plans_of(out) if p.rotation
    )
    # Two commands due at one step make one rotation; profile_a's epochs are one step long, so its rotations
    # fall on a scheduled plan's start (kept apart by the rotation number).
    assert rotated == [
        ("profile_a", 1, HOUR),
        ("profile_a", 1, 2 * HOUR),
        ("profile_b", 1, HOUR),
        ("profile_b", 2, 2 * HOUR),
    ]
    assert overlapping_duplicates(plans_of(out)) == []


async def test_rotation_is_the_same_in_a_replay_and_is_not_derived_again_after_a_restart(
    cfg: AppConfig,
) -> None:
    cmds = [(2500, rotate("profile_b")), (5500, rotate("all"))]
    first = plans_of(await feed_timed(handlers.new_state(cfg), FakeBackend(Store()), market(8), cmds))
    again = plans_of(await feed_timed(handlers.new_state(cfg), FakeBackend(Store()), market(8), cmds))
    assert [p.id for p in again] == [p.id for p in first] and sum(1 for p in first if p.rotation) == 3
    # A restarted registry reads the plans topic first: nothing is derived or published again.
    restarted = handlers.new_state(cfg)
    handlers.load_published(restarted, first)
    backend = FakeBackend(Store())
    assert plans_of(await feed_timed(restarted, backend, market(8), cmds)) == []
    assert backend.claims_before(T0 + 8 * HOUR) == 0
    last_b = [p for p in first if p.profile == "profile_b"][-1]
    # The second command falls in profile_b's next epoch (hours 4-7): its first rotation there, from hour 5.
    assert (last_b.rotation, last_b.epoch_start.timestamp()) == (1, T0 + 5 * HOUR)
    assert restarted.latest["profile_b"].plan == last_b


async def test_rotate_command_after_the_last_step_rotates_nothing(cfg: AppConfig) -> None:
    state = handlers.new_state(cfg)
    backend = FakeBackend(Store())
    out = await feed_timed(state, backend, market(3))
    out += await handlers.handle(state, rotate("all"), 0, backend, published_ms=10_000)
    assert [p for p in plans_of(out) if p.rotation] == [] and state.stats.rotations == 0
    assert len(state.rotation_requests) == 1  # waits for a step published after it


# ------------------------------------------------------------------------------------------ planned ahead
def live_holds(reg: MemoryRegistry, after_s: int) -> dict[tuple[KeyKind, str], list[tuple[str, int, int]]]:
    """The claim set without empty keys and members a later claim would prune anyway."""
    out = {k: sorted(m for m in ms if m[2] + reg.grace_s >= after_s) for k, ms in reg.holds.items()}
    return {k: v for k, v in out.items() if v}


def market_with_gap(hours: int, missing: set[int]) -> list[Message]:
    cfg = config()
    cs = [
        candle(p, T0 + h * HOUR, 100 + h + i, close=101 + h + (h % 5) + i)
        for h in range(hours)
        if h not in missing
        for i, p in enumerate(cfg.all_products())
    ]
    return [*step_messages(cs), replay_finished(T0 + (hours - 1) * HOUR, hours - len(missing))]


async def run_registry(
    cfg: AppConfig, msgs: Sequence[Message], *, ahead: bool
) -> tuple[list[Message], RegistryState, MemoryRegistry]:
    state = handlers.new_state(cfg)
    state.plan_ahead = ahead
    reg = MemoryRegistry(cfg.system.registry.claim_grace_s)
    out: list[Message] = []
    for m in msgs:
        out.extend(await handlers.handle(state, m, 0, reg))
    return out, state, reg


@pytest.mark.parametrize(
    ("hours", "missing"),
    [(12, set()), (12, {4, 5, 6, 7}), (12, {3}), (9, {8 - 1})],
    ids=["complete", "an-epoch-missing", "first-step-of-an-epoch-missing", "last-step-missing"],
)
async def test_planning_ahead_publishes_the_same_plans_and_leaves_the_same_claims(
    cfg: AppConfig, hours: int, missing: set[int]
) -> None:
    msgs = market_with_gap(hours, missing)
    at_step, s0, r0 = await run_registry(cfg, msgs, ahead=False)
    ahead, s1, r1 = await run_registry(cfg, msgs, ahead=True)
    assert plans_of(ahead) == plans_of(at_step) and len(plans_of(ahead)) >= 3
    assert [m for m in ahead if not isinstance(m, PlanPublished)] == [
        m for m in at_step if not isinstance(m, PlanPublished)
    ]  # the WorkerFinished with its counts too
    assert s1.stats == s0.stats and not s1.prepared
    # A claim after the run would start at the next step at the earliest: members it prunes do not count.
    after = T0 + hours * HOUR
    assert live_holds(r1, after) == live_holds(r0, after)
    assert r1.records == r0.records


async def test_a_step_s_plans_go_out_with_its_first_candle_not_its_last(cfg: AppConfig) -> None:
    msgs = market(6)
    state = handlers.new_state(cfg)
    reg = MemoryRegistry(cfg.system.registry.claim_grace_s)
    seen_at: dict[str, int] = {}  # plan id -> index of the message whose handling published it
    first_candle: dict[int, int] = {}
    for i, m in enumerate(msgs):
        if isinstance(m, CandleClosed):
            first_candle.setdefault(int(m.open_time.timestamp()), i)
        for p in plans_of(await handlers.handle(state, m, 0, reg)):
            seen_at[p.id] = i
    later = [p for p in reg.records.values() if p.plan.epoch_start.timestamp() > T0]
    assert later, "the test needs epochs after the first"
    for rec in later:
        # Planned when the step before was complete, published on the new step's first candle.
        assert seen_at[rec.plan.id] == first_candle[int(rec.plan.epoch_start.timestamp())]


async def test_a_claim_set_lost_while_planning_ahead_leaves_nothing_prepared_and_the_step_plans(
    cfg: AppConfig,
) -> None:
    msgs = market(4)
    reference = plans_of(await feed(handlers.new_state(cfg), FakeBackend(Store()), msgs))
    b = FakeBackend(Store())
    state = handlers.new_state(cfg)
    # Up to hour 1's first candle: hour 0 is complete, hour 1's plans were prepared and are out now.
    cut = next(
        i for i, m in enumerate(msgs) if isinstance(m, CandleClosed) and m.open_time.timestamp() == T0 + HOUR
    )
    out = await feed(state, b, msgs[: cut + 1])
    assert {p.epoch_start.timestamp() for p in plans_of(out)} == {T0, T0 + HOUR}
    b.lose = [ClaimsLostError("flushed")]  # the next claim: planning hour 2 ahead, once hour 1 is complete
    out += await feed(state, b, msgs[cut + 1 :])
    assert not b.lose and not state.prepared
    assert plans_of(out) == reference  # hour 2 planned at its step instead
