"""Spec field options that shape the grammar: ``fill: mentioned`` (vocabulary) and ``stop_at`` (span)."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.spec import ParseSpec, SpecError, parse_spec_data
from schemas.vocabulary import Vocabulary
from workers.grammar import build_row_grammar

COLOUR: dict[str, Any] = {
    "name": "colour",
    "kind": "vocabulary",
    "description": "Colour.",
    "fill": "mentioned",
    "values": ["red", "copper"],
}
FINISH: dict[str, Any] = {
    "name": "finish",
    "kind": "vocabulary",
    "description": "Surface finish.",
    "fill": "mentioned",
    "values": ["matte", "copper"],
}
AUDIENCE: dict[str, Any] = {
    "name": "audience",
    "kind": "vocabulary",
    "description": "Who it is for.",
    "fill": "mentioned",
    "values": [{"value": "women", "forms": ["womens", "ladies"]}],
}
ITEM: dict[str, Any] = {"name": "item", "kind": "span", "description": "The item."}


def make_spec(*fields: dict[str, Any]) -> ParseSpec:
    data = {"name": "kitchenware", "version": "1", "description": "kitchenware", "fields": list(fields)}
    return parse_spec_data(data)


def accepts(spec: ParseSpec, query: str, output: str) -> bool:
    import xgrammar as xgr

    # Acceptance of whole strings does not depend on the tokenizer's vocabulary.
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(["a"]), max_threads=1)
    grammar = build_row_grammar(query, Vocabulary(spec), "catalog")
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(grammar.ebnf))
    return bool(matcher.accept_string(output)) and bool(matcher.is_completed())


def forced_output(spec: ParseSpec, query: str) -> str:
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(["a"]), max_threads=1)
    grammar = build_row_grammar(query, Vocabulary(spec), "catalog")
    return str(xgr.GrammarMatcher(compiler.compile_grammar(grammar.ebnf)).find_jump_forward_string())


def test_fill_applies_to_vocabulary_fields_only() -> None:
    with pytest.raises(SpecError, match=r"field 'item'.*vocabulary fields only"):
        make_spec({**ITEM, "fill": "mentioned"})
    with pytest.raises(SpecError, match="fill"):
        make_spec({**AUDIENCE, "fill": "always"})
    assert make_spec(ITEM).field("item").fill == "model"


def test_a_lone_mention_is_written_without_a_model_step() -> None:
    spec = make_spec(AUDIENCE, ITEM)
    # The whole audience value is forced text: the engine appends it without a forward pass.
    assert forced_output(spec, "ladies apron").startswith(' {"audience": "women"')
    assert not accepts(spec, "ladies apron", ' {"audience": null, "item": "apron"}')
    # No mention: null is the only choice, as without the option.
    assert forced_output(spec, "apron").startswith(' {"audience": null')


def test_fill_in_a_group_gives_each_mention_to_one_field() -> None:
    spec = make_spec(ITEM, COLOUR, FINISH, AUDIENCE)
    query = "womens red matte mug"
    assert accepts(spec, query, ' {"item": "mug", "colour": "red", "finish": "matte", "audience": "women"}')
    assert not accepts(spec, query, ' {"item": "mug", "colour": null, "finish": "matte", "audience": "women"}')
    assert not accepts(spec, query, ' {"item": "mug", "colour": "red", "finish": "matte", "audience": null}')


def test_words_two_fields_claim_are_left_to_the_model() -> None:
    spec = make_spec(ITEM, COLOUR, FINISH)
    query = "copper kettle"
    assert accepts(spec, query, ' {"item": "kettle", "colour": "copper", "finish": null}')
    assert accepts(spec, query, ' {"item": "kettle", "colour": null, "finish": "copper"}')
    # One mention fills one field, and a filled field may not leave its mention unused.
    assert not accepts(spec, query, ' {"item": "kettle", "colour": "copper", "finish": "copper"}')
    assert not accepts(spec, query, ' {"item": "kettle", "colour": null, "finish": null}')


def test_without_fill_the_model_may_still_write_null() -> None:
    spec = make_spec(ITEM, {**COLOUR, "fill": "model"}, {**FINISH, "fill": "model"})
    assert accepts(spec, "red matte mug", ' {"item": "mug", "colour": null, "finish": null}')


def test_stop_at_takes_runs_from_the_words_before_a_connective() -> None:
    spec = make_spec({**ITEM, "stop_at": ["for", "with"]})
    allowed = build_row_grammar("phone case for iphone with stand", Vocabulary(spec), "catalog").allowed["item"]
    assert allowed is not None
    assert "phone case" in allowed
    assert not any("iphone" in run or "stand" in run for run in allowed)
    # A query that starts with the word, or has nothing usable before it, keeps the whole query.
    assert "mom" in (build_row_grammar("for mom", Vocabulary(spec), "catalog").allowed["item"] or ())
    assert "kids" in (build_row_grammar("2 for kids", Vocabulary(spec), "catalog").allowed["item"] or ())
    with pytest.raises(SpecError, match=r"field 'colour'.*span fields only"):
        make_spec({**COLOUR, "stop_at": ["for"]})
