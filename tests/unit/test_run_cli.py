"""`mpctl run`'s start-up decisions, without Kafka: flags, settings precedence, refusals, resumption."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from mpctl import commands_run, infra
from mpctl.cli import build_parser
from mpctl.commands_run import (
    DEFAULT_OUT,
    REPLAY_SPEED,
    RunError,
    check_start,
    ingest_args,
    plan_start,
    resolve_settings,
)
from mpctl.stack import common_args
from shared.bus import KafkaAccess
from shared.config import AppConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "config" / "coinbase_profiles.yaml"


def parse(*argv: str) -> argparse.Namespace:
    return build_parser("run").parse_args(["run", *argv])


def config(**market_data: Any) -> AppConfig:
    cfg = load_config(TEMPLATE)
    md = cfg.system.market_data.model_copy(update=market_data)
    return cfg.model_copy(update={"system": cfg.system.model_copy(update={"market_data": md})})


def live(cfg: AppConfig) -> AppConfig:
    return cfg.model_copy(update={"system": cfg.system.model_copy(update={"mode": "live"})})


def test_defaults_and_every_flag_parse() -> None:
    a = parse()
    assert a.out == DEFAULT_OUT and a.max_steps is None and a.source is None and a.timeout is None
    a = parse(
        "--out",
        "x",
        "--config",
        "c.yaml",
        "--max-steps",
        "5",
        "--namespace",
        "ns",
        "--source",
        "replay",
        "--rest-url",
        "http://127.0.0.1:1",
        "--ws-url",
        "ws://127.0.0.1:2",
        "--interval",
        "1m",
        "--data",
        "d",
        "--speed",
        "10",
        "--timeout",
        "60",
    )
    assert (a.out, a.config, a.max_steps, a.namespace, a.source) == (
        Path("x"),
        Path("c.yaml"),
        5,
        "ns",
        "replay",
    )
    assert (a.rest_url, a.ws_url, a.interval, a.data, a.speed, a.timeout) == (
        "http://127.0.0.1:1",
        "ws://127.0.0.1:2",
        "1m",
        Path("d"),
        10.0,
        60.0,
    )
    with pytest.raises(SystemExit):
        parse("--source", "ccxt")
    with pytest.raises(SystemExit):
        parse("--interval", "3m")


def test_the_profiles_file_gives_the_settings_when_no_flag_does() -> None:
    cfg = config(interval="5m", rest_url="http://127.0.0.1:9", ws_url="ws://127.0.0.1:9")
    s = resolve_settings(parse(), cfg)
    assert (s.source, s.interval, s.rest_url, s.ws_url) == (
        "coinbase",
        "5m",
        "http://127.0.0.1:9",
        "ws://127.0.0.1:9",
    )
    assert s.speed == REPLAY_SPEED and s.flags == {}
    # The ingest reads the same file: only the flags given are passed on.
    assert ingest_args(s) == []


def test_flags_override_the_profiles_file() -> None:
    cfg = config(interval="5m")
    s = resolve_settings(
        parse("--interval", "1m", "--rest-url", "http://127.0.0.1:8/", "--ws-url", "ws://127.0.0.1:8"), cfg
    )
    assert (s.interval, s.rest_url, s.ws_url) == ("1m", "http://127.0.0.1:8", "ws://127.0.0.1:8")
    assert ingest_args(s) == [
        "--rest-url",
        "http://127.0.0.1:8/",
        "--ws-url",
        "ws://127.0.0.1:8",
        "--interval",
        "1m",
    ]


def test_a_replay_flag_over_a_live_config_reaches_every_service() -> None:
    cfg = config()
    s = resolve_settings(
        parse("--source", "replay", "--data", str(ROOT / "data" / "market"), "--speed", "100"), cfg
    )
    assert s.source == "replay"
    args = ingest_args(s)
    assert (
        args[args.index("--data") + 1] == str(ROOT / "data" / "market")
        and args[args.index("--speed") + 1] == "100"
    )
    # Every service gets the run's source: it picks their clock (event time here, not the exchange's).
    endpoints = infra.Endpoints(KafkaAccess(servers="127.0.0.1:9092"), "redis://127.0.0.1:6379/0")
    common = common_args(endpoints, "ns", None, s.source)
    assert common[common.index("--source") + 1] == "replay"
    live = resolve_settings(parse("--source", "coinbase"), config(source="replay"))
    assert common_args(endpoints, "ns", None, live.source)[-2:] == ["--source", "coinbase"]


def test_bad_urls_and_counts_are_refused_with_the_key() -> None:
    with pytest.raises(RunError, match="rest_url"):
        resolve_settings(parse("--rest-url", "ftp://x"), config())
    with pytest.raises(RunError, match="ws_url"):
        resolve_settings(parse("--ws-url", "https://x"), config())
    with pytest.raises(RunError, match="--max-steps"):
        resolve_settings(parse("--max-steps", "0"), config())


def test_live_mode_with_a_replay_is_refused_and_says_why() -> None:
    cfg = live(config())
    a = parse("--source", "replay")
    with pytest.raises(RunError, match="priced from recorded candles"):
        check_start(a, cfg, resolve_settings(a, cfg))
    with pytest.raises(RunError, match="priced from recorded candles"):
        check_start(
            parse(), live(config(source="replay")), resolve_settings(parse(), live(config(source="replay")))
        )
    # The live market in live mode: allowed (real trading) with --live, with any exchange URL.
    a = parse("--live", "--exchange-api-base", "https://api.example.invalid")
    check_start(a, cfg, resolve_settings(a, cfg))


def test_going_live_is_explicit() -> None:
    cfg = live(config())
    a = parse()
    with pytest.raises(RunError, match=r"starts only with `mpctl run --live`.*mpctl live check"):
        check_start(a, cfg, resolve_settings(a, cfg))
    a = parse("--live")
    with pytest.raises(RunError, match="system.mode is 'paper'"):
        check_start(a, config(), resolve_settings(a, config()))


def test_an_exchange_url_needs_live_mode_and_a_replay_needs_its_folder(tmp_path: Path) -> None:
    a = parse("--exchange-api-base", "http://127.0.0.1:1")
    with pytest.raises(RunError, match="system.mode: live"):
        check_start(a, config(), resolve_settings(a, config()))
    a = parse("--source", "replay", "--data", str(tmp_path / "missing"))
    with pytest.raises(RunError, match="not a folder"):
        check_start(a, config(), resolve_settings(a, config()))


def test_a_new_run_gets_a_new_namespace_unless_one_is_given(tmp_path: Path) -> None:
    s = resolve_settings(parse(), config())
    p = plan_start(parse("--out", str(tmp_path)), s)
    assert not p.resumed and p.namespace.startswith("run") and p.previous is None
    assert plan_start(parse("--out", str(tmp_path), "--namespace", "mine"), s).namespace == "mine"


def write_run(out: Path, **doc: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_bytes(
        orjson.dumps({"namespace": "run1", "kafka_bootstrap": "127.0.0.1:1", **doc})
    )


def test_resume_reads_the_namespace_from_run_json(tmp_path: Path) -> None:
    write_run(tmp_path, source="coinbase", interval="1h", starts=["2026-01-01T00:00:00+00:00"])
    s = resolve_settings(parse(), config())
    p = plan_start(parse("--out", str(tmp_path)), s)
    assert p.resumed and p.namespace == "run1" and p.previous is not None
    assert p.previous["starts"] == ["2026-01-01T00:00:00+00:00"]
    assert plan_start(parse("--out", str(tmp_path), "--namespace", "run1"), s).namespace == "run1"
    # A demo's run.json (no source, no interval) resumes too.
    write_run(tmp_path / "demo")
    assert plan_start(parse("--out", str(tmp_path / "demo")), s).namespace == "run1"


def test_resume_refuses_another_namespace_source_or_interval(tmp_path: Path) -> None:
    write_run(tmp_path, source="coinbase", interval="1h")
    s = resolve_settings(parse(), config())
    with pytest.raises(RunError, match="namespace 'run1'"):
        plan_start(parse("--out", str(tmp_path), "--namespace", "other"), s)
    with pytest.raises(RunError, match="interval '1h'"):
        plan_start(parse("--out", str(tmp_path)), resolve_settings(parse("--interval", "1m"), config()))
    with pytest.raises(RunError, match="source 'coinbase'"):
        plan_start(parse("--out", str(tmp_path)), resolve_settings(parse("--source", "replay"), config()))
    (tmp_path / "run.json").write_bytes(orjson.dumps({"kafka_bootstrap": "x"}))
    with pytest.raises(RunError, match="no namespace"):
        plan_start(parse("--out", str(tmp_path)), s)


def test_run_forward_prints_the_refusal_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_load(TEMPLATE.read_text())
    doc.setdefault("system", {})["mode"] = "live"
    for c in (p["api_credentials"] for p in doc["profiles"].values()):
        c.update(source="store", exchange="coinbase", sandbox=False)  # placeholders are refused in live mode
    cfg_file = tmp_path / "live.yaml"
    cfg_file.write_text(yaml.safe_dump(doc))
    args = parse("--config", str(cfg_file), "--source", "replay", "--out", str(tmp_path / "run"))
    assert commands_run.run_forward(args) == 1
    err = capsys.readouterr().err
    assert "mpctl run:" in err and "refused" in err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
