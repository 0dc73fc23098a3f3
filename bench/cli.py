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
    console = Console(width=160)
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


@app.command("pipeline")
def pipeline(
    quick: Annotated[bool, typer.Option("--quick", help="Smaller sizes: about 5 minutes instead of 15.")] = False,
    tiny: Annotated[bool, typer.Option("--tiny", hidden=True, help="Smoke-test sizes (seconds, not minutes).")]
    = False,
    json_out: Annotated[Path, typer.Option("--json", help="Write the results here.")]
    = Path("bench/results/pipeline.json"),
    charts: Annotated[Path | None, typer.Option(help="Write PNG charts into this folder.")] = Path("bench/results"),
    no_charts: Annotated[bool, typer.Option("--no-charts", help="Skip the PNG charts.")] = False,
    profile: Annotated[bool, typer.Option("--profile", help="py-spy the worker on one more all-cached round.")]
    = False,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Run only these scenarios (repeat): transport, model, zipf, scaling, knobs. "
                       "Charts are written only for a run of all of them.")] = None,
) -> None:
    """End to end against a private tansu broker and the machine's Redis, each scenario next to its
    reference: transport ceiling, model ceiling, Zipf replay, 1 vs 2 workers, batch knobs.

    Example: qustream bench pipeline --quick
    """
    from bench.pipeline_bench import SCENARIOS, Plan, print_summary, run_pipeline_bench

    plan = Plan.named("tiny" if tiny else "quick" if quick else "full")
    results = run_pipeline_bench(plan, json_out, None if no_charts else charts, profile=profile,
                                 scenarios=tuple(only) if only else SCENARIOS)
    print_summary(results)


@app.command("chaos")
def chaos(
    messages: Annotated[int, typer.Option(help="Queries to produce (distinct ids chaos-0 … chaos-N-1).")] = 20_000,
    kills: Annotated[int, typer.Option(help="Times the worker is killed with SIGKILL and restarted.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the input and of the fault schedule.")] = 7,
    distinct: Annotated[int, typer.Option(help="Distinct furniture queries the input is drawn from.")] = 150,
    poison_rate: Annotated[float, typer.Option(help="Share of poison messages (bad JSON, empty, bad UTF-8, "
                                                    "over-long).")] = 0.03,
    redis_outage: Annotated[float, typer.Option(help="Seconds the harness's Redis stays down; 0 = no outage.")]
    = 10.0,
    broker_restart: Annotated[bool, typer.Option(help="Kill -9 and restart the broker once.")] = True,
    batch_size: Annotated[int, typer.Option(help="Worker batch size.")] = 32,
    timeout: Annotated[float, typer.Option(help="Give up waiting for output after this many seconds.")] = 1500.0,
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the results as JSON.")]
    = Path("bench/results/chaos.json"),
    workdir: Annotated[Path | None, typer.Option(help="Logs and data of the run (default: a temp folder).")] = None,
) -> None:
    """Fault injection on a private stack (tansu on S3 storage, redis-server, the real model): worker kill -9s,
    a Redis outage, a broker kill -9; every message must come out parsed or dead-lettered, else exit 1.

    Example: qustream bench chaos --messages 3000 --kills 3
    """
    import asyncio

    from rich.console import Console

    from bench.chaos import ChaosConfig, report_table, run_chaos, write_json

    config = ChaosConfig(messages=messages, kills=kills, seed=seed, distinct=distinct, poison_rate=poison_rate,
                         redis_outage_s=redis_outage, redis_outage=redis_outage > 0, broker_restart=broker_restart,
                         batch_size=batch_size, timeout_s=timeout, workdir=workdir)
    report = asyncio.run(run_chaos(config, Console(stderr=True)))
    Console().print(report_table(report))
    write_json(report, json_out)
    Console(stderr=True).print(f"results: {json_out}  logs: {report.logs}")
    if not report.ok:
        raise typer.Exit(1)


def register(root: typer.Typer) -> None:
    """Entry point ``qustream.commands``: ``qustream bench ...``."""
    root.add_typer(app, name="bench")
