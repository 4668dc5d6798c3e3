"""Reading a run back from Kafka (everything up to the end offsets at the time of the call) and writing the
run's output files: summary.json, orders.jsonl, fills.jsonl, decisions.jsonl, plans.jsonl,
internal_crosses.jsonl."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

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
from shared.codec import DecodeError, decode
from shared.config import AppConfig
from shared.messages import Message
from shared.topics import Topics

log = logging.getLogger(__name__)


async def read_topics(bootstrap: str, topics: Sequence[str]) -> tuple[list[Message], int]:
    """All decodable messages of the topics up to their current end; returns them and the undecodable count."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_poll_records=5000,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    out: list[Message] = []
    bad = 0
    try:
        tps = []
        for t in topics:
            parts = consumer.partitions_for_topic(t)
            for _ in range(50):
                if parts:
                    break
                # A fresh consumer may not have the topic in its metadata yet; ask until it does.
                consumer.subscribe([t])
                await consumer._client.force_metadata_update()  # noqa: SLF001 - no public refresh in aiokafka
                consumer.unsubscribe()
                parts = consumer.partitions_for_topic(t)
                if not parts:
                    await asyncio.sleep(0.1)
            if not parts:
                raise RuntimeError(f"topic {t!r} not found on {bootstrap}")
            tps += [TopicPartition(t, p) for p in sorted(parts)]
        if not tps:
            return out, bad
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, begins[tp])
        remaining = {tp for tp in tps if ends[tp] > begins[tp]}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, recs in batch.items():
                for rec in recs:
                    if rec.offset >= ends[tp]:
                        continue
                    try:
                        out.append(decode(rec.value))
                    except DecodeError:
                        bad += 1
            for tp in list(remaining):
                # The position, not the last record: transaction markers can sit at the end of a partition.
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        return out, bad
    finally:
        await consumer.stop()


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("wb") as fh:
        for r in rows:
            fh.write(orjson.dumps(r) + b"\n")


async def collect_run(cfg: AppConfig, bootstrap: str, out_dir: Path) -> dict[str, Any]:
    t = Topics(cfg.system.kafka.namespace)
    msgs, bad = await read_topics(bootstrap, [t.candles, t.audit, t.intents, t.events])
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
