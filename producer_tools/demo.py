"""``qustream demo``: the whole path on embedded defaults, then a summary, then stop what it started."""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from rich.console import Console

from schemas.settings import Settings
from streams.local_stack import LocalStack, WorkerProcess, free_port, port_open

log = structlog.get_logger(__name__)
console = Console(stderr=True)

SAMPLE_DIR = Path(__file__).with_name("data")


def sample_queries(spec_ref: str, spec_name: str) -> Path | None:
    """The bundled sample log of a built-in spec (``spec_ref`` names a file of ``schemas/specs``), found by
    the spec's ``name`` (``ecommerce_few_shot`` is the ``ecommerce`` contract and replays its sample); None
    for any other spec: another domain's queries through a user's own spec would give nonsense rows."""
    from schemas.spec import BUILTIN_SPEC_DIR, SpecError, resolve_spec_path

    try:
        spec_path = resolve_spec_path(spec_ref)
    except SpecError:
        return None
    if spec_path.resolve().parent != BUILTIN_SPEC_DIR.resolve():
        return None
    path = SAMPLE_DIR / f"sample_queries_{spec_name}.jsonl"
    return path if path.is_file() else None


class NoSampleQueries(ValueError):
    """The demo was given no query log and the spec has no bundled sample."""


def no_sample_message(spec_ref: str, spec_name: str) -> str:
    return (f"parse spec {spec_name!r} ({spec_ref}) has no bundled sample queries (only the built-in specs "
            "have one); replay your own: qustream demo --spec SPEC --queries FILE (plain lines or JSON lines)")


@dataclass
class DemoSummary:
    figures: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)
    ok: bool = True


def demo_lines(path: Path, run_id: str) -> list[str]:
    """The log's lines with run-unique query ids, so results of earlier runs are never counted."""
    lines = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        query_id = f"demo-{run_id}-{number}"
        try:
            payload = json.loads(line)
        except json.JSONDecodeError:
            lines.append(line)  # poison on purpose: the worker dead-letters it
            continue
        if isinstance(payload, dict):
            payload["query_id"] = query_id
            lines.append(json.dumps(payload, ensure_ascii=False))
        else:
            lines.append(line)
    return lines


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(settings: Settings, queries: Path | None, timeout_s: float) -> DemoSummary:
    """Start what is missing, replay ``queries`` (default: the spec's bundled sample), collect, stop.

    Raises ``NoSampleQueries`` before starting anything when ``queries`` is None and the spec has no sample."""
    from schemas.spec import load_spec
    from workers.model import DEFAULT_MODEL, resolve_model_path

    if queries is None:
        spec_name = load_spec(settings.parse_spec).name
        queries = sample_queries(settings.parse_spec, spec_name)
        if queries is None:
            raise NoSampleQueries(no_sample_message(settings.parse_spec, spec_name))
    stack = LocalStack(settings)
    started = stack.up()
    for process in started:
        console.print(f"started local {process.name} on port {process.port} (pid {process.pid})")
    if stack.serves_kafka_with_tansu():
        settings = settings.model_copy(update={"producer_idempotence": False})  # tansu has no InitProducerId
    if port_open("127.0.0.1", settings.web_port):
        settings = settings.model_copy(update={"web_port": free_port()})
    # SIGTERM (e.g. from a CI timeout) must still run the clean-up below.
    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    worker: WorkerProcess | None = None
    log_path = settings.model_cache_dir / "local" / "demo-worker.log"
    try:
        if settings.model == DEFAULT_MODEL:
            console.print("preparing the model (first run converts it once, ~30 s)…")
        resolve_model_path(settings)
        if settings.transport == "kafka":
            from streams.topics import ensure_topics

            asyncio.run(ensure_topics(settings))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
        worker = WorkerProcess(settings, log_path)
        console.print(f"worker started (log: {log_path}); waiting for /ready…")
        worker.wait_ready(timeout_s=300)
        lines = demo_lines(queries, uuid.uuid4().hex[:8])
        return asyncio.run(_replay_and_collect(settings, lines, timeout_s))
    finally:
        if worker is not None:
            worker.stop()
        for process in stack.down(only=started):
            console.print(f"stopped local {process.name} (pid {process.pid})")
        signal.signal(signal.SIGTERM, previous_handler)


async def _replay_and_collect(settings: Settings, lines: list[str], timeout_s: float) -> DemoSummary:
    from producer_tools.transport import open_sink, open_source

    outputs = [settings.topic_parsed, settings.topic_dlq] if settings.transport == "kafka" else [
        settings.stream_parsed, settings.stream_dlq]
    async with open_source(settings, outputs, from_end=True) as source:
        started = time.perf_counter()
        sent: set[bytes] = set()
        async with open_sink(settings) as sink:
            from producer_tools.produce import lines_to_values

            for key, value in lines_to_values(lines, source=f"demo-{uuid.uuid4().hex}"):
                await sink.send(key, value)
                sent.add(key)
        console.print(f"replayed {len(lines)} messages; waiting for results…")
        parsed: list[dict[str, Any]] = []
        dead: list[dict[str, str]] = []
        deadline = time.monotonic() + timeout_s
        while len(parsed) + len(dead) < len(lines) and time.monotonic() < deadline:
            for record in await source.poll(timeout_ms=500):
                if record.key not in sent:
                    continue  # an earlier run's output (the end offset can read low on tansu)
                if record.topic in (settings.topic_parsed, settings.stream_parsed):
                    parsed.append(json.loads(record.value or b"{}"))
                else:
                    dead.append({name: raw.decode("utf-8", "replace") for name, raw in record.headers.items()})
        elapsed = time.perf_counter() - started
    latencies = sorted(
        (datetime.fromisoformat(e["parsed_ts"]) - datetime.fromisoformat(e["event_ts"])).total_seconds() * 1000
        for e in parsed if e.get("event_ts")
    )
    cached = sum(1 for e in parsed if e["cached"])
    figures: dict[str, Any] = {
        "messages": len(lines),
        "parsed": len(parsed),
        "cached": cached,
        "dead-lettered": len(dead),
        "queries/s": round((len(parsed) + len(dead)) / elapsed, 1) if elapsed else 0,
        "cache hit rate": f"{cached / len(parsed):.0%}" if parsed else "n/a",
        "p50 latency ms": round(statistics.median(latencies)) if latencies else "n/a",
        "p95 latency ms": round(latencies[int(0.95 * (len(latencies) - 1))]) if latencies else "n/a",
        "seconds": round(elapsed, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    seen: set[str] = set()
    samples: list[dict[str, Any]] = []
    for event in parsed:
        if event["normalized_query"] in seen or len(samples) >= 12:
            continue
        seen.add(event["normalized_query"])
        samples.append({"query": event["query"], "parse": event["parse"], "cached": event["cached"]})
    return DemoSummary(figures, samples, ok=len(parsed) + len(dead) == len(lines))
