"""Fine-tuning the parser on labelled queries (``qustream train``).

What the model is taught is exactly what the engine decodes. Each labelled row is turned into the
engine's own token stream by ``ConstrainedEngine.teacher_forcing``: the prompt prefix (with or without
the spec's examples), the row's suffix, then the output as the engine writes it, forced text encoded
as the engine encodes it. The loss covers only the tokens the grammar leaves to the model (the first
token of each value, the words of a span, the choice of null); keys and punctuation are forced at
serving time, so learning them would cost compute and teach nothing.

Choices that make a CPU run affordable:

- **No few-shot examples** by default (``--few-shot`` keeps them): the ecommerce prompt shrinks from
  about 500 tokens to the 70-token instruction. The saved ``qustream.json`` tells the engine to
  build the same short prompt, which also makes serving faster.
- **The shared prefix is computed once per step**, without gradient, at batch size 1, and its
  keys/values are shared by every row of the batch: each row then costs only its query and output.
- **The output layer runs only where the loss is taken**; the input embeddings (tied to it in small
  models) stay frozen.
- **Full fine-tuning of the top ``--train-layers`` decoder layers** for small models (autograd keeps
  no activations below the first trainable layer), **LoRA** (peft, merged before saving, and saved alone
  as ``adapter/`` for ``QUSTREAM_ADAPTER``) for large ones or by choice.

Rows that cannot be learned (bad JSON, no query, unknown fields, values outside the vocabulary or
category set, spans that are not words of the query, values the engine's grammar cannot write) are
reported with their line number and reason, and skipped.

**Cross-fitted catalogs** (``--catalog-folds``). A span field's mentions are forced text where the query
says them, and a catalog built from the same labelled queries knows almost every training query's
product type: the model would be taught few product-type decisions, and the held-out score would
measure the catalog. So each fold of the training rows is taught under the catalog without the mentions that only
that fold labels (as if the catalog had been built without it), and the held-out rows are scored under
the catalog without the mentions that only they label. The saved model serves with the whole catalog.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
import typer

from schemas.settings import ADAPTER_CONFIG, Settings
from schemas.spec import ParseSpec, SpecField
from schemas.vocabulary import Vocabulary
from workers.evaluation import QualityCase, label_values, labelled_row_problem, parse_cases, quality_case, score
from workers.grammar import build_row_grammar, check_value, written_form
from workers.model import MODEL_CARD, bf16_native
from workers.normalize import normalize_query
from workers.prompt import format_parse

if TYPE_CHECKING:
    import torch

    from workers.engine import ConstrainedEngine
    from workers.model import LoadedModel

log = structlog.get_logger(__name__)

Method = Literal["auto", "full", "lora"]
Precision = Literal["auto", "bf16", "fp32"]
#: Where a LoRA run saves its adapter, beside the merged model.
ADAPTER_FOLDER = "adapter"

#: Above this many parameters ``--method auto`` trains LoRA adapters instead of the weights.
LORA_ABOVE_PARAMS = 400_000_000
CHECKPOINT = "checkpoint.pt"
REPORT = "training_report.json"
CHART = "training.png"
#: Metric that decides the best evaluation and early stopping.
SELECT_BY = "all_fields_acc"
WARMUP_STEPS = 20
#: Where the cosine decay of the learning rate ends, as a fraction of the peak.
FINAL_LR_FRACTION = 0.1


class TrainingError(RuntimeError):
    """Training cannot start or go on (no usable rows, a checkpoint of another run, an unusable --out)."""

    def __init__(self, message: str, option: str = "--data") -> None:
        super().__init__(message)
        #: The command-line option the problem is about (what ``qustream train`` names in its refusal).
        self.option = option


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during the steps: ``message`` says where the run got to and how to go on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# -- data ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingRow:
    line: int
    #: The labelled record (query normalised as the worker normalises it); held-out rows are scored on it.
    record: dict[str, Any]
    #: What the engine feeds after the prompt prefix: the suffix and the output tokens.
    ids: tuple[int, ...]
    #: Indices into ``ids`` of the tokens the model chooses (the loss is taken there only).
    chosen: tuple[int, ...]


@dataclass
class TrainingData:
    rows: list[TrainingRow]
    #: (line number, reason) for every line that was skipped.
    problems: list[tuple[int, str]]


class BadRow(ValueError):
    pass


def check_record(spec: ParseSpec, vocabulary: Vocabulary, record: Any) -> dict[str, Any]:
    """A labelled record checked against the spec: ``query`` (normalised) plus every field.

    Raises ``BadRow`` with the reason when the record cannot be training data: a row ``qustream eval``
    could not score, or a label outside the spec's vocabulary or grammar."""
    problem = labelled_row_problem(spec, record)
    if problem is not None:
        raise BadRow(problem)
    query = normalize_query(record["query"])
    checked: dict[str, Any] = {"query": query}
    for spec_field in spec.fields:
        values = label_values(record.get(spec_field.name))
        for value in values:
            problem = check_value(spec_field, value, query, vocabulary)
            if problem is not None:
                raise BadRow(problem)
        checked[spec_field.name] = values[0] if len(values) == 1 else (values or None)
    return checked


def grammar_output(engine: ConstrainedEngine, record: dict[str, Any]) -> str:
    """The output text the engine must write for a checked record: per field, the value its grammar
    offers for this query (a run of the query's words, a canonical value) that normalises to the label."""
    spec = engine.spec
    allowed = build_row_grammar(record["query"], engine.vocabulary, engine._grounding).allowed
    raw: dict[str, str | None] = {}
    for spec_field in spec.fields:
        labels = label_values(record.get(spec_field.name))
        if not labels:
            raw[spec_field.name] = None
            continue
        offered = allowed[spec_field.name]
        if offered is None:  # free grounding: any short string
            raw[spec_field.name] = labels[0]
            continue
        wanted = {written_form(spec_field, label, engine.vocabulary) for label in labels}
        written = [v for v in offered if written_form(spec_field, v, engine.vocabulary) in wanted]
        if not written:
            raise BadRow(f"field {spec_field.name!r}: the grammar offers no value written {labels[0]!r} for this "
                         f"query under {engine.grounding} grounding")
        raw[spec_field.name] = next((v for v in written if v in labels), written[0])
    return format_parse(spec, raw)


def read_labelled(spec: ParseSpec, vocabulary: Vocabulary, path: Path) -> tuple[list[tuple[int, dict[str, Any]]],
                                                                              list[tuple[int, str]]]:
    """The checked records of a labelled JSONL file with their line numbers, and (line, reason) for the rest."""
    records: list[tuple[int, dict[str, Any]]] = []
    problems: list[tuple[int, str]] = []
    with path.open(encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BadRow(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
                records.append((number, check_record(spec, vocabulary, record)))
            except BadRow as exc:
                problems.append((number, str(exc)))
    return records, problems


def teach(engine: ConstrainedEngine, number: int, record: dict[str, Any]) -> TrainingRow | None:
    """A checked record in the engine's token stream; None when its whole output is forced (it teaches
    nothing). Raises ``BadRow`` when the engine's grammar cannot write its labels."""
    output = grammar_output(engine, record)
    taught = engine.teacher_forcing(record["query"], output)
    if taught is None:
        raise BadRow(rejection_reason(engine, record, output))
    ids, chosen = taught
    return TrainingRow(number, record, tuple(ids), tuple(chosen)) if chosen else None


def _rejected_at(engine: ConstrainedEngine, query: str, output: str) -> int:
    """Where in ``output`` the engine's grammar stops following it (as ``teacher_forcing`` feeds it)."""
    row = engine._new_row(0, query)
    while not row.done:
        written = engine.tokenizer.decode(row.out_ids)
        if not output.startswith(written) or len(output) == len(written):
            return next((i for i, (a, b) in enumerate(zip(written, output, strict=False)) if a != b),
                        min(len(written), len(output)))
        token = engine._encode(output[len(written) :])[0]
        if not row.matcher.accept_token(token):
            return len(written)
        row.out_ids.append(token)
        if row.matcher.is_completed():
            break
        engine._force(row)
    return len(output)


def rejection_reason(engine: ConstrainedEngine, record: dict[str, Any], output: str) -> str:
    """Why the engine's grammar cannot write ``output`` for ``record``: the field where it stops following
    the labels, the label there, and what the grammar writes there instead."""
    spec = engine.spec
    query = record["query"]
    at = _rejected_at(engine, query, output)
    keys = [(output.rfind(json.dumps(f.name) + ":", 0, at + 1), f) for f in spec.fields]
    position, spec_field = max(keys, key=lambda pair: pair[0])
    if position < 0:
        return f"the engine's grammar rejects the output {output.strip()!r}"
    labels = label_values(record.get(spec_field.name))
    offered = build_row_grammar(query, engine.vocabulary, engine._grounding).allowed[spec_field.name]
    label = "null" if not labels else repr(labels[0])
    if offered is None:
        return f"field {spec_field.name!r}: the grammar cannot write the label {label} there"
    shown = ", ".join(repr(v) for v in offered[:5]) + (f" (and {len(offered) - 5} more)" if len(offered) > 5 else "")
    if not labels and offered and spec_field.fill == "mentioned":
        return (f"field {spec_field.name!r}: labelled null, but the query names {shown}, which the spec's "
                "`fill: mentioned` makes the grammar write there (null only where the query names none of the "
                "field's mentions)")
    return f"field {spec_field.name!r}: the grammar cannot write the label {label} there; it writes {shown or 'null'}"


def teach_all(engine: ConstrainedEngine, records: list[tuple[int, dict[str, Any]]], note: str = "") -> TrainingData:
    """Every record taught by ``engine``; the unwritable ones as problems, their reason followed by ``note``."""
    rows: list[TrainingRow] = []
    problems: list[tuple[int, str]] = []
    for number, record in records:
        try:
            row = teach(engine, number, record)
        except BadRow as exc:
            problems.append((number, f"{exc}{note}"))
            continue
        if row is not None:
            rows.append(row)
    return TrainingData(rows, problems)


def load_training_data(engine: ConstrainedEngine, path: Path) -> TrainingData:
    """Every usable row of a labelled JSONL file in the engine's token stream; the rest reported."""
    records, problems = read_labelled(engine.spec, engine.vocabulary, path)
    data = teach_all(engine, records)
    return TrainingData(data.rows, sorted(problems + data.problems))


def split_records(records: list[tuple[int, dict[str, Any]]], held_out: int, seed: int
                  ) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, dict[str, Any]]]]:
    """(train, held-out): a seeded shuffle of the distinct queries, the same for the same data and seed; a
    query's repeats stay on one side (at most ``held_out`` and a fifth of the records are held out)."""
    queries = list(dict.fromkeys(record["query"] for _, record in records))
    random.Random(seed).shuffle(queries)
    wanted = min(held_out, len(records) // 5)
    per_query = Counter(record["query"] for _, record in records)
    held_queries: set[str] = set()
    count = 0
    for query in queries:
        if count + per_query[query] <= wanted:
            held_queries.add(query)
            count += per_query[query]
    held = [(n, r) for n, r in records if r["query"] in held_queries]
    return [(n, r) for n, r in records if r["query"] not in held_queries], held


# -- cross-fitted catalogs ---------------------------------------------------------------------------
def fold_of(query: str, folds: int, seed: int) -> int:
    """A query's fold: seeded, and the same for its repeats."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{query}".encode()).digest()[:8], "big") % folds


def mention_fields(spec: ParseSpec) -> list[str]:
    return [f.name for f in spec.fields if f.kind == "span" and f.mentions]


def without_own_mentions(spec: ParseSpec, vocabulary: Vocabulary, own: list[dict[str, Any]],
                         others: list[dict[str, Any]]) -> tuple[ParseSpec, int]:
    """The spec minus the span mentions that records of ``own`` label and no record of ``others`` does:
    the catalog as it would be had it been built without ``own``'s labels; and how many were dropped.

    A catalog built from the same labelled queries knows almost every training query's product type, which
    new queries do not: its forced text would leave the model few decisions to learn from. Values are
    compared as the training check compares them (``written_form``: as the parse writes them).
    A ``fill: mentioned`` field left without mentions or patterns falls back to the model's choice."""

    def keys(spec_field: SpecField, records: list[dict[str, Any]]) -> set[str]:
        return {written_form(spec_field, value, vocabulary)
                for record in records for value in label_values(record.get(spec_field.name))}

    data = spec.model_dump(mode="json")
    dropped = 0
    for raw_field, spec_field in zip(data["fields"], spec.fields, strict=True):
        if spec_field.kind != "span" or not spec_field.mentions:
            continue
        only_own = keys(spec_field, own) - keys(spec_field, others)
        kept = [m for m in spec_field.mentions if written_form(spec_field, m, vocabulary) not in only_own]
        dropped += len(spec_field.mentions) - len(kept)
        raw_field["mentions"] = kept
        if not kept and not spec_field.patterns:
            raw_field["fill"] = "model"
            raw_field["extend_mentions"] = False
    return ParseSpec.model_validate(data), dropped


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def teach_cross_fitted(
    engine: ConstrainedEngine, engine_for: Callable[[ParseSpec], ConstrainedEngine],
    train_records: list[tuple[int, dict[str, Any]]], held_records: list[tuple[int, dict[str, Any]]],
    folds: int, seed: int,
) -> tuple[TrainingData, ConstrainedEngine, list[int]]:
    """The training rows, each taught under the catalog without the mentions only its fold labels, and the
    engine that scores the held-out rows (the catalog without the mentions only they label); with one
    fold, ``engine`` does both. Also the mentions each fold, then the held-out, went without. Each
    fold's catalog is the one built from every other labelled row, the held-out ones included, as the
    served catalog was."""
    if folds <= 1:
        return teach_all(engine, train_records), engine, []
    by_fold: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in range(folds)]
    for number, record in train_records:
        by_fold[fold_of(record["query"], folds, seed)].append((number, record))
    held = [record for _, record in held_records]
    rows: list[TrainingRow] = []
    problems: list[tuple[int, str]] = []
    dropped: list[int] = []
    for fold, own in enumerate(by_fold):
        others = [r for k, rows_of in enumerate(by_fold) if k != fold for _, r in rows_of] + held
        variant, count = without_own_mentions(engine.spec, engine.vocabulary, [r for _, r in own], others)
        dropped.append(count)
        taught = teach_all(engine_for(variant), own,
                           note=f" (fold {fold + 1} of {folds}: the catalog without the {count} mentions only "
                                "its rows label)")
        rows.extend(taught.rows)
        problems.extend(taught.problems)
    held_variant, count = without_own_mentions(engine.spec, engine.vocabulary, held, [r for _, r in train_records])
    dropped.append(count)
    rows.sort(key=lambda row: row.line)
    return TrainingData(rows, problems), engine_for(held_variant), dropped


#: Shared by ``qustream train`` and ``qustream bench train``.
CATALOG_FOLDS_HELP = ("Span mentions (a catalog) built from these labels would force almost every training row's "
                      "value: teach each of N folds of the rows under the catalog without the mentions only that "
                      "fold labels, and score the held-out rows likewise (1 = the catalog as it is).")


# -- model -----------------------------------------------------------------------------------------
@dataclass
class TrainOptions:
    data: Path
    out: Path
    max_minutes: float | None = None
    max_steps: int | None = None
    max_epochs: int = 3
    seed: int = 0
    resume: bool = False
    batch_size: int = 16
    learning_rate: float | None = None
    method: Method = "auto"
    #: Full fine-tuning: the top N decoder layers (0 = all).
    train_layers: int = 0
    lora_rank: int = 16
    few_shot: bool = False
    held_out: int = 200
    #: Evaluate every N steps (0 = at the end of each epoch).
    eval_every: int = 0
    #: Arithmetic of the training steps (weights and optimiser stay float32); auto = bf16 where the
    #: hardware computes it natively.
    precision: Precision = "auto"
    #: Stop after this many evaluations without a better held-out score.
    patience: int = 3
    progress: bool = True
    #: Teach each row under the spec's catalog minus the mentions only its fold labels (1 = the catalog as
    #: it is); the held-out rows are scored under the catalog minus the mentions only they label.
    catalog_folds: int = 5


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def choose_method(model: Any, method: Method) -> Literal["full", "lora"]:
    if method != "auto":
        return method
    return "lora" if parameter_count(model) > LORA_ABOVE_PARAMS else "full"


def choose_precision(device: str, precision: Precision) -> Literal["bf16", "fp32"]:
    if precision != "auto":
        return precision
    return "bf16" if bf16_native(device) else "fp32"


def learning_rate_factor(step: int, progress: float, warmup: int = WARMUP_STEPS) -> float:
    """Linear warm-up, then a cosine decay to a tenth over the run (``progress`` in [0, 1]: the larger of
    steps and time spent against their budgets), so a time-boxed run still ends on small steps."""
    if step < warmup:
        return (step + 1) / warmup
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_trainable(loaded: LoadedModel, method: Literal["full", "lora"], options: TrainOptions) -> Any:
    """Freeze what is not trained; returns the module whose trainable parameters are optimised."""
    model = loaded.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=options.lora_rank, lora_alpha=2 * options.lora_rank, lora_dropout=0.0,
                            target_modules="all-linear", task_type="CAUSAL_LM")
        # Injects the adapters into ``model``'s own modules, so the engine's reference sees them.
        return get_peft_model(model, config)
    decoder = model.get_decoder()
    layers = list(decoder.layers)
    top = layers if options.train_layers <= 0 else layers[-options.train_layers :]
    for module in [*top, decoder.norm]:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    return model


def trainable_state(module: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def restore_state(module: Any, state: dict[str, torch.Tensor]) -> None:
    import torch

    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)


class StepRunner:
    """One training step: shared prefix without gradient, rows from their suffix, loss on chosen tokens."""

    def __init__(self, engine: ConstrainedEngine) -> None:
        self.engine = engine
        self.model = engine.model
        self.prefix_ids: list[int] = engine._prefix_ids
        self.pad_id = engine._pad_id

    def loss(self, rows: list[TrainingRow]) -> torch.Tensor:
        import torch
        from transformers import DynamicCache

        decoder = self.model.get_decoder()
        device = self.engine.loaded.device
        with torch.no_grad():
            prefix = decoder(input_ids=torch.tensor([self.prefix_ids], device=device), use_cache=True)
        layers = [(layer.keys, layer.values) for layer in prefix.past_key_values.layers]
        batch = len(rows)
        cache = DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                             for k, v in layers])
        width = max(len(row.ids) for row in rows)
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((batch, len(self.prefix_ids) + width), dtype=torch.long)
        mask[:, : len(self.prefix_ids)] = 1
        for i, row in enumerate(rows):
            ids[i, : len(row.ids)] = torch.tensor(row.ids)
            mask[i, len(self.prefix_ids) : len(self.prefix_ids) + len(row.ids)] = 1
        positions = torch.arange(len(self.prefix_ids), len(self.prefix_ids) + width).expand(batch, -1)
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         past_key_values=cache, use_cache=True).last_hidden_state
        row_index = torch.tensor([i for i, row in enumerate(rows) for _ in row.chosen], device=device)
        position = torch.tensor([p for row in rows for p in row.chosen], device=device)
        # The token at position p is predicted from the hidden state at p - 1 (p >= 1: the suffix comes first).
        logits = self.model.get_output_embeddings()(hidden[row_index, position - 1]).float()
        return torch.nn.functional.cross_entropy(logits, ids.to(device)[row_index, position])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate(engine: ConstrainedEngine, cases: list[QualityCase], batch_size: int = 32) -> dict[str, float]:
    """The held-out score with the same engine and scorer as ``qustream eval``, on the current weights."""
    engine.weights_changed()
    engine.model.eval()
    try:
        parses, flags, seconds = parse_cases(engine, cases, batch_size)
    finally:
        engine.model.train()
        engine.weights_changed()
    metrics = score(engine.spec, cases, parses, flags)
    metrics["queries_per_s"] = len(cases) / seconds if seconds else 0.0
    return metrics


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    #: Batches of the current epoch already trained (where ``--resume`` goes on).
    batch_in_epoch: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0
    best_score: float = -1.0
    evals_since_best: int = 0
    #: How far the learning-rate decay has gone (never backwards, also across ``--resume``).
    lr_progress: float = 0.0


#: The option (or setting) behind each key of a checkpoint's identity.
IDENTITY_OPTIONS = {"model": "--model", "spec": "--spec (its fingerprint)", "grounding": "QUSTREAM_GROUNDING",
                    "method": "--method", "train_layers": "--train-layers", "lora_rank": "--lora-rank",
                    "few_shot": "--few-shot", "data": "--data (a digest of its contents)", "seed": "--seed",
                    "held_out": "--held-out", "batch_size": "--batch-size", "catalog_folds": "--catalog-folds",
                    "learning_rate": "--learning-rate", "precision": "--precision"}
#: Options a ``--resume`` may change: budgets (to train longer) and the evaluation schedule, which change
#: when the run stops and which weights it keeps, not what a step computes.
RESUME_MAY_CHANGE = ("--max-minutes", "--max-steps", "--max-epochs", "--eval-every", "--patience")


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def identity_mismatch(checkpoint_path: Path, saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The refusal of a checkpoint of another run: the options that differ, both values, and what to do."""
    differing = [key for key in dict.fromkeys([*saved, *current]) if saved.get(key) != current.get(key)]

    def shown(values: dict[str, Any], key: str) -> str:
        return _short(values[key]) if key in values else "(not recorded: an older checkpoint)"

    changes = "; ".join(f"{IDENTITY_OPTIONS.get(key, key)}: {shown(saved, key)} in the checkpoint, "
                        f"{shown(current, key)} now" for key in differing)
    return (f"{checkpoint_path} belongs to another run: {changes}. Resume with the options it was written with "
            f"(only {', '.join(RESUME_MAY_CHANGE)} may change), or train into another --out, or leave out --resume "
            "to start over in this folder (replacing its training output)")


def _identity(settings: Settings, spec: ParseSpec, options: TrainOptions, method: str, data: Path,
              learning_rate: float, precision: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: everything that changes what a step computes (the method,
    learning rate and precision as resolved). Budgets and the evaluation schedule (``RESUME_MAY_CHANGE``)
    are not part of it."""
    digest = hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    return {"model": settings.model, "spec": spec.fingerprint, "grounding": settings.grounding, "method": method,
            "train_layers": options.train_layers, "lora_rank": options.lora_rank, "few_shot": options.few_shot,
            "data": digest, "seed": options.seed, "held_out": options.held_out, "batch_size": options.batch_size,
            "catalog_folds": options.catalog_folds, "learning_rate": learning_rate, "precision": precision}


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def model_card(spec: ParseSpec, few_shot: bool, base_model: str, grounding: str) -> dict[str, Any]:
    return {"spec": {"name": spec.name, "version": spec.version, "fingerprint": spec.fingerprint},
            "few_shot": few_shot, "base_model": base_model, "grounding": grounding}


#: What a ``qustream train`` run writes in its folder (besides the model's own files): a folder holding
#: one of these is a previous run's output, which a new run may replace.
OUTPUT_MARKERS = (MODEL_CARD, CHECKPOINT, REPORT)
#: The files a run writes in ``--out`` (``save_pretrained`` of the model and its tokenizer, the card, the report,
#: the chart, the checkpoint's temporary file), by name: only these, and ``adapter/``, are a previous run's
#: output that a new run removes. The checkpoint itself is left to the run (it overwrites it).
OUTPUT_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
    "spiece.model", "chat_template.jinja", "chat_template.json", MODEL_CARD, REPORT, CHART,
    Path(CHECKPOINT).with_suffix(".tmp").name,
})
#: Weight shards: ``model-00001-of-00002.safetensors`` and the like.
OUTPUT_SHARDS = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


def _is_output(entry: Path) -> bool:
    """Whether ``entry`` of ``--out`` is something a training run writes there (by name)."""
    if entry.is_symlink():
        return entry.name in OUTPUT_FILES or bool(OUTPUT_SHARDS.fullmatch(entry.name))
    if entry.is_dir():
        return entry.name == ADAPTER_FOLDER
    return entry.name in OUTPUT_FILES or bool(OUTPUT_SHARDS.fullmatch(entry.name))


def _holds(entry: Path, data: Path | None) -> bool:
    """Whether ``entry`` is the ``--data`` file or a folder holding it (never removed)."""
    if data is None:
        return False
    target, wanted = entry.resolve(), data.resolve()
    return target == wanted or target in wanted.parents


def check_out(out: Path, resume: bool, data: Path | None = None) -> tuple[list[Path], str | None]:
    """``--out`` checked before anything loads: the entries of a previous run's output there (what this run
    replaces: only the files a training run writes, never ``data`` nor anything else), and a line to say
    about it (None when there is nothing to say). Raises ``TrainingError`` (``--out``) for a file, or a
    non-empty folder that is not a training output."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"{out} is a file, not a folder: give --out a new or empty folder, or a previous "
                            "training output to replace", option="--out")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if not entries:
        return [], (f"--resume: nothing to resume in {out} (no checkpoint), so training starts from scratch"
                    if resume else None)
    if not any((out / marker).is_file() for marker in OUTPUT_MARKERS):
        raise TrainingError(f"{out} is a non-empty folder that holds no qustream training output (no "
                            f"{', '.join(OUTPUT_MARKERS)}): refusing to write into it; give --out a new or empty "
                            "folder", option="--out")
    previous = [e for e in entries if _is_output(e) and not _holds(e, data)]
    kept = [e for e in entries if e not in previous and e.name != CHECKPOINT]
    if resume and (out / CHECKPOINT).is_file():
        return previous, None
    replaced = previous + ([out / CHECKPOINT] if (out / CHECKPOINT).is_file() else [])
    names = ", ".join(e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in sorted(replaced))
    others = (f"; the {len(kept)} other {'entry' if len(kept) == 1 else 'entries'} there ("
              + ", ".join(e.name + ("/" if e.is_dir() and not e.is_symlink() else "") for e in kept[:5])
              + (", …" if len(kept) > 5 else "") + ") are kept" if kept else "")
    if resume:
        return previous, (f"--resume: {out / CHECKPOINT} does not exist, so training starts from scratch; the "
                          f"previous training output in {out} ({names}) is replaced when this run saves{others}")
    return previous, (f"{out} holds a previous training output ({names}): it is replaced when this run saves "
                      f"(what this run does not write again is removed){others}")


def _remove_previous(out: Path, previous: list[Path], data: Path | None = None) -> None:
    """The previous run's output (as ``check_out`` listed it: only what a training run writes), except the
    checkpoint (this run's own by now) and the ``--data`` file, before this run saves."""
    import shutil

    for entry in previous:
        if entry.name == CHECKPOINT or not _is_output(entry) or _holds(entry, data):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


#: Suffixes of files that are not labelled JSONL (``qustream label`` converts them).
NOT_JSONL_SUFFIXES = (".csv", ".tsv")


def check_data(data: Path, spec: str) -> None:
    """``--data`` checked before the model loads: refused (``TrainingError``) when it is empty, or not labelled
    JSONL (a CSV/TSV by its suffix, or not one line of it a JSON object), saying how to convert it."""
    convert = (f"train reads labelled JSONL (one JSON object a line: query plus the spec's fields); convert it "
               f"first with `qustream label {data} --spec {spec} --out labels.jsonl`")
    suffixes = [suffix.lower() for suffix in data.suffixes]
    if any(suffix in NOT_JSONL_SUFFIXES for suffix in suffixes):
        raise TrainingError(f"{data} is a {suffixes[-1] if suffixes[-1] != '.gz' else suffixes[-2]} file, not "
                            f"labelled JSONL: {convert}")
    lines = 0
    try:
        with data.open(encoding="utf-8", errors="strict") as handle:
            for line in handle:
                if not line.strip():
                    continue
                lines += 1
                try:
                    if isinstance(json.loads(line), dict):
                        return
                except json.JSONDecodeError:
                    pass
    except UnicodeDecodeError:
        raise TrainingError(f"{data} is not UTF-8 text (compressed?), not labelled JSONL: {convert}") from None
    if not lines:
        raise TrainingError(f"{data} is empty: nothing to train on; label queries first, e.g. `qustream label "
                            f"queries.jsonl --spec {spec} --out labels.jsonl`")
    raise TrainingError(f"{data}: none of its {lines} lines is a JSON object, so it is not labelled JSONL: {convert}")


def reached_cap(options: TrainOptions, state: TrainState) -> str | None:
    """The cap a (resumed) run has already reached, in words; None when it has steps left."""
    if options.max_steps and state.step >= options.max_steps:
        return f"its {options.max_steps}-step cap (--max-steps)"
    if state.epoch >= options.max_epochs:
        return f"its {options.max_epochs}-epoch cap (--max-epochs)"
    return None


def cap_option(cap: str, options: TrainOptions) -> str:
    """The option to raise to go on past ``cap`` (as ``reached_cap`` says it), with its value now."""
    if "--max-steps" in cap:
        return f"--max-steps (now {options.max_steps})"
    return f"--max-epochs (now {options.max_epochs})"


def stop_phrase(report: dict[str, Any]) -> str:
    """Why a run stopped, as the summary says it."""
    options = report.get("options", {})
    stopped = report["stopped"]
    if stopped == "max steps":
        return f"stopped at the {options.get('max_steps')}-step cap (--max-steps)"
    if stopped == "time budget":
        return f"stopped at the {options.get('max_minutes'):g}-minute budget (--max-minutes)"
    if stopped == "early stopping":
        return (f"stopped early: {options.get('patience')} evaluations without a better held-out score "
                "(--patience)")
    return f"stopped at the {options.get('max_epochs')}-epoch cap (--max-epochs)"


def stop_summary(report: dict[str, Any]) -> str:
    """``stop_phrase``, and what a resumed run that had nothing left to train did."""
    if report.get("resumed_at_cap"):
        return (f"{stop_phrase(report)}, already reached before --resume: nothing was trained, the checkpoint's "
                "best weights were saved again; raise --max-epochs or --max-steps to continue training")
    return stop_phrase(report)


def interrupted_message(options: TrainOptions, step: int, planned: int, checkpoint_path: Path,
                        checkpointed: int | None) -> str:
    """What Ctrl-C during a run says: the step reached, the checkpoint to go on from, and how."""
    if checkpointed is None:
        where = (f"this run wrote no checkpoint yet ({checkpoint_path} is written at each evaluation), so "
                 "there is nothing to resume; run the same command again to start over")
    else:
        where = (f"the last checkpoint is {checkpoint_path}, at step {checkpointed} (written at each evaluation: "
                 f"--eval-every N for more of them); go on from it with the same options plus --resume")
    return f"interrupted at step {step} of {planned}: the model was not saved; {where}"


def no_gain_warning(report: dict[str, Any]) -> str | None:
    """What to say when no evaluation after step 0 beat step 0 (the saved weights are the base model's)."""
    if report["best_step"] != 0:
        return None
    later = [e for e in report["evals"] if e["step"] > 0]
    start = report["evals"][0]["metrics"][SELECT_BY]
    best_later = max((e["metrics"][SELECT_BY] for e in later), default=None)
    seen = (f"held-out all fields {start:.1%} at step 0; " + (f"at best {best_later:.1%} after it" if later else
                                                              "no evaluation after it"))
    if report["few_shot"]:
        served = "served, it parses as the base model does with the same prompt: nothing was gained"
    else:
        served = ("served without the spec's examples (the card says few_shot false), it will likely parse worse "
                  "than the base model with them")
    return (f"NOT IMPROVED: no evaluation after step 0 beat step 0 ({seen}), so the saved weights are the base "
            f"model's, untrained; {served}. Train longer (--max-steps / --max-minutes / --max-epochs) or on more "
            "rows, or keep serving the base model with its few-shot prompt")


def train(settings: Settings, options: TrainOptions) -> dict[str, Any]:
    """Fine-tune the configured model on ``options.data`` and save it to ``options.out``; returns the report."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from workers.engine import ConstrainedEngine
    from workers.grammar import load_checked_spec
    from workers.model import load_model

    started = time.perf_counter()
    console = Console(stderr=True)
    previous, out_note = check_out(options.out, options.resume, options.data)  # before anything loads
    check_data(options.data, settings.parse_spec)  # before the model loads
    if out_note:
        console.print(out_note, markup=False, highlight=False)
    torch.manual_seed(options.seed)
    spec = load_checked_spec(settings.parse_spec)
    # Float32 master weights on every device (serving may load bf16 on a GPU): small updates to bf16
    # weights round away; ``precision`` decides the arithmetic of the steps instead.
    # Training starts from the configured model itself, never from a shipped adapter merged into it.
    loaded = load_model(settings.model_copy(update={"dtype": "float32", "adapter": "none"}))
    loaded.card = model_card(spec, options.few_shot, loaded.model_id, settings.grounding)
    engine = ConstrainedEngine(settings, loaded, spec)

    def engine_for(variant: ParseSpec) -> ConstrainedEngine:
        sibling = ConstrainedEngine(settings, replace(loaded, card=model_card(
            variant, options.few_shot, loaded.model_id, settings.grounding)), variant)
        if sibling._prefix_ids != engine._prefix_ids:
            raise TrainingError("the spec's prompt depends on its mentions; --catalog-folds 1 trains without folds")
        return sibling

    records, problems = read_labelled(spec, engine.vocabulary, options.data)
    train_records, held_records = split_records(records, options.held_out, options.seed)
    cross_fit = settings.grounding == "catalog" and mention_fields(spec) and len(train_records) >= options.catalog_folds
    folds = options.catalog_folds if cross_fit else 1
    taught, held_engine, dropped = teach_cross_fitted(engine, engine_for, train_records, held_records, folds,
                                                      options.seed)
    data = TrainingData(taught.rows, sorted(problems + taught.problems))
    held_cases = [quality_case(spec, record) for _, record in held_records]
    refused = not data.rows or not held_cases
    # A refused run writes no report: then every skipped line is listed here.
    shown = data.problems if refused else data.problems[:20]
    for number, reason in shown:
        console.print(f"{options.data}:{number}: skipped: {reason}", markup=False, highlight=False)
    if len(data.problems) > len(shown):
        console.print(f"... and {len(data.problems) - len(shown)} more skipped lines (all listed in "
                      f"{options.out / REPORT} when the run saves)", markup=False, highlight=False)
    if not data.rows:
        hint = (f"; every line was skipped: are these labels for the spec {spec.name!r} (--spec)?"
                if data.problems and not records else "")
        raise TrainingError(f"{options.data}: {len(data.rows)} usable rows; nothing to train on{hint}")
    if not held_cases:
        distinct = len({record["query"] for _, record in records})
        raise TrainingError(
            f"{options.data}: {len(records)} checked rows of {distinct} distinct "
            f"{'query' if distinct == 1 else 'queries'}, too few to hold any out: the held-out split takes whole "
            "queries (a query's repeats stay on one side) and at most a fifth of the rows; label more distinct "
            "queries")
    train_rows = data.rows
    method = choose_method(loaded.model, options.method)
    trained = make_trainable(loaded, method, options)
    parameters = [p for p in trained.parameters() if p.requires_grad]
    learning_rate = options.learning_rate or (1e-3 if method == "lora" else 1e-4)
    # The fused kernel: the per-tensor loop torch picks by default on CPU was a visible share of a step.
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0, fused=True)
    precision = choose_precision(loaded.device, options.precision)
    runner = StepRunner(engine)
    identity = _identity(settings, spec, options, method, options.data, learning_rate, precision)
    options.out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = options.out / CHECKPOINT
    state = TrainState()
    best = trainable_state(trained)
    checkpointed: int | None = None  # the step of the checkpoint in the folder, once this run has one
    cap: str | None = None  # the cap a resumed run had already reached (nothing left to train)
    if options.resume and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, weights_only=False)
        if saved["identity"] != identity:
            raise TrainingError(identity_mismatch(checkpoint_path, saved["identity"], identity), option="--resume")
        restore_state(trained, saved["weights"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState(**saved["state"])
        checkpointed = state.step
        best = saved["best"]
        cap = reached_cap(options, state)
        if cap:
            console.print(f"resumed from {checkpoint_path} at step {state.step}: the previous run had already "
                          f"reached {cap}, so there is nothing left to train and its best weights (step "
                          f"{state.best_step}) are saved again; raise {cap_option(cap, options)} to continue "
                          "training", markup=False, highlight=False)
        else:
            console.print(f"resumed from {checkpoint_path} at step {state.step}", markup=False, highlight=False)

    def checkpoint() -> None:
        nonlocal checkpointed
        payload = {"identity": identity, "weights": trainable_state(trained), "optimizer": optimizer.state_dict(),
                   "state": asdict(state), "best": best}
        torch.save(payload, checkpoint_path.with_suffix(".tmp"))
        checkpoint_path.with_suffix(".tmp").replace(checkpoint_path)
        checkpointed = state.step

    def run_eval() -> bool:
        """Evaluate, keep the best weights; True when early stopping says stop."""
        nonlocal best
        metrics = evaluate(held_engine, held_cases)
        state.evals.append({"step": state.step, "epoch": state.epoch, "metrics": metrics})
        if metrics[SELECT_BY] > state.best_score:
            state.best_score, state.best_step, state.evals_since_best = metrics[SELECT_BY], state.step, 0
            best = trainable_state(trained)
        else:
            state.evals_since_best += 1
        checkpoint()
        return state.evals_since_best >= options.patience

    batches_per_epoch = math.ceil(len(train_rows) / options.batch_size)
    planned = options.max_steps or batches_per_epoch * options.max_epochs
    budget_seconds = options.max_minutes * 60 if options.max_minutes else math.inf
    budget_started = time.monotonic()
    deadline = budget_started + budget_seconds
    try:
        trained.train()
        stopped = "epochs"
        if options.max_steps and state.step >= options.max_steps:  # a resumed run already at its step cap
            stopped = "max steps"
        if not state.evals:
            run_eval()  # the starting point: the base model with the training prompt
        columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("held-out {task.fields[score]}"),
                   TimeElapsedColumn()]
        with Progress(*columns, console=console, disable=not options.progress) as progress:
            task = progress.add_task("train", total=planned, completed=state.step, loss="-",
                                     score=f"{state.best_score:.1%}")
            while stopped == "epochs" and state.epoch < options.max_epochs:
                order = epoch_order(len(train_rows), options.seed, state.epoch)
                while state.batch_in_epoch < batches_per_epoch:
                    step_started = time.perf_counter()
                    start = state.batch_in_epoch * options.batch_size
                    batch = [train_rows[i] for i in order[start : start + options.batch_size]]
                    state.lr_progress = max(state.lr_progress, state.step / planned,
                                            (time.monotonic() - budget_started) / budget_seconds)
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate * learning_rate_factor(state.step, state.lr_progress)
                    with torch.autocast(device_type=loaded.device.split(":")[0], dtype=torch.bfloat16,
                                        enabled=precision == "bf16"):
                        loss = runner.loss(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                    optimizer.step()
                    state.step += 1
                    state.batch_in_epoch += 1
                    state.losses.append((state.step, loss.item()))
                    state.seconds += time.perf_counter() - step_started
                    progress.update(task, completed=state.step, loss=f"{state.losses[-1][1]:.3f}")
                    if options.eval_every and state.step % options.eval_every == 0:
                        if run_eval():
                            stopped = "early stopping"
                        progress.update(task, score=f"{state.evals[-1]['metrics'][SELECT_BY]:.1%}")
                    if stopped == "epochs" and options.max_steps and state.step >= options.max_steps:
                        stopped = "max steps"
                    if stopped == "epochs" and time.monotonic() >= deadline:
                        stopped = "time budget"
                    if stopped != "epochs":
                        break
                else:
                    state.epoch += 1
                    state.batch_in_epoch = 0
                    if not options.eval_every:
                        if run_eval():
                            stopped = "early stopping"
                        progress.update(task, score=f"{state.evals[-1]['metrics'][SELECT_BY]:.1%}")
        if state.evals[-1]["step"] != state.step:
            run_eval()
        _remove_previous(options.out, previous, options.data)
        report = _save(loaded, trained, method, best, spec, options, settings)
    except KeyboardInterrupt:
        message = interrupted_message(options, state.step, planned, checkpoint_path, checkpointed)
        console.print(message, markup=False, highlight=False)
        raise TrainingInterrupted(message) from None
    report.update(
        spec=spec.ref | {"fingerprint": spec.fingerprint}, base_model=loaded.model_id, method=method,
        grounding=settings.grounding, few_shot=options.few_shot, learning_rate=learning_rate, precision=precision,
        parameters=parameter_count(loaded.model), trainable_parameters=sum(p.numel() for p in parameters),
        rows=len(records), train_rows=len(train_rows), held_out_rows=len(held_cases),
        catalog_folds=folds, mentions_dropped_per_fold=dropped,
        chosen_tokens_per_row=sum(len(r.chosen) for r in train_rows) / len(train_rows),
        tokens_per_row=sum(len(r.ids) for r in train_rows) / len(train_rows),
        prefix_tokens=len(runner.prefix_ids), skipped=[{"line": n, "reason": r} for n, r in data.problems],
        options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        stopped=stopped, resumed_at_cap=cap is not None, steps=state.step, epochs=state.step / batches_per_epoch,
        train_seconds=state.seconds,
        seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb(), best_step=state.best_step,
        best=next(e["metrics"] for e in state.evals if e["step"] == state.best_step), evals=state.evals,
        losses=state.losses,
    )
    warning = no_gain_warning(report)
    report.update(improved=warning is None, warning=warning)
    (options.out / REPORT).write_text(json.dumps(report, indent=2))
    plot_training(report, options.out / CHART)
    return report


def _save(loaded: LoadedModel, trained: Any, method: str, best: dict[str, Any], spec: ParseSpec,
          options: TrainOptions, settings: Settings) -> dict[str, Any]:
    """The best weights as a plain transformers folder (LoRA merged) with its ``qustream.json``."""
    from workers.attention import use_default_sdpa

    restore_state(trained, best)
    trained_at = datetime.now(UTC).isoformat(timespec="seconds")
    saved: dict[str, Any] = {}
    if method == "lora":
        adapter_folder = options.out / ADAPTER_FOLDER
        _save_adapter(trained, adapter_folder, loaded.model_id)
        adapter_card = model_card(spec, options.few_shot, loaded.model_id, settings.grounding)
        adapter_card.update(trained_at=trained_at, weights=_weights_digest(adapter_folder))
        (adapter_folder / MODEL_CARD).write_text(json.dumps(adapter_card, indent=2))
        saved["adapter_folder"] = str(adapter_folder)
    model = trained.merge_and_unload() if method == "lora" else loaded.model
    use_default_sdpa(model)
    model.save_pretrained(options.out)
    loaded.tokenizer.save_pretrained(options.out)
    card = model_card(spec, options.few_shot, loaded.model_id, settings.grounding)
    card.update(trained_at=trained_at, weights=_weights_digest(options.out))
    (options.out / MODEL_CARD).write_text(json.dumps(card, indent=2))
    return {"model_folder": str(options.out), "card": card, **saved}


def _save_adapter(trained: Any, folder: Path, base_model: str) -> None:
    """The LoRA adapter alone (``QUSTREAM_ADAPTER=<folder>`` merges it into the base model at load), in
    bfloat16, small enough to ship in a repository."""
    import torch
    from safetensors.torch import load_file, save_file

    trained.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # peft's blank model-card template; the card is MODEL_CARD
    # The model's id rather than the folder it was loaded from on the training machine.
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": base_model}, indent=2)
                                         + "\n")
    weights = folder / "adapter_model.safetensors"
    save_file({name: tensor.to(torch.bfloat16) for name, tensor in load_file(weights).items()}, weights,
              metadata={"format": "pt"})


def plot_training(report: dict[str, Any], path: Path) -> None:
    """Loss per step and held-out accuracy per evaluation, one chart (matplotlib, the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("training.no_chart", reason="matplotlib not installed (pip install qustream[bench])")
        return
    figure, loss_axis = plt.subplots(figsize=(8, 4.5))
    if report["losses"]:
        steps, losses = zip(*report["losses"], strict=True)
        loss_axis.plot(steps, losses, color="tab:blue", alpha=0.6, label="training loss (chosen tokens)")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    accuracy_axis = loss_axis.twinx()
    eval_steps = [e["step"] for e in report["evals"]]
    first_field = next(iter(report["best"]))  # score() lists the per-field accuracies first
    for key, color in ((SELECT_BY, "tab:green"), (first_field, "tab:orange"), ("invented_absent", "tab:red")):
        accuracy_axis.plot(eval_steps, [e["metrics"].get(key, 0.0) for e in report["evals"]], marker="o",
                           color=color, label=f"held-out {key}")
    accuracy_axis.set_ylabel("held-out rate")
    accuracy_axis.set_ylim(0, 1)
    figure.legend(loc="upper center", ncol=2, fontsize=8)
    figure.suptitle(f"{report['base_model']} on {report['spec']['name']} v{report['spec']['version']} "
                    f"({report['method']}, {report['steps']} steps)", fontsize=10, y=0.02)
    figure.tight_layout(rect=(0, 0.04, 1, 0.9))
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- command ---------------------------------------------------------------------------------------
def train_command(
    data: Annotated[Path, typer.Option(help="Labelled JSONL (query + the spec's fields), e.g. from `qustream label`.",
                                       exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option(help="Folder to save the model in (serve it with QUSTREAM_MODEL=<folder>).")],
    spec: Annotated[str | None, typer.Option(help="Parse spec (built-in name or YAML path); default: configured.")]
    = None,
    model: Annotated[str | None, typer.Option(help="Base model id or folder; default: the configured model.")] = None,
    max_minutes: Annotated[float | None, typer.Option(min=0.1, help="Stop after this much time (then save).")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many steps.")] = None,
    max_epochs: Annotated[int, typer.Option(min=1, help="Passes over the training rows at most.")] = 3,
    seed: Annotated[int, typer.Option(help="Seeds the held-out split, the data order and the initialisation.")] = 0,
    resume: Annotated[bool, typer.Option(help=f"Go on from {CHECKPOINT} in --out.")] = False,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    learning_rate: Annotated[float | None, typer.Option(help="Default: 1e-4 full, 1e-3 LoRA.")] = None,
    method: Annotated[Method, typer.Option(help="full fine-tuning, LoRA, or auto (LoRA above 400M parameters).")]
    = "auto",
    train_layers: Annotated[int, typer.Option(min=0, help="full: train the top N decoder layers (0 = all).")] = 0,
    lora_rank: Annotated[int, typer.Option(min=1)] = 16,
    few_shot: Annotated[bool, typer.Option(help="Keep the spec's examples in the prompt (slower to train and serve).")]
    = False,
    held_out: Annotated[int, typer.Option(min=1, help="Rows held out for evaluation (at most a fifth).")] = 200,
    eval_every: Annotated[int, typer.Option(min=0, help="Evaluate every N steps (0 = each epoch).")] = 0,
    patience: Annotated[int, typer.Option(min=1, help="Evaluations without improvement before stopping.")] = 3,
    precision: Annotated[Precision, typer.Option(help="Step arithmetic: bf16 autocast (float32 weights), fp32, or "
                                                      "auto (bf16 where the CPU or GPU has it natively).")] = "auto",
    catalog_folds: Annotated[int, typer.Option(min=1, help=CATALOG_FOLDS_HELP)] = 5,
) -> None:
    """Fine-tune the parser on labelled queries, in the engine's exact prompt and output format.

    Example: qustream train --spec ecommerce --data labels.jsonl --out models/ecommerce --max-minutes 40
    """
    from rich.console import Console

    overrides: dict[str, Any] = {}
    if spec:
        overrides["parse_spec"] = spec
    if model:
        overrides["model"] = model
    options = TrainOptions(data=data, out=out, max_minutes=max_minutes, max_steps=max_steps, max_epochs=max_epochs,
                           seed=seed, resume=resume, batch_size=batch_size, learning_rate=learning_rate,
                           method=method, train_layers=train_layers, lora_rank=lora_rank, few_shot=few_shot,
                           held_out=held_out, eval_every=eval_every, patience=patience,
                           precision=precision, catalog_folds=catalog_folds)
    try:
        report = train(Settings(**overrides), options)
    except TrainingError as exc:
        raise typer.BadParameter(str(exc), param_hint=exc.option) from None
    except TrainingInterrupted:
        raise typer.Exit(130) from None  # train() said where the run got to
    except KeyboardInterrupt:
        Console(stderr=True).print(f"interrupted before the first training step: nothing was trained or saved in "
                                   f"{out}", markup=False, highlight=False)
        raise typer.Exit(130) from None
    best = report["best"]
    summary = (
        f"saved {report['model_folder']} ({report['method']}, {report['steps']} steps, {stop_summary(report)}, "
        f"{report['train_seconds']:.0f} s training, peak RSS {report['peak_rss_mb']:.0f} MB); held-out at step "
        f"{report['best_step']}: all fields {best['all_fields_acc']:.1%}, invented {best['invented_absent']:.1%}; "
        f"{len(report['skipped'])} lines skipped."
    )
    if report["warning"]:
        Console().print(summary, markup=False, highlight=False)
        Console(stderr=True).print(f"WARNING: {report['warning']} (also in {Path(report['model_folder']) / REPORT})",
                      style="bold red", markup=False, highlight=False)
        return
    Console().print(
        f"{summary} Serve it with QUSTREAM_MODEL={report['model_folder']}"
        + (f" or its adapter alone with QUSTREAM_ADAPTER={report['adapter_folder']}"
           if "adapter_folder" in report else ""), markup=False, highlight=False
    )
