"""The few-shot completion prompt of a parse spec, split so the shared part is prefilled once per model load.

Plain completion style ("Query: ...\\nJSON: {...}\\n") works better than the chat template for the
small default model. The prompt is split right after the last ``Query:`` so every row's suffix
starts with a space and the query: splitting after that space would change how the query's first
word is tokenized (" sofa" is one token, "sofa" after a bare space is not).
"""

from __future__ import annotations

import json

from schemas.spec import ParseSpec

QUERY_MARKER = "Query:"
ANSWER_MARKER = "\nJSON:"


def instruction(spec: ParseSpec) -> str:
    """The spec's own instruction, or one written from its description and fields."""
    if spec.instruction:
        return spec.instruction
    described = []
    for spec_field in spec.fields:
        text = f"{spec_field.name} ({spec_field.description.rstrip('.')}"
        if spec_field.kind == "category":
            text += "; one of: " + ", ".join(spec_field.canonical_values)
        described.append(text + ")")
    return (
        f"Extract these fields from each {spec.description} search query as JSON: {'; '.join(described)}. "
        "Use null for anything the query does not say."
    )


def format_parse(spec: ParseSpec, parse: dict[str, str | None]) -> str:
    """The exact output text: json.dumps of all fields in spec order, preceded by one space."""
    return " " + json.dumps({name: parse.get(name) for name in spec.field_names}, ensure_ascii=False)


def prompt_prefix(spec: ParseSpec, few_shot: bool = True) -> str:
    """The shared part of every prompt, ending with the last ``Query:`` marker (no trailing space).

    ``few_shot=False`` leaves the examples out: a model fine-tuned on the spec does not need them."""
    lines = [instruction(spec), ""]
    for example in spec.examples if few_shot else ():
        lines.append(f"{QUERY_MARKER} {example.query}{ANSWER_MARKER}{format_parse(spec, example.parse)}")
        lines.append("")
    return "\n".join(lines) + QUERY_MARKER


def prompt_suffix(query: str) -> str:
    """The per-row part: a space, the query, and the answer marker; the model continues with JSON."""
    return f" {query}{ANSWER_MARKER}"


def full_prompt(spec: ParseSpec, query: str, few_shot: bool = True) -> str:
    return prompt_prefix(spec, few_shot) + prompt_suffix(query)
