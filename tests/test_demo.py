"""`qustream demo` on a short log, against the session's broker and Redis (it starts neither)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from producer_tools.demo import run_demo
from schemas.settings import Settings
from streams.local_stack import LocalStack

pytestmark = pytest.mark.e2e


def test_demo_summary_counts_what_came_back(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(model_cache_dir=Path.home() / ".cache" / "qustream")
    log = tmp_path / "queries.jsonl"
    queries = ["oak bar stool", "grey linen sofa", "oak bar stool", "Oak Bar Stool", "walnut desk"]
    log.write_text("\n".join([*(json.dumps({"query": q}) for q in queries), '{"query": ""}']) + "\n")
    before = LocalStack(settings).load()

    summary = run_demo(settings, log, timeout_s=300)

    assert summary.ok
    assert summary.figures["messages"] == 6
    assert summary.figures["parsed"] == 5
    assert summary.figures["dead-lettered"] == 1
    assert summary.figures["cached"] == 2, "two repeats of 'oak bar stool' come back cached"
    # One sample per distinct query; which spelling of "oak bar stool" is read back first depends on
    # the order the partitions are read in.
    assert sorted(row["query"].lower() for row in summary.samples) == ["grey linen sofa", "oak bar stool",
                                                                        "walnut desk"]
    assert LocalStack(settings).load() == before, "the demo started nothing, so it must stop nothing"
