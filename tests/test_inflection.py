"""The singulariser on real shopping queries: hand-checked pairs, and the cases that went wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workers.inflection import singular_noun, singular_phrase

_PAIRS = [json.loads(line) for line in (Path(__file__).parent / "data" / "singular_pairs.jsonl").read_text()
          .splitlines()]


@pytest.mark.parametrize("pair", _PAIRS, ids=[pair["span"] for pair in _PAIRS])
def test_hand_checked_product_types_come_out_singular(pair: dict[str, str]) -> None:
    assert pair["span"] in pair["query"].lower()
    assert singular_phrase(pair["span"]) == pair["singular"]


def test_a_singular_phrase_is_left_as_it_is() -> None:
    for pair in _PAIRS:
        assert singular_phrase(pair["singular"]) == pair["singular"], pair


@pytest.mark.parametrize(("word", "singular"), [
    ("christmas", "christmas"), ("cactus", "cactus"), ("gas", "gas"), ("dress", "dress"), ("glass", "glass"),
    ("chassis", "chassis"), ("lens", "lens"), ("tvs", "tv"), ("boxes", "box"), ("knives", "knife"),
    ("shelves", "shelf"), ("batteries", "battery"), ("cookies", "cookie"), ("benches", "bench"),
    ("mattresses", "mattress"), ("loveseats", "loveseat"), ("ottomans", "ottoman"), ("vases", "vase"),
])
def test_singular_noun(word: str, singular: str) -> None:
    assert singular_noun(word) == singular


def test_whitespace_is_collapsed_and_empty_text_kept() -> None:
    assert singular_phrase("  bar   stools ") == "bar stool"
    assert singular_phrase("") == ""
    assert singular_phrase("and") == "and"
