"""How many times the consumer group was handed a Kafka message, kept in Redis.

Kafka does not count redeliveries: a message that kills the worker (a native crash, an
out-of-memory kill) is fetched again from the last committed offset after every restart. The Redis
transport has the pending entry's delivery count; this is the Kafka counterpart, used by both Kafka
runners, so that the core step can dead-letter a message delivered more than ``max_deliveries``
times (``InboundMessage.deliveries``).

What is stored, per consumer group, topic and partition: a short Redis list of the offset ranges
that were handed to the core step and have no outcome yet. A message's delivery count is one plus
the number of stored ranges that hold its offset.

- Begin a step (one pipelined round trip, with the clears of the step before): for each partition,
  drop the ranges that end below the step's first offset (the fetch position moved past them: they
  were done, or the partition was read on from a later commit), and compare the step's range with
  what is left. No overlap, the common case: the range is stored and the step runs as one batch.
- A partition whose range overlaps stored ones had a worker die while holding its messages. Those
  messages run one at a time, each stored as its own range first, so the count grows only for the
  message that kills the worker and not for those that shared its batch.
- A step whose outputs were all handed to the delivery is cleared (with continuous batching its
  misses finish after its hits): its ranges are subtracted from every stored one
  (sent with the next step's round trip). A worker killed between the two leaves one extra count on
  messages that were done; the list expires ``COUNT_TTL_S`` after a partition's last step.

All of it survives ``kill -9`` of the worker, because it lives in Redis. A Redis that does not
answer only stops the counting (logged; messages count as first deliveries), never the processing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from schemas.settings import Settings
from workers.cache import redis_client
from workers.core_step import InboundMessage

log = structlog.get_logger(__name__)

KEY_PREFIX = "qustream:deliveries"
#: Begins the core step on some messages; the future resolves once all their outputs were delivered.
StartStep = Callable[[Sequence[InboundMessage]], Awaitable["asyncio.Future[None]"]]
#: How long a partition's ranges outlive its last step: longer than any crash loop is left alone.
COUNT_TTL_S = 24 * 3600
#: After Redis failed, steps go uncounted this long before it is tried again, so a down server does
#: not add a connect timeout to every step.
RETRY_AFTER_S = 5.0
#: Clears kept for a Redis that does not answer; older ones are dropped (the ranges then expire).
_MAX_PENDING_CLEARS = 10_000

#: KEYS[1]: the partition's list. ARGV: first offset, last offset, TTL in ms, "1" to store the range
#: even when it overlaps (a single message). Returns the overlaps as a flat list [from, to, ...].
_BEGIN = """
local first, last = tonumber(ARGV[1]), tonumber(ARGV[2])
local kept, overlaps = {}, {}
for _, range in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local sep = string.find(range, ':', 1, true)
  local from, to = tonumber(string.sub(range, 1, sep - 1)), tonumber(string.sub(range, sep + 1))
  if to >= first then
    table.insert(kept, range)
    if from <= last then
      table.insert(overlaps, math.max(from, first))
      table.insert(overlaps, math.min(to, last))
    end
  end
end
redis.call('DEL', KEYS[1])
if #overlaps == 0 or ARGV[4] == '1' then
  table.insert(kept, ARGV[1] .. ':' .. ARGV[2])
end
if #kept > 0 then
  redis.call('RPUSH', KEYS[1], unpack(kept))
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return overlaps
"""

#: KEYS[1]: the partition's list. ARGV: first and last offset of a step that ended: they are
#: subtracted from every stored range.
_CLEAR = """
local first, last = tonumber(ARGV[1]), tonumber(ARGV[2])
local kept = {}
for _, range in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local sep = string.find(range, ':', 1, true)
  local from, to = tonumber(string.sub(range, 1, sep - 1)), tonumber(string.sub(range, sep + 1))
  if to < first or from > last then
    table.insert(kept, range)
  else
    if from < first then table.insert(kept, string.format('%d:%d', from, first - 1)) end
    if to > last then table.insert(kept, string.format('%d:%d', last + 1, to)) end
  end
end
redis.call('DEL', KEYS[1])
if #kept > 0 then
  redis.call('RPUSH', KEYS[1], unpack(kept))
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return #kept
"""

#: (topic, partition)
Partition = tuple[str, int]
#: First and last offset of a step in one partition.
OffsetRange = tuple[int, int]


def offset_ranges(messages: Sequence[InboundMessage]) -> dict[Partition, OffsetRange]:
    """First and last offset per partition. A partition's messages come in offset order (as fetched),
    so only the ends of each run of one partition are read: a per-message ``int()`` was most of the
    counter's cost on a step of cache hits."""
    ranges: dict[Partition, OffsetRange] = {}
    if not messages:
        return ranges
    first = previous = messages[0]
    for message in messages:
        if message.partition != previous.partition or message.topic != previous.topic:
            _note_run(ranges, first, previous)
            first = message
        previous = message
    _note_run(ranges, first, previous)
    return ranges


def _note_run(ranges: dict[Partition, OffsetRange], first: InboundMessage, last: InboundMessage) -> None:
    where = (first.topic, first.partition)
    low, high = sorted((int(first.offset), int(last.offset)))
    known = ranges.get(where)
    ranges[where] = (low, high) if known is None else (min(known[0], low), max(known[1], high))


class KafkaDeliveryCounter:
    """Sets ``InboundMessage.deliveries`` of Kafka messages and runs the core step on them."""

    def __init__(self, settings: Settings, client: Redis | None = None) -> None:
        self.group = settings.app_id
        self._own_client = client is None
        self.client = client if client is not None else redis_client(settings.redis_url.get_secret_value())
        self._ttl_ms = str(COUNT_TTL_S * 1000)
        self._shas: tuple[str, str] | None = None
        self._pending_clears: list[tuple[str, OffsetRange]] = []
        self._unavailable_until = 0.0

    def key(self, where: Partition) -> str:
        return f"{KEY_PREFIX}:{self.group}:{where[0]}:{where[1]}"

    async def run(self, messages: Sequence[InboundMessage], start: StartStep) -> None:
        """``start`` the core step on ``messages`` with their delivery counts set; a step's ranges
        are cleared once all its parts were delivered."""
        ranges = offset_ranges(messages)
        overlapping = await self._begin(ranges)
        if overlapping is None:  # uncounted: Redis does not answer
            await start(messages)
            return
        if not overlapping:
            self._end_when(await start(messages), list(ranges.items()))
            return
        first_delivery = [message for message in messages if (message.topic, message.partition) not in overlapping]
        if first_delivery:
            self._end_when(await start(first_delivery),
                           [(where, ranges[where]) for where in ranges if where not in overlapping])
        redelivered = [message for message in messages if (message.topic, message.partition) in overlapping]
        log.warning("deliveries.redelivered", messages=len(redelivered), partitions=sorted(overlapping),
                    note="a worker died holding them: processed one at a time")
        for message in redelivered:
            await self._begin_one(message)
            await (await start([message]))  # to the end, so that only a message that kills the worker counts up
            offset = int(message.offset)
            self._ended([((message.topic, message.partition), (offset, offset))])

    def _end_when(self, done: asyncio.Future[None], ranges: list[tuple[Partition, OffsetRange]]) -> None:
        if done.done():
            self._ended(ranges)
        else:
            done.add_done_callback(lambda _: self._ended(ranges))

    async def close(self) -> None:
        if self._pending_clears:  # a clean stop leaves nothing to expire
            await self._run([])
        if self._own_client:
            await self.client.aclose()

    # --- Redis --------------------------------------------------------------------------------

    async def _begin(self, ranges: dict[Partition, OffsetRange]) -> set[Partition] | None:
        """Store the step's ranges where nothing overlaps them; the partitions where something did."""
        replies = await self._run([(where, first, last, False) for where, (first, last) in ranges.items()])
        if replies is None:
            return None
        return {where for where, overlaps in zip(ranges, replies, strict=True) if overlaps}

    async def _begin_one(self, message: InboundMessage) -> None:
        offset = int(message.offset)
        replies = await self._run([((message.topic, message.partition), offset, offset, True)])
        if replies is not None:
            message.deliveries = 1 + len(replies[0]) // 2

    def _ended(self, ranges: Iterable[tuple[Partition, OffsetRange]]) -> None:
        self._pending_clears.extend((self.key(where), offsets) for where, offsets in ranges)
        if len(self._pending_clears) > _MAX_PENDING_CLEARS:
            del self._pending_clears[:-_MAX_PENDING_CLEARS]

    async def _run(self, begins: list[tuple[Partition, int, int, bool]]) -> list[list[int]] | None:
        """The pending clears, then ``begins``, in one round trip; None while Redis is unavailable."""
        if time.monotonic() < self._unavailable_until:
            return None
        clears, self._pending_clears = self._pending_clears, []
        try:
            try:
                replies = await self._send(clears, begins)
            except NoScriptError:  # Redis restarted (or flushed its scripts) since they were loaded
                self._shas = None
                replies = await self._send(clears, begins)
        except (RedisError, OSError) as exc:
            self._pending_clears = (clears + self._pending_clears)[-_MAX_PENDING_CLEARS:]
            self._unavailable_until = time.monotonic() + RETRY_AFTER_S
            log.warning("deliveries.uncounted", error=f"{type(exc).__name__}: {exc}", retry_in_s=RETRY_AFTER_S,
                        note="Redis holds the Kafka delivery counts; processing goes on without them")
            return None
        return [[int(value) for value in reply] for reply in replies[-len(begins):]] if begins else []

    async def _send(self, clears: list[tuple[str, OffsetRange]],
                    begins: list[tuple[Partition, int, int, bool]]) -> list[Any]:
        if self._shas is None:
            self._shas = (await self.client.script_load(_BEGIN), await self.client.script_load(_CLEAR))
        begin_sha, clear_sha = self._shas
        async with self.client.pipeline(transaction=False) as pipe:
            for key, (first, last) in clears:
                pipe.evalsha(clear_sha, 1, key, first, last, self._ttl_ms)
            for where, first, last, single in begins:
                pipe.evalsha(begin_sha, 1, self.key(where), first, last, self._ttl_ms, "1" if single else "0")
            replies: list[Any] = await pipe.execute()
        return replies
