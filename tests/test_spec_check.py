"""`qustream spec check` from a spec author's side: every problem in one run, each said once and in one
style, numbers that YAML would change refused, and a spec without examples noted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.spec import SpecError, load_spec, spec_json_schema
from tests.support import REPO
from workers.grammar import load_checked_spec

HEAD = "name: autoparts\n{version}\ndescription: car parts\n"
PART = "  - {name: part, kind: span, description: The part., normalize: [lowercase, singular]}\n"
YEAR = ("  - {name: model_year, kind: span, description: The model year., trim_edges: false, fill: mentioned, "
        "patterns: ['\\b(19|20)\\d\\d\\b']}\n")


def write(tmp_path: Path, fields: str, examples: str = "", version: str = 'version: "1"') -> Path:
    path = tmp_path / "parts.yaml"
    path.write_text(HEAD.format(version=version) + "fields:\n" + fields + examples, encoding="utf-8")
    return path


def problems_of(path: Path) -> str:
    with pytest.raises(SpecError) as refused:
        load_checked_spec(str(path))
    return str(refused.value)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)


@pytest.mark.parametrize(("written", "quoted"), [("1.10", '"1.10"'), ("2026.10", '"2026.10"'), ("2", '"2"')])
def test_a_version_written_as_a_yaml_number_is_refused_with_the_quoted_form(
    tmp_path: Path, written: str, quoted: str
) -> None:
    message = problems_of(write(tmp_path, PART, version=f"version: {written}"))
    assert f"version: {quoted}" in message and "quote" in message, message
    assert message.count("\n  - ") == 1, message
    # The same word for a version that reaches the loader as a number some other way (an extended base).
    (tmp_path / "child.yaml").write_text("extends: parts.yaml\nname: child\n", encoding="utf-8")
    assert f"version: {quoted}" in problems_of(tmp_path / "child.yaml")
    assert load_spec(write(tmp_path, PART, version=f'version: "{written}"')).version == written
    assert spec_json_schema()["anyOf"][0]["properties"]["version"]["type"] == "string"


def test_an_unknown_kind_does_not_hide_the_examples_problems(tmp_path: Path) -> None:
    fields = PART + "  - {name: vehicle_make, kind: enum, description: The make., values: [honda, toyota]}\n"
    examples = ("examples:\n"
                "  - {query: front brake pads, parse: {part: brake pad, vehicle_make: acura}}\n"
                "  - {query: honda rotors, parse: {part: rotor, vehicle_make: honda}}\n"
                "  - {query: rear pads, parse: {part: caliper}}\n"
                "  - {query: rear pads, parse: {part: pad, price: '10'}}\n")
    message = problems_of(write(tmp_path, fields, examples))
    for expected in ("field 'vehicle_make' (fields[1].kind): Input should be 'span', 'vocabulary' or 'category'",
                     "examples[0] ('front brake pads'): field 'vehicle_make': 'acura' is",
                     "examples[2] ('rear pads'): field 'part': 'caliper' is not a run of the query's words",
                     "examples[3] ('rear pads'): unknown fields ['price']"):
        assert expected in message, message
    # Nothing false about what could not be checked: 'honda' may well suit the field once it has a kind.
    assert "examples[1]" not in message, message
    assert message.count("\n  - ") == 4, message


def test_every_option_a_field_kind_does_not_take_is_reported(tmp_path: Path) -> None:
    fields = PART + ("  - {name: department, kind: category, description: The department., values: [brakes, engine],"
                     " fill: mentioned, mentions: [brake], heads: [pad]}\n")
    message = problems_of(write(tmp_path, fields))
    for option in ("mentions applies to span fields only", "heads applies to span fields only",
                   "fill: mentioned applies to vocabulary fields"):
        assert f"field 'department' (fields[1]): {option}" in message, message


def test_each_problem_names_its_field_once_in_one_style(tmp_path: Path) -> None:
    bad_pattern = YEAR.replace("\\b(19|20)\\d\\d\\b", "(19|20")
    examples = "examples:\n  - {query: 2015 honda civic brake pads, parse: {part: brake pad, model_year: 2015}}\n"
    message = problems_of(write(tmp_path, PART + bad_pattern, examples))
    assert message.startswith(f"{tmp_path / 'parts.yaml'}: invalid parse spec:\n"), message
    assert "field 'model_year' (fields[1]): pattern '(19|20' is not a regular expression" in message, message
    assert message.count("'model_year'") == 2, message  # once per problem
    assert "examples[0] ('2015 honda civic brake pads'): field 'model_year': unquoted, 2015 is a YAML number" in message
    assert "examples.0" not in message and "fields.1" not in message, message
    # Problems only the grammar finds get the same header.
    examples = "examples:\n  - {query: rear pads, parse: {part: rotor}}\n"
    message = problems_of(write(tmp_path, PART, examples))
    assert message.startswith(f"{tmp_path / 'parts.yaml'}: invalid parse spec:\n"), message
    assert "examples[0] ('rear pads'): field 'part': 'rotor' is not a run" in message, message


def test_spec_check_counts_in_words_and_notes_a_spec_without_examples(tmp_path: Path) -> None:
    path = write(tmp_path, PART + YEAR, "examples: []\n")
    checked = cli("spec", "check", str(path))
    assert checked.returncode == 0, checked.stderr
    assert "model_year (span, 1 pattern)" in checked.stdout and "0 examples" in checked.stdout, checked.stdout
    assert "note: no examples" in checked.stdout and "fine-tuned" in checked.stdout, checked.stdout
    shown = cli("spec", "show", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "1 pattern" in shown.stdout and "1 patterns" not in shown.stdout, shown.stdout
    examples = "examples:\n  - {query: 2015 brake pads, parse: {part: brake pad, model_year: '2015'}}\n"
    one = cli("spec", "check", str(write(tmp_path, PART + YEAR, examples)))
    assert one.returncode == 0, one.stderr
    assert "; 1 example\n" in one.stdout and "note:" not in one.stdout, one.stdout
