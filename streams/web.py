"""The worker's HTTP side: health and readiness probes, Prometheus metrics, and the /parse bridge."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError

from streams.query_client import DeadLetteredError
from streams.runtime import WorkerRuntime, package_version

ENDPOINTS = {
    "GET /": "This list",
    "GET /health": "Liveness: the process answers (503 once a bug is stopping it)",
    "GET /ready": "Readiness: model loaded and warmed, transport reachable, partitions assigned (503 otherwise)",
    "GET /metrics": "Prometheus metrics",
    "POST /parse": 'Send {"query": "..."} through the stream and return its parsed event (504 on timeout)',
}


class ParseRequest(BaseModel):
    query: str = Field(min_length=1)
    timeout_s: float | None = Field(None, gt=0, le=300)


def invalid_request(status: int, error_type: str, message: str) -> web.Response:
    """A 4xx in the shape pydantic's validation errors have, so clients read one shape."""
    detail = [{"type": error_type, "loc": [], "msg": message}]
    return web.json_response({"error": "invalid request", "detail": detail}, status=status)


def build_web_app(runtime: WorkerRuntime) -> web.Application:
    async def root(_: web.Request) -> web.Response:
        return web.json_response({"service": "qustream", "version": package_version(), "endpoints": ENDPOINTS})

    async def health(_: web.Request) -> web.Response:
        if runtime.failure is not None:  # stopping after a bug: a hung stop still gets restarted
            return web.json_response({"status": "failed", "error": str(runtime.failure)}, status=503)
        return web.json_response({"status": "ok"})

    async def ready(_: web.Request) -> web.Response:
        is_ready, checks = runtime.readiness()
        return web.json_response({"ready": is_ready, "checks": checks}, status=200 if is_ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(runtime.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def parse(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return invalid_request(400, "unicode_decode", f"the body is not valid UTF-8: {exc}")
        try:
            body = ParseRequest.model_validate_json(raw)
        except ValidationError as exc:
            # Without the input: it is the client's own bytes, and JSON cannot carry all of them.
            detail = json.loads(exc.json(include_url=False, include_input=False))
            return web.json_response({"error": "invalid request", "detail": detail}, status=422)
        if runtime.bridge is None:
            return web.json_response({"error": "the stream bridge is not running",
                                      "detail": "the worker is still loading its model, or cannot reach the broker "
                                                "or Redis; GET /ready says which"}, status=503)
        timeout = body.timeout_s or runtime.settings.parse_timeout_s
        try:
            event = await runtime.bridge(body.query, timeout)
        except TimeoutError:
            return web.json_response({"error": f"no parse within {timeout} s",
                                      "detail": "the query was sent and may still be parsed: its parse then "
                                                "arrives on the parsed topic; raise timeout_s to wait longer"},
                                     status=504)
        except DeadLetteredError as exc:
            return web.json_response({"error": "dead-lettered", "stage": exc.reason.stage,
                                      "class": exc.reason.error_class, "detail": exc.reason.message}, status=422)
        except asyncio.CancelledError:
            raise
        return web.json_response(json.loads(event.model_dump_json()))

    app = web.Application(client_max_size=1_048_576)
    app.add_routes([
        web.get("/", root),
        web.get("/health", health),
        web.get("/ready", ready),
        web.get("/metrics", metrics),
        web.post("/parse", parse),
    ])
    return app


async def start_web(runtime: WorkerRuntime) -> web.AppRunner:
    runner = web.AppRunner(build_web_app(runtime), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, runtime.settings.web_host, runtime.settings.web_port).start()
    return runner


def listening_ports(runner: web.AppRunner) -> list[int]:
    """The ports the endpoints listen on: the one chosen where ``QUSTREAM_WEB_PORT`` is 0 (any free port)."""
    return sorted({address[1] for address in runner.addresses if isinstance(address, tuple)})
