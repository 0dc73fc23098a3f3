"""``qustream produce``, ``load`` and ``tail`` on the real broker / Redis; unreachable brokers and bad
options or input fail with one line."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from producer_tools.load import ZipfSampler, build_vocabulary, generate_load
from producer_tools.reprocess import parse_since
from producer_tools.transport import drain, open_sink, open_source
from schemas.events import DeadLetterReason
from schemas.settings import Settings
from streams.local_stack import free_port
from tests.support import REPO, read_topic

SAMPLE_LOG = "producer_tools/data/sample_queries_furniture.jsonl"


def cli(settings: Settings, *args: str, timeout: float = 120, extra_env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


async def test_load_hits_1000_per_second(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    async with open_sink(settings) as sink:
        summary = await generate_load(sink, rate=1000, duration_s=3, alpha=1.1, unique=2000, seed=1)
    assert summary.sent == 3000
    assert abs(summary.rate / 1000 - 1) <= 0.10, summary.as_dict()
    records = await read_topic(settings, settings.topic_input, until=3000, timeout_s=60)
    assert len(records) == 3000
    # Independent of the tool's own figure: the broker timestamps span ~3 s for 3,000 records.
    stamps = sorted(record.timestamp for record in records)
    broker_rate = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000)
    assert abs(broker_rate / 1000 - 1) <= 0.10, broker_rate
    queries = [json.loads(record.value)["query"] for record in records]
    counts = sorted((queries.count(q) for q in set(queries)), reverse=True)
    assert counts[0] >= 100  # a head query repeats a lot (Zipf)
    assert sum(1 for c in counts if c == 1) >= 100  # and a long tail shows up once


def test_zipf_mixes_head_and_tail() -> None:
    vocabulary = build_vocabulary(1000, seed=3)
    assert len(set(vocabulary)) == 1000
    sampler = ZipfSampler(vocabulary, alpha=1.0, seed=5)
    draws = [sampler.draw() for _ in range(20_000)]
    top = draws.count(vocabulary[0]) / len(draws)
    assert 0.08 < top < 0.2  # 1 / H(1000) ≈ 0.13
    assert len(set(draws)) > 700


async def test_load_over_redis_streams(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(transport="redis", stream_maxlen=100_000)
    result = cli(settings, "load", "--rate", "500", "--count", "400", "--no-progress", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["sent"] == 400
    async with open_source(settings, ["input"]) as source:
        records = await drain(source, idle_s=0.5)
    assert len(records) == 400


async def _seed_outputs(settings: Settings) -> None:
    async with open_sink(settings, "parsed") as parsed:
        for n in range(5):
            event = {"query_id": f"q{n}", "query": f"sofa {n}", "parse": {"item_type": "sofa"}, "cached": False}
            await parsed.send(f"q{n}".encode(), json.dumps(event).encode())
    reason = DeadLetterReason(stage="validate", error_class="EmptyQuery", message="query is empty",
                              source_topic="in", source_partition=0, source_offset="7", attempts=2)
    async with open_sink(settings, "dlq") as dlq:
        await dlq.send(b"k", b'{"query": ""}', reason.to_headers())


@pytest.mark.parametrize("transport", ["kafka", "redis"])
async def test_tail_json_dlq_reasons_and_group_resume(make_settings: Callable[..., Settings], transport: str) -> None:
    settings = make_settings(transport=transport)
    await _seed_outputs(settings)

    result = cli(settings, "tail", "dlq", "--from-beginning", "--max", "1")
    assert result.returncode == 0, result.stderr
    letter = json.loads(result.stdout.strip())
    assert letter["reason"]["stage"] == "validate" and letter["reason"]["attempts"] == 2
    assert letter["headers"]["qustream.error.class"] == "EmptyQuery"

    first = cli(settings, "tail", "parsed", "--from-beginning", "--max", "3", "--group", "viewer")
    second = cli(settings, "tail", "parsed", "--from-beginning", "--max", "5", "--idle-timeout", "2",
                 "--group", "viewer")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    seen = [json.loads(line)["value"]["query_id"] for line in (first.stdout + second.stdout).splitlines()]
    assert sorted(seen) == [f"q{n}" for n in range(5)]  # the group resumed: nothing twice, nothing lost

    table = cli(settings, "tail", "parsed", "--from-beginning", "--max", "5", "--format", "table")
    assert table.returncode == 0, table.stderr
    assert "sofa 4" in table.stdout and "item_type" in table.stdout
    # The columns are the active parse spec's fields.
    other = cli(settings.model_copy(update={"parse_spec": "ecommerce"}), "tail", "parsed", "--from-beginning",
                "--max", "5", "--format", "table", extra_env={"COLUMNS": "200"})
    assert other.returncode == 0, other.stderr
    assert "product_type" in other.stdout and "item_type" not in other.stdout


@pytest.mark.parametrize("command", [["replay", SAMPLE_LOG],
                                     ["produce", SAMPLE_LOG],
                                     ["load", "--count", "5"], ["tail", "parsed"], ["dlq", "inspect"],
                                     ["dlq", "redrive"], ["reprocess", "--since", "1h"]])
def test_unreachable_broker_fails_fast(make_settings: Callable[..., Settings], command: list[str]) -> None:
    settings = make_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = cli(settings, *command, extra_env={"QUSTREAM_TOOLS_CONNECT_TIMEOUT_S": "3"}, timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stdout + result.stderr
    # One line that names the cause, not aiokafka's own line for every failed attempt before it.
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach Kafka at"), result.stderr
    assert "Connect call failed" in result.stderr, result.stderr


@pytest.mark.parametrize("command", [["load", "--count", "5"],
                                     ["produce", SAMPLE_LOG]])
def test_unreachable_redis_fails_fast(make_settings: Callable[..., Settings], command: list[str]) -> None:
    settings = make_settings(transport="redis").model_copy(
        update={"redis_url": SecretStr(f"redis://127.0.0.1:{free_port()}/0")})
    result = cli(settings, *command, extra_env={"QUSTREAM_TOOLS_CONNECT_TIMEOUT_S": "3"}, timeout=60)
    assert result.returncode == 2 and "cannot reach Redis at" in result.stderr, result.stderr


async def read_input_queries(settings: Settings) -> list[str]:
    async with open_source(settings, ["input"]) as source:
        return [json.loads(record.value)["query"] for record in await drain(source, idle_s=0.6)]


async def test_produce_over_redis_streams(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(transport="redis")
    queries = tmp_path / "queries.txt"
    queries.write_text('red velvet sofa\n\n{"query": "oak desk", "query_id": "own-id"}\nbar stool\n')
    result = cli(settings, "produce", str(queries))
    assert result.returncode == 0, result.stderr
    assert "produced 3 messages" in result.stderr
    assert await read_input_queries(settings) == ["red velvet sofa", "oak desk", "bar stool"]


@pytest.mark.parametrize("transport", ["kafka", "redis"])
async def test_produce_stops_at_a_line_that_is_not_utf8(make_settings: Callable[..., Settings], tmp_path: Path,
                                                        transport: str) -> None:
    settings = make_settings(transport=transport)
    queries = tmp_path / "queries.txt"
    queries.write_bytes(b"red velvet sofa\noak desk\n\xff\xfe bar stool\nlamp\n")
    result = cli(settings, "produce", str(queries))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (f"error: {queries} line 3 is not UTF-8 (invalid start byte); stopped there, "
                                     "2 messages before it were sent")
    # Acknowledged before the exit; Kafka's two partitions need not keep their order.
    assert sorted(await read_input_queries(settings)) == ["oak desk", "red velvet sofa"]


def test_produce_names_a_missing_file_before_connecting(make_settings: Callable[..., Settings],
                                                        tmp_path: Path) -> None:
    settings = make_settings(kafka_bootstrap=f"127.0.0.1:{free_port()}")  # never reached: the file comes first
    missing = tmp_path / "missing.txt"
    result = cli(settings, "produce", str(missing), extra_env={"QUSTREAM_TOOLS_CONNECT_TIMEOUT_S": "3"}, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: cannot read {missing}: No such file or directory"


@pytest.mark.parametrize(("command", "option"), [
    ("load --rate 0", "--rate"), ("load --rate -1", "--rate"), ("load --unique 0", "--unique"),
    ("load --count 0", "--count"), ("load --count -3", "--count"), ("load --duration 0", "--duration"),
    (f"replay --rate -5 {SAMPLE_LOG}", "--rate"), (f"replay --speed 0 {SAMPLE_LOG}", "--speed"),
    ("dlq redrive --stage nonsense", "--stage"),
])
def test_out_of_range_options_are_usage_errors(make_settings: Callable[..., Settings], command: str,
                                               option: str) -> None:
    # A reachable Redis, so that without the checks these commands run (or crash) instead of exiting 2.
    result = cli(make_settings(transport="redis", stream_maxlen=1000), *command.split(),
                 extra_env={"COLUMNS": "200"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"Invalid value for '{option}'" in result.stderr


def test_help_has_examples() -> None:
    for command in (["replay"], ["load"], ["tail"], ["dlq", "inspect"], ["dlq", "redrive"], ["reprocess"]):
        result = subprocess.run([sys.executable, "-m", "streams.cli", *command, "--help"], cwd=REPO,
                                capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
        assert result.returncode == 0 and "Example: qustream" in result.stdout, command


def test_tail_gives_bytes_that_are_not_text_in_base64_too() -> None:
    from producer_tools.tail import record_to_json
    from workers.core_step import InboundMessage

    raw = b"\xff\xfe red sofa \x80"
    shown = record_to_json(InboundMessage(raw, b"\x00\xffk", "q.dlq", 0, "3", 0, {}))
    assert base64.b64decode(shown["value_base64"]) == raw and base64.b64decode(shown["key_base64"]) == b"\x00\xffk"
    plain = record_to_json(InboundMessage(b"red sofa", b"k", "q.dlq", 0, "4", 0, {}))
    assert plain["value"] == "red sofa" and "value_base64" not in plain and "key_base64" not in plain


def test_parse_since() -> None:
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("1d12h", now) == now - timedelta(days=1, hours=12)
    assert parse_since("2024-05-01T10:00:00Z", now) == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert parse_since("2024-05-01T10:00:00", now) == datetime(2024, 5, 1, 10, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_since("yesterday", now)
