"""A bad setting stops every command at start with exit 2, naming the setting and never its value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas.settings import Settings, describe_invalid_settings


@pytest.mark.parametrize(
    ("env", "named", "says"),
    [
        ({"QUSTREAM_KAFKA_BOOTSTRAP": ""}, "QUSTREAM_KAFKA_BOOTSTRAP", "is not host:port"),
        ({"QUSTREAM_KAFKA_BOOTSTRAP": "kafka-1:9092,kafka-2"}, "QUSTREAM_KAFKA_BOOTSTRAP", "'kafka-2'"),
        ({"QUSTREAM_KAFKA_BOOTSTRAP": "kafka:99999"}, "QUSTREAM_KAFKA_BOOTSTRAP", "is not host:port"),
        ({"QUSTREAM_REDIS_URL": "http://:hunter2@redis:6379/0"}, "QUSTREAM_REDIS_URL", "must start with redis://"),
        ({"QUSTREAM_WEB_PORT": "70000"}, "QUSTREAM_WEB_PORT", "less than or equal to 65535"),
        ({"QUSTREAM_LOG_LEVEL": "verbose"}, "QUSTREAM_LOG_LEVEL", "not one of DEBUG"),
        ({"QUSTREAM_PARSE_TIMEOUT_S": "0"}, "QUSTREAM_PARSE_TIMEOUT_S", "greater than 0"),
        ({"QUSTREAM_MAX_DELIVERIES": "1"}, "QUSTREAM_MAX_DELIVERIES", "greater than or equal to 2"),
        ({"QUSTREAM_MAX_UNCOMMITTED_MESSAGES": "100"}, "max_uncommitted_messages (100)", "max_in_flight_messages"),
        ({"QUSTREAM_MODEL": "/nonexistent/hunter2-model"}, "QUSTREAM_MODEL", "neither a model folder nor a hub id"),
        ({"QUSTREAM_MODEL": "/tmp"}, "QUSTREAM_MODEL", "holds no config.json"),
        ({"QUSTREAM_TOOLS_CONNECT_TIMEOUT_S": "abc"}, "QUSTREAM_TOOLS_CONNECT_TIMEOUT_S", "valid number"),
        ({"QUSTREAM_TOOLS_CONNECT_TIMEOUT_S": "0"}, "QUSTREAM_TOOLS_CONNECT_TIMEOUT_S", "greater than 0"),
        ({"QUSTREAM_STOP_GRACE_S": "0"}, "QUSTREAM_STOP_GRACE_S", "greater than 0"),
        ({"QUSTREAM_STOP_GRACE_S": "3600"}, "QUSTREAM_STOP_GRACE_S", "less than or equal to 600"),
    ],
)
def test_a_bad_setting_is_named_without_its_value(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str, says: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as invalid:
        Settings()
    described = describe_invalid_settings(invalid.value)
    assert named in described and says in described, described
    assert "hunter2" not in described


def test_good_settings_are_taken_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUSTREAM_KAFKA_BOOTSTRAP", "kafka-1:9092, kafka-2:9093")
    monkeypatch.setenv("QUSTREAM_LOG_LEVEL", "debug")
    monkeypatch.setenv("QUSTREAM_REDIS_URL", "rediss://:pw@redis:6380/1")
    settings = Settings()
    assert (settings.kafka_bootstrap, settings.log_level) == ("kafka-1:9092,kafka-2:9093", "DEBUG")
    for model in ("Qwen/Qwen2.5-1.5B-Instruct", "gpt2", "models/ecommerce"):  # hub ids: checked when loaded
        monkeypatch.setenv("QUSTREAM_MODEL", model)
        assert Settings().model == model


def test_config_refuses_a_spec_the_worker_would_refuse() -> None:
    env = {**os.environ, "QUSTREAM_PARSE_SPEC": "no_such_spec"}
    done = subprocess.run([sys.executable, "-m", "streams.cli", "config"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "no_such_spec" in done.stdout + done.stderr, done.stdout + done.stderr


@pytest.mark.parametrize("command", [["worker"], ["replay", "/dev/null"]], ids=["worker", "producer tool"])
def test_commands_exit_2_naming_the_setting_and_hiding_its_value(command: list[str]) -> None:
    env = {**os.environ, "QUSTREAM_REDIS_URL": "http://:hunter2@redis:6379/0"}
    done = subprocess.run([sys.executable, "-m", "streams.cli", *command], env=env, capture_output=True, text=True,
                          timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "QUSTREAM_REDIS_URL" in output and "hunter2" not in output


def test_the_stop_grace_is_a_setting_that_says_how_it_fits_the_orchestrators_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().stop_grace_s == 10.0
    monkeypatch.setenv("QUSTREAM_STOP_GRACE_S", "20")
    assert Settings().stop_grace_s == 20.0
    described = Settings.model_fields["stop_grace_s"].description or ""
    assert "terminationGracePeriodSeconds" in described and "worker.stop_grace_exceeded" in described


def test_every_setting_says_what_it_means_and_config_describe_lists_them_all() -> None:
    undocumented = [name for name, info in Settings.model_fields.items() if not (info.description or "").strip()]
    assert not undocumented, f"settings without a description: {undocumented}"
    done = subprocess.run([sys.executable, "-m", "streams.cli", "config", "--describe"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 0, done.stderr
    for name in Settings.model_fields:
        assert f"QUSTREAM_{name.upper()}" in done.stdout, name


def test_a_model_that_cannot_be_loaded_stops_the_worker_naming_the_setting(tmp_path: Path) -> None:
    """A hub id that looks right but cannot be loaded passes the settings check; the model's load
    then stops the worker with exit 2 and one line naming QUSTREAM_MODEL, not the loader's traceback."""
    env = {**os.environ, "QUSTREAM_TRANSPORT": "redis", "QUSTREAM_WEB_PORT": "0", "HF_HUB_OFFLINE": "1",
           "QUSTREAM_MODEL": "nosuch-org/no-such-model", "HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "streams.cli", "worker"], env=env, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "error: QUSTREAM_MODEL: 'nosuch-org/no-such-model' could not be loaded" in output, output
    assert "Traceback" not in output, output
