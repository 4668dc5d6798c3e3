"""mpctl.invariants over run directories: a sound run passes; each kind of breakage is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpctl.invariants import assert_run, check_run
from tests.unit.synthetic_run import build_run


def _rewrite(path: Path, edit: object) -> None:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = edit(rows)  # type: ignore[operator]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sound_run_passes(tmp_path: Path) -> None:
    build_run(tmp_path)
    r = assert_run(tmp_path)
    assert r.ok and r.checked["profiles"] == 2 and r.checked["fills"] == 5


def _add_sell_of_b(tmp_path: Path, *, sent: str, filled: str, first: str = "submitted", **kw: object) -> None:
    """profile_b sells BTC (order c-x): its first order event at `sent`, its fill at `filled`."""

    def orders(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        extra = dict(
            rows[0],
            profile="profile_b",
            side="sell",
            client_order_id="c-x",
            intent_id="i-profile_b-x1",
            event_time=sent,
            status=first,
            **kw,
        )
        return [*rows, extra]

    def fills(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        extra = dict(
            rows[0],
            profile="profile_b",
            side="sell",
            fill_id="f-x",
            client_order_id="c-x",
            intent_id="i-profile_b-x1",
            event_time=filled,
            **kw,
        )
        return [*rows, extra]

    _rewrite(tmp_path / "orders.jsonl", orders)
    _rewrite(tmp_path / "fills.jsonl", fills)


def test_opposite_side_fill_inside_another_profiles_working_order_breaks_invariant_3(tmp_path: Path) -> None:
    build_run(tmp_path)
    # profile_b's sell of BTC fills one minute after profile_a's BTC buy filled (window 300 s).
    _add_sell_of_b(tmp_path, sent="2021-08-01T05:01:00Z", filled="2021-08-01T05:01:00Z")
    checks = {v.check for v in check_run(tmp_path).violations}
    assert "3-opposite-side" in checks
    with pytest.raises(AssertionError, match="3-opposite-side"):
        assert_run(tmp_path)


def test_opposite_side_orders_sent_close_but_filled_apart_are_no_wash_trade(tmp_path: Path) -> None:
    build_run(tmp_path)
    # Sent a minute after profile_a's buy, but filled only after its working life (last fill + 300 s) ended.
    _add_sell_of_b(tmp_path, sent="2021-08-01T05:01:00Z", filled="2021-08-01T05:06:00Z")
    assert "3-opposite-side" not in {v.check for v in check_run(tmp_path).violations}


def test_protective_order_of_another_profile_is_reported_not_flagged(tmp_path: Path) -> None:
    build_run(tmp_path)
    # A stop loss resting at the exchange (first event `open`, no arbiter decision) fills inside profile_a's
    # buy's working life: trigger orders take liquidity, the summary counts them apart.
    _add_sell_of_b(
        tmp_path,
        sent="2021-08-01T01:00:00Z",
        filled="2021-08-01T05:01:00Z",
        first="open",
        intent_reason="stop_loss",
    )
    r = check_run(tmp_path)
    assert "3-opposite-side" not in {v.check for v in r.violations}
    assert r.checked["protective opposite-side pairs"] == 1


def test_duplicates_break_invariants_1_and_4(tmp_path: Path) -> None:
    build_run(tmp_path)
    _rewrite(tmp_path / "orders.jsonl", lambda rows: [*rows, rows[0]])
    _rewrite(tmp_path / "fills.jsonl", lambda rows: [*rows, rows[0]])

    def same_fp(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        b0 = next(r for r in rows if r["profile"] == "profile_b")
        a0 = next(r for r in rows if r["profile"] == "profile_a")
        a0["fingerprint"] = b0["fingerprint"]
        return rows

    _rewrite(tmp_path / "plans.jsonl", same_fp)
    checks = {v.check for v in check_run(tmp_path).violations}
    assert {"4-sent-twice", "4-fill-twice", "1-fingerprint", "books"} <= checks


def test_unbalanced_books_and_counters(tmp_path: Path) -> None:
    summary = build_run(tmp_path)
    summary["profiles"]["profile_a"]["final_equity"] = "1"
    summary["counters"]["approved"] = 4
    r = check_run(tmp_path, summary)
    assert {v.check for v in r.violations} == {"books", "counters"}


def test_missing_summary(tmp_path: Path) -> None:
    assert [v.check for v in check_run(tmp_path).violations] == ["files"]


def _share_ada(tmp_path: Path, pool: list[str], *, with_config: bool = True) -> None:
    """profile_b's plans draw ADA (profile_a's random asset in every epoch); both profiles' pools are `pool`."""
    _rewrite(tmp_path / "plans.jsonl", lambda rows: [dict(r, random_asset="ADA") for r in rows])
    if not with_config:
        return
    profile = {"strategy_config": {"base_assets": ["BTC", "ETH"], "random_asset_pool": pool}}
    config = tmp_path / "profiles.yaml"
    config.write_text(json.dumps({"profiles": {"profile_a": profile, "profile_b": profile}}))
    (tmp_path / "run.json").write_text(json.dumps({"config": str(config)}))


def test_a_random_asset_shared_while_the_pool_has_one_for_every_profile_breaks_invariant_2(
    tmp_path: Path,
) -> None:
    build_run(tmp_path)
    # Two profiles, two candidates each: they must differ, even though only ADA was ever drawn.
    _share_ada(tmp_path, ["ADA", "DOT", "BTC", "USDC"])
    assert "2-random-asset" in {v.check for v in check_run(tmp_path).violations}


def test_a_random_asset_shared_with_fewer_candidates_than_profiles_holds_invariant_2(tmp_path: Path) -> None:
    build_run(tmp_path)
    _share_ada(tmp_path, ["ADA", "BTC", "USDC"])  # base assets and the quote are no candidates: ADA only
    r = check_run(tmp_path)
    assert "2-random-asset" not in {v.check for v in r.violations}
    assert r.checked["random assets shared, the pool smaller than the profiles"] > 0


def test_without_the_profiles_file_every_shared_random_asset_counts(tmp_path: Path) -> None:
    build_run(tmp_path)
    _share_ada(tmp_path, [], with_config=False)
    assert "2-random-asset" in {v.check for v in check_run(tmp_path).violations}
