"""Smoke test of `qustream bench pipeline` at tiny sizes: every scenario runs against the real broker,
Redis and default model, and the JSON holds every scenario with sane, positive numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.pipeline_bench import Plan, run_pipeline_bench
from bench.profiling import summarize_collapsed
from bench.workload import query_pool, zipf_ranks

pytestmark = pytest.mark.e2e


def test_workload_is_distinct_and_deterministic() -> None:
    pool = query_pool(500)
    assert len({q.normalized for q in pool}) == 500
    assert [q.text for q in pool] == [q.text for q in query_pool(500)]
    ranks = zipf_ranks(2000, 100, 1.2, seed=1)
    # Zipf: the head rank is by far the most frequent.
    assert ranks.count(0) > ranks.count(50) * 10


def test_profile_summary_buckets() -> None:
    text = ("main;run (asyncio/base_events.py:1);ParsePipeline.process (workers/core_step.py:179);"
            "decode_message (workers/core_step.py:100) 3\nmain;select (selectors.py:468) 1\n")
    summary = summarize_collapsed(text)
    assert summary["samples"] == 4
    assert summary["buckets"]["core step: decode input (pydantic QueryInput, normalize)"] == 0.75


def test_pipeline_bench_tiny(tmp_path: Path) -> None:
    output = tmp_path / "pipeline.json"
    results = run_pipeline_bench(Plan.named("tiny"), output, tmp_path / "charts", echo=lambda _: None)
    saved = json.loads(output.read_text())
    assert set(saved) >= {"transport", "model", "zipf", "scaling", "knobs", "meta", "worker_rss"}
    for name in ("transport", "model"):
        section = saved[name]
        assert section["qustream_qps"] > 0 and section["reference_qps"] > 0
        assert section["ratio"] > 0
        assert all(row["qustream_complete"] for row in section["rounds"])
    assert saved["transport"]["faust_qps"] > 0
    assert all(row["qustream_all_cached"] and row["faust_all_cached"] for row in saved["transport"]["rounds"])
    assert all(row["qustream_uncached"] == saved["model"]["queries_per_round"] for row in saved["model"]["rounds"])
    zipf = saved["zipf"]
    assert zipf["complete"] and zipf["parsed"] == zipf["queries"] > 0
    assert 0 <= zipf["hit_rate"] <= 1
    assert 0 < zipf["latency"]["p50_s"] <= zipf["latency"]["p95_s"] <= zipf["latency"]["p99_s"]
    assert zipf["batch_sizes"]["count"] > 0 and zipf["worker_rss_mib"]["max"] > 100
    for kind in ("cached", "uncached"):
        assert saved["scaling"][kind]["1"] > 0 and saved["scaling"][kind]["2"] > 0
    assert saved["knobs"] and all(row["burst_qps"] > 0 and row["p95_s"] > 0 for row in saved["knobs"])
    assert len(results["meta"]["charts"]) == 4
    assert all(Path(path).stat().st_size > 1000 for path in results["meta"]["charts"])
