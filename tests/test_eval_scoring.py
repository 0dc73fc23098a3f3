"""`qustream eval` scores a label in any form `qustream train` accepts as the value the parse writes."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.spec import load_spec
from tests.support import write_autoparts_spec
from workers.evaluation import field_correct, load_quality, score


def _labelled(tmp_path: Path, rows: list[dict[str, object]]) -> Path:
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_labels_are_compared_in_the_form_the_parse_writes(tmp_path: Path) -> None:
    spec = load_spec(str(write_autoparts_spec(tmp_path / "spec")))
    cases = load_quality(spec, _labelled(tmp_path, [
        # a vocabulary synonym, a span in the plural and capitalised, a category in capitals
        {"query": "back radiator hoses", "part": "Radiator Hoses", "position": "back", "system": "Cooling"},
        # punctuation aside: the parse of "cv-axle" may write "cv axle"
        {"query": "frt cv-axle", "part": "cv-axle", "position": "frt", "system": None},
    ]))
    parses = [
        {"part": "radiator hose", "position": "rear", "system": "cooling"},
        {"part": "cv axle", "position": "front", "system": None},
    ]
    metrics = score(spec, cases, parses)
    assert metrics["all_fields_acc"] == 1.0, (metrics, [case.expected for case in cases])


def test_a_wrong_value_stays_wrong_whatever_its_form(tmp_path: Path) -> None:
    spec = load_spec(str(write_autoparts_spec(tmp_path / "spec")))
    [case] = load_quality(spec, _labelled(tmp_path, [
        {"query": "rear brake pads", "part": "brake pads", "position": "back", "system": "brakes"},
    ]))
    assert not field_correct(case.expected["position"], "front")
    assert not field_correct(case.expected["part"], "brake")  # one word short is another value
    assert not field_correct(case.expected["part"], None)
    assert field_correct(case.expected["part"], "brake pad")
    assert field_correct(case.expected["position"], "rear")
