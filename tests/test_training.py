"""`qustream train` and `qustream label` on a tiny randomly initialised model (the real tokenizer).

The same code path as the real run: labelled rows become the engine's own token stream, a few
training steps lower the loss, the saved folder is a plain transformers folder with its card, and a
`qustream worker` subprocess serves it end to end. Bad rows are reported line by line and skipped.
`qustream eval` scores such a labelled set, and refuses bad input in one line before loading the model.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from producer_tools.label import parsed_event_item, provenance_path
from schemas.settings import Settings
from schemas.spec import load_spec, parse_spec_data
from streams.cli import app, register_plugin_commands
from streams.topics import ensure_topics
from tests.engine_fixtures import tiny_folder
from tests.support import WorkerProcess, read_topic, run, write_autoparts_spec
from workers.engine import ConstrainedEngine, build_engine, engine_version, version_for
from workers.evaluation import load_quality
from workers.grammar import spec_vocabulary
from workers.model import MODEL_CARD, card_for, load_model, resolve_adapter
from workers.training import (
    ADAPTER_FOLDER,
    CHART,
    FINAL_LR_FRACTION,
    REPORT,
    WARMUP_STEPS,
    TrainingError,
    TrainOptions,
    choose_precision,
    learning_rate_factor,
    load_training_data,
    parameter_count,
    split_records,
    teach,
    train,
    without_own_mentions,
)

__all__ = ["tiny_folder"]

ECOMMERCE = load_spec("ecommerce")
register_plugin_commands([])  # `qustream label` comes from producer_tools' entry point, as on the command line
GOOD = [
    {"query": "womens leather boots", "product_type": "boot", "audience": "women", "material": "leather"},
    {"query": "samsung 55 inch tv", "product_type": "tv", "brand": "samsung", "size": "55 inch"},
    {"query": "red cotton t shirt", "product_type": "t shirt", "color": "red", "material": "cotton"},
    {"query": "kids rain boots", "product_type": "rain boot", "audience": "kids"},
    {"query": "stainless steel water bottle", "product_type": "water bottle", "material": "stainless steel"},
    {"query": "adidas sneakers men", "product_type": "sneaker", "brand": "adidas", "audience": "men"},
    {"query": "black wool blanket", "product_type": "blanket", "color": "black", "material": "wool"},
    {"query": "apple phone case", "product_type": "phone case", "brand": "apple"},
    {"query": "baby girl dress", "product_type": "dress", "audience": ["baby", "girls"]},
    {"query": "queen size bed sheets", "product_type": "bed sheet", "size": "queen size"},
]
#: Line (1-based, after the good rows) -> the reason's telling words.
BAD: list[tuple[str, str]] = [
    ('{"query": "oak desk"', "invalid JSON"),
    ('{"product_type": "desk"}', "no 'query'"),
    ('{"query": "oak desk", "product_type": "desk", "style": "modern"}', "unknown fields ['style']"),
    ('{"query": "plaid scarf", "product_type": "scarf", "color": "plaid"}', "'plaid' is not a value of its vocabulary"),
    ('{"query": "blue jeans", "product_type": "jeans", "color": "red"}', "no surface form of 'red' occurs"),
    ('{"query": "running shoes", "product_type": "sandal"}', "'sandal' is not a run of the query's words"),
    ('{"query": "mens socks", "product_type": "sock", "brand": 7}', "expected a value, a list"),
    ('["a list"]', "not an object"),
]


def write_data(path: Path, bad: bool = True) -> Path:
    lines = [json.dumps(row) for row in GOOD] + ([line for line, _ in BAD] if bad else [])
    path.write_text("\n".join(lines) + "\n")
    return path




def tiny_settings(folder: Path, **overrides: Any) -> Settings:
    return Settings(**{"model": str(folder), "device": "cpu", "cpu_threads": 2, "parse_spec": "ecommerce",
                       **overrides})


@pytest.fixture(scope="module")
def trained(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A few steps on the same batch (10 good rows, 2 held out): the loss must fall."""
    work = tmp_path_factory.mktemp("trained")
    data = write_data(work / "labels.jsonl")
    options = TrainOptions(data=data, out=work / "model", max_steps=12, max_epochs=20, batch_size=8,
                           learning_rate=3e-3, held_out=2, patience=100, progress=False, catalog_folds=1)
    return options.out, train(tiny_settings(tiny_folder), options)


def test_training_lowers_the_loss_and_saves_a_model_card(trained: tuple[Path, dict[str, Any]],
                                                         tiny_folder: Path) -> None:
    folder, report = trained
    losses = [loss for _, loss in report["losses"]]
    assert len(losses) == 12 and report["stopped"] == "max steps"
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    assert report["train_rows"] == 8 and report["held_out_rows"] == 2 and report["catalog_folds"] == 1
    assert [e["step"] for e in report["evals"]][:2] == [0, 1]  # the base model, then every epoch (one batch)
    assert report["peak_rss_mb"] > 0 and report["method"] == "full"
    assert {"product_type_acc", "all_fields_acc", "invented_absent"} <= set(report["best"])
    assert (folder / REPORT).is_file() and (folder / CHART).stat().st_size > 0
    card = json.loads((folder / MODEL_CARD).read_text())
    assert card["spec"] == {**ECOMMERCE.ref, "fingerprint": ECOMMERCE.fingerprint}
    assert card["few_shot"] is False and card["weights"]
    # The engine reads the card: no examples in the prompt, and a version of its own.
    engine = build_engine(tiny_settings(folder))
    assert isinstance(engine, ConstrainedEngine) and not engine.few_shot
    assert engine.version != engine_version(str(folder), ECOMMERCE, "catalog")
    assert version_for(tiny_settings(folder)) == engine.version  # what the worker opens its cache with
    base = build_engine(tiny_settings(tiny_folder))
    assert isinstance(base, ConstrainedEngine) and base.few_shot
    assert len(engine._prefix_ids) < len(base._prefix_ids)
    assert [r.parse.keys() for r in engine.parse_batch(["blue jeans"])] == [dict.fromkeys(ECOMMERCE.field_names).keys()]


def test_a_trained_model_under_another_spec_is_warned_about_once(trained: tuple[Path, dict[str, Any]]) -> None:
    from structlog.testing import capture_logs

    folder, _ = trained
    for spec, event, few_shot in (("ecommerce_few_shot", "engine.card_spec_changed", False),
                                  ("furniture", "engine.card_spec_mismatch", True)):
        settings = Settings(model=str(folder), device="cpu", cpu_threads=2, parse_spec=spec)
        with capture_logs() as logs:
            version = version_for(settings)  # what the worker computes before the model loads
            engine = build_engine(settings)
        assert [e["event"] for e in logs if e["event"].startswith("engine.card")] == [event], spec
        assert isinstance(engine, ConstrainedEngine) and engine.few_shot is few_shot
        assert engine.version == version


def test_bench_scores_a_trained_folder_again_without_training(trained: tuple[Path, dict[str, Any]],
                                                               tiny_folder: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.train_bench import run_train_bench

    folder, report = trained
    card = (folder / MODEL_CARD).read_text()
    monkeypatch.setenv("QUSTREAM_MODEL", str(tiny_folder))
    monkeypatch.setenv("QUSTREAM_DEVICE", "cpu")
    options = TrainOptions(data=Path("unused.jsonl"), out=folder, max_steps=1)
    bench = run_train_bench("ecommerce", Path("unused.jsonl"), Path("tests/data/quality_ecommerce.jsonl"),
                            tmp_path / "out", folder, options, eval_limit=4, score_only=True)
    assert (folder / MODEL_CARD).read_text() == card  # nothing was trained
    assert bench["score_only"] and bench["training"]["steps"] == report["steps"]
    assert [v["model"] for v in bench["variants"]] == [str(tiny_folder), str(folder)]
    assert all(v["queries"] == 4 for v in bench["variants"])
    assert bench["spec"]["fingerprint"] == ECOMMERCE.fingerprint == bench["trained_for_spec"]["fingerprint"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["score_only"] is True
    with pytest.raises(FileNotFoundError, match="nothing trained there"):
        run_train_bench("ecommerce", Path("unused.jsonl"), Path("tests/data/quality_ecommerce.jsonl"),
                        tmp_path / "out", tmp_path / "empty", options, eval_limit=4, score_only=True)


def test_bad_rows_are_reported_line_by_line_and_skipped(trained: tuple[Path, dict[str, Any]],
                                                       tiny_folder: Path, tmp_path: Path) -> None:
    _, report = trained
    expected = [(len(GOOD) + index + 1, words) for index, (_, words) in enumerate(BAD)]
    assert [row["line"] for row in report["skipped"]] == [line for line, _ in expected]
    for row, (_, words) in zip(report["skipped"], expected, strict=True):
        assert words in row["reason"], row
    # What is kept is the engine's own token stream: decoding it gives the prompt suffix and the output.
    settings = tiny_settings(tiny_folder)
    loaded = load_model(settings)
    engine = ConstrainedEngine(settings, loaded, ECOMMERCE)
    data = load_training_data(engine, write_data(tmp_path / "labels.jsonl", bad=False))
    assert not data.problems and len(data.rows) == len(GOOD)
    text = loaded.tokenizer.decode(list(data.rows[0].ids))
    assert text.startswith(" womens leather boots\nJSON: {\"product_type\": \"boots\"")
    # Material and audience are forced (``fill: mentioned``), so the model's last decision is the size;
    # forced text after it is never fed.
    assert text.endswith('"size": null')
    # A run of the query's words that the spec's grammar never writes: under the narrower grammar
    # product_type takes the catalogued mention ("jacket"), so a "rain jacket" label would teach what
    # serving cannot decode.
    unwritable = tmp_path / "unwritable.jsonl"
    unwritable.write_text(json.dumps({"query": "kids rain jacket", "product_type": "rain jacket"}) + "\n")
    narrow = ConstrainedEngine(settings, loaded, load_spec("ecommerce_few_shot"))
    problems = load_training_data(narrow, unwritable).problems
    assert [(n, "offers no value written 'rain jacket'" in reason) for n, reason in problems] == [(1, True)]


def test_a_worker_serves_the_trained_folder(trained: tuple[Path, dict[str, Any]],
                                            make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    folder, _ = trained
    settings = make_settings(batch_size=8, parse_spec="ecommerce", model=str(folder), device="cpu")
    run(ensure_topics(settings))
    queries = ["mens leather wallet", "blue cotton socks", "samsung tv"]
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        from tests.test_pipeline_kafka import produce

        run(produce(settings, [(f"t{i}".encode(), q.encode()) for i, q in enumerate(queries)]))
        records = run(read_topic(settings, settings.topic_parsed, until=len(queries), timeout_s=120))
    finally:
        worker.stop()
    events = [json.loads(record.value) for record in records]
    assert sorted(e["query"] for e in events) == sorted(queries)
    for event in events:
        assert event["model"] == str(folder) and event["spec"] == ECOMMERCE.ref
        ECOMMERCE.parse_model.model_validate(event["parse"])


def test_label_from_gold_labels_in_a_log(tmp_path: Path) -> None:
    log = write_data(tmp_path / "log.jsonl")
    with log.open("a") as handle:
        handle.write(json.dumps(GOOD[0]) + "\n")  # a repeat is written once
    out = tmp_path / "labels.jsonl"
    result = CliRunner().invoke(app, ["label", str(log), "--out", str(out), "--spec", "ecommerce"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # "style" is spelt like no field of the spec: the log's metadata, left out (and said to be).
    assert [row["query"] for row in rows] == [row["query"] for row in GOOD] + ["oak desk"]
    assert rows[1] == {"query": "samsung 55 inch tv", "product_type": "tv", "brand": "samsung", "size": "55 inch",
                       "color": None, "material": None, "audience": None}
    provenance = json.loads(provenance_path(out).read_text())
    assert provenance["labels"] == "gold" and provenance["teacher"] is None
    assert provenance["spec"]["name"] == "ecommerce" and provenance["spec"]["fingerprint"] == ECOMMERCE.fingerprint
    assert provenance["count"] == len(GOOD) + 1 and provenance["repeats"] == 1
    assert provenance["ignored_keys"] == {"style": 1}
    # The invalid-JSON line is the replay reader's bad line; the others fail the training check.
    assert {row["where"] for row in provenance["skipped_rows"]} == {f"{log}:{len(GOOD) + i + 1}"
                                                                    for i in range(len(BAD)) if i != 2}
    assert load_quality(ECOMMERCE, out)  # and `qustream eval` reads it


def test_label_with_a_teacher(tiny_folder: Path, tmp_path: Path) -> None:
    log = tmp_path / "queries.csv"
    log.write_text("query,locale\n" + "".join(f"{row['query']},en\n" for row in GOOD))
    out = tmp_path / "teacher.jsonl"
    result = CliRunner().invoke(app, ["label", str(log), "--out", str(out), "--spec", "ecommerce",
                                      "--model", str(tiny_folder), "--grounding", "catalog"],
                                env={"QUSTREAM_DEVICE": "cpu"})
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(GOOD) and all(list(row) == ["query", *ECOMMERCE.field_names] for row in rows)
    provenance = json.loads(provenance_path(out).read_text())
    assert provenance["teacher"]["model"] == str(tiny_folder) and provenance["grounding"] == "catalog"
    assert provenance["labels"] == "teacher" and provenance["teacher"]["engine_version"]
    # Teacher labels are training data: the training loader takes every row.
    settings = tiny_settings(tiny_folder)
    engine = ConstrainedEngine(settings, load_model(settings), ECOMMERCE)
    assert load_training_data(engine, out).problems == []


def test_train_command_refuses_data_without_usable_rows(tiny_folder: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(line for line, _ in BAD) + "\n")
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--spec",
                                      "ecommerce", "--model", str(tiny_folder), "--max-steps", "1"],
                                env={"QUSTREAM_DEVICE": "cpu", "COLUMNS": "400"})
    assert result.exit_code != 0
    assert "skipped: invalid JSON" in result.output and "0 usable rows" in result.output


def test_resume_goes_on_from_the_checkpoint(tiny_folder: Path, tmp_path: Path) -> None:
    data = write_data(tmp_path / "labels.jsonl", bad=False)
    options = TrainOptions(data=data, out=tmp_path / "model", max_steps=2, batch_size=4, learning_rate=3e-3,
                           held_out=2, eval_every=1, patience=100, progress=False)
    first = train(tiny_settings(tiny_folder), options)
    options.max_steps, options.resume = 4, True
    resumed = train(tiny_settings(tiny_folder), options)
    assert [step for step, _ in resumed["losses"]] == [1, 2, 3, 4]
    assert resumed["losses"][:2] == first["losses"]
    assert [e["step"] for e in resumed["evals"]] == [0, 1, 2, 3, 4]
    # Another run's checkpoint (other data) is refused, not silently mixed in.
    options.data = write_data(tmp_path / "other.jsonl")
    with pytest.raises(TrainingError, match="another run"):
        train(tiny_settings(tiny_folder), options)


@pytest.fixture(scope="module")
def lora_trained(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    work = tmp_path_factory.mktemp("lora")
    options = TrainOptions(data=write_data(work / "labels.jsonl", bad=False), out=work / "model", max_steps=3,
                           batch_size=8, method="lora", lora_rank=4, learning_rate=3e-2, held_out=2,
                           progress=False, catalog_folds=1)
    return options.out, train(tiny_settings(tiny_folder), options)


def test_lora_adapters_are_merged_into_a_plain_folder(lora_trained: tuple[Path, dict[str, Any]],
                                                      tiny_folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder, report = lora_trained
    assert report["method"] == "lora" and report["trainable_parameters"] < report["parameters"] / 10
    saved = AutoModelForCausalLM.from_pretrained(folder)
    assert not [name for name, _ in saved.named_parameters() if "lora" in name]
    base = AutoModelForCausalLM.from_pretrained(tiny_folder)
    assert parameter_count(saved) == parameter_count(base)


def test_a_lora_run_saves_its_adapter_which_serves_like_the_merged_folder(
        lora_trained: tuple[Path, dict[str, Any]], tiny_folder: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder, report = lora_trained
    adapter = folder / ADAPTER_FOLDER
    assert report["adapter_folder"] == str(adapter)
    assert {t.dtype for t in load_file(adapter / "adapter_model.safetensors").values()} == {torch.bfloat16}
    card = json.loads((adapter / MODEL_CARD).read_text())
    assert card["spec"]["fingerprint"] == ECOMMERCE.fingerprint and card["base_model"] == str(tiny_folder)
    assert card["weights"] != json.loads((folder / MODEL_CARD).read_text())["weights"]
    merged = build_engine(tiny_settings(folder))
    with_adapter = build_engine(tiny_settings(tiny_folder, adapter=str(adapter)))
    base = build_engine(tiny_settings(tiny_folder, adapter="none"))
    assert isinstance(with_adapter, ConstrainedEngine) and isinstance(base, ConstrainedEngine)
    assert with_adapter.loaded.card == card and not with_adapter.few_shot and base.few_shot
    assert merged.loaded.card is not None and merged.loaded.card["weights"] != card["weights"]
    # A version of its own, known before the model loads (the worker opens its cache with it).
    assert len({with_adapter.version, base.version, merged.version}) == 3
    assert version_for(tiny_settings(tiny_folder, adapter=str(adapter))) == with_adapter.version
    # The adapter holds the weights the merged folder holds (the best of the run: on a random model, the
    # untrained ones, so a copy with random deltas shows that loading merges them at all).
    moved = folder / "moved-adapter"
    shutil.copytree(adapter, moved)
    generator = torch.Generator().manual_seed(0)
    weights = load_file(moved / "adapter_model.safetensors")
    save_file({name: torch.randn(t.shape, generator=generator).to(t.dtype) for name, t in weights.items()},
              moved / "adapter_model.safetensors")
    ids = torch.tensor([with_adapter._prefix_ids])
    models = [load_model(settings).model for settings in (
        tiny_settings(tiny_folder, adapter=str(adapter)), tiny_settings(folder), tiny_settings(tiny_folder),
        tiny_settings(tiny_folder, adapter=str(moved)))]
    with torch.no_grad():
        served, reference, untrained, perturbed = (model(ids).logits for model in models)
    assert (served - reference).abs().max() < 1e-3
    assert (perturbed - untrained).abs().max() > 0.1


def test_bench_scores_a_lora_student_as_its_adapter(lora_trained: tuple[Path, dict[str, Any]], tiny_folder: Path,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.train_bench import run_train_bench

    folder, _ = lora_trained
    monkeypatch.setenv("QUSTREAM_MODEL", str(tiny_folder))
    monkeypatch.setenv("QUSTREAM_DEVICE", "cpu")
    options = TrainOptions(data=Path("unused.jsonl"), out=folder, max_steps=1)
    bench = run_train_bench("ecommerce", Path("unused.jsonl"), Path("tests/data/quality_ecommerce.jsonl"),
                            tmp_path / "out", folder, options, eval_limit=4, score_only=True)
    adapter_card = json.loads((folder / ADAPTER_FOLDER / MODEL_CARD).read_text())
    assert bench["training"]["adapter_folder"] == str(folder / ADAPTER_FOLDER)
    # What ships is the adapter over the base model: the student's model id is the base's.
    assert [v["model"] for v in bench["variants"]] == [str(tiny_folder), str(tiny_folder)]
    assert bench["variants"][1]["version"] == engine_version(str(tiny_folder), ECOMMERCE, "catalog", adapter_card)
    assert bench["variants"][0]["version"] == engine_version(str(tiny_folder), ECOMMERCE, "catalog")


def test_auto_takes_a_shipped_adapter_only_for_its_own_spec_and_model(
        lora_trained: tuple[Path, dict[str, Any]], tiny_folder: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from workers import model as model_module

    folder, _ = lora_trained
    shipped = tmp_path / "adapters"
    shutil.copytree(folder / ADAPTER_FOLDER, shipped / "ecommerce")
    monkeypatch.setattr(model_module, "SHIPPED_ADAPTERS", shipped)
    assert resolve_adapter(tiny_settings(tiny_folder), ECOMMERCE.fingerprint) == shipped / "ecommerce"
    assert card_for(tiny_settings(tiny_folder), ECOMMERCE.fingerprint) == json.loads(
        (shipped / "ecommerce" / MODEL_CARD).read_text())
    few_shot = load_spec("ecommerce_few_shot")
    assert resolve_adapter(tiny_settings(tiny_folder), few_shot.fingerprint) is None  # another grammar
    assert resolve_adapter(tiny_settings(folder), ECOMMERCE.fingerprint) is None  # another model
    assert resolve_adapter(tiny_settings(tiny_folder, adapter="none"), ECOMMERCE.fingerprint) is None
    engine = build_engine(tiny_settings(tiny_folder))
    assert isinstance(engine, ConstrainedEngine) and not engine.few_shot
    assert engine.version == version_for(tiny_settings(tiny_folder))


def test_a_folder_that_is_no_adapter_stops_the_worker_at_start_with_the_setting_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"adapter\n.*not an adapter folder \(no adapter_config.json\)"):
        Settings(adapter=str(tmp_path))
    env = {**os.environ, "QUSTREAM_ADAPTER": str(tmp_path), "QUSTREAM_WEB_PORT": "0",
           "QUSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    started = subprocess.run([sys.executable, "-m", "streams.cli", "worker"], capture_output=True, text=True,
                             env=env, timeout=60)
    assert started.returncode == 2, started.stdout + started.stderr
    assert "adapter" in started.stderr and "not an adapter folder" in started.stderr


def test_label_takes_the_parsed_topics_events_made_under_the_spec() -> None:
    event = {"query": "Red Cotton T Shirt", "parse": {"product_type": "t shirt", "color": "red"},
             "spec": ECOMMERCE.ref}
    item = parsed_event_item(ECOMMERCE, {"topic": "queries.parsed", "partition": 0, "offset": 7, "value": event})
    assert item.where == "queries.parsed[0]@7" and item.record is not None
    assert item.record["color"] == "red" and "material" in item.record
    other = parsed_event_item(ECOMMERCE, {"topic": "t", "partition": 0, "offset": 8,
                                          "value": {**event, "spec": {"name": "furniture", "version": "1"}}})
    assert other.record == {"query": "Red Cotton T Shirt"}  # another contract's parse is no label here
    broken = parsed_event_item(ECOMMERCE, {"topic": "t", "partition": 0, "offset": 9, "value": "not json"})
    assert broken.record is None and broken.problem


def test_learning_rate_warms_up_then_decays_to_its_floor_by_steps_or_time() -> None:
    warm = [learning_rate_factor(step, progress=0.0) for step in range(WARMUP_STEPS)]
    assert warm == sorted(warm) and warm[0] < 0.1 and warm[-1] == 1.0
    decay = [learning_rate_factor(WARMUP_STEPS + 1, progress=p / 10) for p in range(11)]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert decay[0] == 1.0 and decay[-1] == pytest.approx(FINAL_LR_FRACTION)
    assert learning_rate_factor(10_000, progress=3.0) == pytest.approx(FINAL_LR_FRACTION)  # past the budget


def test_bf16_steps_lower_the_loss_and_fp32_is_kept_where_asked(tiny_folder: Path, tmp_path: Path) -> None:
    assert choose_precision("cpu", "fp32") == "fp32" and choose_precision("cuda:0", "bf16") == "bf16"
    data = write_data(tmp_path / "labels.jsonl", bad=False)
    options = TrainOptions(data=data, out=tmp_path / "model", max_steps=12, max_epochs=20, batch_size=8,
                           learning_rate=3e-3, held_out=2, patience=100, progress=False, precision="bf16",
                           catalog_folds=1)
    report = train(tiny_settings(tiny_folder), options)
    losses = [loss for _, loss in report["losses"]]
    assert report["precision"] == "bf16"
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    # Weights stay float32: the saved model serves as any other.
    import torch
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(options.out)
    assert {p.dtype for p in saved.parameters()} == {torch.float32}


def test_each_fold_is_taught_under_the_catalog_without_the_mentions_only_it_labels(tiny_folder: Path,
                                                                                  tmp_path: Path) -> None:
    vocabulary = spec_vocabulary(ECOMMERCE)
    own = [{"query": "apple backpack", "product_type": "backpack", "brand": "apple"}]
    # Another fold labels the same product type in the other number: the catalog keeps it.
    others = [{"query": "samsung backpacks", "product_type": "backpacks", "brand": "samsung"}]
    kept, dropped = without_own_mentions(ECOMMERCE, vocabulary, own, others)
    assert dropped == 1 and "apple" not in kept.field("brand").mentions and "apple" in ECOMMERCE.field("brand").mentions
    assert "backpack" in kept.field("product_type").mentions
    alone, dropped = without_own_mentions(ECOMMERCE, vocabulary, own, [])
    assert dropped == 2 and "backpack" not in alone.field("product_type").mentions
    # Under the full catalog the product type and brand are forced text; without them, the model chooses.
    settings = tiny_settings(tiny_folder)
    loaded = load_model(settings)
    full = teach(ConstrainedEngine(settings, loaded, ECOMMERCE), 1, own[0])
    cross_fitted = teach(ConstrainedEngine(settings, loaded, alone), 1, own[0])
    assert full is not None and cross_fitted is not None
    assert len(cross_fitted.chosen) > len(full.chosen)
    # A query's repeats stay on one side of the held-out split, which holds out at most a fifth.
    queries = ["a", "b", "a", "c", "a", "d", "e", "f", "g", "h"]
    records = [(n, {"query": q}) for n, q in enumerate(queries, 1)]
    for seed in range(20):
        kept_records, held = split_records(records, 5, seed=seed)
        assert 1 <= len(held) <= 2 and len(kept_records) + len(held) == len(records)
        assert "a" not in {r["query"] for _, r in held}  # its three repeats would pass a fifth
    # A field whose every mention is dropped falls back to the model's choice (``fill: mentioned`` needs some).
    tools = parse_spec_data({
        "name": "tools", "version": "1", "description": "hand tools",
        "fields": [{"name": "maker", "kind": "span", "description": "The maker.", "fill": "mentioned",
                    "mentions": ["stanley"], "extend_mentions": True}]})
    bare, dropped = without_own_mentions(tools, spec_vocabulary(tools), [{"query": "stanley saw", "maker": "stanley"}],
                                         [{"query": "a saw", "maker": None}])
    assert dropped == 1 and bare.field("maker").mentions == [] and bare.field("maker").fill == "model"
    assert not bare.field("maker").extend_mentions
    # The run reports the folds and what each went without (under the narrower grammar, where a shorter
    # catalogued mention is forced).
    options = TrainOptions(data=write_data(tmp_path / "labels.jsonl", bad=False), out=tmp_path / "model",
                           max_steps=1, batch_size=8, held_out=2, progress=False, catalog_folds=3)
    report = train(tiny_settings(tiny_folder, parse_spec="ecommerce_few_shot"), options)
    assert report["catalog_folds"] == 3 and len(report["mentions_dropped_per_fold"]) == 4
    assert report["rows"] == len(GOOD) and report["held_out_rows"] == 2
    # The rows a fold's catalog cannot write say so ("t shirt" where only "shirt" is left to force).
    fold_skips = [row for row in report["skipped"] if "(fold " in row["reason"]]
    assert fold_skips and all(row["line"] <= len(GOOD) for row in fold_skips)
    assert report["train_rows"] == len(GOOD) - 2 - len(fold_skips)


# -- qustream eval ---------------------------------------------------------------------------------
#: The bad rows of a wrong shape; the others hold labels the spec cannot write, which eval scores (as misses).
BAD_SHAPE = [bad for bad in BAD if not any(words in bad[1] for words in ("vocabulary", "occurs", "query's words"))]


def eval_cli(*args: str) -> Result:
    return CliRunner().invoke(app, ["eval", *args], env={"QUSTREAM_DEVICE": "cpu", "COLUMNS": "400"})


def assert_refused(result: Result, message: str) -> None:
    """Exit 2 with one ``error:`` line, not a traceback."""
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert f"error: {message}" in result.output and "Traceback" not in result.output, result.output


def unloadable_model(folder: Path) -> Path:
    """A folder the settings take for a model (it has a config.json) that no loader can read: a command that
    loads the model before checking the rest of its input stops on the model instead."""
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_eval_refuses_an_unknown_spec_like_the_worker() -> None:
    assert_refused(eval_cli("--spec", "nope"), "unknown built-in parse spec 'nope'; built-in specs: ")


@pytest.mark.parametrize(("line", "words"), BAD_SHAPE, ids=[words for _, words in BAD_SHAPE])
def test_eval_names_the_file_and_line_of_a_bad_row_before_loading_the_model(tmp_path: Path, line: str,
                                                                           words: str) -> None:
    data = tmp_path / "labels.jsonl"
    data.write_text(json.dumps(GOOD[0]) + "\n" + line + "\n" + json.dumps(GOOD[1]) + "\n")
    result = eval_cli("--spec", "ecommerce", "--queries", str(data), "--model", str(unloadable_model(tmp_path / "m")))
    assert_refused(result, f"{data}:2: ")
    assert words in result.output, result.output


def test_eval_without_a_labelled_set_says_so_before_loading_the_model(tmp_path: Path) -> None:
    spec = write_autoparts_spec(tmp_path / "spec")
    result = eval_cli("--spec", str(spec), "--model", str(unloadable_model(tmp_path / "m")))
    assert_refused(result, "no labelled set at ")
    assert "quality_autoparts.jsonl; pass --queries" in result.output


#: Autoparts rows (tests/support.py): `system` is a category of a closed set, `position` a vocabulary.
CATEGORY_ROWS = [
    {"query": "front brake pads", "part": "brake pad", "position": "front", "system": "brakes"},
    {"query": "rear shock absorber", "part": "shock absorber", "system": "suspenion"},  # a typo of the label
    {"query": "radiator hose", "part": "radiator hose", "system": ["Cooling", "engine"]},  # case aside: a label
    {"query": "spark plug", "part": "spark plug", "system": ["engine", "ignition"]},  # one label outside the set
]


def test_eval_refuses_a_category_label_outside_the_set_before_loading_the_model(tmp_path: Path) -> None:
    spec = write_autoparts_spec(tmp_path / "spec")
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CATEGORY_ROWS))
    result = eval_cli("--spec", str(spec), "--queries", str(data), "--model", str(unloadable_model(tmp_path / "m")))
    assert_refused(result, f"{data}:2: field 'system': 'suspenion' is not one of ['brakes', ")
    assert f"{data}:4: field 'system': 'ignition' is not one of [" in result.output, result.output  # every bad line


def test_training_skips_a_category_label_outside_the_set_line_by_line(tmp_path: Path) -> None:
    from workers.training import read_labelled

    spec = load_spec(write_autoparts_spec(tmp_path / "spec"))
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CATEGORY_ROWS))
    records, problems = read_labelled(spec, spec_vocabulary(spec), data)
    assert [number for number, _ in records] == [1, 3]
    assert [number for number, _ in problems] == [2, 4]
    assert "'suspenion' is not one of" in problems[0][1] and "'ignition' is not one of" in problems[1][1]


def test_eval_names_a_model_it_cannot_load_and_scores_with_one_it_can(tiny_folder: Path, tmp_path: Path) -> None:
    prefix = "QUSTREAM_MODEL / --model {!r} is neither a model folder nor a hub id that can be loaded: "
    absent = tmp_path / "nomodel"
    assert_refused(eval_cli("--model", str(absent)), prefix.format(str(absent)))
    broken = unloadable_model(tmp_path / "broken")
    assert_refused(eval_cli("--spec", "ecommerce", "--model", str(broken)), prefix.format(str(broken)))
    # Labels no grounding can write are scored, as misses, where training would skip them.
    unwritable = [line for line, words in BAD if (line, words) not in BAD_SHAPE]
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(f"{line}\n" for line in [json.dumps(GOOD[0]), *unwritable]))
    metrics = tmp_path / "metrics.json"
    result = eval_cli("--spec", "ecommerce", "--model", str(tiny_folder), "--queries", str(data),
                      "--json", str(metrics))
    assert result.exit_code == 0, result.output
    report = json.loads(metrics.read_text())
    assert report["model"] == str(tiny_folder) and report["metrics"]["n"] == 1 + len(unwritable)
