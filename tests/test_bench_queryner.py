"""``qustream bench queryner``: QueryNER rows as labelled JSONL, and the brand catalog and product-type
heads of a split."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from bench.cli import app as bench_app
from bench.queryner import head_catalog, mention_catalog
from schemas.spec import load_spec
from workers.inflection import singular_noun


def write_split(folder: Path, rows: list[tuple[str, dict[str, list[str]]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"query": q, "spans": spans}) + "\n" for q, spans in rows), encoding="utf-8")
    return path


ROWS = [
    ("apple watch band", {"creator": ["apple"], "core_product_type": ["watch band"]}),
    ("apple ipad case", {"creator": ["apple"], "core_product_type": ["case"]}),
    ("apple cider vinegar", {"core_product_type": ["apple cider vinegar"]}),
    ("pink hoodie", {"color": ["pink"], "core_product_type": ["hoodie"]}),
    ("pink sweatpants", {"creator": ["pink"], "core_product_type": ["sweatpants"]}),
    ("pink socks", {"color": ["pink"], "core_product_type": ["socks"]}),
    ("Under-Armour shorts", {"creator": ["Under-Armour"], "core_product_type": ["shorts"]}),
    ("under armour shirt", {"creator": ["under armour"], "core_product_type": ["shirt"]}),
    ("365 water", {"creator": ["365"], "core_product_type": ["water"]}),
]


def test_a_phrase_joins_the_catalog_when_most_queries_that_say_it_label_it(tmp_path: Path) -> None:
    catalog = mention_catalog(write_split(tmp_path, ROWS), "creator")
    # apple: a brand in 2 of its 3 queries; pink: in 1 of 3; a phrase without letters never joins; one
    # phrase per match form, as most of the split's rows write it (the first, on a tie).
    assert catalog == ["apple", "under-armour"]


def test_a_catalog_written_singular_counts_either_number_of_a_phrase(tmp_path: Path) -> None:
    rows = [
        ("running shoes", {"core_product_type": ["running shoes"]}),
        ("running shoes men", {"core_product_type": ["running shoes"]}),
        ("nike running shoe", {"creator": ["nike"], "core_product_type": ["running shoe"]}),
        ("running shoe laces", {"core_product_type": ["laces"]}),
    ]
    source = write_split(tmp_path, rows)
    assert mention_catalog(source, "core_product_type") == ["laces", "running shoe", "running shoes"]
    assert mention_catalog(source, "core_product_type", singular=singular_noun) == ["laces", "running shoes"]


def write_catalog(tmp_path: Path, option: str, out: Path) -> str:
    """Run ``bench queryner --split train OPTION OUT`` on ROWS; its output."""
    source = tmp_path / "queryner"
    write_split(source, ROWS)
    result = CliRunner().invoke(bench_app, ["queryner", "--split", "train", "--source", str(source), option, str(out)])
    assert result.exit_code == 0, result.output
    return result.output


def test_brands_out_writes_a_mentions_file_the_spec_loads(tmp_path: Path) -> None:
    out = tmp_path / "brands.txt"
    assert "2 brands" in write_catalog(tmp_path, "--brands-out", out)
    spec_file = tmp_path / "shop.yaml"
    spec_file.write_text(
        "name: shop\nversion: '1'\ndescription: shop\nfields:\n"
        "  - {name: item, kind: span, description: The item.}\n"
        f"  - {{name: brand, kind: span, description: The brand., fill: mentioned, mentions_file: {out.name}}}\n",
        encoding="utf-8",
    )
    assert load_spec(spec_file).field("brand").mentions == ["apple", "under-armour"]


def test_heads_are_the_last_words_of_labelled_product_types_written_singular(tmp_path: Path) -> None:
    spec = load_spec("ecommerce")
    assert head_catalog(write_split(tmp_path, ROWS), spec) == [
        "band", "case", "hoodie", "shirt", "shorts", "sock", "sweatpants", "vinegar", "water"]
    assert head_catalog(write_split(tmp_path, [*ROWS, ("wool socks", {"core_product_type": ["socks"]})]),
                        spec, min_count=2) == ["sock"]


def test_heads_out_writes_a_heads_file(tmp_path: Path) -> None:
    out = tmp_path / "heads.txt"
    assert "9 product-type heads" in write_catalog(tmp_path, "--heads-out", out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("# The product-type heads of QueryNER's train split")
    assert lines[2:] == ["band", "case", "hoodie", "shirt", "shorts", "sock", "sweatpants", "vinegar", "water"]


def test_product_types_out_writes_the_catalogued_product_types(tmp_path: Path) -> None:
    out = tmp_path / "product_types.txt"
    assert "9 product types" in write_catalog(tmp_path, "--product-types-out", out)
    assert out.read_text(encoding="utf-8").splitlines()[2:] == [
        "apple cider vinegar", "case", "hoodie", "shirt", "shorts", "socks", "sweatpants", "watch band", "water"]
