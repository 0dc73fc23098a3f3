"""``qustream worker``: run the configured transport with the shared runtime and web endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from mode import Service

from schemas.events import ParsedEvent
from schemas.settings import Settings
from streams.broker_checks import check_broker_accepts_settings
from streams.logs import configure_logging
from streams.runtime import WorkerRuntime
from streams.topics import ensure_topics_with_retry
from streams.web import listening_ports, start_web
from workers.memory import return_freed_tensors_to_the_os

log = structlog.get_logger(__name__)


class BridgeClient(Protocol):
    """What the ``POST /parse`` bridge needs of a transport's query client."""

    async def __aenter__(self) -> Any: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def parse(self, query: str, *, timeout: float = 30.0) -> ParsedEvent: ...  # noqa: ASYNC109


#: Runs a transport's consumer until ``stop`` is set; ``boot`` is the model-loading task.
Consume = Callable[[asyncio.Event, "asyncio.Task[None]"], Awaitable[None]]


async def serve(settings: Settings, runtime: WorkerRuntime, consume: Consume, bridge_client: BridgeClient) -> None:
    """Web endpoints at once, the model loading in the background, the consumer until SIGTERM/SIGINT
    (it finishes its in-flight batch first). A model that fails to load stops the worker with that error;
    a bug that fails the runtime (``WorkerRuntime.fail``) stops it with ``WorkerFailed``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, stop, sig, settings.stop_grace_s)
    web = await start_web(runtime)
    log.info("web.listening", ports=listening_ports(web))
    boot = asyncio.create_task(runtime.start(), name="runtime-start")

    def stop_if_boot_failed(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("worker.boot_failed", error=repr(task.exception()))
            stop.set()

    boot.add_done_callback(stop_if_boot_failed)
    runtime.on_failure(lambda _: stop.set())
    bridge = asyncio.create_task(_open_bridge(runtime, boot, bridge_client), name="parse-bridge")
    try:
        await consume(stop, boot)
    finally:
        runtime.bridge = None
        for task in (bridge, boot):
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Closed whether or not it opened: its clients exist from construction, and a worker whose
        # model failed to load never opened it.
        with contextlib.suppress(Exception):
            await bridge_client.__aexit__(None, None, None)
        await web.cleanup()
        await runtime.close()
        log.info("worker.stopped", worker_id=settings.worker_id)
    if runtime.failure is not None:
        raise runtime.failure
    if not boot.cancelled() and boot.exception() is not None:
        raise boot.exception()  # type: ignore[misc]


async def _open_bridge(runtime: WorkerRuntime, boot: asyncio.Task[None], client: BridgeClient) -> bool:
    """``POST /parse`` once the model is warm; a bridge that cannot connect only disables itself."""
    await asyncio.shield(boot)
    try:
        await client.__aenter__()
    except Exception as exc:
        log.warning("bridge.unavailable", error=f"{type(exc).__name__}: {exc}")
        return False

    async def bridge(query: str, timeout_s: float) -> ParsedEvent:
        return await client.parse(query, timeout=timeout_s)

    runtime.bridge = bridge
    return True


def _on_signal(stop: asyncio.Event, sig: signal.Signals, grace_s: float) -> None:
    if not stop.is_set():
        log.info("worker.stopping", signal=sig.name, grace_s=grace_s,
                 note="finishing the in-flight batches for up to grace_s (QUSTREAM_STOP_GRACE_S)")
    stop.set()


async def run_redis_worker(settings: Settings, runtime: WorkerRuntime) -> None:
    """``QUSTREAM_TRANSPORT=redis``: the Redis Streams consumer (``streams.redis_transport``)."""
    from streams.query_client import RedisQueryClient
    from streams.redis_transport import RedisStreamConsumer, transport_client

    client = transport_client(settings)

    async def consume(stop: asyncio.Event, boot: asyncio.Task[None]) -> None:
        await RedisStreamConsumer(settings, runtime, client, stop, boot).run()

    try:
        await serve(settings, runtime, consume, RedisQueryClient(settings))
    finally:
        await client.aclose()


async def run_kafka_worker(settings: Settings, runtime: WorkerRuntime) -> None:
    """The default Kafka runner (``streams.kafka_runner``)."""
    from streams.kafka_runner import KafkaBatchRunner
    from streams.query_client import QueryClient

    async def consume(stop: asyncio.Event, boot: asyncio.Task[None]) -> None:
        await KafkaBatchRunner(settings, runtime, stop).run()

    await serve(settings, runtime, consume, QueryClient(settings))


class RuntimeService(Service):
    """The Faust runner's companion: starts the web endpoints at once, then loads the model in the
    background; the agent waits for the model, and /ready stays 503 until it is warm and partitions
    are assigned."""

    def __init__(self, runtime: WorkerRuntime, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.runtime = runtime
        self._web: Any = None
        self._bridge_client: Any = None

    async def on_start(self) -> None:
        self._web = await start_web(self.runtime)
        log.info("web.listening", ports=listening_ports(self._web))
        self.add_future(self._boot())

    async def _boot(self) -> None:
        await self.runtime.start()
        from streams.query_client import QueryClient

        client = QueryClient(self.runtime.settings)
        self._bridge_client = client
        try:
            await client.start()
        except Exception as exc:  # as in ``_open_bridge``: a bridge that cannot connect only disables itself
            log.warning("bridge.unavailable", error=f"{type(exc).__name__}: {exc}")
            return

        async def bridge(query: str, timeout_s: float) -> ParsedEvent:
            return await client.parse(query, timeout=timeout_s)

        self.runtime.bridge = bridge

    async def on_stop(self) -> None:
        if self._bridge_client is not None:
            with contextlib.suppress(Exception):
                await self._bridge_client.stop()
        if self._web is not None:
            await self._web.cleanup()
        await self.runtime.close()


def run_faust_worker(settings: Settings, runtime: WorkerRuntime) -> None:
    from streams.faust_runner import STOP_BOUND_MARGIN_S, BoundedStopWorker, create_app

    app = create_app(settings, runtime)
    worker = BoundedStopWorker(app, RuntimeService(runtime), stop_bound_s=settings.stop_grace_s + STOP_BOUND_MARGIN_S,
                               loglevel=settings.log_level.lower(), override_logging=False, quiet=True)
    worker.execute_from_commandline()


def run_worker(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format, settings.log_file)
    return_freed_tensors_to_the_os()
    details: dict[str, Any] = {"settings": settings.redacted()} if settings.log_level.upper() == "DEBUG" else {}
    if settings.transport == "kafka":
        details["kafka_runner"] = settings.kafka_runner
    log.info("worker.starting", transport=settings.transport, worker_id=settings.worker_id, **details)
    runtime = WorkerRuntime(settings)
    if settings.transport == "redis":
        asyncio.run(run_redis_worker(settings, runtime))
        return
    if settings.create_topics:
        asyncio.run(ensure_topics_with_retry(settings))
    asyncio.run(check_broker_accepts_settings(settings))
    if settings.kafka_runner == "faust":
        run_faust_worker(settings, runtime)
    else:
        asyncio.run(run_kafka_worker(settings, runtime))
