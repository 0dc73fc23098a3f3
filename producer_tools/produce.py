"""``qustream produce``: put queries (plain lines or JSON lines) on the input topic or stream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from producer_tools.transport import RecordSink


def stable_query_id(source: str, line_number: int) -> str:
    """Same file and line → same id, so replaying a log twice yields the same ids."""
    return hashlib.blake2b(f"{source}:{line_number}".encode(), digest_size=10).hexdigest()


def lines_to_values(lines: Iterable[str], source: str) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) per non-empty line: JSON objects pass through (gaining a query_id), text becomes a query."""
    for number, line in enumerate(lines, start=1):
        text = line.rstrip("\n")
        if not text.strip():
            continue
        query_id = stable_query_id(source, number)
        if text.lstrip()[:1] in ("{", "[", '"'):
            # A JSON line is sent as it is unless it is an object we can give an id: the worker,
            # not this tool, decides what is poison (and dead-letters it with the original bytes).
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                payload = None
            if isinstance(payload, dict):
                payload.setdefault("query_id", query_id)
                yield str(payload["query_id"]).encode(), json.dumps(payload, ensure_ascii=False).encode("utf-8")
            else:
                yield query_id.encode(), text.encode("utf-8")
            continue
        yield query_id.encode(), json.dumps({"query": text, "query_id": query_id}, ensure_ascii=False).encode("utf-8")


class UndecodableLine(ValueError):
    """A line of the input that is not UTF-8; the run stops there, after the lines before it were sent."""

    def __init__(self, source: str, line_number: int, reason: str) -> None:
        super().__init__(source, line_number, reason)
        self.source = source
        self.line_number = line_number
        self.reason = reason
        #: Messages sent and acknowledged before this line; ``produce_lines`` fills it in.
        self.sent = 0

    def __str__(self) -> str:
        return (f"{self.source} line {self.line_number} is not UTF-8 ({self.reason}); stopped there, "
                f"{self.sent} messages before it were sent")


@dataclass(frozen=True)
class Produced:
    sent: int
    interrupted: bool


def open_input(path: str) -> BinaryIO:
    """The input opened now, before any connection is made, so a missing file is reported as such."""
    return sys.stdin.buffer if path == "-" else Path(path).open("rb")


def decoded_lines(raw_lines: Iterable[bytes], source: str) -> Iterator[str]:
    for number, raw in enumerate(raw_lines, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UndecodableLine(source, number, exc.reason) from None


async def produce_lines(
    sink: RecordSink, raw_lines: Iterable[bytes], source: str, stop: asyncio.Event | None = None
) -> Produced:
    """Send every non-empty line to ``sink`` and wait for the acknowledgements; stops early when
    ``stop`` is set, and at a line that is not UTF-8 (raising ``UndecodableLine``)."""
    sent = 0
    try:
        for key, value in lines_to_values(decoded_lines(raw_lines, source), source):
            if stop is not None and stop.is_set():
                break
            await sink.send(key, value)
            sent += 1
    except UndecodableLine as exc:
        await sink.flush()  # so the count it reports is what the broker or Redis holds
        exc.sent = sent
        raise
    await sink.flush()
    return Produced(sent, interrupted=stop is not None and stop.is_set())
