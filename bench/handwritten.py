"""``qustream bench handwritten``: each hand-written replacement of a library, timed against that
library alone, at the record counts of one worker step.

For every pair and step size the two sides run interleaved (hand-written first in even rounds,
library first in odd ones), so a load change on the shared machine hits both alike; each sample
repeats the step until it lasts ``target_ms``. Reported per record: median and 10th/90th percentiles
of each side, and the hand-written/library time ratio of each round (median, p10, p90). A gain is
beyond the noise when the hand-written side wins in at least nine rounds of ten (ratio p90 < 1).
Each pair runs in a process of its own: what one pair leaves on the heap changes the next one's
allocation costs (orjson's output buffers kept alive for a whole step are one such cost).

Inputs are realistic: real shopping queries and product-type spans (QueryNER) where there is text,
keys shaped like the worker's query ids, latencies around the cached path's.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

#: The cached path's CPU cost per message, the yardstick for "matters on the hot path" (README,
#: Performance); a saving below ``MATTERS_SHARE`` of it is not worth code of our own.
CACHED_PATH_US_PER_MESSAGE = 40.0
MATTERS_SHARE = 0.02

Step = Callable[[], object]
_REPOSITORY = Path(__file__).resolve().parent.parent
#: QueryNER's train split, in the checkout's shared/ or beside the checkout (worktrees).
_QUERIES = next((folder / "shared" / "data" / "queryner" / "train.jsonl" for folder in (_REPOSITORY, _REPOSITORY.parent)
                 if (folder / "shared" / "data" / "queryner" / "train.jsonl").exists()),
                _REPOSITORY / "shared" / "data" / "queryner" / "train.jsonl")
_PAIRS_FILE = _REPOSITORY / "tests" / "data" / "singular_pairs.jsonl"


@dataclass(frozen=True)
class Pair:
    name: str
    handwritten: str
    library: str
    #: Where it runs: once per message of every step (the cached path), or off it.
    runs: str
    per_cached_message: bool
    build: Callable[[int, random.Random], tuple[Step, Step]]


def _queryner() -> tuple[list[str], list[str]]:
    """Real queries and their product-type spans; a small built-in list where the data set is absent."""
    queries: list[str] = []
    spans: list[str] = []
    if _QUERIES.exists():
        for line in _QUERIES.read_text().splitlines():
            row = json.loads(line)
            queries.append(row["query"])
            spans.extend(span.lower() for span in row["spans"].get("core_product_type", []))
    if not spans:
        spans = ["bar stools", "sofa", "lounge chairs", "evening dresses", "christmas tree", "lunch boxes"]
        queries = [f"grey {span} for living room" for span in spans]
    return queries, spans


def _partitioner(n: int, rng: random.Random) -> tuple[Step, Step]:
    from aiokafka.partitioner import DefaultPartitioner

    from streams.partitioner import partitions_for_keys

    # Keys as the worker writes them: a producer's id ("load-<run>-<i>") or a UUID.
    keys: list[bytes | None] = [
        (f"load-{rng.getrandbits(32)}-{i}" if i % 2 else str(uuid.UUID(int=rng.getrandbits(128)))).encode()
        for i in range(n)
    ]
    partitions = list(range(12))
    partitioner = DefaultPartitioner()

    def library() -> object:
        return [partitioner(key, partitions, partitions) for key in keys]

    return (lambda: partitions_for_keys(keys, partitions)), library


def _histogram(n: int, rng: random.Random) -> tuple[Step, Step]:
    from prometheus_client import CollectorRegistry, Histogram

    from streams.telemetry import _LATENCY_BUCKETS, BatchHistogram

    values = [rng.lognormvariate(math.log(0.02), 1.5) for _ in range(n)]
    batched = BatchHistogram("h_seconds", "h", buckets=_LATENCY_BUCKETS, registry=CollectorRegistry())
    single = Histogram("h_seconds", "h", buckets=_LATENCY_BUCKETS, registry=CollectorRegistry())
    observe = single.observe

    def library() -> object:
        for value in values:
            observe(max(value, 0.0))  # the clock-skew rule BatchHistogram applies
        return None

    return (lambda: batched.observe_many(values)), library


def _events(n: int, rng: random.Random) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    queries, spans = _queryner()
    now = datetime.now(UTC)
    shared = dict(model="Qwen/Qwen2.5-0.5B-Instruct", grounding="span", parsed_ts=now, worker_id="worker-1a2b",
                  total_ms=3.217, spec={"name": "furniture", "version": "1"})
    events = []
    for i in range(n):
        query = rng.choice(queries)
        events.append(dict(
            query_id=f"load-1764650000-{i}", query=query, normalized_query=query.lower(),
            parse={"item_type": rng.choice(spans), "material": rng.choice([None, "wood"]),
                   "color": rng.choice([None, "gray"]), "style": None},
            cached=rng.random() < 0.9, ungrounded=[] if rng.random() < 0.9 else ["color"],
            event_ts=now - timedelta(milliseconds=rng.uniform(5, 500)), source_topic="queries",
            source_partition=rng.randrange(12), source_offset=str(rng.randrange(10**7)),
            queue_ms=rng.uniform(5, 500), inference_ms=0.0,
        ))
    return shared, events


def _encoders(n: int, rng: random.Random) -> tuple[Step, Step, Step]:
    """ParsedEventEncoder, one orjson.dumps of the event dict, and pydantic's ParsedEvent, over the
    same batch; all three must write the same bytes."""
    from schemas.events import SCHEMA_VERSION, ParsedEvent, ParsedEventEncoder, SpecRef

    shared, events = _events(n, rng)
    spec = SpecRef(**shared["spec"])
    encoder_shared = {**shared, "spec": spec}
    dumps, utc_z = orjson.dumps, orjson.OPT_UTC_Z

    def handwritten() -> list[bytes]:
        encode = ParsedEventEncoder(**encoder_shared).encode
        return [encode(e["query_id"], e["query"], e["normalized_query"], e["parse"], e["cached"], e["ungrounded"],
                       e["event_ts"], e["source_topic"], e["source_partition"], e["source_offset"], e["queue_ms"],
                       e["inference_ms"]) for e in events]

    def event_dict(e: dict[str, Any]) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION, "query_id": e["query_id"], "query": e["query"],
            "normalized_query": e["normalized_query"], "parse": e["parse"], "spec": shared["spec"],
            "cached": e["cached"],
            "model": shared["model"], "grounding": shared["grounding"], "ungrounded": e["ungrounded"],
            "event_ts": e["event_ts"], "parsed_ts": shared["parsed_ts"],
            "source": {"topic": e["source_topic"], "partition": e["source_partition"], "offset": e["source_offset"]},
            "worker_id": shared["worker_id"],
            "timings": {"queue_ms": e["queue_ms"], "inference_ms": e["inference_ms"], "total_ms": shared["total_ms"]},
        }

    def with_orjson() -> list[bytes]:
        return [dumps(event_dict(e), option=utc_z) for e in events]

    def with_pydantic() -> list[bytes]:
        return [ParsedEvent.model_validate(event_dict(e)).model_dump_json().encode() for e in events]

    if not handwritten() == with_orjson() == with_pydantic():
        raise AssertionError("ParsedEventEncoder, orjson and pydantic wrote different bytes for one event")
    return handwritten, with_orjson, with_pydantic


def _encoder_orjson(n: int, rng: random.Random) -> tuple[Step, Step]:
    handwritten, with_orjson, _ = _encoders(n, rng)
    return handwritten, with_orjson


def _encoder_pydantic(n: int, rng: random.Random) -> tuple[Step, Step]:
    handwritten, _, with_pydantic = _encoders(n, rng)
    return handwritten, with_pydantic


def _backoff(n: int, rng: random.Random) -> tuple[Step, Step]:
    from bench.retired_handwritten import HandwrittenBackoff
    from streams.retry import Backoff

    def run(backoff: HandwrittenBackoff | Backoff) -> object:
        backoff.reset()
        return [backoff.next_delay() for _ in range(n)]

    handwritten, library = HandwrittenBackoff(), Backoff()
    return (lambda: run(handwritten)), (lambda: run(library))


def _singulariser(n: int, rng: random.Random) -> tuple[Step, Step]:
    from bench.retired_handwritten import singular_item
    from workers.inflection import singular_noun, singular_phrase

    _, spans = _queryner()
    sample = [rng.choice(spans) for _ in range(n)]

    def library() -> object:
        singular_noun.cache_clear()  # a step of model misses: spans not seen before
        return [singular_phrase(span) for span in sample]

    return (lambda: [singular_item(span) for span in sample]), library


PAIRS: tuple[Pair, ...] = (
    Pair("partitioner", "streams.partitioner.partitions_for_keys (numpy murmur2 of a batch)",
         "aiokafka DefaultPartitioner per key", "every published record (Kafka batch runner)", True, _partitioner),
    Pair("histogram", "streams.telemetry.BatchHistogram.observe_many", "prometheus_client Histogram.observe per value",
         "every parsed message (end-to-end latency)", True, _histogram),
    Pair("encoder_orjson", "schemas.events.ParsedEventEncoder", "one orjson.dumps of the event dict",
         "every parsed message", True, _encoder_orjson),
    Pair("encoder_pydantic", "schemas.events.ParsedEventEncoder", "ParsedEvent.model_validate + model_dump_json",
         "every parsed message", True, _encoder_pydantic),
    Pair("backoff", "Backoff formula of streams/retry.py (bench.retired_handwritten)",
         "redis.backoff.EqualJitterBackoff", "a failed publish or broker call, not per message", False, _backoff),
    Pair("singulariser", "rule-based singular_item (bench.retired_handwritten)",
         "workers.inflection.singular_phrase (inflect), cache cleared", "each model miss's item type, not cached ones",
         False, _singulariser),
)


def _loops_for(step: Step, target_s: float) -> int:
    started = time.perf_counter()
    step()
    once = max(time.perf_counter() - started, 1e-7)
    return max(1, math.ceil(target_s / once))


def _sample(step: Step, loops: int, records: int) -> float:
    """Microseconds per record of ``loops`` runs of ``step``, without a garbage collection inside."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        for _ in range(loops):
            step()
        return (time.perf_counter() - started) / loops / records * 1e6
    finally:
        gc.enable()


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median_us": statistics.median(values), "p10_us": _percentile(values, 0.1),
            "p90_us": _percentile(values, 0.9)}


def measure(pair: Pair, records: int, repetitions: int, target_s: float, seed: int) -> dict[str, Any]:
    handwritten, library = pair.build(records, random.Random(seed))
    for _ in range(3):  # warm caches, imports, numpy's first calls
        handwritten()
        library()
    loops = {"handwritten": _loops_for(handwritten, target_s), "library": _loops_for(library, target_s)}
    samples: dict[str, list[float]] = {"handwritten": [], "library": []}
    ratios = []
    for round_index in range(repetitions):
        order = ("handwritten", "library") if round_index % 2 == 0 else ("library", "handwritten")
        this_round = {}
        for side in order:
            step = handwritten if side == "handwritten" else library
            this_round[side] = _sample(step, loops[side], records)
            samples[side].append(this_round[side])
        ratios.append(this_round["handwritten"] / this_round["library"])
    hand, lib = _spread(samples["handwritten"]), _spread(samples["library"])
    saving = lib["median_us"] - hand["median_us"]
    ratio = {"median": statistics.median(ratios), "p10": _percentile(ratios, 0.1), "p90": _percentile(ratios, 0.9)}
    return {
        "records": records, "loops": loops, "handwritten": hand, "library": lib, "ratio": ratio,
        "saving_us_per_record": saving,
        "saving_share_of_cached_path": saving / CACHED_PATH_US_PER_MESSAGE if pair.per_cached_message else None,
        "beyond_noise": ratio["p90"] < 1.0,
    }


def singular_accuracy() -> dict[str, Any]:
    """Hand-checked pairs each singulariser gets right."""
    from bench.retired_handwritten import singular_item
    from workers.inflection import singular_phrase

    pairs = [json.loads(line) for line in _PAIRS_FILE.read_text().splitlines()]
    wrong: dict[str, list[str]] = {"handwritten": [], "library": []}
    for pair in pairs:
        for side, function in (("handwritten", singular_item), ("library", singular_phrase)):
            got = function(pair["span"])
            if got != pair["singular"]:
                wrong[side].append(f"{pair['span']} -> {got}")
    return {"pairs": len(pairs), **{f"{side}_right": len(pairs) - len(w) for side, w in wrong.items()},
            "handwritten_wrong": wrong["handwritten"], "library_wrong": wrong["library"]}


def verdict(pair: Pair, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Keep the hand-written side only if, at some step size the worker runs, it wins beyond the noise
    and saves at least ``MATTERS_SHARE`` of the cached path per message, and at no step size it is
    slower beyond the noise (the library faster in nine rounds of ten)."""
    winning = [r for r in results if r["beyond_noise"] and (r["saving_share_of_cached_path"] or 0) >= MATTERS_SHARE]
    losing = [r for r in results if r["ratio"]["p10"] > 1.0]
    return {
        "beyond_noise_at": [r["records"] for r in results if r["beyond_noise"]],
        "matters_at": [r["records"] for r in winning],
        "slower_beyond_noise_at": [r["records"] for r in losing],
        "keep_handwritten": bool(winning) and not losing,
    }


def _measure_pair(pair: Pair, sizes: tuple[int, ...], repetitions: int, target_ms: float, seed: int) -> dict[str, Any]:
    results = [measure(pair, records, repetitions, target_ms / 1000, seed) for records in sizes]
    return {"name": pair.name, "handwritten": pair.handwritten, "library": pair.library, "runs": pair.runs,
            "per_cached_message": pair.per_cached_message, "results": results, **verdict(pair, results)}


def run_handwritten_bench(
    sizes: tuple[int, ...], repetitions: int, target_ms: float, only: tuple[str, ...] | None, seed: int,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Each pair in a fresh process of its own, so that no pair inherits another's heap or caches."""
    started = time.time()
    pairs = [pair for pair in PAIRS if not only or pair.name in only]
    report: dict[str, Any] = {
        "command": " ".join(["qustream", *sys.argv[1:]]),
        "started": datetime.fromtimestamp(started, UTC).isoformat(),
        "python": sys.version.split()[0], "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_before": [round(value, 2) for value in os.getloadavg()],
        "sizes": list(sizes), "repetitions": repetitions, "target_ms": target_ms,
        "cached_path_us_per_message": CACHED_PATH_US_PER_MESSAGE, "matters_share": MATTERS_SHARE,
        "pairs": [],
    }
    for pair in pairs:
        progress(f"{pair.name} × {', '.join(map(str, sizes))}")
        completed = subprocess.run(
            [sys.executable, "-m", "bench.handwritten", pair.name, ",".join(map(str, sizes)), str(repetitions),
             str(target_ms), str(seed)],
            check=True, stdout=subprocess.PIPE, text=True,
        )
        report["pairs"].append(json.loads(completed.stdout))
    if any(pair.name == "singulariser" for pair in pairs):
        report["singular_accuracy"] = singular_accuracy()
    report["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    report["seconds"] = round(time.time() - started, 1)
    return report


if __name__ == "__main__":
    # One pair, alone in this process: name, sizes (comma-separated), repetitions, target ms, seed.
    name, sizes_text, repetitions_text, target_text, seed_text = sys.argv[1:6]
    chosen = next(pair for pair in PAIRS if pair.name == name)
    print(json.dumps(_measure_pair(chosen, tuple(int(size) for size in sizes_text.split(",")),
                                   int(repetitions_text), float(target_text), int(seed_text))))
