"""What a running worker holds, whatever its transport: engine, cache, pipeline, metrics, readiness."""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import structlog

from schemas.events import ParsedEvent
from schemas.settings import Settings
from schemas.spec import ParseSpec
from streams.telemetry import WorkerMetrics
from workers.cache import ParseCache, redis_client
from workers.core_step import BatchOutcome, InboundMessage, ParsePipeline, RunningStep, Settled
from workers.engine import ParseEngine, ParseResult

log = structlog.get_logger(__name__)

#: Sends one query through the stream and returns its parsed event (the ``POST /parse`` bridge).
ParseBridge = Callable[[str, float], Awaitable[ParsedEvent]]


def package_version() -> str:
    try:
        return version("qustream")
    except PackageNotFoundError:
        return "0+unknown"


class DeferredEngine:
    """The engine's identity (model id, grounding, cache version) from settings alone, its compute
    once the model is loaded. The pipeline only calls ``parse_batch`` after ``wait_started``."""

    def __init__(self, settings: Settings, spec: ParseSpec) -> None:
        from workers.engine import engine_version
        from workers.model import card_for, model_id_for

        self.model_id = model_id_for(settings)
        self.grounding: str = settings.grounding
        self.spec = spec
        self.version = engine_version(self.model_id, spec, settings.grounding, card_for(settings, spec.fingerprint))
        self.loaded: ParseEngine | None = None

    def parse_batch(self, queries: list[str]) -> list[ParseResult]:
        if self.loaded is None:
            raise RuntimeError("the model is not loaded yet")
        return self.loaded.parse_batch(queries)

    def warm_up(self) -> None:
        if self.loaded is not None:
            self.loaded.warm_up()

    @property
    def submit(self) -> Callable[[str], Future[ParseResult]] | None:
        """The loaded engine's continuous batching (``ConstrainedEngine.submit``), if it has one."""
        return getattr(self.loaded, "submit", None)


class Progress:
    """One INFO line for the first batch, then one per ``interval_s`` summing the batches since, and
    one at stop for the batches no line has counted yet: a line per batch (now DEBUG ``batch.done``)
    was a large part of the cached path's CPU (docs/performance.md)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._since = time.monotonic()
        self._logged_once = False
        self._counts = [0, 0, 0, 0, 0]  # batches, messages, parsed, cached, dead-lettered

    def add(self, messages: int, parsed: int, cached: int, dead_lettered: int) -> None:
        counts = self._counts
        counts[0] += 1
        counts[1] += messages
        counts[2] += parsed
        counts[3] += cached
        counts[4] += dead_lettered
        if self._logged_once and time.monotonic() - self._since < self.interval_s:
            return
        self.flush()

    def flush(self) -> None:
        """Log the batches since the last line, if any."""
        counts = self._counts
        if not counts[0]:
            return
        now = time.monotonic()
        seconds = max(now - self._since, 1e-9)
        log.info("batches.progress", batches=counts[0], messages=counts[1], parsed=counts[2], cached=counts[3],
                 dead_lettered=counts[4], seconds=round(seconds, 2), messages_per_s=round(counts[1] / seconds, 1))
        self._logged_once = True
        self._since = now
        self._counts = [0, 0, 0, 0, 0]


class StepSizer:
    """How many records a transport takes in one step, from the miss rate of the steps before.

    A step costs a fixed part (a Redis round trip, a metrics event, one producer batch per output
    partition, a commit) and a part per record; a cache hit pays only the second, and a step of hits
    never waits for the model. So a step takes up to ``max_records`` when its records are expected to
    hit, and about ``batch_size / miss rate`` otherwise: about ``batch_size`` misses per step keeps
    model batches full and a step's latency that of one model batch.
    """

    def __init__(self, batch_size: int, max_records: int, smoothing: float = 0.3) -> None:
        self.batch_size = batch_size
        self.max_records = max(max_records, batch_size)
        self.smoothing = smoothing
        # Until a step says otherwise, expect every record to miss: a cold worker sizes for the model.
        self.miss_rate = 1.0

    @property
    def limit(self) -> int:
        if self.miss_rate * self.max_records <= self.batch_size:
            return self.max_records
        return max(self.batch_size, int(self.batch_size / self.miss_rate))

    def observe(self, records: int, misses: int) -> None:
        if records:
            self.miss_rate += self.smoothing * (misses / records - self.miss_rate)


class WorkerFailed(RuntimeError):
    """A bug left inputs neither acknowledged nor given up (a delivery that raised). The worker stops
    and exits non-zero, so that its supervisor restarts it, and the next owner of those inputs
    processes them again; one that fails every time is dead-lettered past ``max_deliveries``."""


class WorkerRuntime:
    def __init__(self, settings: Settings, engine: ParseEngine | None = None) -> None:
        """Loads the parse spec at once: a bad spec stops the worker before it connects to anything
        (``SpecError`` names the file, the field and the problem)."""
        from workers.grammar import load_checked_spec

        self.settings = settings
        self.spec = engine.spec if engine is not None else load_checked_spec(settings.parse_spec)
        self.metrics = WorkerMetrics()
        self.engine = engine
        self.pipeline: ParsePipeline | None = None
        self.cache: ParseCache | None = None
        self._cache_probe: asyncio.Task[bool] | None = None
        self.transport_connected = False
        self.assigned_partitions: set[tuple[str, int]] = set()
        self.bridge: ParseBridge | None = None
        #: Set by ``fail``: the worker is stopping because of a bug, and exits non-zero.
        self.failure: WorkerFailed | None = None
        self._on_failure: list[Callable[[WorkerFailed], None]] = []
        self._started = asyncio.Event()
        self._serving = asyncio.Event()
        self.pipeline_engine: ParseEngine | DeferredEngine
        self.batches_done = 0
        self.progress = Progress()
        self.step = StepSizer(settings.batch_size, settings.batch_max_records)
        # The model is built, warmed and called on this one thread (see ParsePipeline).
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="qustream-engine")

    @property
    def engine_ready(self) -> bool:
        return self._started.is_set()

    async def start(self) -> None:
        """Open the cache and build the pipeline at once (cache hits are served from then on), then
        load and warm the model in a thread; idempotent."""
        if self._started.is_set():
            return
        began = time.perf_counter()
        if self.pipeline is None:
            self._open_pipeline()
        loop = asyncio.get_running_loop()
        if not isinstance(self.pipeline_engine, DeferredEngine):
            await loop.run_in_executor(self.engine_thread, self.pipeline_engine.warm_up)
            self.engine = self.pipeline_engine
        else:
            from workers.engine import build_engine

            engine = await loop.run_in_executor(self.engine_thread, build_engine, self.settings)
            if engine.version != self.pipeline_engine.version:
                raise RuntimeError(f"engine version {engine.version} != expected {self.pipeline_engine.version}: "
                                   "cache keys would not match the parses")
            await loop.run_in_executor(self.engine_thread, engine.warm_up)
            self.pipeline_engine.loaded = engine
            self.engine = engine
        self.metrics.model_load_seconds.set(time.perf_counter() - began)
        self.metrics.watch_engine(self.engine)
        self.metrics.info.info({
            "model": self.engine.model_id,
            "device": str(getattr(self.engine, "device", self.settings.device)),
            "version": package_version(),
            "transport": self.settings.transport,
            "engine_version": self.engine.version,
            "spec": self.spec.name,
            "spec_version": self.spec.version,
        })
        # The model, tokenizer and grammar are hundreds of thousands of long-lived objects: a full
        # collection walks them all whenever enough young objects survive (docs/performance.md). Frozen, they are never
        # walked again; the collector only sees what the stream allocates.
        gc.collect()
        gc.freeze()
        self._started.set()
        self._refresh_ready()
        log.info("worker.engine_ready", model=self.engine.model_id, seconds=round(time.perf_counter() - began, 2),
                 cache=self.cache.enabled if self.cache else False)

    def _open_pipeline(self) -> None:
        self.pipeline_engine = self.engine if self.engine is not None else DeferredEngine(self.settings, self.spec)
        client = redis_client(self.settings.redis_url.get_secret_value()) if self.settings.cache_enabled else None
        self.cache = ParseCache(client, spec=self.spec, version=self.pipeline_engine.version,
                                ttl_s=self.settings.cache_ttl_s, prefix=self.settings.cache_prefix)
        self.pipeline = ParsePipeline(self.settings, self.pipeline_engine, self.cache, engine_loaded=self.wait_started,
                                      engine_thread=self.engine_thread)
        self._serving.set()

    async def wait_started(self) -> None:
        """Until the model is loaded and warm."""
        await self._started.wait()

    async def wait_serving(self) -> None:
        """Until batches can be taken: cache open; batches with misses then wait for the model."""
        await self._serving.wait()

    async def process(self, batch: Sequence[InboundMessage]) -> BatchOutcome:
        """Run the core step on one batch; never raises."""
        await self.wait_serving()
        assert self.pipeline is not None
        self.metrics.batches_in_flight.inc()
        try:
            outcome = await self.pipeline.process(batch)
        finally:
            self.metrics.batches_in_flight.dec()
        self.step.observe(outcome.metrics.size, outcome.metrics.cache_misses + outcome.metrics.cache_errors)
        return outcome

    async def begin(self, batch: Sequence[InboundMessage]) -> RunningStep:
        """Run the core step on one batch: with ``continuous_batching``, its hits and dead letters at
        once and its misses as their rows finish; else every output after the misses. Never raises."""
        if not self.settings.continuous_batching:
            return RunningStep(Settled(await self.process(batch), list(batch)))
        await self.wait_serving()
        assert self.pipeline is not None
        step = await self.pipeline.begin(batch)
        self.step.observe(len(batch), len(batch) - len(step.ready.messages))
        return step

    async def needs_model(self, batch: Sequence[InboundMessage]) -> list[bool]:
        """Which messages a step would now hand to the model (``ParsePipeline.needs_model``)."""
        await self.wait_serving()
        assert self.pipeline is not None
        return await self.pipeline.needs_model(batch)

    def record(self, outcome: BatchOutcome) -> None:
        """Count a batch once its outputs are published. Never raises: a delivery calls it between
        the broker's acknowledgement and noting the inputs done, and a metrics bug must not stop that."""
        try:
            self._record(outcome)
        except Exception:
            log.exception("metrics.record_failed")

    def _record(self, outcome: BatchOutcome) -> None:
        self.metrics.observe(outcome)
        self.batches_done += 1
        m = outcome.metrics
        log.debug("batch.done", size=m.size, parsed=m.parsed, cached=m.cached, dead_lettered=m.dead_lettered,
                  unique=m.unique, cache_hits=m.cache_hits, cache_misses=m.cache_misses, cache_errors=m.cache_errors,
                  cache_available=m.cache_available, inference_ms=m.inference_ms, batch_ms=m.batch_ms,
                  tokens_in=m.tokens_in, tokens_out=m.tokens_out)
        self.progress.add(m.size, m.parsed, m.cached, m.dead_lettered)

    def on_failure(self, callback: Callable[[WorkerFailed], None]) -> None:
        """``callback`` stops the worker once ``fail`` is called (each runner's supervisor registers one)."""
        self._on_failure.append(callback)

    def fail(self, stage: str, error: BaseException) -> None:
        """A bug at ``stage`` left inputs unacknowledged: stop the worker, and exit non-zero.

        Without this, the commit position of those inputs' partitions waits for them until a restart,
        while the worker goes on publishing behind them, healthy to every probe. Never raises."""
        if self.failure is None:
            self.failure = WorkerFailed(f"{stage}: {type(error).__name__}: {error}")
            self.failure.__cause__ = error
        log.critical("worker.failed", stage=stage, error=f"{type(error).__name__}: {error}",
                     note="stopping; the inputs not acknowledged are processed again by their next owner")
        failure = self.failure
        callbacks: list[Callable[[], None]] = [self._refresh_ready]
        callbacks += [functools.partial(stop, failure) for stop in self._on_failure]
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("worker.fail_failed")

    def set_transport(self, *, connected: bool | None = None, assigned: set[tuple[str, int]] | None = None) -> None:
        if connected is not None:
            self.transport_connected = connected
        if assigned is not None:
            self.assigned_partitions = assigned
        self._refresh_ready()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        cache_state = self._cache_state()
        checks = {
            "model": "ok" if self.engine_ready else "loading",
            "transport": "ok" if self.transport_connected else "unreachable",
            "partitions": len(self.assigned_partitions),
            "cache": cache_state,
        }
        if self.failure is not None:
            checks["failure"] = str(self.failure)
        # A down Redis only degrades: parsing goes on uncached.
        ready = (self.engine_ready and self.transport_connected and bool(self.assigned_partitions)
                 and self.failure is None)
        return ready, checks

    def _refresh_ready(self) -> None:
        self.metrics.ready.set(1 if self.readiness()[0] else 0)

    def _cache_state(self) -> str:
        """The cache's last known state: degraded from a failed Redis call until one succeeds. While
        degraded, a PING in the background (``ParseCache.probe``: one at a time, once the backoff is
        over) finds Redis back where no traffic does; a later check reports it."""
        cache = self.cache
        if cache is None or not cache.enabled:
            return "disabled"
        if cache.available:
            return "ok"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # off the event loop (a thread): the client belongs to the loop
            return "degraded"
        if self._cache_probe is None or self._cache_probe.done():
            self._cache_probe = loop.create_task(cache.probe())
        return "degraded"

    async def close(self) -> None:
        self.progress.flush()
        if self._cache_probe is not None:
            self._cache_probe.cancel()
        if self.cache is not None:
            await self.cache.close()
        close_engine = getattr(self.engine, "close", None)
        if close_engine is not None:  # the continuous-batching thread
            close_engine()
        self.engine_thread.shutdown(wait=False, cancel_futures=True)
