"""A broker that refuses a setting the worker needs stops it at start, naming the setting (tansu has
no InitProducerId, so it refuses idempotent producers)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas.settings import Settings
from streams.broker_checks import BrokerRefusedSetting, check_broker_accepts_settings
from tests.support import WorkerProcess


async def test_idempotent_producers_on_tansu_are_refused_by_name(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(BrokerRefusedSetting) as refused:
        await check_broker_accepts_settings(make_settings(producer_idempotence=True))
    assert refused.value.change == "QUSTREAM_PRODUCER_IDEMPOTENCE=false"
    assert "idempotent producers" in str(refused.value) and "UnknownError" in str(refused.value)


async def test_settings_the_broker_accepts_pass(make_settings: Callable[..., Settings]) -> None:
    await check_broker_accepts_settings(make_settings(producer_idempotence=False))


def test_worker_stops_at_start_naming_the_setting(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    worker = WorkerProcess(make_settings(producer_idempotence=True), tmp_path / "worker.log")
    try:
        status = worker.process.wait(120)
    except subprocess.TimeoutExpired:
        worker.stop()
        raise AssertionError(f"the worker kept running; log:\n{worker.log_tail()}") from None
    finally:
        worker.stop()
    assert status == 2, worker.log_tail()
    assert "set QUSTREAM_PRODUCER_IDEMPOTENCE=false" in worker.log_tail()
