"""`qustream train`'s checks and messages, on the tiny randomly initialised model of tests/test_training.py.

A run that never beats its step-0 evaluation says so instead of "serve it"; ``--out`` is checked before the
model loads (a file, a foreign folder), and so is `--data` (empty, or not labelled JSONL); a previous run's output is
replaced, but only what a run writes (user files in `--out` survive); Ctrl-C says where
the run got to and how to resume; a checkpoint of another run names the option that differs; skipped
lines are all shown when no report will hold them; an unwritable label names its field.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import Result
from typer.testing import CliRunner

from schemas.spec import parse_spec_data
from streams.cli import app
from tests.engine_fixtures import tiny_folder
from tests.test_training import GOOD, tiny_settings, unloadable_model, write_data
from workers.grammar import spec_vocabulary
from workers.model import MODEL_CARD, load_model
from workers.training import ADAPTER_FOLDER, CHECKPOINT, REPORT, BadRow, _remove_previous, check_out, teach

__all__ = ["tiny_folder"]

ENV = {"QUSTREAM_DEVICE": "cpu", "QUSTREAM_CPU_THREADS": "2", "COLUMNS": "400"}


def train_cli(*args: str) -> Result:
    return CliRunner().invoke(app, ["train", *args], env=ENV)


def quick(data: Path, out: Path, model: Path, *extra: str) -> list[str]:
    """A one-step run's arguments on the ecommerce spec (2 held-out rows, no folds)."""
    return ["--data", str(data), "--out", str(out), "--spec", "ecommerce", "--model", str(model), "--max-steps", "1",
            "--batch-size", "4", "--held-out", "2", "--catalog-folds", "1", *extra]


def test_a_run_that_never_beats_step_0_warns_instead_of_saying_serve_it(tiny_folder: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "labels.jsonl", bad=False)
    out = tmp_path / "m"
    # A learning rate that changes nothing: no evaluation after step 0 can beat it.
    result = train_cli(*quick(data, out, tiny_folder, "--learning-rate", "1e-12"))
    assert result.exit_code == 0, result.output
    assert "Serve it with" not in result.output, result.output
    assert "WARNING: NOT IMPROVED: no evaluation after step 0 beat step 0" in result.output
    assert "the saved weights are the base model's" in result.output
    assert "parse worse than the base model with them" in result.output  # few_shot false
    report = json.loads((out / REPORT).read_text())
    assert report["best_step"] == 0 and report["improved"] is False
    assert "no evaluation after step 0 beat step 0" in report["warning"]


def assert_refused_on_out(result: Result) -> None:
    """Exit 2 on ``--out`` (typer's usage error), not a traceback nor a model that fails to load."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "Invalid value for --out" in result.output and "Traceback" not in result.output, result.output


def test_out_that_is_a_file_or_a_foreign_folder_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    data = write_data(tmp_path / "labels.jsonl", bad=False)
    model = unloadable_model(tmp_path / "broken")  # a command that loaded it first would stop on the model
    afile = tmp_path / "model.bin"
    afile.write_text("x")
    result = train_cli(*quick(data, afile, model))
    assert_refused_on_out(result)
    assert "--out" in result.output and "is a file, not a folder" in result.output, result.output
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("x")
    result = train_cli(*quick(data, foreign, model))
    assert_refused_on_out(result)
    assert "holds no qustream training output" in result.output and "photos" in result.output, result.output
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]


def test_a_previous_output_is_replaced_but_user_files_in_out_survive_and_resume_without_checkpoint_starts_over(
        tiny_folder: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "labels.jsonl", bad=False)
    out = tmp_path / "m"
    lora = train_cli(*quick(data, out, tiny_folder, "--method", "lora", "--lora-rank", "2"))
    assert lora.exit_code == 0, lora.output
    assert (out / ADAPTER_FOLDER / MODEL_CARD).is_file()
    (out / "model-00002-of-00002.safetensors").write_text("stale shard")  # anything it left is gone after
    # The user's own files beside the model, the --data file among them: never touched.
    inside = shutil.copy(data, out / "labels.jsonl")
    (out / "evals").mkdir()
    (out / "evals" / "run1.json").write_text("{}")
    (out / "NOTES.md").write_text("x")
    full = train_cli(*quick(Path(inside), out, tiny_folder, "--method", "full"))
    assert full.exit_code == 0, full.output
    text = " ".join(full.output.split())
    assert "holds a previous training output" in text and "replaced" in text, text
    notice = text[text.index("holds a previous training output"):text.index(") are kept")]
    assert "adapter/" in notice and "model-00002-of-00002.safetensors" in notice, notice
    listed = notice[:notice.index("when this run saves")]
    for user_file in ("labels.jsonl", "NOTES.md", "evals"):
        assert user_file not in listed, listed
    assert not (out / ADAPTER_FOLDER).exists()  # QUSTREAM_ADAPTER=m/adapter would merge stale weights
    assert not (out / "model-00002-of-00002.safetensors").exists()
    assert (out / "labels.jsonl").read_text() == data.read_text()
    assert (out / "evals" / "run1.json").read_text() == "{}" and (out / "NOTES.md").read_text() == "x"
    assert json.loads((out / REPORT).read_text())["method"] == "full"
    assert (out / MODEL_CARD).is_file() and (out / CHECKPOINT).is_file()
    fresh = tmp_path / "fresh"
    resumed = train_cli(*quick(data, fresh, tiny_folder, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "nothing to resume" in resumed.output and "starts from scratch" in resumed.output, resumed.output


def test_the_data_file_is_never_removed_even_under_an_output_name(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    for name in (MODEL_CARD, "config.json", "tokenizer.json", "model.safetensors.index.json", "training.png",
                 "checkpoint.tmp", "model-00001-of-00003.safetensors", "pytorch_model-00001-of-00002.bin",
                 "chat_template.jinja", "labels.jsonl", "config.json.bak", "model.safetensors.md", "README.md"):
        (out / name).write_text("x")
    (out / ADAPTER_FOLDER).mkdir()
    (out / "data").mkdir()
    (out / "data" / "config.json").write_text("x")  # a folder of the user's: not the model's config
    data = out / "tokenizer.json"  # a --data file under a name the model's files use
    previous, note = check_out(out, resume=False, data=data)
    assert note is not None and "tokenizer.json" not in note.split("are kept")[0].split("(", 1)[1].split(")")[0]
    _remove_previous(out, previous, data)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["data", "labels.jsonl", "config.json.bak", "model.safetensors.md", "README.md", "tokenizer.json"])
    assert (out / "data" / "config.json").is_file()


def test_resume_names_every_option_that_differs_and_says_when_the_run_had_finished(
        tiny_folder: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "labels.jsonl", bad=False)
    out = tmp_path / "m"
    first = train_cli(*quick(data, out, tiny_folder))
    assert first.exit_code == 0, first.output
    assert "1 steps, stopped at the 1-step cap (--max-steps)" in " ".join(first.output.split()), first.output
    other = train_cli(*quick(data, out, tiny_folder, "--resume", "--seed", "1", "--learning-rate", "5e-4"))
    assert other.exit_code == 2, other.output
    text = " ".join(other.output.split())
    assert "--seed: 0 in the checkpoint, 1 now" in text, text
    assert "--learning-rate: 0.0001 in the checkpoint, 0.0005 now" in text, text
    assert "only --max-minutes, --max-steps, --max-epochs, --eval-every, --patience may change" in text, text
    # The same options after the run reached its cap: nothing to train, said so, and how to go on.
    again = train_cli(*quick(data, out, tiny_folder, "--resume"))
    assert again.exit_code == 0, again.output
    text = " ".join(again.output.split())
    assert "resumed from" in text and "had already reached its 1-step cap (--max-steps)" in text, text
    assert "raise --max-steps (now 1) to continue training" in text, text
    assert "already reached before --resume: nothing was trained" in text, text
    assert json.loads((out / REPORT).read_text())["steps"] == 1
    # A budget may change on resume: two more steps, then the epoch cap (8 train rows, 2 batches an epoch).
    longer = train_cli(*quick(data, out, tiny_folder, "--resume", "--max-steps", "3", "--max-epochs", "1"))
    assert longer.exit_code == 0, longer.output
    text = " ".join(longer.output.split())
    assert "resumed from" in text and "already reached" not in text, text
    assert "2 steps, stopped at the 1-epoch cap (--max-epochs)" in text, text
    epoch_cap = train_cli(*quick(data, out, tiny_folder, "--resume", "--max-steps", "3", "--max-epochs", "1"))
    text = " ".join(epoch_cap.output.split())
    assert epoch_cap.exit_code == 0 and "its 1-epoch cap (--max-epochs)" in text, text
    assert "raise --max-epochs (now 1)" in text, text


def test_data_that_is_not_labelled_jsonl_or_empty_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    model = unloadable_model(tmp_path / "broken")  # a command that loaded it first would stop on the model
    csv = tmp_path / "labels.csv"
    csv.write_text("query,product_type\nred boots,boot\n")
    renamed = tmp_path / "labels.jsonl"
    renamed.write_text(csv.read_text())
    for data in (csv, renamed):
        result = train_cli(*quick(data, tmp_path / "m", model))
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "Invalid value for --data" in text, text
        assert "train reads labelled JSONL" in text and f"qustream label {data} --spec ecommerce" in text, text
        assert "0 usable rows" not in text and "Traceback" not in text, text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = train_cli(*quick(empty, tmp_path / "m", model))
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "is empty: nothing to train on" in text, text
    assert not (tmp_path / "m").exists()


def test_a_checkpoint_of_another_spec_is_refused_naming_the_option(tiny_folder: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "labels.jsonl", bad=False)
    out = tmp_path / "m"
    assert train_cli(*quick(data, out, tiny_folder)).exit_code == 0
    args = quick(data, out, tiny_folder, "--resume")
    args[args.index("ecommerce")] = "ecommerce_few_shot"
    result = train_cli(*args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # the usage box wraps long lines
    assert "--resume" in text and "belongs to another run" in text and "--spec (its fingerprint)" in text, text
    assert "another --out" in text and "the options it was written with" in text
    # Only what differs: not the other eleven keys of the identity.
    for same in ("--data (", "--seed", "--batch-size", "'seed'", "!="):
        assert same not in text, text


def test_skipped_lines_are_all_listed_when_no_report_will_be_written(tiny_folder: Path, tmp_path: Path) -> None:
    # Labels of another spec: every line skipped (unknown fields), nothing to train on, no report.
    rows = [{"query": f"front brake pads {i}", "part": "brake pad", "position": "front"} for i in range(25)]
    data = tmp_path / "autoparts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = train_cli(*quick(data, tmp_path / "m", tiny_folder))
    assert result.exit_code == 2, result.output
    assert result.output.count("skipped: unknown fields") == 25, result.output
    assert "more skipped lines" not in result.output and "0 usable rows" in result.output
    assert not (tmp_path / "m" / REPORT).exists()
    # One query ten times: the split holds out whole queries.
    repeats = tmp_path / "repeats.jsonl"
    repeats.write_text("".join(json.dumps(GOOD[0]) + "\n" for _ in range(10)))
    result = train_cli(*quick(repeats, tmp_path / "m2", tiny_folder))
    assert result.exit_code == 2, result.output
    assert "10 checked rows of 1 distinct query" in " ".join(result.output.split()), result.output


def test_an_unwritable_null_names_its_field_and_what_the_grammar_forces(tiny_folder: Path) -> None:
    from workers.engine import ConstrainedEngine

    spec = parse_spec_data({
        "name": "autoparts", "version": "1", "description": "car parts",
        "fields": [{"name": "part", "kind": "span", "description": "The part."},
                   {"name": "make", "kind": "span", "description": "The make.", "fill": "mentioned",
                    "mentions": ["honda", "toyota"]}]})
    settings = tiny_settings(tiny_folder)
    engine = ConstrainedEngine(settings, load_model(settings), spec)
    assert teach(engine, 1, {"query": "brake pads honda civic", "part": "brake pads", "make": "honda"}) is not None
    try:
        teach(engine, 2, {"query": "brake pads honda civic", "part": "brake pads", "make": None})
    except BadRow as exc:
        reason = str(exc)
    else:
        raise AssertionError("a null make the grammar forces was taught")
    assert reason.startswith("field 'make': labelled null"), reason
    assert "'honda'" in reason and "fill: mentioned" in reason, reason
    assert spec_vocabulary(spec)  # the spec is a valid one


def test_ctrl_c_says_where_the_run_got_to_and_how_to_resume(tiny_folder: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "labels.jsonl", bad=False)
    out = tmp_path / "m"
    args = quick(data, out, tiny_folder)
    args[args.index("--max-steps") + 1] = "100000"
    command = [sys.executable, "-m", "streams.cli", "train", *args, "--max-epochs", "100000", "--eval-every", "2",
               "--patience", "100000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **ENV})
    try:
        deadline = time.monotonic() + 120
        while not (out / CHECKPOINT).is_file():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = " ".join((stdout + stderr).split())
    assert process.returncode == 130, text
    assert "interrupted at step " in text and "the model was not saved" in text, text
    assert f"the last checkpoint is {out / CHECKPOINT}, at step " in text and "--resume" in text, text
    assert "Traceback" not in text
