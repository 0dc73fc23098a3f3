"""``qustream worker``: run the configured transport with the shared runtime and web endpoints."""

from __future__ import annotations

import asyncio
import contextlib

import faust
import structlog
from aiohttp import web
from mode import Service

from schemas.events import ParsedEvent
from schemas.settings import Settings
from streams.kafka_app import create_app
from streams.logs import configure_logging
from streams.runtime import WorkerRuntime
from streams.topics import ensure_topics_with_retry
from streams.web import start_web

log = structlog.get_logger(__name__)


class RuntimeService(Service):
    """Starts the web endpoints at once, then loads the model in the background; the agent waits
    for the model, and /ready stays 503 until it is warm and partitions are assigned."""

    def __init__(self, runtime: WorkerRuntime, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.runtime = runtime
        self._web: web.AppRunner | None = None
        self._bridge_client: object | None = None

    async def on_start(self) -> None:
        self._web = await start_web(self.runtime)
        log.info("web.listening", port=self.runtime.settings.web_port)
        self.add_future(self._boot())

    async def _boot(self) -> None:
        await self.runtime.start()
        if self.runtime.settings.transport == "kafka":
            from producer_tools.client import QueryClient

            client = QueryClient(self.runtime.settings)
            await client.start()
            self._bridge_client = client

            async def bridge(query: str, timeout_s: float) -> ParsedEvent:
                return await client.parse(query, timeout=timeout_s)

            self.runtime.bridge = bridge

    async def on_stop(self) -> None:
        if self._bridge_client is not None:
            with contextlib.suppress(Exception):
                await self._bridge_client.stop()  # type: ignore[attr-defined]
        if self._web is not None:
            await self._web.cleanup()
        await self.runtime.close()


def run_worker(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format, settings.log_file)
    log.info("worker.starting", settings=settings.redacted() if settings.log_level.upper() == "DEBUG" else None,
             transport=settings.transport, worker_id=settings.worker_id)
    runtime = WorkerRuntime(settings)
    if settings.transport == "redis":
        from streams.redis_transport import run_redis_worker

        asyncio.run(run_redis_worker(settings, runtime))
        return
    if settings.create_topics:
        asyncio.run(ensure_topics_with_retry(settings))
    app = create_app(settings, runtime)
    worker = faust.Worker(app, RuntimeService(runtime), loglevel=settings.log_level.lower(), override_logging=False,
                          quiet=True)
    worker.execute_from_commandline()
