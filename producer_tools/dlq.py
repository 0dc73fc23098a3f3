"""``qustream dlq inspect`` and ``qustream dlq redrive``.

Redrive sends dead letters back to the input with ``qustream.attempts`` incremented; letters that
already used ``Settings.max_attempts`` attempts stay put.

Redrive checkpoint (why it is per bucket and attempts): a redrive can be filtered by stage and error
class, so a single "how far have we redriven" position cannot be right — it would either skip the
letters a filter left out or redrive twice the ones a filter took. And a letter over the attempt
limit stays put, while the same letter may be redriven by a later run under a raised
``max_attempts``. The checkpoint is therefore kept per (stage, error class, attempts): "every letter
of this stage and class that had used this many attempts, up to position P of partition p, has been
redriven". A run advances only the checkpoints of the attempts it redrove, never those of letters it
left put, so raising the limit later redrives exactly the letters left under the old one. Checkpoints
of earlier versions, per (stage, error class) alone, still count as redriven for letters under the
limit.

- Kafka: one consumer group per checkpoint,
  ``{app_id}-dlq-redrive.{stage}.{error_class}.attempts-{n}``, whose committed offsets on the
  dead-letter topic are that position. (Commit metadata would allow a single group, but tansu drops
  it.) The groups never have members; they only hold offsets.
- Redis: one hash ``{app_id}-dlq-redrive`` with a field per checkpoint holding the last redriven entry id.

Running the same redrive twice therefore sends nothing the second time, whatever the filters.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from producer_tools.transport import (
    Record,
    drain,
    open_sink,
    open_source,
    position_of,
    redis_connect,
    resolve_name,
    start_kafka_consumer,
)
from schemas.events import ATTEMPTS_HEADER, DeadLetterReason
from schemas.settings import Settings

REDRIVE_FROM_HEADER = "qustream.redrive.from"


def checkpoint_name(settings: Settings) -> str:
    return f"{settings.app_id}-dlq-redrive"


def bucket_of(reason: DeadLetterReason) -> str:
    return f"{reason.stage}.{re.sub(r'[^A-Za-z0-9_-]', '_', reason.error_class or 'unknown')}"


def checkpoint_of(reason: DeadLetterReason) -> str:
    return f"{bucket_of(reason)}.attempts-{reason.attempts}"


def over_attempt_limit(reason: DeadLetterReason, settings: Settings) -> bool:
    return reason.attempts >= settings.max_attempts


def already_redriven(record: Record, reason: DeadLetterReason, handled: dict[int, tuple[int, ...]],
                     settings: Settings) -> bool:
    """Behind its checkpoint and not over the attempt limit (see the module docstring)."""
    if over_attempt_limit(reason, settings):
        return False
    return record.partition in handled and position_of(record) <= handled[record.partition]


def _value_text(record: Record, limit: int = 120) -> str:
    raw = record.value or b""
    return raw[:limit].decode("utf-8", "replace")


class RedriveCheckpoint:
    """Last redriven position per checkpoint and partition (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache: dict[str, dict[int, tuple[int, ...]]] = {}

    async def handled(self, reason: DeadLetterReason, partitions: Iterable[int]) -> dict[int, tuple[int, ...]]:
        """Per partition, the last position up to which letters of ``reason``'s checkpoint were redriven."""
        wanted = sorted(set(partitions))
        position = dict(await self._cached(checkpoint_of(reason), wanted))
        for partition, legacy in (await self._cached(bucket_of(reason), wanted)).items():
            position[partition] = max(position.get(partition, legacy), legacy)
        return position

    async def _cached(self, key: str, partitions: list[int]) -> dict[int, tuple[int, ...]]:
        if key not in self.cache:
            self.cache[key] = await self._load(key, partitions)
        return self.cache[key]

    async def _load(self, bucket: str, partitions: list[int]) -> dict[int, tuple[int, ...]]:
        name = f"{checkpoint_name(self.settings)}.{bucket}"
        if self.settings.transport == "kafka":
            topic = resolve_name(self.settings, "dlq")
            consumer = await start_kafka_consumer(self.settings, group_id=name)
            try:
                tps = [TopicPartition(topic, p) for p in partitions]
                consumer.assign(tps)
                out: dict[int, tuple[int, ...]] = {}
                for tp in tps:
                    committed = await consumer.committed(tp)
                    if committed is not None:
                        out[tp.partition] = (committed - 1,)
                return out
            finally:
                await consumer.stop()
        client = await redis_connect(self.settings)
        try:
            raw = await client.hget(checkpoint_name(self.settings), bucket)
        finally:
            await client.aclose()
        return {0: tuple(int(part) for part in raw.decode().split("-"))} if raw else {}

    async def save(self, key: str, upto: dict[int, Record]) -> None:
        """Mark every letter of checkpoint ``key`` up to and including ``upto[partition]`` as redriven."""
        if self.settings.transport == "kafka":
            topic = resolve_name(self.settings, "dlq")
            consumer = await start_kafka_consumer(self.settings, group_id=f"{checkpoint_name(self.settings)}.{key}")
            try:
                offsets = {TopicPartition(topic, p): int(record.offset) + 1 for p, record in upto.items()}
                consumer.assign(list(offsets))
                await consumer.commit(offsets)
            finally:
                await consumer.stop()
        else:
            client = await redis_connect(self.settings)
            try:
                await client.hset(checkpoint_name(self.settings), key, upto[0].offset)
            finally:
                await client.aclose()
        self.cache[key] = {p: position_of(record) for p, record in upto.items()}


@dataclass
class Bucket:
    stage: str
    error_class: str
    count: int = 0
    redriven_before: int = 0
    attempts: Counter[int] = field(default_factory=Counter)
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class InspectReport:
    total: int
    buckets: list[Bucket]

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "buckets": [
                {"stage": b.stage, "class": b.error_class, "count": b.count, "already_redriven": b.redriven_before,
                 "attempts": dict(sorted(b.attempts.items())), "samples": b.samples}
                for b in self.buckets
            ],
        }


async def read_dead_letters(settings: Settings, idle_s: float = 1.5) -> list[Record]:
    async with open_source(settings, ["dlq"], from_end=False) as source:
        return await drain(source, idle_s=idle_s)


async def inspect(settings: Settings, samples: int = 3, idle_s: float = 1.5) -> InspectReport:
    records = await read_dead_letters(settings, idle_s)
    checkpoint = RedriveCheckpoint(settings)
    partitions = {record.partition for record in records}
    buckets: dict[str, Bucket] = {}
    for record in records:
        reason = DeadLetterReason.from_headers(dict(record.headers))
        key = bucket_of(reason)
        bucket = buckets.setdefault(key, Bucket(reason.stage, reason.error_class))
        bucket.count += 1
        bucket.attempts[reason.attempts] += 1
        if already_redriven(record, reason, await checkpoint.handled(reason, partitions), settings):
            bucket.redriven_before += 1
        if len(bucket.samples) < samples:
            bucket.samples.append({"offset": f"{record.partition}:{record.offset}", "message": reason.message[:200],
                                   "value": _value_text(record)})
    ordered = sorted(buckets.values(), key=lambda b: (-b.count, b.stage, b.error_class))
    return InspectReport(len(records), ordered)


@dataclass
class RedriveReport:
    scanned: int = 0
    matched: int = 0
    redriven: int = 0
    already_redriven: int = 0
    over_limit: int = 0
    dry_run: bool = False
    by_bucket: Counter[str] = field(default_factory=Counter)
    redriven_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"scanned": self.scanned, "matched": self.matched,
                "redriven" if not self.dry_run else "would_redrive": self.redriven,
                "already_redriven": self.already_redriven, "over_attempt_limit": self.over_limit,
                "by_bucket": dict(self.by_bucket), "dry_run": self.dry_run}


def _query_id(record: Record) -> str:
    try:
        payload = json.loads(record.value or b"")
        return str(payload.get("query_id") or "") if isinstance(payload, dict) else ""
    except ValueError:
        return ""


async def redrive(
    settings: Settings,
    *,
    stage: str | None = None,
    error_class: str | None = None,
    dry_run: bool = False,
    idle_s: float = 1.5,
) -> RedriveReport:
    """Send matching dead letters back to the input once each; see the module docstring."""
    report = RedriveReport(dry_run=dry_run)
    records = await read_dead_letters(settings, idle_s)
    report.scanned = len(records)
    partitions = {record.partition for record in records}
    last_scanned: dict[int, Record] = {}
    for record in records:
        if record.partition not in last_scanned or position_of(record) > position_of(last_scanned[record.partition]):
            last_scanned[record.partition] = record
    checkpoint = RedriveCheckpoint(settings)
    plan: list[tuple[Record, DeadLetterReason]] = []
    touched: set[str] = set()
    for record in records:
        reason = DeadLetterReason.from_headers(dict(record.headers))
        if (stage and reason.stage != stage) or (error_class and reason.error_class != error_class):
            continue
        report.matched += 1
        if over_attempt_limit(reason, settings):
            report.over_limit += 1  # stays put, and its checkpoint does not move: a raised limit takes it
            continue
        touched.add(checkpoint_of(reason))
        if already_redriven(record, reason, await checkpoint.handled(reason, partitions), settings):
            report.already_redriven += 1
            continue
        plan.append((record, reason))
        report.by_bucket[bucket_of(reason)] += 1
    report.redriven = len(plan)
    report.redriven_ids = [_query_id(record) for record, _ in plan]
    if dry_run:
        return report
    if plan:
        async with open_sink(settings, "input") as sink:
            for record, reason in plan:
                headers = [
                    (ATTEMPTS_HEADER, str(reason.attempts + 1).encode()),
                    (REDRIVE_FROM_HEADER, f"{record.topic}:{record.partition}:{record.offset}".encode()),
                ]
                await sink.send(record.key, record.value, headers, None)
            await sink.flush()
    # Only after the input acknowledged them: a crash before this line re-sends (at least once),
    # never loses a letter.
    for key in touched:
        await checkpoint.save(key, last_scanned)
    return report
