"""Shared fixtures: a real tansu broker, the real Redis, unique topics per test, the default model."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from bench.stack import isolated_settings
from schemas.settings import Settings
from streams.local_stack import (
    StartedProcess,
    free_port,
    port_open,
    redis_command,
    spawn,
    stop_process,
    tansu_command,
)

__all__ = ["isolated_settings"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def logging_as_it_was() -> Iterator[None]:
    """Logging as it was before the test, after it: a command run in-process (typer's CliRunner)
    configures logging for the whole process, with a handler on the runner's stderr (closed when the
    command returns) and structlog loggers cached on their first use. Left in place, it would decide
    what later tests see of their logs (``structlog.testing.capture_logs``), by the order they run in."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configured = structlog.get_config() if structlog.is_configured() else None
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    if configured is None:
        structlog.reset_defaults()
    else:
        structlog.configure(**configured)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tansu broker (memory storage) on a free port for this test session."""
    port = free_port()
    process = spawn("tansu", tansu_command(port), port, tmp_path_factory.mktemp("tansu"))
    yield f"127.0.0.1:{port}"
    stop_process(process)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Redis on 6379 (database 9), or a redis-server started on a free port."""
    started: StartedProcess | None = None
    if port_open("127.0.0.1", 6379):
        url = "redis://127.0.0.1:6379/9"
    else:
        port = free_port()
        started = spawn("redis", redis_command(port), port, tmp_path_factory.mktemp("redis"))
        url = f"redis://127.0.0.1:{port}/9"
    yield url
    if started is not None:
        stop_process(started)


@pytest.fixture
def make_settings(broker: str, redis_url: str) -> Callable[..., Settings]:
    def factory(**overrides: Any) -> Settings:
        return isolated_settings(broker, redis_url, **overrides)

    return factory


@pytest.fixture(scope="session")
def default_engine() -> Any:
    """The default model's engine, built once (model conversion happens in `qustream model prepare`)."""
    from workers.engine import build_engine

    engine = build_engine(Settings())
    engine.warm_up()
    return engine


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path
