"""``qustream bench latency``: end-to-end latency under open-loop load, today's step-based runner and
the two that publish hits at once (misses joining the running decoding loop, or batch after batch)
side by side in one run (issue #14).

Full run (about 21 minutes on 2 cores; writes bench/results/latency.json and bench/results/latency.png):

    qustream bench latency

Smoke run (batch 8, 5-second levels, about 2 minutes; what tests/test_bench_latency.py runs; writes
bench/results/latency_quick.json and .png):

    qustream bench latency --quick

The three runners are ``qustream worker`` subprocesses (``RUNNERS``: ``QUSTREAM_CONTINUOUS_BATCHING=false``,
the step-based baseline; ``true`` with ``QUSTREAM_MISS_BATCHING=continuous``; ``true`` with ``batch``),
against one private tansu broker and the machine's Redis, each with topics and a cache prefix of its
own, so none ever sees another's cache entries. ``--runner NAME:KEY=VALUE,...`` adds runners with other
settings (the same worker in bf16, say), run and judged beside the three. The run:

1. Saturation: each worker drains backlogs of all-miss queries produced while it was paused
   (messages / seconds), two rounds with the runners' order swapped in the second. The step-based
   runner's figure is the model capacity that every load level is a share of, for both runners alike.
2. Load levels (50, 80, 95 % of capacity): misses arrive at that share of capacity and hits on top of
   them, so that about 60 % of arrivals hit. A seeded Poisson process sends Zipf-drawn queries from a
   universe of queries new to this level, whose popular head is pre-cached for both runners alike; each
   query goes out at its scheduled time whatever the worker does, with that time as its event time
   (``ts``). Both runners get the same queries at the same offsets; which goes first alternates.
3. A separate consumer (this process) reads the parsed topics. Latency = read time − event time, split
   into hits (read from the cache: ``cached`` and no model time), shared (``cached``, but a repeat of a
   query whose parse was still in the model, so it waited for it: ``timings.inference_ms`` > 0) and
   misses (``cached`` false). A message still missing when the level's drain times out counts as a miss
   as old as it was then. The dead-letter topics are read too: a query that did not come out parsed was
   dead-lettered (the reasons are counted), or is on neither topic, in which case its input offset is
   looked up in the worker's committed offsets (committed: lost; not committed: still held). Either
   makes the phase incomplete, and the workers' logs are then kept next to the JSON.
4. Burst: misses arrive at ten times capacity for a few seconds (hits on top, as in a level), then
   both workers drain it. Peak RSS over the burst against the steady levels' shows whether memory stays
   flat when the backlog is far beyond what the model can take.
5. Worker memory: the kernel's peak RSS (VmHWM) over each round and over the worker's whole life.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer, ConsumerRecord
from pydantic import ValidationError

from bench.pipeline_bench import (
    Pool,
    WorkerPlan,
    drain_backlog,
    drop_cache,
    dump_logs,
    git_head,
    parsed_events,
    prewarm_cache,
    produce_burst,
    produce_scheduled,
    round_tag,
    run_meta,
)
from bench.stack import Collector, Services, Worker
from bench.workload import BenchQuery, expected_distinct, head_for_hit_ratio, poisson_arrivals, zipf_ranks
from schemas.events import DeadLetterReason
from schemas.settings import Settings
from streams.kafka_io import make_producer
from streams.topics import ensure_topics

#: tansu (memory storage) answers a waiting fetch late: with Kafka's 500 ms wait a hit would mostly
#: measure that. Apache Kafka answers as soon as records arrive, whatever the wait.
FETCH_MAX_WAIT_MS = 20

#: Runner name -> its settings. The first is the baseline the capacity is measured on; issue #14's
#: targets are judged for each of the others.
RUNNERS: dict[str, dict[str, Any]] = {
    "step": {"continuous_batching": False},
    "continuous": {"continuous_batching": True, "miss_batching": "continuous"},
    "batched": {"continuous_batching": True, "miss_batching": "batch"},
}
BASELINE, NEW = "step", "continuous"

HIT_P99_MS = 100.0
MISS_P99_LOAD = 0.8
MISS_P99_RATIO = 0.5
SATURATION_RATIO = 0.95
RSS_LIMIT_BYTES = 2 * 2**30
RSS_BATCH_SIZE = 64
#: "Flat" memory under a burst: the burst's peak RSS within this share above the steady levels' peak.
BURST_RSS_GROWTH = 0.10


@dataclass
class Plan(WorkerPlan):
    """Sizes of a run: ``full`` ≈ 21 minutes on 2 cores, ``quick`` ≈ 2 (smoke test, CI). With one torch
    thread, the other core is left to the worker's own I/O, the broker and this harness, the same for
    both runners."""

    loads: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.95])
    level_seconds: float = 60.0
    hit_ratio: float = 0.6
    # Exponent 1 over 5,000 queries: a pre-cached head of about a hundred gives most of the hits, so
    # misses are mostly first sightings of tail queries rather than repeats still in flight.
    universe: int = 5_000
    exponent: float = 1.0
    # Unmeasured: a worker's first full-width batch is slower than the ones after it.
    warmup_messages: int = 64
    # Two full batches: the step-based runner's steady state is one full batch after another.
    saturation_messages: int = 128
    #: Backlogs drained by each runner, in alternating order (step first, then continuous first, ...),
    #: so neither runner always drains right after the other.
    saturation_rounds: int = 2
    drain_timeout_s: float = 300.0
    #: Misses at this multiple of capacity for ``burst_seconds`` (the backlog is drained afterwards).
    burst_load: float = 10.0
    burst_seconds: float = 10.0
    seed: int = 14
    #: More runners beside ``RUNNERS`` (name → settings on top of the product's defaults), judged
    #: against the step-based one like the others: ``--runner continuous_bf16:miss_batching=continuous,dtype=bfloat16``.
    extra_runners: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def runners(self) -> dict[str, dict[str, Any]]:
        return {**RUNNERS, **self.extra_runners}

    @classmethod
    def named(cls, name: str) -> Plan:
        if name == "full":
            return cls("full")
        if name == "quick":
            return cls("quick", batch_size=8, level_seconds=5.0, universe=300, warmup_messages=8,
                       saturation_messages=16, saturation_rounds=1, drain_timeout_s=90.0, burst_seconds=1.0)
        raise ValueError(f"unknown plan {name!r}: full or quick")


def parse_runner(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` (settings names, as in ``QUSTREAM_<KEY>``) → name and overrides,
    checked against the settings here, before a run that would fail only when its worker starts."""
    name, _, assignments = text.partition(":")
    name = name.strip()
    if not name.isidentifier() or name in RUNNERS:
        raise ValueError(f"runner {text!r}: a new name (letters, digits, _) first; taken: {', '.join(RUNNERS)}")
    overrides: dict[str, Any] = {}
    for assignment in filter(None, (part.strip() for part in assignments.split(","))):
        key, equals, value = assignment.partition("=")
        key = key.strip().lower()
        if not equals or key not in Settings.model_fields:
            raise ValueError(f"runner {text!r}: {assignment!r} is not SETTING=VALUE with a setting qustream has")
        overrides[key] = value.strip()
    if not overrides:
        raise ValueError(f"runner {text!r}: no settings after the name (NAME:KEY=VALUE,...)")
    try:
        Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"runner {text!r}: {problems}") from None
    return name, overrides


def _combined_saturation(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One runner's saturation rounds as one figure: all messages over all drain seconds."""
    seconds = sum(row["seconds"] for row in rounds)
    messages = sum(row["messages"] for row in rounds)
    peaks = [row["peak_rss_mib"] for row in rounds if row["peak_rss_mib"] is not None]
    return {"messages": messages, "parsed": sum(row["parsed"] for row in rounds),
            "misses": sum(row["misses"] for row in rounds), "complete": all(row["complete"] for row in rounds),
            "seconds": round(seconds, 2), "qps": round(messages / seconds, 3) if seconds > 0 else 0.0,
            "peak_rss_mib": max(peaks, default=None), "rounds_qps": [row["qps"] for row in rounds]}


def _dead_letters(records: Sequence[ConsumerRecord[Any, Any]], parsed: Collection[str]) -> dict[str, str]:
    """Query id → error class of the round's dead letters (a query also parsed, in an earlier delivery
    say, is not one)."""
    dead = {}
    for record in records:
        query_id = record.key.decode(errors="replace")
        if query_id not in parsed:
            dead[query_id] = DeadLetterReason.from_headers(dict(record.headers)).error_class
    return dead


#: Missing queries described one by one in the results, at most.
_MISSING_DETAILED = 20


async def _missing_detail(worker: Worker, queries: Sequence[BenchQuery], placed: Sequence[tuple[int, int]],
                          absent: Sequence[int]) -> tuple[int, list[dict[str, Any]]]:
    """How many of the absent queries' input positions the worker's group committed, and where each of
    the first few stands: committed (lost), waiting in the worker (its partition has unsettled
    inputs), or never handed to the core step (nothing unsettled, nothing committed past it)."""
    committed = await worker.committed()
    partitions = await asyncio.to_thread(worker.partition_gauges)
    lost = sum(1 for i in absent if (committed.get(placed[i][0]) or 0) > placed[i][1])
    detail = []
    for i in absent[:_MISSING_DETAILED]:
        partition, offset = placed[i]
        gauges = partitions.get(partition, {})
        state = ("committed" if (committed.get(partition) or 0) > offset
                 else "held" if gauges.get("qustream_inputs_unsettled") else "not_handed_over")
        detail.append({"query": queries[i].text, "partition": partition, "offset": offset,
                       "committed": committed.get(partition), "state": state, **gauges})
    return lost, detail


def _ms_summary(seconds: Sequence[float]) -> dict[str, Any]:
    if not seconds:
        return {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 95, 99])
    return {"count": len(seconds), "p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1),
            "p99_ms": round(float(p99), 1), "max_ms": round(max(seconds) * 1000, 1)}


def _mib(value: int | None) -> float | None:
    return round(value / 2**20, 1) if value is not None else None


class LatencyBench:
    def __init__(self, plan: Plan, workdir: Path, echo: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.workdir = workdir
        self.echo = echo
        self.pool = Pool(plan.warmup_messages + plan.saturation_messages * plan.saturation_rounds
                         + plan.universe * (len(plan.loads) + 1))
        self.services: Services | None = None
        self.settings: dict[str, Settings] = {}
        self.workers: dict[str, Worker] = {}
        self.version = ""

    async def run(self) -> dict[str, Any]:
        from workers.engine import version_for
        from workers.model import model_id_for

        began, load_before, commit = time.time(), os.getloadavg(), git_head()
        self.services = Services(self.workdir)
        try:
            p = self.plan
            for name, overrides in p.runners.items():
                # A runner's own settings win over the plan's (a runner that lingers otherwise, say).
                self.settings[name] = self.services.settings(name, **{
                    "batch_size": p.batch_size, "batch_linger_ms": p.linger_ms, "cpu_threads": p.cpu_threads,
                    "broker_fetch_max_wait_ms": FETCH_MAX_WAIT_MS, **overrides})
            self.version = version_for(self.settings[BASELINE])
            results = await self._run_all()
        finally:
            for settings in self.settings.values():
                await drop_cache(self.services.redis_url, settings.cache_prefix)
            self.services.close()
        results["meta"] = {**run_meta(asdict(self.plan), began, load_before, commit),
                           "model": model_id_for(self.settings[BASELINE]), "engine_version": self.version,
                           "runners": {name: " ".join(f"QUSTREAM_{key.upper()}={str(value).lower()}"
                                                  for key, value in overrides.items())
                                       for name, overrides in self.plan.runners.items()}}
        results["targets"] = evaluate_targets(results)
        results["targets_by_runner"] = {name: evaluate_targets(results, name) for name in self.candidates}
        return results

    @property
    def candidates(self) -> list[str]:
        return [name for name in self.plan.runners if name != BASELINE]

    async def _run_all(self) -> dict[str, Any]:
        p = self.plan
        for name, settings in self.settings.items():
            await ensure_topics(settings)
            self.workers[name] = Worker(f"worker-{name}", settings, self.workdir / f"worker-{name}.log")
        any_settings = self.settings[BASELINE]
        # Dead letters too: a query that did not come out parsed was dead-lettered (and why), held, or lost.
        outputs = [topic for s in self.settings.values() for topic in (s.topic_parsed, s.topic_dlq)]
        collector = Collector(any_settings, outputs, timed=True)
        producer = make_producer(any_settings)
        await collector.start()
        await producer.start()
        try:
            self.echo(f"starting both workers (batch {p.batch_size}, {p.cpu_threads} torch thread(s))")
            for name, worker in self.workers.items():
                await worker.wait_ready(timeout_s=600.0, partitions=self.settings[name].partitions)
            startup_peak = {name: worker.peak_rss_bytes() for name, worker in self.workers.items()}
            await self._warm_up(producer, collector)
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in p.runners}
            for index in range(p.saturation_rounds):
                backlog = self.pool.take(p.saturation_messages)
                order = list(p.runners) if index % 2 == 0 else list(reversed(p.runners))
                for name in order:
                    rounds[name].append(await self._saturation(name, backlog, producer, collector))
            saturation = {name: _combined_saturation(rows) for name, rows in rounds.items()}
            capacity = saturation[BASELINE]["qps"]
            if capacity <= 0:
                raise RuntimeError("the step-based worker parsed nothing: no capacity to load against")
            levels = [await self._level(index, load, capacity, producer, collector)
                      for index, load in enumerate(p.loads)]
            burst = await self._level(len(p.loads), p.burst_load, capacity, producer, collector,
                                      seconds=p.burst_seconds)
        finally:
            await producer.stop()
            await collector.stop()
            for worker in self.workers.values():
                worker.stop()
        workers = {}
        for name in p.runners:
            serving = [v for v in [saturation[name]["peak_rss_mib"]] +
                       [level["runners"][name]["peak_rss_mib"] for level in levels] if v is not None]
            start, in_burst = _mib(startup_peak[name]), burst["runners"][name]["peak_rss_mib"]
            workers[name] = {"startup_peak_rss_mib": start, "serving_peak_rss_mib": max(serving, default=None),
                             "burst_peak_rss_mib": in_burst,
                             "peak_rss_mib": max([v for v in [start, *serving, in_burst] if v is not None],
                                                 default=None)}
        return {
            "capacity": {"qps": capacity, "runner": BASELINE,
                         "method": f"the step-based worker drains {p.saturation_rounds} backlog(s) of "
                                   f"{p.saturation_messages} all-miss queries, each produced while it was paused "
                                   "(runners in alternating order): messages / Σ(last output − resume)"},
            "saturation": {**saturation, "ratio": round(saturation[NEW]["qps"] / capacity, 4),
                           "ratios": {name: round(saturation[name]["qps"] / capacity, 4) for name in self.candidates}},
            "levels": levels,
            "burst": burst,
            "workers": workers,
        }

    async def _warm_up(self, producer: AIOKafkaProducer, collector: Collector) -> None:
        """Both workers at once (unmeasured): the first full-width batch and first connections."""
        queries = self.pool.take(self.plan.warmup_messages)
        self.echo(f"warm-up: {len(queries)} misses to each worker")
        tag = round_tag()
        for settings in self.settings.values():
            await produce_burst(producer, settings.topic_input, tag, queries)
        for name, settings in self.settings.items():
            if not await collector.wait(settings.topic_parsed, tag, len(queries), self.plan.drain_timeout_s):
                raise TimeoutError(f"the {name} worker did not finish its warm-up; log:\n"
                                   f"{self.workers[name].log_tail()}")
            collector.forget(settings.topic_parsed, tag)

    async def _saturation(self, name: str, queries: Sequence[BenchQuery], producer: AIOKafkaProducer,
                          collector: Collector) -> dict[str, Any]:
        p = self.plan
        settings, worker = self.settings[name], self.workers[name]
        worker.reset_peak_rss()
        result = await drain_backlog(producer, collector, settings.topic_input, settings.topic_parsed, [worker],
                                     queries, p.drain_timeout_s)
        worker.check_alive()
        events = parsed_events(collector, settings.topic_parsed, result.tag)
        collector.forget(settings.topic_parsed, result.tag)
        row = {"messages": len(queries), "parsed": result.count, "misses": sum(not e["cached"] for e in events),
               "complete": result.complete, "seconds": round(result.seconds, 2), "qps": round(result.qps, 3),
               "peak_rss_mib": _mib(worker.peak_rss_bytes())}
        self.echo(f"saturation, {name}: {row['qps']:.2f} q/s ({row['parsed']}/{row['messages']} in "
                  f"{row['seconds']:.1f} s)")
        return row

    async def _level(self, index: int, load: float, capacity: float, producer: AIOKafkaProducer,
                     collector: Collector, seconds: float | None = None) -> dict[str, Any]:
        p = self.plan
        seed = p.seed + index
        seconds = seconds or p.level_seconds
        rate = load * capacity / (1 - p.hit_ratio)
        offsets = poisson_arrivals(rate, seconds, seed)
        count = len(offsets)
        universe = self.pool.take(p.universe)
        head = head_for_hit_ratio(max(count, 1), p.universe, p.exponent, p.hit_ratio)
        queries = [universe[rank] for rank in zipf_ranks(count, p.universe, p.exponent, seed)]
        for settings in self.settings.values():
            await prewarm_cache(settings, self.version, universe[:head])
        order = list(p.runners) if index % 2 == 0 else list(reversed(p.runners))
        self.echo(f"load {load:.0%}: {count} queries at {rate:.2f}/s over {seconds:.0f} s "
                  f"(misses {load * capacity:.2f}/s), {head} popular queries pre-cached; {' then '.join(order)}")
        runners = {name: await self._open_loop(name, queries, offsets, producer, collector) for name in order}
        return {
            "load": load,
            "offered_qps": round(rate, 3),
            "offered_miss_qps": round(load * capacity, 3),
            "seconds": seconds,
            "messages": count,
            "seed": seed,
            "universe": p.universe,
            "head_cached": head,
            "expected_hit_ratio": round(1 - expected_distinct(count, p.universe, p.exponent, head) / count, 4)
            if count else None,
            "order": order,
            "runners": {name: runners[name] for name in p.runners},
        }

    async def _open_loop(self, name: str, queries: Sequence[BenchQuery], offsets: Sequence[float],
                         producer: AIOKafkaProducer, collector: Collector) -> dict[str, Any]:
        settings, worker = self.settings[name], self.workers[name]
        tag = round_tag()
        worker.reset_peak_rss()
        started, late, placed = await produce_scheduled(producer, settings.topic_input, tag, queries, offsets)
        complete = await collector.wait([settings.topic_parsed, settings.topic_dlq], tag, len(queries),
                                        self.plan.drain_timeout_s)
        waited_until = time.time()
        worker.check_alive()
        due = {f"{tag}-{i}": started + offset for i, offset in enumerate(offsets)}
        seen: dict[str, tuple[float, str]] = {}
        read_lags, queued, last_read, duplicates = [], [], started, 0
        for record in collector.of_round(settings.topic_parsed, tag):
            event = json.loads(record.value)
            if event["query_id"] in seen:
                duplicates += 1  # a redelivery: the first copy is the one a consumer acted on
                continue
            read = collector.read_at(record)
            kind = "misses" if not event["cached"] else "shared" if event["timings"]["inference_ms"] else "hits"
            seen[event["query_id"]] = (read - due[event["query_id"]], kind)
            read_lags.append(read - record.timestamp / 1000)
            if kind == "hits" and event["timings"].get("queue_ms") is not None:
                queued.append(event["timings"]["queue_ms"] / 1000)
            last_read = max(last_read, read)
        collector.forget(settings.topic_parsed, tag)
        dead = _dead_letters(collector.of_round(settings.topic_dlq, tag), seen)
        collector.forget(settings.topic_dlq, tag)
        absent = [i for i, query_id in enumerate(due) if query_id not in seen and query_id not in dead]
        missing = [waited_until - due[f"{tag}-{i}"] for i in absent]
        hits = [latency for latency, kind in seen.values() if kind == "hits"]
        shared = [latency for latency, kind in seen.values() if kind == "shared"]
        misses = [latency for latency, kind in seen.values() if kind == "misses"] + missing
        lost, detail = await _missing_detail(worker, queries, placed, absent) if absent else (0, [])
        duration = last_read - started
        row: dict[str, Any] = {
            "messages": len(queries),
            "parsed": len(seen),
            "missing": len(missing),
            "dead_lettered": len(dead),
            # At least once: outputs published again (a batch republished after a partial hand-over).
            "duplicates": duplicates,
            "dead_letter_reasons": dict(Counter(dead.values())),
            # A query on neither topic is lost if its offset was committed, else still held by the worker.
            "missing_committed": lost,
            "complete": complete and not missing and not dead,
            "hit_ratio": round(len(hits) / len(seen), 4) if seen else None,
            "hits": _ms_summary(hits),
            "shared": _ms_summary(shared),
            "misses": _ms_summary(misses),
            "duration_s": round(duration, 2),
            "throughput_qps": round(len(seen) / duration, 3) if duration > 0 else 0.0,
            "peak_rss_mib": _mib(worker.peak_rss_bytes()),
            # Where a hit's time goes: event time → the worker's start on it, as the worker reports it.
            "hits_queue": _ms_summary(queued),
            # This harness's own share of the latency: late sends, and output read after it was written.
            "send_late_ms_p99": round(float(np.percentile(late, 99)) * 1000, 1) if late else None,
            "read_lag_ms_p99": round(float(np.percentile(read_lags, 99)) * 1000, 1) if read_lags else None,
        }
        if detail:
            row["missing_detail"] = detail
        self.echo(f"  {name}: hits p99 {row['hits']['p99_ms']} ms, misses p99 {row['misses']['p99_ms']} ms, "
                  f"{row['shared']['count']} shared (p99 {row['shared']['p99_ms']} ms), "
                  f"hit ratio {row['hit_ratio']}, {row['parsed']}/{row['messages']} out, "
                  f"{row['duplicates']} duplicate(s)"
                  + (f", {len(dead)} dead-lettered: {row['dead_letter_reasons']}" if dead else ""))
        return row


def evaluate_targets(results: dict[str, Any], runner: str = NEW) -> list[dict[str, Any]]:
    """Issue #14's targets for ``runner``, each against the step-based one in the same run."""
    levels = results["levels"]
    hits = [level["runners"][runner]["hits"]["p99_ms"] for level in levels]
    worst_hit = max((v for v in hits if v is not None), default=None)
    at_load = next((level for level in levels if abs(level["load"] - MISS_P99_LOAD) < 1e-9), None)
    miss_ratio = None
    if at_load is not None:
        new, old = (at_load["runners"][name]["misses"]["p99_ms"] for name in (runner, BASELINE))
        miss_ratio = round(new / old, 4) if new is not None and old else None
    saturation = results["saturation"]
    saturation_ratio = saturation.get("ratios", {}).get(runner, saturation["ratio"])
    rss = results["workers"][runner]["peak_rss_mib"]
    steady, in_burst = (results["workers"][runner].get(key) for key in ("serving_peak_rss_mib", "burst_peak_rss_mib"))
    growth = round(in_burst / steady - 1, 4) if steady and in_burst is not None else None
    burst_load = results.get("burst", {}).get("load")
    batch_size = results.get("meta", {}).get("plan", {}).get("batch_size")
    return [
        {"target": f"hits p99 ≤ {HIT_P99_MS:.0f} ms at every load level", "value": worst_hit,
         "measured": f"worst {worst_hit} ms" if worst_hit is not None else "no hits",
         "met": worst_hit is not None and len(hits) == len(levels) and all(
             v is not None and v <= HIT_P99_MS for v in hits)},
        {"target": f"misses p99 at {MISS_P99_LOAD:.0%} load ≤ {MISS_P99_RATIO:.0%} of step-based", "value": miss_ratio,
         "measured": f"{miss_ratio:.0%} of step-based" if miss_ratio is not None else "not measured",
         "met": miss_ratio is not None and miss_ratio <= MISS_P99_RATIO},
        {"target": f"saturation throughput ≥ {SATURATION_RATIO:.0%} of step-based", "value": saturation_ratio,
         "measured": f"{saturation_ratio:.0%} of step-based", "met": saturation_ratio >= SATURATION_RATIO},
        {"target": f"worker peak RSS ≤ {RSS_LIMIT_BYTES / 2**30:.0f} GiB at batch {RSS_BATCH_SIZE}", "value": rss,
         "measured": f"{rss} MiB at batch {batch_size}",
         "met": (rss is not None and rss * 2**20 <= RSS_LIMIT_BYTES) if batch_size == RSS_BATCH_SIZE else None},
        {"target": f"memory flat under a burst of misses at {burst_load or 0:.0f}× capacity (peak RSS ≤ "
                   f"{1 + BURST_RSS_GROWTH:.2f}× the steady levels')", "value": growth,
         "measured": f"{in_burst} MiB in the burst, {steady} MiB steady ({growth:+.1%})" if growth is not None
         else "not measured",
         "met": growth is not None and growth <= BURST_RSS_GROWTH},
    ]


def incomplete_phases(results: dict[str, Any]) -> list[str]:
    """Each phase and runner where a produced query did not come out parsed, and what became of it."""
    return [f"{phase['load']:.0%} {name}: {row['missing']} of {row['messages']} on neither topic "
            f"({row['missing_committed']} of them committed), {row['dead_lettered']} dead-lettered "
            f"{row['dead_letter_reasons']}{_missing_states(row)}"
            for phase in [*results["levels"], results["burst"]] for name, row in phase["runners"].items()
            if not row["complete"]]


def _missing_states(row: dict[str, Any]) -> str:
    detail = row.get("missing_detail")
    if not detail:
        return ""
    return f"; of the first {len(detail)} missing: {dict(Counter(item['state'] for item in detail))}"


def run_latency_bench(plan: Plan, output: Path, chart: Path | None,
                      echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark, write the JSON (and the chart), return the results. The workers' logs of a
    run where a query did not come out parsed are kept next to the JSON (``<name>_logs/``)."""
    with tempfile.TemporaryDirectory(prefix="qustream-latency-") as workdir:
        try:
            results = asyncio.run(LatencyBench(plan, Path(workdir), echo).run())
        except BaseException:
            dump_logs(Path(workdir), echo)
            raise
        if incomplete_phases(results):
            kept = output.parent / f"{output.stem}_logs"
            kept.mkdir(parents=True, exist_ok=True)
            for log_file in Path(workdir).glob("*.log"):
                shutil.copy(log_file, kept / log_file.name)
            results["meta"]["logs_kept"] = str(kept)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Written before the chart too, so that a chart that fails never costs the run's figures.
    output.write_text(json.dumps(results, indent=2) + "\n")
    if chart is not None:
        from bench.pipeline_charts import write_latency_chart

        results["meta"]["chart"] = str(write_latency_chart(results, chart))
        output.write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_summary(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    meta = results["meta"]
    plan = meta["plan"]
    console = Console(width=160)

    def ms(summary: dict[str, Any]) -> str:
        if not summary["count"]:
            return "-"
        return " / ".join(f"{summary[k]:,.0f}" for k in ("p50_ms", "p95_ms", "p99_ms"))

    def cells(row: dict[str, Any]) -> list[str]:
        shared = f"{row['shared']['count']}: {ms(row['shared'])}" if row["shared"]["count"] else "0"
        ratio = f"{row['hit_ratio']:.0%}" if row["hit_ratio"] is not None else "-"
        out = f"{row['parsed']}/{row['messages']}"
        out += f" ({row['dead_lettered']} DLQ)" if row.get("dead_lettered") else ""
        out += "" if row["complete"] else " [red]incomplete[/]"
        return [ms(row["hits"]), ms(row["misses"]), shared, ratio, f"{row['throughput_qps']:.2f}", out,
                f"{row['peak_rss_mib']}"]

    table = Table(title=f"qustream bench latency ({plan['name']}) · batch {plan['batch_size']} · "
                  f"{meta['machine']['cores']} cores · capacity {results['capacity']['qps']:.2f} q/s (step-based, "
                  f"all misses) · load {meta['load_average_before'][0]}→{meta['load_average_after'][0]}")
    for column in ("load", "runner", "offered q/s", "hits p50/p95/p99 ms", "misses p50/p95/p99 ms",
                   "shared n: p50/p95/p99 ms", "hit ratio", "throughput q/s", "out", "peak RSS MiB"):
        table.add_column(column, justify="left" if column in ("load", "runner") else "right")
    burst = results["burst"]
    for level, label in [*((level, f"{level['load']:.0%}") for level in results["levels"]),
                         (burst, f"burst {burst['load']:.0f}×, {burst['seconds']:.0f} s")]:
        for name in meta["runners"]:
            table.add_row(label, name, f"{level['offered_qps']:.2f}", *cells(level["runners"][name]))
    for name in meta["runners"]:
        row = results["saturation"][name]
        table.add_row("saturation", name, "backlog", "-", f"all {row['misses']} misses", "-", "-", f"{row['qps']:.2f}",
                      f"{row['parsed']}/{row['messages']}", f"{row['peak_rss_mib']}")
    console.print(table)
    by_runner = results.get("targets_by_runner") or {NEW: results["targets"]}
    for runner, runner_targets in by_runner.items():
        targets = Table(title=f"issue #14 targets: {runner} runner, against step-based in the same run")
        for column in ("target", "measured", ""):
            targets.add_column(column)
        for target in runner_targets:
            verdict = {True: "[green]met[/]", False: "[red]missed[/]", None: "[yellow]n/a[/]"}[target["met"]]
            targets.add_row(target["target"], target["measured"], verdict)
        console.print(targets)
    for name, memory in results["workers"].items():
        console.print(f"{name} worker peak RSS: {memory['peak_rss_mib']} MiB (start-up "
                      f"{memory['startup_peak_rss_mib']}, steady {memory['serving_peak_rss_mib']}, burst "
                      f"{memory['burst_peak_rss_mib']})")
