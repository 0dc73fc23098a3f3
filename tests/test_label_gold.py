"""`qustream label` with gold labels in the log: what a row carries reaches the training check as written.

Real files in ``tmp_path``, the real command (typer's runner), no model: gold labels need none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from producer_tools.label import provenance_path
from producer_tools.replay import LogReader, ReplayOptions, raw_lines
from streams.cli import app, register_plugin_commands
from tests.support import write_autoparts_spec

register_plugin_commands([])  # `qustream label` comes from producer_tools' entry point, as on the command line

MISSPELT = "unknown fields 'prat' (the spec's 'part'?); the spec 'autoparts' has ['part', 'position', 'system']"
NO_LABELS = "no labels (none of the spec's fields); pass --model to label with a teacher"

#: A spec whose fields are named as the log reader's own keys (``source``, ``id``, ``ts``).
CLASHING_SPEC = """
name: sourced
version: "1"
description: car parts, with where they come from
fields:
  - name: part
    kind: span
    description: The part wanted.
    normalize: [lowercase, singular]
  - name: source
    kind: category
    description: OEM or aftermarket.
    values: [oem, aftermarket]
  - name: id
    kind: category
    description: New or used.
    values: [new, used]
  - name: ts
    kind: category
    description: The model year.
    values: ["2023", "2024"]
examples:
  - query: oem brake pads
    parse: {part: brake pad, source: oem}
"""


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def run_label(log: Path, spec: Path, out: Path) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """The command's output (whitespace as single spaces: the console wraps), the rows it wrote, its provenance."""
    result = CliRunner().invoke(app, ["label", str(log), "--spec", str(spec), "--out", str(out)])
    assert result.exit_code in (0, 1), result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return " ".join(result.output.split()), rows, json.loads(provenance_path(out).read_text())


def skipped(provenance: dict[str, Any]) -> dict[str, str]:
    return {row["where"]: row["reason"] for row in provenance["skipped_rows"]}


def test_a_misspelt_field_skips_its_row_and_metadata_keys_are_left_out(tmp_path: Path) -> None:
    spec = write_autoparts_spec(tmp_path / "spec")
    log = write_jsonl(tmp_path / "log.jsonl", [
        # "prat" is spelt like "part", which the row lacks: its label would be taken as null.
        {"query": "front struts subaru outback", "prat": "strut", "position": "front", "system": "suspension"},
        # Keys like no field it lacks are the log's metadata; "position" is left out, so null.
        {"query": "headlight", "part": "headlight", "system": "electrical", "notes": "x", "user_id": 12},
        # The log's own keys (as the replay reader reads them) are no labels and no unknown fields.
        {"query": "rear wiper blade", "part": "wiper blade", "position": "rear", "system": "body", "query_id": "q7",
         "id": "7", "ts": "2024-05-01T10:00:00Z", "timestamp": 1714557600, "locale": "en-US", "source": "web"},
        # No spec field at all: a query without labels, as before.
        {"query": "water pump", "session": "abc"},
    ])
    out = tmp_path / "labels.jsonl"
    output, rows, provenance = run_label(log, spec, out)
    assert rows == [{"query": "headlight", "part": "headlight", "position": None, "system": "electrical"},
                    {"query": "rear wiper blade", "part": "wiper blade", "position": "rear", "system": "body"}]
    assert skipped(provenance) == {f"{log}:1": MISSPELT, f"{log}:4": NO_LABELS}
    assert f"{log}:1: skipped: {MISSPELT}" in output
    assert provenance["ignored_keys"] == {"notes": 1, "user_id": 1}
    assert provenance["fields_left_out"] == [{"where": f"{log}:2", "fields": ["position"]}]
    assert "note: 1 labelled row left fields out, written as null" in output
    assert "note: keys left out as the log's metadata, not labels: ['notes', 'user_id']" in output


def test_csv_and_tsv_columns_are_gold_labels_as_jsonl_keys_are(tmp_path: Path) -> None:
    spec = write_autoparts_spec(tmp_path / "spec")
    header = ["query", "part", "position", "system", "locale"]
    lines = [["front brake pads for honda civic", "brake pad", "front", "brakes", "en-US"],
             ["ford f150 alternator", "alternator", "", "electrical", ""],  # an empty cell is null
             ["thermostat housing", "thermostat housing", " ", "cooling", "en-GB"]]
    expected = [{"query": "front brake pads for honda civic", "part": "brake pad", "position": "front",
                 "system": "brakes"},
                {"query": "ford f150 alternator", "part": "alternator", "position": None, "system": "electrical"},
                {"query": "thermostat housing", "part": "thermostat housing", "position": None, "system": "cooling"}]
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        log = tmp_path / f"log{suffix}"
        log.write_text("".join(delimiter.join(cells) + "\n" for cells in [header, *lines]))
        out = tmp_path / f"labels{suffix}.jsonl"
        _, rows, provenance = run_label(log, spec, out)
        assert rows == expected, suffix
        assert provenance["skipped"] == 0
        # What replay sends of a CSV/TSV row is as it was: the query, its id, locale and source, no labels.
        reader = LogReader(str(log), ReplayOptions())
        payloads = [entry.payload for number, raw in enumerate(raw_lines(str(log)), start=1)
                    if (entry := reader.entry(number, raw)) is not None]
        assert [sorted(p) for p in payloads] == [["locale", "query", "query_id", "source"],
                                                 ["query", "query_id", "source"],
                                                 ["locale", "query", "query_id", "source"]]
    # A column spelt like a field the row lacks skips it, as a JSONL key does; a spreadsheet's byte
    # order mark before the header is no part of the first column's name.
    log = tmp_path / "extra.csv"
    log.write_text("\ufeffquery,prat,system,notes\nheadlight,headlight,electrical,x\n", encoding="utf-8")
    _, rows, provenance = run_label(log, spec, tmp_path / "extra.jsonl")
    assert rows == [] and skipped(provenance) == {f"{log}:2": MISSPELT}
    log.write_text("\ufeffquery,part,system,notes\nheadlight,headlight,electrical,x\n", encoding="utf-8")
    _, rows, provenance = run_label(log, spec, tmp_path / "extra.jsonl")
    assert rows == [{"query": "headlight", "part": "headlight", "position": None, "system": "electrical"}]
    assert provenance["ignored_keys"] == {"notes": 1}


def test_fields_named_as_the_readers_own_keys_are_read_as_written(tmp_path: Path) -> None:
    spec = tmp_path / "sourced.yaml"
    spec.write_text(CLASHING_SPEC)
    log = write_jsonl(tmp_path / "src.jsonl", [
        {"query": "oem brake pads", "part": "brake pad", "source": "oem", "id": "used", "ts": "2024"},
        {"query": "radiator hose", "part": "radiator hose"},  # absent: null, not the reader's defaults
    ])
    out = tmp_path / "labels.jsonl"
    _, rows, provenance = run_label(log, spec, out)
    assert provenance["skipped_rows"] == []
    assert rows == [{"query": "oem brake pads", "part": "brake pad", "source": "oem", "id": "used", "ts": "2024"},
                    {"query": "radiator hose", "part": "radiator hose", "source": None, "id": None, "ts": None}]


def test_repeats_with_other_labels_than_the_copy_kept_are_reported(tmp_path: Path) -> None:
    spec = write_autoparts_spec(tmp_path / "spec")
    first = {"query": "rear brake pads", "part": "brake pad", "position": "rear", "system": "brakes"}
    log = write_jsonl(tmp_path / "log.jsonl", [
        first,
        {**first, "query": "Rear Brake Pads", "part": "Brake Pads", "position": "back"},  # the same labels
        {**first, "system": "suspension"},
        {"query": "water pump", "part": "water pump", "system": "cooling"},
        {**first, "position": None},
    ])
    out = tmp_path / "labels.jsonl"
    output, rows, provenance = run_label(log, spec, out)
    assert rows == [first, {"query": "water pump", "part": "water pump", "position": None, "system": "cooling"}]
    assert provenance["repeats"] == 3 and provenance["conflicting_repeats"] == 2
    assert provenance["conflicting_rows"] == [{"where": f"{log}:3", "kept": f"{log}:1"},
                                              {"where": f"{log}:5", "kept": f"{log}:1"}]
    assert "3 repeats (2 with other labels than the copy kept)" in output
    assert output.index(f"{log}:3: repeat with other labels") < output.index(f"{log}:5: repeat with other labels")


def test_skipped_rows_are_listed_in_input_order(tmp_path: Path) -> None:
    spec = write_autoparts_spec(tmp_path / "spec")
    log = write_jsonl(tmp_path / "log.jsonl", [
        {"query": "rear brake pads", "part": "brake pad", "position": "top", "system": "brakes"},
        '{"query": "oak desk"',
        {"query": "water pump", "part": "water pump", "system": "cooling"},
        {"query": "headlight"},
        '["a list"]',
    ])
    out = tmp_path / "labels.jsonl"
    output, _, provenance = run_label(log, spec, out)
    order = [f"{log}:{n}" for n in (1, 2, 4, 5)]
    assert [row["where"] for row in provenance["skipped_rows"]] == order
    positions = [output.index(f"{where}: skipped") for where in order]
    assert positions == sorted(positions)
