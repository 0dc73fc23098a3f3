"""End to end on the real broker, Redis and default model: `qustream worker` in a subprocess."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

from schemas.events import DeadLetterReason, ParsedEvent
from schemas.export import export_json_schemas
from schemas.settings import Settings
from schemas.spec import load_spec
from streams.kafka_io import make_producer
from streams.topics import ensure_topics
from tests.support import (
    AUTOPARTS_QUERIES,
    ECOMMERCE_QUERIES,
    POISON,
    WorkerProcess,
    read_topic,
    run,
    write_autoparts_spec,
)

pytestmark = pytest.mark.e2e

UNIQUE_QUERIES = [
    "red wooden sofa with armrests", "king poster bed", "blk leather office chair", "mid century teak dresser",
    "grey velvet sectional", "bar stool", "rose gold metal side table", "white oak dining table",
    "navy blue accent chair", "rattan outdoor lounge chair", "glass coffee table", "farmhouse pine bookshelf",
    "queen size platform bed frame", "green ceramic table lamp", "walnut tv stand", "marble top nightstand",
    "tufted linen headboard", "kids bunk bed", "black metal bar stools set of 2", "cream boucle armchair",
]


@pytest.fixture(params=["batch", "faust"])
def pipeline_run(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings], tmp_path: Path
) -> Iterator[tuple[Settings, WorkerProcess]]:
    """A worker of each Kafka runner: the default batch loop and the Faust agent."""
    settings = make_settings(batch_size=16, kafka_runner=request.param)
    run(ensure_topics(settings))
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        yield settings, worker
    finally:
        worker.stop()


async def produce(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(settings.topic_input, value, key=key)
    finally:
        await producer.stop()


def test_queries_with_repeats_and_poison(pipeline_run: tuple[Settings, WorkerProcess], tmp_path: Path) -> None:
    settings, worker = pipeline_run
    rng = random.Random(7)
    queries = UNIQUE_QUERIES + [rng.choice(UNIQUE_QUERIES) for _ in range(80)]
    rng.shuffle(queries)
    messages = [(f"q{i}".encode(), json.dumps({"query": q, "query_id": f"q{i}"}).encode())
                for i, q in enumerate(queries)]
    poison = [(name.encode(), value) for name, (value, _) in POISON.items()]
    run(produce(settings, messages[:50] + poison + messages[50:]))

    parsed_records = run(read_topic(settings, settings.topic_parsed, until=len(messages), timeout_s=240))
    dlq_records = run(read_topic(settings, settings.topic_dlq, until=len(poison), timeout_s=30))

    events = [ParsedEvent.model_validate_json(record.value) for record in parsed_records]
    assert sorted(e.query_id for e in events) == sorted(f"q{i}" for i in range(len(queries)))
    assert all(record.key == e.query_id.encode() for record, e in zip(parsed_records, events, strict=True))
    furniture = load_spec("furniture")
    for event in events:
        furniture.parse_model.model_validate(event.parse)
        assert event.spec is not None and event.spec.model_dump() == furniture.ref
        assert event.query == queries[int(event.query_id[1:])]
    # Each distinct query is inferred once; every repeat comes back cached.
    uncached = [e.normalized_query for e in events if not e.cached]
    assert sorted(uncached) == sorted(set(UNIQUE_QUERIES))
    assert sum(e.cached for e in events) == len(queries) - len(UNIQUE_QUERIES)

    by_key = {record.key.decode(): record for record in dlq_records}
    assert set(by_key) == set(POISON)
    for name, (value, stage) in POISON.items():
        record = by_key[name]
        assert record.value == value, name
        reason = DeadLetterReason.from_headers(dict(record.headers))
        assert reason.stage == stage, (name, reason)
        assert reason.source_topic == settings.topic_input
        assert reason.attempts == 1

    metrics = [json.loads(r.value) for r in run(read_topic(settings, settings.topic_metrics, until=10**6,
                                                          timeout_s=5))]
    assert sum(m["size"] for m in metrics) == len(messages) + len(poison)
    assert sum(m["parsed"] for m in metrics) == len(messages)
    assert sum(m["dead_lettered"] for m in metrics) == len(poison)
    assert sum(m["cached"] for m in metrics) == len(queries) - len(UNIQUE_QUERIES)

    # Prometheus agrees with what went through.
    status, body = worker.get("/metrics")
    assert status == 200
    text = body.decode()
    assert f'qustream_messages_total{{outcome="dead_lettered"}} {float(len(poison))}' in text
    assert f'qustream_messages_total{{outcome="inferred"}} {float(len(UNIQUE_QUERIES))}' in text
    # The engine's decoding counters are exported: the misses took forward passes.
    passes = re.search(r"^qustream_engine_forward_passes_total (\S+)$", text, re.MULTILINE)
    assert passes is not None and float(passes.group(1)) > 0

    # A client that is not the project's own decodes every event against the exported JSON Schema.
    from confluent_kafka import Consumer, TopicPartition

    schema_path = next(p for p in export_json_schemas(tmp_path / "schemas", furniture)
                       if p.name.startswith("queries.parsed"))
    schema = json.loads(schema_path.read_text())
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "schema-check",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(settings.topic_parsed, p, 0) for p in range(settings.partitions)])
    seen = 0
    for _ in range(200):
        message = consumer.poll(0.5)
        if message is None:
            if seen >= len(messages):
                break
            continue
        assert message.error() is None, message.error()
        jsonschema.validate(json.loads(message.value()), schema)
        seen += 1
    consumer.close()
    assert seen == len(messages)



@pytest.mark.parametrize("spec_name", ["ecommerce", "autoparts"])
def test_other_specs_end_to_end(make_settings: Callable[..., Settings], tmp_path: Path, spec_name: str) -> None:
    """The built-in general-retail spec and a made-up third domain, with plain-text values whose record
    key is the producer's query id."""
    spec_ref = "ecommerce" if spec_name == "ecommerce" else str(write_autoparts_spec(tmp_path / "spec"))
    queries = ECOMMERCE_QUERIES if spec_name == "ecommerce" else AUTOPARTS_QUERIES
    settings = make_settings(batch_size=16, parse_spec=spec_ref)
    spec = load_spec(spec_ref)
    run(ensure_topics(settings))
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        messages = [(f"search-{i}".encode(), query.encode()) for i, query in enumerate(queries)]
        run(produce(settings, [*messages, (b"poison", b'{"query": ""}')]))
        records = run(read_topic(settings, settings.topic_parsed, until=len(messages), timeout_s=240))
        dead = run(read_topic(settings, settings.topic_dlq, until=1, timeout_s=30))
    finally:
        worker.stop()
    exported = export_json_schemas(tmp_path / "schemas", spec)
    schema_path = next(p for p in exported if p.name.startswith("queries.parsed"))
    schema = json.loads(schema_path.read_text())
    events = {record.key.decode(): json.loads(record.value) for record in records}
    assert set(events) == {f"search-{i}" for i in range(len(queries))}, "plain-text values keep their key as id"
    for key, event in events.items():
        jsonschema.validate(event, schema)
        assert event["query_id"] == key and event["query"] == queries[int(key.split("-")[1])]
        assert event["spec"] == spec.ref and list(event["parse"]) == list(spec.field_names)
    assert [record.key for record in dead] == [b"poison"]
    if spec_name == "ecommerce":
        by_query = {event["query"]: event["parse"] for event in events.values()}
        assert by_query["stainless steel water bottle"]["material"] == "stainless steel"
        # The brand catalog and the size patterns: known values the model is not asked for.
        assert by_query["samsung 55 inch tv"] == {**by_query["samsung 55 inch tv"], "product_type": "tv",
                                                  "brand": "samsung", "size": "55 inch"}
        assert by_query["kids rain boots size 12"]["size"] == "size 12"
    else:
        systems = {event["parse"]["system"] for event in events.values()}
        assert systems <= {None, *spec.field("system").canonical_values}
        assert {event["parse"]["position"] for event in events.values()} <= {None, "front", "rear", "left", "right"}
