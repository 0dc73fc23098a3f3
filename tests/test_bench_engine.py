"""``qustream bench engine`` runs every engine variant on the same queries and reports them side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.settings import Settings
from workers.engine import version_for
from workers.model import bf16_native

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("spec", ["furniture", "ecommerce"])
def test_bench_engine_runs_every_variant_with_the_same_parses(tmp_path: Path, spec: str) -> None:
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join((DATA / f"quality_{spec}.jsonl").read_text(encoding="utf-8").splitlines(True)[:8]))
    out = tmp_path / "engine.json"
    subprocess.run(
        [sys.executable, "-m", "streams.cli", "bench", "engine", "--queries", str(queries), "--batch-size", "4",
         "--skip-sequential", "--spec", spec, "--json", str(out)],
        check=True, capture_output=True, timeout=600, env={**os.environ, "QUSTREAM_CPU_THREADS": "2"},
    )
    report = json.loads(out.read_text())
    # What the worker would serve for this spec: for ecommerce, the default model with its shipped adapter.
    assert report["engine_version"] == version_for(Settings(parse_spec=spec))
    assert (report["engine_adapter"] is not None) == (spec == "ecommerce")
    names = [variant["name"] for variant in report["variants"]]
    # Where the CPU computes bf16 natively, the default variant runs in bf16 too, beside fp32.
    bf16 = ["c_engine_packed_bf16"] if bf16_native("cpu") else []
    assert names == ["b_batched_generate", "c_engine", "c_engine_jump_forward_full",
                     "c_engine_jump_forward_balanced", "c_engine_packed_unguessed", "c_engine_packed", *bf16]
    # The baseline is the original service: the model as it is, prompted with the spec's examples (the
    # shipped student is prompted without them and writes no JSON of its own).
    baseline, engine = report["variants"][0], report["variants"][1]
    if spec == "ecommerce":
        assert baseline["mean_tokens_in"] > engine["mean_tokens_in"] + 100
        assert baseline["schema_valid"] > 0.5
    else:
        assert baseline["mean_tokens_in"] == engine["mean_tokens_in"]
    # Decoding options change speed, never parses: every variant scores the same on the labelled queries.
    scores = {json.dumps(variant["metrics"], sort_keys=True) for variant in report["variants"][1:]
              if not variant["name"].endswith("_bf16")}
    assert len(scores) == 1
    # bf16 rounds differently: its parses may differ, and the report counts how many.
    if bf16:
        assert "bf16/fp32@4" in report["ratios"]
        assert 0 <= report["bf16_parses_differ"]["4"] <= 8
        assert report["variants"][-1]["schema_valid"] == 1.0
    else:
        assert report["bf16_parses_differ"] == {}
    assert all(variant["queries"] == 8 and variant["queries_per_s"] > 0 for variant in report["variants"])
    assert {"balanced/full@4", "packed/balanced@4", "guessed/unguessed@4"} <= set(report["ratios"])
    # Guessed choices save passes and change no parse.
    assert report["guessed_parses_differ"] == {"4": 0}
    by_name = {variant["name"]: variant for variant in report["variants"]}
    assert by_name["c_engine_packed"]["forwards_per_query"] < by_name["c_engine_packed_unguessed"]["forwards_per_query"]
