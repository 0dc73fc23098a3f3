"""One delivery layer: publish a step's outputs, wait for the broker's acknowledgement, then ack or
commit the step's inputs.

Every runner is the same short loop, fetch → core step (``WorkerRuntime.process``) →
``Delivery.deliver``, and each transport implements ``Delivery`` once: ``KafkaDelivery``
(``streams.kafka_runner``), ``FaustDelivery`` (``streams.faust_runner``) and ``RedisDelivery``
(``streams.redis_transport``). Like Quix Streams' ``Checkpoint``, one object owns both halves of
"flush the producer, then commit", so an input is never acknowledged before its outputs.

What the transports share lives here:

- ``route``: which output goes to which topic or stream.
- ``Retrying``: the one backoff policy (capped exponential with jitter) and the one stop policy. A
  publish that fails is retried until it lands; once the worker is asked to stop, it is retried for
  the stop grace (``Settings.stop_grace_s``) more and then given up: its inputs stay unacknowledged
  and are processed again by whoever reads them next (at least once: a duplicate, never a loss).
  Connection loops pace themselves with the same policy.
- ``CommitTracker``: the input positions that may be committed, per partition.
- ``InFlight``: runs core steps, delivers each part as soon as it is ready, and bounds the messages
  taken but not yet delivered or, where a commit position trails the deliveries, not yet committable.
  On stop (``InFlight.stop``) it waits the stop grace for the steps still finishing, then gives the rest
  up and says how many inputs it left (``worker.stop_grace_exceeded``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

import structlog

from schemas.settings import Settings
from streams.retry import Backoff
from streams.runtime import WorkerRuntime
from workers.core_step import BatchOutcome, InboundMessage, OutboundRecord, RunningStep, Settled

log = structlog.get_logger(__name__)

#: Test-only: a query whose parsed event's delivery raises, as a bug in a delivery would (the
#: end-to-end tests of a delivery bug stopping the worker use it).
DELIVERY_BUG_ON_QUERY_ENV = "QUSTREAM_TEST_DELIVERY_BUG_ON_QUERY"

InputsT = TypeVar("InputsT", contravariant=True)
PartitionT = TypeVar("PartitionT")

#: Records to publish, by topic or stream, in the order they must keep per partition.
Routed = dict[str, list[OutboundRecord]]


class OutputNames(NamedTuple):
    parsed: str
    dead_letters: str
    metrics: str

    @classmethod
    def kafka(cls, settings: Settings) -> OutputNames:
        return cls(settings.topic_parsed, settings.topic_dlq, settings.topic_metrics)

    @classmethod
    def redis(cls, settings: Settings) -> OutputNames:
        return cls(settings.stream_parsed, settings.stream_dlq, settings.stream_metrics)


def route(outcome: BatchOutcome, names: OutputNames) -> Routed:
    """A core step's outputs by destination: parsed events, dead letters, and its metrics event."""
    return {
        names.parsed: outcome.parsed,
        names.dead_letters: outcome.dead_letters,
        names.metrics: [outcome.metrics_record()],
    }


class Delivery(Protocol[InputsT]):
    """Publish these outputs, wait for the acknowledgement, then ack or commit these inputs.

    ``InputsT`` is what acknowledging means on the transport: the next offset per partition (Kafka
    batch runner), the events (Faust), the entry ids (Redis Streams).
    """

    async def deliver(self, outcome: BatchOutcome, inputs: InputsT) -> bool:
        """Hand ``outcome``'s outputs to the broker; once they are acknowledged, ack or commit
        ``inputs`` and count the batch (``WorkerRuntime.record``). An implementation may return
        before the acknowledgement (batches in flight) and settle later; False when the batch was
        given up under the stop rule."""
        ...


class Retrying:
    """The backoff and stop policy of every transport (see the module docstring)."""

    def __init__(self, runtime: WorkerRuntime, stop: asyncio.Event | None,
                 grace_s: float | None = None) -> None:
        self.runtime = runtime
        #: None: the runner is stopped by cancellation (Faust), which ends any retry at once.
        self.stop = stop
        #: How long a stopping worker keeps retrying a publish before giving it up (``stop_grace_s``).
        self.grace_s = runtime.settings.stop_grace_s if grace_s is None else grace_s
        self._backoff = Backoff()
        self._stop_seen_at: float | None = None

    @property
    def failures(self) -> int:
        return self._backoff.failures

    def succeeded(self) -> None:
        self.runtime.set_transport(connected=True)
        self._backoff.reset()

    def delay(self) -> float:
        """The pause before the next try."""
        return self._backoff.next_delay()

    def failed(self) -> float:
        """Mark the transport down; the pause before the next try."""
        self.runtime.set_transport(connected=False)
        return self.delay()

    async def pause(self, seconds: float) -> None:
        """Sleep, woken early by a stop request (for loops that end on stop)."""
        if self.stop is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    def _grace_left(self) -> float | None:
        """Seconds of the stop grace left; None while no stop was requested."""
        if self.stop is None or not self.stop.is_set():
            return None
        now = time.monotonic()
        if self._stop_seen_at is None:
            self._stop_seen_at = now
        return self.grace_s - (now - self._stop_seen_at)

    async def publish(
        self,
        attempt: Callable[[], Awaitable[object]],
        *,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        after_failure: Callable[[BaseException], Awaitable[bool | None]] | None = None,
    ) -> bool:
        """Run ``attempt`` until it succeeds (True) or the stop rule gives the batch up (False).

        ``after_failure`` runs after each pause: True or False settles the publish without another
        attempt (e.g. a transaction whose reply was lost turned out to have applied), None retries.
        """
        while True:
            try:
                await attempt()
            except asyncio.CancelledError:
                raise
            except retry_on as exc:
                delay = self.failed()
                error = f"{type(exc).__name__}: {exc}"
                grace_left = self._grace_left()
                if grace_left is not None and grace_left <= 0:
                    log.error("publish.abandoned", error=error,
                              note="stopping; the inputs are not acknowledged and will be processed again")
                    return False
                log.error("publish.retry", attempt=self.failures, delay_s=round(delay, 2), error=error)
                if grace_left is None:
                    await self.pause(delay)  # a stop request starts the grace at once
                else:
                    await asyncio.sleep(min(delay, grace_left))
                if after_failure is not None:
                    settled = await after_failure(exc)
                    if settled is not None:
                        return settled
                continue
            self.succeeded()
            return True


class Waiting(NamedTuple):
    """A partition's first input whose outputs are not acknowledged, and what waits behind it."""

    offset: int
    #: Seconds the committable position has waited for this input.
    seconds: float
    #: Inputs fetched whose outputs are not acknowledged yet, this one included.
    inputs: int


class CommitTracker(Generic[PartitionT]):
    """Per partition, the position up to which inputs may be committed: the first input whose outputs
    are not yet acknowledged, or past the last one when all are (Kafka: the next offset).

    Inputs are ``track``ed in fetch order and ``settle``d in any order (a step's cache hits before
    its misses); the committable position never passes an input whose outputs are not on the broker.
    ``waiting`` says, per partition, which input the position waits for and since when: an operator's
    view of a partition that does not move.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._open: dict[PartitionT, deque[int]] = {}
        self._settled: dict[PartitionT, set[int]] = {}
        self._committable: dict[PartitionT, int] = {}
        #: When each partition's first open input became the one its position waits for.
        self._head_since: dict[PartitionT, float] = {}
        #: Past the last input tracked, per partition: where the next fetched one should be.
        self._next: dict[PartitionT, int] = {}

    def __bool__(self) -> bool:
        return bool(self._committable)

    def track(self, partition: PartitionT, offsets: Sequence[int]) -> None:
        """Fetched inputs, in offset order."""
        if not offsets:
            return
        waiting = self._open.setdefault(partition, deque())
        if not waiting:
            self._head_since[partition] = self._clock()
        waiting.extend(offsets)
        self._next[partition] = offsets[-1] + 1

    def settle(self, partition: PartitionT, offsets: Iterable[int]) -> None:
        """Inputs whose outputs were acknowledged; ignored for a partition no longer tracked."""
        waiting = self._open.get(partition)
        if not waiting:
            return
        settled = self._settled.setdefault(partition, set())
        settled.update(offsets)
        if len(settled) >= len(waiting) and settled.issuperset(waiting):  # everything fetched is settled
            self._committable[partition] = waiting[-1] + 1
            waiting.clear()
            settled.clear()
            self._head_since.pop(partition, None)
            return
        moved = None
        while waiting and waiting[0] in settled:
            moved = waiting.popleft()
            settled.discard(moved)
        if moved is not None:
            self._committable[partition] = waiting[0] if waiting else moved + 1
            if waiting:
                self._head_since[partition] = self._clock()
            else:
                self._head_since.pop(partition, None)

    def waiting(self) -> dict[PartitionT, Waiting]:
        """Partitions with inputs whose outputs are not acknowledged yet: the first of them (the
        position waits for it), how long it has been the first, and how many there are."""
        now = self._clock()
        return {
            partition: Waiting(waiting[0], now - self._head_since.get(partition, now), len(waiting))
            for partition, waiting in self._open.items()
            if waiting
        }

    def unsettled(self) -> int:
        """Inputs tracked that the committable position has not passed, over every partition: those
        not yet delivered, and those delivered behind one that is not."""
        return sum(len(waiting) for waiting in self._open.values())

    def next_expected(self, partition: PartitionT) -> int | None:
        """Past the last input tracked in ``partition`` (None before the first)."""
        return self._next.get(partition)

    def take(self) -> dict[PartitionT, int]:
        """Everything committable now; ``restore`` it if the commit fails."""
        taken, self._committable = self._committable, {}
        return taken

    def restore(self, positions: Mapping[PartitionT, int]) -> None:
        """A commit that failed: its positions wait for the next one, unless newer ones came."""
        for partition, position in positions.items():
            if position > self._committable.get(partition, -1):
                self._committable[partition] = position

    def forget(self, partitions: Collection[PartitionT]) -> None:
        """Partitions given up: their inputs are the next owner's to process and commit."""
        for partition in partitions:
            self._open.pop(partition, None)
            self._settled.pop(partition, None)
            self._committable.pop(partition, None)
            self._head_since.pop(partition, None)
            self._next.pop(partition, None)

    def retain(self, assigned: Collection[PartitionT]) -> None:
        """After a rebalance: positions of partitions no longer ours are another owner's to commit."""
        self.forget([partition for partition in (*self._open, *self._committable) if partition not in assigned])


class InFlight(Generic[InputsT]):
    """Runs core steps and hands each part to the transport's ``Delivery`` as soon as it is ready: a
    step's cache hits and dead letters at once, its misses as their rows finish, in a task of their
    own so that the runner goes on fetching. Counts the messages taken but not yet delivered: past
    ``limit`` the runner waits (``wait_for_room``) instead of fetching, which bounds memory under a
    burst.

    Where inputs are committed in order (Kafka), ``uncommitted`` counts the inputs the commit position
    has not passed, and ``uncommitted_limit`` bounds those. A step's hits go out before an earlier miss
    of their partition has left the model, and the position waits for that miss: without this bound, a
    miss held up for long (a Redis outage turns every query into one) lets the hits published behind
    it grow without limit, and a crash then redoes all of them. A delivered input costs only its
    offset, so this bound is the larger one: at it, hits wait for the miss ahead of them."""

    def __init__(self, runtime: WorkerRuntime, delivery: Delivery[InputsT], limit: int,
                 uncommitted: Callable[[], int] | None = None, uncommitted_limit: int | None = None) -> None:
        self.runtime = runtime
        self.delivery = delivery
        self.limit = limit
        self.uncommitted_limit = limit if uncommitted_limit is None else uncommitted_limit
        self._uncommitted = uncommitted
        self._held = 0
        self._room = asyncio.Event()
        self._room.set()
        #: Steps whose misses are still being parsed or delivered: the step's messages, and the parts
        #: of it delivered so far (what ``stop`` leaves behind is the difference).
        self._tasks: dict[asyncio.Task[None], tuple[Sequence[InboundMessage], list[Sequence[InboundMessage]]]] = {}
        fail_on_query = os.environ.get(DELIVERY_BUG_ON_QUERY_ENV)
        self._fail_on_query = json.dumps(fail_on_query).encode() if fail_on_query else None

    @property
    def room(self) -> int:
        room = self.limit - self._held
        if self._uncommitted is not None:
            room = min(room, self.uncommitted_limit - self._uncommitted())
        return max(room, 0)

    @property
    def steps_finishing(self) -> int:
        """Steps whose misses are still being parsed or delivered."""
        return len(self._tasks)

    async def wait_for_room(self, timeout_s: float) -> int:
        """The room left, after waiting up to ``timeout_s`` for some when there is none."""
        if not self.room:
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), timeout_s)
        return self.room

    async def start(
        self,
        messages: Sequence[InboundMessage],
        inputs_of: Callable[[Sequence[InboundMessage]], InputsT],
        amend_ready: Callable[[Settled], None] | None = None,
        delivered: Callable[[Sequence[InboundMessage]], None] | None = None,
    ) -> asyncio.Future[None]:
        """Begin the core step on ``messages`` and deliver its ready part (``amend_ready`` may add the
        transport's own refusals to it first); the future resolves once every part was delivered.
        ``delivered`` is told the messages of each part handed to the delivery, as it happens."""
        self._held += len(messages)
        step = await self.runtime.begin(messages)
        if amend_ready is not None:
            before = len(step.ready.messages)
            amend_ready(step.ready)
            self._held += len(step.ready.messages) - before
        if step.ready.messages:  # a step of misses only has nothing to deliver yet
            await self._deliver_or_fail(step.ready, inputs_of, delivered)
        if not step.pending:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        parts_done: list[Sequence[InboundMessage]] = [step.ready.messages]
        task = asyncio.create_task(self._finish(step, inputs_of, delivered, parts_done), name="qustream-step-misses")
        self._tasks[task] = (messages, parts_done)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Until every started step was delivered (or ``timeout_s`` passed)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    def cancel(self) -> None:
        """Stop delivering (the runner is cancelled): what was not delivered is processed again."""
        for task in self._tasks:
            task.cancel()

    def undelivered(self) -> dict[str, int]:
        """Inputs of the steps still finishing whose outputs were not handed to the delivery yet, by
        ``topic/partition``."""
        counts: dict[str, int] = {}
        for messages, parts_done in self._tasks.values():
            done = {id(message) for part in parts_done for message in part}
            for message in messages:
                if id(message) not in done:
                    where = f"{message.topic}/{message.partition}"
                    counts[where] = counts.get(where, 0) + 1
        return counts

    async def stop(self, grace_s: float, redone: str) -> int:
        """The stop path: wait up to ``grace_s`` for the steps still finishing, then give the rest up
        (``give_up``). The number of inputs left undelivered."""
        await self.drain(grace_s)
        return self.give_up(grace_s, redone)

    def give_up(self, grace_s: float, redone: str) -> int:
        """Cancel the steps still finishing; where they held inputs not yet delivered, log one warning
        with their count per partition, what the commit position has not passed (delivered ones
        behind them included: processed again too) and ``redone``, what becomes of them. Their count."""
        left = self.undelivered()
        uncommitted = self._uncommitted() if self._uncommitted is not None else None
        self.cancel()
        inputs = sum(left.values())
        if inputs:
            extra = {} if uncommitted is None else {"uncommitted": uncommitted}
            log.warning("worker.stop_grace_exceeded", grace_s=grace_s, inputs=inputs, partitions=left,
                        **extra, note=f"stopping with inputs not delivered: {redone}")
        return inputs

    async def _deliver(
        self, settled: Settled, inputs_of: Callable[[Sequence[InboundMessage]], InputsT],
        delivered: Callable[[Sequence[InboundMessage]], None] | None,
    ) -> None:
        try:
            bug_hit = self._fail_on_query is not None and any(
                self._fail_on_query in (r.value or b"") for r in settled.outcome.parsed)
            if bug_hit:
                raise RuntimeError(f"{DELIVERY_BUG_ON_QUERY_ENV} (test only)")
            await self.delivery.deliver(settled.outcome, inputs_of(settled.messages))
        finally:
            self._held -= len(settled.messages)
            # Woken even while there is no room yet: where the commit position moves only when the
            # runner settles what it handed over (the batch runner), the runner must go and do it.
            self._room.set()
        if delivered is not None:
            delivered(settled.messages)

    async def _finish(
        self, step: RunningStep, inputs_of: Callable[[Sequence[InboundMessage]], InputsT],
        delivered: Callable[[Sequence[InboundMessage]], None] | None,
        parts_done: list[Sequence[InboundMessage]],
    ) -> None:
        async for settled in step.remaining():
            await self._deliver_or_fail(settled, inputs_of, delivered)
            parts_done.append(settled.messages)

    async def _deliver_or_fail(
        self, settled: Settled, inputs_of: Callable[[Sequence[InboundMessage]], InputsT],
        delivered: Callable[[Sequence[InboundMessage]], None] | None,
    ) -> None:
        """Deliver one part; a delivery that raises (a bug: broker errors are retried inside it)
        stops the worker (``WorkerRuntime.fail``). This part's inputs stay unacknowledged, so their
        partition commits nothing past them, and the next owner processes them again; the step's
        other parts are still delivered while the runner stops (within its grace), so a stopping
        worker strands as few as it can."""
        try:
            await self._deliver(settled, inputs_of, delivered)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("step.delivery_failed", messages=len(settled.messages))
            self.runtime.fail("delivery", exc)
