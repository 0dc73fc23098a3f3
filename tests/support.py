"""Test helpers: real local services, a worker in a subprocess, and topic readers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from schemas.settings import Settings
from streams.kafka_io import assign_all, make_consumer

REPO = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """``qustream worker`` in a subprocess, as production runs it."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log_path = log_path
        env = {**os.environ, **settings.to_env(), **(extra_env or {})}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"], cwd=REPO, env=env, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.web_port}"

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}; log:\n{self.log_tail()}")
            try:
                status, _ = self.get("/ready", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"worker not ready after {timeout_s} s; log:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


async def read_topic(settings: Settings, topic: str, *, until: int, timeout_s: float) -> list[Any]:
    """Every record of ``topic`` from the beginning, until ``until`` records or the timeout."""
    consumer = make_consumer(settings)
    await consumer.start()
    records: list[Any] = []
    try:
        await assign_all(consumer, [topic], from_end=False)
        deadline = time.monotonic() + timeout_s
        while len(records) < until and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=250)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def run(coro: Any) -> Any:
    return asyncio.run(coro)
