"""A lost broker is noticed and reported by ``/ready`` whether or not the worker has traffic
(``streams.broker_watch``), and the Kafka clients' repeated log records are rate-limited
(``streams.logs.RepeatLimiter``)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.stack import isolated_settings
from streams.broker_watch import BrokerWatch
from streams.local_stack import free_port, spawn, stop_process, tansu_command
from streams.logs import RepeatLimiter
from streams.topics import ensure_topics
from tests.support import WorkerProcess, run

#: From the broker's last answer to ``transport: unreachable`` (``BrokerWatch``: 11 s), plus polling.
UNREACHABLE_WITHIN_S = 15.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def captured(limiter: RepeatLimiter) -> tuple[Callable[[str, str, tuple[Any, ...]], None], list[str]]:
    """Log through ``limiter`` as a handler filter; returns (log, the messages that passed)."""
    passed: list[str] = []

    def emit(logger: str, template: str, args: tuple[Any, ...], level: int = logging.ERROR) -> None:
        record = logging.LogRecord(logger, level, __file__, 1, template, args, None)
        if limiter.filter(record):
            passed.append(record.getMessage())

    return emit, passed


def test_repeats_from_client_libraries_are_rate_limited_with_a_count() -> None:
    clock = Clock()
    limiter = RepeatLimiter(window_s=30.0, clock=clock)
    emit, passed = captured(limiter)
    for i in range(500):  # aiokafka while the broker is down: many a second
        emit("aiokafka.conn", "Unable connect to node with id %s: %s", (111, f"refused {i}"))
        clock.now += 0.04
    assert passed == ["Unable connect to node with id 111: refused 0"]  # the first one always

    clock.now += 30.0
    emit("aiokafka.conn", "Unable connect to node with id %s: %s", (111, "refused again"))
    assert len(passed) == 2
    assert passed[1].startswith("Unable connect to node with id 111: refused again [499 more like this suppressed")


def test_distinct_messages_and_other_loggers_are_not_held_back() -> None:
    clock = Clock()
    limiter = RepeatLimiter(window_s=30.0, clock=clock)
    emit, passed = captured(limiter)
    emit("aiokafka.conn", "Unable connect to node with id %s: %s", (111, "x"))
    emit("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s", (111, "x"))
    emit("aiokafka", "Unable to update metadata from %s", ([111],))
    emit("kafka.conn", "Unable connect to node with id %s: %s", (111, "x"))  # same template, another logger
    emit("aiokafka.conn", "Unable connect to node with id %s: %s", (111, "x"), logging.WARNING)  # another level
    for _ in range(3):  # not a client library: never limited
        emit("streams.kafka_runner", "publish.retry", ())
        emit("aiokafkaesque", "same again", ())
    assert len(passed) == 11
    # A repeat suppressed: the count is in the next one of its kind, not in another message.
    emit("aiokafka.conn", "Unable connect to node with id %s: %s", (111, "x"))
    emit("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s", (111, "y"))
    assert len(passed) == 11


def test_each_handler_gets_the_same_answer() -> None:
    """One limiter on two handlers (stderr and the log file) counts each record once."""
    clock = Clock()
    limiter = RepeatLimiter(window_s=30.0, clock=clock)
    record = logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, "down %s", (1,), None)
    assert limiter.filter(record) and limiter.filter(record)
    again = logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, "down %s", (2,), None)
    assert not limiter.filter(again) and not limiter.filter(again)
    clock.now += 31
    last = logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, "down %s", (3,), None)
    assert limiter.filter(last)
    assert "[1 more like this suppressed" in last.getMessage()


class Transport:
    """What ``BrokerWatch`` asks of the runtime."""

    def __init__(self) -> None:
        self.connected: list[bool] = []

    def set_transport(self, *, connected: bool) -> None:
        self.connected.append(connected)


async def test_watch_probes_only_a_quiet_broker_and_reports_each_change_once() -> None:
    clock, transport, probes = Clock(), Transport(), []
    answers = iter([None, OSError("refused"), OSError("refused"), None])

    async def probe() -> None:
        probes.append(clock.now)
        answer = next(answers)
        if answer is not None:
            raise answer

    watch = BrokerWatch(transport, probe, quiet_s=5.0, retry_s=3.0, clock=clock)  # type: ignore[arg-type]
    await watch.check()
    clock.now += 4.0
    watch.answered()  # records fetched: nothing to probe for another quiet_s
    clock.now += 4.0
    await watch.check()
    assert probes == [] and transport.connected == []
    clock.now += 1.0
    await watch.check()  # quiet for 5 s: the broker answers the probe
    assert len(probes) == 1 and watch.unreachable_since is None and transport.connected == []
    clock.now += 5.0
    await watch.check()  # quiet again, and now it does not answer
    assert transport.connected == [False] and watch.unreachable_since is not None
    clock.now += 1.0
    await watch.check()  # within retry_s of the failed probe: no other attempt
    assert len(probes) == 2
    clock.now += 2.0
    await watch.check()
    assert len(probes) == 3 and transport.connected == [False, False]
    clock.now += 3.0
    await watch.check()  # back
    assert transport.connected == [False, False, True] and watch.unreachable_since is None


def _wait_for_ready(worker: WorkerProcess, want: Callable[[int, dict[str, Any]], bool], timeout_s: float,
                    what: str) -> tuple[float, dict[str, Any]]:
    began = time.monotonic()
    checks: dict[str, Any] = {}
    while time.monotonic() - began < timeout_s:
        try:
            status, body = worker.get("/ready", timeout=2.0)
            checks = json.loads(body)["checks"]
            if want(status, checks):
                return time.monotonic() - began, checks
        except OSError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{what} not within {timeout_s} s (last: {checks}); log:\n{worker.log_tail(8000)}")


@pytest.mark.e2e
@pytest.mark.parametrize("runner", ["batch", "faust"])
def test_ready_reports_a_stopped_broker_and_its_return(runner: str, redis_url: str, tmp_path: Path) -> None:
    """An idle worker (of each Kafka runner) on its own broker: the broker stops, ``/ready`` answers 503
    with ``transport: unreachable`` within the bound, the log has one WARNING and few aiokafka lines; a
    broker on the same address again, and ``/ready`` answers 200 once more."""
    port = free_port()
    broker = spawn("tansu", tansu_command(port), port, tmp_path / "tansu")
    settings = isolated_settings(f"127.0.0.1:{port}", redis_url, web_port=free_port(), kafka_runner=runner)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        stop_process(broker)
        took, checks = _wait_for_ready(worker, lambda status, checks: status == 503, UNREACHABLE_WITHIN_S,
                                       "/ready 503")
        assert checks["transport"] == "unreachable", checks
        time.sleep(10)  # the clients keep retrying: their log stays short
        status, body = worker.get("/ready")
        assert status == 503 and json.loads(body)["checks"]["transport"] == "unreachable"

        broker = spawn("tansu", tansu_command(port), port, tmp_path / "tansu")
        # memory:// storage forgets the topics; the worker creates them only at its start.
        run(ensure_topics(settings))
        _wait_for_ready(worker, lambda status, checks: status == 200 and checks["transport"] == "ok", 90.0,
                        "/ready 200 after the broker came back")
    finally:
        worker.stop()
        stop_process(broker)
    log = worker.log_path.read_text(errors="replace")
    assert log.count("broker.unreachable") == 1, log[-8000:]
    assert log.count("broker.reachable") >= 1, log[-8000:]
    assert log.count("Unable connect to node") <= 3, log[-8000:]
    print(f"unreachable after {took:.1f} s")
