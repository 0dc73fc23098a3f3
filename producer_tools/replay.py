"""``qustream replay``: historical query logs back into the input topic/stream.

Logs are JSON lines, CSV, TSV or plain text (one query per line), optionally gzip-compressed.
Three pacing modes: as fast as possible, a fixed rate, or the log's own timing scaled by a speed
factor. Every record keeps its original event time (``ts`` field and the Kafka/Redis timestamp) and
gets a stable ``query_id`` (the log's own, or one derived from file name + line number), so a replay
run twice produces the same ids. Bad lines are counted, reported by line number and skipped.

Progress is checkpointed (after the sink acknowledged everything read so far) so ``--resume`` goes on
where an interrupted run stopped without sending a line twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from producer_tools.produce import stable_query_id
from producer_tools.transport import RecordSink

LogFormat = Literal["auto", "jsonl", "csv", "tsv", "text"]
#: Bad lines listed one by one in the summary; the rest are only counted.
MAX_REPORTED_BAD = 20
CHECKPOINT_INTERVAL_S = 1.0


class BadLine(ValueError):
    pass


@dataclass(frozen=True)
class LogEntry:
    file: str
    line: int
    query_id: str
    query: str
    ts_ms: int | None
    payload: dict[str, Any]
    #: The line as written (a JSON object, or CSV/TSV cells by column; an empty cell is None), before the
    #: reader takes its query, id and time out of it and adds defaults: what ``qustream label`` reads labels from.
    row: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def value(self) -> bytes:
        return json.dumps(self.payload, ensure_ascii=False).encode("utf-8")


@dataclass
class ReplayOptions:
    format: LogFormat = "auto"
    query_field: str = "query"
    id_field: str | None = None  # None: "query_id", else "id", when the log has one
    ts_field: str | None = None  # None: "ts", else "timestamp", when the log has one
    header: bool = True
    rate: float | None = None
    speed: float | None = None
    skip: int = 0
    resume: bool = False
    checkpoint: Path | None = None
    source: str | None = None
    stop: asyncio.Event | None = None  # set it to stop cleanly (SIGINT/SIGTERM)


@dataclass
class ReplaySummary:
    files: list[str]
    lines: int = 0
    produced: int = 0
    bad: int = 0
    bad_samples: list[tuple[str, int, str]] = field(default_factory=list)
    skipped: int = 0
    elapsed_s: float = 0.0
    first_event: datetime | None = None
    last_event: datetime | None = None
    interrupted: bool = False
    checkpoint: str | None = None
    mode: str = "fast"

    @property
    def rate(self) -> float:
        return self.produced / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "mode": self.mode,
            "lines": self.lines,
            "produced": self.produced,
            "bad": self.bad,
            "skipped": self.skipped,
            "seconds": round(self.elapsed_s, 3),
            "rate": round(self.rate, 1),
            "first_event": self.first_event.isoformat() if self.first_event else None,
            "last_event": self.last_event.isoformat() if self.last_event else None,
            "interrupted": self.interrupted,
            "checkpoint": self.checkpoint,
            "bad_lines": [{"file": f, "line": n, "reason": r} for f, n, r in self.bad_samples],
        }


# --- reading logs -----------------------------------------------------------------------------


def detect_format(path: str) -> LogFormat:
    name = path.lower().removesuffix(".gz").removesuffix(".gzip")
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".tsv", ".tab")):
        return "tsv"
    return "text"


def raw_lines(path: str) -> Iterator[bytes]:
    """Lines as bytes; gzip is recognised by its magic bytes, whatever the file is called."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    opener: Any = gzip.open if magic == b"\x1f\x8b" else open
    with opener(path, "rb") as handle:
        yield from handle


def count_lines(path: str) -> int:
    return sum(1 for _ in raw_lines(path))


def parse_time(raw: Any) -> int:
    """Event time → epoch ms: ISO 8601 (naive = UTC), or epoch seconds / milliseconds."""
    if isinstance(raw, bool) or raw is None:
        raise BadLine(f"timestamp {raw!r} is not a time")
    if isinstance(raw, int | float):
        number = float(raw)
    else:
        text = str(raw).strip()
        try:
            number = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise BadLine(f"timestamp {text[:40]!r} is neither ISO 8601 nor epoch") from None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return int(moment.timestamp() * 1000)
    # Epoch seconds until the year 5138; beyond that the number must be milliseconds.
    return int(number if number > 1e11 else number * 1000)


def _pick(row: dict[str, Any], wanted: str | None, defaults: Sequence[str]) -> tuple[str | None, Any]:
    for name in ([wanted] if wanted else list(defaults)):
        if name in row and row[name] not in (None, ""):
            return name, row[name]
    return None, None


class LogReader:
    """Turns the lines of one log into ``LogEntry``s or ``BadLine``s; header handling for CSV/TSV."""

    def __init__(self, path: str, options: ReplayOptions) -> None:
        self.path = path
        self.options = options
        self.format: LogFormat = options.format if options.format != "auto" else detect_format(path)
        self.columns: list[str] | None = None
        self.name = options.source or Path(path).name

    @property
    def own_keys(self) -> frozenset[str]:
        """The keys this reader reads as the log's own metadata (query, ids, times, locale, source)."""
        query_name = self.options.query_field if self.format != "text" else "query"
        chosen = {name for name in (self.options.id_field, self.options.ts_field) if name}
        return frozenset({query_name, "query", "query_id", "id", "ts", "timestamp", "locale", "source", *chosen})

    def entry(self, number: int, raw: bytes) -> LogEntry | None:
        """None for blank lines and the CSV/TSV header; raises ``BadLine`` for bad ones."""
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise BadLine(f"not UTF-8: {exc.reason}") from None
        if number == 1:
            text = text.removeprefix("\ufeff")  # a byte order mark, as spreadsheets write "CSV UTF-8"
        if not text.strip():
            return None
        row: dict[str, Any]
        if self.format == "jsonl":
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise BadLine(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
            if not isinstance(parsed, dict):
                raise BadLine(f"JSON {type(parsed).__name__}, not an object")
            row = parsed
        elif self.format in ("csv", "tsv"):
            cells = next(csv.reader([text], delimiter="," if self.format == "csv" else "\t"))
            if self.columns is None:
                if self.options.header:
                    self.columns = [cell.strip() for cell in cells]
                    return None
                self.columns = [str(index) for index in range(len(cells))]
            if len(cells) != len(self.columns):
                raise BadLine(f"{len(cells)} columns, the header has {len(self.columns)}")
            row = dict(zip(self.columns, cells, strict=True))
        else:
            row = {"query": text}
        query_name = self.options.query_field if self.format != "text" else "query"
        if query_name not in row or row[query_name] is None:
            raise BadLine(f"no {query_name!r} field")
        query = row[query_name]
        if not isinstance(query, str):
            raise BadLine(f"query is a {type(query).__name__}, not text")
        if not query.strip():
            raise BadLine("query is empty")
        id_name, raw_id = _pick(row, self.options.id_field, ["query_id", "id"])
        query_id = str(raw_id) if id_name else stable_query_id(self.name, number)
        ts_name, raw_ts = _pick(row, self.options.ts_field, ["ts", "timestamp"])
        ts_ms = parse_time(raw_ts) if ts_name else None
        if self.format == "jsonl":
            payload = {key: value for key, value in row.items() if key not in (query_name, id_name, ts_name)}
        else:
            payload = {key: row[key] for key in ("locale", "source") if row.get(key)}
        payload["query"] = query
        payload["query_id"] = query_id
        if ts_ms is not None:
            payload["ts"] = datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat()
        payload.setdefault("source", f"replay:{self.name}")
        as_written = row if self.format == "jsonl" else {
            key: None if isinstance(value, str) and not value.strip() else value for key, value in row.items()}
        return LogEntry(self.name, number, query_id, query, ts_ms, payload, as_written)


# --- checkpoint -------------------------------------------------------------------------------


def _absolute(files: Sequence[str]) -> dict[str, str]:
    """Checkpoint keys: absolute paths, so a resume from another folder finds its files."""
    return {path: os.path.abspath(path) for path in files}


def default_checkpoint(files: Sequence[str]) -> Path:
    digest = hashlib.blake2b("\0".join(os.path.abspath(f) for f in files).encode(), digest_size=5).hexdigest()
    return Path(f".qustream-replay-{digest}.json")


def load_checkpoint(path: Path) -> dict[str, int]:
    """{absolute file path: last line number whose record the broker acknowledged}."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: int(line) for name, line in data.get("files", {}).items()}


def save_checkpoint(path: Path, done: dict[str, int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": done, "saved": datetime.now(UTC).isoformat()}),
                   encoding="utf-8")
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


# --- the replay loop --------------------------------------------------------------------------


class Pacer:
    """When each record is due: now (fast), i / rate, or the log's time offset / speed."""

    def __init__(self, rate: float | None, speed: float | None) -> None:
        self.rate = rate
        self.speed = speed
        self.started = time.perf_counter()
        self.sent = 0
        self.first_ts: int | None = None

    def due(self, ts_ms: int | None) -> float:
        if self.rate:
            return self.started + self.sent / self.rate
        if self.speed:
            if ts_ms is None:
                return 0.0  # no time of its own: goes out right after the previous record
            if self.first_ts is None:
                self.first_ts = ts_ms
            return self.started + (ts_ms - self.first_ts) / 1000 / self.speed
        return 0.0


async def replay(
    sink: RecordSink,
    files: Sequence[str],
    options: ReplayOptions,
    progress: Any | None = None,
) -> ReplaySummary:
    """Send every good line of ``files`` to ``sink``; ``progress`` is an optional callback(advance, total)."""
    if options.rate and options.speed:
        raise ValueError("--rate and --speed exclude each other")
    summary = ReplaySummary(files=list(files))
    summary.mode = f"rate {options.rate:g}/s" if options.rate else f"speed x{options.speed:g}" if options.speed \
        else "as fast as possible"
    checkpoint_path = options.checkpoint or default_checkpoint(files)
    summary.checkpoint = str(checkpoint_path)
    done = load_checkpoint(checkpoint_path) if options.resume else {}
    if not options.resume and checkpoint_path.exists():
        checkpoint_path.unlink()  # a fresh run must not leave an older run's position behind
    pacer = Pacer(options.rate, options.speed)
    to_skip = options.skip
    last_save = time.monotonic()
    read_upto: dict[str, int] = dict(done)
    started = time.perf_counter()

    async def checkpoint_now() -> None:
        await sink.flush()  # only lines the broker acknowledged may count as done
        save_checkpoint(checkpoint_path, read_upto)

    keys = _absolute(files)
    try:
        for path in files:
            key = keys[path]
            reader = LogReader(path, options)
            resume_after = done.get(key, 0)
            for number, raw in enumerate(raw_lines(path), start=1):
                if options.stop is not None and options.stop.is_set():
                    summary.interrupted = True
                    break
                if progress is not None:
                    progress(1)
                if number <= resume_after or to_skip > 0:
                    if number > resume_after:
                        to_skip -= 1
                        read_upto[key] = number
                    summary.skipped += 1
                    if reader.format in ("csv", "tsv") and reader.columns is None:
                        reader.entry(number, raw)  # still learn the header of a skipped or resumed CSV/TSV
                    continue
                summary.lines += 1
                try:
                    entry = reader.entry(number, raw)
                except BadLine as exc:
                    summary.bad += 1
                    if len(summary.bad_samples) < MAX_REPORTED_BAD:
                        summary.bad_samples.append((reader.name, number, str(exc)))
                    read_upto[key] = number
                    continue
                if entry is None:
                    read_upto[key] = number
                    continue
                due = pacer.due(entry.ts_ms)
                wait = due - time.perf_counter()
                if wait > 0.002:
                    await sink.push()
                    await _sleep_or_stop(wait, options.stop)
                    if options.stop is not None and options.stop.is_set():
                        summary.lines -= 1  # not sent: the resumed run reads it again
                        summary.interrupted = True
                        break
                await sink.send(entry.query_id.encode(), entry.value(), None, entry.ts_ms)
                read_upto[key] = number
                pacer.sent += 1
                summary.produced += 1
                if entry.ts_ms is not None:
                    moment = datetime.fromtimestamp(entry.ts_ms / 1000, tz=UTC)
                    summary.first_event = min(summary.first_event or moment, moment)
                    summary.last_event = max(summary.last_event or moment, moment)
                if time.monotonic() - last_save >= CHECKPOINT_INTERVAL_S:
                    await checkpoint_now()
                    last_save = time.monotonic()
            if summary.interrupted:
                break
        await checkpoint_now()
    finally:
        summary.elapsed_s = time.perf_counter() - started
    return summary


async def _sleep_or_stop(seconds: float, stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
