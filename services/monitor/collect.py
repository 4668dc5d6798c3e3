"""Reading a run back from Kafka (everything up to the end offsets at the time of the call) and writing the
run's output files: summary.json, orders.jsonl, fills.jsonl, decisions.jsonl, plans.jsonl,
internal_crosses.jsonl."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson

from services.monitor.domain import (
    RunData,
    decision_records,
    fill_records,
    opportunity_records,
    order_records,
    plan_records,
    summarize,
    verified_fills,
)
from shared.bus import KafkaAccess
from shared.config import AppConfig
from shared.kafka import read_topics
from shared.topics import Topics

log = logging.getLogger(__name__)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("wb") as fh:
        for r in rows:
            fh.write(orjson.dumps(r) + b"\n")


async def collect_run(cfg: AppConfig, bootstrap: KafkaAccess, out_dir: Path) -> dict[str, Any]:
    t = Topics(cfg.system.kafka.namespace)
    msgs, bad = await read_topics(bootstrap, [t.candles, t.audit, t.intents, t.events, t.decisions])
    data = RunData()
    data.add_all(msgs)
    if not data.candles:
        raise RuntimeError(
            f"no candle found on {t.candles}: nothing to report (was the run's namespace deleted?)"
        )
    return write_outputs(cfg, data, out_dir, extra={"undecodable_messages": bad})


def write_outputs(
    cfg: AppConfig, data: RunData, out_dir: Path, *, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(cfg, data)
    for f, why in verified_fills(data)[1]:
        log.warning("fill %s left out of the report: %s", f.fill_id, why)
    if extra:
        summary["counters"].update(extra)
    _write_jsonl(out_dir / "orders.jsonl", order_records(data))
    _write_jsonl(out_dir / "fills.jsonl", fill_records(data))
    _write_jsonl(out_dir / "decisions.jsonl", decision_records(data))
    _write_jsonl(out_dir / "plans.jsonl", plan_records(data))
    _write_jsonl(out_dir / "internal_crosses.jsonl", opportunity_records(data))
    (out_dir / "summary.json").write_bytes(
        orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    )
    return summary
