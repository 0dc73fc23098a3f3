"""The batched histogram exposes what prometheus_client's own Histogram would, value for value."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from streams.telemetry import _LATENCY_BUCKETS, BatchHistogram


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
