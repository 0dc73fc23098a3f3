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
  ``STOP_GRACE_S`` more and then given up: its inputs stay unacknowledged and are processed again by
  whoever reads them next (at least once: a duplicate, never a loss). Connection loops pace
  themselves with the same policy.
- ``CommitTracker``: the input positions that may be committed, per partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Generic, NamedTuple, Protocol, TypeVar

import structlog

from schemas.settings import Settings
from streams.retry import Backoff
from streams.runtime import WorkerRuntime
from workers.core_step import BatchOutcome, OutboundRecord

log = structlog.get_logger(__name__)

#: How long a stopping worker keeps retrying the publish of a batch it holds before giving it up.
STOP_GRACE_S = 10.0

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
                 grace_s: float = STOP_GRACE_S) -> None:
        self.runtime = runtime
        #: None: the runner is stopped by cancellation (Faust), which ends any retry at once.
        self.stop = stop
        self.grace_s = grace_s
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


class CommitTracker(Generic[PartitionT]):
    """Per partition, the position up to which inputs may be committed (Kafka: the next offset).

    A batch's positions are noted once all its outputs were acknowledged, in batch order, so the
    committable position never passes an input whose outputs are not on the broker. A finer
    tracker (per message: hits published before the misses of the same step) keeps this interface
    and only changes when ``published`` moves a partition forward.
    """

    def __init__(self) -> None:
        self._committable: dict[PartitionT, int] = {}

    def __bool__(self) -> bool:
        return bool(self._committable)

    def published(self, positions: Mapping[PartitionT, int]) -> None:
        self._committable.update(positions)

    def take(self) -> dict[PartitionT, int]:
        """Everything committable now; ``restore`` it if the commit fails."""
        taken, self._committable = self._committable, {}
        return taken

    def restore(self, positions: Mapping[PartitionT, int]) -> None:
        """A commit that failed: its positions wait for the next one, unless newer ones came."""
        for partition, position in positions.items():
            if position > self._committable.get(partition, -1):
                self._committable[partition] = position

    def retain(self, assigned: Collection[PartitionT]) -> None:
        """After a rebalance: positions of partitions no longer ours are another owner's to commit."""
        self._committable = {tp: position for tp, position in self._committable.items() if tp in assigned}
