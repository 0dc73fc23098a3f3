"""``qustream bench hits-behind-miss``: how fast a mostly cached backlog drains when a few misses sit in it.

A hit is published at once, but its offset cannot be committed before the miss ahead of it in its
partition has left the model. Every worker named here drains the same backlog (``--messages``, all
pre-cached but ``--misses`` distinct new queries spread evenly through it), produced while the worker
was paused; rounds alternate the workers' order. Reported per worker: seconds until half, 99 % and
all of the hits were read from the parsed topic (from the first output read), until the last miss,
and messages a second. Two workers by default, on one private tansu and the machine's Redis:
``uncommitted_4096`` (``MAX_UNCOMMITTED_MESSAGES=4096``, which was the in-flight limit's bound
before the two were separated) and ``default`` (the product's settings).

    qustream bench hits-behind-miss        # about 3 minutes on 2 cores; bench/results/hits_behind_miss.json
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from bench.latency_bench import parse_runner
from bench.pipeline_bench import Pool, drain_backlog, drop_cache, git_head, prewarm_cache, run_meta
from bench.stack import Collector, Services, Worker
from bench.workload import BenchQuery
from schemas.settings import Settings
from streams.kafka_io import make_producer
from streams.topics import ensure_topics

RUNNERS: dict[str, dict[str, Any]] = {"uncommitted_4096": {"max_uncommitted_messages": 4096}, "default": {}}


@dataclass
class HitsBehindMissPlan:
    messages: int = 30_000
    misses: int = 30
    #: Distinct cached queries the backlog cycles through.
    cached: int = 300
    rounds: int = 2
    batch_size: int = 64
    cpu_threads: int = 1
    warmup_messages: int = 64
    drain_timeout_s: float = 600.0
    runners: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(RUNNERS))


def backlog(cached: Sequence[BenchQuery], misses: Sequence[BenchQuery], messages: int) -> list[BenchQuery]:
    """``messages`` queries cycling through ``cached``, with ``misses`` placed evenly among them."""
    spacing = messages // max(len(misses), 1)
    out = [cached[i % len(cached)] for i in range(messages)]
    for index, miss in enumerate(misses):
        out[index * spacing + spacing // 2] = miss
    return out


async def _drain(name: str, settings: Settings, worker: Worker, queries: Sequence[BenchQuery],
                 producer: AIOKafkaProducer, collector: Collector, timeout_s: float) -> dict[str, Any]:
    result = await drain_backlog(producer, collector, settings.topic_input, settings.topic_parsed, [worker],
                                 queries, timeout_s)
    worker.check_alive()
    records = collector.of_round(settings.topic_parsed, result.tag)
    read = [(collector.read_at(r), bool(json.loads(r.value)["cached"])) for r in records]
    collector.forget(settings.topic_parsed, result.tag)
    first = min((t for t, _ in read), default=0.0)
    hits = sorted(t - first for t, cached in read if cached)
    misses = sorted(t - first for t, cached in read if not cached)

    def at(share: float) -> float | None:
        return round(hits[min(int(len(hits) * share), len(hits) - 1)], 3) if hits else None

    return {"runner": name, "messages": len(queries), "parsed": result.count, "complete": result.complete,
            "seconds": round(result.seconds, 2), "qps": round(result.qps, 1), "hits": len(hits),
            "hits_half_out_s": at(0.5), "hits_99pct_out_s": at(0.99), "hits_all_out_s": at(1.0),
            "misses": len(misses), "misses_all_out_s": round(misses[-1], 3) if misses else None}


async def run(plan: HitsBehindMissPlan, echo: Callable[[str], None] = print) -> dict[str, Any]:
    from workers.engine import version_for

    began, commit, load_before = time.time(), git_head(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="qustream-hits-behind-miss-"))
    services = Services(workdir)
    pool = Pool(plan.warmup_messages + plan.cached + plan.misses * plan.rounds)
    warm, cached = pool.take(plan.warmup_messages), pool.take(plan.cached)
    rows: list[dict[str, Any]] = []
    settings = {name: services.settings(name, batch_size=plan.batch_size, cpu_threads=plan.cpu_threads, **overrides)
                for name, overrides in plan.runners.items()}
    workers: dict[str, Worker] = {}
    try:
        any_settings = next(iter(settings.values()))
        version = version_for(any_settings)
        for name, worker_settings in settings.items():
            await ensure_topics(worker_settings)
            workers[name] = Worker(f"worker-{name}", worker_settings, workdir / f"worker-{name}.log")
        collector = Collector(any_settings, [s.topic_parsed for s in settings.values()], timed=True)
        producer = make_producer(any_settings)
        await collector.start()
        await producer.start()
        try:
            for name, worker in workers.items():
                await worker.wait_ready(timeout_s=600.0, partitions=settings[name].partitions)
                await prewarm_cache(settings[name], version, cached)
                await _drain(name, settings[name], worker, warm, producer, collector, plan.drain_timeout_s)
            for index in range(plan.rounds):
                queries = backlog(cached, pool.take(plan.misses), plan.messages)
                order = list(settings) if index % 2 == 0 else list(reversed(settings))
                for name in order:
                    row = await _drain(name, settings[name], workers[name], queries, producer, collector,
                                       plan.drain_timeout_s)
                    rows.append({"round": index, **row})
                    echo(f"round {index}, {name}: hits half / 99 % / all out at {row['hits_half_out_s']} / "
                         f"{row['hits_99pct_out_s']} / {row['hits_all_out_s']} s, last miss "
                         f"{row['misses_all_out_s']} s, {row['qps']} msg/s, {row['parsed']}/{row['messages']} out")
        finally:
            await producer.stop()
            await collector.stop()
            for worker in workers.values():
                worker.stop()
    finally:
        for worker_settings in settings.values():
            await drop_cache(services.redis_url, worker_settings.cache_prefix)
        services.close()
    return {"rows": rows, "meta": {**run_meta(asdict(plan), began, load_before, commit),
                                   "engine_version": version}}


def main(plan: HitsBehindMissPlan, extra_runners: Sequence[str], output: Path) -> dict[str, Any]:
    for text in extra_runners:
        name, overrides = parse_runner(text)
        plan.runners[name] = overrides
    results = asyncio.run(run(plan))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    return results
