"""Prometheus metrics of a worker, on a registry of its own (no import-time globals)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import get_args

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from schemas.events import DeadLetterStage
from workers.core_step import BatchOutcome
from workers.engine import DecodeStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class BatchHistogram(Collector):
    """A Prometheus histogram fed a batch of observations at once, exposed like ``Histogram``.

    One value per parsed message: ``Histogram.observe`` takes a lock and a bucket search per value;
    this counts a batch's values into the buckets with one numpy pass and one lock. Kept on the
    figures of ``qustream bench handwritten`` (``docs/performance-handwritten.md``);
    ``tests/test_telemetry.py`` holds the exposition equal to ``Histogram``'s.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._upper_bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Sequence[float]) -> None:
        if not values:
            return
        # A negative latency is clock skew between producer and worker: counted as zero.
        array = np.maximum(np.asarray(values, dtype=np.float64), 0.0)
        # A bucket holds values <= its upper bound, as in Histogram.observe.
        counts = np.bincount(np.searchsorted(self._upper_bounds, array, side="left"),
                             minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(array.sum())

    def collect(self) -> Iterable[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        bounds = [*(_format_bound(b) for b in self._upper_bounds.tolist()), "+Inf"]
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], list(zip(bounds, cumulative, strict=True)), total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)


class DecodingCounters(Collector):
    """The engine's decoding counters (``ConstrainedEngine.decode_totals``), read at each scrape: the
    engine counts on its decoding thread, and a scrape costs it nothing."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._read: Callable[[], DecodeStats] | None = None
        registry.register(self)

    def watch(self, read: Callable[[], DecodeStats]) -> None:
        self._read = read

    def collect(self) -> Iterable[CounterMetricFamily]:
        return self._families(self._read() if self._read is not None else DecodeStats())

    def describe(self) -> Iterable[CounterMetricFamily]:
        return self._families(DecodeStats())

    @staticmethod
    def _families(totals: DecodeStats) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("qustream_engine_forward_passes", "Model forward passes of the decoding loops.",
                                  value=totals.forwards)
        yield CounterMetricFamily("qustream_engine_choices", "Tokens the model chose (the rest the grammar forced).",
                                  value=totals.decisions)
        guesses = CounterMetricFamily(
            "qustream_engine_guesses",
            "Guessed choices the model judged, by result: kept saved a pass, replaced cost its tokens.",
            labels=["result"])
        guesses.add_metric(["kept"], totals.guesses_kept)
        guesses.add_metric(["replaced"], totals.guessed - totals.guesses_kept)
        yield guesses


def _format_bound(bound: float) -> str:
    """``le`` as ``Histogram`` writes it (``1.0``, ``0.005``)."""
    return repr(float(bound))


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages = Counter("qustream_messages", "Messages consumed, by outcome.", ["outcome"], registry=r)
        self.dead_letters = Counter("qustream_dead_letters", "Dead-lettered messages, by stage.", ["stage"],
                                    registry=r)
        self.cache_requests = Counter("qustream_cache_requests", "Parse-cache lookups of unique queries, by result.",
                                      ["result"], registry=r)
        self.tokens = Counter("qustream_tokens", "Model tokens, by direction.", ["direction"], registry=r)
        self.batch_size = Histogram("qustream_batch_size", "Messages per batch.", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_duration = Histogram("qustream_batch_duration_seconds", "Batch processing time.",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram("qustream_inference_duration_seconds", "Model time per batch.",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.end_to_end = BatchHistogram("qustream_end_to_end_latency_seconds", "Event time to parsed event.",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.model_load_seconds = Gauge("qustream_model_load_seconds", "Seconds the model took to load.", registry=r)
        self.batches_in_flight = Gauge("qustream_batches_in_flight", "Batches being processed now.", registry=r)
        self.consumer_lag = Gauge("qustream_consumer_lag", "Messages behind the end of the input, per partition.",
                                  ["topic", "partition"], registry=r)
        self.inputs_unsettled = Gauge(
            "qustream_inputs_unsettled",
            "Inputs fetched whose outputs the broker has not acknowledged yet, per partition.",
            ["topic", "partition"], registry=r)
        self.commit_waiting = Gauge(
            "qustream_commit_waiting_seconds",
            "How long a partition's committable position has waited for its first unsettled input.",
            ["topic", "partition"], registry=r)
        self.ready = Gauge("qustream_ready", "1 when the worker is ready to process.", registry=r)
        #: Fed by ``watch_engine`` once the model is loaded; zeros until then.
        self.decoding = DecodingCounters(r)
        self.info = Info("qustream_worker", "Worker build and model.", registry=r)
        for outcome in ("inferred", "cached", "dead_lettered"):
            self.messages.labels(outcome=outcome)
        for stage in get_args(DeadLetterStage):
            self.dead_letters.labels(stage=stage)
        for result in ("hit", "miss", "error"):
            self.cache_requests.labels(result=result)
        for direction in ("in", "out"):
            self.tokens.labels(direction=direction)
        # Children looked up once: ``labels()`` takes a lock and a dict lookup per call, per batch.
        self._cached = self.messages.labels(outcome="cached")
        self._inferred = self.messages.labels(outcome="inferred")
        self._dead_lettered = self.messages.labels(outcome="dead_lettered")
        self._hits = self.cache_requests.labels(result="hit")
        self._misses = self.cache_requests.labels(result="miss")
        self._errors = self.cache_requests.labels(result="error")
        self._tokens_in = self.tokens.labels(direction="in")
        self._tokens_out = self.tokens.labels(direction="out")

    def watch_engine(self, engine: object) -> None:
        """Expose the engine's decoding counters, where it keeps them (the constrained engine)."""
        read = getattr(engine, "decode_totals", None)
        if callable(read):
            self.decoding.watch(read)

    def observe(self, outcome: BatchOutcome) -> None:
        m = outcome.metrics
        self._cached.inc(m.cached)
        if m.parsed > m.cached:
            self._inferred.inc(m.parsed - m.cached)
        if outcome.dead_letters:
            self._dead_lettered.inc(len(outcome.dead_letters))
            for stage in outcome.dead_letter_stages:
                self.dead_letters.labels(stage=stage).inc()
        # Distinct queries by lookup result; a failed lookup is an error (QustreamCacheErrors), not a miss.
        self._hits.inc(m.cache_hits)
        self._misses.inc(m.cache_misses)
        self._errors.inc(m.cache_errors)
        if m.tokens_in or m.tokens_out:
            self._tokens_in.inc(m.tokens_in)
            self._tokens_out.inc(m.tokens_out)
        self.batch_size.observe(m.size)
        self.batch_duration.observe(m.batch_ms / 1000)
        if m.cache_misses or m.cache_errors:
            self.inference_duration.observe(m.inference_ms / 1000)
        self.end_to_end.observe_many(outcome.end_to_end_s)
