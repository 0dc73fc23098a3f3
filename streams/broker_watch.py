"""Whether the Kafka broker answers, for ``/ready``: on an idle worker as on a busy one.

A publish that fails marks the transport down (``streams.delivery.Retrying``), but a worker with
nothing to publish never publishes, and aiokafka's fetcher and coordinator retry a lost broker in the
background without telling the caller: ``getmany`` just returns nothing. So while nothing has shown
the broker answering for ``quiet_s`` (a fetch that returned records, a partition assignment, the last
probe), ``BrokerWatch`` asks it for its metadata (``AIOKafkaConsumer.topics``: one public request,
with ``probe_timeout_s``). A probe that fails marks the transport unreachable (``/ready`` 503, the
ready gauge 0) and logs one ``broker.unreachable`` WARNING; the next answer marks it reachable again
and logs one ``broker.reachable`` INFO. Found within ``quiet_s + tick_s + probe_timeout_s`` (11 s)
of the broker's last answer. Both Kafka runners use it: the batch runner probes with its own
consumer; the Faust runner, whose consumer runs on a thread and loop of its own, with a group-less
consumer of the watch's (``MetadataProbe``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog
from aiokafka import AIOKafkaConsumer

from schemas.settings import Settings
from streams.kafka_io import make_consumer
from streams.runtime import WorkerRuntime

log = structlog.get_logger(__name__)


class BrokerWatch:
    def __init__(self, runtime: WorkerRuntime, probe: Callable[[], Awaitable[object]], *, quiet_s: float = 5.0,
                 probe_timeout_s: float = 5.0, tick_s: float = 1.0, retry_s: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.probe = probe
        self.quiet_s = quiet_s
        self.probe_timeout_s = probe_timeout_s
        self.tick_s = tick_s
        #: Between probes while the broker does not answer (each one is a connection attempt).
        self.retry_s = retry_s
        self._clock = clock
        self._last_answer = self._last_probe = clock()
        #: Since when the broker has not answered; None while it answers.
        self.unreachable_since: float | None = None

    def answered(self) -> None:
        """The broker just answered (records fetched, partitions assigned, a probe)."""
        now = self._last_answer = self._clock()
        if self.unreachable_since is not None:
            down_s = now - self.unreachable_since
            self.unreachable_since = None
            self.runtime.set_transport(connected=True)
            log.info("broker.reachable", unreachable_for_s=round(down_s, 1))

    async def check(self) -> None:
        """Probe the broker if nothing showed it answering for ``quiet_s`` (while it does not answer,
        once per ``retry_s``)."""
        now = self._clock()
        silent_s = now - self._last_answer
        if silent_s < self.quiet_s or (self.unreachable_since is not None and now - self._last_probe < self.retry_s):
            return
        self._last_probe = now
        try:
            await asyncio.wait_for(self.probe(), self.probe_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._unreachable(exc, silent_s)
        else:
            self.answered()

    async def run(self) -> None:
        """``check`` every ``tick_s``, until cancelled."""
        while True:
            await asyncio.sleep(self.tick_s)
            await self.check()

    def _unreachable(self, exc: BaseException, silent_s: float) -> None:
        # On every failed probe: a publish that went through in between (``Retrying``) marked it connected.
        self.runtime.set_transport(connected=False)
        if self.unreachable_since is None:
            self.unreachable_since = self._clock()
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("broker.unreachable", error=error, silent_s=round(silent_s, 1),
                        note="/ready answers 503 until the broker answers again")


class MetadataProbe:
    """A probe for a runner without a client on this event loop: a group-less consumer of its own,
    started (a metadata request) by the first probe, asked for the metadata by each one after."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None

    async def __call__(self) -> None:
        if self._consumer is not None:
            await self._consumer.topics()
            return
        consumer = make_consumer(self.settings, client_id=f"qustream-{self.settings.worker_id}-probe")
        try:
            await consumer.start()
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer

    async def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()
