"""What the execution worker's bootstrap needs for live mode, in three calls:

    live = await open_live_execution(profile_id, cfg, clock=clock, allow_plaintext=flag)   # credentials, ccxt
    await start_live(live, bootstrap=..., topics=..., route=..., client_id=...)  # rebuild, reconcile, publish
    handler = LiveHandler(live, write_ahead=await WriteAhead.started(bootstrap, route, client_id))
    ... StateMachineService(handle=handler.handle, ...) ...; finally: await handler.close()

Only this worker process decrypts the profile's entry of the credentials store (key from MPCTL_SECRETS_KEY_FILE,
a mounted secret, or MPCTL_SECRETS_PASSPHRASE: a worker never prompts). In a container the store is the profile's
export (`mpctl secrets export`): MPCTL_CREDENTIALS_STORE=/run/secrets/credentials.enc, its key at
/run/secrets/mpctl_secrets_key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from services.execution.ccxt_adapter import open_exchange, profile_products
from services.execution.credentials import (
    ENV_STORE,
    CredentialStore,
    NoCredentialsError,
    default_store_path,
    key_source_from_env,
    resolve_credentials,
)
from services.execution.live import LiveExecution
from shared.bus import KafkaAccess
from shared.clock import Clock, system_clock
from shared.config import AppConfig
from shared.kafka import Publisher, Route, read_tail, read_topics
from shared.messages import CandleClosed, Message
from shared.topics import Topics

log = logging.getLogger(__name__)


async def open_live_execution(
    profile_id: str,
    cfg: AppConfig,
    *,
    clock: Clock,
    clock_sleep: Callable[[float], Awaitable[None]] | None = None,
    allow_plaintext: bool = False,
    store_path: Path | None = None,
    api_base: str | None = None,
    poll_interval_s: float = 1.0,
    reference_lookup: Callable[[str], Awaitable[tuple[datetime, Decimal] | None]] | None = None,
    timeout_s: float = 10.0,
) -> LiveExecution:
    """Resolve the profile's credentials (store first; plaintext YAML only when allowed), open its ccxt adapter
    with markets loaded, and return the executor. Raises CredentialsError / HaltError with a clear reason."""
    profile = cfg.profiles[profile_id]
    path = store_path or default_store_path()
    store: CredentialStore | None = None
    if path.exists():
        store = CredentialStore.load(path)
        store.unlock(key_source_from_env(store.kdf_name))  # no prompt: a worker runs unattended
    try:
        creds = resolve_credentials(profile_id, profile, store, allow_plaintext)
    except NoCredentialsError as err:
        if store is None:  # name the path looked at: in a container, a secret mounted elsewhere or not at all
            raise NoCredentialsError(
                f"{err} (no store at {path}: set {ENV_STORE} or mount the export there)"
            ) from None
        raise
    port = await open_exchange(
        creds,
        retry_attempts=profile.trading_params.retry_attempts,
        products=profile_products(profile, cfg.system.quote_asset),
        api_base=api_base,
        timeout_s=timeout_s,
    )
    ex = cfg.system.execution
    return LiveExecution(
        profile_id,
        profile,
        port,
        clock=clock,
        clock_sleep=clock_sleep,
        poll_interval_s=poll_interval_s,
        desync_ms=(ex.desync_min_ms, ex.desync_max_ms),
        quote=cfg.system.quote_asset,
        price_band_pct=Decimal(str(ex.max_price_deviation_pct)),
        reference_lookup=reference_lookup,
        request_timeout_s=port.request_timeout_s,
    )


async def latest_closes(
    bootstrap: KafkaAccess, topic: str, *, records: int = 2000
) -> dict[str, tuple[datetime, Decimal]]:
    """The latest candle of each product, (open time, close), among the last `records` records of each partition
    of md.candles: the price band's reference on start (later, the candles the worker reads keep it current)."""
    out: dict[str, tuple[datetime, Decimal]] = {}
    for _, m in await read_tail(bootstrap, topic, records=records, now=system_clock):
        if isinstance(m, CandleClosed) and (m.product not in out or m.open_time >= out[m.product][0]):
            out[m.product] = (m.open_time, m.close)
    return out


async def start_live(
    live: LiveExecution,
    *,
    bootstrap: KafkaAccess,
    topics: Topics,
    route: Callable[[Message], list[Route]],
    client_id: str,
) -> list[Message]:
    """Before consuming: fold this profile's past events from orders.events into the executor, reconcile with the
    exchange, and publish what was missing and the account's snapshot (acknowledged before the consume loop
    starts)."""
    past, _ = await read_topics(bootstrap, [topics.events])
    live.apply_all(past)  # apply() keeps only this profile's order events
    if live.price_band is not None:
        for product, (at, close) in (await latest_closes(bootstrap, topics.candles)).items():
            live.note_close(product, at, close)
    missing = await live.reconcile()
    missing += await live.account_snapshot("start")
    if missing:
        pub = Publisher(bootstrap, client_id=client_id)
        await pub.start()
        try:
            for msg in missing:
                for topic, key, _broadcast in route(msg):
                    await pub.send(topic, msg, key=key)
            await pub.flush()
        finally:
            await pub.stop()
    return missing


class WriteAhead:
    """Publishes an order's `submitted` event, acknowledged, before the order is sent (LiveExecution.write_ahead)."""

    def __init__(
        self, bootstrap: KafkaAccess, route: Callable[[Message], list[Route]], client_id: str
    ) -> None:
        self._pub = Publisher(bootstrap, client_id=client_id)
        self._route = route

    @classmethod
    async def started(
        cls, bootstrap: KafkaAccess, route: Callable[[Message], list[Route]], client_id: str
    ) -> WriteAhead:
        wa = cls(bootstrap, route, client_id)
        await wa._pub.start()
        return wa

    async def __call__(self, msgs: list[Message]) -> None:
        for msg in msgs:
            for topic, key, _broadcast in self._route(msg):
                await self._pub.send(topic, msg, key=key)
        await self._pub.flush()

    async def stop(self) -> None:
        await self._pub.stop()


class LiveHandler:
    """`handle(message, partition)` for StateMachineService in live mode: ExecuteOrder goes to the exchange, and
    every `reconcile_every_s` the next message (a candle arrives each interval) also triggers a reconciliation,
    whose events are published with that message's outputs. An order reaching a final state is followed by an
    account snapshot; `account_loop` publishes one every `account_every_s` besides (through the write-ahead
    publisher, so it needs no message to arrive)."""

    def __init__(
        self,
        live: LiveExecution,
        *,
        write_ahead: WriteAhead | None = None,
        reconcile_every_s: float = 60.0,
        account_every_s: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.live = live
        self._write_ahead = write_ahead
        live.write_ahead = write_ahead
        self.every = reconcile_every_s
        self.account_every_s = account_every_s
        self._mono = monotonic
        self._last = monotonic()

    async def handle(self, msg: Message, partition: int = 0) -> list[Message]:
        out = await self.live.handle(msg, partition)
        if self._mono() - self._last >= self.every:
            self._last = self._mono()
            out += await self.live.reconcile()
            await self.live.refresh_markets()
        if self.live.has_final(out):
            out += await self.live.account_snapshot("order_final")
        return out

    async def account_loop(
        self, stop: asyncio.Event, publish: Callable[[list[Message]], Awaitable[None]]
    ) -> None:
        """Until `stop`: an account snapshot every `account_every_s`, handed to `publish`."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.account_every_s)
            if stop.is_set():
                return
            try:
                msgs = await self.live.account_snapshot("periodic")
                if msgs:
                    await publish(msgs)
            except Exception as err:  # the broker restarting: the next period tries again
                log.warning("account snapshot not published: %s: %s", type(err).__name__, err)

    async def close(self) -> None:
        if self._write_ahead is not None:
            await self._write_ahead.stop()
        await self.live.port.close()
