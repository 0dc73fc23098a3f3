"""Typer commands of the producer tools: produce, replay, load, tail, dlq inspect|redrive, reprocess, label.

``register(app)`` adds them to the ``qustream`` CLI (streams/cli.py). Every command reads the same
``QUSTREAM_*`` settings as the worker, works on Kafka or Redis Streams (``QUSTREAM_TRANSPORT``), and
exits 2 with a one-line message when the broker or Redis does not answer within
``QUSTREAM_TOOLS_CONNECT_TIMEOUT_S`` (10 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from schemas.events import DeadLetterStage
from schemas.settings import Settings
from streams.cli import fail, read_settings, settings_or_exit, spec_or_exit

console = Console(stderr=True)
T = TypeVar("T")

dlq_app = typer.Typer(help="Dead letters: counts by stage/class, and redrive to the input.", no_args_is_help=True)

EXIT_UNREACHABLE = 2
EXIT_REFUSED = 3
EXIT_INTERRUPTED = 130


def _run(settings: Settings, make: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run a tool; SIGINT/SIGTERM set the stop event (tools finish cleanly), unreachable → exit 2."""
    from producer_tools.transport import TransportUnavailable, endpoint

    async def main() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        return await make(stop)

    try:
        return asyncio.run(main())
    except TransportUnavailable as exc:
        raise fail(str(exc), EXIT_UNREACHABLE) from exc
    except (OSError, ConnectionError) as exc:
        raise fail(f"cannot reach {endpoint(settings)}: {type(exc).__name__}: {exc}", EXIT_UNREACHABLE) from exc


def _positive(value: float | None) -> float | None:
    """Option callback: a rate, speed or duration of zero or less would divide by zero or send nothing."""
    if value is not None and value <= 0:
        raise typer.BadParameter(f"{value:g} is not greater than 0")
    return value


DEAD_LETTER_STAGES: tuple[str, ...] = get_args(DeadLetterStage)


def _known_stage(value: str | None) -> str | None:
    """Option callback: a misspelt stage would match no letter and redrive nothing, silently."""
    if value is not None and value not in DEAD_LETTER_STAGES:
        raise typer.BadParameter(f"{value!r} is none of {', '.join(DEAD_LETTER_STAGES)}")
    return value


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "-/s", style="cyan")


@contextlib.contextmanager
def _progress(label: str, total: int | None, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda _n: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                  transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def _summary_table(title: str, values: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    for name, value in values.items():
        if not isinstance(value, list | dict):
            table.add_row(name.replace("_", " "), "" if value is None else str(value))
    return table


# --- replay -----------------------------------------------------------------------------------


def replay_command(
    files: Annotated[list[Path], typer.Argument(help="Log files: .jsonl, .csv, .tsv or text, optionally .gz.",
                                                exists=True, dir_okay=False, readable=True)],
    rate: Annotated[float | None, typer.Option(callback=_positive,
                                               help="Fixed rate in messages/s (default: as fast as possible).")]
    = None,
    speed: Annotated[float | None, typer.Option(callback=_positive,
                                                help="Replay the log's own timing this many times faster.")] = None,
    log_format: Annotated[str, typer.Option("--format", help="auto (by extension), jsonl, csv, tsv or text.")]
    = "auto",
    query_field: Annotated[str, typer.Option(help="Field/column holding the query.")] = "query",
    id_field: Annotated[str | None, typer.Option(help="Field/column with the query id (default: query_id or id; "
                                                     "else derived from file name + line).")] = None,
    ts_field: Annotated[str | None, typer.Option(help="Field/column with the event time, ISO 8601 or epoch s/ms "
                                                     "(default: ts or timestamp).")] = None,
    no_header: Annotated[bool, typer.Option("--no-header", help="CSV/TSV without a header row; name columns "
                                                                "by index (--query-field 0).")] = False,
    skip: Annotated[int, typer.Option(min=0, help="Skip the first N lines.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue after the last acknowledged line of an "
                                                          "interrupted run (from the checkpoint file).")] = False,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint file (default .qustream-replay-<hash>.json "
                                                         "in the current folder).")] = None,
    source: Annotated[str | None, typer.Option(help="Name used for derived ids and the source field "
                                                     "(default: the file name).")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Also print the summary as JSON on stdout.")] = False,
) -> None:
    """Replay historical query logs into the input topic (or Redis stream), keeping event times.

    Bad lines are counted, reported with their line numbers and skipped. Ids are the log's own or
    derived from file name + line, so replaying twice produces the same ids. Ctrl-C stops cleanly;
    --resume goes on without sending a line twice.

    Example: qustream replay queries-2024-05.tsv.gz --speed 10 --ts-field time --id-field request_id
    """
    from producer_tools.replay import ReplayOptions, count_lines, replay
    from producer_tools.transport import open_sink

    if rate and speed:
        raise typer.BadParameter("--rate and --speed exclude each other")
    if log_format not in ("auto", "jsonl", "csv", "tsv", "text"):
        raise typer.BadParameter(f"--format {log_format!r}: auto, jsonl, csv, tsv or text")
    settings = read_settings()
    names = [str(path) for path in files]
    total = sum(count_lines(name) for name in names) if progress else None

    async def run(stop: asyncio.Event) -> Any:
        options = ReplayOptions(format=log_format, query_field=query_field, id_field=id_field,  # type: ignore[arg-type]
                                ts_field=ts_field, header=not no_header, rate=rate, speed=speed, skip=skip,
                                resume=resume, checkpoint=checkpoint, source=source, stop=stop)
        async with open_sink(settings, "input") as sink:
            with _progress("replay", total, progress) as advance:
                return await replay(sink, names, options, progress=advance)

    summary = _run(settings, run)
    values = summary.as_dict()
    console.print(_summary_table(f"replay → {settings.transport}", values))
    for item in values["bad_lines"]:
        console.print(f"[yellow]bad line[/yellow] {item['file']}:{item['line']}: {item['reason']}")
    if summary.bad > len(values["bad_lines"]):
        console.print(f"… and {summary.bad - len(values['bad_lines'])} more bad lines")
    if as_json:
        print(json.dumps(values))
    if summary.interrupted:
        console.print(f"[yellow]interrupted[/yellow]: continue with the same command and --resume "
                      f"(checkpoint {summary.checkpoint})")
        raise typer.Exit(EXIT_INTERRUPTED)


# --- load -------------------------------------------------------------------------------------


def load_command(
    rate: Annotated[float, typer.Option(callback=_positive, help="Target messages per second.")] = 100.0,
    duration: Annotated[float | None, typer.Option(callback=_positive,
                                                   help="Seconds to run (default 10 unless --count).")] = None,
    count: Annotated[int | None, typer.Option(min=1, help="Messages to send (instead of --duration).")] = None,
    alpha: Annotated[float, typer.Option(help="Zipf exponent: higher = more repeats of the head queries.")] = 1.1,
    unique: Annotated[int, typer.Option(min=1, help="Distinct queries in the vocabulary.")] = 5000,
    seed: Annotated[int | None, typer.Option(help="Random seed for a reproducible stream.")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Also print the summary as JSON on stdout.")] = False,
) -> None:
    """Send a synthetic query stream at a target rate, Zipf-distributed over a furniture vocabulary.

    Example: qustream load --rate 500 --duration 60 --alpha 1.1 --unique 20000
    """
    from producer_tools.load import generate_load
    from producer_tools.transport import open_sink

    settings = read_settings()
    if count is None and duration is None:
        duration = 10.0
    total = count if count is not None else round(rate * (duration or 0))

    async def run(stop: asyncio.Event) -> Any:
        async with open_sink(settings, "input") as sink:
            with _progress("load", total, progress) as advance:
                return await generate_load(sink, rate=rate, duration_s=duration, count=count, alpha=alpha,
                                           unique=unique, seed=seed, stop=stop, progress=advance)

    summary = _run(settings, run)
    console.print(_summary_table(f"load → {settings.transport}", summary.as_dict()))
    if as_json:
        print(json.dumps(summary.as_dict()))


# --- tail -------------------------------------------------------------------------------------


def tail_command(
    topic: Annotated[str, typer.Argument(help="parsed, metrics, dlq, input, or a topic/stream name.")] = "parsed",
    output: Annotated[str, typer.Option("--format", help="json (one object per line) or table (live).")]
    = "json",
    from_beginning: Annotated[bool, typer.Option("--from-beginning", help="Start at the oldest message.")] = False,
    max_messages: Annotated[int | None, typer.Option("--max", help="Stop after N messages.")] = None,
    idle_timeout: Annotated[float | None, typer.Option(help="Stop after this many quiet seconds.")] = None,
    group: Annotated[str | None, typer.Option(help="Resume from and commit to this consumer group (Kafka) or "
                                                   "Redis consumer group.")] = None,
    rows: Annotated[int, typer.Option(help="Rows the live table keeps.")] = 25,
) -> None:
    """Follow a topic as JSON lines or a live table; for dlq, the reason headers are shown.

    Example: qustream tail dlq --from-beginning --max 10 --format table
    """
    from producer_tools.tail import follow, table_columns, table_kind, table_row
    from schemas.spec import load_spec

    if output not in ("json", "table"):
        raise typer.BadParameter("--format: json or table")
    settings = read_settings()
    kind = table_kind(settings, topic)
    fields = load_spec(settings.parse_spec).field_names if kind == "parsed" else ()

    async def run(stop: asyncio.Event) -> None:
        stream = follow(settings, topic, from_beginning=from_beginning, max_messages=max_messages,
                        idle_timeout_s=idle_timeout, group=group)
        if output == "json":
            async for item in _until(stream, stop):
                sys.stdout.write(json.dumps(item, ensure_ascii=False) + "\n")
                sys.stdout.flush()
            return
        recent: list[list[str]] = []

        def render() -> Table:
            table = Table(title=f"{topic} ({len(recent)} latest)")
            for column in table_columns(kind, fields):
                table.add_column(column, overflow="fold")
            for row in recent:
                table.add_row(*row)
            return table

        with Live(render(), console=Console(), refresh_per_second=4) as live:
            async for item in _until(stream, stop):
                recent.append(table_row(kind, item, fields))
                del recent[:-rows]
                live.update(render())

    _run(settings, run)


async def _until(stream: Any, stop: asyncio.Event) -> Any:
    """Items of an async generator until ``stop`` is set (Ctrl-C ends a tail cleanly, offsets committed)."""
    iterator = stream.__aiter__()
    try:
        while not stop.is_set():
            next_item = asyncio.ensure_future(iterator.__anext__())
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({next_item, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if next_item not in done:
                next_item.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await next_item
                return
            try:
                yield next_item.result()
            except StopAsyncIteration:
                return
    finally:
        await iterator.aclose()


# --- dlq --------------------------------------------------------------------------------------


@dlq_app.command("inspect")
def dlq_inspect(
    samples: Annotated[int, typer.Option(help="Sample letters shown per stage/class.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Count dead letters by stage and error class, with attempts and samples.

    Example: qustream dlq inspect --samples 5
    """
    from producer_tools.dlq import inspect

    settings = read_settings()
    report = _run(settings, lambda _stop: inspect(settings, samples))
    if as_json:
        print(json.dumps(report.as_dict(), ensure_ascii=False))
        return
    table = Table(title=f"dead letters: {report.total}")
    for column in ("stage", "class", "count", "already redriven", "attempts", "sample"):
        table.add_column(column, overflow="fold")
    for bucket in report.buckets:
        sample = bucket.samples[0] if bucket.samples else {}
        table.add_row(bucket.stage, bucket.error_class, str(bucket.count), str(bucket.redriven_before),
                      " ".join(f"{a}×{n}" for a, n in sorted(bucket.attempts.items())),
                      f"{sample.get('value', '')[:50]} — {sample.get('message', '')[:60]}")
    Console().print(table)
    for bucket in report.buckets:
        for sample in bucket.samples[1:]:
            Console().print(f"  {bucket.stage}/{bucket.error_class} @{sample['offset']}: {sample['value'][:60]!r} — "
                            f"{sample['message'][:80]}")


@dlq_app.command("redrive")
def dlq_redrive(
    stage: Annotated[str | None, typer.Option(
        callback=_known_stage, help=f"Only letters of this stage: {', '.join(DEAD_LETTER_STAGES)}.")] = None,
    error_class: Annotated[str | None, typer.Option("--class", help="Only letters of this error class.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be redriven; send nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Send dead letters back to the input with qustream.attempts + 1; letters that used
    QUSTREAM_MAX_ATTEMPTS attempts stay put.

    Never redrives a letter twice: the checkpoint is kept per (stage, class) in consumer groups
    named {app_id}-dlq-redrive.<stage>.<class> (Redis: hash {app_id}-dlq-redrive), committed only
    after the input acknowledged the redriven letters. To redrive one again, produce it by hand
    (qustream tail dlq gives its value) or delete that group's offsets.

    Example: qustream dlq redrive --stage infer --class TimeoutError --dry-run
    """
    from producer_tools.dlq import redrive

    settings = read_settings()
    report = _run(settings, lambda _stop: redrive(settings, stage=stage, error_class=error_class, dry_run=dry_run))
    values = report.as_dict()
    if as_json:
        print(json.dumps(values))
    console.print(_summary_table("dlq redrive (dry run)" if dry_run else "dlq redrive", values))
    for bucket, number in sorted(report.by_bucket.items()):
        console.print(f"  {bucket}: {number}")


# --- reprocess --------------------------------------------------------------------------------


def reprocess_command(
    since: Annotated[str, typer.Option(help="ISO time (2024-05-01T12:00:00Z, naive = UTC) or an age: 2h, 30m, 1d.")],
    force: Annotated[bool, typer.Option("--force", help="Move offsets even though workers seem to be running.")]
    = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the moves; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Move the worker group (QUSTREAM_APP_ID) back to a point in time so history is parsed again,
    e.g. after a model upgrade. Refuses while workers of the group are running (running workers
    would overwrite the offsets); stop them, reprocess, start them. --dry-run shows the moves at any time.

    Example: qustream reprocess --since 2h    (then start the workers)
    """
    from producer_tools.reprocess import GroupActive, parse_since, reprocess

    settings = read_settings()
    try:
        moment = parse_since(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        report = _run(settings, lambda stop: reprocess(settings, moment, force=force, dry_run=dry_run, stop=stop))
    except GroupActive as exc:
        console.print(f"[red]refused:[/red] {exc}")
        for member in exc.members:
            console.print(f"  member {member}")
        raise typer.Exit(EXIT_REFUSED) from exc
    except typer.Exit:
        raise  # click's Exit is a RuntimeError too
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    if as_json:
        print(json.dumps(report.as_dict(), default=str))
    table = Table(title=f"{'would move' if dry_run else 'moved'} group {report.group} on {report.source} "
                        f"to {report.since.isoformat(timespec='seconds')}")
    for column in ("partition", "before", "after", "to reparse", "found by"):
        table.add_column(column, justify="right")
    for move in report.moves:
        table.add_row(str(move.partition), str(move.before), str(move.after),
                      "?" if move.to_reparse is None else str(move.to_reparse), move.method)
    console.print(table)
    if report.members and dry_run:
        console.print(f"[yellow]{len(report.members)} member(s) in the group:[/yellow] stop them before the real run, "
                      "or their next commit undoes it")
    elif report.members:
        console.print(f"[yellow]--force with {len(report.members)} running member(s):[/yellow] restart them now, "
                      "or their next commit undoes this")


# --- label ------------------------------------------------------------------------------------


def label_command(
    files: Annotated[list[Path] | None, typer.Argument(help="Log files as `qustream replay` reads them (.jsonl, "
                                                            ".csv, .tsv, text, optionally .gz).",
                                                       exists=True, dir_okay=False, readable=True)] = None,
    out: Annotated[Path, typer.Option(help="Labelled JSONL to write (provenance goes beside it).")]
    = Path("labels.jsonl"),
    topic: Annotated[str | None, typer.Option(help="Read the queries from this topic instead (parsed), from the "
                                                   "beginning until it is quiet.")] = None,
    spec: Annotated[str | None, typer.Option(help="Parse spec (built-in name or YAML path); default: configured.")]
    = None,
    model: Annotated[str | None, typer.Option(help="Teacher: a transformers causal LM id or folder. Without it, "
                                                   "the input's own labels are used.")] = None,
    grounding: Annotated[str | None, typer.Option(help="Teacher's grounding: catalog, span or free (larger "
                                                       "models); default: configured.")] = None,
    log_format: Annotated[str, typer.Option("--format", help="auto (by extension), jsonl, csv, tsv or text.")]
    = "auto",
    query_field: Annotated[str, typer.Option(help="Field/column holding the query.")] = "query",
    batch_size: Annotated[int, typer.Option(min=1, help="Queries per teacher batch.")] = 32,
    limit: Annotated[int, typer.Option(min=0, help="Only the first N queries read (0 = all).")] = 0,
    idle_timeout: Annotated[float, typer.Option(help="--topic: stop after this many quiet seconds.")] = 5.0,
) -> None:
    """Label queries for `qustream train`: from gold labels in the input or with a teacher model.

    Rows that fail the spec's checks are reported with file:line (or topic[partition]@offset) and left out.

    Example: qustream label queries.jsonl.gz --model Qwen/Qwen2.5-1.5B-Instruct --grounding span --out labels.jsonl
    """
    from producer_tools.label import label, log_items, now, parsed_event_item, write_provenance
    from producer_tools.replay import ReplayOptions
    from workers.grammar import load_checked_spec

    if bool(files) == bool(topic):
        raise typer.BadParameter("give log files or --topic, not both (nor neither)")
    if log_format not in ("auto", "jsonl", "csv", "tsv", "text"):
        raise typer.BadParameter(f"--format {log_format!r}: auto, jsonl, csv, tsv or text")
    if grounding not in (None, "catalog", "span", "free"):
        raise typer.BadParameter(f"--grounding {grounding!r}: catalog, span or free")
    overrides: dict[str, Any] = {key: value for key, value in
                                 (("parse_spec", spec), ("model", model), ("grounding", grounding)) if value}
    settings = read_settings().model_copy(update=overrides)
    parse_spec = load_checked_spec(settings.parse_spec)
    started, clock = now()
    source: dict[str, Any]
    if files:
        options = ReplayOptions(format=log_format, query_field=query_field)  # type: ignore[arg-type]
        names = [str(path) for path in files]
        items: Any = log_items(names, parse_spec, options)
        source = {"files": names}
    else:
        assert topic is not None
        from producer_tools.tail import follow

        async def collect(stop: asyncio.Event) -> list[Any]:
            stream = follow(settings, topic, from_beginning=True, idle_timeout_s=idle_timeout,
                            max_messages=limit or None)
            return [parsed_event_item(parse_spec, item) async for item in _until(stream, stop)]

        items = _run(settings, collect)
        source = {"topic": topic}
    teacher = None
    if model:
        from workers.engine import build_engine

        teacher = build_engine(settings)
    with _progress("label", None, True) as advance:
        summary = label(items, parse_spec, out, teacher=teacher, batch_size=batch_size, limit=limit,
                        progress=advance)
    provenance = write_provenance(out, parse_spec, settings, source, teacher, summary, started,
                                  time.perf_counter() - clock)
    for where, reason in summary.skipped[:20]:
        console.print(f"{where}: skipped: {reason}", markup=False, highlight=False)
    if len(summary.skipped) > 20:
        console.print(f"... and {len(summary.skipped) - 20} more skipped (listed in {provenance})",
                      markup=False, highlight=False)
    for where, kept in summary.conflicts[:20]:
        console.print(f"{where}: repeat with other labels than the copy kept ({kept}); left out", markup=False,
                      highlight=False)
    if len(summary.conflicts) > 20:
        console.print(f"... and {len(summary.conflicts) - 20} more conflicting repeats (listed in {provenance})",
                      markup=False, highlight=False)
    if summary.unlabelled:
        where, left_out = summary.unlabelled[0]
        console.print(f"note: {len(summary.unlabelled)} labelled row{'s' if len(summary.unlabelled) > 1 else ''} "
                      f"left fields out, written as null (a label saying the query names none), e.g. {where}: "
                      f"{list(left_out)}; all in {provenance}", markup=False, highlight=False)
    if summary.ignored_keys:
        console.print(f"note: keys left out as the log's metadata, not labels: {sorted(summary.ignored_keys)}",
                      markup=False, highlight=False)
    repeats = f"{summary.repeats} repeat{'' if summary.repeats == 1 else 's'}" + (
        f" ({len(summary.conflicts)} with other labels than the copy kept)" if summary.conflicts else "")
    console.print(f"{summary.written} labelled quer{'y' if summary.written == 1 else 'ies'} -> {out} "
                  f"({summary.read} read, {repeats}, {len(summary.skipped)} skipped); provenance: {provenance}",
                  markup=False, highlight=False)
    if summary.written == 0:
        raise typer.Exit(1)


def produce_command(
    file: Annotated[str, typer.Argument(help="A file of queries (plain lines or JSON lines), or - for stdin.")],
    topic: Annotated[str | None, typer.Option(help="Topic or Redis stream (default: the input).")] = None,
) -> None:
    """Produce queries to the input topic (or Redis stream).  Example: echo 'red velvet sofa' | qustream produce -"""
    from producer_tools.produce import Produced, UndecodableLine, open_input, produce_lines
    from producer_tools.transport import open_sink

    settings = read_settings()
    try:
        raw_lines = open_input(file)
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror or exc}", 2) from exc

    async def run(stop: asyncio.Event) -> Produced:
        async with open_sink(settings, topic or "input") as sink:
            return await produce_lines(sink, raw_lines, source=file, stop=stop)

    with raw_lines:
        try:
            produced = _run(settings, run)
        except UndecodableLine as exc:
            raise fail(str(exc)) from exc
    console.print(f"produced {produced.sent} messages" + (" before the interruption" if produced.interrupted else ""))
    if produced.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


def demo_command(
    queries: Annotated[Path | None, typer.Option(help="Query log to replay (plain lines or JSON lines); default: "
                                                     "the bundled sample of a built-in spec, required for any "
                                                     "other spec.")] = None,
    timeout: Annotated[float, typer.Option(help="Give up waiting for results after this many seconds.")] = 900,
    transport: Annotated[str | None, typer.Option(help="kafka or redis (default: QUSTREAM_TRANSPORT).")] = None,
    spec: Annotated[str | None, typer.Option(help="Parse spec: built-in name or YAML path (default: "
                                                  "QUSTREAM_PARSE_SPEC); built-in specs replay their own sample, "
                                                  "your own spec needs --queries.")]
    = None,
) -> None:
    """Run everything on the embedded defaults: local broker and Redis, default model, worker, sample replay,
    summary; stops what it started.  Example: qustream demo  (or: qustream demo --spec ecommerce --transport redis;
    for your own spec: qustream demo --spec my_spec.yaml --queries my_queries.txt)"""
    from producer_tools.demo import no_sample_message, run_demo, sample_queries

    settings = settings_or_exit()
    if transport is not None:
        if transport not in ("kafka", "redis"):
            raise fail(f"--transport must be kafka or redis, not {transport!r}", 2)
        settings = settings.model_copy(update={"transport": transport})
    if spec is not None:
        settings = settings.model_copy(update={"parse_spec": spec})
    parse_spec = spec_or_exit(settings.parse_spec)
    # Checked before anything starts: another domain's sample through this spec would give nonsense rows.
    if queries is None:
        queries = sample_queries(settings.parse_spec, parse_spec.name)
        if queries is None:
            raise fail(no_sample_message(settings.parse_spec, parse_spec.name), 2)
        console.print(f"replaying the bundled sample of spec {parse_spec.name!r}: {queries}")
    elif not queries.is_file():
        raise fail(f"--queries {queries}: no such file", 2)
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


def register(app: typer.Typer) -> None:
    """Entry point ``qustream.commands``: the tools' commands on the ``qustream`` command line."""
    app.command("produce")(produce_command)
    app.command("demo")(demo_command)
    app.command("replay")(replay_command)
    app.command("load")(load_command)
    app.command("tail")(tail_command)
    app.add_typer(dlq_app, name="dlq")
    app.command("reprocess")(reprocess_command)
    app.command("label")(label_command)
