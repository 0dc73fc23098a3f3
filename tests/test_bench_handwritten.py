"""``qustream bench handwritten`` runs each pair and writes the report its verdicts come from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_handwritten_writes_medians_ratios_and_verdicts(tmp_path: Path) -> None:
    out = tmp_path / "handwritten.json"
    pairs = ("partitioner", "histogram", "encoder_orjson", "backoff", "singulariser")
    subprocess.run(
        [sys.executable, "-m", "streams.cli", "bench", "handwritten", "--size", "8", "--size", "32",
         "--repetitions", "3", "--target-ms", "1", *(arg for pair in pairs for arg in ("--only", pair)),
         "--json", str(out)],
        check=True, capture_output=True, timeout=300,
    )
    report = json.loads(out.read_text())
    assert report["command"].startswith("qustream bench handwritten")
    assert [pair["name"] for pair in report["pairs"]] == list(pairs)
    for pair in report["pairs"]:
        assert [result["records"] for result in pair["results"]] == [8, 32]
        for result in pair["results"]:
            for side in ("handwritten", "library"):
                spread = result[side]
                assert 0 < spread["p10_us"] <= spread["median_us"] <= spread["p90_us"]
            assert result["ratio"]["p10"] <= result["ratio"]["median"] <= result["ratio"]["p90"]
        assert isinstance(pair["keep_handwritten"], bool)
    # Off the cached path, no speed keeps a hand-written part.
    assert not next(pair for pair in report["pairs"] if pair["name"] == "backoff")["keep_handwritten"]
    accuracy = report["singular_accuracy"]
    assert accuracy["library_right"] == accuracy["pairs"] > accuracy["handwritten_right"]
