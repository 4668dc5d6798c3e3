"""Real services in this process (arbiter, execution workers) over the test broker, for the operating tests
(health, status, router). They are the production classes, started as asyncio tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from services.arbiter.bootstrap import bootstrap as arbiter_bootstrap
from services.execution.bootstrap import bootstrap as execution_bootstrap
from shared.config import AppConfig, load_config
from shared.kafka import Publisher
from shared.messages import Message
from shared.runtime import ServiceSettings
from shared.topics import Topics
from tests.bus import create_namespace

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "config" / "coinbase_profiles.yaml"


def ns_config(namespace: str) -> AppConfig:
    cfg = load_config(TEMPLATE)
    kafka = cfg.system.kafka.model_copy(update={"namespace": namespace})
    return cfg.model_copy(update={"system": cfg.system.model_copy(update={"kafka": kafka})})


async def create_topics(bootstrap: str, cfg: AppConfig) -> None:
    await create_namespace(bootstrap, cfg)


async def publish(
    bootstrap: str, items: list[tuple[str, Message, str | None]], *, broadcast: bool = False
) -> None:
    pub = Publisher(bootstrap, client_id="ops-test")
    await pub.start()
    try:
        for topic, msg, key in items:
            if broadcast:
                await pub.send_to_all_partitions(topic, msg)
            else:
                await pub.send(topic, msg, key=key)
        await pub.flush()
    finally:
        await pub.stop()


@contextlib.asynccontextmanager
async def running(
    bootstrap: str, namespace: str, *, executions: tuple[str, ...] = ("profile_a",)
) -> AsyncIterator[Topics]:
    settings = ServiceSettings(config_path=TEMPLATE, kafka=bootstrap, namespace=namespace)
    cfg = ns_config(namespace)
    stop = asyncio.Event()
    mains: list[Callable[[asyncio.Event], Awaitable[int]]] = [
        arbiter_bootstrap(settings, overrides={"config": cfg}).run
    ]
    for pid in executions:
        s = settings.model_copy(update={"profile": pid})
        mains.append(execution_bootstrap(s, overrides={"config": cfg}).run)
    tasks = [asyncio.create_task(m(stop)) for m in mains]
    try:
        yield Topics(namespace)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 45.0, what: str = "condition"
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f} s")
        await asyncio.sleep(0.3)
