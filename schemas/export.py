"""JSON Schema files for each topic's payload, for consumers outside this repository."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

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


def channel_names(settings: Settings | None = None) -> dict[str, str]:
    """Role (input, parsed, metrics, dlq) → the name messages travel under on ``settings``' transport:
    the Kafka topics, or the Redis streams with ``transport=redis`` (the default names without settings)."""
    # model_construct: the field defaults, never the environment, for a caller that passes no settings.
    names = settings or Settings.model_construct()
    if names.transport == "redis":
        return {"input": names.stream_input, "parsed": names.stream_parsed, "metrics": names.stream_metrics,
                "dlq": names.stream_dlq}
    return {"input": names.topic_input, "parsed": names.topic_parsed, "metrics": names.topic_metrics,
            "dlq": names.topic_dlq}


def file_stem(name: str) -> str:
    """A topic or stream name as a file name: letters, digits, ``.``, ``_``, ``-`` and ``~`` as they are,
    every other character percent-encoded as in a URL (``queries:parsed`` → ``queries%3Aparsed``, ``/`` →
    ``%2F``). Kafka topic names are left unchanged (they admit no other character); the mapping is one to
    one, so two streams never share a file."""
    return quote(name, safe="")


def topic_models(spec: ParseSpec, settings: Settings | None = None) -> dict[str, tuple[str, type[BaseModel]]]:
    """File stem → (topic role, model). The stem is the topic's name in ``settings`` (the Redis stream's with
    ``transport=redis``; the default topics without settings) as ``file_stem`` writes it, so that a consumer
    finds the schema of the topic it reads, as the AsyncAPI document names it. Dead letters keep the original
    bytes as value; their contract is the reason carried in ``qustream.*`` headers, hence
    ``<dlq topic>.headers``."""
    names = channel_names(settings)
    return {
        file_stem(names["input"]): ("input", QueryInput),
        file_stem(names["parsed"]): ("parsed", parsed_event_model(spec)),
        file_stem(names["metrics"]): ("metrics", BatchMetricsEvent),
        f"{file_stem(names['dlq'])}.headers": ("dlq", DeadLetterReason),
    }


def json_schema(model: type[BaseModel], title: str) -> dict[str, Any]:
    schema = model.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://qustream.dev/schemas/{title}.schema.json"
    return schema


def export_json_schemas(directory: Path, spec: ParseSpec, settings: Settings | None = None) -> list[Path]:
    """One ``<topic>.schema.json`` per topic (or Redis stream) of ``settings`` (the default topics without) in
    ``directory``, named as ``topic_models`` names them."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (_, model) in topic_models(spec, settings).items():
        path = directory / f"{stem}.schema.json"
        path.write_text(json.dumps(json_schema(model, stem), indent=2) + "\n")
        written.append(path)
    return written
