"""Several profiles' workers on one event loop (shared/loophost.py): each runs until the stop, a failed one is
started again alone while the others run on, one failing too often stops the host and the others cleanly."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shared.loophost import ProfileRun, run_together


class Worker:
    """A profile's worker: counts its starts, fails its first `fails` runs, else runs until the stop."""

    def __init__(self, fails: int = 0) -> None:
        self.fails = fails
        self.starts = 0
        self.stopped_cleanly = 0

    async def run(self, stop: asyncio.Event) -> int:
        self.starts += 1
        if self.starts <= self.fails:
            await asyncio.sleep(0)
            raise RuntimeError(f"run {self.starts} failed")
        await stop.wait()
        self.stopped_cleanly += 1
        return 0


async def _run_for(runs: dict[str, ProfileRun], seconds: float, **kw: float) -> tuple[int, asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_together(runs, stop, **kw))
    await asyncio.sleep(seconds)
    stop.set()
    return await asyncio.wait_for(task, 5), stop


async def test_a_failed_worker_is_started_again_alone_and_the_others_run_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, c = Worker(), Worker(fails=2), Worker()
    code, _ = await _run_for({"a": a.run, "b": b.run, "c": c.run}, 0.3, pause_s=0.01)
    assert code == 0
    assert (a.starts, b.starts, c.starts) == (1, 3, 1)  # b failed twice, started again each time
    assert (a.stopped_cleanly, b.stopped_cleanly, c.stopped_cleanly) == (1, 1, 1)
    assert caplog.text.count("profile b: its worker failed (RuntimeError: run") == 2
    assert "the other profiles run on" in caplog.text


async def test_a_worker_failing_too_often_stops_the_host_and_the_others_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    a, b = Worker(), Worker(fails=100)
    stop = asyncio.Event()
    code = await asyncio.wait_for(
        run_together({"a": a.run, "b": b.run}, stop, max_failures=3, window_s=60, pause_s=0.01), 5
    )
    assert code == 1 and stop.is_set()  # no one set the stop but the host
    assert b.starts == 4  # the fourth failure within the window is one too many
    assert a.stopped_cleanly == 1  # a stopped through the stop event, its final snapshot taken
    assert "profile b: its worker failed 4 times within 60 s" in caplog.text


async def test_failures_further_apart_than_the_window_never_stop_the_host() -> None:
    now = [0.0]
    b = Worker(fails=10)

    async def run(stop: asyncio.Event) -> int:
        now[0] += 100.0  # each failure a long time after the one before
        return await b.run(stop)

    code, _ = await _run_for(
        {"b": run}, 0.3, max_failures=3, window_s=60, pause_s=0.001, clock=lambda: now[0]
    )
    assert code == 0 and b.starts == 11 and b.stopped_cleanly == 1


async def test_a_worker_exiting_with_an_error_code_stops_the_host() -> None:
    a = Worker()

    async def bad(stop: asyncio.Event) -> int:
        return 2

    stop = asyncio.Event()
    assert await asyncio.wait_for(run_together({"a": a.run, "b": bad}, stop), 5) == 1
    assert a.stopped_cleanly == 1


async def test_no_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="no profile"):
        await run_together({}, asyncio.Event())
