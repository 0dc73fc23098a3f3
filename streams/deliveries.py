"""How many times the consumer group was handed a Kafka message, kept in Redis.

Kafka does not count redeliveries: a message that kills the worker (a native crash, an
out-of-memory kill) is fetched again from the last committed offset after every restart. The Redis
transport has the pending entry's delivery count; this is the Kafka counterpart, used by both Kafka
runners, so that the core step can dead-letter a message delivered more than ``max_deliveries``
times (``InboundMessage.deliveries``).

What is stored, per consumer group, topic and partition: a short Redis list of the offset ranges
that were handed to the core step and have no outcome yet. A message's delivery count is one plus
the number of stored ranges that hold its offset.

- Begin a step (one pipelined round trip, with the clears of the steps before): for each partition,
  drop the ranges another worker's life stored that end below the step's first offset (the fetch
  position moved past them: they were done, or the partition was read on from a later commit), and
  compare the step's range with what is left. No overlap, the common case: the range is stored and
  the step runs as one batch. The life's own ranges stay until cleared: the misses of its earlier
  steps may still be in the model while later steps begin.
- Offsets that overlap stored ranges were held by a worker that died, or that stopped before it
  delivered them (its stop grace ran out: ``worker.stop_grace_exceeded``). Those the model would see now
  (``needs_model``: they decode and miss the cache; a hit or a poison message cannot be what killed
  it) run one at a time, each stored as its own range first, so the count grows only for the message
  that kills the worker and not for those that shared its batch. The fetch's other messages run as
  one batch, their runs stored first.
- A held message the model would not see goes one at a time too once two lives left it undelivered
  (``HOLD_ANYWAY_AFTER_LIVES``; one, where ``max_deliveries`` is 2): something other than the model
  fails on it, such as a delivery that raises every time, which stops the worker. Alone, only it counts
  on to ``max_deliveries`` and is dead-lettered, while the messages that shared its batch are delivered.
  Held messages are not begun once the worker stops (``stopping``): begun, they would count a life
  whose delivery could not finish, and those behind a failing one would count up with it.
- Each part of a step handed to the delivery is cleared as it goes (a step's cache hits at once, its
  misses as the model finishes them): the runs of offsets it covers are subtracted from every stored
  range (sent with the next step's round trip). So what a killed worker leaves counted is what it
  had not delivered, mostly the misses in its model, and its successor goes one at a time through
  those only. A worker killed between a delivery and the next round trip leaves one extra count on
  messages that were done; the list expires ``COUNT_TTL_S`` after a partition's last step.

All of it survives ``kill -9`` of the worker, because it lives in Redis. A Redis that does not
answer only stops the counting (logged; messages count as first deliveries), never the processing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
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
#: Which messages a step would now hand to the model (``WorkerRuntime.needs_model``).
NeedsModel = Callable[[Sequence[InboundMessage]], Awaitable[list[bool]]]
#: Told the messages of each part of a step handed to the delivery.
Delivered = Callable[[Sequence[InboundMessage]], None]
#: Begins the core step on some messages, telling ``Delivered`` of each part handed to the delivery;
#: the future resolves once all their outputs were delivered.
StartStep = Callable[[Sequence[InboundMessage], Delivered], Awaitable["asyncio.Future[None]"]]
#: How long a partition's ranges outlive its last step: longer than any crash loop is left alone.
COUNT_TTL_S = 24 * 3600
#: After Redis failed, steps go uncounted this long before it is tried again, so a down server does
#: not add a connect timeout to every step.
RETRY_AFTER_S = 5.0
#: Longest a delivered part's clear waits for the next step's round trip before it is sent alone.
CLEAR_WITHIN_S = 0.2
#: Lives that left a message the model would not see undelivered before it is held one at a time
#: anyway (and so counted on to ``max_deliveries``): one such life is a crash the message shared
#: with a killer; two in a row point at the message itself.
HOLD_ANYWAY_AFTER_LIVES = 2
#: Clears kept for a Redis that does not answer; older ones are dropped (the ranges then expire).
_MAX_PENDING_CLEARS = 10_000
#: What becomes of the inputs a stopping Kafka worker gives up undelivered (``InFlight.give_up``): their
#: ranges stay stored, so the next life holds those the model would see and counts them once more.
GIVEN_UP_ON_STOP = ("not committed, so the partition's next owner processes them again from the last committed "
                    "offset; those that still need the model then go one at a time, each counting one delivery "
                    "toward QUSTREAM_MAX_DELIVERIES (deliveries.redelivered)")

#: A stored range is "first:last:owner", the owner being the counter (one worker's life) that stored it.
_PARSE_RANGE = """
local function parse(range)
  local a = string.find(range, ':', 1, true)
  local b = string.find(range, ':', a + 1, true)
  local from = tonumber(string.sub(range, 1, a - 1))
  if b then return from, tonumber(string.sub(range, a + 1, b - 1)), string.sub(range, b + 1) end
  return from, tonumber(string.sub(range, a + 1)), ''
end
"""

#: KEYS[1]: the partition's list. ARGV: first offset, last offset, TTL in ms, "1" to store the range
#: even when it overlaps (part of a step begun already), the owner. A step's begin drops another
#: owner's ranges that end below its first offset (done, or read on from a later commit); the owner's
#: own stay until cleared, since its earlier steps' misses may still be in the model. Returns the
#: overlaps as a flat list [from, to, ...].
_BEGIN = _PARSE_RANGE + """
local first, last, part, owner = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[4] == '1', ARGV[5]
local kept, overlaps = {}, {}
for _, range in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local from, to, stored_by = parse(range)
  if to >= first or stored_by == owner or part then
    table.insert(kept, range)
    if from <= last and to >= first then
      table.insert(overlaps, math.max(from, first))
      table.insert(overlaps, math.min(to, last))
    end
  end
end
redis.call('DEL', KEYS[1])
if #overlaps == 0 or part then
  table.insert(kept, ARGV[1] .. ':' .. ARGV[2] .. ':' .. owner)
end
if #kept > 0 then
  redis.call('RPUSH', KEYS[1], unpack(kept))
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return overlaps
"""

#: KEYS[1]: the partition's list. ARGV: first and last offset of messages delivered, TTL in ms: they
#: are subtracted from every stored range, whoever stored it.
_CLEAR = _PARSE_RANGE + """
local first, last = tonumber(ARGV[1]), tonumber(ARGV[2])
local kept = {}
for _, range in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local from, to, stored_by = parse(range)
  if to < first or from > last then
    table.insert(kept, range)
  else
    if from < first then table.insert(kept, string.format('%d:%d:%s', from, first - 1, stored_by)) end
    if to > last then table.insert(kept, string.format('%d:%d:%s', last + 1, to, stored_by)) end
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


def _runs(messages: Sequence[InboundMessage], chosen: set[int]) -> list[tuple[Partition, OffsetRange]]:
    """The offset ranges of each run of consecutive ``chosen`` messages (by ``id``) among a
    partition's ``messages``, which come in offset order."""
    by_partition: dict[Partition, list[InboundMessage]] = {}
    for message in messages:
        by_partition.setdefault(_partition(message), []).append(message)
    runs: list[tuple[Partition, OffsetRange]] = []
    for where, in_order in by_partition.items():
        first: InboundMessage | None = None
        last: InboundMessage | None = None
        for message in in_order:
            if id(message) in chosen:
                first, last = first or message, message
            elif first is not None and last is not None:
                runs.append((where, (int(first.offset), int(last.offset))))
                first = last = None
        if first is not None and last is not None:
            runs.append((where, (int(first.offset), int(last.offset))))
    return runs


def _partition(message: InboundMessage) -> Partition:
    return message.topic, message.partition


def _within(ranges: list[OffsetRange] | None, message: InboundMessage) -> bool:
    if not ranges:
        return False
    offset = int(message.offset)
    return any(first <= offset <= last for first, last in ranges)


def _lives_left_undelivered(ranges: list[OffsetRange], message: InboundMessage) -> int:
    """How many stored ranges hold the message: one per earlier life that did not deliver it."""
    offset = int(message.offset)
    return sum(first <= offset <= last for first, last in ranges)


def _ignore(part: Sequence[InboundMessage]) -> None:
    """Uncounted steps clear nothing."""


def _note_run(ranges: dict[Partition, OffsetRange], first: InboundMessage, last: InboundMessage) -> None:
    where = (first.topic, first.partition)
    low, high = sorted((int(first.offset), int(last.offset)))
    known = ranges.get(where)
    ranges[where] = (low, high) if known is None else (min(known[0], low), max(known[1], high))


class KafkaDeliveryCounter:
    """Sets ``InboundMessage.deliveries`` of Kafka messages and runs the core step on them."""

    def __init__(self, settings: Settings, client: Redis | None = None, clear_within_s: float = CLEAR_WITHIN_S,
                 needs_model: NeedsModel | None = None, stopping: Callable[[], bool] | None = None) -> None:
        """``needs_model``: where given, held messages the model would not see (cache hits, poison) run
        with the rest of the fetch instead of one at a time. ``stopping``: true once the worker stops
        (or failed); the held messages not begun by then are left uncounted for the next owner."""
        self.group = settings.app_id
        self._own_client = client is None
        self.client = client if client is not None else redis_client(settings.redis_url.get_secret_value())
        self._ttl_ms = str(COUNT_TTL_S * 1000)
        #: Marks the ranges this worker's life stored: only another life's are dropped when passed.
        self.owner = uuid.uuid4().hex[:12]
        self._shas: tuple[str, str] | None = None
        self._pending_clears: list[tuple[str, OffsetRange]] = []
        self._unavailable_until = 0.0
        self._clear_within_s = clear_within_s
        self._needs_model = needs_model
        self._stopping = stopping or (lambda: False)
        #: Lives that left a message undelivered before it goes one at a time whatever it needs. Its
        #: batch's innocent messages reach one more than this when held, so it stays within
        #: ``max_deliveries``, and they are delivered, not dead-lettered.
        self._hold_anyway_after = min(HOLD_ANYWAY_AFTER_LIVES, settings.max_deliveries - 1)
        self._flush: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[Any]] = set()

    def key(self, where: Partition) -> str:
        return f"{KEY_PREFIX}:{self.group}:{where[0]}:{where[1]}"

    async def run(self, messages: Sequence[InboundMessage], start: StartStep) -> None:
        """``start`` the core step on ``messages`` with their delivery counts set; each part's runs of
        offsets are cleared once it was delivered."""
        ranges = offset_ranges(messages)
        overlaps = await self._begin(ranges)
        if overlaps is None:  # uncounted: Redis does not answer
            await start(messages, _ignore)
            return
        redelivered = [message for message in messages if _within(overlaps.get(_partition(message)), message)]
        if not redelivered:
            await start(messages, self._clear_when_delivered(messages, ranges))
            return
        if self._needs_model is not None:
            # Only the model can be what killed a worker: a held message it would not see now runs
            # with the rest (a cache entry that expires meanwhile sends it there in a batch after all),
            # unless lives failed it often enough that something else must be failing on it (a delivery
            # that raises every time): then it goes alone too, so that only it counts on to the limit.
            needs_model = await self._needs_model(redelivered)
            redelivered = [
                message for message, model in zip(redelivered, needs_model, strict=True)
                if model or _lives_left_undelivered(overlaps[_partition(message)], message) >= self._hold_anyway_after
            ]
        held = {id(message) for message in redelivered}
        fresh = [message for message in messages if id(message) not in held]
        if fresh:
            # Where a partition overlapped, ``_begin`` stored nothing: the runs of its fresh messages are
            # stored now. Runs of the whole fetch, here and when clearing, so that none spans a held offset.
            chosen = {id(message) for message in fresh}
            runs = _runs([message for message in messages if _partition(message) in overlaps], chosen)
            begins = [(where, first, last, True) for where, (first, last) in runs]
            counted = not begins or await self._run(begins) is not None
            await start(fresh, self._clear_when_delivered(messages, ranges) if counted else _ignore)
        if redelivered:
            log.warning("deliveries.redelivered", messages=len(redelivered), partitions=sorted(overlaps),
                        note="a worker stopped or died holding them: processed one at a time")
        for message in redelivered:
            if self._stopping():
                # A message begun now would count this life although its delivery cannot finish (a
                # delivery that failed before it stops the worker): the innocent messages held behind
                # a failing one would count up with it to the limit.
                break
            await self._begin_one(message)
            # To the end, so that only a message that kills the worker counts up; cleared only once
            # delivered, so that one whose delivery failed (which stops the worker) counts up too.
            offset = int(message.offset)
            clear = self._clear_when_delivered([message], {_partition(message): (offset, offset)})
            await (await start([message], clear))

    def _clear_when_delivered(self, step: Sequence[InboundMessage], ranges: dict[Partition, OffsetRange]) -> Delivered:
        """Clears each part's runs of offsets as it is delivered: runs of the step's own messages, so
        that a part never clears a message of the step still waiting between two of its own. A part
        that is the whole step (a step of hits) clears the step's ``ranges`` as they are."""

        def delivered(part: Sequence[InboundMessage]) -> None:
            if len(part) == len(step):
                self._ended(ranges.items())
            else:
                self._ended(_runs(step, {id(message) for message in part}))

        return delivered

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
        if self._pending_clears:  # a clean stop leaves nothing to expire
            await self._run([])
        if self._own_client:
            await self.client.aclose()

    # --- Redis --------------------------------------------------------------------------------

    async def _begin(self, ranges: dict[Partition, OffsetRange]) -> dict[Partition, list[OffsetRange]] | None:
        """Store the step's ranges where nothing overlaps them; the overlapping ranges where something did."""
        replies = await self._run([(where, first, last, False) for where, (first, last) in ranges.items()])
        if replies is None:
            return None
        return {
            where: [(overlaps[i], overlaps[i + 1]) for i in range(0, len(overlaps), 2)]
            for where, overlaps in zip(ranges, replies, strict=True)
            if overlaps
        }

    async def _begin_one(self, message: InboundMessage) -> None:
        offset = int(message.offset)
        replies = await self._run([((message.topic, message.partition), offset, offset, True)])
        if replies is not None:
            message.deliveries = 1 + len(replies[0]) // 2

    def _ended(self, ranges: Iterable[tuple[Partition, OffsetRange]]) -> None:
        self._pending_clears.extend((self.key(where), offsets) for where, offsets in ranges)
        if len(self._pending_clears) > _MAX_PENDING_CLEARS:
            del self._pending_clears[:-_MAX_PENDING_CLEARS]
        # Clears ride on the next step's round trip; when none comes soon (the worker waits for
        # input, or for room), they go alone, so that a worker killed meanwhile has not left its
        # delivered messages counted for its successor to redo one at a time.
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self._clear_within_s, self._flush_clears)

    def _flush_clears(self) -> None:
        self._flush = None
        if self._pending_clears:
            task = asyncio.ensure_future(self._run([]))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

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
                pipe.evalsha(begin_sha, 1, self.key(where), first, last, self._ttl_ms, "1" if single else "0",
                             self.owner)
            replies: list[Any] = await pipe.execute()
        return replies
