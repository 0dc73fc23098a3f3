"""``qustream reprocess --since TIME``: move the worker group back so history is parsed again.

Kafka: the worker group (``Settings.app_id``; either Kafka runner commits there for the input topic) gets, per
partition, the first offset whose timestamp is at or after TIME. The broker's answer
(offsets_for_times) is checked against the record it points at, and where it is wrong (tansu
answers offset 0 / timestamp -1) the partition is scanned instead.

Redis: the worker group's last-delivered id on the input stream is set just before TIME (entry
ids are arrival times in ms), so ``>`` delivers everything from TIME on again.

Running workers keep their in-memory positions and would overwrite the moved offsets at their next
commit, so the command refuses while the group has members unless ``--force``; ``--dry-run``, which
moves nothing, shows the moves and the members.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)

from producer_tools.transport import (
    TransportUnavailable,
    redis_connect,
    start_kafka_consumer,
    start_or_raise,
)
from schemas.settings import Settings

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``2h``, ``90m``, ``1d12h``, ``30s`` ago, or an ISO 8601 time (naive = UTC)."""
    now = now or datetime.now(UTC)
    compact = text.strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", compact)
    if parts and "".join(n + u for n, u in parts) == compact:
        return now - timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: give an ISO time (2024-05-01T12:00:00Z) or an age (2h, 30m, 1d)") \
            from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class GroupActive(RuntimeError):
    def __init__(self, message: str, members: list[str]) -> None:
        super().__init__(message)
        self.members = members


@dataclass
class PartitionMove:
    partition: int
    before: int | str | None
    after: int | str
    method: str
    to_reparse: int | None = None


@dataclass
class ReprocessReport:
    group: str
    source: str
    since: datetime
    members: list[str] = field(default_factory=list)
    members_check: str = "ok"
    moves: list[PartitionMove] = field(default_factory=list)
    dry_run: bool = False
    commit_via: str = "offset commit"

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group, "source": self.source, "since": self.since.isoformat(), "dry_run": self.dry_run,
            "members": self.members, "members_check": self.members_check, "commit_via": self.commit_via,
            "moves": [vars(move) for move in self.moves],
        }


async def group_members(settings: Settings) -> list[str]:
    """Members of the worker group as 'client_id@host (member_id)'; raises if the broker cannot say."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_options(),
                                request_timeout_ms=int(settings.tools_connect_timeout_s * 1000))
    await start_or_raise(admin, settings)
    try:
        responses = await asyncio.wait_for(admin.describe_consumer_groups([settings.app_id]),
                                           settings.tools_connect_timeout_s * 2)
    finally:
        await admin.close()
    members: list[str] = []
    for response in responses:
        for group in response.groups:
            error_code, group_id, _state, _ptype, _protocol, group_members_ = group[:6]
            if error_code:
                raise RuntimeError(f"DescribeGroups answered error code {error_code} for {group_id}")
            for member in group_members_:
                member_id, client_id, client_host = member[0], member[1], member[2]
                members.append(f"{client_id or '?'}@{client_host or '?'} ({member_id})")
    return members


async def _record_at(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> Any | None:
    consumer.seek(tp, offset)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        batch = await consumer.getmany(tp, timeout_ms=300, max_records=1)
        for record in batch.get(tp, []):
            return record
    return None


async def _scan(consumer: AIOKafkaConsumer, tp: TopicPartition, target_ms: int) -> int:
    """First offset with timestamp >= target_ms by reading the partition; the end when there is none."""
    await consumer.seek_to_beginning(tp)
    position = await consumer.position(tp)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 1.5:
        batch = await consumer.getmany(tp, timeout_ms=300, max_records=2000)
        records = batch.get(tp, [])
        if records:
            quiet_since = time.monotonic()
        for record in records:
            if record.timestamp >= target_ms:
                return int(record.offset)
            position = int(record.offset) + 1
    return int(position)


async def _offset_for_time(consumer: AIOKafkaConsumer, tp: TopicPartition, target_ms: int) -> tuple[int, str]:
    """(offset, how it was found): the broker's answer when the records confirm it, else a scan."""
    try:
        answer = (await consumer.offsets_for_times({tp: target_ms})).get(tp)
    except Exception:
        answer = None
    if answer is not None and answer.timestamp >= target_ms:
        found = await _record_at(consumer, tp, answer.offset)
        earliest = (await consumer.beginning_offsets([tp]))[tp]
        before = await _record_at(consumer, tp, answer.offset - 1) if answer.offset > earliest else None
        if (found is not None and found.timestamp >= target_ms
                and (answer.offset == earliest or (before is not None and before.timestamp < target_ms))):
            return int(answer.offset), "offsets_for_times"
    return await _scan(consumer, tp, target_ms), "scan"


async def reprocess(settings: Settings, since: datetime, *, force: bool = False, dry_run: bool = False,
                    stop: asyncio.Event | None = None) -> ReprocessReport:
    """Move the worker group's position on the input back to ``since``; see the module docstring.
    ``stop`` (set by SIGINT/SIGTERM) gives up a join to the group that has not finished, moving nothing."""
    if settings.transport == "redis":
        return await _reprocess_redis(settings, since, force=force, dry_run=dry_run)
    report = ReprocessReport(settings.app_id, settings.topic_input, since, dry_run=dry_run)
    try:
        report.members = await group_members(settings)
    except TransportUnavailable:
        raise
    except Exception as exc:
        report.members_check = f"unknown ({type(exc).__name__}: {exc})"
        if not force and not dry_run:
            raise GroupActive(
                f"could not list the members of group {settings.app_id!r} ({type(exc).__name__}: {exc}). "
                "Stop every worker of the group, then run again with --force.", []) from exc
    if report.members and not force and not dry_run:  # a dry run moves nothing: it shows the moves, and the members
        hint = ""
        if all(member.startswith("?@?") for member in report.members):
            # Apache Kafka always reports the member's host; tansu reports none and keeps listing members
            # that have left, so its list cannot tell running workers from stopped ones.
            hint = (" The broker reports no member hosts (tansu does this, and keeps listing members that have "
                    "left): if every worker is stopped, pass --force.")
        raise GroupActive(
            f"group {settings.app_id!r} has {len(report.members)} member(s); running workers keep their "
            "positions and would overwrite the moved offsets. Stop them first, then run again." + hint,
            report.members)
    target_ms = int(since.timestamp() * 1000)
    consumer = await start_kafka_consumer(settings, group_id=settings.app_id)
    try:
        await consumer.topics()
        partitions = [TopicPartition(settings.topic_input, p)
                      for p in sorted(consumer.partitions_for_topic(settings.topic_input) or ())]
        if not partitions:
            raise RuntimeError(f"topic {settings.topic_input!r} does not exist")
        consumer.assign(partitions)
        new_offsets: dict[TopicPartition, int] = {}
        for tp in partitions:
            before = await consumer.committed(tp)
            offset, method = await _offset_for_time(consumer, tp, target_ms)
            new_offsets[tp] = offset
            end = max((await consumer.end_offsets([tp]))[tp], await consumer.position(tp))
            report.moves.append(PartitionMove(tp.partition, before, offset, method, max(end - offset, 0)))
        if not dry_run:
            try:
                await consumer.commit(new_offsets)
            except (CommitFailedError, IllegalGenerationError, UnknownMemberIdError, RebalanceInProgressError):
                # The group still has (or the broker still lists) members, so a commit from outside the
                # group is refused; commit as a member of a new generation instead.
                report.commit_via = "joined the group"
                await _commit_as_member(settings, new_offsets, stop)
    finally:
        await consumer.stop()
    return report


class _FaustProtocolAssignor(RoundRobinPartitionAssignor):
    """Round robin under Faust's protocol name: the broker only lets a member join the workers' group
    with a protocol its members share. Used only once the workers are stopped, so it is alone."""

    name = "faust"


async def _commit_as_member(settings: Settings, offsets: dict[TopicPartition, int],
                            stop: asyncio.Event | None = None) -> None:
    consumer = await start_kafka_consumer(
        settings, group_id=settings.app_id, session_timeout_ms=int(settings.broker_session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.broker_heartbeat_s * 1000), enable_auto_commit=False,
        # The group protocol of the configured runner first (a broker may still list its stopped
        # members); the other one too, so a group last used by either runner accepts the join.
        partition_assignment_strategy=(
            (_FaustProtocolAssignor, RoundRobinPartitionAssignor) if settings.kafka_runner == "faust"
            else (RoundRobinPartitionAssignor, _FaustProtocolAssignor)
        ))
    try:
        consumer.subscribe([settings.topic_input])
        deadline = time.monotonic() + settings.broker_session_timeout_s * 2 + 30
        while set(offsets) - consumer.assignment():
            if stop is not None and stop.is_set():
                raise RuntimeError(f"interrupted while joining group {settings.app_id!r}: no offset was moved")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"could not join group {settings.app_id!r} with every partition of "
                                   f"{settings.topic_input!r} in {settings.broker_session_timeout_s * 2 + 30:.0f} s: "
                                   "are workers still running? Stop them and retry. No offset was moved.")
            # getmany's own timeout does not hold while a join is in progress (it waits for the
            # assignment), so the deadline and a stop request are checked at least every second.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(consumer.getmany(timeout_ms=200, max_records=1), min(left, 1.0))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()  # leaves the group, so the workers' next join is not held up


async def _reprocess_redis(settings: Settings, since: datetime, *, force: bool, dry_run: bool) -> ReprocessReport:
    import redis.exceptions

    report = ReprocessReport(settings.app_id, settings.stream_input, since, dry_run=dry_run)
    client = await redis_connect(settings)
    try:
        try:
            consumers = await client.xinfo_consumers(settings.stream_input, settings.app_id)
        except redis.exceptions.ResponseError as exc:
            raise RuntimeError(f"no group {settings.app_id!r} on stream {settings.stream_input!r}: {exc}") from exc
        # Redis keeps consumers after their worker died; only recently active ones count as running.
        active_ms = settings.redis_claim_idle_ms
        report.members = [f"{c['name'].decode() if isinstance(c['name'], bytes) else c['name']} "
                          f"(idle {c['idle']} ms)" for c in consumers if int(c["idle"]) < active_ms]
        if report.members and not force and not dry_run:
            raise GroupActive(f"group {settings.app_id!r} has {len(report.members)} consumer(s) active in the last "
                              f"{active_ms} ms; stop the workers first (or pass --force).", report.members)
        groups = await client.xinfo_groups(settings.stream_input)
        before = next((g.get("last-delivered-id") for g in groups
                       if (g["name"].decode() if isinstance(g["name"], bytes) else g["name"]) == settings.app_id), None)
        target_ms = int(since.timestamp() * 1000)
        new_id = f"{max(target_ms - 1, 0)}-18446744073709551615"
        to_reparse = await client.xlen(settings.stream_input) if target_ms <= 0 else len(
            await client.xrange(settings.stream_input, min=f"{target_ms}-0", max="+", count=1_000_000))
        report.moves.append(PartitionMove(0, before.decode() if isinstance(before, bytes) else before, new_id,
                                          "entry id = arrival ms", to_reparse))
        if not dry_run:
            await client.xgroup_setid(settings.stream_input, settings.app_id, new_id)
    finally:
        await client.aclose()
    return report
