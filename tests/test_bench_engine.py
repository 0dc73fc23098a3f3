"""``qustream bench engine`` runs every engine variant on the same queries and reports them side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def test_bench_engine_runs_every_variant_with_the_same_parses(tmp_path: Path) -> None:
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join((DATA / "quality_furniture.jsonl").read_text(encoding="utf-8").splitlines(True)[:8]))
    out = tmp_path / "engine.json"
    subprocess.run(
        [sys.executable, "-m", "streams.cli", "bench", "engine", "--queries", str(queries), "--batch-size", "4",
         "--skip-sequential", "--skip-batched", "--spec", "furniture", "--json", str(out)],
        check=True, capture_output=True, timeout=600, env={**os.environ, "QUSTREAM_CPU_THREADS": "2"},
    )
    report = json.loads(out.read_text())
    names = [variant["name"] for variant in report["variants"]]
    assert names == ["c_engine", "c_engine_jump_forward_full", "c_engine_jump_forward_balanced", "c_engine_packed"]
    # Decoding options change speed, never parses: every variant scores the same on the labelled queries.
    scores = {json.dumps(variant["metrics"], sort_keys=True) for variant in report["variants"]}
    assert len(scores) == 1
    assert all(variant["queries"] == 8 and variant["queries_per_s"] > 0 for variant in report["variants"])
    assert {"balanced/full@4", "packed/balanced@4"} <= set(report["ratios"])
