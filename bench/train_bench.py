"""``qustream bench train``: fine-tune the default model on labelled queries, then compare the student
with the few-shot base model on a labelled set, side by side: per-field accuracy, invented values,
all-fields-right, engine queries/s, training time and peak RSS.

The run whose adapter ships as ``workers/adapters/ecommerce`` (QueryNER train split, at most 40 minutes
of training on the 2-core CPU, then both models on the whole validation split):

    qustream bench queryner --split train --out /tmp/queryner_train_ecommerce.jsonl
    qustream bench train --spec ecommerce --base-spec ecommerce_few_shot --method lora \\
        --train-data /tmp/queryner_train_ecommerce.jsonl \\
        --eval-data tests/data/quality_ecommerce.jsonl --max-minutes 40 --eval-every 200 \\
        --out bench/results/train_ecommerce_lora/ --model-out /tmp/lora_student

The model folder goes to ``--model-out`` (default: under the model cache, not into the repository);
``--out`` gets ``report.json``, the training report and its chart.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Any

from schemas.settings import Settings
from workers.grammar import load_checked_spec
from workers.model import MODEL_CARD
from workers.training import ADAPTER_FOLDER, CHART, REPORT, TrainOptions, train

#: The issue's targets for the student against the few-shot base model.
TARGETS = {"all_fields_gain": 0.15, "product_type_acc": 0.85, "invented_absent": 0.03}


def evaluate_model(settings: Settings, eval_data: Path, limit: int, batch_size: int) -> dict[str, Any]:
    """One model through ``qustream eval``'s path: engine, warm-up, parse, score."""
    from workers.engine import build_engine
    from workers.evaluation import load_quality, parse_cases, score

    engine = build_engine(settings)
    cases = load_quality(engine.spec, eval_data)
    cases = cases[:limit] if limit else cases
    engine.warm_up()
    parses, flags, seconds = parse_cases(engine, cases, batch_size)
    result = {"model": engine.model_id, "version": engine.version, "few_shot": getattr(engine, "few_shot", True),
              "prompt_tokens": len(getattr(engine, "_prefix_ids", [])), "queries": len(cases),
              "seconds": seconds, "queries_per_s": len(cases) / seconds if seconds else 0.0,
              "metrics": score(engine.spec, cases, parses, flags)}
    del engine
    gc.collect()
    return result


def run_train_bench(
    spec: str, train_data: Path, eval_data: Path, out: Path, model_out: Path, options: TrainOptions,
    eval_limit: int = 0, batch_size: int = 32, score_only: bool = False, base_spec: str | None = None,
) -> dict[str, Any]:
    """Train (unless ``score_only``: the model in ``model_out`` and its training report are kept, e.g. to
    score it again under a changed spec), then score both models: the student under ``spec``, the few-shot
    base model under ``base_spec`` (default ``spec``: a spec written for a trained model may not suit it)."""
    base_settings = Settings(parse_spec=spec)
    options.data, options.out = train_data, model_out
    if score_only:
        if not (model_out / REPORT).exists():
            raise FileNotFoundError(f"{model_out / REPORT} not found: nothing trained there to score")
        training = json.loads((model_out / REPORT).read_text())
    else:
        training = train(base_settings, options)
    out.mkdir(parents=True, exist_ok=True)
    for name in (REPORT, CHART):
        if (model_out / name).exists():
            shutil.copy(model_out / name, out / name)
    scored_under, base_scored_under = load_checked_spec(spec), load_checked_spec(base_spec or spec)
    # Neither side takes a shipped adapter: the base is the model as it is, and a LoRA student is scored as
    # its adapter alone (what ships), merged into the base when it loads.
    base = evaluate_model(Settings(parse_spec=base_spec or spec, adapter="none"), eval_data, eval_limit, batch_size)
    adapter = model_out / ADAPTER_FOLDER
    student_settings = (Settings(parse_spec=spec, adapter=str(adapter)) if (adapter / MODEL_CARD).is_file()
                        else Settings(parse_spec=spec, model=str(model_out), adapter="none"))
    student = evaluate_model(student_settings, eval_data, eval_limit, batch_size)
    gain = student["metrics"]["all_fields_acc"] - base["metrics"]["all_fields_acc"]
    met = {
        "all_fields_gain": gain >= TARGETS["all_fields_gain"],
        "product_type_acc": student["metrics"].get("product_type_acc", 0.0) >= TARGETS["product_type_acc"],
        "invented_absent": student["metrics"]["invented_absent"] <= TARGETS["invented_absent"],
        "engine_speed": student["queries_per_s"] >= base["queries_per_s"],
    }
    report = {
        "spec": {**scored_under.ref, "fingerprint": scored_under.fingerprint}, "trained_for_spec": training["spec"],
        "base_spec": {**base_scored_under.ref, "fingerprint": base_scored_under.fingerprint},
        "score_only": score_only, "train_data": str(train_data), "eval_data": str(eval_data),
        "training": {key: training[key] for key in (
            "base_model", "method", "precision", "few_shot", "learning_rate", "parameters", "trainable_parameters",
            "rows", "train_rows", "held_out_rows", "steps", "epochs", "stopped", "train_seconds", "seconds",
            "peak_rss_mb", "best_step", "prefix_tokens", "tokens_per_row", "chosen_tokens_per_row",
            "catalog_folds", "mentions_dropped_per_fold")}
        | {"skipped_rows": len(training["skipped"]), "train_layers": options.train_layers,
           "batch_size": options.batch_size, "model_folder": str(model_out),
           "adapter_folder": str(adapter) if (adapter / MODEL_CARD).is_file() else None},
        "variants": [{"name": "base, few-shot", **base}, {"name": "student", **student}],
        "all_fields_gain": gain, "targets": TARGETS, "met": met,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    variants = report["variants"]
    table = Table(title=f"{report['spec']['name']} v{report['spec']['version']} · {variants[0]['queries']} queries "
                        f"of {report['eval_data']}")
    table.add_column("metric")
    for variant in variants:
        table.add_column(variant["name"], justify="right")
    for key in variants[0]["metrics"]:
        if key != "n":
            table.add_row(key, *(f"{v['metrics'][key]:.1%}" for v in variants))
    table.add_row("engine q/s", *(f"{v['queries_per_s']:.1f}" for v in variants))
    table.add_row("prompt prefix tokens", *(str(v["prompt_tokens"]) for v in variants))
    training = report["training"]
    console = Console(width=140)
    console.print(table)
    console.print(f"training: {training['method']} ({training['trainable_parameters']:,} of "
                  f"{training['parameters']:,} parameters), {training['steps']} steps ({training['epochs']:.2f} "
                  f"epochs, {training['stopped']}), {training['train_seconds']:.0f} s of steps, "
                  f"{training['seconds']:.0f} s in all, peak RSS {training['peak_rss_mb']:.0f} MB; "
                  f"{training['skipped_rows']} rows skipped")
    console.print(f"targets met: {report['met']}")
