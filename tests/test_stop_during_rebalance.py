"""A stop requested while the consumer group rebalances, or while the broker is down, ends promptly.

aiokafka waits for a group join's answer without a timeout of its own (``start``, ``getmany`` and
``stop`` all do), and Apache Kafka answers once every member rejoined, up to the rebalance timeout:
minutes. A rolling restart stops workers in exactly that state. tansu answers a join after half the
session timeout, which these tests make long, so a worker that waited for the join would take that long.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from streams.local_stack import WorkerProcess, free_port, spawn, stop_process, tansu_command
from streams.topics import ensure_topics
from tests.conftest import isolated_settings
from tests.support import run

pytestmark = pytest.mark.e2e


def _wait_for_line(worker: WorkerProcess, text: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in worker.log_path.read_text(errors="replace"):
            return
        if worker.process.poll() is not None:
            raise AssertionError(f"worker exited with {worker.process.returncode}; log:\n{worker.log_tail()}")
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} after {timeout_s} s; log:\n{worker.log_tail()}")


def _timed_stop(worker: WorkerProcess) -> tuple[int, float]:
    started = time.monotonic()
    code = worker.stop(timeout_s=120)
    return code, time.monotonic() - started


@pytest.mark.parametrize(("runner", "session_timeout_s", "most_s", "says"), [
    # The batch runner gives the join up at once, and leaving the group up after 5 s.
    ("batch", 40.0, 12.0, '"waiting_for": "the group\'s first join"'),
    # Faust's own stop waits for the join; the process ends at QUSTREAM_STOP_GRACE_S + 20 s.
    ("faust", 90.0, 35.0, '"event": "worker.stop_overrun"'),
])
def test_a_stop_during_the_first_join_does_not_wait_for_it(
    runner: str, session_timeout_s: float, most_s: float, says: str, broker: str, redis_url: str, tmp_path: Path
) -> None:
    settings = isolated_settings(broker, redis_url, kafka_runner=runner, broker_session_timeout_s=session_timeout_s,
                                 stop_grace_s=1.0)
    run(ensure_topics(settings))
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    _wait_for_line(worker, "worker.engine_ready")  # the consumer joins the group once the model is warm
    time.sleep(2)
    code, took_s = _timed_stop(worker)
    log = worker.log_tail(20_000)
    assert code == 0, log
    before_stop = log.split('"event": "worker.stopping"')[0]
    assert "partitions.assigned" not in before_stop, "the join was answered before the stop: the test proves nothing"
    assert "partitions.assigned" not in log, f"the stop waited for the join:\n{log}"
    assert says in log, log
    assert took_s < most_s, f"stop took {took_s:.1f} s, the join would have taken {session_timeout_s / 2} s:\n{log}"


def test_a_stop_during_a_rejoin_does_not_wait_for_it(broker: str, redis_url: str, tmp_path: Path) -> None:
    """A second worker joins; the first, rejoining, is stopped before the group answers."""
    settings = isolated_settings(broker, redis_url, broker_session_timeout_s=40.0, stop_grace_s=1.0)
    run(ensure_topics(settings))
    first = WorkerProcess(settings, tmp_path / "first.log")
    second: WorkerProcess | None = None
    try:
        first.wait_ready()
        second = WorkerProcess(settings.model_copy(update={"web_port": free_port(), "worker_id": "second"}),
                               tmp_path / "second.log")
        _wait_for_line(first, "partitions.revoked", timeout_s=120)  # the first worker is rejoining
        time.sleep(1)
        code, took_s = _timed_stop(first)
        log = first.log_tail(20_000)
        assert code == 0, log
        before_stop = log.split('"event": "worker.stopping"')[0]
        assert before_stop.count("partitions.assigned") == 1, "the rejoin was answered before the stop: proves nothing"
        assert log.count("partitions.assigned") == 1, f"the stop waited for the rejoin:\n{log}"
        assert '"waiting_for": "the group\'s rebalance"' in log, log
        assert took_s < 12.0, f"stop took {took_s:.1f} s, the rejoin would have taken up to 20 s:\n{log}"
    finally:
        first.stop()
        if second is not None:
            assert second.stop() == 0, second.log_tail()


@pytest.mark.parametrize(("runner", "most_s", "traceback_free"), [
    ("batch", 10.0, True),
    # Faust's own stop waits out its consumer thread's timeouts (and logs their tracebacks itself); the
    # process ends at the grace + 20 s.
    ("faust", 30.0, False),
])
def test_a_stop_while_the_broker_is_down_ends_cleanly(runner: str, most_s: float, traceback_free: bool,
                                                      redis_url: str, tmp_path: Path) -> None:
    """aiokafka's consumer ``stop`` cancels the fetches pending on a broker that went away, then awaits
    them: the CancelledError it raises must not end the worker with a traceback and exit code 1."""
    port = free_port()
    broker = spawn("tansu", tansu_command(port), port, tmp_path / "tansu")
    settings = isolated_settings(f"127.0.0.1:{port}", redis_url, web_port=free_port(), kafka_runner=runner,
                                 broker_session_timeout_s=10.0, stop_grace_s=1.0)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        stop_process(broker)
        time.sleep(3)  # the consumer's fetches now fail and wait to be retried
        code, took_s = _timed_stop(worker)
    finally:
        worker.stop()
        stop_process(broker)
    log = worker.log_tail(20_000)
    assert code == 0, log
    if traceback_free:
        assert "Traceback" not in log.split('"event": "worker.stopping"')[1], log
    assert took_s < most_s, f"stop took {took_s:.1f} s:\n{log}"
