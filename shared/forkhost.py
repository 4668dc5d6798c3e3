"""Several profiles' workers from one start: a host process that has imported the service's code once forks one
child process per profile (`serve_forked`).

Each child is a whole worker of its own (its own consumer group, state, snapshots, heartbeat and metrics), started
exactly as `python -m services.<name> --profile P` would be, so a crash stays the child's: the host starts that
profile again (from its snapshot) and the other profiles run on. What the children share is what the host loaded
before the fork (the interpreter, aiokafka, pydantic and the project's modules): copy-on-write pages, which
is why a profile costs a fraction of a process (PSS; RSS counts the shared pages in every process). The host holds
no state, no connection and no credentials; a child reads its own (MPCTL_PROFILES_PER_PROCESS, docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

log = logging.getLogger("forkhost")

# A child that crashes this many times within RESTART_WINDOW_S ends the host (its supervisor sees the failure).
MAX_RESTARTS = 3
RESTART_WINDOW_S = 60.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def profiles_of(value: str) -> list[str]:
    """'a,b,c' -> ['a', 'b', 'c'] (one profile: a list of one)."""
    return [p.strip() for p in value.split(",") if p.strip()]


def argv_for(argv: Sequence[str], profile: str, profiles: Sequence[str], metrics_port: int = 0) -> list[str]:
    """The command line of one profile's worker: `--profile a,b,c` (or `--profile=a,b,c`) replaced by `profile`;
    with metrics on (`metrics_port` > 0), the i-th profile's worker serves them on metrics_port + i."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--profile":
            next(it, None)
            out += ["--profile", profile]
        elif a == "--kafka-user":
            # Principals in the order of the profiles (mpctl/stack.py): the worker's own.
            users = (next(it, None) or "").split(",")
            mine = users[list(profiles).index(profile)] if len(users) == len(profiles) else users[0]
            out += ["--kafka-user", mine]
        elif a.startswith("--profile="):
            out.append(f"--profile={profile}")
        else:
            out.append(a)
    if metrics_port:
        out += ["--metrics-port", str(metrics_port + list(profiles).index(profile))]
    return out


def profile_arg(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--profile" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--profile="):
            return a.split("=", 1)[1]
    return None


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _child(run_one: Callable[[str], int], profile: str) -> None:
    """In the forked child: never returns (os._exit), so the host's code after the fork never runs twice."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _die_with_parent()
        code = run_one(profile)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if stop.code is not None and not isinstance(stop.code, int):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 0
    except BaseException:
        logging.getLogger("forkhost").exception("worker for profile %s failed", profile)
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # nothing left to report it to
                stream.flush()
        os._exit(code)


def serve_forked(
    profiles: Sequence[str], run_one: Callable[[str], int], *, name: str, preload: Sequence[str] = ()
) -> int:
    """Fork a child running `run_one(profile)` per profile and wait for them; SIGTERM/SIGINT are passed on to
    every child. A child that exits while the host is not stopping is started again (at most MAX_RESTARTS times
    within RESTART_WINDOW_S; then the others are stopped and its exit code is the host's).

    `preload`: modules a worker imports only once it runs (its libraries' lazy imports), imported by the host so
    the children share them too."""
    if len(set(profiles)) != len(profiles):
        raise SystemExit(f"{name}: a profile is named twice in {','.join(profiles)}")
    for module in preload:
        importlib.import_module(module)
    # What the host imported stays out of the collector's reach, so the children's collections do not write to
    # (and un-share) those pages.
    gc.collect()
    gc.freeze()
    children: dict[int, str] = {}
    crashes: dict[str, list[float]] = {p: [] for p in profiles}
    stopping = False
    result = 0

    def spawn(profile: str) -> None:
        pid = os.fork()
        if pid == 0:
            _child(run_one, profile)
        children[pid] = profile

    def stop_all(signum: int, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for profile in profiles:
        spawn(profile)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        profile = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            result = result or (code if code > 0 else 0)
            continue
        if code == 0:  # stopped cleanly on its own (a SIGTERM sent to it alone): not a crash
            log.info("%s.%s stopped", name, profile)
            continue
        now = time.monotonic()
        recent = [t for t in crashes[profile] if now - t < RESTART_WINDOW_S] + [now]
        crashes[profile] = recent
        if len(recent) > MAX_RESTARTS:
            log.error(
                "%s.%s exited with %s %d times within %.0f s: stopping",
                name,
                profile,
                code,
                len(recent),
                RESTART_WINDOW_S,
            )
            result = code if code != 0 else 1
            stop_all(signal.SIGTERM)
            continue
        log.warning("%s.%s exited with %s: starting it again", name, profile, code)
        spawn(profile)
    return result
