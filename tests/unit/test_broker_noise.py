"""A broker outage in the logs (shared/broker_noise.py): one line when it goes, a summary a minute, one line when
it is back; everything else passes."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from shared.broker_noise import BrokerNoiseFilter, OutageLog, install_broker_noise_filter, is_connection_noise

ROOT = Path(__file__).resolve().parents[2]

# What aiokafka 0.14 logged while a broker was stopped for 16 s (1,543 lines from one consumer, one producer
# and a heartbeat producer).
OUTAGE_LINES = [
    ("aiokafka", "Unable connect to node with id 1: [Errno 111] Connect call failed ('127.0.0.1', 19092)"),
    ("aiokafka", "Unable to update metadata from [1]"),
    ("aiokafka", 'Unable connect to "127.0.0.1:19092": [Errno 111] Connect call failed'),
    ("aiokafka", "Unable to request metadata from node with id 1: KafkaConnectionError()"),
    (
        "aiokafka.consumer.fetcher",
        "Failed fetch messages from 1: NodeNotReadyError: Attempt to send a request to node which is not ready "
        "(node id 1).",
    ),
    (
        "aiokafka.consumer.group_coordinator",
        "Group Coordinator Request failed: NodeNotReadyError: Attempt to send a request to node which is not ready",
    ),
    ("aiokafka.producer.sender", "Got error produce response: NodeNotReadyError: Attempt to send a request"),
    (
        "aiokafka.consumer.fetcher",
        "Failed fetch messages from 1: KafkaConnectionError: Connection at 127.0.0.1:19092 closed",
    ),
    (
        "aiokafka.consumer.group_coordinator",
        "Error sending HeartbeatRequest to node 1 [NodeNotReadyError: Attempt to send a request] -- marking "
        "coordinator dead",
    ),
]

# News, not noise: a rebalance, a paused member, a refused request, and the services' own lines.
NOT_NOISE = [
    ("aiokafka.consumer.group_coordinator", "Heartbeat failed for group g because it is rebalancing"),
    ("aiokafka.consumer.group_coordinator", "Marking the coordinator dead (node 1)for group g."),
    (
        "aiokafka.consumer.group_coordinator",
        "OffsetCommit failed for group g due to group error ([Error 25] UnknownMemberIdError: g), will rejoin",
    ),
    ("aiokafka.cluster", "Topic t is not authorized for this client"),
    ("heartbeat", "heartbeat to ns.heartbeats failed (NodeNotReadyError: ...); retrying"),
    ("shared.admit", "execution.a dead-lettered t[0]@3: Unable connect to the moon"),
    ("kafkaesque", "Unable connect to node with id 1"),
]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(("logger", "message"), OUTAGE_LINES)
def test_every_line_of_a_real_outage_is_connection_noise(logger: str, message: str) -> None:
    assert is_connection_noise(logger, message)


@pytest.mark.parametrize(("logger", "message"), NOT_NOISE)
def test_rebalances_refusals_and_the_services_own_lines_are_not_noise(logger: str, message: str) -> None:
    assert not is_connection_noise(logger, message)


def test_first_error_gives_one_line_quoting_it_and_the_next_ones_none() -> None:
    clock = Clock()
    out = OutageLog(clock)
    first = out.error("Unable connect to node with id 1: [Errno 111] Connect call failed")
    assert len(first) == 1
    assert first[0].startswith("Kafka broker unreachable: Unable connect to node with id 1: [Errno 111]")
    assert "a summary every 60 s" in first[0]
    for _ in range(999):
        clock.t += 0.05  # 20 a second, 50 s in all
        assert out.error("Unable to update metadata from [1]") == []
    assert out.down and out.total == 1000


def test_errors_that_go_on_give_a_summary_a_minute_with_their_count() -> None:
    clock = Clock()
    out = OutageLog(clock)
    out.error("Unable connect to node with id 1")
    lines: list[str] = []
    for _ in range(8 * 60 * 4):  # 8 minutes at 4 errors a second
        clock.t += 0.25
        lines += out.error("Unable connect to node with id 1")
    assert lines == [
        f"240 connection errors to the broker in the last 60 s (unreachable for {m} min 0 s)"
        for m in range(1, 9)
    ]


def test_back_is_told_once_after_the_quiet_time_with_the_outage_total() -> None:
    clock = Clock()
    out = OutageLog(clock, quiet_s=5.0)
    out.error("Unable connect to node with id 1")
    for _ in range(150):
        clock.t += 1.0
        out.error("Unable connect to node with id 1")
    clock.t += 4.9
    assert out.tick() == []  # errors a few seconds apart are still the same outage
    clock.t += 0.2
    assert out.tick() == [
        "Kafka broker reachable again (no connection error for 5 s): unreachable for 2 min 30 s, "
        "151 connection errors in all"
    ]
    assert not out.down
    assert out.tick() == []
    clock.t += 600
    again = out.error("Unable to update metadata from [1]")
    assert len(again) == 1 and again[0].startswith("Kafka broker unreachable: Unable to update metadata")


def test_an_error_after_a_quiet_time_no_tick_saw_closes_the_outage_before_opening_the_next() -> None:
    clock = Clock()
    out = OutageLog(clock, quiet_s=5.0)
    out.error("Unable connect to node with id 1")
    clock.t += 30
    lines = out.error("Unable connect to node with id 1")
    assert [line.split(" (")[0].split(":")[0] for line in lines] == [
        "Kafka broker reachable again",
        "Kafka broker unreachable",
    ]


def test_long_error_text_is_cut() -> None:
    [line] = OutageLog(Clock()).error("Unable connect to node with id 1: " + "x" * 5000)
    assert len(line) < 500 and "x..." in line


@pytest.mark.parametrize(("field", "value"), [("summary_every_s", 0.0), ("quiet_s", -1.0)])
def test_timings_must_be_positive(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"{field} must be > 0, got {value}"):
        OutageLog(Clock(), **{field: value})  # type: ignore[arg-type]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@pytest.fixture
def handler() -> tuple[Lines, BrokerNoiseFilter, Clock]:
    clock = Clock()
    h = Lines()
    f = BrokerNoiseFilter(clock=clock, ticker=False)
    h.addFilter(f)
    root = logging.getLogger()
    root.addHandler(h)
    try:
        yield h, f, clock  # type: ignore[misc]
    finally:
        root.removeHandler(h)


def test_a_filtered_handler_tells_a_two_minute_outage_in_four_lines_and_passes_the_rest(
    handler: tuple[Lines, BrokerNoiseFilter, Clock],
) -> None:
    h, f, clock = handler
    logging.getLogger("shared.kafka").warning("before")
    for i in range(
        2 * 60 * 16 + 1
    ):  # two minutes at 16 errors a second, from every library logger of the outage
        clock.t += 0.0625
        name, message = OUTAGE_LINES[i % len(OUTAGE_LINES)]
        logging.getLogger(name).error("%s", message)
    logging.getLogger("aiokafka.consumer.group_coordinator").warning(
        "Heartbeat failed for group g because it is rebalancing"
    )
    clock.t += 6
    f.tick()
    logging.getLogger("shared.kafka").warning("after")
    assert f.dropped == 1921
    assert [line.split(":")[0] for line in h.lines] == [
        "WARNING shared.kafka",
        "WARNING shared.broker_noise",  # unreachable
        "WARNING shared.broker_noise",  # the first minute's summary
        "WARNING shared.broker_noise",  # the second's
        "WARNING aiokafka.consumer.group_coordinator",  # news passes during the outage too
        "WARNING shared.broker_noise",  # back
        "WARNING shared.kafka",
    ], h.lines
    assert "960 connection errors to the broker in the last 60 s (unreachable for 1 min 0 s)" in h.lines[2]
    assert "960 connection errors to the broker in the last 60 s (unreachable for 2 min 0 s)" in h.lines[3]
    assert "unreachable for 2 min 0 s, 1921 connection errors in all" in h.lines[5]


def test_install_is_once_per_handler() -> None:
    h = Lines()
    assert install_broker_noise_filter(h) is install_broker_noise_filter(h)
    assert len(h.filters) == 1


def test_a_service_process_logs_an_outage_in_two_lines() -> None:
    """The logging every service sets up (shared.runtime.setup_logging) has the filter: 5,000 connection errors
    and a return give two lines on stderr, the service's own line passes."""
    code = (
        "import logging, time\n"
        "from shared.runtime import setup_logging\n"
        "import shared.broker_noise as bn\n"
        "setup_logging('ingest', 'INFO')\n"
        "[f] = [f for h in logging.root.handlers for f in h.filters if isinstance(f, bn.BrokerNoiseFilter)]\n"
        "f.outage.quiet_s = 1.0\n"
        "for _ in range(5000):\n"
        "    logging.getLogger('aiokafka').error('Unable connect to node with id 1: [Errno 111] Connect call failed')\n"
        "logging.getLogger('services.ingest').info('still working')\n"
        "time.sleep(2.5)\n"  # the ticker thread tells the return
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 3, lines
    assert "WARNING ingest shared.broker_noise: Kafka broker unreachable: Unable connect" in lines[0]
    assert "INFO ingest services.ingest: still working" in lines[1]
    assert "Kafka broker reachable again" in lines[2] and "5000 connection errors in all" in lines[2]


def test_an_mpctl_command_prints_an_outage_in_two_lines() -> None:
    """The commands set up no logging (Python prints warnings on stderr); `mpctl.cli.main` filters that too, so a
    demo's own Kafka clients print an outage as two lines on the operator's terminal."""
    code = (
        "import logging, time\n"
        "from mpctl.cli import setup_cli_logging\n"
        "import shared.broker_noise as bn\n"
        "setup_cli_logging()\n"
        "setup_cli_logging()\n"  # once is enough: a second call changes nothing
        "[f] = logging.lastResort.filters\n"
        "f.outage.quiet_s = 1.0\n"
        "for _ in range(5000):\n"
        "    logging.getLogger('aiokafka.consumer.fetcher').error('Failed fetch messages from 1: NodeNotReadyError')\n"
        "logging.getLogger('mpctl.router').warning('a warning of its own')\n"
        "time.sleep(2.5)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stderr.splitlines() == [
        "Kafka broker unreachable: Failed fetch messages from 1: NodeNotReadyError (further connection errors are "
        "counted: a summary every 60 s, one line when it answers again)",
        "a warning of its own",
        "Kafka broker reachable again (no connection error for 1 s): unreachable for 0 s, 5000 connection errors "
        "in all",
    ], done.stderr
