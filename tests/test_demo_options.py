"""`qustream demo`'s choice of query log, checked before anything starts (no broker, Redis or model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import producer_tools.demo as demo
from producer_tools.demo import SAMPLE_DIR, DemoSummary, NoSampleQueries, run_demo, sample_queries
from schemas.settings import Settings
from streams.cli import app, register_plugin_commands
from tests.support import write_autoparts_spec

register_plugin_commands([])  # `qustream demo` comes from producer_tools' entry point


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> list[Path | None]:
    """The query logs `qustream demo` would replay; nothing is started."""
    seen: list[Path | None] = []

    def fake_run_demo(settings: Settings, queries: Path | None, timeout_s: float) -> DemoSummary:
        seen.append(queries)
        return DemoSummary({"messages": 0})

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    return seen


def demo_cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["demo", *args], env={"COLUMNS": "400"})


def test_built_in_specs_replay_the_sample_of_their_contract() -> None:
    assert sample_queries("furniture", "furniture") == SAMPLE_DIR / "sample_queries_furniture.jsonl"
    assert sample_queries("ecommerce", "ecommerce") == SAMPLE_DIR / "sample_queries_ecommerce.jsonl"
    # The same contract as ecommerce (its `name`), not the furniture sample.
    assert sample_queries("ecommerce_few_shot", "ecommerce") == SAMPLE_DIR / "sample_queries_ecommerce.jsonl"


def test_a_users_own_spec_has_no_sample_even_under_a_built_in_name(tmp_path: Path) -> None:
    spec = write_autoparts_spec(tmp_path / "spec")
    assert sample_queries(str(spec), "autoparts") is None
    assert sample_queries(str(spec), "furniture") is None


def test_demo_with_a_users_spec_and_no_queries_exits_2_before_starting_anything(
        tmp_path: Path, replays: list[Path | None]) -> None:
    spec = write_autoparts_spec(tmp_path / "spec")
    result = demo_cli("--spec", str(spec))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "error: parse spec 'autoparts'" in result.output and "--queries FILE" in result.output, result.output
    assert replays == []
    queries = tmp_path / "queries.txt"
    queries.write_text("front brake pads\n")
    assert demo_cli("--spec", str(spec), "--queries", str(queries)).exit_code == 0
    assert replays == [queries]
    missing = demo_cli("--spec", str(spec), "--queries", str(tmp_path / "nope.txt"))
    assert missing.exit_code == 2 and "no such file" in missing.output, missing.output
    assert replays == [queries]


def test_demo_says_which_bundled_sample_it_replays(replays: list[Path | None]) -> None:
    result = demo_cli("--spec", "ecommerce_few_shot")
    assert result.exit_code == 0, result.output
    assert replays == [SAMPLE_DIR / "sample_queries_ecommerce.jsonl"]
    assert "bundled sample of spec 'ecommerce'" in result.output


def test_run_demo_refuses_a_spec_without_a_sample_before_starting_the_stack(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_stack(*args: object) -> None:
        raise AssertionError("the demo started its stack")

    monkeypatch.setattr(demo, "LocalStack", no_stack)
    settings = Settings(_env_file=None, parse_spec=str(write_autoparts_spec(tmp_path / "spec")))
    with pytest.raises(NoSampleQueries, match="--queries FILE"):
        run_demo(settings, None, timeout_s=1)
