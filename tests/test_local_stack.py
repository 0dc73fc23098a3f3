"""`qustream local up|down`: starts only what does not answer, stops only what it started."""

from __future__ import annotations

from pathlib import Path

from schemas.settings import Settings
from streams.local_stack import LocalStack, free_port, port_open, redis_command, spawn, stop_process


def test_up_starts_missing_services_and_down_stops_only_those(tmp_path: Path) -> None:
    kafka_port, redis_port = free_port(), free_port()
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{kafka_port}", redis_url=f"redis://127.0.0.1:{redis_port}/0",
                        model_cache_dir=tmp_path)
    stack = LocalStack(settings)
    started = stack.up()
    try:
        assert sorted(p.name for p in started) == ["redis", "tansu"]
        assert port_open("127.0.0.1", kafka_port) and port_open("127.0.0.1", redis_port)
        assert stack.serves_kafka_with_tansu()
        assert stack.up() == [], "a second up starts nothing: both answer"
    finally:
        stopped = stack.down()
    assert sorted(p.name for p in stopped) == ["redis", "tansu"]
    assert not port_open("127.0.0.1", kafka_port) and not port_open("127.0.0.1", redis_port)


def test_down_never_stops_a_server_it_did_not_start(tmp_path: Path) -> None:
    port = free_port()
    foreign = spawn("redis", redis_command(port), port, tmp_path / "foreign")
    try:
        stack = LocalStack(Settings(transport="redis", redis_url=f"redis://127.0.0.1:{port}/0",
                                    model_cache_dir=tmp_path))
        assert stack.up() == []
        assert stack.down() == []
        assert port_open("127.0.0.1", port)
    finally:
        stop_process(foreign)
