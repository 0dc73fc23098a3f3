"""``qustream reprocess``: refuses while the worker group runs; moved offsets make a worker parse history again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

from bench.stack import committed_offsets
from producer_tools.reprocess import GroupActive, _commit_as_member, reprocess
from producer_tools.transport import open_sink, start_kafka_consumer
from schemas.settings import Settings
from tests.support import REPO, WorkerProcess, read_topic

QUERIES = ["red wooden sofa", "bar stool", "walnut desk", "grey sectional", "oak dining table", "bar stool"]


async def send(settings: Settings, prefix: str, timestamp_ms: int | None = None) -> list[str]:
    ids = []
    async with open_sink(settings) as sink:
        for n, query in enumerate(QUERIES):
            query_id = f"{prefix}-{n}"
            ids.append(query_id)
            await sink.send(query_id.encode(), json.dumps({"query": query, "query_id": query_id}).encode(), None,
                            timestamp_ms)
    return ids


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO)})


@pytest.mark.e2e
async def test_reprocess_refuses_while_running_then_history_is_parsed_again(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    hour_ago = int((datetime.now(UTC) - timedelta(hours=3)).timestamp() * 1000)
    old_ids = await send(settings, "old", timestamp_ms=hour_ago)  # before --since: must not come back
    worker = WorkerProcess(settings, tmp_path / "worker1.log")
    try:
        worker.wait_ready(timeout_s=240)
        recent_ids = await send(settings, "recent")
        first = await read_topic(settings, settings.topic_parsed, until=12, timeout_s=180)
        assert sorted(json.loads(r.value)["query_id"] for r in first) == sorted(old_ids + recent_ids)
        with pytest.raises(GroupActive) as refused:
            await reprocess(settings, datetime.now(UTC) - timedelta(hours=1))
        assert refused.value.members
        shown = await reprocess(settings, datetime.now(UTC) - timedelta(hours=1), dry_run=True)  # moves nothing
        assert shown.members and sum(move.to_reparse or 0 for move in shown.moves) == 6
    finally:
        worker.stop()
    # tansu keeps listing members that left (measured: still "Stable" 16 s after a clean stop), so with the
    # worker stopped the operator passes --force, as the refusal message says.
    before = await committed_offsets(settings)
    assert sum(offset or 0 for offset in before.values()) == 12  # the worker committed the whole input

    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    result = cli(settings, "reprocess", "--since", since, "--json", "--force")
    assert result.returncode == 0, result.stderr
    moves = json.loads(result.stdout.strip().splitlines()[-1])["moves"]
    assert sum(move["to_reparse"] for move in moves) == 6
    after = await committed_offsets(settings)
    assert sum(before[p] - after[p] for p in after) == 6  # type: ignore[operator]

    worker = WorkerProcess(settings, tmp_path / "worker2.log")
    try:
        worker.wait_ready(timeout_s=240)
        everything = await read_topic(settings, settings.topic_parsed, until=18, timeout_s=180)
        ids = [json.loads(r.value)["query_id"] for r in everything]
        assert sorted(ids) == sorted(old_ids + recent_ids * 2), worker.log_tail()
    finally:
        worker.stop()


@pytest.mark.e2e
async def test_a_join_that_cannot_take_every_partition_gives_up_on_stop_and_moves_nothing(
    make_settings: Callable[..., Settings]
) -> None:
    """``--force`` joins the group to commit; a member still in it keeps a partition, so the join never
    gets them all. SIGINT/SIGTERM (the stop event) must end the wait: a join in progress once held
    ``getmany`` past its own timeout, and the command ignored Ctrl-C."""
    settings = make_settings(partitions=2)
    await send(settings, "held")
    member = await start_kafka_consumer(
        settings, group_id=settings.app_id, session_timeout_ms=int(settings.broker_session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.broker_heartbeat_s * 1000), enable_auto_commit=False,
        partition_assignment_strategy=(RoundRobinPartitionAssignor,))
    member.subscribe([settings.topic_input])

    async def poll() -> None:
        while True:
            await member.getmany(timeout_ms=200)

    polling = asyncio.create_task(poll())
    stop = asyncio.Event()
    try:
        for _ in range(600):  # the member's own join: session_timeout / 2 on tansu
            if member.assignment():
                break
            await asyncio.sleep(0.1)
        assert member.assignment()
        before = await committed_offsets(settings)
        asyncio.get_running_loop().call_later(2.0, stop.set)
        partitions = {TopicPartition(settings.topic_input, p): 0 for p in range(settings.partitions)}
        with pytest.raises(RuntimeError, match="interrupted while joining group"):
            await _commit_as_member(settings, partitions, stop)
        assert await committed_offsets(settings) == before
    finally:
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
        await member.stop()
