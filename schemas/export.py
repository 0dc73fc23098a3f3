"""JSON Schema files for each topic's payload, for consumers outside this repository."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, create_model

from schemas.events import BatchMetricsEvent, DeadLetterReason, ParsedEvent, QueryInput, SpecRef
from schemas.settings import Settings
from schemas.spec import ParseSpec


def parsed_event_model(spec: ParseSpec) -> type[ParsedEvent]:
    """``ParsedEvent`` whose ``parse`` is this spec's parse model: the parsed topic's contract for
    one spec (the generic model types ``parse`` as a mapping of field names)."""
    model: type[ParsedEvent] = create_model(
        "ParsedEvent",
        __base__=ParsedEvent,
        parse=(spec.parse_model, Field(description=f"The parse under spec {spec.name!r} version {spec.version}.")),
        spec=(SpecRef, Field(description="The parse spec of `parse`.")),
    )
    return model


def topic_models(spec: ParseSpec, settings: Settings | None = None) -> dict[str, tuple[str, type[BaseModel]]]:
    """File stem → (topic role, model). The stem is the topic's name in ``settings`` (the default names
    without), so that a consumer finds the schema of the topic it reads, as the AsyncAPI document names it.
    Dead letters keep the original bytes as value; their contract is the reason carried in ``qustream.*``
    headers, hence ``<dlq topic>.headers``."""
    # model_construct: the field defaults, never the environment, for a caller that passes no settings.
    topics = settings or Settings.model_construct()
    return {
        topics.topic_input: ("input", QueryInput),
        topics.topic_parsed: ("parsed", parsed_event_model(spec)),
        topics.topic_metrics: ("metrics", BatchMetricsEvent),
        f"{topics.topic_dlq}.headers": ("dlq", DeadLetterReason),
    }


def json_schema(model: type[BaseModel], title: str) -> dict[str, Any]:
    schema = model.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://qustream.dev/schemas/{title}.schema.json"
    return schema


def export_json_schemas(directory: Path, spec: ParseSpec, settings: Settings | None = None) -> list[Path]:
    """One ``<topic>.schema.json`` per topic of ``settings`` (the default topics without) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (_, model) in topic_models(spec, settings).items():
        path = directory / f"{stem}.schema.json"
        path.write_text(json.dumps(json_schema(model, stem), indent=2) + "\n")
        written.append(path)
    return written
