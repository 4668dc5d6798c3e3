"""Event-time step alignment (shared/aligner.py): complete steps, in time order, whatever the interleaving."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.aligner import Aligner, Step
from shared.messages import CandleClosed, Message, ReplayFinished, WatermarkAdvanced
from tests.unit.builders import HOUR, T0, candle, replay_finished, watermark

PRODUCTS = ["ADA/USDC", "BTC/USDC", "ETH/USDC", "SOL/USDC", "XRP/USDC"]


def feed(al: Aligner, msgs: list[tuple[int, Message]]) -> list[Step]:
    out: list[Step] = []
    for part, m in msgs:
        assert isinstance(m, CandleClosed | WatermarkAdvanced | ReplayFinished)
        out.extend(al.add(part, m))
    return out


def partition_streams(
    n_steps: int, placement: dict[str, int], partitions: int, missing: set[tuple[int, str]] | None = None
) -> dict[int, list[Message]]:
    """What the ingest publishes: per partition, each step's candles of that partition then a watermark."""
    streams: dict[int, list[Message]] = {p: [] for p in range(partitions)}
    for s in range(n_steps):
        t = T0 + s * HOUR
        for product, p in sorted(placement.items()):
            if missing and (s, product) in missing:
                continue
            streams[p].append(candle(product, t, 100 + s, close=101 + s))
        for p in range(partitions):
            streams[p].append(watermark(t))
    return streams


def shape(steps: list[Step]) -> list[tuple[int, int, tuple[str, ...]]]:
    return [(s.time_s, s.interval_s, tuple(c.id for c in s.candles)) for s in steps]


def test_single_partition_step_released_by_its_watermark_with_candles_sorted_by_product() -> None:
    al = Aligner(frozenset({0}))
    assert al.add(0, candle("ETH/USDC", T0)) == []
    assert al.add(0, candle("BTC/USDC", T0)) == []
    steps = al.add(0, watermark(T0))
    assert len(steps) == 1
    (s,) = steps
    assert s.time_s == T0
    assert s.interval_s == HOUR
    assert s.close_s == T0 + HOUR
    assert [c.product for c in s.candles] == ["BTC/USDC", "ETH/USDC"]


def test_step_held_until_every_partition_watermark_passed_it() -> None:
    al = Aligner(frozenset({0, 1, 2}))
    assert al.add(0, candle("BTC/USDC", T0)) == []
    assert al.add(0, watermark(T0)) == []
    assert al.add(1, candle("ETH/USDC", T0)) == []
    assert al.add(1, watermark(T0)) == []
    # Partition 2 has not spoken at all: nothing may be released, even though two of three are past T0.
    assert al.add(0, candle("BTC/USDC", T0 + HOUR)) == []
    assert al.add(0, watermark(T0 + HOUR)) == []
    assert al.add(2, candle("SOL/USDC", T0)) == []
    steps = al.add(2, watermark(T0))
    assert [s.time_s for s in steps] == [T0]
    assert [c.product for c in steps[0].candles] == ["BTC/USDC", "ETH/USDC", "SOL/USDC"]


def test_steps_released_in_time_order_when_the_slowest_partition_catches_up() -> None:
    al = Aligner(frozenset({0, 1}))
    msgs: list[tuple[int, Message]] = []
    for s in range(4):
        msgs += [(0, candle("BTC/USDC", T0 + s * HOUR)), (0, watermark(T0 + s * HOUR))]
    assert feed(al, msgs) == []
    for s in range(3):
        msgs2: list[tuple[int, Message]] = [(1, candle("ETH/USDC", T0 + s * HOUR))]
        assert feed(al, msgs2) == []
    steps = al.add(1, watermark(T0 + 2 * HOUR))
    assert [s.time_s for s in steps] == [T0, T0 + HOUR, T0 + 2 * HOUR]
    assert all([c.product for c in s.candles] == ["BTC/USDC", "ETH/USDC"] for s in steps)
    # The fourth step still waits for partition 1.
    assert al.add(1, candle("ETH/USDC", T0 + 3 * HOUR)) == []
    assert [s.time_s for s in al.add(1, watermark(T0 + 3 * HOUR))] == [T0 + 3 * HOUR]


def test_duplicate_candle_before_release_counts_once() -> None:
    al = Aligner(frozenset({0}))
    c = candle("BTC/USDC", T0, 100, close=101)
    al.add(0, c)
    al.add(0, c)
    (s,) = al.add(0, watermark(T0))
    assert s.candles == (c,)


def test_redelivered_candle_of_released_step_is_dropped() -> None:
    al = Aligner(frozenset({0}))
    c = candle("BTC/USDC", T0)
    al.add(0, c)
    assert len(al.add(0, watermark(T0))) == 1
    assert al.add(0, c) == []  # redelivery after release
    c2 = candle("BTC/USDC", T0 + HOUR)
    al.add(0, c2)
    (s,) = al.add(0, watermark(T0 + HOUR))
    assert s.candles == (c2,)
    # At the end of the replay nothing of the old step comes back.
    al.add(0, c)
    assert al.add(0, replay_finished(T0 + HOUR, 2)) == []
    assert al.finished


def test_redelivered_watermark_releases_nothing_new() -> None:
    al = Aligner(frozenset({0}))
    al.add(0, candle("BTC/USDC", T0))
    assert len(al.add(0, watermark(T0))) == 1
    assert al.add(0, watermark(T0)) == []
    # An older watermark (redelivery) does not move the partition back.
    al.add(0, candle("BTC/USDC", T0 + HOUR))
    assert [s.time_s for s in al.add(0, watermark(T0 + HOUR))] == [T0 + HOUR]
    assert al.add(0, watermark(T0)) == []


def test_watermarks_of_steps_without_pending_candles_leave_no_state_behind() -> None:
    # A long-running consumer sees redelivered watermarks and steps without candles: neither may grow state.
    al = Aligner(frozenset({0}))
    for s in range(50):
        t = T0 + s * HOUR
        if s % 2 == 0:
            al.add(0, candle("BTC/USDC", t))
        al.add(0, watermark(t))
        al.add(0, watermark(t))  # redelivered after the release
    assert al._pending == {}
    assert al._interval == {}  # private, but it is exactly the state that must not leak


def test_replay_finished_on_every_partition_releases_the_rest_and_sets_finished() -> None:
    al = Aligner(frozenset({0, 1}))
    al.add(0, candle("BTC/USDC", T0))
    al.add(0, watermark(T0))
    al.add(1, candle("ETH/USDC", T0))
    al.add(1, watermark(T0))
    # A last step whose watermark never came (the ingest stopped right after its candles).
    al.add(0, candle("BTC/USDC", T0 + HOUR))
    al.add(1, candle("ETH/USDC", T0 + HOUR))
    assert not al.finished
    assert al.add(0, replay_finished(T0 + HOUR, 2)) == []
    assert not al.finished  # partition 1 may still send
    steps = al.add(1, replay_finished(T0 + HOUR, 2))
    assert [s.time_s for s in steps] == [T0 + HOUR]
    assert [c.product for c in steps[0].candles] == ["BTC/USDC", "ETH/USDC"]
    assert steps[0].interval_s == HOUR
    assert al.finished


def test_finished_partition_no_longer_holds_back_the_others() -> None:
    al = Aligner(frozenset({0, 1}))
    al.add(0, replay_finished(None, 0))  # partition 0 carries no product at all
    al.add(1, candle("ETH/USDC", T0))
    assert [s.time_s for s in al.add(1, watermark(T0))] == [T0]
    assert not al.finished
    al.add(1, replay_finished(T0, 1))
    assert al.finished


def test_not_finished_while_a_partition_is_still_open() -> None:
    al = Aligner(frozenset({0, 1}))
    al.add(0, candle("BTC/USDC", T0))
    al.add(0, watermark(T0))
    al.add(0, replay_finished(T0, 1))
    assert not al.finished
    al.add(1, watermark(T0))
    assert not al.finished


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, dict[int, list[Message]]]:
    partitions = draw(st.integers(1, 3))
    products = draw(st.lists(st.sampled_from(PRODUCTS), min_size=1, max_size=5, unique=True))
    placement = {p: draw(st.integers(0, partitions - 1)) for p in products}
    n_steps = draw(st.integers(1, 5))
    missing = draw(st.sets(st.tuples(st.integers(0, n_steps - 1), st.sampled_from(products)), max_size=4))
    streams = partition_streams(n_steps, placement, partitions, missing)
    finish = draw(st.booleans())
    for stream in streams.values():
        # Redeliveries: copies of some candles later in the same partition (Kafka is at-least-once).
        for _ in range(draw(st.integers(0, 3))):
            idx = draw(st.integers(0, len(stream) - 1))
            if isinstance(stream[idx], CandleClosed):
                stream.insert(draw(st.integers(idx + 1, len(stream))), stream[idx])
        if finish:
            stream.append(replay_finished(T0 + (n_steps - 1) * HOUR, n_steps))
    return partitions, streams


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.data())
def test_any_interleaving_of_partitions_gives_the_same_steps(
    scenario: tuple[int, dict[int, list[Message]]], data: st.DataObject
) -> None:
    partitions, streams = scenario
    # Reference: partitions fed one after the other.
    reference = feed(Aligner(frozenset(streams)), [(p, m) for p in sorted(streams) for m in streams[p]])
    order = data.draw(st.permutations([p for p, s in streams.items() for _ in s]))
    cursors = dict.fromkeys(streams, 0)
    interleaved: list[tuple[int, Message]] = []
    for p in order:
        interleaved.append((p, streams[p][cursors[p]]))
        cursors[p] += 1
    al = Aligner(frozenset(streams))
    got = feed(al, interleaved)
    assert shape(got) == shape(reference)

    # And the steps are the expected ones: every step whose watermark passed on all partitions, once, in
    # order, each holding every distinct candle of its time (sorted by product).
    expected: dict[int, set[str]] = {}
    for stream in streams.values():
        for m in stream:
            if isinstance(m, CandleClosed):
                expected.setdefault(int(m.open_time.timestamp()), set()).add(m.product)
    assert [s.time_s for s in got] == sorted(expected)
    for s in got:
        assert [c.product for c in s.candles] == sorted(expected[s.time_s])
    finished = any(isinstance(m, ReplayFinished) for m in streams[0])
    assert al.finished == finished
