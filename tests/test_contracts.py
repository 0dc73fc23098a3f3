"""Topic contracts: JSON Schema export and the AsyncAPI document validate and match the models."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest

from schemas.asyncapi import asyncapi_document
from schemas.events import BatchMetricsEvent, ParsedEvent, QueryParse, SourceRef, Timings
from schemas.export import TOPIC_MODELS, export_json_schemas
from schemas.settings import Settings

DATA = Path(__file__).parent / "data"


def sample_parsed_event() -> ParsedEvent:
    return ParsedEvent(
        query_id="q1", query="Red Sofa", normalized_query="red sofa",
        parse=QueryParse(item_type="sofa", color="red"), cached=False, model="m", grounding="catalog",
        event_ts=datetime.now(UTC), parsed_ts=datetime.now(UTC), source=SourceRef(topic="t", partition=0, offset="5"),
        worker_id="w", timings=Timings(queue_ms=1.0, inference_ms=2.0, total_ms=3.0),
    )


def test_exported_json_schemas_accept_real_events_and_reject_broken_ones(tmp_path: Path) -> None:
    paths = {p.name: p for p in export_json_schemas(tmp_path)}
    assert set(paths) == {f"{stem}.schema.json" for stem in TOPIC_MODELS}
    parsed_schema = json.loads(paths["queries.parsed.schema.json"].read_text())
    event = json.loads(sample_parsed_event().model_dump_json())
    jsonschema.validate(event, parsed_schema)
    broken = {**event, "parse": {**event["parse"], "price": 5}}
    try:
        jsonschema.validate(broken, parsed_schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("an unknown parse field must be rejected")


def test_asyncapi_document_is_valid_asyncapi_3() -> None:
    settings = Settings(topic_parsed="custom.parsed")
    document = asyncapi_document(settings)
    spec = json.loads((DATA / "asyncapi-3.0.0.schema.json").read_text())
    jsonschema.Draft7Validator(spec).validate(document)
    assert document["channels"]["parsed"]["address"] == "custom.parsed"
    assert set(document["components"]["schemas"]) >= {"ParsedEvent", "QueryInput", "BatchMetricsEvent", "QueryParse"}
    headers = document["components"]["messages"]["DeadLetter"]["headers"]["properties"]
    assert "qustream.error.stage" in headers and "qustream.attempts" in headers
    metrics_fields = set(document["components"]["schemas"]["BatchMetricsEvent"]["properties"])
    assert metrics_fields == set(BatchMetricsEvent.model_fields)


def test_committed_asyncapi_document_matches_the_models() -> None:
    committed = json.loads((Path(__file__).parent.parent / "docs" / "asyncapi.json").read_text())
    regenerate = "regenerate it: qustream schema asyncapi -o docs/asyncapi.json"
    assert committed == asyncapi_document(Settings(_env_file=None)), regenerate


def test_fast_parsed_event_encoding_is_byte_identical_to_the_model() -> None:
    import random
    from datetime import timedelta, timezone

    from schemas.events import ParsedEventEncoder, QueryInput

    rng = random.Random(11)
    # Event times as the input decoder produces them (pydantic's own tzinfo) and as stdlib builds them.
    decoded = [QueryInput.model_validate_json(f'{{"query": "x", "ts": "{text}"}}').ts
               for text in ("2026-03-04T05:06:07.891+02:00", "2026-03-04T05:06:07Z", "2026-03-04T05:06:07")]
    times = [datetime.now(UTC), datetime(2026, 1, 1, tzinfo=UTC), None, *decoded,
             datetime(2026, 5, 6, 7, 8, 9, 120, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))]
    texts = ["red sofa", 'canapé "rouge" \\ \u2028 😀 ソファ', "x\u0000y", ""]
    floats = [None, 0.0, 1.0, 0.1, 1e-7, 123456789.123, 1e20, 2.5e-300]
    for _ in range(300):
        text, ts, queue = rng.choice(texts), rng.choice(times), rng.choice(floats)
        parse = QueryParse(item_type=rng.choice([None, "sofa", text]), material=rng.choice([None, "wood"]),
                           color=rng.choice([None, "red"]), style=rng.choice([None, "modern"]))
        shared = dict(model=rng.choice(["m/x", 'odd "model" \u00e9']), grounding=rng.choice(["catalog", "span"]),
                      parsed_ts=rng.choice([t for t in times if t is not None]), worker_id=rng.choice(["w-1", "wé"]),
                      total_ms=rng.choice([3.25, 0.0, 1e-9, 12345.678]))
        fields = dict(query_id=f"q{rng.randrange(10**6)}", query=text, normalized_query=text.lower(),
                      cached=rng.random() < 0.5, ungrounded=rng.choice([[], ["color"], ["material", "style"]]),
                      event_ts=ts)
        partition, offset, inference = rng.randrange(64), str(rng.randrange(10**9)), rng.random()
        model_json = ParsedEvent(
            parse=parse, source=SourceRef(topic="in", partition=partition, offset=offset),
            timings=Timings(queue_ms=queue, inference_ms=inference, total_ms=shared["total_ms"]),
            model=shared["model"], grounding=shared["grounding"], parsed_ts=shared["parsed_ts"],
            worker_id=shared["worker_id"], **fields,
        ).model_dump_json().encode()
        fast = ParsedEventEncoder(**shared).encode(  # type: ignore[arg-type]
            fields["query_id"], fields["query"], fields["normalized_query"], parse.model_dump(), fields["cached"],
            fields["ungrounded"], fields["event_ts"], "in", partition, offset, queue, inference)  # type: ignore[arg-type]
        assert fast == model_json


def test_parsed_event_encoding_of_real_queries_equals_orjson_and_the_model() -> None:
    """A step of real shopping queries, as the worker encodes them: the same bytes as one
    ``orjson.dumps`` of the event dict (the library it replaces) and as ``model_dump_json``."""
    import random
    from datetime import timedelta

    import orjson

    from schemas.events import SCHEMA_VERSION, ParsedEventEncoder

    rng = random.Random(3)
    rows = [json.loads(line) for name in ("quality.jsonl", "singular_pairs.jsonl")
            for line in (DATA / name).read_text().splitlines()]
    parsed_at = datetime.now(UTC)
    shared = dict(model="Qwen/Qwen2.5-0.5B-Instruct", grounding="span", parsed_ts=parsed_at, worker_id="worker-7",
                  total_ms=12.5)
    encode = ParsedEventEncoder(**shared).encode  # type: ignore[arg-type]
    for offset, row in enumerate(rows):
        query = row["query"]
        labels = {name: value for name, value in row.items() if isinstance(value, str)}  # a few list two styles
        parse = QueryParse(item_type=labels.get("item_type") or labels.get("singular"), material=labels.get("material"),
                           color=labels.get("color"), style=labels.get("style")).model_dump()
        ungrounded = rng.choice([[], ["color"]])
        cached = rng.random() < 0.8
        event_ts = parsed_at - timedelta(milliseconds=rng.uniform(1, 900))
        queue_ms = (parsed_at - event_ts).total_seconds() * 1000
        inference_ms = 0.0 if cached else rng.uniform(50, 900)
        normalized = " ".join(query.lower().split())
        fields = dict(query_id=f"load-1764650000-{offset}", query=query, normalized_query=normalized, parse=parse,
                      cached=cached, ungrounded=ungrounded, event_ts=event_ts)
        source = {"topic": "queries", "partition": offset % 12, "offset": str(offset)}
        timings = {"queue_ms": queue_ms, "inference_ms": inference_ms, "total_ms": shared["total_ms"]}
        event = {"schema_version": SCHEMA_VERSION, **fields, "model": shared["model"], "grounding": shared["grounding"],
                 "parsed_ts": parsed_at, "source": source, "worker_id": shared["worker_id"], "timings": timings}
        event = {name: event[name] for name in ParsedEvent.model_fields}  # the contract's field order
        written = encode(fields["query_id"], query, fields["normalized_query"], parse, cached, ungrounded, event_ts,
                         "queries", source["partition"], source["offset"], queue_ms, inference_ms)
        assert written == orjson.dumps(event, option=orjson.OPT_UTC_Z)
        assert written == ParsedEvent.model_validate(event).model_dump_json().encode()


def test_cache_entries_are_validated_like_query_parse() -> None:
    import orjson
    from pydantic import ValidationError

    from workers.cache import validate_entry

    full = {"item_type": "sofa", "material": None, "color": "red", "style": None}
    assert validate_entry(orjson.dumps({"parse": full, "ungrounded": ["color"]})) == {
        "parse": full, "ungrounded": ["color"]}
    for parse in ({"item_type": "sofa"}, {**full, "extra": "x"}, {**full, "color": 3}, ["sofa"]):
        # QueryParse itself accepts a dict with missing fields (they default to null); a cache
        # entry must carry all of them, as the worker writes it, or it is a miss.
        with pytest.raises(ValidationError):
            validate_entry(orjson.dumps({"parse": parse, "ungrounded": []}))
    for broken in (b"not json", b"[]", orjson.dumps({"parse": full}), orjson.dumps({"parse": full, "ungrounded": [1]})):
        with pytest.raises(ValidationError):
            validate_entry(broken)
    for parse in ({**full, "extra": "x"}, {**full, "color": 3}):
        with pytest.raises(ValidationError):
            QueryParse.model_validate(parse)


def test_exactly_once_is_refused_for_the_batch_runner() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly_once needs kafka_runner=faust"):
        Settings(processing_guarantee="exactly_once")
    assert Settings(processing_guarantee="exactly_once", kafka_runner="faust").kafka_runner == "faust"
    assert Settings(processing_guarantee="exactly_once", transport="redis").transport == "redis"
