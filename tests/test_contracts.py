"""Topic contracts: JSON Schema export and the AsyncAPI document validate and match the models."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema

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
