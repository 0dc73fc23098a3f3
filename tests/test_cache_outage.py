"""A Redis outage, seen by the operator: failed lookups counted as errors, ``/ready`` saying degraded.

On real Redis servers: a closed port, and a private ``redis-server`` stopped and started again (never the
machine's own Redis on 6379).
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from schemas.settings import Settings
from schemas.spec import load_spec
from streams.local_stack import free_port, redis_command, spawn, stop_process
from streams.runtime import WorkerRuntime
from streams.telemetry import WorkerMetrics
from workers.cache import ParseCache, redis_client
from workers.core_step import BatchOutcome, InboundMessage, ParsePipeline
from workers.engine import ParseResult

SPEC = load_spec("furniture")


class InstantEngine:
    """Parses everything at once, in batches (``parse_batch``) or a row each (``submit``)."""

    model_id = "test-engine"
    grounding = "catalog"
    version = "test"
    spec = SPEC

    def parse_batch(self, queries: list[str]) -> list[ParseResult]:
        return [ParseResult({"item_type": q.split()[-1], "material": None, "color": None, "style": None})
                for q in queries]

    def submit(self, query: str) -> Future[ParseResult]:
        future: Future[ParseResult] = Future()
        future.set_result(self.parse_batch([query])[0])
        return future

    def warm_up(self) -> None:
        pass


def message(value: bytes, offset: int) -> InboundMessage:
    return InboundMessage(value=value, key=b"k", topic="in", partition=0, offset=str(offset), timestamp_ms=0,
                          headers={})


async def run_step(pipeline: ParsePipeline, batch: list[InboundMessage], path: str) -> list[BatchOutcome]:
    if path == "step runner":
        return [await pipeline.process(batch)]
    step = await pipeline.begin(batch)
    return [step.ready.outcome, *[part.outcome async for part in step.remaining()]]


@pytest.mark.parametrize(("path", "miss_batching"), [("step runner", "auto"), ("continuous", "continuous"),
                                                     ("continuous", "batch")])
async def test_lookups_that_failed_are_counted_as_errors_not_misses(path: str, miss_batching: str) -> None:
    settings = Settings(miss_batching=miss_batching, batch_linger_ms=0)
    dead = ParseCache(redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2), spec=SPEC, version="v1",
                      ttl_s=60)
    pipeline = ParsePipeline(settings, InstantEngine(), dead)
    metrics = WorkerMetrics()
    outcomes: list[BatchOutcome] = []
    # The first step's lookup fails; the second comes during the backoff (no call): both are errors.
    for first in (0, 4):
        batch = [message(b"oak table", first), message(b"Oak  TABLE", first + 1), message(b"pine bed", first + 2),
                 message(b"\xff", first + 3)]
        outcomes += await run_step(pipeline, batch, path)
    for outcome in outcomes:
        metrics.observe(outcome)
    events = [outcome.metrics for outcome in outcomes]

    # Every message came out (parsed uncached, or dead-lettered) and was counted once.
    assert sum(len(o.parsed) for o in outcomes) == 6 and sum(len(o.dead_letters) for o in outcomes) == 2
    assert sum(event.size for event in events) == 8
    # Two distinct queries per step, each a lookup that failed: errors, not misses.
    assert sum(event.cache_errors for event in events) == 4
    assert sum(event.cache_misses for event in events) == 0
    assert all(event.cache_hits + event.cache_misses + event.cache_errors == event.unique for event in events)
    assert not any(event.cache_available for event in events)
    sample = metrics.registry.get_sample_value
    assert sample("qustream_cache_requests_total", {"result": "error"}) == 4
    assert sample("qustream_cache_requests_total", {"result": "miss"}) == 0
    assert sample("qustream_inference_duration_seconds_count") >= 1  # the errored lookups went to the model
    await dead.close()


async def eventually_cache(runtime: WorkerRuntime, state: str, timeout_s: float = 5.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        checks = runtime.readiness()[1]
        if checks["cache"] == state or time.monotonic() > deadline:
            return checks
        await asyncio.sleep(0.05)


async def test_ready_reports_a_degraded_cache_until_redis_answers_again(tmp_path: Path) -> None:
    port = free_port()
    redis = spawn("redis", redis_command(port), port, tmp_path)
    runtime = WorkerRuntime(Settings(), engine=InstantEngine())  # type: ignore[arg-type]
    cache = runtime.cache = ParseCache(redis_client(f"redis://127.0.0.1:{port}/0", timeout_s=0.2), spec=SPEC,
                                       version="v1", ttl_s=60, backoff_s=0.2)
    runtime._started.set()
    runtime.set_transport(connected=True, assigned={("in", 0)})
    pipeline = ParsePipeline(Settings(), InstantEngine(), cache)
    try:
        assert not (await cache.get_many(["oak table"])).error
        assert runtime.readiness() == (True, {"model": "ok", "transport": "ok", "partitions": 1, "cache": "ok"})

        stop_process(redis)
        assert (await cache.get_many(["oak table"])).error
        assert runtime.readiness()[1]["cache"] == "degraded"
        # Past the backoff, with Redis still down and no call since: still degraded, and still ready
        # (parsing goes on uncached). The probes /ready starts meanwhile fail too.
        await asyncio.sleep(0.4)
        for _ in range(5):
            ready, checks = runtime.readiness()
            assert ready and checks["cache"] == "degraded"
            await asyncio.sleep(0.1)
        assert not cache.available
        outcome = await pipeline.process([message(b"pine bed", 0)])
        assert outcome.metrics.cache_available is False and outcome.metrics.cache_errors == 1

        # Redis back: with no traffic, /ready's own probe (a PING) finds it; lookups count again.
        redis = spawn("redis", redis_command(port), port, tmp_path)
        assert (await eventually_cache(runtime, "ok"))["cache"] == "ok"
        assert cache.available
        outcome = await pipeline.process([message(b"pine bed", 1)])
        assert outcome.metrics.cache_available is True
        assert (outcome.metrics.cache_errors, outcome.metrics.cache_misses) == (0, 1)
        assert json.loads(outcome.parsed[0].value)["cached"] is False
    finally:
        stop_process(redis)
        await cache.close()
