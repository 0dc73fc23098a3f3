"""The batched histogram exposes what prometheus_client's own Histogram would, value for value."""

from __future__ import annotations

import random

import pytest
import structlog
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from streams.runtime import Progress
from streams.telemetry import _LATENCY_BUCKETS, BatchHistogram, WorkerMetrics
from workers.engine import DecodeStats


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_batch_histogram_matches_histogram_observe() -> None:
    rng = random.Random(5)
    # Bucket bounds themselves (a bucket holds values <= its bound), beyond the last bound, zero.
    values = [rng.choice([*_LATENCY_BUCKETS, 0.0, 301.0]) for _ in range(300)]
    values += [rng.random() * 20 for _ in range(2000)]
    single, batched = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("t_seconds", "doc", buckets=_LATENCY_BUCKETS, registry=single)
    for value in values:
        reference.observe(value)
    histogram = BatchHistogram("t_seconds", "doc", buckets=_LATENCY_BUCKETS, registry=batched)
    for start in range(0, len(values), 333):
        histogram.observe_many(values[start : start + 333])
    histogram.observe_many([])

    expected, got = _samples(single), _samples(batched)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name
    assert got['t_seconds_bucket{le="+Inf"}'] == len(values)


def test_negative_latencies_count_as_zero() -> None:
    registry = CollectorRegistry()
    histogram = BatchHistogram("n_seconds", "doc", buckets=(0.5, 1.0), registry=registry)
    histogram.observe_many([-2.0, 0.7])
    samples = _samples(registry)
    assert samples['n_seconds_bucket{le="0.5"}'] == 1
    assert samples["n_seconds_sum"] == pytest.approx(0.7)


def test_worker_end_to_end_latency_matches_histogram_observe_over_steps() -> None:
    """Latencies as the pipeline computes them (parsed time minus event time, epochs of real
    datetimes, a producer clock ahead of the worker's now and then), fed a step at a time through
    ``WorkerMetrics.observe``, expose what ``Histogram.observe`` per value would."""
    from datetime import UTC, datetime, timedelta

    from schemas.events import BatchMetricsEvent
    from streams.telemetry import WorkerMetrics
    from workers.core_step import BatchOutcome

    rng = random.Random(9)
    metrics = WorkerMetrics()
    reference_registry = CollectorRegistry()
    reference = Histogram("qustream_end_to_end_latency_seconds", "Event time to parsed event.",
                          buckets=_LATENCY_BUCKETS, registry=reference_registry)
    parsed_at = datetime(2026, 12, 2, 5, 0, tzinfo=UTC)
    for step_size in (64, 1024, 1, 64, 300):
        parsed_epoch = parsed_at.timestamp()
        latencies = []
        for _ in range(step_size):
            event_time = parsed_at - timedelta(milliseconds=rng.choice([rng.uniform(-50, 0), rng.uniform(0, 400),
                                                                        rng.uniform(0, 600_000)]))
            latencies.append(parsed_epoch - event_time.timestamp())
        for latency in latencies:
            reference.observe(max(latency, 0.0))
        step = BatchMetricsEvent(
            batch_id="b", worker_id="w", ts=parsed_at, size=step_size, valid=step_size, unique=step_size,
            cache_hits=step_size, cache_misses=0, cache_errors=0, cache_available=True, parsed=step_size,
            cached=step_size, dead_lettered=0, inference_ms=0.0, batch_ms=1.0, tokens_in=0, tokens_out=0, model="m")
        metrics.observe(BatchOutcome([], [], [], step, latencies))
        parsed_at += timedelta(seconds=1)

    expected = _samples(reference_registry)
    got = {name: value for name, value in _samples(metrics.registry).items()
           if name.startswith("qustream_end_to_end_latency_seconds")}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name
    assert got['qustream_end_to_end_latency_seconds_bucket{le="0.005"}'] > 0  # the skewed ones, counted as zero


def test_the_engines_decoding_counters_are_read_at_each_scrape() -> None:
    metrics = WorkerMetrics()
    before = _samples(metrics.registry)
    assert before["qustream_engine_forward_passes_total"] == 0
    assert before['qustream_engine_guesses_total{result="kept"}'] == 0
    totals = DecodeStats(forwards=3, decisions=10, guessed=6, guesses_kept=4)

    class Engine:
        def decode_totals(self) -> DecodeStats:
            return totals

    metrics.watch_engine(Engine())
    got = _samples(metrics.registry)
    assert got["qustream_engine_forward_passes_total"] == 3
    assert got["qustream_engine_choices_total"] == 10
    assert got['qustream_engine_guesses_total{result="kept"}'] == 4
    assert got['qustream_engine_guesses_total{result="replaced"}'] == 2
    totals.forwards = 5  # counted on, read again at the next scrape
    assert _samples(metrics.registry)["qustream_engine_forward_passes_total"] == 5


def test_progress_lines_count_every_batch_the_last_ones_at_stop() -> None:
    """The first batch, then a line per interval; the batches after the last line are logged at stop."""
    progress = Progress(interval_s=3600)
    with structlog.testing.capture_logs() as logs:
        progress.add(messages=2, parsed=1, cached=1, dead_lettered=0)
        progress.add(messages=5, parsed=3, cached=1, dead_lettered=1)
        progress.add(messages=1, parsed=0, cached=1, dead_lettered=0)
        progress.flush()
        progress.flush()  # nothing since: no line
    lines = [entry for entry in logs if entry["event"] == "batches.progress"]
    assert [(line["batches"], line["messages"], line["parsed"], line["cached"], line["dead_lettered"])
            for line in lines] == [(1, 2, 1, 1, 0), (2, 6, 3, 2, 1)]
