"""Shared fixtures: a real tansu broker, the real Redis, unique topics per test, the default model."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.settings import Settings
from streams.local_stack import StartedProcess, free_port, port_open, redis_command, spawn, stop_process, tansu_command

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def isolated_settings(broker: str, redis_url: str, **overrides: Any) -> Settings:
    """Settings with topics, group, cache prefix and web port of their own, so tests never collide."""
    run = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "kafka_bootstrap": broker,
        "redis_url": redis_url,
        "topic_input": f"t{run}.raw",
        "topic_parsed": f"t{run}.parsed",
        "topic_metrics": f"t{run}.metrics",
        "topic_dlq": f"t{run}.dlq",
        "stream_input": f"t{run}:raw",
        "stream_parsed": f"t{run}:parsed",
        "stream_metrics": f"t{run}:metrics",
        "stream_dlq": f"t{run}:dlq",
        "app_id": f"qustream-test-{run}",
        "cache_prefix": f"qustream-test:{run}",
        "worker_id": f"test-{run}",
        "partitions": 2,
        "producer_idempotence": False,  # tansu has no InitProducerId
        "broker_session_timeout_s": 6.0,  # tansu holds group joins for session_timeout / 2
        "broker_heartbeat_s": 1.0,
        "batch_linger_ms": 100,
        "web_port": free_port(),
        "log_level": "INFO",
        "log_format": "json",
    }
    values.update(overrides)
    return Settings(**values)


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
