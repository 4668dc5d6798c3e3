"""The live feed's finality rule (services/ingest/live_domain.py, docs/ingest.md), pure: no clock, no network."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.live_domain import (
    MAX_BUCKETS_PER_REQUEST,
    SEED_BUCKETS,
    Bar,
    FeedMonitor,
    Fetch,
    IngestConfigError,
    IngestError,
    LiveBook,
    granularity,
    stale_reason,
)

IV = 60
T0 = 1_775_570_400  # a bucket start, aligned to 60 s
GRACE, DEADLINE, POLL = 2.0, 120.0, 2.0


def bar(s: int, close: str = "100", volume: str = "1") -> Bar:
    c = Decimal(close)
    return Bar(s, c, c + 1, c - 1, c, Decimal(volume))


def book(products: tuple[str, ...] = ("A/USDC", "B/USDC"), **kw: object) -> LiveBook:
    args: dict[str, object] = {
        "grace_s": GRACE,
        "deadline_s": DEADLINE,
        "poll_interval_s": POLL,
        "next_step": T0,
        "last_close": {p: Decimal("99") for p in products},
    }
    args.update(kw)
    return LiveBook(products, IV, **args)  # type: ignore[arg-type]


def answer(
    b: LiveBook, product: str, bars: list[Bar], at: float, start: int = T0, end: int | None = None
) -> None:
    b.on_answer(Fetch(product, start, end if end is not None else start + 5 * IV), bars, at)


def test_granularity_known_and_unknown() -> None:
    assert granularity(60) == "ONE_MINUTE"
    assert granularity(86400) == "ONE_DAY"
    with pytest.raises(IngestConfigError, match="interval 120s"):
        granularity(120)


def test_misaligned_first_step_refused() -> None:
    with pytest.raises(IngestError, match="not aligned"):
        book(next_step=T0 + 1)


def test_nothing_before_end_plus_grace_even_with_an_answer() -> None:
    b = book(("A/USDC",))
    end = T0 + IV
    answer(b, "A/USDC", [bar(T0)], at=end + GRACE - 0.5)  # asked too early: the bucket may still change
    assert b.ready(end + GRACE - 0.1) == []
    # Time alone is not enough either: the early answer does not count.
    assert b.ready(end + GRACE + 5) == []
    answer(b, "A/USDC", [bar(T0, "101")], at=end + GRACE)
    (step,) = b.ready(end + GRACE)
    assert step.time_s == T0 and step.missing == ()
    (c,) = step.candles
    assert c.bar.close == Decimal("101") and not c.synthetic
    assert b.next_step == T0 + IV


def test_in_progress_bucket_in_an_answer_is_never_final() -> None:
    b = book(("A/USDC",))
    # Asked during the second bucket: it is in the answer (REST includes the open bucket), but not final.
    answer(b, "A/USDC", [bar(T0 + IV, "5"), bar(T0)], at=T0 + IV + 30)
    steps = b.ready(T0 + 2 * IV + GRACE + 1)
    assert [s.time_s for s in steps] == [T0]
    answer(b, "A/USDC", [bar(T0 + IV, "7")], at=T0 + 2 * IV + GRACE + 1)
    (s2,) = b.ready(T0 + 2 * IV + GRACE + 1)
    assert s2.candles[0].bar.close == Decimal("7")


def test_empty_bucket_with_a_later_bucket_is_synthetic_at_previous_close() -> None:
    b = book(("A/USDC",), last_close={"A/USDC": Decimal("42.5")})
    answer(b, "A/USDC", [bar(T0 + IV)], at=T0 + 2 * IV + GRACE)
    first, second = b.ready(T0 + 2 * IV + GRACE)
    c = first.candles[0]
    assert c.synthetic and c.bar.volume == 0
    assert c.bar.open == c.bar.high == c.bar.low == c.bar.close == Decimal("42.5")
    assert not second.candles[0].synthetic


def test_empty_bucket_with_websocket_coverage_and_no_trade() -> None:
    b = book(("A/USDC",))
    b.ws_up(T0 - 5)
    answer(b, "A/USDC", [], at=T0 + IV + GRACE)  # no later bucket either
    (step,) = b.ready(T0 + IV + GRACE)
    assert step.candles[0].synthetic


def test_websocket_gap_inside_the_bucket_means_we_cannot_tell() -> None:
    b = book(("A/USDC",))
    b.ws_up(T0 - 5)
    b.ws_down(T0 + 10)  # a sequence gap: coverage ends
    b.ws_up(T0 + 11)
    answer(b, "A/USDC", [], at=T0 + IV + GRACE)
    assert b.ready(T0 + IV + GRACE) == []
    # Still undecided at the deadline, asked again after it: missing, and the step goes out without it.
    answer(b, "A/USDC", [], at=T0 + IV + DEADLINE)
    assert b.overdue(T0 + IV + DEADLINE) == ["A/USDC"]
    step, after = b.ready(T0 + IV + DEADLINE)
    assert step.candles == () and step.missing == ("A/USDC",)
    assert after.candles[0].synthetic  # the next bucket lies inside the connection that followed the gap


def test_late_bucket_waits_for_rest_when_trades_were_seen() -> None:
    b = book(("A/USDC",))
    b.ws_up(T0 - 5)
    assert b.on_trade("A/USDC", T0 + 30)
    answer(b, "A/USDC", [bar(T0 + IV)], at=T0 + IV + GRACE)  # later bucket present, this one not yet
    assert b.ready(T0 + IV + GRACE) == []
    assert b.fetches(T0 + IV + GRACE + 1) == []  # the poll interval has not passed
    (f,) = b.fetches(T0 + IV + GRACE + POLL)
    assert f.start_s == T0
    answer(b, "A/USDC", [bar(T0 + IV), bar(T0, "123")], at=T0 + IV + GRACE + POLL)
    (step,) = b.ready(T0 + IV + GRACE + POLL)
    assert step.candles[0].bar.close == Decimal("123") and not step.candles[0].synthetic


def test_no_missing_without_an_answer_past_the_deadline() -> None:
    """An outage of REST stops the steps (nothing decided), it never turns them into missing ones."""
    b = book(("A/USDC",))
    assert b.ready(T0 + IV + DEADLINE * 10) == []
    assert b.overdue(T0 + IV + DEADLINE) == ["A/USDC"]


def test_steps_wait_for_every_product_and_go_in_order() -> None:
    b = book()
    answer(b, "A/USDC", [bar(T0), bar(T0 + IV)], at=T0 + 2 * IV + GRACE)
    assert b.ready(T0 + 2 * IV + GRACE) == []
    answer(b, "B/USDC", [bar(T0, "7")], at=T0 + IV + GRACE)
    (s1,) = b.ready(T0 + 2 * IV + GRACE)  # B's second bucket was asked too early
    assert [c.product for c in s1.candles] == ["A/USDC", "B/USDC"]
    answer(b, "B/USDC", [bar(T0 + IV, "8")], at=T0 + 2 * IV + GRACE, start=T0 + IV)
    (s2,) = b.ready(T0 + 2 * IV + GRACE)
    assert s2.time_s == T0 + IV


def test_fetch_plan_pages_at_most_300_buckets_and_seeds_the_previous_close() -> None:
    b = book(("A/USDC",), last_close={})
    now = T0 + 1000 * IV + 30
    (f,) = b.fetches(now)
    assert f.start_s == T0 - SEED_BUCKETS * IV  # the previous close before the first step is unknown
    assert (f.end_s - f.start_s) // IV == MAX_BUCKETS_PER_REQUEST
    bars = [
        bar(s, str(100 + (s - f.start_s) // IV)) for s in range(f.start_s, f.end_s, IV) if s != T0 + 5 * IV
    ]
    b.on_answer(f, bars, now)
    steps = b.ready(now)
    assert len(steps) == MAX_BUCKETS_PER_REQUEST - SEED_BUCKETS  # up to the page's last bucket
    synthetic = [s for s in steps if s.candles[0].synthetic]
    assert [s.time_s for s in synthetic] == [T0 + 5 * IV]
    assert synthetic[0].candles[0].bar.close == steps[4].candles[0].bar.close
    (f2,) = b.fetches(now)
    assert f2.start_s == b.next_step and (f2.end_s - f2.start_s) // IV == MAX_BUCKETS_PER_REQUEST


def test_an_empty_bucket_at_the_end_of_a_backfill_page_waits_for_the_next_page() -> None:
    b = book(("A/USDC",))
    now = T0 + 1000 * IV
    (f,) = b.fetches(now)
    last = f.end_s - IV
    b.on_answer(f, [bar(s) for s in range(f.start_s, last, IV)], now)  # the page's last bucket is empty
    steps = b.ready(now)
    assert steps[-1].time_s == last - IV and b.next_step == last  # neither missing nor invented
    (f2,) = b.fetches(now)
    assert f2.start_s == last
    b.on_answer(f2, [bar(last + IV)], now)
    step = b.ready(now)[0]
    assert step.time_s == last and step.candles[0].synthetic and step.missing == ()


def test_fetch_plan_stops_at_the_bucket_in_progress() -> None:
    b = book(("A/USDC",))
    now = T0 + 3 * IV + 10
    (f,) = b.fetches(now)
    assert (f.start_s, f.end_s) == (T0, T0 + 4 * IV)


def test_unknown_previous_close_is_never_invented() -> None:
    b = book(("A/USDC",), last_close={})
    f = Fetch("A/USDC", T0 - SEED_BUCKETS * IV, T0 + 2 * IV)
    b.on_answer(f, [bar(T0 + IV)], T0 + 2 * IV + GRACE)  # no row before the empty first bucket
    assert b.ready(T0 + 2 * IV + GRACE) == []


def test_prefilled_candles_of_a_half_published_step_are_not_sent_again() -> None:
    b = book(already={"A/USDC": bar(T0, "55")})
    answer(b, "B/USDC", [bar(T0)], at=T0 + IV + GRACE)
    (step,) = b.ready(T0 + IV + GRACE)
    a, bb = step.candles
    assert not a.publish and a.bar.close == Decimal("55") and bb.publish
    assert b.books["A/USDC"].last_close == Decimal("55")


def test_trade_in_a_decided_bucket_is_reported() -> None:
    b = book(("A/USDC",))
    answer(b, "A/USDC", [bar(T0)], at=T0 + IV + GRACE)
    b.ready(T0 + IV + GRACE)
    assert not b.on_trade("A/USDC", T0 + 10)
    assert b.on_trade("A/USDC", T0 + IV + 1)


def test_poll_now_forces_a_request() -> None:
    b = book(("A/USDC",))
    b.ws_up(T0 - 5)
    b.on_trade("A/USDC", T0 + 1)
    answer(b, "A/USDC", [], at=T0 + IV + GRACE)
    assert b.fetches(T0 + IV + GRACE + 0.1) == []
    b.poll_now()
    assert len(b.fetches(T0 + IV + GRACE + 0.1)) == 1


def test_next_wake() -> None:
    b = book(("A/USDC",))
    assert b.next_wake(T0) == T0 + IV + GRACE
    answer(b, "A/USDC", [], at=T0 + IV + GRACE)
    assert b.next_wake(T0 + IV + GRACE) == T0 + IV + GRACE + POLL


def test_stale_reasons_and_transitions() -> None:
    kw = {
        "stale_after_s": 5.0,
        "now": T0 + 200.0,
        "interval_s": IV,
        "deadline_s": DEADLINE,
        "caught_up_once": True,
    }
    assert stale_reason(frame_age_s=1.0, next_step=T0 + 180, **kw) is None  # type: ignore[arg-type]
    r = stale_reason(frame_age_s=6.0, next_step=T0 + 180, **kw)  # type: ignore[arg-type]
    assert r is not None and "6.0s" in r
    r2 = stale_reason(frame_age_s=1.0, next_step=T0, **kw)  # type: ignore[arg-type]
    assert r2 is not None and "200s ago" in r2
    kw["caught_up_once"] = False
    assert stale_reason(frame_age_s=1.0, next_step=T0, **kw) is None  # type: ignore[arg-type]
    m = FeedMonitor()
    assert m.decide(None) is None
    assert m.decide("x") == ("stale", "x")
    assert m.decide("y") is None
    t = m.decide(None)
    assert t is not None and t[0] == "fresh"


def test_live_options_from_config_and_overrides() -> None:
    from services.ingest.live import LiveOptions
    from shared.config import load_config

    cfg = load_config("config/coinbase_profiles.yaml")
    o = LiveOptions.from_config(cfg)
    assert o.interval_s == cfg.system.market_data.interval_s and o.products == tuple(cfg.all_products())
    o = LiveOptions.from_config(
        cfg, interval="1m", rest_url="http://127.0.0.1:9", ws_url="ws://127.0.0.1:9/ws"
    )
    assert (o.interval_s, o.rest_url, o.ws_url) == (60, "http://127.0.0.1:9", "ws://127.0.0.1:9/ws")
    with pytest.raises(IngestConfigError, match="'7m'"):
        LiveOptions.from_config(cfg, interval="7m")
    with pytest.raises(IngestConfigError, match="'ftp://x'"):
        LiveOptions.from_config(cfg, rest_url="ftp://x")


@given(
    empty=st.lists(st.booleans(), min_size=40, max_size=40),
    steps=st.lists(st.floats(min_value=0.5, max_value=90.0), min_size=60, max_size=120),
    ws=st.lists(st.booleans(), min_size=120, max_size=120),
)
@settings(max_examples=60, deadline=None)
def test_property_honest_rest_gives_the_truth_once_in_order(
    empty: list[bool], steps: list[float], ws: list[bool]
) -> None:
    """Whatever the timing of the polls and the websocket's ups and downs, with a REST that is never late:
    every published step is the truth (values, or synthetic at the previous close for an empty bucket), in
    order, each once, none before its end + grace, and an in-progress (partial) row is never published."""
    products = ("A/USDC", "B/USDC")
    horizon = len(empty) + int(sum(steps)) // IV + 2

    def is_empty(i: int, k: int) -> bool:
        # A trade at least every 10 buckets: a later bucket always shows up long before the deadline.
        return k % 10 != 9 and empty[(k + 7 * i) % len(empty)]

    truth = {
        (p, T0 + k * IV): None if is_empty(i, k) else bar(T0 + k * IV, str(100 + k % 50 + 50 * i))
        for i, p in enumerate(products)
        for k in range(-SEED_BUCKETS, horizon)
    }
    b = LiveBook(products, IV, grace_s=GRACE, deadline_s=3600.0, poll_interval_s=POLL, next_step=T0)
    now = float(T0)
    out = []
    for dt, up in zip(steps, ws, strict=False):
        before = now
        now += dt
        if up:
            b.ws_up(before)
            for (p, s), v in truth.items():  # the websocket shows every trade while it is up
                if v is not None and before <= s + IV / 2 < now:
                    b.on_trade(p, s + IV / 2)
        else:
            b.ws_down(before)
        for f in b.fetches(now):
            rows = []
            for s in range(f.start_s, f.end_s, IV):
                v = truth.get((f.product, s))
                if v is None or s > now:
                    continue
                # The bucket in progress: REST shows partial values (never to be published).
                rows.append(v if s + IV <= now else bar(s, "999999"))
            b.on_answer(f, rows, now)
        for step in b.ready(now):
            assert now >= step.time_s + IV + GRACE
            out.append(step)
    times = [s.time_s for s in out]
    assert times == list(range(T0, T0 + IV * len(out), IV))
    # Nothing held back longer than the wait for a later bucket (at most 10 buckets) or one poll.
    assert len(out) >= (now - T0 - GRACE - POLL) // IV - 11
    prev: dict[str, Decimal | None] = {
        p: next(
            (v.close for k in range(-1, -SEED_BUCKETS - 1, -1) if (v := truth[(p, T0 + k * IV)]) is not None),
            None,
        )
        for p in products
    }
    for step in out:
        assert step.missing == ()
        for c in step.candles:
            v = truth[(c.product, step.time_s)]
            if v is None:
                assert c.synthetic and c.bar.close == prev[c.product] and c.bar.volume == 0
            else:
                assert not c.synthetic and c.bar == v
            prev[c.product] = c.bar.close
