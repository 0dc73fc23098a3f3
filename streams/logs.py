"""structlog set-up: JSON for machines, console for people; stdlib loggers (Faust, aiokafka) too.

structlog is used because it renders the same key/value events as JSON or as readable console
lines from one configuration, and carries context (batch ids, offsets) without string formatting.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import structlog

#: Loggers whose repeated records are rate-limited (``RepeatLimiter``): the Kafka clients log a
#: record per failed connection attempt, many a second while a broker is down.
RATE_LIMITED = ("aiokafka", "kafka")
REPEAT_WINDOW_S = 30.0


class RepeatLimiter(logging.Filter):
    """Passes the first record of each (logger, level, message template) from ``loggers``, then no
    other within ``window_s``; the first one after that says how many were suppressed in between.
    Records with another template (or from another logger) are never held back by these.

    One instance on every handler: a record is decided once, and each handler gets the same answer.
    """

    def __init__(self, loggers: tuple[str, ...] = RATE_LIMITED, window_s: float = REPEAT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1000) -> None:
        super().__init__()
        self.loggers = tuple(loggers)
        self._children = tuple(f"{name}." for name in loggers)
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        #: (logger, level, template) → (when last passed, records suppressed since)
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        decided: bool | None = getattr(record, "_qustream_repeat", None)
        if decided is not None:
            return decided
        passed = self._decide(record)
        record._qustream_repeat = passed
        return passed

    def _decide(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name not in self.loggers and not name.startswith(self._children):
            return True
        key = (name, record.levelno, str(record.msg))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.window_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if len(self._seen) >= self.max_keys:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
            if len(self._seen) >= self.max_keys:
                self._seen.clear()
        self._seen[key] = (now, 0)
        if last is not None and last[1]:
            record.msg = (f"{record.getMessage()} [{last[1]} more like this suppressed in the last "
                          f"{now - last[0]:.0f} s]")
            record.args = None
        return True


def configure_logging(level: str = "INFO", fmt: str = "console", log_file: Path | None = None) -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        # filter_by_level first: a disabled level (per-batch DEBUG lines) costs one check, not the chain.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.format_exc_info,
                    renderer],
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    root = logging.getLogger()
    root.handlers.clear()
    repeats = RepeatLimiter()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(repeats)
        root.addHandler(handler)
    root.setLevel(level.upper())
    # Client libraries are chatty at INFO about every rebalance step.
    for noisy in ("aiokafka", "kafka", "faust", "mode", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def exit_without_teardown(code: int) -> NoReturn:
    """End the worker process once it has stopped, skipping the interpreter's teardown.

    Why: by then every client is closed and every commit made, and the teardown only has compiled
    extensions report what they still hold (triton, which torch imports, prints dozens of nanobind
    "leaked" lines), which an operator would read as a fault.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
