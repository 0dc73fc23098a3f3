"""JSON Schema files for each topic's payload, for consumers outside this repository."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.events import BatchMetricsEvent, DeadLetterReason, ParsedEvent, QueryInput

#: File stem → (topic role, model). Dead letters keep the original bytes as value; their contract
#: is the reason carried in ``qustream.*`` headers.
TOPIC_MODELS: dict[str, tuple[str, type[BaseModel]]] = {
    "queries.raw": ("input", QueryInput),
    "queries.parsed": ("parsed", ParsedEvent),
    "queries.metrics": ("metrics", BatchMetricsEvent),
    "queries.dlq.headers": ("dlq", DeadLetterReason),
}


def json_schema(model: type[BaseModel], title: str) -> dict[str, Any]:
    schema = model.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://qustream.dev/schemas/{title}.schema.json"
    return schema


def export_json_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (_, model) in TOPIC_MODELS.items():
        path = directory / f"{stem}.schema.json"
        path.write_text(json.dumps(json_schema(model, stem), indent=2) + "\n")
        written.append(path)
    return written
