"""``qustream bench ...``: benchmarks. Each command lives in its own function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Benchmarks: engine (parse throughput vs plain generate()).", no_args_is_help=True)


@app.callback()
def bench() -> None:
    """Benchmarks of the worker's parts; each writes JSON and optionally a plot."""


@app.command("engine")
def engine(
    queries: Annotated[
        Path | None, typer.Option(help="Queries: labelled JSONL, JSONL with 'query', or text lines.")
    ] = None,
    batch_size: Annotated[
        list[int] | None, typer.Option("--batch-size", help="Batch size; repeat to compare several.")
    ] = None,
    sequential_limit: Annotated[int, typer.Option(help="Queries for (a), one generate() each.")] = 24,
    skip_sequential: Annotated[bool, typer.Option(help="Leave out (a).")] = False,
    skip_batched: Annotated[bool, typer.Option(help="Leave out (b).")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a bar chart (PNG) here.")] = None,
) -> None:
    """(a) one generate() per query, (b) batched generate(), (c) the constrained engine, side by side."""
    from rich.console import Console
    from rich.table import Table

    from bench.engine_bench import plot_report, run_engine_bench
    from schemas.settings import Settings

    settings = Settings()
    report = run_engine_bench(
        settings,
        queries_path=queries,
        batch_sizes=tuple(batch_size or [32]),
        sequential_limit=sequential_limit,
        include_sequential=not skip_sequential,
        include_batched=not skip_batched,
    )
    table = Table(title=f"{report['model']} · {report['device']} · {report['threads']} threads · "
                  f"{report['queries']} queries ((a): {report['sequential_queries']})")
    for column in ("variant", "batch", "q/s", "tok/s", "p50 ms", "p95 ms", "RSS MB", "valid", "item", "mat",
                   "color", "all3", "invented"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for v in report["variants"]:
        m = v["metrics"]

        def pct(key: str, metrics: dict[str, float] = m) -> str:
            return f"{metrics[key]:.0%}" if key in metrics else "-"

        table.add_row(v["name"], str(v["batch_size"]), f"{v['queries_per_s']:.2f}", f"{v['tokens_out_per_s']:.0f}",
                      f"{v['p50_batch_ms']:.0f}", f"{v['p95_batch_ms']:.0f}", f"{v['peak_rss_mb']:.0f}",
                      f"{v['schema_valid']:.0%}", pct("item_type_acc"), pct("material_acc"), pct("color_acc"),
                      pct("all_three_acc"), pct("invented_absent"))
    console = Console()
    console.print(table)
    console.print("ratios (queries/s):", report["ratios"])
    if report["always_null"]:
        console.print("always-null answer:", {k: f"{v:.0%}" for k, v in report["always_null"].items()})
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
    if plot:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_report(report, plot)
