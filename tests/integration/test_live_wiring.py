"""Live execution's restart path on a real broker: the worker rebuilds what it knows from orders.events, reconciles
with the (peer) exchange, and publishes only what is missing: a fill that happened while it was down is counted
once, however many times the worker restarts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.execution.credentials import (
    ENV_KEY_FILE,
    CredentialStore,
    KeySource,
    StoredCredentials,
    new_key_file,
)
from services.execution.live_wiring import LiveHandler, open_live_execution, start_live
from services.execution.reconcile import KnownOrder, order_update
from shared.codec import encode
from shared.config import AppConfig
from shared.kafka import Publisher, Route, read_topics
from shared.messages import Message, OrderFilled, OrderUpdated
from shared.topics import Topics
from tests.bus import create_namespace
from tests.integration.test_exchange_adapters import app_config, execute
from tests.peer.coinbase_peer import CoinbasePeer

D = Decimal


def store_profile_a(
    peer: CoinbasePeer, api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> StoredCredentials:
    """profile_a's key at the peer, in an encrypted store (tmp_path/c.enc) opened with a key file, as a deployed
    worker has it; the key file is in the environment. Returns what was stored."""
    if api == "coinbase":
        a = peer.add_advanced_profile("profile_a")
        stored = StoredCredentials(SecretStr(a.key_name), SecretStr(a.private_pem))
    else:
        e = peer.add_exchange_profile("profile_a")
        stored = StoredCredentials(SecretStr(e.api_key), SecretStr(e.secret_b64), SecretStr(e.passphrase))
    kf = tmp_path / "key"
    new_key_file(kf)
    store = CredentialStore.create(tmp_path / "c.enc", KeySource.from_key_file(kf))
    store.put("profile_a", stored)
    store.save()
    monkeypatch.setenv(ENV_KEY_FILE, str(kf))
    return stored


def secret_pieces(stored: StoredCredentials) -> list[str]:
    """Every secret value and every long line of one (a PEM's body lines): none may appear in any output."""
    values = [stored.api_key.get_secret_value(), stored.secret.get_secret_value()]
    values += [stored.passphrase.get_secret_value()] if stored.passphrase else []
    return values + [
        line for v in values for line in v.splitlines() if len(line) > 20 and "-----" not in line
    ]


def route_for(t: Topics) -> Callable[[Message], list[Route]]:
    def route(msg: Message) -> list[Route]:
        return [
            (t.events, getattr(msg, "profile", None), False),
            (t.audit, getattr(msg, "profile", None), False),
        ]

    return route


@pytest.mark.parametrize("api", ["coinbase", "coinbaseexchange"])
async def test_restart_rebuilds_from_events_and_counts_a_fill_once(
    peer: CoinbasePeer,
    api: str,
    kafka_bootstrap: str,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg: AppConfig = app_config(order_timeout=30.0)
    t = Topics(namespace)
    await create_namespace(kafka_bootstrap, cfg, namespace)
    stored = store_profile_a(peer, api, tmp_path, monkeypatch)

    # Before the "crash": the worker published `submitted` and sent the order; the answer never came back.
    peer.fill_plan = []
    msg = execute("profile_a", f"wiring-{api}")
    first = await open_live_execution(
        "profile_a",
        cfg,
        clock=lambda: datetime.now(UTC),
        store_path=tmp_path / "c.enc",
        api_base=peer.base_url,
    )
    await first.port.create_order(
        msg.client_order_id, msg.product, msg.side, msg.size, limit_price=first.limit_price(msg)
    )
    await first.port.close()
    pub = Publisher(kafka_bootstrap, client_id="test")
    await pub.start()
    await pub.send(
        t.events, order_update(KnownOrder.from_execute(msg), "submitted", datetime.now(UTC)), key="profile_a"
    )
    await pub.stop()
    (po,) = peer.orders
    peer.fill(po, D("0.003"))
    peer.fill(po)  # two fills while the worker is down

    for _ in range(2):  # two restarts: the second must publish nothing
        live = await open_live_execution(
            "profile_a",
            cfg,
            clock=lambda: datetime.now(UTC),
            store_path=tmp_path / "c.enc",
            api_base=peer.base_url,
        )
        try:
            await start_live(
                live, bootstrap=kafka_bootstrap, topics=t, route=route_for(t), client_id="execution.profile_a"
            )
            # The redelivered command after restart produces nothing either.
            assert await LiveHandler(live).handle(msg) == []
        finally:
            await live.port.close()

    events, bad = await read_topics(kafka_bootstrap, [t.events])
    assert bad == 0
    fills = [m for m in events if isinstance(m, OrderFilled)]
    assert len(fills) == 2 and sum(f.size for f in fills) == po.size
    assert [u.status for u in events if isinstance(u, OrderUpdated)] == ["submitted", "filled"]
    assert len(peer.orders) == 1
    # No credential in any message the run put on the topics.
    published, _ = await read_topics(kafka_bootstrap, [t.events, t.audit])
    pieces = secret_pieces(stored)
    blob = b"\n".join(encode(m) for m in published).decode()
    assert published and not [p for p in pieces if p in blob]
