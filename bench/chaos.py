"""``qustream bench chaos``: prove "nothing lost" by breaking things while the worker runs.

The harness starts its own stack, so it never touches a server someone else runs:

- a moto S3 server and a tansu broker on ``s3://`` storage over it, so topics, records and committed
  offsets survive a ``kill -9`` of the broker (the memory engine would lose them and hide bugs);
- a redis-server on a free port (the machine's Redis on 6379 is left alone);
- ``qustream worker`` (``python -m streams.cli worker``) as a subprocess with the real default model.

It produces ``messages`` queries with distinct ids ``chaos-{i}`` (a few percent poison), then, at
seeded random points of progress, kills the worker with SIGKILL ``kills`` times and restarts it,
takes Redis away for ``redis_outage_s`` seconds (the next input segment arrives during the outage),
and kills and restarts the broker once. A monitor
follows the parsed and dead-letter topics the whole time; at the end a fresh consumer reads both
topics from the beginning and every produced id must be there as a parsed event or a dead letter.

Times are taken where a consumer of the output would see them (the monitor's receive time), not
the records' CreateTime: a record appended to the producer's buffer during a broker outage carries
a CreateTime from inside the outage although nobody could read it before the broker came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.table import Table

from schemas.events import DeadLetterReason
from schemas.settings import Settings
from streams.kafka_io import assign_all, close_consumer, make_consumer, make_producer
from streams.local_stack import free_port, port_open, tansu_command
from streams.topics import ensure_topics
from workers.normalize import normalize_query

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "bench" / "results" / "chaos.json"

FaultKind = Literal["worker_kill", "redis_outage", "broker_restart"]
PoisonKind = Literal["invalid_json", "empty_query", "invalid_utf8", "over_long"]
POISON_KINDS: tuple[PoisonKind, ...] = ("invalid_json", "empty_query", "invalid_utf8", "over_long")
#: The pipeline stage that must refuse each poison kind (schemas.events.DeadLetterStage).
POISON_STAGE: dict[PoisonKind, str] = {
    "invalid_json": "decode",
    "empty_query": "validate",
    "invalid_utf8": "decode",
    "over_long": "validate",
}

# --- input ---------------------------------------------------------------------------------------

COLOURS = ["red", "navy blue", "grey", "white", "black", "green", "cream", "walnut brown", "beige", "yellow",
           "pink", "teal", "charcoal", "orange", "ivory"]
MATERIALS = ["oak", "velvet", "leather", "rattan", "marble", "glass", "metal", "linen", "teak", "pine", "boucle",
             "wicker", "bamboo", "ceramic"]
ITEMS = ["sofa", "sectional", "armchair", "dining table", "coffee table", "bar stool", "office chair", "bookshelf",
         "dresser", "nightstand", "tv stand", "bed frame", "headboard", "side table", "desk", "ottoman", "bench",
         "wardrobe", "floor lamp", "accent chair", "console table", "rocking chair", "loveseat", "cabinet"]
STYLES = ["mid century", "farmhouse", "modern", "scandinavian", "industrial", "boho", "rustic", "minimalist"]
PATTERNS = ["{colour} {material} {item}", "{material} {item}", "{colour} {item}", "{style} {material} {item}",
            "{style} {colour} {item}", "{item} in {colour}", "{colour} {material} {item} for living room",
            "{style} {item}", "{material} {item} set of 2", "small {colour} {item}"]


def furniture_queries(rng: random.Random, count: int) -> list[str]:
    """``count`` queries, distinct after normalization, combining colours, materials, items, styles."""
    seen: set[str] = set()
    queries: list[str] = []
    # The combination space is ~100k, so rejection sampling ends fast for a few hundred.
    while len(queries) < count:
        query = rng.choice(PATTERNS).format(colour=rng.choice(COLOURS), material=rng.choice(MATERIALS),
                                            item=rng.choice(ITEMS), style=rng.choice(STYLES))
        normalized = normalize_query(query)
        if normalized not in seen:
            seen.add(normalized)
            queries.append(query)
    return queries


@dataclass(frozen=True)
class ChaosMessage:
    query_id: str
    value: bytes
    kind: Literal["query"] | PoisonKind
    query: str | None = None


def poison_value(kind: PoisonKind, query_id: str, rng: random.Random) -> bytes:
    if kind == "invalid_json":
        return f'{{"query": "oak desk", "query_id": "{query_id}"'.encode()  # unterminated object
    if kind == "empty_query":
        return json.dumps({"query": rng.choice(["", "   ", "\t\n"]), "query_id": query_id}).encode()
    if kind == "invalid_utf8":
        return b"\xff\xfe red sofa \xc3\x28 " + query_id.encode()
    # Over max_query_chars (256) but under max_message_bytes, so it is the query check that refuses it.
    return json.dumps({"query": "velvet sofa " * rng.randint(30, 60), "query_id": query_id}).encode()


def build_messages(messages: int, distinct: int, poison_rate: float, seed: int) -> list[ChaosMessage]:
    """The input, a pure function of its arguments (``seed`` included), so runs are comparable."""
    rng = random.Random(seed)
    corpus = furniture_queries(rng, distinct)
    out: list[ChaosMessage] = []
    for i in range(messages):
        query_id = f"chaos-{i}"
        if rng.random() < poison_rate:
            kind = POISON_KINDS[rng.randrange(len(POISON_KINDS))]
            out.append(ChaosMessage(query_id, poison_value(kind, query_id, rng), kind))
            continue
        query = rng.choice(corpus)
        value = json.dumps({"query": query, "query_id": query_id, "source": "chaos"}).encode()
        out.append(ChaosMessage(query_id, value, "query", query))
    return out


# --- configuration and results ------------------------------------------------------------------


@dataclass
class ChaosConfig:
    messages: int = 20_000
    kills: int = 3
    seed: int = 7
    distinct: int = 150
    poison_rate: float = 0.03
    redis_outage_s: float = 10.0
    redis_outage: bool = True
    broker_restart: bool = True
    partitions: int = 4
    batch_size: int = 32
    #: A fault fires when this share of its input segment has come out, drawn uniformly in the range.
    fault_window: tuple[float, float] = (0.2, 0.8)
    timeout_s: float = 1500.0
    workdir: Path | None = None


@dataclass
class FaultRecord:
    kind: FaultKind
    label: str
    progress: float  # share of produced ids done when the fault fired
    at_s: float  # seconds since the run started
    duration_s: float = 0.0  # how long the component stayed down (what the harness controlled)
    recovery_s: float | None = None  # fault → first output record a consumer could read after it
    first_new_id_s: float | None = None  # fault → first output of an id not seen before
    #: fault → CreateTime of the first record the worker made after it: when the worker resumed,
    #: free of the monitor's own reconnect time (which recovery_s includes after a broker restart).
    resumed_s: float | None = None
    outputs_during_s: int = 0  # output records the worker created while the component was down
    queued_ids: int = 0  # produced ids not out yet when the fault fired (a Redis outage: with the segment it brings)


@dataclass
class ChaosReport:
    config: dict[str, Any]
    produced: int
    poison: int
    parsed: int
    dead_letters: int
    lost: int
    #: Ids the live monitor saw but the final re-read of the output topics did not reach in time:
    #: delivered, but left out of the checks that need the records (parse, dead-letter stage).
    seen_live_only: int
    duplicates: int
    output_records: int
    poison_dead_lettered: int
    poison_parsed: int
    valid_dead_lettered: int
    wrong_stage: int
    query_mismatch: int
    replay_mismatch: int
    longest_stall_s: float
    longest_stall_after: str
    first_output_s: float | None
    all_done_s: float | None
    wall_s: float
    worker_starts: int
    unexpected_exits: list[str]
    faults: list[FaultRecord]
    worker_startups: list[dict[str, Any]] = field(default_factory=list)
    lost_ids_sample: list[str] = field(default_factory=list)
    dlq_by_class: dict[str, int] = field(default_factory=dict)
    logs: str = ""

    @property
    def ok(self) -> bool:
        return self.lost == 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


# --- processes -----------------------------------------------------------------------------------


def _moto_command(port: int) -> list[str]:
    # Prefer the running interpreter's moto, so the harness needs nothing outside its environment.
    if importlib.util.find_spec("moto") is not None and importlib.util.find_spec("flask") is not None:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = shutil.which("moto_server")
    if server is None:
        raise RuntimeError("the chaos harness needs an S3 emulator: pip install 'moto[server]'")
    return [server, "-H", "127.0.0.1", "-p", str(port)]


@dataclass
class Service:
    """A server the harness started. Stopped through its own Popen handle, never by pid lookup or
    name: redis-server rewrites its command line ("redis-server 127.0.0.1:PORT"), so checking
    /proc/PID/cmdline against the command we ran does not recognise it (see docs/guarantees.md)."""

    name: str
    port: int
    process: subprocess.Popen[bytes]

    def kill9(self) -> None:
        """SIGKILL, no grace: that is the fault being injected."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(15)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill9()


def _start_service(name: str, command: list[str], port: int, log_dir: Path, env: dict[str, str] | None = None,
                   timeout_s: float = 30.0) -> Service:
    if port_open("127.0.0.1", port):
        # Something else holds the port (e.g. the previous instance not gone yet): starting now
        # would "succeed" against the wrong server.
        raise RuntimeError(f"{name}: port {port} is already in use")
    with (log_dir / f"{name}.log").open("ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {})})
    service = Service(name, port, process)
    deadline = time.monotonic() + timeout_s
    while not port_open("127.0.0.1", port):
        if process.poll() is not None or time.monotonic() > deadline:
            service.kill9()
            raise RuntimeError(f"{name} did not start (rc={process.returncode}); see {log_dir / f'{name}.log'}")
        time.sleep(0.05)
    return service


class ChaosStack:
    """moto S3 + tansu on s3:// + redis-server, all on free ports, all ours."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.s3_port = free_port()
        self.kafka_port = free_port()
        self.redis_port = free_port()
        self.bucket = "qustream-chaos"
        self.moto: Service | None = None
        self.tansu: Service | None = None
        self.redis: Service | None = None
        self.broker_starts = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def _s3_env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT": f"http://127.0.0.1:{self.s3_port}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "chaos",
            "AWS_SECRET_ACCESS_KEY": "chaos-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> None:
        self.moto = _start_service("moto", _moto_command(self.s3_port), self.s3_port, self.workdir)
        request = urllib.request.Request(f"http://127.0.0.1:{self.s3_port}/{self.bucket}", method="PUT")
        deadline = time.monotonic() + 30
        while True:  # moto's port opens before its app answers on a slow machine
            try:
                with urllib.request.urlopen(request, timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.start_broker()
        self.start_redis()

    def start_broker(self) -> None:
        self.broker_starts += 1
        command = tansu_command(self.kafka_port, f"s3://{self.bucket}/")
        self.tansu = _start_service("tansu", command, self.kafka_port, self.workdir, env=self._s3_env())

    def kill_broker(self) -> None:
        assert self.tansu is not None
        self.tansu.kill9()
        self.tansu = None

    def start_redis(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("no redis-server on PATH: install it (Debian: apt-get install redis-server)")
        # An RDB snapshot on shutdown, so the outage is an outage and not also a cache wipe: after it
        # the run goes back to cache hits instead of repeating the whole first pass through the model.
        command = [server, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "3600 1",
                   "--appendonly", "no", "--dir", str(self.workdir), "--dbfilename", "chaos.rdb"]
        self.redis = _start_service("redis", command, self.redis_port, self.workdir)

    def stop_redis(self) -> None:
        assert self.redis is not None
        self.redis.stop()
        self.redis = None
        if port_open("127.0.0.1", self.redis_port):
            raise RuntimeError(f"redis on :{self.redis_port} still answers after stopping it")

    def stop(self) -> None:
        for service in (self.redis, self.tansu, self.moto):
            if service is not None:
                with contextlib.suppress(Exception):
                    service.stop()
        self.redis = self.tansu = self.moto = None


class WorkerSupervisor:
    """``python -m streams.cli worker`` as production runs it, restarted like an orchestrator would."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.unexpected_exits: list[str] = []
        self.spawned_at: list[float] = []  # wall-clock epoch of each start, to read its log against
        self._log: Any = None

    def start(self) -> None:
        self.starts += 1
        self.spawned_at.append(time.time())
        env = {**os.environ, **self.settings.to_env(), "QUSTREAM_WORKER_ID": f"chaos-w{self.starts}",
               "TOKENIZERS_PARALLELISM": "false"}
        if self._log is not None:
            self._log.close()
        self._log = (self.workdir / f"worker-{self.starts}.log").open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], cwd=REPO, env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill9(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def check(self, at_s: float) -> bool:
        """Restart a worker that exited by itself; returns True when it had to."""
        if self.process is None or self.process.poll() is None:
            return False
        log_name = f"worker-{self.starts}.log"
        self.unexpected_exits.append(f"{at_s:.1f}s: worker {self.starts} exited rc={self.process.returncode} "
                                     f"(see {log_name})")
        self.start()
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(45)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self._log is not None:
            self._log.close()
            self._log = None


# --- the output monitor --------------------------------------------------------------------------



#: Seconds without an output record, while ids are missing, after which the monitor reopens its consumer.
_MONITOR_SILENCE_S = 10.0


class OutputMonitor:
    """Follows the parsed and dead-letter topics from the beginning; survives broker restarts."""

    def __init__(self, settings: Settings, expected: set[str], clock0: float) -> None:
        self.settings = settings
        self.expected = expected
        self.clock0 = clock0
        # CreateTime is wall-clock epoch; this maps it onto the run's monotonic seconds.
        self.wall0 = time.time() - (time.monotonic() - clock0)
        self.done: set[str] = set()
        self.records = 0
        #: (received s, created s, query_id, is_new) per output record, in receive order; seconds
        #: since the run started.
        self.arrivals: list[tuple[float, float, str, bool]] = []
        self.all_done_s: float | None = None
        self.errors = 0
        self._positions: dict[TopicPartition, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def now(self) -> float:
        return time.monotonic() - self.clock0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await self._task

    async def _open(self) -> AIOKafkaConsumer:
        consumer = make_consumer(self.settings, request_timeout_ms=10_000, retry_backoff_ms=100)
        await consumer.start()
        try:
            partitions = await assign_all(consumer, [self.settings.topic_parsed, self.settings.topic_dlq],
                                          from_end=False)
            for tp in partitions:
                if tp in self._positions:
                    consumer.seek(tp, self._positions[tp])
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def _run(self) -> None:
        consumer: AIOKafkaConsumer | None = None
        last_record_s = self.now()
        while not self._stopping:
            try:
                if consumer is None:
                    consumer = await self._open()
                batches = await consumer.getmany(timeout_ms=100, max_records=5000)
                # After a broker restart a consumer can go on fetching nothing without an error:
                # silence while ids are still expected reopens it too, from where it was.
                if not batches and len(self.done) < len(self.expected) \
                        and self.now() - last_record_s > _MONITOR_SILENCE_S:
                    raise TimeoutError(f"no output record for {_MONITOR_SILENCE_S:.0f} s")
            except Exception:
                # The broker restart is one of the faults: reopen from where we were.
                self.errors += 1
                last_record_s = self.now()
                if consumer is not None:
                    await close_consumer(consumer)
                    consumer = None
                await asyncio.sleep(0.2)
                continue
            received = self.now()
            if batches:
                last_record_s = received
            for tp, records in batches.items():
                for record in records:
                    self._positions[tp] = record.offset + 1
                    query_id = record.key.decode("utf-8", "replace") if record.key else ""
                    new = query_id in self.expected and query_id not in self.done
                    if new:
                        self.done.add(query_id)
                    self.records += 1
                    self.arrivals.append((received, record.timestamp / 1000 - self.wall0, query_id, new))
            if self.all_done_s is None and len(self.done) == len(self.expected):
                self.all_done_s = received
        if consumer is not None:
            await close_consumer(consumer)

    def first_output_after(self, t: float, *, new_only: bool = False) -> float | None:
        """When a consumer first saw a record the worker created after ``t`` (so not one already in
        flight at ``t``): a killed worker creates nothing, a restarted one only once it works."""
        for received, created, _, new in self.arrivals:
            if created > t and (new or not new_only):
                return received
        return None

    def first_created_after(self, t: float) -> float | None:
        created_after = [created for _, created, _, _ in self.arrivals if created > t]
        return min(created_after) if created_after else None

    def outputs_between(self, start: float, end: float) -> int:
        """Records the worker created in (start, end]: output produced while a component was down."""
        return sum(1 for _, created, _, _ in self.arrivals if start < created <= end)


# --- the run -------------------------------------------------------------------------------------


def plan_faults(config: ChaosConfig) -> list[tuple[float, FaultKind]]:
    """Seeded fault schedule: (share of the current input segment done when it fires, kind)."""
    # A generator of its own, so --kills does not change the input and vice versa.
    rng = random.Random(config.seed * 7919 + 1)
    kinds: list[FaultKind] = ["worker_kill"] * config.kills
    if config.redis_outage:
        kinds.append("redis_outage")
    if config.broker_restart:
        kinds.append("broker_restart")
    rng.shuffle(kinds)
    low, high = config.fault_window
    return [(rng.uniform(low, high), kind) for kind in kinds]


def plan_segments(config: ChaosConfig, faults: int) -> list[int]:
    """Sizes of the input segments, one more than faults: a segment is produced, a fault fires while
    part of it is still unprocessed, the next segment follows. So every fault meets remaining input
    however fast the cached phase drains it, and traffic keeps arriving across every fault."""
    rng = random.Random(config.seed * 7919 + 2)
    weights = [rng.uniform(0.6, 1.4) for _ in range(faults + 1)]
    sizes = [max(1, int(config.messages * w / sum(weights))) for w in weights]
    sizes[-1] = config.messages - sum(sizes[:-1])
    return sizes


async def _produce(settings: Settings, messages: list[ChaosMessage]) -> None:
    producer = make_producer(settings, linger_ms=20)
    await producer.start()
    try:
        pending = [await producer.send(settings.topic_input, m.value, key=m.query_id.encode()) for m in messages]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def _read_all(settings: Settings, topics: list[str], at_least: int, idle_s: float = 4.0,
                    timeout_s: float = 300.0) -> list[Any]:
    """Every record of ``topics`` from the beginning. ListOffsets(latest) is unreliable on tansu, so
    this reads until it has what the monitor saw and then a quiet spell, not up to the end offsets."""
    consumer = make_consumer(settings)
    await consumer.start()
    records: list[Any] = []
    try:
        await assign_all(consumer, topics, from_end=False)
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=250, max_records=10_000)
            for batch in batches.values():
                records.extend(batch)
                last = time.monotonic()
            if len(records) >= at_least and time.monotonic() - last > idle_s:
                break
    finally:
        await consumer.stop()
    return records


class _Log:
    """Progress lines to stderr (rich console when given), so stdout stays the table."""

    def __init__(self, console: Any | None, clock0: float) -> None:
        self.console = console
        self.clock0 = clock0

    def __call__(self, message: str) -> None:
        line = f"[{time.monotonic() - self.clock0:7.1f}s] {message}"
        if self.console is not None:
            self.console.print(line, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)


async def run_chaos(config: ChaosConfig, console: Any | None = None) -> ChaosReport:
    # The harness's own clients lose the broker on purpose; their reconnect warnings are noise here.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="qustream-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = ChaosStack(workdir)
    clock0 = time.monotonic()
    say = _Log(console, clock0)
    messages = build_messages(config.messages, config.distinct, config.poison_rate, config.seed)
    expected = {m.query_id for m in messages}
    try:
        stack.start()
        report = await _run_on_stack(config, stack, say, clock0, messages, expected)
    finally:
        stack.stop()  # also on Ctrl-C: nothing the harness started may outlive it
    report.logs = str(workdir)
    return report


def worker_startups(workdir: Path, spawned_at: list[float]) -> list[dict[str, Any]]:
    """Where each worker start spent its time (seconds after spawn), read from its JSON log: what a
    stall after a kill consists of."""
    from datetime import datetime

    marks = {"worker.starting": "imports_s", "worker.engine_ready": "model_ready_s",
             "partitions.assigned": "partitions_assigned_s", "batches.progress": "first_batch_s"}
    startups: list[dict[str, Any]] = []
    for number, spawned in enumerate(spawned_at, start=1):
        entry: dict[str, Any] = {"worker": number}
        path = workdir / f"worker-{number}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
                name = marks.get(event.get("event", ""))
                if name is None or name in entry:
                    continue
                at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            entry[name] = round(at - spawned, 2)
        startups.append(entry)
    return startups


async def _run_on_stack(config: ChaosConfig, stack: ChaosStack, say: _Log, clock0: float,
                        messages: list[ChaosMessage], expected: set[str]) -> ChaosReport:
    workdir = stack.workdir
    say(f"stack up: tansu {stack.bootstrap} (s3 on :{stack.s3_port}), redis :{stack.redis_port}, logs {workdir}")
    run_id = f"{config.seed}-{os.getpid()}"
    settings = Settings(
        kafka_bootstrap=stack.bootstrap,
        redis_url=stack.redis_url,
        topic_input="chaos.raw", topic_parsed="chaos.parsed", topic_metrics="chaos.metrics", topic_dlq="chaos.dlq",
        app_id=f"qustream-chaos-{run_id}",
        cache_prefix=f"qustream-chaos:{run_id}",
        partitions=config.partitions,
        producer_idempotence=False,  # tansu has no InitProducerId
        broker_session_timeout_s=6.0,  # tansu holds group joins for session_timeout / 2
        broker_heartbeat_s=1.0,
        batch_size=config.batch_size,
        batch_linger_ms=100,
        web_port=free_port(),
        log_level="INFO",
        log_format="json",
    )
    worker = WorkerSupervisor(settings, workdir)
    monitor = OutputMonitor(settings, expected, clock0)
    faults: list[FaultRecord] = []
    try:
        await ensure_topics(settings)
        worker.start()
        await monitor.start()
        plan = plan_faults(config)
        segments = plan_segments(config, len(plan))
        bounds = list(itertools.accumulate(segments))
        # Two segments up front and one more after each fault: input is always queued beyond the
        # one the next fault fires in, so no fault lands on an idle worker.
        await _produce(settings, messages[: bounds[min(1, len(bounds) - 1)]])
        say(f"produced {bounds[min(1, len(bounds) - 1)]} of {len(messages)} messages "
            f"({sum(m.kind != 'query' for m in messages)} poison in all); {len(plan)} faults planned")
        deadline = clock0 + config.timeout_s

        async def wait_until(predicate: Any, limit_s: float) -> bool:
            end = min(time.monotonic() + limit_s, deadline)
            while time.monotonic() < end:
                if worker.check(monitor.now()):
                    say(f"worker exited by itself; restarted ({worker.unexpected_exits[-1]})")
                if predicate():
                    return True
                await asyncio.sleep(0.1)
            return bool(predicate())

        await wait_until(lambda: monitor.records > 0, config.timeout_s)
        say(f"first output after {monitor.now():.1f}s")
        rng = random.Random(config.seed * 104729 + 3)
        for index, (share, kind) in enumerate(plan):
            produced = bounds[index]
            target = produced - int((1 - share) * segments[index])
            await wait_until(lambda target=target: len(monitor.done) >= target, config.timeout_s)
            # Land somewhere inside a batch cycle, not right on the progress tick.
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            done_at_fault = len(monitor.done)
            fault = FaultRecord(kind, kind, done_at_fault / len(messages), monitor.now())
            produced_during = False
            if kind == "worker_kill":
                fault.label = f"worker kill -9 #{sum(f.kind == 'worker_kill' for f in faults) + 1}"
                worker.kill9()
                worker.start()
            elif kind == "redis_outage":
                fault.label = f"redis down {config.redis_outage_s:.0f}s"
                await asyncio.to_thread(stack.stop_redis)
                # The broker is up: the next segment arrives during the outage, so the worker meets new
                # traffic without its cache (and always has input left, whatever the monitor has read).
                outage_ends = monitor.now() + config.redis_outage_s
                if index + 2 < len(bounds):
                    await _produce(settings, messages[bounds[index + 1]: bounds[index + 2]])
                    produced_during = True
                await asyncio.sleep(max(outage_ends - monitor.now(), 0.0))
                await asyncio.to_thread(stack.start_redis)
            else:
                fault.label = "broker kill -9 + restart"
                stack.kill_broker()
                await asyncio.to_thread(stack.start_broker)
            fault.duration_s = monitor.now() - fault.at_s
            faults.append(fault)
            fault.queued_ids = bounds[index + (2 if produced_during else 1)] - done_at_fault
            say(f"{fault.label} at {fault.progress:.0%} of all ids ({fault.queued_ids} produced ids not out yet); "
                f"down {fault.duration_s:.1f}s")
            # The next segment arrives once the faulty part is back (the harness's producer is not
            # under test), then this fault's recovery is awaited before the next one fires.
            if index + 2 < len(bounds) and not produced_during:
                await _produce(settings, messages[bounds[index + 1]: bounds[index + 2]])
            await wait_until(lambda f=fault: monitor.first_output_after(f.at_s) is not None, 600)
        await wait_until(lambda: monitor.all_done_s is not None, config.timeout_s)
        say(f"{len(monitor.done)}/{len(expected)} ids out; stopping the worker")
    finally:
        worker.stop()
        await monitor.stop()
    records = await _read_all(settings, [settings.topic_parsed, settings.topic_dlq], monitor.records)
    report = _summarize(config, messages, records, monitor, faults, worker, time.monotonic() - clock0, settings)
    report.worker_startups = worker_startups(workdir, worker.spawned_at)
    return report


def _summarize(config: ChaosConfig, messages: list[ChaosMessage], records: list[Any], monitor: OutputMonitor,
               faults: list[FaultRecord], worker: WorkerSupervisor, wall_s: float, settings: Settings) -> ChaosReport:
    by_id = {m.query_id: m for m in messages}
    parsed_ids: Counter[str] = Counter()
    dlq_ids: Counter[str] = Counter()
    parses: dict[str, set[str]] = {}
    query_mismatch = wrong_stage = 0
    dlq_by_class: Counter[str] = Counter()
    for record in records:
        query_id = record.key.decode("utf-8", "replace") if record.key else ""
        if record.topic == settings.topic_parsed:
            parsed_ids[query_id] += 1
            event = json.loads(record.value)
            parses.setdefault(query_id, set()).add(json.dumps(event["parse"], sort_keys=True))
            source = by_id.get(query_id)
            if source is not None and source.query is not None and event["query"] != source.query.strip():
                query_mismatch += 1
        else:
            dlq_ids[query_id] += 1
            reason = DeadLetterReason.from_headers(dict(record.headers or ()))
            dlq_by_class[reason.error_class] += 1
            source = by_id.get(query_id)
            if source is not None and source.kind != "query" and reason.stage != POISON_STAGE[source.kind]:
                wrong_stage += 1
    produced = set(by_id)
    covered = (set(parsed_ids) | set(dlq_ids)) & produced
    # The live monitor read every output record once already; an id it saw that the final re-read
    # did not reach (tansu can be slow to serve a whole topic again after a restart) was delivered.
    seen_live_only = (monitor.done & produced) - covered
    lost = sorted(produced - covered - seen_live_only, key=lambda q: int(q.rsplit("-", 1)[1]))
    poison = {q for q, m in by_id.items() if m.kind != "query"}
    output_records = sum(parsed_ids.values()) + sum(dlq_ids.values())

    # Longest gap with no output while input remained: from the first output (model load is
    # start-up, not a stall) to the moment the last id came out.
    end = monitor.all_done_s if monitor.all_done_s is not None else monitor.now()
    times = [t for t, _, _, _ in monitor.arrivals if t <= end]
    stall, stall_at = 0.0, 0.0
    for earlier, later in itertools.pairwise(times):
        if later - earlier > stall:
            stall, stall_at = later - earlier, earlier
    # Name the gap after the last fault that fired before it ended: that is what it waited on.
    stall_after = "no fault"
    for fault in faults:
        if fault.at_s < stall_at + stall:
            stall_after = fault.label
    for fault in faults:
        back = fault.at_s + fault.duration_s
        first = monitor.first_output_after(fault.at_s)
        new = monitor.first_output_after(fault.at_s, new_only=True)
        fault.recovery_s = round(first - fault.at_s, 2) if first is not None else None
        fault.first_new_id_s = round(new - fault.at_s, 2) if new is not None else None
        resumed = monitor.first_created_after(fault.at_s)
        fault.resumed_s = round(resumed - fault.at_s, 2) if resumed is not None else None
        fault.outputs_during_s = monitor.outputs_between(fault.at_s, back)
        fault.at_s, fault.duration_s, fault.progress = round(fault.at_s, 2), round(fault.duration_s, 2), round(
            fault.progress, 4)
    config_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return ChaosReport(
        config=config_json,
        produced=len(produced),
        poison=len(poison),
        parsed=len(set(parsed_ids) & produced),
        dead_letters=len(set(dlq_ids) & produced),
        lost=len(lost),
        seen_live_only=len(seen_live_only),
        duplicates=output_records - len(covered),
        output_records=output_records,
        poison_dead_lettered=len(poison & set(dlq_ids)),
        poison_parsed=len(poison & set(parsed_ids)),
        valid_dead_lettered=len((set(dlq_ids) - poison) & produced),
        wrong_stage=wrong_stage,
        query_mismatch=query_mismatch,
        replay_mismatch=sum(1 for variants in parses.values() if len(variants) > 1),
        longest_stall_s=round(stall, 2),
        longest_stall_after=stall_after,
        first_output_s=round(monitor.arrivals[0][0], 2) if monitor.arrivals else None,
        all_done_s=round(monitor.all_done_s, 2) if monitor.all_done_s is not None else None,
        wall_s=round(wall_s, 1),
        worker_starts=worker.starts,
        unexpected_exits=worker.unexpected_exits,
        faults=faults,
        lost_ids_sample=lost[:20],
        dlq_by_class=dict(dlq_by_class),
    )


def report_rows(report: ChaosReport) -> list[tuple[str, str]]:
    """The summary as (measure, value) rows: the rich table and the Markdown in docs share them."""
    rows: list[tuple[str, str]] = [
        ("produced", f"{report.produced:,} ({report.poison} poison)"),
        ("parsed (distinct query_ids)", f"{report.parsed:,}"),
        ("dead letters (distinct)", f"{report.dead_letters:,} ({report.poison_dead_lettered}/{report.poison} poison)"),
        ("lost", str(report.lost)),
        *([("seen live only (final re-read incomplete)", f"{report.seen_live_only:,}")]
          if report.seen_live_only else []),
        ("duplicates (extra deliveries)", f"{report.duplicates:,}"),
        ("valid queries dead-lettered", str(report.valid_dead_lettered)),
        ("replayed ids with a different parse", str(report.replay_mismatch)),
        ("longest stall (input remaining)", f"{report.longest_stall_s:.1f} s (after {report.longest_stall_after})"),
        ("first output (start-up)", f"{report.first_output_s} s"),
        ("all ids out", f"{report.all_done_s} s"),
        ("worker starts / unexpected exits", f"{report.worker_starts} / {len(report.unexpected_exits)}"),
    ]
    for fault in report.faults:
        recovery = f"{fault.recovery_s:.1f} s" if fault.recovery_s is not None else "never"
        if fault.resumed_s is not None:
            recovery += f" (worker resumed {fault.resumed_s:.1f} s)"
        detail = f"; at {fault.progress:.0%}, {fault.queued_ids:,} ids queued, down {fault.duration_s:.1f} s"
        detail += f", {fault.outputs_during_s:,} outputs meanwhile" if fault.kind == "redis_outage" else ""
        rows.append((f"recovery: {fault.label}", recovery + detail))
    rows.append(("wall time", f"{report.wall_s:.0f} s"))
    return rows


def report_table(report: ChaosReport) -> Table:
    table = Table(title=f"qustream chaos — {report.produced:,} messages, seed {report.config['seed']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in report_rows(report):
        if name == "lost":
            style = "green" if report.lost == 0 else "bold red"
            value = f"[{style}]{value}[/{style}]"
        table.add_row(name, value)
    return table


def report_markdown(report: ChaosReport) -> str:
    lines = ["| measure | value |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in report_rows(report)]
    return "\n".join(lines) + "\n"


def report_from_json(path: Path) -> ChaosReport:
    data = json.loads(path.read_text())
    data.pop("ok", None)
    data["faults"] = [FaultRecord(**fault) for fault in data["faults"]]
    return ChaosReport(**data)


def write_json(report: ChaosReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
