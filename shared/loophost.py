"""Several profiles' workers on one event loop, each in its own task (`--shared-loop`, issue 16 item 3).

The forked host (shared/forkhost.py) gives each profile a process; this one gives each a task of one process,
so the profiles share the interpreter, its imported code and its event loop rather than copies of them. Each
profile still has its own worker object: its consumer group, state, snapshots, principal, heartbeat and
metrics. A worker whose run raises is logged and started again, from its snapshot, after a short pause; the
other profiles run on. A profile that fails more than `max_failures` times within `window_s` stops the whole
host (the others stop cleanly, with their final snapshots), so its supervisor sees the failure, as the forked
host does. What a shared process cannot contain is the process itself dying (a SIGKILL, the kernel's OOM
killer): that takes every profile in it, which the forked host does not.

Pure asyncio: no Kafka here, the runs are given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger("loophost")

# One profile's worker: run until `stop` is set, then return its exit code.
ProfileRun = Callable[[asyncio.Event], Awaitable[int]]


async def run_together(
    runs: Mapping[str, ProfileRun],
    stop: asyncio.Event,
    *,
    max_failures: int = 3,
    window_s: float = 60.0,
    pause_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Run every profile's worker until `stop` is set; 0 when all stopped cleanly, 1 when one failed more than
    `max_failures` times within `window_s` (the others were stopped) or returned non-zero."""
    if not runs:
        raise ValueError("no profile to run")
    failing: list[str] = []

    async def keep(profile: str, run: ProfileRun) -> int:
        failures: deque[float] = deque()
        while True:
            try:
                code = await run(stop)
            except Exception as err:
                now = clock()
                failures.append(now)
                while failures and now - failures[0] > window_s:
                    failures.popleft()
                if len(failures) > max_failures:
                    log.error(
                        "profile %s: its worker failed %d times within %.0f s (last: %s: %s): stopping the host",
                        profile,
                        len(failures),
                        window_s,
                        type(err).__name__,
                        err,
                        exc_info=err,
                    )
                    failing.append(profile)
                    stop.set()
                    return 1
                log.error(
                    "profile %s: its worker failed (%s: %s); starting it again in %.0f s, the other profiles run on",
                    profile,
                    type(err).__name__,
                    err,
                    pause_s,
                    exc_info=err,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause_s)
                if stop.is_set():
                    return 1
                continue
            if code != 0:
                log.error("profile %s: its worker exited with %d: stopping the host", profile, code)
                failing.append(profile)
                stop.set()
            return code

    codes = await asyncio.gather(*(keep(p, r) for p, r in runs.items()))
    return 1 if failing or any(codes) else 0
