"""One live execution worker of profile_a in its own process, for test_zombie_worker.py: the real service
(bootstrap, consumer group, fence, ccxt against the peer) with one test hook, a pause at a chosen point of a send.

    python -m tests.integration.zombie_worker NAMESPACE BOOTSTRAP API_BASE MARKER_DIR STAGE

The first worker of the group to reach STAGE (after_lookup, after_fence) for an order stops itself with SIGSTOP,
as a process paused by the kernel, a VM or a debugger is: no heartbeat, no request, until the test sends SIGCONT.
It writes its pid to MARKER_DIR/paused first (created exclusively, so only one worker pauses) and
MARKER_DIR/resumed after. The credentials come from MPCTL_CREDENTIALS_STORE and MPCTL_SECRETS_KEY_FILE.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from mpctl.infra import access_from_env
from services.execution.bootstrap import ExecutionOptions, bootstrap
from services.execution.live import PauseStage
from shared.config import AppConfig
from shared.runtime import ServiceSettings
from tests.integration.test_exchange_adapters import app_config
from tests.integration.test_execution_metrics import in_namespace

PID = "profile_a"
# Short, so a test waits seconds for the pause to outlive the session; the invariant holds as in production:
# 6 s session - 1 s heartbeat interval - 2 s request timeout leaves the ownership check 3 s.
SESSION_TIMEOUT_MS = 6_000
EXCHANGE_TIMEOUT_S = 2.0


def zombie_config(namespace: str) -> AppConfig:
    base = app_config(order_timeout=30.0)
    # The test publishes the candles itself (a replay, event time): live orders go to the loopback peer.
    replay = base.system.market_data.model_copy(update={"source": "replay"})
    return in_namespace(base, namespace, mode="live", market_data=replay)


async def main(namespace: str, bootstrap_: str, api_base: str, marker_dir: str, stage: str) -> int:
    markers = Path(marker_dir)

    async def pause(client_order_id: str, at: PauseStage) -> None:
        if at != stage:
            return
        try:
            fd = os.open(markers / "paused", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another worker is the paused one
        os.write(fd, f"{os.getpid()} {client_order_id}".encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGSTOP)
        logging.getLogger("zombie").warning("RESUMED after the pause at %s of %s", at, client_order_id)
        (markers / "resumed").write_text(str(os.getpid()))

    # Its principal from the environment, as a container gets it (KAFKA_USERNAME, KAFKA_PASSWORD_FILE, ...).
    settings = ServiceSettings(
        kafka=access_from_env(bootstrap_, os.environ), namespace=namespace, profile=PID
    )
    svc = bootstrap(
        settings,
        ExecutionOptions(exchange_api_base=api_base),
        overrides={
            "config": zombie_config(namespace),
            "pause_before_send": pause,
            "session_timeout_ms": SESSION_TIMEOUT_MS,
            "exchange_timeout_s": EXCHANGE_TIMEOUT_S,
        },
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    return await svc.run(stop)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=f"{os.getpid()} %(name)s %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    sys.exit(asyncio.run(main(*sys.argv[1:6])))
