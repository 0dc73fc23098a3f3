"""Spec field options that shape the grammar: ``fill: mentioned`` (vocabulary), ``stop_at`` (span),
a span field's known values (``mentions``, ``mentions_file``, ``patterns``) and its ``heads``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from schemas.spec import ParseSpec, SpecError, load_spec, parse_spec_data
from schemas.vocabulary import Vocabulary
from workers.grammar import build_row_grammar, check_value, load_checked_spec, spec_vocabulary

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
MAKER: dict[str, Any] = {
    "name": "maker",
    "kind": "span",
    "description": "The maker.",
    "fill": "mentioned",
    "trim_edges": False,
    "mentions": ["le creuset", "oxo"],
}
CAPACITY: dict[str, Any] = {
    "name": "capacity",
    "kind": "span",
    "description": "How much it holds.",
    "fill": "mentioned",
    "trim_edges": False,
    "patterns": [r"\b\d+(?:\.\d+)? ?(?:qt|quart|l)\b"],
}


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


def test_fill_applies_to_vocabulary_fields_and_span_fields_with_known_values() -> None:
    with pytest.raises(SpecError, match=r"field 'item'.*vocabulary fields and to span fields with mentions"):
        make_spec({**ITEM, "fill": "mentioned"})
    assert make_spec(MAKER).field("maker").fill == "mentioned"
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


def test_a_mentioned_known_value_is_taken_and_its_words_leave_the_other_spans() -> None:
    spec = make_spec(ITEM, MAKER, CAPACITY)
    query = "Le-Creuset 5.5 qt dutch oven"
    # The mention is written as the catalog writes it; the pattern's match as the query says it.
    assert accepts(spec, query, ' {"item": "dutch oven", "maker": "le creuset", "capacity": "5.5 qt"}')
    assert not accepts(spec, query, ' {"item": "dutch oven", "maker": null, "capacity": "5.5 qt"}')
    assert not accepts(spec, query, ' {"item": "dutch oven", "maker": "le creuset", "capacity": null}')
    # Both are forced text once the model has chosen the item.
    assert forced_output(make_spec(MAKER, CAPACITY, ITEM), query).startswith(
        ' {"maker": "le creuset", "capacity": "5.5 qt", "item": ')
    allowed = build_row_grammar(query, Vocabulary(spec), "catalog").allowed["item"]
    assert allowed is not None and "dutch oven" in allowed
    assert not any("creuset" in run or "qt" in run for run in allowed)
    # Nothing known in the query: the model chooses a run of words or null, as for any span field.
    assert accepts(spec, "staub dutch oven", ' {"item": "dutch oven", "maker": "staub", "capacity": null}')
    assert accepts(spec, "staub dutch oven", ' {"item": "dutch oven", "maker": null, "capacity": null}')


def test_without_fill_a_mention_is_offered_beside_the_other_runs() -> None:
    spec = make_spec(ITEM, {**MAKER, "fill": "model"})
    assert accepts(spec, "oxo peeler", ' {"item": "peeler", "maker": "oxo"}')
    assert accepts(spec, "oxo peeler", ' {"item": "peeler", "maker": null}')


def test_patterns_match_whole_words_only() -> None:
    vocabulary = Vocabulary(make_spec(ITEM, CAPACITY))
    assert vocabulary.candidates("capacity", "6 qt pot") == ["6 qt"]
    assert vocabulary.candidates("capacity", "A6 qt pot") == []
    assert vocabulary.candidates("capacity", "6 qts pot") == []
    # Under span grounding known values play no part (it ignores every catalog).
    grammar = build_row_grammar("6 qt pot", vocabulary, "span")
    assert grammar.allowed["capacity"] is not None and "pot" in grammar.allowed["capacity"]


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ({**CAPACITY, "patterns": ["(unclosed"]}, r"field 'capacity'.*pattern '\(unclosed' is not a regular"),
        ({**CAPACITY, "patterns": ["x*"]}, r"field 'capacity'.*matches empty text"),
        ({**MAKER, "mentions": ["--"]}, r"field 'maker'.*mention '--' has no letters or digits"),
        ({**COLOUR, "mentions": ["oxo"]}, r"field 'colour'.*mentions applies to span fields only"),
        ({**COLOUR, "patterns": ["red"]}, r"field 'colour'.*patterns applies to span fields only"),
        ({**MAKER, "values": ["oxo"]}, r"field 'maker'.*takes no values \(mentions are its known values\)"),
        ({**COLOUR, "heads": ["pot"]}, r"field 'colour'.*heads applies to span fields only"),
        ({**MAKER, "heads": ["dutch oven"]}, r"field 'maker'.*head 'dutch oven' is not one word"),
    ],
)
def test_bad_known_values_name_the_field(field: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError, match=expected):
        make_spec(ITEM, field)


def write_kitchen_spec(folder: Path, fields: list[str], examples: str = "") -> Path:
    """A spec file in ``folder`` with these fields (YAML flow mappings) and examples (YAML)."""
    spec_file = folder / "kitchen.yaml"
    spec_file.write_text(
        "name: kitchen\nversion: '1'\ndescription: kitchenware\nfields:\n"
        + "".join(f"  - {{{field}}}\n" for field in fields) + examples,
        encoding="utf-8",
    )
    return spec_file


def test_mentions_file_adds_phrases_one_a_line(tmp_path: Path) -> None:
    (tmp_path / "makers.txt").write_text("# kitchen makers\nall-clad\nsmith, wesson & co\n\n", encoding="utf-8")
    spec_file = write_kitchen_spec(tmp_path, [
        "name: item, kind: span, description: The item.",
        "name: maker, kind: span, description: The maker., fill: mentioned, mentions: [oxo], mentions_file: makers.txt",
    ])
    spec = load_spec(spec_file)
    assert spec.field("maker").mentions == ["oxo", "all-clad", "smith, wesson & co"]
    assert Vocabulary(spec).candidates("maker", "All Clad skillet") == ["all-clad"]
    (tmp_path / "makers.txt").unlink()
    with pytest.raises(SpecError, match=r"field 'maker' \(fields\[1\]\): mentions_file 'makers.txt' not found"):
        load_spec(spec_file)


def test_heads_keep_the_runs_that_end_in_one_and_leave_a_query_without_one_null() -> None:
    spec = make_spec({**ITEM, "heads": ["oven", "Pot"], "stop_at": ["for"]})
    vocabulary = Vocabulary(spec)
    allowed = build_row_grammar("cast iron dutch ovens for camping", vocabulary, "catalog").allowed["item"]
    # Plural or singular, any case: a run ends in a head or is not offered.
    assert allowed == ("cast iron dutch ovens", "iron dutch ovens", "dutch ovens", "ovens")
    assert accepts(spec, "stock pot lid", ' {"item": "stock pot"}')
    assert not accepts(spec, "stock pot lid", ' {"item": "stock pot lid"}')
    # No head in the query (a model name, a title): null is the only answer.
    assert forced_output(spec, "instant pro plus") == ' {"item": null}'
    # Under span grounding heads play no part, as catalogs do not.
    assert "lid" in (build_row_grammar("stock pot lid", vocabulary, "span").allowed["item"] or ())


def test_heads_file_and_examples_that_must_end_in_a_head(tmp_path: Path) -> None:
    (tmp_path / "heads.txt").write_text("# product heads\nskillet\n", encoding="utf-8")
    spec_file = write_kitchen_spec(
        tmp_path, ["name: item, kind: span, description: The item., heads: [pan], heads_file: heads.txt"],
        "examples:\n  - {query: all clad skillet lid, parse: {item: skillet lid}}\n",
    )
    assert load_spec(spec_file).field("item").head_words == {"pan", "skillet"}
    with pytest.raises(SpecError, match=r"skillet lid'.*does not end with one of the field's heads"):
        load_checked_spec(str(spec_file))
    (tmp_path / "heads.txt").unlink()
    with pytest.raises(SpecError, match=r"field 'item' \(fields\[0\]\): heads_file 'heads.txt' not found"):
        load_spec(spec_file)


def test_a_field_written_singular_finds_its_mentions_in_either_number() -> None:
    spec = make_spec({**ITEM, "normalize": ["lowercase", "singular"], "fill": "mentioned",
                      "mentions": ["running shoe", "boots", "shoe rack"]})
    vocabulary = spec_vocabulary(spec)
    assert build_row_grammar("nike running shoes", vocabulary, "catalog").allowed["item"] == ("running shoe",)
    assert build_row_grammar("rain boot", vocabulary, "catalog").allowed["item"] == ("boots",)
    # Matched as written without the engine's singular, and only the last word's number is free.
    assert "running shoe" not in (build_row_grammar("nike running shoes", Vocabulary(spec), "catalog").allowed["item"]
                                  or ())
    assert vocabulary.candidates("item", "shoe racks") == ["shoe rack"]
    assert vocabulary.candidates("item", "shoes rack") == []
    assert spec_vocabulary(make_spec(ITEM, MAKER)).candidates("maker", "oxos peeler") == []


def test_a_mention_after_a_stop_word_gives_way_to_the_words_before_it() -> None:
    spec = make_spec({**ITEM, "stop_at": ["for", "with"], "fill": "mentioned", "mentions": ["phone case", "toys"],
                      "heads": ["charger", "case"]})
    vocabulary = spec_vocabulary(spec)
    assert build_row_grammar("charger for phone case", vocabulary, "catalog").allowed["item"] == ("charger",)
    assert build_row_grammar("phone case with charger", vocabulary, "catalog").allowed["item"] == ("phone case",)
    # Nothing the field could take before the stop word: the mention after it stands.
    assert build_row_grammar("bathbombs with toys inside", vocabulary, "catalog").allowed["item"] == ("toys",)


def test_an_example_the_grammar_cannot_write_is_reported(tmp_path: Path) -> None:
    spec_file = write_kitchen_spec(
        tmp_path, ["name: item, kind: span, description: The item., fill: mentioned, mentions: [oven]"],
        "examples:\n  - {query: dutch oven, parse: {item: dutch oven}}\n",
    )
    with pytest.raises(SpecError, match=r"examples\[0\].*the grammar offers \['oven'\] for this query, not 'dutch"):
        load_checked_spec(str(spec_file))


def test_a_value_without_letters_or_digits_is_no_label() -> None:
    spec = make_spec(ITEM)
    problem = check_value(spec.field("item"), "-", "shirt - blue", spec_vocabulary(spec))
    assert problem is not None and "has no letters or digits" in problem
    # Punctuation aside, the catalog's spelling is the query's words.
    assert check_value(spec.field("item"), "t-shirt", "red t shirt", spec_vocabulary(spec)) is None


def test_extend_mentions_offers_the_longer_runs_that_contain_a_mention() -> None:
    item = {**ITEM, "normalize": ["lowercase", "singular"], "fill": "mentioned", "mentions": ["case"],
            "heads": ["case", "lid"]}
    forced = spec_vocabulary(make_spec(item))
    assert build_row_grammar("star wars pencil cases", forced, "catalog").allowed["item"] == ("case",)
    extended = spec_vocabulary(make_spec({**item, "extend_mentions": True}))
    # The mention first, then every run that contains it (either number) and ends in a head; no null.
    allowed = build_row_grammar("star wars pencil cases", extended, "catalog").allowed["item"]
    assert allowed == ("case", "star wars pencil cases", "wars pencil cases", "pencil cases")
    spec = make_spec({**item, "extend_mentions": True})
    assert accepts(spec, "star wars pencil case", ' {"item": "pencil case"}')
    assert not accepts(spec, "star wars pencil case", ' {"item": null}')
    assert not accepts(spec, "pot lid case", ' {"item": "pot lid"}')
    # Words another field claims stay out of the longer runs.
    both = spec_vocabulary(make_spec({**item, "extend_mentions": True}, {**MAKER, "mentions": ["oxo"]}))
    assert build_row_grammar("oxo pencil case", both, "catalog").allowed["item"] == ("case", "pencil case")
    # The mention in the other number: the same runs, still trimmed and without the other field's words.
    assert build_row_grammar("oxo pencil cases", both, "catalog").allowed["item"] == ("case", "pencil cases")
    assert build_row_grammar("set of oxo pencil cases", both, "catalog").allowed["item"] == ("case", "pencil cases")


def test_without_head_runs_offers_every_run_where_no_run_ends_in_a_head() -> None:
    item = {**ITEM, "heads": ["oven"]}
    assert forced_output(make_spec(item), "instant pro plus") == ' {"item": null}'
    spec = make_spec({**item, "without_head": "runs"})
    allowed = build_row_grammar("instant pro plus", spec_vocabulary(spec), "catalog").allowed["item"]
    assert allowed is not None and "instant pro plus" in allowed and "pro" in allowed
    assert accepts(spec, "instant pro plus", ' {"item": null}')
    # A query with a head keeps the heads' runs only.
    allowed = build_row_grammar("dutch oven lid", spec_vocabulary(spec), "catalog").allowed["item"]
    assert allowed == ("dutch oven", "oven")


@pytest.mark.parametrize(("field", "expected"), [
    ({**ITEM, "without_head": "runs"}, "without_head applies to span fields with heads"),
    ({**ITEM, "extend_mentions": True, "mentions": ["pot"]}, "extend_mentions applies to fields with fill: mentioned"),
    ({**COLOUR, "extend_mentions": True}, "extend_mentions applies to span fields only"),
])
def test_grammar_widening_options_name_their_misuse(field: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError, match=expected):
        make_spec(field)
