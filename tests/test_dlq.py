"""``qustream dlq inspect|redrive`` on the real broker / Redis, and a redrive through a real worker."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from producer_tools.dlq import RedriveCheckpoint, inspect, read_dead_letters, redrive
from producer_tools.transport import drain, open_sink, open_source
from schemas.events import ATTEMPTS_HEADER, DeadLetterReason
from schemas.settings import Settings
from tests.support import WorkerProcess, read_topic


def letter(query_id: str, query: str, stage: str, error_class: str, attempts: int = 1) -> tuple[bytes, bytes, list]:
    reason = DeadLetterReason(stage=stage, error_class=error_class, message=f"{error_class} for {query_id}",  # type: ignore[arg-type]
                              source_topic="in", source_partition=0, source_offset="1", attempts=attempts)
    value = json.dumps({"query": query, "query_id": query_id}).encode()
    return query_id.encode(), value, reason.to_headers()


async def put_letters(settings: Settings, letters: list[tuple[bytes, bytes, list]]) -> None:
    async with open_sink(settings, "dlq") as sink:
        for key, value, headers in letters:
            await sink.send(key, value, headers)


async def read_input(settings: Settings) -> list:
    async with open_source(settings, ["input"]) as source:
        return await drain(source, idle_s=0.6)


@pytest.mark.parametrize("transport", ["kafka", "redis"])
async def test_redrive_filters_limits_and_never_twice(make_settings: Callable[..., Settings], transport: str) -> None:
    settings = make_settings(transport=transport, max_attempts=3)
    await put_letters(settings, [
        letter("t1", "oak desk", "infer", "TimeoutError"),
        letter("v1", "", "validate", "EmptyQuery"),
        letter("t2", "bar stool", "infer", "TimeoutError", attempts=2),
        letter("t3", "sofa", "infer", "TimeoutError", attempts=3),  # used its attempts: stays put
        letter("o1", "lamp", "infer", "RuntimeError"),
        letter("v2", "", "validate", "EmptyQuery"),
    ])

    report = await inspect(settings, idle_s=0.6)
    counts = {(b.stage, b.error_class): b.count for b in report.buckets}
    assert report.total == 6
    assert counts == {("infer", "TimeoutError"): 3, ("validate", "EmptyQuery"): 2, ("infer", "RuntimeError"): 1}

    dry = await redrive(settings, idle_s=0.6, stage="infer", error_class="TimeoutError", dry_run=True)
    assert (dry.redriven, dry.over_limit) == (2, 1)
    assert await read_input(settings) == []

    first = await redrive(settings, idle_s=0.6, stage="infer", error_class="TimeoutError")
    assert (first.matched, first.redriven, first.over_limit) == (3, 2, 1)
    again = await redrive(settings, idle_s=0.6, stage="infer", error_class="TimeoutError")
    assert (again.redriven, again.already_redriven, again.over_limit) == (0, 2, 1)

    # An unfiltered redrive afterwards takes the rest, and not the infer/TimeoutError letters again.
    rest = await redrive(settings, idle_s=0.6)
    assert (rest.redriven, rest.already_redriven, rest.over_limit) == (3, 2, 1)
    assert (await redrive(settings, idle_s=0.6)).redriven == 0

    records = await read_input(settings)
    by_id = {json.loads(record.value)["query_id"]: record for record in records}
    assert sorted(by_id) == ["o1", "t1", "t2", "v1", "v2"]
    assert len(records) == 5
    assert by_id["t1"].headers[ATTEMPTS_HEADER] == b"2"
    assert by_id["t2"].headers[ATTEMPTS_HEADER] == b"3"
    assert by_id["t1"].headers["qustream.redrive.from"].startswith(settings.topic_dlq.encode()
                                                                    if transport == "kafka" else
                                                                    settings.stream_dlq.encode())
    assert sum(b.redriven_before for b in (await inspect(settings, idle_s=0.6)).buckets) == 5


@pytest.mark.parametrize("transport", ["kafka", "redis"])
async def test_letter_over_the_limit_is_reported_so_in_every_run(make_settings: Callable[..., Settings],
                                                                 transport: str) -> None:
    """The audit's case: one letter that keeps failing, redriven until it has used its attempts."""
    settings = make_settings(transport=transport, max_attempts=3)
    await put_letters(settings, [letter("v1", "oak desk", "validate", "EmptyQuery")])
    reports = []
    seen = 0
    for _ in range(4):
        reports.append(await redrive(settings, idle_s=0.6, stage="validate"))
        # As a worker that fails again would: the redriven message comes back as a letter with its attempts.
        inputs = await read_input(settings)
        await put_letters(settings, [letter("v1", "oak desk", "validate", "EmptyQuery",
                                            attempts=int(record.headers[ATTEMPTS_HEADER])) for record in inputs[seen:]])
        seen = len(inputs)
    counts = [(r.redriven, r.already_redriven, r.over_limit) for r in reports]
    assert counts == [(1, 0, 0), (1, 1, 0), (0, 2, 1), (0, 2, 1)]
    [bucket] = (await inspect(settings, idle_s=0.6)).buckets
    assert (bucket.count, bucket.redriven_before) == (3, 2)


@pytest.mark.parametrize("transport", ["kafka", "redis"])
async def test_a_raised_limit_redrives_the_letters_left_under_the_old_one(make_settings: Callable[..., Settings],
                                                                         transport: str) -> None:
    settings = make_settings(transport=transport, max_attempts=3)
    await put_letters(settings, [letter("a", "oak desk", "infer", "TimeoutError", attempts=1),
                                 letter("b", "sofa", "infer", "TimeoutError", attempts=3)])
    first = await redrive(settings, idle_s=0.6)
    assert (first.redriven, first.already_redriven, first.over_limit) == (1, 0, 1)
    raised = settings.model_copy(update={"max_attempts": 5})
    second = await redrive(raised, idle_s=0.6)
    assert (second.redriven, second.already_redriven, second.over_limit) == (1, 1, 0)
    assert (await redrive(raised, idle_s=0.6)).already_redriven == 2
    # Lowered again, the letter redriven under the raised limit is over the limit, not redriven again.
    lowered = await redrive(settings, idle_s=0.6)
    assert (lowered.redriven, lowered.already_redriven, lowered.over_limit) == (0, 1, 1)
    assert sorted(json.loads(record.value)["query_id"] for record in await read_input(settings)) == ["a", "b"]


@pytest.mark.parametrize("transport", ["kafka", "redis"])
async def test_a_checkpoint_per_stage_and_class_alone_still_counts(make_settings: Callable[..., Settings],
                                                                   transport: str) -> None:
    """Checkpoints written before they were kept per attempts: what they cover is not redriven again."""
    settings = make_settings(transport=transport, max_attempts=3)
    await put_letters(settings, [letter("a", "oak desk", "infer", "TimeoutError"),
                                 letter("b", "sofa", "infer", "TimeoutError", attempts=2)])
    first, _ = await read_dead_letters(settings, idle_s=0.6)
    await RedriveCheckpoint(settings).save("infer.TimeoutError", {first.partition: first})
    await put_letters(settings, [letter("c", "lamp", "infer", "TimeoutError")])
    report = await redrive(settings, idle_s=0.6)
    assert (report.redriven, report.already_redriven) == (2, 1)
    assert sorted(json.loads(record.value)["query_id"] for record in await read_input(settings)) == ["b", "c"]


@pytest.mark.e2e
async def test_transient_dead_letters_come_back_parsed(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """Letters dead-lettered by a transient inference failure parse fine once redriven."""
    settings = make_settings()
    queries = {"dl-1": "grey velvet sofa", "dl-2": "oak bar stool", "dl-3": "white desk with drawers"}
    await put_letters(settings, [letter(qid, q, "infer", "TimeoutError") for qid, q in queries.items()]
                      + [letter("dl-4", "lamp", "infer", "TimeoutError", attempts=settings.max_attempts)])
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready(timeout_s=240)
        report = await redrive(settings, idle_s=0.6)
        assert (report.redriven, report.over_limit) == (3, 1)
        parsed = await read_topic(settings, settings.topic_parsed, until=3, timeout_s=180)
        events = {json.loads(r.value)["query_id"]: json.loads(r.value) for r in parsed}
        assert set(events) == set(queries), worker.log_tail()
        assert all(events[qid]["query"] == q for qid, q in queries.items())
        assert (await redrive(settings, idle_s=0.6)).redriven == 0
    finally:
        worker.stop()
