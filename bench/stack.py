"""Real services for the pipeline benchmark: a private tansu broker, the machine's Redis, `qustream
worker` subprocesses, the pass-through reference process, and a background reader of output topics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from schemas.settings import Settings
from streams.kafka_io import assign_all, make_consumer
from streams.local_stack import (
    StartedProcess,
    free_port,
    port_open,
    redis_command,
    spawn,
    stop_process,
    tansu_command,
)

REPO = Path(__file__).resolve().parent.parent


def isolated_settings(bootstrap: str, redis_url: str, *, tag: str = "t", **overrides: Any) -> Settings:
    """Settings with topics, streams, group, cache prefix and web port of their own, tuned for tansu
    (no idempotent producer, short session timeout): several runs share one broker without colliding."""
    run = f"{tag}{uuid.uuid4().hex[:8]}"
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "redis_url": redis_url,
        "topic_input": f"{run}.raw",
        "topic_parsed": f"{run}.parsed",
        "topic_metrics": f"{run}.metrics",
        "topic_dlq": f"{run}.dlq",
        "stream_input": f"{run}:raw",
        "stream_parsed": f"{run}:parsed",
        "stream_metrics": f"{run}:metrics",
        "stream_dlq": f"{run}:dlq",
        "app_id": f"qustream-{run}",
        "cache_prefix": f"qustream-{run}",
        "worker_id": f"worker-{run}",
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


class Services:
    """tansu (memory storage) on a free port, and Redis: the machine's on 6379 or one started here."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        port = free_port()
        self._tansu = spawn("tansu", tansu_command(port), port, workdir)
        self.bootstrap = f"127.0.0.1:{port}"
        self._redis: StartedProcess | None = None
        if port_open("127.0.0.1", 6379):
            self.redis_url = "redis://127.0.0.1:6379/9"
        else:
            redis_port = free_port()
            self._redis = spawn("redis", redis_command(redis_port), redis_port, workdir)
            self.redis_url = f"redis://127.0.0.1:{redis_port}/9"

    def settings(self, name: str, **overrides: Any) -> Settings:
        """Settings with topics, group, cache prefix and web port of their own (unique per call),
        4 partitions and the product's default batching unless overridden."""
        defaults: dict[str, Any] = {
            "partitions": 4,
            "batch_linger_ms": Settings.model_fields["batch_linger_ms"].default,
        }
        return isolated_settings(self.bootstrap, self.redis_url, tag=f"b{name}-", **{**defaults, **overrides})

    @property
    def broker_pid(self) -> int:
        return self._tansu.pid

    def close(self) -> None:
        stop_process(self._tansu)
        if self._redis is not None:
            stop_process(self._redis)


class Process:
    """A benchmark subprocess in its own session, its output in a log file."""

    def __init__(self, name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int | None:
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return None

    def peak_rss_bytes(self) -> int | None:
        """The kernel's high-water mark of resident memory (VmHWM) since start or ``reset_peak_rss``:
        exact where sampling ``rss_bytes`` would miss a short spike inside a batch."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return None

    def reset_peak_rss(self) -> bool:
        """Start ``peak_rss_bytes`` again from the current RSS (Linux ``clear_refs`` 5)."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def cpu_seconds(self) -> float:
        """User + system CPU time so far: per-message cost that other load on the machine cannot inflate."""
        try:
            times = psutil.Process(self.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP while the block runs (a backlog builds up), SIGCONT after; stopped for well under
        the session timeout, so the consumer group does not notice."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; log:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@contextlib.contextmanager
def pinned(measured: list[int], others: list[int]) -> Iterator[dict[str, list[int]]]:
    """Measured processes on CPU 0, everything else named (broker, this harness) on the other CPUs,
    for the duration of the block; then all back on every CPU.

    Without it, which processes the scheduler happens to put on one core changes a round's figures
    by ±30 % on a 2-core machine; with it, each measured path has a core of its own and shares the
    other with nobody it is compared against. No-op on a single CPU."""
    every = sorted(os.sched_getaffinity(0))
    if len(every) < 2:
        yield {"measured": every, "others": every}
        return
    mine, rest = every[:1], every[1:]
    pids = [(pid, mine) for pid in measured] + [(pid, rest) for pid in others]
    try:
        for pid, cpus in pids:
            _set_affinity(pid, cpus)
        yield {"measured": mine, "others": rest}
    finally:
        for pid, _ in pids:
            _set_affinity(pid, every)


def _set_affinity(pid: int, cpus: list[int]) -> None:
    """Every thread of ``pid`` (a process's threads keep their own masks)."""
    with contextlib.suppress(psutil.Error):
        for thread in psutil.Process(pid).threads():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(thread.id, cpus)


#: The worker's gauges of each input partition: lag, inputs not settled, and the commit's wait.
PARTITION_GAUGES = ("qustream_consumer_lag", "qustream_inputs_unsettled", "qustream_commit_waiting_seconds")


class Worker(Process):
    """``qustream worker`` as production runs it, configured through its environment."""

    def __init__(self, name: str, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        super().__init__(name, [sys.executable, "-m", "streams.cli", "worker"], log_path, settings.to_env())

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.settings.web_port}/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return False, {}
        return bool(body.get("ready")), dict(body.get("checks", {}))

    async def wait_ready(self, timeout_s: float = 240.0, partitions: int | None = None) -> None:
        """Until /ready answers 200 (and, if given, this many partitions are assigned)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            ready, checks = await asyncio.to_thread(self.readiness)
            if ready and (partitions is None or checks.get("partitions") == partitions):
                return
            await asyncio.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready after {timeout_s} s; log:\n{self.log_tail()}")


    def partition_gauges(self) -> dict[int, dict[str, float]]:
        return partition_gauges(self.settings)

    async def committed(self) -> dict[int, int | None]:
        return await committed_offsets(self.settings)


def partition_gauges(settings: Settings) -> dict[int, dict[str, float]]:
    """A worker's gauges of each input partition (``PARTITION_GAUGES``) from its /metrics; empty when
    it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{settings.web_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            text = response.read().decode()
    except (OSError, ValueError):
        return {}
    gauges: dict[int, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in PARTITION_GAUGES:
            continue
        for sample in family.samples:
            if sample.labels.get("topic") == settings.topic_input:
                gauges.setdefault(int(sample.labels["partition"]), {})[sample.name] = sample.value
    return gauges


async def committed_offsets(settings: Settings) -> dict[int, int | None]:
    """The next offset the ``app_id`` group committed, per input partition (read without joining it)."""
    consumer = make_consumer(settings, group_id=settings.app_id)
    await consumer.start()
    try:
        partitions = [TopicPartition(settings.topic_input, p) for p in range(settings.partitions)]
        consumer.assign(partitions)
        return {tp.partition: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()


class Passthrough(Process):
    """The aiokafka pass-through reference process."""

    def __init__(self, bootstrap: str, source: str, sink: str, log_path: Path) -> None:
        group = f"passthrough-{uuid.uuid4().hex[:6]}"
        command = [sys.executable, "-m", "bench.passthrough", "--bootstrap", bootstrap, "--source", source,
                   "--sink", sink, "--group", group]
        super().__init__("passthrough", command, log_path)

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if "ready" in self.log_path.read_text(errors="replace"):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"pass-through not ready; log:\n{self.log_tail()}")


class Collector:
    """Reads output topics from their beginning in the background and counts the distinct keys of
    each round tag (the key's text before the first '-'), so a round ends when an output of each of
    its queries arrived. Distinct, because delivery is at least once: a batch republished after
    part of it was handed over puts some outputs on the topic twice, and counting those would end
    a round while some of its queries are still being processed.

    It only appends records while a round runs; decoding waits until the round is over, so the
    reader costs as little CPU as possible on a machine the worker shares with it. ``timed`` also
    keeps the wall time each record was read at (``read_at``), where latency is measured as a
    consumer of the output sees it. It then fetches with a short wait: through tansu a fetch that
    waits for records (aiokafka's default wait is 500 ms) is answered well after they arrive, which
    would add to every latency measured (the latency benchmark reports the reader's share).
    """

    def __init__(self, settings: Settings, topics: list[str], *, timed: bool = False) -> None:
        self.settings = settings
        self.topics = topics
        self.records: dict[str, list[ConsumerRecord[Any, Any]]] = defaultdict(list)
        #: The distinct keys seen, by (topic, round tag).
        self.keys: defaultdict[tuple[str, bytes], set[bytes]] = defaultdict(set)
        self._read_at: dict[tuple[str, int, int], float] | None = {} if timed else None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        prompt: dict[str, Any] = {"fetch_max_wait_ms": 10} if self._read_at is not None else {}
        self._consumer = make_consumer(self.settings, **prompt)
        await self._consumer.start()
        await assign_all(self._consumer, self.topics, from_end=False)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=50)
            now = time.time()
            for tp, records in batches.items():
                self.records[tp.topic].extend(records)
                for record in records:
                    if self._read_at is not None:
                        self._read_at[(tp.topic, tp.partition, record.offset)] = now
                    if record.key:
                        self.keys[(tp.topic, record.key.split(b"-", 1)[0])].add(record.key)

    async def wait(self, topic: str | Sequence[str], tag: str, count: int, timeout_s: float) -> bool:
        """True once records with ``count`` distinct keys of round ``tag`` arrived on ``topic`` (on
        these topics together); False at the timeout."""
        keys = [(name, tag.encode()) for name in ([topic] if isinstance(topic, str) else topic)]
        deadline = time.monotonic() + timeout_s
        while not self._reached(keys, count):
            if time.monotonic() > deadline:
                return False
            if self._task is not None and self._task.done():
                self._task.result()  # surfaces the reader's exception
            await asyncio.sleep(0.01)
        return True

    def distinct(self, keys: Sequence[tuple[str, bytes]]) -> int:
        """Distinct record keys seen under these (topic, round tag) pairs together."""
        sets = [self.keys[key] for key in keys]
        return len(sets[0]) if len(sets) == 1 else len(set().union(*sets))

    def _reached(self, keys: Sequence[tuple[str, bytes]], count: int) -> bool:
        # Polled every 10 ms beside the workers: the union is built only once the sizes could reach it.
        return sum(len(self.keys[key]) for key in keys) >= count and self.distinct(keys) >= count

    def read_at(self, record: ConsumerRecord[Any, Any]) -> float:
        """Wall time this reader got ``record`` (a ``timed`` collector only)."""
        assert self._read_at is not None, "Collector(timed=True) keeps read times"
        return self._read_at[(record.topic, record.partition, record.offset)]

    def of_round(self, topic: str, tag: str) -> list[ConsumerRecord[Any, Any]]:
        prefix = tag.encode() + b"-"
        return [r for r in self.records[topic] if r.key and r.key.startswith(prefix)]

    def forget(self, topic: str, tag: str) -> None:
        """Drop a finished round's records (large rounds would otherwise pile up in memory)."""
        prefix = tag.encode() + b"-"
        self.records[topic] = [r for r in self.records[topic] if not (r.key and r.key.startswith(prefix))]
        self.keys.pop((topic, tag.encode()), None)

    def since(self, topic: str, timestamp_ms: int) -> list[ConsumerRecord[Any, Any]]:
        return [r for r in self.records[topic] if r.timestamp >= timestamp_ms]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


class EngineAlone:
    """``python -m bench.engine_alone`` with the worker's settings: the model reference process."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.version = ""
        self.model_id = ""
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def start(self, timeout_s: float = 600.0) -> None:
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.engine_alone", cwd=REPO, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **self.settings.to_env()},
                limit=1 << 20,
            )
        reply = await self._read(timeout_s)
        self.version, self.model_id = reply["version"], reply["model"]

    async def _read(self, timeout_s: float) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        while True:
            line = await asyncio.wait_for(self._process.stdout.readline(), timeout_s)
            if not line:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"engine reference exited; log:\n{tail}")
            # stdout also carries the engine's log lines (JSON ones too): only replies count.
            with contextlib.suppress(ValueError):
                reply = json.loads(line)
                if isinstance(reply, dict) and ("ready" in reply or "seconds" in reply):
                    return reply

    async def parse_seconds(self, queries: list[str], timeout_s: float) -> float:
        """Seconds the engine alone needs for ``queries`` in ``batch_size`` chunks."""
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write((json.dumps(queries) + "\n").encode())
        await self._process.stdin.drain()
        return float((await self._read(timeout_s))["seconds"])

    async def stop(self) -> None:
        if self._process is None or self._process.returncode is not None:
            return
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            await asyncio.wait_for(self._process.wait(), 20)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
