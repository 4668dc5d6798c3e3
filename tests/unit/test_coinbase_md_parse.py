"""Coinbase market-data parsers (services/ingest/coinbase_md.py): times, frames, REST rows, errors."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from services.ingest.coinbase_md import (
    ProtocolError,
    TokenBucket,
    parse_candle,
    parse_candles,
    parse_frame,
    parse_go_time,
    parse_rfc3339,
    parse_server_time,
    rest_product_id,
    subscribe_messages,
    ws_product_id,
    ws_products,
)
from services.ingest.live_domain import IngestError

T = 1775572210.000123456  # 2026-04-07 14:30:10.000123456 UTC


def test_heartbeat_current_time_in_gos_format() -> None:
    t = parse_go_time("2026-04-07 14:30:10.000123456 +0000 UTC m=+91717.525857105")
    assert t == pytest.approx(T, abs=1e-6)
    assert parse_go_time("2026-04-07 14:30:10 +0000 UTC") == 1775572210.0
    assert parse_go_time("2026-04-07 16:30:10.5 +0200 CEST m=+1.0") == pytest.approx(1775572210.5)


@pytest.mark.parametrize("bad", ["", "2026-04-07T14:30:10Z", "2026-13-07 14:30:10 +0000 UTC", None, 5])
def test_heartbeat_time_errors_name_the_value(bad: object) -> None:
    with pytest.raises(ProtocolError, match="current_time") as ei:
        parse_go_time(bad)
    assert ei.value.kind == "bad_time" and repr(bad) in str(ei.value)


def test_rfc3339() -> None:
    assert parse_rfc3339("2026-04-07T14:30:10.000123Z") == pytest.approx(1775572210.000123)
    assert parse_rfc3339("2026-04-07T14:30:10.000123456Z") == pytest.approx(1775572210.000123456)
    assert parse_rfc3339("2026-04-07T16:30:10+02:00") == 1775572210.0
    with pytest.raises(ProtocolError, match="'yesterday'"):
        parse_rfc3339("yesterday")


def test_product_ids() -> None:
    assert rest_product_id("BTC/USDC") == "BTC-USDC"
    assert ws_product_id("BTC/USDC") == "BTC-USD"
    assert ws_product_id("ETH/BTC") == "ETH-BTC"
    assert ws_products(["BTC/USDC", "ETH/USDC"]) == {"BTC-USD": "BTC/USDC", "ETH-USD": "ETH/USDC"}
    with pytest.raises(IngestError, match="BTC-USD"):
        ws_products(["BTC/USDC", "BTC/USD"])


def test_subscribe_one_message_per_channel() -> None:
    msgs = [json.loads(m) for m in subscribe_messages(["ETH-USD", "BTC-USD"])]
    assert [m["channel"] for m in msgs] == ["heartbeats", "market_trades"]
    assert all(m["type"] == "subscribe" and m["product_ids"] == ["BTC-USD", "ETH-USD"] for m in msgs)


ROW = {
    "start": "1775570400",
    "low": "68600.00",
    "high": "68960.00",
    "open": "68700.00",
    "close": "68880.00",
    "volume": "402.11",
}


def test_candles_newest_first_to_oldest_first() -> None:
    newer = dict(ROW, start="1775574000")
    bars = parse_candles({"candles": [newer, ROW]}, 3600)
    assert [b.start_s for b in bars] == [1775570400, 1775574000]
    assert bars[0].close == Decimal("68880.00") and bars[0].volume == Decimal("402.11")
    assert parse_candles({"candles": []}, 60) == []


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"start": "abc"}, "'abc'"),
        ({"start": "1775570401"}, "not aligned"),
        ({"close": "NaN"}, "not finite"),
        ({"close": "x1"}, "'x1'"),
        ({"low": "0"}, "> 0"),
        ({"volume": "-1"}, "volume"),
        ({"high": "68000"}, "high/low"),
        ({"open": None}, "None"),
    ],
)
def test_bad_rows_are_errors_with_the_value(change: dict[str, object], text: str) -> None:
    with pytest.raises(ProtocolError, match=text) as ei:
        parse_candle(dict(ROW, **change), 3600)
    assert ei.value.kind == "bad_row"


def test_one_bad_row_fails_the_page_and_bad_bodies() -> None:
    with pytest.raises(ProtocolError):
        parse_candles({"candles": [ROW, dict(ROW, start="x")]}, 3600)
    with pytest.raises(ProtocolError, match="repeats"):
        parse_candles({"candles": [ROW, ROW]}, 3600)
    for body in ([], {"candle": []}, "x", None):
        with pytest.raises(ProtocolError) as ei:
            parse_candles(body, 60)
        assert ei.value.kind == "bad_body"


def test_server_time() -> None:
    assert (
        parse_server_time({"iso": "x", "epochSeconds": "1775572210", "epochMillis": "1775572210123"})
        == 1775572210.123
    )
    assert parse_server_time({"epochSeconds": 1775572210}) == 1775572210.0
    assert parse_server_time({"iso": "2026-04-07T14:30:10.5Z"}) == 1775572210.5
    with pytest.raises(ProtocolError, match="'soon'"):
        parse_server_time({"epochMillis": "soon"})
    with pytest.raises(ProtocolError):
        parse_server_time({})


def test_frames() -> None:
    hb = parse_frame(
        '{"channel":"heartbeats","timestamp":"2026-04-07T14:30:10.000412Z","sequence_num":12,"events":'
        '[{"current_time":"2026-04-07 14:30:10.000123456 +0000 UTC m=+91717.525857105","heartbeat_counter":3049}]}'
    )
    assert hb.kind == "heartbeat" and hb.seq == 12 and hb.current_time_s == pytest.approx(T, abs=1e-6)
    tr = parse_frame(
        '{"channel":"market_trades","timestamp":"2026-04-07T14:30:02.900000Z","sequence_num":2,"events":[{"type":'
        '"snapshot","trades":[{"trade_id":"995098701","product_id":"BTC-USD","price":"68900.00","size":"0.05",'
        '"side":"SELL","time":"2026-04-07T14:30:02.800000Z"}]}]}'
    )
    assert tr.kind == "trades" and tr.snapshot and tr.seq == 2
    (t,) = tr.trades
    assert (t.trade_id, t.ws_product, t.price, t.side) == (
        "995098701",
        "BTC-USD",
        Decimal("68900.00"),
        "sell",
    )
    assert t.time_s == pytest.approx(1775572202.8)
    sub = parse_frame(
        '{"channel":"subscriptions","timestamp":"2026-04-07T14:30:00Z","sequence_num":1,"events":[]}'
    )
    assert sub.kind == "subscriptions"
    err = parse_frame('{"type":"error","message":"failure to subscribe"}')
    assert err.kind == "error" and err.message == "failure to subscribe"
    assert parse_frame('{"channel":"ticker","sequence_num":3,"events":[]}').kind == "other"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("not json", "bad_frame"),
        ("[1]", "bad_frame"),
        ('{"events":[]}', "bad_frame"),
        ('{"channel":"heartbeats","sequence_num":"1","events":[]}', "bad_frame"),
        ('{"channel":"heartbeats","sequence_num":1,"events":[{}]}', "bad_frame"),
        ('{"channel":"heartbeats","sequence_num":1,"events":[{"current_time":"now"}]}', "bad_time"),
        (
            '{"channel":"market_trades","sequence_num":1,"events":[{"trades":[{"trade_id":"1"}]}]}',
            "bad_trade",
        ),
        (
            '{"channel":"market_trades","sequence_num":1,"events":[{"trades":[{"trade_id":"1","product_id":"A-USD",'
            '"price":"-1","size":"1","time":"2026-04-07T14:30:02Z"}]}]}',
            "bad_trade",
        ),
    ],
)
def test_bad_frames(text: str, kind: str) -> None:
    with pytest.raises(ProtocolError) as ei:
        parse_frame(text)
    assert ei.value.kind == kind


def test_token_bucket() -> None:
    now = [0.0]
    b = TokenBucket(2.0, monotonic=lambda: now[0])
    assert b.take() == 0.0 and b.take() == 0.0
    assert b.take() == pytest.approx(0.5)  # the third in the same instant waits half a second
    now[0] = 2.0
    assert b.take() == 0.0
    with pytest.raises(IngestError, match="0"):
        TokenBucket(0)
