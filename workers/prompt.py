"""The few-shot completion prompt, split so the shared part can be prefilled once per model load.

Plain completion style ("Query: ...\\nJSON: {...}\\n") works better than the chat template for the
small default model. The prompt is split right after the last ``Query:`` so every row's suffix
starts with a space and the query: splitting after that space would change how the query's first
word is tokenized (" sofa" is one token, "sofa" after a bare space is not).
"""

from __future__ import annotations

import json

from schemas.events import PARSE_FIELDS

INSTRUCTION = (
    "Extract the furniture item type, material, color and style from each search query as JSON. "
    "Use null for anything the query does not say."
)

#: (query, parse) pairs shown before the real query; they cover nulls, multiword items, synonyms.
FEW_SHOT: tuple[tuple[str, dict[str, str | None]], ...] = (
    ("queen size bed frame", {"item_type": "bed frame"}),
    ("tv stand for 70 inch tv", {"item_type": "tv stand"}),
    ("grey velvet sectional sofa", {"item_type": "sectional sofa", "material": "velvet", "color": "gray"}),
    ("round white kitchen table", {"item_type": "kitchen table", "color": "white"}),
    ("mid century walnut nightstand with drawer",
     {"item_type": "nightstand", "material": "walnut", "style": "mid-century"}),
    ("black metal bar stools set of 2", {"item_type": "bar stool", "material": "metal", "color": "black"}),
    ("navy velvet swivel chair modern",
     {"item_type": "swivel chair", "material": "velvet", "color": "navy", "style": "modern"}),
    ("boho white rattan accent chair",
     {"item_type": "accent chair", "material": "rattan", "color": "white", "style": "bohemian"}),
)

QUERY_MARKER = "Query:"
ANSWER_MARKER = "\nJSON:"


def format_parse(parse: dict[str, str | None]) -> str:
    """The exact output text: json.dumps of all fields in schema order, preceded by one space."""
    return " " + json.dumps({name: parse.get(name) for name in PARSE_FIELDS}, ensure_ascii=False)


def prompt_prefix() -> str:
    """The shared part of every prompt, ending with the last ``Query:`` marker (no trailing space)."""
    lines = [INSTRUCTION, ""]
    for query, parse in FEW_SHOT:
        lines.append(f"{QUERY_MARKER} {query}{ANSWER_MARKER}{format_parse(parse)}")
        lines.append("")
    return "\n".join(lines) + QUERY_MARKER


def prompt_suffix(query: str) -> str:
    """The per-row part: a space, the query, and the answer marker; the model continues with JSON."""
    return f" {query}{ANSWER_MARKER}"


def full_prompt(query: str) -> str:
    return prompt_prefix() + prompt_suffix(query)
