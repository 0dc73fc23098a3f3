"""``qustream replay`` against the real broker (and Redis): counts, stable ids, pacing, resume."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from producer_tools.replay import ReplayOptions, replay
from producer_tools.transport import drain, open_sink, open_source
from schemas.settings import Settings
from tests.support import REPO, read_topic

BASE_MS = int(datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp() * 1000)
BAD_LINES = {17: "a\tb\tc\textra", 101: "only-one-column", 250: "not-a-time\tbar stool", 333: f"{BASE_MS}\t",
             420: "2024\tsofa\tbath", 512: "2024-13-45T00:00:00\tsofa", 640: f"{BASE_MS}\tx\ty", 777: "yesterday\tdesk",
             901: "\x00bad\tone\tmore", 999: "tuesday\tarmchair"}


def write_tsv_log(path: Path) -> None:
    """A header + 1,000 lines (10 malformed) of `time<TAB>query`, gzip-compressed."""
    lines = ["time\tquery"]
    for number in range(1, 1001):
        lines.append(BAD_LINES.get(number, f"{BASE_MS + number * 1000}\tquery number {number} oak table"))
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def cli(settings: Settings, *args: str, cwd: Path | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO)})


async def replay_to(settings: Settings, files: Sequence[str], **options: Any) -> Any:
    async with open_sink(settings) as sink:
        return await replay(sink, files, ReplayOptions(**options))


def ids_of(records: list[Any]) -> list[str]:
    return [json.loads(record.value)["query_id"] for record in records]


async def test_gzip_tsv_replay_counts_bad_lines_and_keeps_ids_stable(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    log = tmp_path / "history.tsv.gz"
    write_tsv_log(log)
    first, second = make_settings(), make_settings()

    result = cli(first, "replay", str(log), "--no-progress", "--json", "--ts-field", "time",
                 "--checkpoint", str(tmp_path / "c1.json"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["produced"], summary["bad"]) == (990, 10)
    # Line numbers count the header as line 1, so data line n is file line n + 1.
    assert sorted(item["line"] for item in summary["bad_lines"]) == sorted(n + 1 for n in BAD_LINES)

    again = await replay_to(second, [str(log)], ts_field="time", checkpoint=tmp_path / "c2.json")
    assert (again.produced, again.bad) == (990, 10)

    one = await read_topic(first, first.topic_input, until=990, timeout_s=60)
    two = await read_topic(second, second.topic_input, until=990, timeout_s=60)
    assert len(one) == len(two) == 990
    assert len(set(ids_of(one))) == 990
    assert sorted(ids_of(one)) == sorted(ids_of(two))
    # The original event time is kept in the event and as the Kafka timestamp.
    for record in one[:50]:
        payload = json.loads(record.value)
        number = int(payload["query"].split()[2])
        assert record.timestamp == BASE_MS + number * 1000
        assert datetime.fromisoformat(payload["ts"]).timestamp() * 1000 == BASE_MS + number * 1000
        assert record.key.decode() == payload["query_id"]


class TimingSink:
    """The real sink, plus when each record was handed over."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.target = inner.target
        self.sent: list[tuple[float, int | None]] = []

    async def send(self, key: bytes | None, value: bytes, headers: Any = None, timestamp_ms: int | None = None) -> None:
        self.sent.append((time.perf_counter(), timestamp_ms))
        await self.inner.send(key, value, headers, timestamp_ms)

    async def push(self) -> None:
        await self.inner.push()

    async def flush(self) -> None:
        await self.inner.flush()


async def test_speed_keeps_relative_timing(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    offsets_s = [0, 0.5, 2, 2.2, 5, 9, 9.1, 14, 20, 21, 27, 30]  # 30 s of recorded, irregular traffic
    log = tmp_path / "short.jsonl"
    log.write_text("\n".join(json.dumps({"query": f"sofa {i}", "ts": (BASE_MS + int(s * 1000)) / 1000})
                             for i, s in enumerate(offsets_s)) + "\n")
    settings = make_settings()
    async with open_sink(settings) as inner:
        sink = TimingSink(inner)
        summary = await replay(sink, [str(log)], ReplayOptions(speed=10, checkpoint=tmp_path / "c.json"))
    assert summary.produced == len(offsets_s)
    start = sink.sent[0][0]
    span = offsets_s[-1] / 10
    for (moment, ts_ms), recorded in zip(sink.sent, offsets_s, strict=True):
        assert ts_ms == BASE_MS + int(recorded * 1000)
        expected = recorded / 10
        assert abs((moment - start) - expected) <= 0.1 * span, (moment - start, expected)
    assert abs((sink.sent[-1][0] - start) - span) <= 0.1 * span
    records = await read_topic(settings, settings.topic_input, until=len(offsets_s), timeout_s=30)
    assert len(records) == len(offsets_s)


def interrupted_replay(settings: Settings, log: Path, checkpoint: Path) -> tuple[int, str, str]:
    """A CLI replay at 150/s, sent SIGINT (Ctrl-C) mid-way."""
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "streams.cli", "replay", str(log), "--rate", "150", "--no-progress", "--json",
            "--checkpoint", str(checkpoint)]
    process = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.8)  # mid-way: 600 lines at 150/s take 4 s
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout, stderr


async def test_resume_after_interrupt_sends_no_line_twice(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    lines = 600
    log = tmp_path / "big.csv"
    log.write_text("id,query\n" + "".join(f"r{n},walnut desk {n}\n" for n in range(lines)))
    checkpoint = tmp_path / "resume.json"
    settings = make_settings()
    returncode, stdout, stderr = interrupted_replay(settings, log, checkpoint)
    assert returncode == 130, stderr
    first = json.loads(stdout.strip().splitlines()[-1])
    assert first["interrupted"] and 0 < first["produced"] < lines

    result = cli(settings, "replay", str(log), "--resume", "--no-progress", "--json", "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stderr
    second = json.loads(result.stdout.strip().splitlines()[-1])
    assert first["produced"] + second["produced"] == lines

    records = await read_topic(settings, settings.topic_input, until=lines + 1, timeout_s=6)
    ids = ids_of(records)
    assert len(ids) == lines
    assert sorted(ids) == sorted(f"r{n}" for n in range(lines))

    # A resume of a finished replay sends nothing.
    third = cli(settings, "replay", str(log), "--resume", "--no-progress", "--json", "--checkpoint", str(checkpoint))
    assert json.loads(third.stdout.strip().splitlines()[-1])["produced"] == 0


async def test_sample_log_over_redis_streams(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """The bundled sample: 5 poison lines skipped with their line numbers; same tool over Redis."""
    settings = make_settings(transport="redis")
    sample = REPO / "producer_tools" / "data" / "sample_queries_furniture.jsonl"
    total = sum(1 for line in sample.read_text().splitlines() if line.strip())
    summary = await replay_to(settings, [str(sample)], checkpoint=tmp_path / "c.json")
    assert summary.bad == 5
    assert summary.produced == total - 5
    reasons = " ".join(reason for _, _, reason in summary.bad_samples)
    for expected in ("invalid JSON", "query is empty", "no 'query' field", "query is a int", "JSON list"):
        assert expected in reasons
    async with open_source(settings, ["input"]) as source:
        records = await drain(source, idle_s=0.5)
    assert len(records) == total - 5
    assert all(record.key and json.loads(record.value or b"")["query_id"] == record.key.decode()
               for record in records)


def test_skip_and_formats(tmp_path: Path) -> None:
    from producer_tools.replay import LogReader, parse_time

    assert parse_time("2024-05-01T12:00:00Z") == BASE_MS
    assert parse_time(BASE_MS / 1000) == BASE_MS
    assert parse_time(str(BASE_MS)) == BASE_MS
    reader = LogReader("x.csv", ReplayOptions(query_field="q", id_field="rid", ts_field="when"))
    assert reader.entry(1, b"rid,when,q\n") is None
    entry = reader.entry(2, b'7,2024-05-01T12:00:00,"sofa, grey"\n')
    assert entry is not None and (entry.query_id, entry.query, entry.ts_ms) == ("7", "sofa, grey", BASE_MS)
    text = LogReader("x.txt", ReplayOptions())
    plain = text.entry(3, b"  bar stool\n")
    assert plain is not None and plain.query == "  bar stool" and plain.ts_ms is None
    assert plain.query_id == LogReader("x.txt", ReplayOptions()).entry(3, b"other\n").query_id  # type: ignore[union-attr]


@pytest.mark.parametrize("skip", [0, 3])
async def test_skip_counts_lines(make_settings: Callable[..., Settings], tmp_path: Path, skip: int) -> None:
    log = tmp_path / "few.txt"
    log.write_text("sofa\nchair\ndesk\nbed\nlamp\n")
    settings = make_settings(transport="redis")
    summary = await replay_to(settings, [str(log)], skip=skip, checkpoint=tmp_path / "c.json")
    assert (summary.produced, summary.skipped) == (5 - skip, skip)
