"""The LoRA adapter shipped for the built-in ``ecommerce`` spec, on the real default model.

``QUSTREAM_ADAPTER=auto`` merges it only for the exact spec it was trained under: a change to
``ecommerce.yaml`` that changes its fingerprint would silently stop serving the student, so the
fingerprint is checked here, and the student is checked to parse better than the few-shot model on
the first validation queries.
"""

from __future__ import annotations

import json

import pytest

from schemas.settings import Settings
from schemas.spec import load_spec
from tests.engine_fixtures import default_model_dir
from workers.engine import ConstrainedEngine, build_engine, version_for
from workers.evaluation import load_quality, parse_cases, score
from workers.model import MODEL_CARD, SHIPPED_ADAPTERS, card_for, model_id_for, resolve_adapter

ECOMMERCE = load_spec("ecommerce")
SHIPPED = SHIPPED_ADAPTERS / "ecommerce"


def test_the_ecommerce_adapter_is_shipped_for_exactly_its_spec_and_the_default_model() -> None:
    card = json.loads((SHIPPED / MODEL_CARD).read_text())
    assert card["spec"] == {**ECOMMERCE.ref, "fingerprint": ECOMMERCE.fingerprint}, (
        "ecommerce.yaml changed since its adapter was trained: retrain it (docs/training.md) or revert the spec")
    assert card["base_model"] == model_id_for(Settings()) and card["few_shot"] is False
    assert resolve_adapter(Settings(parse_spec="ecommerce"), ECOMMERCE.fingerprint) == SHIPPED
    for other in ("ecommerce_few_shot", "furniture"):
        assert resolve_adapter(Settings(parse_spec=other), load_spec(other).fingerprint) is None, other
    assert resolve_adapter(Settings(parse_spec="ecommerce", adapter="none"), ECOMMERCE.fingerprint) is None
    assert card_for(Settings(parse_spec="ecommerce"), ECOMMERCE.fingerprint) == card


@pytest.mark.timeout(600)
def test_ecommerce_is_served_by_its_student_which_beats_the_few_shot_model() -> None:
    if default_model_dir() is None:
        pytest.skip("default model not prepared")
    cases = load_quality(ECOMMERCE)[:120]
    scores = {}
    for spec in ("ecommerce", "ecommerce_few_shot"):
        settings = Settings(parse_spec=spec, device="cpu", cpu_threads=2)
        engine = build_engine(settings)
        assert isinstance(engine, ConstrainedEngine) and engine.version == version_for(settings)
        assert engine.few_shot is (spec == "ecommerce_few_shot")
        parses, _, _ = parse_cases(engine, cases)
        scores[spec] = score(engine.spec, cases, parses)
        engine.close()
    student, few_shot = scores["ecommerce"], scores["ecommerce_few_shot"]
    assert student["schema_valid"] == 1.0
    assert student["all_fields_acc"] > few_shot["all_fields_acc"] + 0.03, scores
    assert student["invented_absent"] <= few_shot["invented_absent"] + 0.03, scores
