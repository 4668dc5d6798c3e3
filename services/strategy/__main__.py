"""python -m services.strategy --profile ID[,ID...] --config FILE --bootstrap HOST:PORT [--metrics-port P]
[--metrics-addr ADDR]

Several profiles (`--profile a,b,c`, MPCTL_PROFILES_PER_PROCESS): one process imports the worker's code
once and forks one worker process per profile (shared/forkhost.py); each is the worker `--profile a` would start.
With `--shared-loop` (MPCTL_SHARED_LOOP=1) the profiles' workers run in this one process instead, each a task of
its event loop (shared/loophost.py)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from services.strategy.bootstrap import bootstrap
from shared.runtime import (
    add_metrics_args,
    add_shared_loop_arg,
    base_parser,
    main_entry,
    run_service,
    serve_hosted,
    serve_shared_loop,
    settings_from_args,
)

# What a worker imports once it runs (the snapshots' Redis client, the heartbeat): loaded by a host before it
# forks, so its workers share them.
PRELOAD = ("redis.asyncio", "shared.heartbeat", "concurrent.futures.thread", "queue")


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    p = base_parser("strategy", needs_profile=True)
    add_metrics_args(
        p,
        "0: off, the default; env MPCTL_STRATEGY_METRICS_PORT",
        default_port=int(os.environ.get("MPCTL_STRATEGY_METRICS_PORT", "0")),
    )
    add_shared_loop_arg(p)
    shared = serve_shared_loop("strategy", p, args_in, lambda settings: bootstrap(settings).run)
    if shared is not None:
        return shared
    hosted = serve_hosted("strategy", p, args_in, main, PRELOAD)
    if hosted is not None:
        return hosted
    args = main_entry(args_in, "strategy", p)
    return run_service(bootstrap(settings_from_args(args)).run)


if __name__ == "__main__":
    sys.exit(main())
