"""No consumer on a step's way from candle to order keeps a default long poll (issue 16): the consumers the
services build (not timed) wait at most shared.kafka.FETCH_MAX_WAIT_MS in a fetch (the registry and the arbiter,
once each), or WORKER_FETCH_MAX_WAIT_MS (the per-profile workers, 2P of them: a shorter wait is CPU times 2P). A
request the client sends to the broker besides its fetch waits behind an idle fetch on the same connection, so a
long poll there delays it; the workers send none per batch there."""

from __future__ import annotations

import inspect
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from services.arbiter.bootstrap import bootstrap as arbiter_bootstrap
from services.execution.bootstrap import bootstrap as execution_bootstrap
from services.registry.bootstrap import registry_consumer
from services.strategy.bootstrap import bootstrap as strategy_bootstrap
from shared.bus import KafkaAccess
from shared.kafka import FETCH_MAX_WAIT_MS, WORKER_FETCH_MAX_WAIT_MS, Publisher
from shared.runtime import ServiceSettings

TEMPLATE = Path(__file__).resolve().parents[2] / "config" / "coinbase_profiles.yaml"
UNUSED = KafkaAccess(servers="127.0.0.1:1")  # nothing connects: the consumers are built, never started
DEFAULT_WAIT_MS = inspect.signature(AIOKafkaConsumer).parameters["fetch_max_wait_ms"].default


def settings(**extra: str) -> ServiceSettings:
    return ServiceSettings(config_path=TEMPLATE, kafka=UNUSED, **extra)  # type: ignore[arg-type]


def fetch_wait_ms(consumer: AIOKafkaConsumer) -> int:
    wait: int = consumer._fetch_max_wait_ms  # noqa: SLF001 - what start() gives the fetcher
    return wait


async def hot_path_consumers() -> dict[str, AIOKafkaConsumer]:
    """Every consumer of the registry, the arbiter, a strategy worker and an execution worker, as each builds
    it for its run."""
    built: dict[str, AIOKafkaConsumer] = {"registry (md.candles + commands)": registry_consumer(UNUSED)}
    observer, member = arbiter_bootstrap(settings()).consumers()
    built["arbiter observer"], built["arbiter member"] = observer, member
    execution = execution_bootstrap(settings(profile="profile_a"))
    built["execution"] = execution.runner.consume_loop(Publisher(UNUSED, client_id="t"), None).consumer
    worker = strategy_bootstrap(settings(profile="profile_a"))
    built["strategy"] = worker.consume_loop(Publisher(UNUSED, client_id="t"), None).consumer
    return built


async def test_no_consumer_on_the_hot_path_keeps_the_default_long_poll() -> None:
    assert DEFAULT_WAIT_MS == 500  # aiokafka's
    assert 0 < FETCH_MAX_WAIT_MS <= 50
    assert FETCH_MAX_WAIT_MS <= WORKER_FETCH_MAX_WAIT_MS <= 500
    built = await hot_path_consumers()
    try:
        waits = {name: fetch_wait_ms(c) for name, c in built.items()}
        workers = {"execution", "strategy"}
        assert waits == {n: WORKER_FETCH_MAX_WAIT_MS if n in workers else FETCH_MAX_WAIT_MS for n in built}
    finally:
        for c in built.values():
            await c.stop()  # never started: releases the client
