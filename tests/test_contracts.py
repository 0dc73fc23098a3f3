"""Topic contracts: JSON Schema export and the AsyncAPI document validate and match the models."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from schemas.asyncapi import asyncapi_document
from schemas.events import BatchMetricsEvent, ParsedEvent, SourceRef, SpecRef, Timings
from schemas.export import export_json_schemas, topic_models
from schemas.settings import Settings
from schemas.spec import ParseSpec, load_spec
from streams.cli import app

DATA = Path(__file__).parent / "data"
FURNITURE = load_spec("furniture")


def furniture_parse(**values: str | None) -> dict[str, str | None]:
    return FURNITURE.parse_model(**values).model_dump()


def sample_parsed_event(spec: ParseSpec = FURNITURE, **parse: str | None) -> ParsedEvent:
    return ParsedEvent(
        query_id="q1", query="Red Sofa", normalized_query="red sofa",
        parse=spec.parse_model(**(parse or {spec.fields[0].name: "sofa"})).model_dump(),
        spec=SpecRef(**spec.ref), cached=False, model="m", grounding="catalog",
        event_ts=datetime.now(UTC), parsed_ts=datetime.now(UTC), source=SourceRef(topic="t", partition=0, offset="5"),
        worker_id="w", timings=Timings(queue_ms=1.0, inference_ms=2.0, total_ms=3.0),
    )


@pytest.mark.parametrize("spec_name", ["furniture", "ecommerce"])
def test_exported_json_schemas_accept_real_events_and_reject_broken_ones(tmp_path: Path, spec_name: str) -> None:
    spec = load_spec(spec_name)
    paths = {p.name: p for p in export_json_schemas(tmp_path, spec)}
    assert set(paths) == {f"{stem}.schema.json" for stem in topic_models(spec)}
    parsed_schema = json.loads(paths["queries.parsed.schema.json"].read_text())
    first = spec.fields[0].name
    event = json.loads(sample_parsed_event(spec).model_dump_json())
    jsonschema.validate(event, parsed_schema)
    assert set(parsed_schema["$defs"][spec.parse_model.__name__]["properties"]) == set(spec.field_names)
    other = "ecommerce" if spec_name == "furniture" else "furniture"
    for broken in (
        {**event, "parse": {**event["parse"], "price": 5}},  # a field the spec does not have
        {**event, "parse": {**event["parse"], first: 5}},  # not a string
        {**event, "parse": json.loads(sample_parsed_event(load_spec(other)).model_dump_json())["parse"]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, parsed_schema)


def test_exported_files_are_named_after_the_configured_topics(tmp_path: Path) -> None:
    defaults = {p.name for p in export_json_schemas(tmp_path / "defaults", FURNITURE)}
    assert defaults == {"queries.raw.schema.json", "queries.parsed.schema.json", "queries.metrics.schema.json",
                        "queries.dlq.headers.schema.json"}
    custom = Settings(topic_input="search.in", topic_parsed="my.parsed", topic_metrics="search.metrics",
                      topic_dlq="search.dead")
    written = {p.name: p for p in export_json_schemas(tmp_path / "custom", FURNITURE, custom)}
    assert set(written) == {"search.in.schema.json", "my.parsed.schema.json", "search.metrics.schema.json",
                            "search.dead.headers.schema.json"}
    assert json.loads(written["my.parsed.schema.json"].read_text())["title"] == "ParsedEvent"
    # The command takes the names from the environment, as `schema asyncapi` does.
    env = {"QUSTREAM_TOPIC_PARSED": "my.parsed"}
    exported = CliRunner().invoke(app, ["schema", "export", str(tmp_path / "cli")], env=env)
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "cli" / "my.parsed.schema.json").is_file()
    assert not (tmp_path / "cli" / "queries.parsed.schema.json").exists()
    document = CliRunner().invoke(app, ["schema", "asyncapi"], env=env)
    assert json.loads(document.stdout)["channels"]["parsed"]["address"] == "my.parsed"


def test_on_redis_the_files_and_channels_are_named_after_the_configured_streams(tmp_path: Path) -> None:
    defaults = {p.name for p in export_json_schemas(tmp_path / "defaults", FURNITURE, Settings(
        _env_file=None, transport="redis"))}
    assert defaults == {"queries%3Araw.schema.json", "queries%3Aparsed.schema.json",
                        "queries%3Ametrics.schema.json", "queries%3Adlq.headers.schema.json"}
    env = {"QUSTREAM_TRANSPORT": "redis", "QUSTREAM_STREAM_PARSED": "auditap:parsed",
           "QUSTREAM_STREAM_DLQ": "team/a dead", "QUSTREAM_TOPIC_PARSED": "not.this",
           "QUSTREAM_REDIS_URL": "redis://user:s3cret@cache.internal:6380/2"}
    exported = CliRunner().invoke(app, ["schema", "export", str(tmp_path / "cli")], env=env)
    assert exported.exit_code == 0, exported.output
    written = {path.name for path in (tmp_path / "cli").iterdir()}
    assert written == {"queries%3Araw.schema.json", "auditap%3Aparsed.schema.json",
                       "queries%3Ametrics.schema.json", "team%2Fa%20dead.headers.schema.json"}
    parsed = json.loads((tmp_path / "cli" / "auditap%3Aparsed.schema.json").read_text())
    assert parsed["title"] == "ParsedEvent"
    document = CliRunner().invoke(app, ["schema", "asyncapi"], env=env)
    assert document.exit_code == 0, document.output
    asyncapi = json.loads(document.stdout)
    jsonschema.Draft7Validator(json.loads((DATA / "asyncapi-3.0.0.schema.json").read_text())).validate(asyncapi)
    assert {name: channel["address"] for name, channel in asyncapi["channels"].items()} == {
        "raw": "queries:raw", "parsed": "auditap:parsed", "metrics": "queries:metrics", "dlq": "team/a dead"}
    assert asyncapi["servers"] == {"redis": {**asyncapi["servers"]["redis"], "host": "cache.internal:6380",
                                             "protocol": "redis"}}
    assert "s3cret" not in document.stdout and "kafka" not in json.dumps(asyncapi["components"]["messages"])


def test_schema_commands_name_a_target_they_cannot_write_in_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    exported = CliRunner().invoke(app, ["schema", "export", str(afile)])
    assert exported.exit_code == 2 and isinstance(exported.exception, SystemExit), exported.output
    assert f"error: {afile} is a file" in exported.output
    missing = tmp_path / "nonexistent" / "dir" / "a.json"
    document = CliRunner().invoke(app, ["schema", "asyncapi", "-o", str(missing)])
    assert document.exit_code == 2 and isinstance(document.exception, SystemExit), document.output
    assert f"error: cannot write {missing}: No such file or directory" in document.output
    assert "Traceback" not in exported.output + document.output


def test_category_fields_are_enums_in_the_parse_contract() -> None:
    spec = ParseSpec.model_validate({
        "name": "parts", "version": "2", "description": "auto parts",
        "fields": [{"name": "part", "kind": "span", "description": "the part"},
                   {"name": "system", "kind": "category", "description": "vehicle system",
                    "values": ["brakes", "engine", "suspension"]}],
    })
    schema = spec.parse_model.model_json_schema()
    assert schema["properties"]["system"]["anyOf"][0]["enum"] == ["brakes", "engine", "suspension"]
    assert spec.parse_model(part="pad", system="brakes").model_dump() == {"part": "pad", "system": "brakes"}
    with pytest.raises(ValueError):
        spec.parse_model(part="pad", system="exhaust")


def test_asyncapi_document_is_valid_asyncapi_3() -> None:
    settings = Settings(topic_parsed="custom.parsed")
    document = asyncapi_document(settings, FURNITURE)
    spec = json.loads((DATA / "asyncapi-3.0.0.schema.json").read_text())
    jsonschema.Draft7Validator(spec).validate(document)
    assert document["channels"]["parsed"]["address"] == "custom.parsed"
    assert set(document["components"]["schemas"]) >= {"ParsedEvent", "QueryInput", "BatchMetricsEvent",
                                                      "FurnitureParse", "SpecRef"}
    headers = document["components"]["messages"]["DeadLetter"]["headers"]["properties"]
    assert "qustream.error.stage" in headers and "qustream.attempts" in headers
    metrics_fields = set(document["components"]["schemas"]["BatchMetricsEvent"]["properties"])
    assert metrics_fields == set(BatchMetricsEvent.model_fields)


def test_committed_asyncapi_document_matches_the_models() -> None:
    committed = json.loads((Path(__file__).parent.parent / "docs" / "asyncapi.json").read_text())
    regenerate = "regenerate it: qustream schema asyncapi -o docs/asyncapi.json"
    assert committed == asyncapi_document(Settings(_env_file=None), FURNITURE), regenerate


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
        parse = furniture_parse(item_type=rng.choice([None, "sofa", text]), material=rng.choice([None, "wood"]),
                                color=rng.choice([None, "red"]), style=rng.choice([None, "modern"]))
        spec = SpecRef(name=rng.choice(["furniture", "ecommerce"]), version=rng.choice(["1", "2026.1"]))
        shared = dict(model=rng.choice(["m/x", 'odd "model" \u00e9']), grounding=rng.choice(["catalog", "span"]),
                      parsed_ts=rng.choice([t for t in times if t is not None]), worker_id=rng.choice(["w-1", "wé"]),
                      total_ms=rng.choice([3.25, 0.0, 1e-9, 12345.678]))
        fields = dict(query_id=f"q{rng.randrange(10**6)}", query=text, normalized_query=text.lower(),
                      cached=rng.random() < 0.5, ungrounded=rng.choice([[], ["color"], ["material", "style"]]),
                      event_ts=ts)
        partition, offset, inference = rng.randrange(64), str(rng.randrange(10**9)), rng.random()
        model_json = ParsedEvent(
            parse=parse, spec=spec, source=SourceRef(topic="in", partition=partition, offset=offset),
            timings=Timings(queue_ms=queue, inference_ms=inference, total_ms=shared["total_ms"]),
            model=shared["model"], grounding=shared["grounding"], parsed_ts=shared["parsed_ts"],
            worker_id=shared["worker_id"], **fields,
        ).model_dump_json().encode()
        fast = ParsedEventEncoder(spec=spec, **shared).encode(  # type: ignore[arg-type]
            fields["query_id"], fields["query"], fields["normalized_query"], parse, fields["cached"],
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
    rows = [json.loads(line) for name in ("quality_furniture.jsonl", "singular_pairs.jsonl")
            for line in (DATA / name).read_text().splitlines()]
    parsed_at = datetime.now(UTC)
    shared = dict(model="Qwen/Qwen2.5-0.5B-Instruct", grounding="span", parsed_ts=parsed_at, worker_id="worker-7",
                  total_ms=12.5)
    spec = SpecRef(**FURNITURE.ref)
    encode = ParsedEventEncoder(spec=spec, **shared).encode  # type: ignore[arg-type]
    for offset, row in enumerate(rows):
        query = row["query"]
        labels = {name: value for name, value in row.items() if isinstance(value, str)}  # a few list two styles
        parse = furniture_parse(item_type=labels.get("item_type") or labels.get("singular"),
                                material=labels.get("material"), color=labels.get("color"), style=labels.get("style"))
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
        event = {"schema_version": SCHEMA_VERSION, **fields, "spec": spec.model_dump(), "model": shared["model"],
                 "grounding": shared["grounding"],
                 "parsed_ts": parsed_at, "source": source, "worker_id": shared["worker_id"], "timings": timings}
        event = {name: event[name] for name in ParsedEvent.model_fields}  # the contract's field order
        written = encode(fields["query_id"], query, fields["normalized_query"], parse, cached, ungrounded, event_ts,
                         "queries", source["partition"], source["offset"], queue_ms, inference_ms)
        assert written == orjson.dumps(event, option=orjson.OPT_UTC_Z)
        assert written == ParsedEvent.model_validate(event).model_dump_json().encode()


def test_cache_entries_are_validated_like_the_spec_parse() -> None:
    import orjson
    from pydantic import ValidationError

    from workers.cache import entry_adapter

    validate_entry = entry_adapter(FURNITURE.field_names).validate_json

    full = {"item_type": "sofa", "material": None, "color": "red", "style": None}
    assert validate_entry(orjson.dumps({"parse": full, "ungrounded": ["color"]})) == {
        "parse": full, "ungrounded": ["color"]}
    for parse in ({"item_type": "sofa"}, {**full, "extra": "x"}, {**full, "color": 3}, ["sofa"]):
        # The parse model itself accepts a dict with missing fields (they default to null); a cache
        # entry must carry all of them, as the worker writes it, or it is a miss.
        with pytest.raises(ValidationError):
            validate_entry(orjson.dumps({"parse": parse, "ungrounded": []}))
    for broken in (b"not json", b"[]", orjson.dumps({"parse": full}), orjson.dumps({"parse": full, "ungrounded": [1]})):
        with pytest.raises(ValidationError):
            validate_entry(broken)
    for parse in ({**full, "extra": "x"}, {**full, "color": 3}):
        with pytest.raises(ValidationError):
            FURNITURE.parse_model.model_validate(parse)


def test_exactly_once_is_refused_for_the_batch_runner() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly_once needs kafka_runner=faust"):
        Settings(processing_guarantee="exactly_once")
    assert Settings(processing_guarantee="exactly_once", kafka_runner="faust").kafka_runner == "faust"
    assert Settings(processing_guarantee="exactly_once", transport="redis").transport == "redis"
