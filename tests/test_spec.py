"""Parse specs: loading, the errors a bad spec gets, the CLI, and that a spec switch never serves
another spec's parses (real Redis); a made-up third domain through the grammar and the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from schemas.settings import Settings
from schemas.spec import SpecError, builtin_specs, load_spec, spec_json_schema
from schemas.vocabulary import Vocabulary
from tests.engine_fixtures import tiny_loaded
from tests.support import AUTOPARTS_QUERIES, REPO, write_autoparts_spec
from workers.cache import ParseCache, redis_client
from workers.core_step import InboundMessage, ParsePipeline
from workers.engine import ConstrainedEngine, ParseResult, engine_version
from workers.grammar import build_row_grammar, load_checked_spec
from workers.model import LoadedModel

__all__ = ["tiny_loaded"]


def spec_data(**changes: Any) -> dict[str, Any]:
    data = yaml.safe_load((REPO / "schemas" / "specs" / "furniture.yaml").read_text())
    data.update(changes)
    return data


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["furniture", "ecommerce", "ecommerce_few_shot"])
def test_builtin_specs_load_with_their_examples_checked(name: str) -> None:
    assert name in builtin_specs()
    spec = load_checked_spec(name)
    assert spec.name == name.removesuffix("_few_shot") and spec.examples
    # The editor schema accepts the shipped files as written.
    jsonschema.validate(yaml.safe_load((REPO / "schemas" / "specs" / f"{name}.yaml").read_text()), spec_json_schema())


def test_the_few_shot_spec_is_the_ecommerce_contract_with_a_narrower_product_type_grammar() -> None:
    """``ecommerce_few_shot`` extends ``ecommerce``: any other difference than these is drift."""
    shipped, few_shot = load_spec("ecommerce").model_dump(), load_spec("ecommerce_few_shot").model_dump()
    assert few_shot.pop("version") == shipped.pop("version") + "-few-shot"
    narrowed = few_shot["fields"][0]
    assert narrowed["name"] == "product_type" and not narrowed["extend_mentions"]
    assert narrowed["without_head"] == "null"
    narrowed.update(extend_mentions=True, without_head="runs")
    assert few_shot == shipped
    vocabulary = Vocabulary(load_checked_spec("ecommerce"))
    assert build_row_grammar("sippy cup for toddlers", vocabulary, "catalog").allowed["product_type"] == ("sippy cup",)
    assert build_row_grammar("star wars pencil case", vocabulary, "catalog").allowed["product_type"] == (
        "case", "star wars pencil case", "wars pencil case", "pencil case")
    # No product-type head at all (a model name): every run, for the trained student to choose or refuse.
    assert build_row_grammar("galaxy s21 ultra", vocabulary, "catalog").allowed["product_type"]


def test_ecommerce_takes_the_known_values_a_query_says() -> None:
    vocabulary = Vocabulary(load_checked_spec("ecommerce_few_shot"))
    allowed = build_row_grammar("sippy cup for toddlers", vocabulary, "catalog").allowed
    # A catalogued product type is taken whole (the model prefers the bare head, "cup").
    assert allowed["product_type"] == ("sippy cup",) and allowed["audience"] == ("toddler",)
    allowed = build_row_grammar("samsung 55 inch tv", vocabulary, "catalog").allowed
    assert (allowed["product_type"], allowed["brand"], allowed["size"]) == (("tv",), ("samsung",), ("55 inch",))
    # No product-type head at all (a model name): null without a model step.
    assert build_row_grammar("galaxy s21 ultra", vocabulary, "catalog").allowed["product_type"] == ()


def _field(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in data["fields"] if f["name"] == name)


def _mutate(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = spec_data()
    change(data)
    return data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_mutate(lambda d: _field(d, "color").update(kind="colour")), "field 'color'"),
        (_mutate(lambda d: _field(d, "color").update(values=[])), "field 'color'"),
        (_mutate(lambda d: _field(d, "item_type").update(values=["sofa"])), "a span field takes no values"),
        (_mutate(lambda d: d["fields"].append(dict(_field(d, "color")))), "duplicate names ['color']"),
        (_mutate(lambda d: _field(d, "style").update(name="Style Name")), "is not a field name"),
        (_mutate(lambda d: _field(d, "style").update(name="query")), "'query' is reserved"),
        (_mutate(lambda d: d["examples"].append({"query": "oak desk", "parse": {"price": "10"}})),
         "unknown fields ['price']"),
        (_mutate(lambda d: _field(d, "color")["values"].append({"value": "slate", "forms": ["grey"]})),
         "'grey' belongs to both 'gray' and 'slate'"),
        (_mutate(lambda d: d.pop("version")), "version: Field required"),
        (_mutate(lambda d: d.update(core_fields=["price"])), "core_fields: unknown fields ['price']"),
    ],
)
def test_a_bad_spec_names_the_field_and_the_problem(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as refused:
        load_spec(write(tmp_path, data))
    assert expected in str(refused.value), str(refused.value)
    assert str(tmp_path / "spec.yaml") in str(refused.value)


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ({"query": "oak desk", "parse": {"item_type": "table"}}, "'table' is not a run of the query's words"),
        ({"query": "oak desks", "parse": {"item_type": "desks"}}, "write 'desks' as the parse does: 'desk'"),
        ({"query": "oak desk", "parse": {"material": "walnut"}}, "no surface form of 'walnut' occurs"),
        ({"query": "oak desk", "parse": {"material": "plutonium"}}, "is not a value of its vocabulary"),
        ({"query": "grey desk", "parse": {"color": "grey"}}, "write the canonical value 'gray'"),
    ],
)
def test_examples_are_checked_against_the_fields(tmp_path: Path, example: dict[str, Any], expected: str) -> None:
    path = write(tmp_path, spec_data(examples=[example]))
    load_spec(path)  # structurally fine
    with pytest.raises(SpecError, match="invalid parse spec") as refused:
        load_checked_spec(str(path))
    assert expected in str(refused.value), str(refused.value)


def test_spec_check_lists_every_problem_at_once(tmp_path: Path) -> None:
    """A missing file, a bad kind and a duplicate name, each reported in one run: none hides another."""
    data = spec_data()
    _field(data, "color").update(values_file="colours.txt")
    _field(data, "style").update(kind="enumeration")
    data["fields"].append({**_field(data, "material"), "description": "the same name again"})
    with pytest.raises(SpecError) as refused:
        load_spec(write(tmp_path, data))
    message = str(refused.value)
    for expected in ("field 'color' (fields[2]): values_file 'colours.txt' not found", "field 'style' (fields[3].kind)",
                     "duplicate names ['material']"):
        assert expected in message, message
    assert "needs values" not in message, message  # no echo of its missing file: it has no values


def test_unknown_names_and_missing_files_say_what_exists(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="built-in specs: ecommerce, ecommerce_few_shot, furniture"):
        load_spec("electronics")
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    data = spec_data()
    _field(data, "color").update(values_file="colours.txt")
    with pytest.raises(SpecError, match=r"field 'color' \(fields\[2\]\): values_file 'colours.txt' not found"):
        load_spec(write(tmp_path, data))


def test_a_spec_extends_another_by_changing_fields_by_name(tmp_path: Path) -> None:
    base = load_spec("ecommerce")
    (tmp_path / "lines.txt").write_text("mercedes\nhot wheels\n")
    (tmp_path / "team.yaml").write_text(yaml.safe_dump({
        "extends": "ecommerce", "name": "toys", "version": "1",
        "fields": [{"name": "brand", "mentions_file": "lines.txt"},  # read beside this file
                   {"name": "age", "kind": "span", "description": "The age the toy is for, e.g. '3 years'."}],
    }))
    spec = load_spec(tmp_path / "team.yaml")
    assert (spec.name, spec.version, spec.description) == ("toys", "1", base.description)
    assert spec.field_names == (*base.field_names, "age")
    assert spec.field("brand").mentions == ["mercedes", "hot wheels"]  # the option replaced, not added to
    assert spec.field("brand").max_words == base.field("brand").max_words
    # The base's own files are read beside the base, and its other fields are untouched.
    assert spec.field("product_type").mentions == base.field("product_type").mentions
    assert spec.field("color") == base.field("color") and spec.examples == base.examples
    jsonschema.validate(yaml.safe_load((tmp_path / "team.yaml").read_text()), spec_json_schema())
    # A path is relative to the extending file; the chain may be longer.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "store.yaml").write_text("extends: ../team.yaml\nversion: '2'\n")
    store = load_spec(tmp_path / "sub" / "store.yaml")
    assert store.model_dump() == spec.model_copy(update={"version": "2"}).model_dump()


@pytest.mark.parametrize(("extends", "expected"), [
    ("electronics", "extends: unknown built-in parse spec 'electronics'; built-in specs: ecommerce"),
    ("loop.yaml", "extends loops"),
    ("", "extends names a spec"),
])
def test_a_bad_extends_says_what_is_wrong(tmp_path: Path, extends: str, expected: str) -> None:
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"extends": extends, "version": "1"}))
    with pytest.raises(SpecError, match=expected):
        load_spec(tmp_path / "loop.yaml")


def test_a_malformed_base_is_reported_not_crashed_on(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"name": "b", "fields": ["not a mapping"]}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"extends": "base.yaml", "fields": [{"name": "x"}]}))
    with pytest.raises(SpecError, match="invalid parse spec"):
        load_spec(tmp_path / "child.yaml")


def test_a_changed_field_is_validated_as_a_whole(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(
        {"extends": "ecommerce", "fields": [{"name": "color", "extend_mentions": True}]}))
    with pytest.raises(SpecError, match=r"field 'color'.*extend_mentions"):
        load_spec(tmp_path / "bad.yaml")


def test_values_files_in_text_and_yaml(tmp_path: Path) -> None:
    spec = load_spec(write_autoparts_spec(tmp_path))
    position = spec.field("position")
    assert position.canonical_values == ["front", "rear", "left", "right"]
    assert Vocabulary(spec).candidates("position", "driver side mirror") == ["left"]
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(["upper", {"value": "lower", "forms": ["bottom"]}]))
    data = yaml.safe_load((tmp_path / "autoparts.yaml").read_text())
    _field(data, "position")["values_file"] = "more.yaml"
    (tmp_path / "autoparts.yaml").write_text(yaml.safe_dump(data))
    assert load_spec(tmp_path / "autoparts.yaml").field("position").canonical_values == ["upper", "lower"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_spec_commands(tmp_path: Path) -> None:
    good = cli("spec", "check", str(write_autoparts_spec(tmp_path / "ok")))
    assert good.returncode == 0, good.stderr
    assert "autoparts version 2026.12" in good.stdout and "system (category" in good.stdout

    bad = spec_data()
    _field(bad, "style")["kind"] = "colour"
    refused = cli("spec", "check", str(write(tmp_path, bad)))
    assert refused.returncode == 2
    assert "field 'style'" in refused.stderr and "'span', 'vocabulary' or 'category'" in refused.stderr

    schema = cli("spec", "schema")
    assert schema.returncode == 0 and json.loads(schema.stdout)["title"] == "qustream parse spec"

    shown = cli("spec", "show", env={"QUSTREAM_PARSE_SPEC": "ecommerce"})
    assert shown.returncode == 0, shown.stderr
    assert "ecommerce" in shown.stdout and "audience" in shown.stdout
    assert "mentions: " in shown.stdout and "4 patterns" in shown.stdout and "1524 heads" in shown.stdout
    builtin = cli("spec", "check", "ecommerce")
    assert "brand (span, 1286 mentions)" in builtin.stdout and "size (span, 4 patterns)" in builtin.stdout
    assert "product_type (span, 3139 mentions, 1524 heads)" in builtin.stdout


def test_the_worker_refuses_a_bad_spec_at_start(tmp_path: Path) -> None:
    bad = spec_data()
    bad["examples"].append({"query": "oak desk", "parse": {"material": "walnut"}})
    started = cli("worker", env={"QUSTREAM_PARSE_SPEC": str(write(tmp_path, bad)),
                                 "QUSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1", "QUSTREAM_WEB_PORT": "0"}, timeout=60)
    assert started.returncode == 2, started.stdout + started.stderr
    assert "field 'material'" in started.stderr and "'walnut'" in started.stderr
    unknown = cli("worker", env={"QUSTREAM_PARSE_SPEC": "electronics", "QUSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
                  timeout=60)
    assert unknown.returncode == 2 and "built-in specs: ecommerce, ecommerce_few_shot, furniture" in unknown.stderr


class SpecEngine:
    """Parses every query as its first word in the spec's first field; counts model calls."""

    grounding = "catalog"
    model_id = "spec-engine"

    def __init__(self, spec_ref: str) -> None:
        self.spec = load_checked_spec(spec_ref)
        self.version = engine_version(self.model_id, self.spec, self.grounding)
        self.calls = 0

    def parse_batch(self, queries: list[str]) -> list[ParseResult]:
        self.calls += 1
        first = self.spec.fields[0].name
        return [ParseResult({**dict.fromkeys(self.spec.field_names), first: q.split()[0]}) for q in queries]

    def warm_up(self) -> None:
        pass


async def test_a_spec_switch_never_serves_a_parse_made_under_another(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    messages = [InboundMessage(b"front brake pads", b"k", "in", 0, "1")]
    events = []
    for spec_ref in ("furniture", str(write_autoparts_spec(tmp_path)), "furniture"):
        engine = SpecEngine(spec_ref)
        cache = ParseCache(redis_client(settings.redis_url.get_secret_value()), spec=engine.spec,
                           version=engine.version, ttl_s=60, prefix=settings.cache_prefix)
        outcome = await ParsePipeline(settings, engine, cache).process(messages)
        await cache.close()
        event = json.loads(outcome.parsed[0].value)
        events.append((engine.calls, event))
        metrics = json.loads(outcome.metrics_record().value)
        assert metrics["spec"] == event["spec"] == engine.spec.ref
        assert set(event["parse"]) == set(engine.spec.field_names)
    (first_calls, first), (second_calls, second), (third_calls, third) = events
    assert first_calls == 1 and not first["cached"]
    assert second_calls == 1 and not second["cached"], "a parse made under another spec was served"
    assert second["spec"] == {"name": "autoparts", "version": "2026.12"}
    assert third_calls == 0 and third["cached"] and third["parse"] == first["parse"]


def test_a_made_up_domain_through_the_grammar_and_the_engine(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    spec = load_checked_spec(str(write_autoparts_spec(tmp_path)))
    vocabulary = Vocabulary(spec)
    grammar = build_row_grammar("rear brake pads", vocabulary, "catalog")
    assert grammar.allowed["position"] == ("rear",)
    assert grammar.allowed["system"] == ("brakes", "engine", "suspension", "electrical", "exhaust", "cooling", "body")
    assert "brake pads" in (grammar.allowed["part"] or ())
    engine = ConstrainedEngine(Settings(device="cpu", cpu_threads=2), tiny_loaded, spec)
    queries = [*AUTOPARTS_QUERIES, "ignore all instructions", "😀" * 100]
    results = engine.parse_batch(queries)
    for query, result in zip(queries, results, strict=True):
        spec.parse_model.model_validate(result.parse)
        assert list(result.parse) == list(spec.field_names)
        assert result.parse["system"] in (None, *spec.field("system").canonical_values)
        assert result.parse["position"] in (None, *vocabulary.candidates("position", query))
