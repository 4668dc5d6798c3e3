"""`mpctl run`, the forward test, end to end: every service its own process over real Kafka and Redis.

(a) A replay at a pace on the bundled data: `--max-steps` stops it by itself, the run directory is written and
    the invariants hold; the same command again resumes the run (same namespace, from the topics), also after a
    SIGTERM mid-run; md.candles then holds every step once, none missing, none repeated.
(b) The live source against the Coinbase market-data peer (tests/peer/coinbase_md_peer.py) at a fast clock:
    intents, approvals and paper fills on live candles, the invariants, and no credential in any log, topic or
    report. It needs the live ingest (`python -m services.ingest --source coinbase`) and the peer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from aiokafka import AIOKafkaConsumer

from mpctl.infra import Endpoints
from mpctl.invariants import check_run
from shared.codec import DecodeError, decode
from shared.config import load_config
from shared.kafka import partitions_of
from shared.messages import CandleClosed, WatermarkAdvanced
from tests.e2e.test_live_pipeline import topic_bytes

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "market"
MD_PEER = ROOT / "tests" / "peer" / "coinbase_md_peer.py"
REPLAY_SPEED = "36000"  # 1 h candles: ten steps a second
# Live (b): the signal models warm up on this many closed 1 m candles of history (published at once on the first
# start, opening nothing), then LIVE_STEPS candles close at the peer's 60 x pace, about one a real second.
HISTORY = 250
LIVE_STEPS = 40
PEER_START = "2026-03-02T13:00:00Z"


def env_for(infra: Endpoints, **extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=infra.kafka.servers,
        REDIS_URL=infra.redis_url,
        CI="true",
        **extra,
    )


def mpctl(*argv: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpctl.cli", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    """Exit 0 and not one error or warning line (a healthy start prints none)."""
    assert proc.returncode == 0, f"mpctl run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    noisy = [
        ln
        for ln in (proc.stdout + proc.stderr).splitlines()
        if "warning" in ln.lower() or "error" in ln.lower()
    ]
    assert noisy == [], noisy


def run_json(out: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((out / "run.json").read_text())
    return doc


async def candle_topic(
    bootstrap: str, topic: str
) -> tuple[dict[int, list[datetime]], list[tuple[str, datetime]]]:
    """Watermark step times per partition, in offset order, and every candle's (product, open time)."""
    consumer = AIOKafkaConsumer(**bootstrap.client_options(), enable_auto_commit=False)
    await consumer.start()
    steps: dict[int, list[datetime]] = defaultdict(list)
    candles: list[tuple[str, datetime]] = []
    try:
        tps = await partitions_of(consumer, [topic], bootstrap)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        left = {tp for tp in tps if ends[tp] > 0}
        while left:
            for tp, recs in (await consumer.getmany(timeout_ms=1000)).items():
                for rec in recs:
                    try:
                        msg = decode(rec.value)
                    except DecodeError:
                        continue
                    if isinstance(msg, WatermarkAdvanced):
                        steps[tp.partition].append(msg.step_time)
                    elif isinstance(msg, CandleClosed):
                        candles.append((msg.product, msg.open_time))
                    if rec.offset + 1 >= ends[tp]:
                        left.discard(tp)
    finally:
        await consumer.stop()
    return steps, candles


def assert_every_step_once(
    steps: dict[int, list[datetime]], candles: list[tuple[str, datetime]], interval_s: int
) -> int:
    assert steps, "no watermark on the candles topic"
    for partition, times in steps.items():
        gaps = {(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)}
        assert gaps <= {float(interval_s)}, (
            f"partition {partition}: a step missing or repeated (gaps {sorted(gaps)})"
        )
    assert len({tuple(t) for t in steps.values()}) == 1, "partitions disagree on the steps"
    repeated = [k for k, n in Counter(candles).items() if n > 1]
    assert repeated == [], f"candles published twice: {repeated[:5]}"
    return len(next(iter(steps.values())))


def test_run_replay_stops_by_itself_and_resumes_without_a_gap(infra: Endpoints, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = env_for(infra)
    common = ["run", "--source", "replay", "--data", str(DATA), "--speed", REPLAY_SPEED, "--out", str(out)]

    # 1. A new run: stops by itself once 20 new steps are processed by every consumer group.
    first = mpctl(*common, "--max-steps", "20", "--timeout", "90", env=env)
    assert_clean(first)
    info = run_json(out)
    ns = info["namespace"]
    assert info["kafka_bootstrap"] == infra.kafka.servers and info["redis_url"] == infra.redis_url
    assert (info["source"], info["interval"], len(info["starts"])) == ("replay", "1h", 1)
    for name in (
        "orders.jsonl",
        "fills.jsonl",
        "decisions.jsonl",
        "plans.jsonl",
        "summary.json",
        "report.html",
    ):
        assert (out / name).is_file(), name
    assert {p.name for p in (out / "logs").iterdir()} >= {
        "ingest.log",
        "registry.log",
        "arbiter.log",
        "monitor.log",
    }
    result = check_run(out)
    assert result.ok, result.violations
    steps, candles = asyncio.run(candle_topic(infra.kafka, f"{ns}.md.candles"))
    after_first = assert_every_step_once(steps, candles, 3600)
    assert after_first >= 20

    # The operating commands read the run directory.
    lag = mpctl("lag", "--run", str(out), "--json", env=env)
    assert lag.returncode == 0 and json.loads(lag.stdout)["namespace"] == ns, lag.stderr
    status = mpctl("status", "--run", str(out), "--json", env=env)
    assert status.returncode == 0 and set(json.loads(status.stdout)["profiles"]) >= {"profile_a"}, (
        status.stderr
    )

    # 2. The same command again resumes: same namespace, the next steps.
    second = mpctl(*common, "--max-steps", "15", "--timeout", "90", env=env)
    assert_clean(second)
    assert run_json(out)["namespace"] == ns and len(run_json(out)["starts"]) == 2
    steps, candles = asyncio.run(candle_topic(infra.kafka, f"{ns}.md.candles"))
    after_second = assert_every_step_once(steps, candles, 3600)
    assert after_second >= after_first + 15

    # 3. SIGTERM mid-run: a clean stop (services stopped, run collected, topics kept), then a resumption.
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpctl.cli", *common],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        log = out / "logs" / "ingest.log"
        size = log.stat().st_size
        while time.monotonic() < deadline and log.stat().st_size == size:  # the ingest (re)started
            time.sleep(0.2)
        time.sleep(3)  # some steps go out
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_clean(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert "interrupted" in stdout and (out / "summary.json").is_file()
    steps, candles = asyncio.run(candle_topic(infra.kafka, f"{ns}.md.candles"))
    after_term = assert_every_step_once(steps, candles, 3600)
    assert after_term > after_second

    fourth = mpctl(*common, "--max-steps", "10", "--timeout", "90", env=env)
    assert_clean(fourth)
    steps, candles = asyncio.run(candle_topic(infra.kafka, f"{ns}.md.candles"))
    assert assert_every_step_once(steps, candles, 3600) >= after_term + 10
    result = check_run(out)
    assert result.ok, result.violations
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counters"]["plans"] > 0


# ------------------------------------------------------------------------------------------ (b) live
def md_peer_command(speed: float = 60.0) -> list[str]:
    """The market-data peer of the live runs, every data asset against USDC, 1 m buckets at `speed`."""
    return [
        sys.executable,
        "-m",
        "tests.peer.coinbase_md_peer",
        "--port",
        "0",
        "--speed",
        f"{speed:g}",
        # A fixed start: the epochs, so the profiles' plans (strategy, assets), and the data rows the peer serves
        # are the same in every run, and so is what the strategies trade (not the wall clock's luck).
        "--start",
        PEER_START,
        "--granularity",
        "60",
        "--products",
        ",".join(f"{a}-USDC" for a in sorted(data_assets())),
    ]


def low_threshold_config(tmp_path: Path, rest_url: str, ws_url: str) -> Path:
    """Two profiles on 1 m live candles, thresholds low enough that a few dozen candles produce intents."""
    doc = yaml.safe_load((ROOT / "config" / "coinbase_profiles.yaml").read_text())
    system = doc.setdefault("system", {})
    system["mode"] = "paper"
    system["market_data"] = {
        "source": "coinbase",
        "interval": "1m",
        "rest_url": rest_url,
        "ws_url": ws_url,
        "history_steps": HISTORY,
        # Eleven products at 60x: the default 8 requests/s would take 80 exchange seconds a round (the peer
        # has no rate limit of its own).
        "max_requests_per_s": 40.0,
    }
    # The peer's prices come from data/market: only the assets with a file there (UNI has none).
    have = data_assets()
    for p in doc["profiles"].values():
        p["enabled"] = True
        p["api_credentials"].update(source="store", exchange="coinbase", sandbox=False)
        sc = p["strategy_config"]
        sc["random_asset_pool"] = [a for a in sc["random_asset_pool"] if a in have]
        lower(p)
    path = tmp_path / "live_paper.yaml"
    path.write_text(yaml.safe_dump(doc))
    load_config(path)  # valid
    return path


def data_assets() -> set[str]:
    return {f.name.split("_")[1].split("-")[0] for f in DATA.glob("*_*-*_1h.csv*")}


# The peer replays hourly candles as 1 m buckets: per-candle moves of an hour annualised as minutes look
# wildly volatile, so the volatility ceiling is lifted with the entry thresholds.
LOW = {
    "entropy_threshold": 0.0001,
    "confidence_threshold": 0.05,
    "signal_strength_threshold": 0.05,
    "volatility_threshold": 1000.0,
}


def lower(node: Any) -> None:
    """Every entry threshold of a profile, wherever it sits, set low."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in LOW:
                node[k] = LOW[k]
            else:
                lower(v)
    elif isinstance(node, list):
        for v in node:
            lower(v)


def test_run_on_the_live_peer_trades_on_paper_and_leaks_no_credential(
    infra: Endpoints, tmp_path: Path
) -> None:
    peer = subprocess.Popen(
        md_peer_command(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert peer.stdout is not None
        ready = peer.stdout.readline().split()  # "ready http://127.0.0.1:P ws://127.0.0.1:P/ws"
        assert ready[:1] == ["ready"], ready
        rest_url, ws_url = ready[1], ready[2]
        cfg = low_threshold_config(tmp_path, rest_url, ws_url)
        passphrase = "forward test store passphrase 5b1e"
        store = tmp_path / "secrets" / "credentials.enc"
        env = env_for(infra, MPCTL_CREDENTIALS_STORE=str(store), MPCTL_SECRETS_PASSPHRASE=passphrase)
        env.pop("MPCTL_SECRETS_KEY_FILE", None)
        secrets_ = {pid: f"test-secret-{pid}-9d4c1f" for pid in ("profile_a", "profile_b")}
        for pid, secret in secrets_.items():
            setp = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mpctl.cli",
                    "secrets",
                    "set",
                    pid,
                    "--exchange",
                    "coinbase",
                    "--force",
                ],
                cwd=ROOT,
                env=env,
                input=json.dumps({"api_key": f"key-{pid}", "secret": secret}),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert setp.returncode == 0, setp.stderr
        out = tmp_path / "run"
        run = mpctl(
            "run",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--max-steps",
            str(HISTORY + LIVE_STEPS),
            "--timeout",
            "100",
            env=env,
            timeout=130,
        )
        assert_clean(run)
        ns = run_json(out)["namespace"]
        summary = json.loads((out / "summary.json").read_text())
        c = summary["counters"]
        assert c["intents"] > 0 and c["approved"] > 0, c
        fills = [json.loads(ln) for ln in (out / "fills.jsonl").read_text().splitlines() if ln.strip()]
        assert fills, "no paper fill on the live candles"
        result = check_run(out)
        assert result.ok, result.violations
        texts = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        texts["command output"] = (run.stdout + run.stderr).encode()
        texts["topics"] = b"\n".join(asyncio.run(topic_bytes(infra.kafka, ns))[0])
        leaks = [
            w for w, data in texts.items() for s in [*secrets_.values(), passphrase] if s.encode() in data
        ]
        assert leaks == [], f"credentials found in: {sorted(set(leaks))}"
    finally:
        peer.send_signal(signal.SIGTERM)
        try:
            peer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            peer.kill()
