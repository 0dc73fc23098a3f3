"""`qustream bench latency`: the workload's arithmetic, and a ``--quick`` run through the real broker,
Redis and default model in which every produced query comes out and the JSON and chart hold every
level and runner."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from bench.latency_bench import (
    RUNNERS,
    Plan,
    _dead_letters,
    evaluate_targets,
    incomplete_phases,
    parse_runner,
    run_latency_bench,
)
from bench.stack import partition_gauges
from bench.workload import expected_distinct, head_for_hit_ratio, poisson_arrivals, zipf_ranks
from schemas.events import DeadLetterReason
from schemas.settings import Settings


def test_poisson_arrivals_are_seeded_and_at_the_rate() -> None:
    arrivals = poisson_arrivals(5.0, 400.0, seed=3)
    assert arrivals == poisson_arrivals(5.0, 400.0, seed=3)
    assert arrivals != poisson_arrivals(5.0, 400.0, seed=4)
    assert arrivals == sorted(arrivals) and arrivals[0] > 0 and arrivals[-1] < 400.0
    # 2,000 expected: a Poisson count is within ±4.5 standard deviations (±200) all but never.
    assert 1_800 < len(arrivals) < 2_200
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Exponential gaps: as many gaps above the mean as P(gap > mean) = 1/e says, unlike evenly spaced sends.
    above = sum(gap > 0.2 for gap in gaps) / len(gaps)
    assert 0.33 < above < 0.41


def test_cached_head_gives_the_planned_hit_ratio() -> None:
    count, universe, exponent = 300, 5_000, 1.0
    head = head_for_hit_ratio(count, universe, exponent, 0.6)
    assert 0 < head < universe
    expected = 1 - expected_distinct(count, universe, exponent, skip=head) / count
    assert expected >= 0.6 > 1 - expected_distinct(count, universe, exponent, skip=head - 1) / count
    # The same draw the benchmark makes, replayed against a cache: hits when pre-cached or seen before.
    ratios = []
    for seed in range(20):
        cached, hits = set(range(head)), 0
        for rank in zipf_ranks(count, universe, exponent, seed):
            hits += rank in cached
            cached.add(rank)
        ratios.append(hits / count)
    assert abs(sum(ratios) / len(ratios) - expected) < 0.02


def _level(load: float, new_hit_p99: float, new_miss_p99: float, old_miss_p99: float) -> dict[str, object]:
    def row(hit: float, miss: float) -> dict[str, object]:
        return {"hits": {"p99_ms": hit}, "misses": {"p99_ms": miss}}

    return {"load": load, "runners": {"continuous": row(new_hit_p99, new_miss_p99),
                                      "step": row(5_000.0, old_miss_p99)}}


def test_targets_are_judged_against_the_step_based_runner() -> None:
    results = {
        "levels": [_level(0.5, 40.0, 900.0, 2_000.0), _level(0.8, 90.0, 1_000.0, 2_000.0),
                   _level(0.95, 120.0, 3_000.0, 4_000.0)],
        "saturation": {"ratio": 0.97},
        "workers": {"continuous": {"peak_rss_mib": 2_100.0, "serving_peak_rss_mib": 1_900.0,
                                   "burst_peak_rss_mib": 2_100.0}},
        "burst": {"load": 10.0},
        "meta": {"plan": {"batch_size": 64}},
    }
    hits, misses, saturation, memory, burst = evaluate_targets(results)
    assert (hits["met"], hits["value"]) == (False, 120.0)  # 95 % load is over 100 ms
    assert (misses["met"], misses["value"]) == (True, 0.5)  # at 80 % load, not at the others
    assert saturation["met"] is True
    assert memory["met"] is False
    assert (burst["met"], burst["value"]) == (False, 0.1053)  # 2,100 MiB against 1,900 steady: +10.5 %
    results["workers"]["continuous"]["burst_peak_rss_mib"] = 2_000.0
    assert evaluate_targets(results)[4]["met"] is True
    results["meta"] = {"plan": {"batch_size": 8}}
    assert evaluate_targets(results)[3]["met"] is None  # the RSS target is set at batch 64 only


def test_extra_runners_are_named_settings_checked_before_the_run() -> None:
    name, overrides = parse_runner("continuous_bf16: miss_batching=continuous, dtype=bfloat16")
    assert (name, overrides) == ("continuous_bf16", {"miss_batching": "continuous", "dtype": "bfloat16"})
    plan = Plan.named("quick")
    plan.extra_runners[name] = overrides
    assert list(plan.runners) == [*RUNNERS, "continuous_bf16"]
    for bad, complaint in [("step:dtype=bfloat16", "a new name"), ("fast", "no settings"),
                           ("fast:nonsense=1", "not SETTING=VALUE"), ("fast:dtype", "not SETTING=VALUE"),
                           ("fast:dtype=bfloat17", "dtype")]:
        with pytest.raises(ValueError, match=complaint):
            parse_runner(bad)


def test_dead_letters_are_told_from_queries_that_never_came_out() -> None:
    def dead(key: str, error_class: str) -> ConsumerRecord[bytes, bytes]:
        headers = DeadLetterReason(stage="infer", error_class=error_class, message="m", source_topic="in",
                                   source_partition=0, source_offset="1", attempts=1, worker_id="w").to_headers()
        return ConsumerRecord("dlq", 0, 1, 0, 0, key.encode(), b"{}", None, 2, 2, headers)

    records = [dead("r1-0", "TimeoutError"), dead("r1-1", "TimeoutError"), dead("r1-2", "BatcherClosed")]
    # r1-1 also came out parsed (an earlier delivery, say): not a dead letter for the consumer.
    assert _dead_letters(records, {"r1-1", "r1-5"}) == {"r1-0": "TimeoutError", "r1-2": "BatcherClosed"}
    row = {"complete": False, "missing": 3, "messages": 100, "missing_committed": 1, "dead_lettered": 2,
           "dead_letter_reasons": {"TimeoutError": 2},
           "missing_detail": [{"state": "committed"}, {"state": "held"}, {"state": "held"}]}
    whole = {"complete": True, "missing": 0, "messages": 100, "missing_committed": 0, "dead_lettered": 0,
             "dead_letter_reasons": {}}
    results = {"levels": [{"load": 0.5, "runners": {"step": whole, "continuous": whole}}],
               "burst": {"load": 10.0, "runners": {"step": whole, "continuous": row}}}
    assert incomplete_phases(results) == [
        "1000% continuous: 3 of 100 on neither topic (1 of them committed), 2 dead-lettered {'TimeoutError': 2}; "
        "of the first 3 missing: {'committed': 1, 'held': 2}"]


async def test_worker_partition_gauges_are_read_from_its_metrics_endpoint() -> None:
    from streams.local_stack import free_port
    from streams.runtime import WorkerRuntime
    from streams.web import start_web

    settings = Settings(web_port=free_port(), topic_input="queries.in")
    assert await asyncio.to_thread(partition_gauges, settings) == {}  # nothing answers yet
    runtime = WorkerRuntime(settings)
    metrics = runtime.metrics
    metrics.inputs_unsettled.labels(topic="queries.in", partition="2").set(3)
    metrics.commit_waiting.labels(topic="queries.in", partition="2").set(12.5)
    metrics.consumer_lag.labels(topic="queries.in", partition="0").set(7)
    metrics.consumer_lag.labels(topic="elsewhere", partition="0").set(99)
    web = await start_web(runtime)
    try:
        gauges = await asyncio.to_thread(partition_gauges, settings)
    finally:
        await web.cleanup()
    assert gauges == {2: {"qustream_inputs_unsettled": 3.0, "qustream_commit_waiting_seconds": 12.5},
                      0: {"qustream_consumer_lag": 7.0}}


@pytest.mark.e2e
def test_latency_bench_quick(tmp_path: Path) -> None:
    output, chart = tmp_path / "latency.json", tmp_path / "latency.png"
    plan = Plan.named("quick")
    results = run_latency_bench(plan, output, chart, echo=lambda _: None)
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(results))
    assert chart.stat().st_size > 10_000
    assert saved["capacity"]["qps"] == saved["saturation"]["step"]["qps"] > 0
    for name in RUNNERS:
        backlog = saved["saturation"][name]
        assert backlog["complete"] and backlog["parsed"] == backlog["messages"] == backlog["misses"]
        assert backlog["qps"] > 0 and backlog["peak_rss_mib"] > 100
        assert saved["workers"][name]["peak_rss_mib"] >= saved["workers"][name]["startup_peak_rss_mib"] > 100
    assert [level["load"] for level in saved["levels"]] == plan.loads
    for level in saved["levels"]:
        assert level["offered_qps"] == pytest.approx(
            level["load"] * saved["capacity"]["qps"] / (1 - plan.hit_ratio), rel=1e-3)
        assert level["messages"] > 0 and sorted(level["order"]) == sorted(RUNNERS)
        for name in RUNNERS:
            row = level["runners"][name]
            # Every produced query came out parsed, each counted once as a hit or a miss.
            assert row["complete"] and row["missing"] == row["missing_committed"] == row["dead_lettered"] == 0
            assert row["parsed"] == row["messages"] == level["messages"]
            assert row["hits"]["count"] + row["shared"]["count"] + row["misses"]["count"] == row["parsed"]
            assert row["hits"]["count"] > 0 and row["misses"]["count"] > 0
            assert row["hit_ratio"] == pytest.approx(row["hits"]["count"] / row["parsed"], abs=1e-4)
            for kind in ("hits", "misses"):
                summary = row[kind]
                assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] <= summary["max_ms"]
            assert row["throughput_qps"] > 0 and row["peak_rss_mib"] > 100
    burst = saved["burst"]
    assert burst["load"] == plan.burst_load and burst["seconds"] == plan.burst_seconds
    for name in RUNNERS:
        row = burst["runners"][name]
        assert row["complete"] and row["parsed"] == row["messages"] == burst["messages"] > 0
        assert row["missing"] == row["dead_lettered"] == 0
        assert saved["workers"][name]["burst_peak_rss_mib"] == row["peak_rss_mib"] > 100
    assert [target["met"] for target in saved["targets"]][3] is None  # quick runs at batch 8
    assert saved["meta"]["runners"] == {
        "step": "QUSTREAM_CONTINUOUS_BATCHING=false",
        "continuous": "QUSTREAM_CONTINUOUS_BATCHING=true QUSTREAM_MISS_BATCHING=continuous",
        "batched": "QUSTREAM_CONTINUOUS_BATCHING=true QUSTREAM_MISS_BATCHING=batch"}
    assert set(saved["targets_by_runner"]) == {"continuous", "batched"}
    assert saved["targets_by_runner"]["continuous"] == saved["targets"]


@pytest.mark.e2e
async def test_collector_ends_a_round_on_distinct_queries_not_on_records(make_settings: Any) -> None:
    """At-least-once delivery may put an output on the topic twice (a batch republished after part of
    it was handed over): the round is not over until every query came out, whatever the duplicates."""
    from bench.stack import Collector
    from streams.kafka_io import make_producer
    from streams.topics import ensure_topics

    settings = make_settings()
    await ensure_topics(settings, [settings.topic_parsed, settings.topic_dlq])
    producer = make_producer(settings)
    collector = Collector(settings, [settings.topic_parsed, settings.topic_dlq])
    await producer.start()
    await collector.start()
    try:
        for key in (b"r7-0", b"r7-1", b"r7-1", b"r7-0", b"r8-0"):
            await producer.send_and_wait(settings.topic_parsed, b"{}", key=key)
        assert not await collector.wait(settings.topic_parsed, "r7", 3, timeout_s=3.0)  # four records, two queries
        await producer.send_and_wait(settings.topic_dlq, b"", key=b"r7-1")  # dead-lettered once, parsed later
        assert not await collector.wait([settings.topic_parsed, settings.topic_dlq], "r7", 3, timeout_s=1.0)
        await producer.send_and_wait(settings.topic_dlq, b"", key=b"r7-2")
        assert await collector.wait([settings.topic_parsed, settings.topic_dlq], "r7", 3, timeout_s=10.0)
        assert len(collector.of_round(settings.topic_parsed, "r7")) == 4
    finally:
        await producer.stop()
        await collector.stop()
