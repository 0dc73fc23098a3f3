"""End-to-end pipeline benchmark: each scenario measured against its reference in the same run.

Scenarios (``qustream bench pipeline``):

- transport: every query already cached; reference = a plain aiokafka pass-through process.
- model: no query cached; reference = the engine alone (``parse_batch``, same queries, same batch size).
- zipf: open-loop Zipf replay from a cold cache; hit rate over time, latency, batch sizes, RSS.
- scaling: 1 vs 2 worker processes in one group on a 4-partition topic.
- knobs: burst queries/s and open-loop latency across batch size × linger.

Throughput is always taken on the consumer side: first input produced → last output record
(Kafka CreateTime of the output, stamped when the worker or pass-through sent it). References and
qustream alternate round by round so load from other processes on a shared machine hits both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import structlog
from aiokafka import AIOKafkaProducer

from bench.stack import Collector, EngineAlone, Passthrough, Process, Services, Worker, pinned
from bench.workload import BenchQuery, expected_distinct, query_pool, zipf_ranks
from schemas.settings import Settings
from schemas.spec import load_spec
from streams.kafka_io import make_producer
from streams.topics import ensure_topics, topic_names
from workers.cache import CachedParse, ParseCache, redis_client

log = structlog.get_logger(__name__)

TRANSPORT_TARGET = 0.5
#: Every scenario, in the order they run; ``--only`` picks a subset (zipf and scaling need model).
SCENARIOS = ("transport", "model", "zipf", "scaling", "knobs")
MODEL_TARGET = 0.85


@dataclass
class WorkerPlan:
    """How a benchmark's workers run: the product's batching defaults, so the figures are those of a
    worker as shipped, and one torch thread each, so a measured process never fights another over the
    machine's cores (two here)."""

    name: str
    batch_size: int = Settings.model_fields["batch_size"].default
    linger_ms: int = Settings.model_fields["batch_linger_ms"].default
    cpu_threads: int = 1


@dataclass
class Plan(WorkerPlan):
    """Sizes of every scenario. ``full`` ≈ 15 minutes, ``quick`` ≈ 5, ``tiny`` is for the smoke test.

    One torch thread for the worker and for the engine reference: the model ceiling compares the two on
    a core of their own (pinned, as the transport ceiling does), and the scaling scenario's two workers
    use the two cores instead of four threads fighting over them."""

    transport_rounds: int = 5
    # Large enough that the pass-through's drain (≈ 60-80k q/s here) lasts about half a second.
    transport_messages: int = 40_000
    # Six: the engine's own speed moves ±15 % round to round on this VM (the worker's overhead on
    # top of it is under 1 %), so the median of three still differed by 24 % between two runs.
    model_rounds: int = 6
    model_queries: int = 64
    zipf_seconds: float = 90.0
    zipf_rate: float = 6.0
    zipf_universe: int = 5_000
    zipf_exponent: float = 1.2
    scaling_rounds: int = 3
    scaling_uncached_rounds: int = 1
    knob_sizes: list[int] = field(default_factory=lambda: [16, 64])
    knob_lingers: list[int] = field(default_factory=lambda: [50, 500])
    knob_burst: int = 150
    knob_seconds: float = 12.0
    knob_rate: float = 10.0
    knob_hit_rate: float = 0.9
    drain_timeout_s: float = 300.0

    @classmethod
    def named(cls, name: str) -> Plan:
        if name == "full":
            return cls("full")
        if name == "quick":
            return cls("quick", transport_rounds=3, transport_messages=10_000, model_rounds=3, model_queries=64,
                       zipf_seconds=60.0, scaling_rounds=2, knob_sizes=[16, 64], knob_lingers=[50, 500],
                       knob_burst=100, knob_seconds=8.0, drain_timeout_s=180.0)
        if name == "tiny":
            return cls("tiny", transport_rounds=1, transport_messages=300, model_rounds=1, model_queries=8,
                       zipf_seconds=6.0, zipf_rate=5.0, zipf_universe=200, scaling_rounds=1,
                       scaling_uncached_rounds=1, knob_sizes=[8], knob_lingers=[50], knob_burst=20,
                       knob_seconds=3.0, knob_rate=5.0, drain_timeout_s=120.0)
        raise ValueError(f"unknown plan {name!r}: full, quick or tiny")


# ---------------------------------------------------------------------------------------------
# helpers


class Pool:
    """Hands out disjoint slices of one query pool, so no scenario sees another's cache entries."""

    def __init__(self, size: int) -> None:
        self._queries = query_pool(size)
        self._next = 0

    def take(self, count: int) -> list[BenchQuery]:
        if self._next + count > len(self._queries):
            raise ValueError("query pool exhausted; raise its size")
        chunk = self._queries[self._next : self._next + count]
        self._next += count
        return chunk


def round_tag() -> str:
    return "r" + uuid.uuid4().hex[:8]


def _value(text: str, query_id: str, ts: float | None = None) -> bytes:
    """An input event; ``ts`` (epoch seconds, default now) is its event time."""
    event_time = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    return json.dumps({"query": text, "query_id": query_id, "ts": event_time.isoformat()}).encode()


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return float(ordered[index])


def _spread(values: Sequence[float]) -> float:
    """(max − min) / median: how far the rounds of one measurement disagree."""
    return (max(values) - min(values)) / _median(values) if len(values) > 1 and _median(values) else 0.0


async def prewarm_cache(settings: Settings, version: str, queries: Sequence[BenchQuery]) -> None:
    """Write entries the way the worker would, so the worker's lookups hit."""
    cache = ParseCache(redis_client(settings.redis_url.get_secret_value(), timeout_s=10.0),
                       spec=load_spec(settings.parse_spec), version=version, ttl_s=3600, prefix=settings.cache_prefix)
    try:
        items = list(queries)
        for start in range(0, len(items), 2000):
            chunk = {q.normalized: CachedParse(dict(q.parse), []) for q in items[start : start + 2000]}
            if not await cache.set_many(chunk):
                raise RuntimeError("could not write the cache (is Redis up?)")
    finally:
        await cache.close()


async def drop_cache(redis_url: str, prefix: str) -> int:
    client = redis_client(redis_url, timeout_s=10.0)
    removed = 0
    try:
        batch: list[Any] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += await client.delete(*batch)
                batch = []
        if batch:
            removed += await client.delete(*batch)
    finally:
        await client.aclose()
    return removed


async def produce_burst(producer: AIOKafkaProducer, topic: str, tag: str, queries: Sequence[BenchQuery]) -> float:
    """Send every query as fast as the client allows; returns the wall time of the first send."""
    values = [(f"{tag}-{i}".encode(), _value(q.text, f"{tag}-{i}")) for i, q in enumerate(queries)]
    started = time.time()
    futures = [await producer.send(topic, value, key=key) for key, value in values]
    await asyncio.gather(*futures)
    return started


async def produce_open_loop(
    producer: AIOKafkaProducer, topic: str, tag: str, queries: Sequence[BenchQuery], rate: float
) -> float:
    """Send at a fixed rate whatever the worker does (open loop), each stamped with its event time."""
    return (await produce_scheduled(producer, topic, tag, queries, [i / rate for i in range(len(queries))])).started


class Scheduled(NamedTuple):
    started: float
    #: How late each send went out (seconds).
    late: list[float]
    #: Where each query landed: (partition, offset).
    placed: list[tuple[int, int]]


async def produce_scheduled(
    producer: AIOKafkaProducer, topic: str, tag: str, queries: Sequence[BenchQuery], offsets: Sequence[float]
) -> Scheduled:
    """Send query ``i`` ``offsets[i]`` seconds after the start whatever the worker does (open loop),
    with that scheduled time as its event time: a harness that falls behind adds to the measured
    latency instead of hiding it. Returns the start (epoch seconds), how late each send went out and
    where each landed."""
    started = time.time()
    futures, late = [], []
    for i, (query, offset) in enumerate(zip(queries, offsets, strict=True)):
        due = started + offset
        delay = due - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        late.append(max(0.0, time.time() - due))
        futures.append(await producer.send(topic, _value(query.text, f"{tag}-{i}", due), key=f"{tag}-{i}".encode()))
    placed = [(metadata.partition, metadata.offset) for metadata in await asyncio.gather(*futures)]
    return Scheduled(started, late, placed)


@dataclass
class RoundResult:
    count: int
    seconds: float
    qps: float
    complete: bool
    tag: str = ""


def round_result(
    collector: Collector, topic: str, tag: str, count: int, started: float, complete: bool
) -> RoundResult:
    records = collector.of_round(topic, tag)
    if not records:
        return RoundResult(0, 0.0, 0.0, False, tag)
    finished = max(r.timestamp for r in records) / 1000
    seconds = max(finished - started, 1e-3)
    return RoundResult(len(records), seconds, len(records) / seconds, complete and len(records) >= count, tag)


async def drain_backlog(producer: AIOKafkaProducer, collector: Collector, source: str, sink: str,
                        workers: Sequence[Process], queries: Sequence[BenchQuery], timeout_s: float) -> RoundResult:
    """The workers drain ``queries`` produced while they were paused (SIGSTOP): their capacity, not the
    producer's pace. Paused for well under the session timeout, so the group does not rebalance."""
    tag = round_tag()
    with contextlib.ExitStack() as paused:
        for worker in workers:
            paused.enter_context(worker.paused())
        await produce_burst(producer, source, tag, queries)
        started = time.time()
    complete = await collector.wait(sink, tag, len(queries), timeout_s)
    return round_result(collector, sink, tag, len(queries), started, complete)


def parsed_events(collector: Collector, topic: str, tag: str) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in collector.of_round(topic, tag)]


def _latencies(events: Sequence[dict[str, Any]]) -> list[float]:
    out = []
    for event in events:
        if event.get("event_ts"):
            parsed = datetime.fromisoformat(event["parsed_ts"])
            out.append((parsed - datetime.fromisoformat(event["event_ts"])).total_seconds())
    return out


def _latency_summary(latencies: Sequence[float]) -> dict[str, float]:
    return {f"p{q}_s": round(_percentile(latencies, q), 4) for q in (50, 95, 99)} | {
        "max_s": round(max(latencies), 4) if latencies else 0.0
    }


class RssSampler:
    """Samples each live worker's resident memory once a second."""

    def __init__(self) -> None:
        self.workers: dict[str, Worker] = {}
        self.samples: list[tuple[float, str, int]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            for name, worker in list(self.workers.items()):
                rss = worker.rss_bytes()
                if rss is not None:
                    self.samples.append((time.time(), name, rss))
            await asyncio.sleep(1.0)

    def between(self, name: str, start: float, end: float) -> list[tuple[float, int]]:
        return [(t, rss) for t, n, rss in self.samples if n == name and start <= t <= end]

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


# ---------------------------------------------------------------------------------------------
# the benchmark


class PipelineBench:
    def __init__(self, plan: Plan, workdir: Path, echo: Callable[[str], None] = print, profile: bool = False,
                 scenarios: Sequence[str] = SCENARIOS) -> None:
        unknown = set(scenarios) - set(SCENARIOS)
        if unknown:
            raise ValueError(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
        self.plan = plan
        self.profile = profile
        self.scenarios = set(scenarios)
        self.workdir = workdir
        self.echo = echo
        self.services: Services | None = None
        self.engine: EngineAlone | None = None
        self.rss = RssSampler()
        self.pool = Pool(self._pool_size())
        self._prefixes: list[str] = []
        self._cached_queries: list[BenchQuery] = []
        self._model_qps = 0.0

    def _pool_size(self) -> int:
        p = self.plan
        knob_points = len(p.knob_sizes) * len(p.knob_lingers)
        knob_queries = 200 + int((p.knob_burst + p.knob_seconds * p.knob_rate) * (1 - p.knob_hit_rate)) + 50
        return (
            p.transport_messages
            + p.model_queries * (p.model_rounds + 2 + 2 * p.scaling_uncached_rounds)
            + p.zipf_universe
            + knob_points * knob_queries
            + 1_000
        )

    def _settings(self, name: str, **overrides: Any) -> Settings:
        assert self.services is not None
        settings = self.services.settings(name, **{"cpu_threads": self.plan.cpu_threads, **overrides})
        self._prefixes.append(settings.cache_prefix)
        return settings

    def _worker(self, name: str, settings: Settings) -> Worker:
        worker = Worker(name, settings, self.workdir / f"{name}.log")
        self.rss.workers[name] = worker
        return worker

    def _stop_worker(self, worker: Worker) -> None:
        self.rss.workers.pop(worker.name, None)
        worker.stop()

    async def run(self) -> dict[str, Any]:
        began, commit = time.time(), git_head()
        load_before = os.getloadavg()
        self.services = Services(self.workdir)
        self.rss.start()
        try:
            results = await self._run_all()
        finally:
            self.rss.stop()
            for prefix in self._prefixes:
                await drop_cache(self.services.redis_url, prefix)
            self.services.close()
        results["meta"] = self._meta(began, load_before, commit)
        return results

    async def _run_all(self) -> dict[str, Any]:
        p = self.plan
        assert self.services is not None
        main = self._settings("main", batch_size=p.batch_size, batch_linger_ms=p.linger_ms)
        await ensure_topics(main)
        worker = self._worker("worker-1", main)
        reference_topics = [f"{main.topic_input}.pt-in", f"{main.topic_input}.pt-out"]
        await ensure_topics(main, reference_topics)
        passthrough = Passthrough(self.services.bootstrap, reference_topics[0], reference_topics[1],
                                  self.workdir / "passthrough.log")
        # The Faust runner on topics of its own, reading the same cache entries as the main worker.
        faust_settings = self._settings("faust", batch_size=p.batch_size, batch_linger_ms=p.linger_ms,
                                        kafka_runner="faust", cache_prefix=main.cache_prefix)
        await ensure_topics(faust_settings)
        faust_worker = self._worker("worker-faust", faust_settings)
        collector = Collector(main, [main.topic_parsed, main.topic_metrics, reference_topics[1],
                                     faust_settings.topic_parsed])
        await collector.start()
        producer = make_producer(main)
        await producer.start()
        try:
            # The reference engine loads while the worker loads its own copy: both are set-up time.
            self.echo("starting the worker, the engine reference and the pass-through references")
            self.engine = EngineAlone(main, self.workdir / "engine-alone.log")
            await self.engine.start()
            await worker.wait_ready(partitions=main.partitions)
            await passthrough.wait_ready()
            await faust_worker.wait_ready(partitions=faust_settings.partitions)
            results: dict[str, Any] = {}
            paths = {"qustream": (main.topic_input, main.topic_parsed, worker),
                     "reference": (reference_topics[0], reference_topics[1], passthrough),
                     "faust": (faust_settings.topic_input, faust_settings.topic_parsed, faust_worker)}
            wanted = self.scenarios
            if {"transport", "scaling"} & wanted:
                with pinned([process.pid for _, _, process in paths.values()],
                            [self.services.broker_pid, os.getpid()]) as cpus:
                    results["transport"] = await self._transport(main, producer, collector, paths)
                    results["transport"]["cpus"] = cpus
                    if self.profile:
                        results["transport"]["profile"] = await self._profile_cached(main, producer, collector,
                                                                                     worker)
            passthrough.stop()
            self._stop_worker(faust_worker)
            if {"model", "zipf", "scaling"} & wanted:
                # The worker and the engine reference take turns on CPU 0; broker, Redis traffic and
                # this harness stay on the other core, as in the transport ceiling.
                with pinned([worker.pid, self.engine.pid], [self.services.broker_pid, os.getpid()]) as cpus:
                    results["model"] = await self._model(main, producer, collector)
                    results["model"]["cpus"] = cpus
            await self.engine.stop()
            if "zipf" in wanted:
                results["zipf"] = await self._zipf(main, producer, collector, worker, results["model"]["qustream_qps"])
            if "scaling" in wanted:
                results["scaling"] = await self._scaling(main, producer, collector, worker)
        finally:
            if self.engine is not None:
                await self.engine.stop()
            await producer.stop()
            await collector.stop()
            passthrough.stop()
            self._stop_worker(faust_worker)
            self._stop_worker(worker)
        if "knobs" in self.scenarios:
            results["knobs"] = await self._knobs()
        results["worker_rss"] = {
            name: round(max(rss for _, n, rss in self.rss.samples if n == name) / 2**20, 1)
            for name in sorted({n for _, n, _ in self.rss.samples})
        }
        return results

    # --- transport ceiling --------------------------------------------------------------------
    async def _transport(self, settings: Settings, producer: AIOKafkaProducer, collector: Collector,
                         paths: dict[str, tuple[str, str, Process]]) -> dict[str, Any]:
        p = self.plan
        assert self.engine is not None
        queries = self._cached_queries = self.pool.take(p.transport_messages)
        await prewarm_cache(settings, self.engine.version, queries)
        self.echo(f"transport ceiling: {p.transport_rounds} rounds × {p.transport_messages} cached queries")
        # One small unmeasured round each, so connections and code paths are warm for round 1.
        warm = queries[: min(500, len(queries))]
        for topic, out, _ in paths.values():
            tag = round_tag()
            await produce_burst(producer, topic, tag, warm)
            await collector.wait(out, tag, len(warm), p.drain_timeout_s)
        rounds = []
        names = list(paths)
        for index in range(p.transport_rounds):
            # Rotate the order so no path always runs first (or last) in a round.
            order = names[index % len(names):] + names[: index % len(names)]
            row: dict[str, Any] = {}
            for which in order:
                topic, out, process = paths[which]
                tag = round_tag()
                # Each path drains the same backlog, alone: its own capacity, not the producer's pace.
                with process.paused():
                    await produce_burst(producer, topic, tag, queries)
                    cpu_before = process.cpu_seconds()
                    started = time.time()
                complete = await collector.wait(out, tag, len(queries), p.drain_timeout_s)
                row[f"{which}_cpu_us_per_msg"] = round((process.cpu_seconds() - cpu_before) / len(queries) * 1e6, 1)
                result = round_result(collector, out, tag, len(queries), started, complete)
                if which != "reference":
                    events = parsed_events(collector, out, tag)
                    row[f"{which}_all_cached"] = all(e["cached"] for e in events)
                row[f"{which}_qps"] = round(result.qps, 1)
                row[f"{which}_complete"] = result.complete
                collector.forget(out, tag)
            row["ratio"] = round(row["qustream_qps"] / row["reference_qps"], 4) if row["reference_qps"] else 0.0
            row["faust_ratio"] = round(row["faust_qps"] / row["reference_qps"], 4) if row["reference_qps"] else 0.0
            rounds.append(row)
            self.echo(f"  round {index + 1}: qustream {row['qustream_qps']:.0f} q/s, "
                      f"pass-through {row['reference_qps']:.0f} q/s, ratio {row['ratio']:.2f} "
                      f"(Faust runner {row['faust_qps']:.0f} q/s)")
        summary = self._ceiling_summary(
            rounds, TRANSPORT_TARGET, messages=len(queries), batch_size=settings.batch_size,
            reference="aiokafka consume → produce pass-through process, same broker",
            method="each path drains a backlog of the round's messages produced while it was paused (SIGSTOP)")
        for which in paths:
            summary[f"{which}_cpu_us_per_msg"] = round(_median([r[f"{which}_cpu_us_per_msg"] for r in rounds]), 1)
        # CPU per message of each process: the same comparison with other load on the machine taken out.
        summary["cpu_ratio"] = round(summary["reference_cpu_us_per_msg"] / summary["qustream_cpu_us_per_msg"], 4) \
            if summary["qustream_cpu_us_per_msg"] else 0.0
        summary["faust_qps"] = round(_median([r["faust_qps"] for r in rounds]), 2)
        summary["faust_ratio"] = round(_median([r["faust_ratio"] for r in rounds]), 4)
        summary["faust_ratio_spread"] = round(_spread([r["faust_ratio"] for r in rounds]), 4)
        summary["runners"] = {"qustream": "the default Kafka runner (QUSTREAM_KAFKA_RUNNER=batch)",
                              "faust": "the Faust agent runner (QUSTREAM_KAFKA_RUNNER=faust)"}
        return summary

    async def _profile_cached(self, settings: Settings, producer: AIOKafkaProducer, collector: Collector,
                              worker: Worker) -> dict[str, Any]:
        """py-spy on the worker during one more all-cached round: where the cached path's time goes."""
        from bench.profiling import py_spy_available, summarize_collapsed

        if not py_spy_available():
            return {"error": "py-spy is not installed (pip install py-spy)"}
        self.echo("profiling the cached path with py-spy")
        raw = self.workdir / "cached-profile.txt"
        spy = await asyncio.create_subprocess_exec(
            "py-spy", "record", "-p", str(worker.pid), "-o", str(raw), "--format", "raw", "-r", "200",
            "--nonblocking", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await asyncio.sleep(1.0)
        tag = round_tag()
        started = await produce_burst(producer, settings.topic_input, tag, self._cached_queries)
        complete = await collector.wait(settings.topic_parsed, tag, len(self._cached_queries),
                                        self.plan.drain_timeout_s)
        result = round_result(collector, settings.topic_parsed, tag, len(self._cached_queries), started, complete)
        spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        await asyncio.wait_for(spy.wait(), 60)
        if not raw.exists():
            return {"error": "py-spy wrote nothing (ptrace not permitted?)"}
        summary = summarize_collapsed(raw.read_text())
        if os.environ.get("QUSTREAM_BENCH_KEEP_PROFILE"):
            shutil.copy(raw, os.environ["QUSTREAM_BENCH_KEEP_PROFILE"])
        summary["qps_while_profiled"] = round(result.qps, 1)
        return summary

    @staticmethod
    def _ceiling_summary(rounds: list[dict[str, Any]], target: float, **extra: Any) -> dict[str, Any]:
        ratios = [r["ratio"] for r in rounds]
        ratio = _median(ratios)
        return {
            **extra,
            "rounds": rounds,
            "qustream_qps": round(_median([r["qustream_qps"] for r in rounds]), 2),
            "reference_qps": round(_median([r["reference_qps"] for r in rounds]), 2),
            "ratio": round(ratio, 4),
            "ratio_spread": round(_spread(ratios), 4),
            "target": target,
            "met": ratio >= target,
        }

    # --- model ceiling ------------------------------------------------------------------------
    async def _model(self, settings: Settings, producer: AIOKafkaProducer, collector: Collector) -> dict[str, Any]:
        p = self.plan
        engine = self.engine
        assert engine is not None
        self.echo(f"model ceiling: {p.model_rounds} rounds × {p.model_queries} uncached queries, "
                  f"batch {settings.batch_size}")
        # One unmeasured round each: a worker's first full-width batch measured 20 % slower than the
        # next ones (the engine reference's did not), a one-time cost, not the pipeline's.
        warm = self.pool.take(p.model_queries)
        tag = round_tag()
        await produce_burst(producer, settings.topic_input, tag, warm)
        await collector.wait(settings.topic_parsed, tag, len(warm), p.drain_timeout_s)
        collector.forget(settings.topic_parsed, tag)
        await engine.parse_seconds([q.normalized for q in warm], p.drain_timeout_s)
        rounds = []
        for index in range(p.model_rounds):
            queries = self.pool.take(p.model_queries)
            order = ["qustream", "reference"] if index % 2 == 0 else ["reference", "qustream"]
            row: dict[str, Any] = {}
            for which in order:
                if which == "reference":
                    seconds = await engine.parse_seconds([q.normalized for q in queries], p.drain_timeout_s)
                    row["reference_qps"] = round(len(queries) / seconds, 3)
                    row["reference_s"] = round(seconds, 3)
                    continue
                tag = round_tag()
                began = await produce_burst(producer, settings.topic_input, tag, queries)
                complete = await collector.wait(settings.topic_parsed, tag, len(queries), p.drain_timeout_s)
                result = round_result(collector, settings.topic_parsed, tag, len(queries), began, complete)
                events = parsed_events(collector, settings.topic_parsed, tag)
                row["qustream_qps"] = round(result.qps, 3)
                row["qustream_complete"] = result.complete
                row["qustream_uncached"] = sum(1 for e in events if not e["cached"])
                batches = [json.loads(r.value) for r in collector.since(settings.topic_metrics, int(began * 1000))]
                row["qustream_batch_sizes"] = [b["size"] for b in batches if b["cache_misses"] or b["cache_errors"]]
                # The model's share of the round inside the worker: the rest is the pipeline's.
                row["qustream_inference_s"] = round(sum(b["inference_ms"] for b in batches) / 1000, 3)
                row["qustream_round_s"] = round(result.seconds, 3)
            row["ratio"] = round(row["qustream_qps"] / row["reference_qps"], 4) if row["reference_qps"] else 0.0
            rounds.append(row)
            self.echo(f"  round {index + 1}: qustream {row['qustream_qps']:.2f} q/s, "
                      f"engine alone {row['reference_qps']:.2f} q/s, ratio {row['ratio']:.2f}")
        self._model_qps = _median([r["qustream_qps"] for r in rounds])
        summary = self._ceiling_summary(rounds, MODEL_TARGET, queries_per_round=p.model_queries,
                                        batch_size=settings.batch_size, torch_threads=settings.cpu_threads,
                                        reference="engine.parse_batch alone in its own process, same queries "
                                                  "and batch size")
        # What the worker adds around its own model calls (Kafka, Redis, decode, publish), as a share
        # of the round: unlike the ratio, untouched by the engine's speed moving between rounds.
        summary["worker_overhead"] = round(_median(
            [1 - r["qustream_inference_s"] / r["qustream_round_s"] for r in rounds if r.get("qustream_round_s")]), 4)
        return summary

    # --- Zipf replay ----------------------------------------------------------------------------
    def _zipf_rate(self, model_qps: float) -> float:
        """The plan's rate, lowered until the expected cold-cache misses per second stay within 60 % of
        what the model path measured here: above that the backlog never drains and every percentile
        only measures the run's length."""
        p = self.plan
        rate = p.zipf_rate
        while rate > 0.5:
            misses = expected_distinct(int(rate * p.zipf_seconds), p.zipf_universe, p.zipf_exponent)
            if model_qps <= 0 or misses / p.zipf_seconds <= 0.6 * model_qps:
                break
            rate = round(rate - 0.5, 1)
        return rate

    async def _zipf(self, settings: Settings, producer: AIOKafkaProducer, collector: Collector,
                    worker: Worker, model_qps: float) -> dict[str, Any]:
        p = self.plan
        universe = self.pool.take(p.zipf_universe)
        rate = self._zipf_rate(model_qps)
        count = int(p.zipf_seconds * rate)
        ranks = zipf_ranks(count, p.zipf_universe, p.zipf_exponent, seed=7)
        stream = [universe[r] for r in ranks]
        self.echo(f"zipf replay: {count} queries at {rate}/s over {p.zipf_seconds:.0f} s "
                  f"(s={p.zipf_exponent}, universe {p.zipf_universe}, cold cache)")
        tag = round_tag()
        began = await produce_open_loop(producer, settings.topic_input, tag, stream, rate)
        complete = await collector.wait(settings.topic_parsed, tag, count, p.drain_timeout_s)
        finished = time.time()
        result = round_result(collector, settings.topic_parsed, tag, count, began, complete)
        events = parsed_events(collector, settings.topic_parsed, tag)
        latencies = _latencies(events)
        batches = [json.loads(r.value) for r in collector.since(settings.topic_metrics, int(began * 1000))]
        sizes = [b["size"] for b in batches]
        # Windows by event time: hit rate as the traffic saw it, throughput as the worker delivered it.
        window = max(5.0, p.zipf_seconds / 18)
        # Until the last parsed event, so a backlog drained after the replay still shows.
        span = max([p.zipf_seconds] + [datetime.fromisoformat(e["parsed_ts"]).timestamp() - began for e in events])
        timeline = []
        for k in range(int(span / window + 0.999)):
            lo, hi = began + k * window, began + (k + 1) * window
            in_window = [e for e in events if lo <= datetime.fromisoformat(e["event_ts"]).timestamp() < hi]
            done = [e for e in events if lo <= datetime.fromisoformat(e["parsed_ts"]).timestamp() < hi]
            window_latencies = _latencies(in_window)
            timeline.append({
                "t_s": round(k * window, 1),
                "events": len(in_window),
                "hit_rate": round(sum(e["cached"] for e in in_window) / len(in_window), 4) if in_window else None,
                "parsed_qps": round(len(done) / window, 3),
                "p50_s": round(_percentile(window_latencies, 50), 3),
                "p95_s": round(_percentile(window_latencies, 95), 3),
            })
        half = [e for e in events if datetime.fromisoformat(e["event_ts"]).timestamp() >= began + p.zipf_seconds / 2]
        rss = self.rss.between(worker.name, began, finished)
        return {
            "queries": count,
            "parsed": len(events),
            "complete": result.complete,
            "offered_qps": rate,
            "model_qps_measured": model_qps,
            "qps": round(result.qps, 3),
            "seconds": round(result.seconds, 2),
            "exponent": p.zipf_exponent,
            "universe": p.zipf_universe,
            "distinct": len({q.normalized for q in stream}),
            "expected_distinct": round(expected_distinct(count, p.zipf_universe, p.zipf_exponent), 1),
            "hit_rate": round(sum(e["cached"] for e in events) / len(events), 4) if events else 0.0,
            "hit_rate_second_half": round(sum(e["cached"] for e in half) / len(half), 4) if half else 0.0,
            "latency": _latency_summary(latencies),
            "latency_second_half": _latency_summary(_latencies(half)),
            "timeline": timeline,
            "batch_sizes": {
                "count": len(sizes),
                "mean": round(statistics.fmean(sizes), 2) if sizes else 0.0,
                "p50": _percentile(sizes, 50),
                "p95": _percentile(sizes, 95),
                "max": max(sizes) if sizes else 0,
                "histogram": _histogram(sizes, settings.batch_size),
            },
            "worker_rss_mib": {
                "start": round(rss[0][1] / 2**20, 1) if rss else None,
                "end": round(rss[-1][1] / 2**20, 1) if rss else None,
                "max": round(max(r for _, r in rss) / 2**20, 1) if rss else None,
                "series": [(round(t - began, 1), round(r / 2**20, 1)) for t, r in rss[:: max(1, len(rss) // 60)]],
            },
        }

    # --- scaling --------------------------------------------------------------------------------
    async def _scaling(self, settings: Settings, producer: AIOKafkaProducer, collector: Collector,
                       first: Worker) -> dict[str, Any]:
        """1 worker, then 2 in the group, measured the same way, unpinned: all-cached backlogs drained
        (the workers paused while it is produced, as in the transport ceiling), then uncached bursts."""
        p = self.plan
        self.echo("scaling: 1 worker, then a second joins the group (4 partitions, 2 cores)")
        one = await self._scaling_rounds(settings, producer, collector, [first])
        second_settings = settings.model_copy(update={"web_port": _free_port(), "worker_id": settings.worker_id + "-2"})
        second = self._worker("worker-2", second_settings)
        try:
            await second.wait_ready()
            # A rebalance follows the join; measure only once each worker holds two partitions.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                shares = [(await asyncio.to_thread(w.readiness))[1].get("partitions") for w in (first, second)]
                if shares == [2, 2]:
                    break
                await asyncio.sleep(0.25)
            await asyncio.sleep(1.0)
            two = await self._scaling_rounds(settings, producer, collector, [first, second])
        finally:
            self._stop_worker(second)
        summary: dict[str, Any] = {"partitions": settings.partitions, "cores": os.cpu_count(),
                                   "torch_threads_per_worker": settings.cpu_threads or os.cpu_count()}
        for kind in ("cached", "uncached"):
            single, double = _median(one[kind]), _median(two[kind])
            summary[kind] = {"1": round(single, 3), "2": round(double, 3),
                             "rounds_1": [round(v, 3) for v in one[kind]], "rounds_2": [round(v, 3) for v in two[kind]],
                             "speedup": round(double / single, 3) if single else 0.0}
            self.echo(f"  {kind}: 1 worker {single:,.2f} q/s, 2 workers {double:,.2f} q/s")
        summary["method"] = (f"cached: {p.transport_messages} pre-cached queries drained as a backlog; uncached: "
                             f"{p.model_queries} new queries per burst; no CPU pinning")
        return summary

    async def _scaling_rounds(self, settings: Settings, producer: AIOKafkaProducer, collector: Collector,
                              workers: list[Worker]) -> dict[str, list[float]]:
        p = self.plan
        cached_rounds = []
        for _ in range(p.scaling_rounds):
            result = await drain_backlog(producer, collector, settings.topic_input, settings.topic_parsed, workers,
                                         self._cached_queries, p.drain_timeout_s)
            cached_rounds.append(result.qps)
            collector.forget(settings.topic_parsed, result.tag)
        uncached_rounds = []
        for _ in range(p.scaling_uncached_rounds):
            queries = self.pool.take(p.model_queries)
            tag = round_tag()
            started = await produce_burst(producer, settings.topic_input, tag, queries)
            complete = await collector.wait(settings.topic_parsed, tag, len(queries), p.drain_timeout_s)
            uncached_rounds.append(round_result(collector, settings.topic_parsed, tag, len(queries), started,
                                                 complete).qps)
        return {"cached": cached_rounds, "uncached": uncached_rounds}

    # --- batch knobs ------------------------------------------------------------------------------
    async def _knobs(self) -> list[dict[str, Any]]:
        p = self.plan
        assert self.engine is not None
        points = [(size, linger) for size in p.knob_sizes for linger in p.knob_lingers]
        # Steady rate: the plan's, lowered so misses stay within half of the measured model rate.
        model_qps = self._model_qps
        rate = p.knob_rate
        if model_qps > 0:
            rate = max(1.0, min(rate, round(0.5 * model_qps / max(1 - p.knob_hit_rate, 1e-3), 1)))
        self.echo(f"batch knobs: {len(points)} points (burst of {p.knob_burst}, then {rate}/s for "
                  f"{p.knob_seconds:.0f} s; {p.knob_hit_rate:.0%} cached)")
        rows = []
        for size, linger in points:
            settings = self._settings(f"k{size}x{linger}", batch_size=size, batch_linger_ms=linger)
            head = self.pool.take(200)
            await prewarm_cache(settings, self.engine.version, head)
            burst = self._mixed(head, p.knob_burst)
            steady = self._mixed(head, int(p.knob_seconds * rate))
            await ensure_topics(settings, topic_names(settings))
            worker = self._worker(f"worker-k{size}x{linger}", settings)
            collector = Collector(settings, [settings.topic_parsed, settings.topic_metrics])
            await collector.start()
            producer = make_producer(settings)
            await producer.start()
            try:
                await worker.wait_ready(partitions=settings.partitions)
                tag = round_tag()
                started = await produce_burst(producer, settings.topic_input, tag, burst)
                # Bounded: a point that cannot keep up shows that from what it finished in time.
                complete = await collector.wait(settings.topic_parsed, tag, len(burst), min(p.drain_timeout_s, 90.0))
                burst_result = round_result(collector, settings.topic_parsed, tag, len(burst), started, complete)
                tag = round_tag()
                steady_began = await produce_open_loop(producer, settings.topic_input, tag, steady, rate)
                steady_complete = await collector.wait(settings.topic_parsed, tag, len(steady),
                                                       min(p.drain_timeout_s, 60.0))
                latencies = _latencies(parsed_events(collector, settings.topic_parsed, tag))
                # A message still missing at the timeout is at least this old: count it so, or a
                # point that cannot keep up would report only its fast messages.
                missing = len(steady) - len(latencies)
                latencies += [time.time() - steady_began - len(steady) / rate] * max(missing, 0)
            finally:
                await producer.stop()
                await collector.stop()
                self._stop_worker(worker)
            row = {
                "batch_size": size,
                "batch_linger_ms": linger,
                "burst_qps": round(burst_result.qps, 2),
                "burst_complete": burst_result.complete,
                "steady_complete": steady_complete,
                "steady_rate_qps": rate,
                "steady_missing": max(missing, 0),
                **_latency_summary(latencies),
            }
            rows.append(row)
            self.echo(f"  batch {size:>3} linger {linger:>4} ms: burst {row['burst_qps']:.1f} q/s, "
                      f"p95 {row['p95_s']:.2f} s at {rate}/s")
        return rows

    def _mixed(self, head: list[BenchQuery], count: int) -> list[BenchQuery]:
        """``knob_hit_rate`` of the messages from the (cached) head, the rest never seen before."""
        fresh = iter(self.pool.take(int(count * (1 - self.plan.knob_hit_rate)) + 1))
        out = []
        rng_state = 0
        for i in range(count):
            # A fixed interleave rather than random draws keeps points of the sweep comparable.
            if (i + 1) * (1 - self.plan.knob_hit_rate) >= rng_state + 1:
                rng_state += 1
                out.append(next(fresh))
            else:
                out.append(head[(i * 7919) % len(head)])
        return out

    # --- metadata -----------------------------------------------------------------------------------
    def _meta(self, began: float, load_before: tuple[float, float, float], commit: str | None) -> dict[str, Any]:
        return {
            **run_meta(asdict(self.plan), began, load_before, commit),
            "model": self.engine.model_id if self.engine else None,
            "engine_version": self.engine.version if self.engine else None,
            "not_measured": ["GPU (no GPU on this machine)", "Apache Kafka (tansu only)",
                             "multi-host scaling", "Redis Streams transport"],
        }


def run_meta(plan: dict[str, Any], began: float, load_before: tuple[float, float, float],
             commit: str | None) -> dict[str, Any]:
    """What a benchmark result records about its run: plan, times, load, machine, broker, and the commit
    measured (``git_head()`` read when the run began: the tree may move on while it runs)."""
    import psutil
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "plan": plan,
        "started": datetime.fromtimestamp(began, UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - began, 1),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "os": platform.platform(),
        },
        "broker": "tansu 0.6 (memory storage), private instance",
        "commit": commit,
    }


def git_head() -> str | None:
    """The commit measured, with ``+dirty`` when the working tree differs from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _free_port() -> int:
    from streams.local_stack import free_port

    return free_port()


def _histogram(sizes: Sequence[int], batch_size: int) -> dict[str, int]:
    """Counts per power-of-two bucket, up to the larger of ``batch_size`` and the largest step."""
    top = max([batch_size, *sizes])
    edges = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, batch_size, top})
    edges = [e for e in edges if e <= top]
    counts: dict[str, int] = {}
    low = 1
    for edge in edges:
        label = f"{low}" if low == edge else f"{low}-{edge}"
        counts[label] = sum(1 for s in sizes if low <= s <= edge)
        low = edge + 1
    return counts


def run_pipeline_bench(plan: Plan, output: Path, charts_dir: Path | None,
                       echo: Callable[[str], None] = print, profile: bool = False,
                       scenarios: Sequence[str] = SCENARIOS) -> dict[str, Any]:
    """Run the scenarios, write the JSON (and charts), return the results."""
    with tempfile.TemporaryDirectory(prefix="qustream-bench-") as workdir:
        bench = PipelineBench(plan, Path(workdir), echo=echo, profile=profile, scenarios=scenarios)
        try:
            results = asyncio.run(bench.run())
        except BaseException:
            dump_logs(Path(workdir), echo)
            raise
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if charts_dir is not None and set(SCENARIOS) <= results.keys():
        from bench.pipeline_charts import write_charts

        results["meta"]["charts"] = [str(path) for path in write_charts(results, charts_dir)]
        output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def dump_logs(workdir: Path, echo: Callable[[str], None]) -> None:
    for path in sorted(workdir.glob("*.log")):
        echo(f"--- {path.name} (tail)\n{path.read_text(errors='replace')[-2000:]}")


def iter_table_rows(results: dict[str, Any]) -> Iterator[tuple[str, str, str, str, str]]:
    """(scenario, qustream, reference, ratio, target) rows for the summary table."""
    for name, unit in (("transport", "q/s"), ("model", "q/s")):
        if name not in results:
            continue
        section = results[name]
        yield (
            f"{name} ceiling",
            f"{section['qustream_qps']:,.2f} {unit}",
            f"{section['reference_qps']:,.2f} {unit}",
            f"{section['ratio']:.0%} (±{section['ratio_spread'] / 2:.0%})",
            f"≥ {section['target']:.0%}: {'met' if section['met'] else 'missed'}",
        )
    transport = results.get("transport")
    if transport is None:
        return
    yield (
        "transport, Faust runner",
        f"{transport['faust_qps']:,.2f} q/s",
        f"{transport['reference_qps']:,.2f} q/s",
        f"{transport['faust_ratio']:.0%}",
        "QUSTREAM_KAFKA_RUNNER=faust (for comparison)",
    )
    zipf = results.get("zipf")
    if zipf is None:
        return
    yield (
        "zipf replay",
        f"{zipf['qps']:.2f} q/s, hit {zipf['hit_rate']:.0%} (2nd half {zipf['hit_rate_second_half']:.0%})",
        f"offered {zipf['offered_qps']} q/s",
        f"p50/p95/p99 {zipf['latency']['p50_s']:.2f}/{zipf['latency']['p95_s']:.2f}/"
        f"{zipf['latency']['p99_s']:.2f} s",
        f"RSS max {zipf['worker_rss_mib']['max']} MiB",
    )
    scaling = results.get("scaling")
    if scaling is None:
        return
    for kind in ("cached", "uncached"):
        yield (
            f"scaling {kind}",
            f"2 workers {scaling[kind]['2']:,.2f} q/s",
            f"1 worker {scaling[kind]['1']:,.2f} q/s",
            f"×{scaling[kind]['speedup']:.2f}",
            f"{scaling['partitions']} partitions, {scaling['cores']} cores",
        )


def print_summary(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    meta = results["meta"]
    machine = meta["machine"]
    table = Table(title=f"qustream bench pipeline ({meta['plan']['name']}) · {machine['cores']} cores · "
                  f"{machine['cpu']} · load {meta['load_average_before'][0]}→{meta['load_average_after'][0]}")
    for column in ("scenario", "qustream", "reference", "ratio / latency", "target / notes"):
        table.add_column(column)
    for row in iter_table_rows(results):
        table.add_row(*row)
    knobs = Table(title="batch knobs (burst 90 % cached; latency at a steady rate)")
    for column in ("batch size", "linger ms", "burst q/s", "p50 s", "p95 s", "p99 s"):
        knobs.add_column(column, justify="right")
    for row in results.get("knobs", []):
        knobs.add_row(str(row["batch_size"]), str(row["batch_linger_ms"]), f"{row['burst_qps']:.2f}",
                      f"{row['p50_s']:.2f}", f"{row['p95_s']:.2f}", f"{row['p99_s']:.2f}")
    console = Console()
    console.print(table)
    console.print(knobs)
