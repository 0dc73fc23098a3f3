"""``qustream bench ...``: benchmarks. Each command lives in its own function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

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
    bf16: Annotated[
        bool | None,
        typer.Option("--bf16/--no-bf16", help="Also run the default engine variant with the model in bf16; "
                     "default: where the CPU computes bf16 natively."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a bar chart (PNG) here.")] = None,
    spec: Annotated[str | None, typer.Option(help="Parse spec (built-in name or YAML path); default: configured.")]
    = None,
) -> None:
    """(a) one generate() per query, (b) batched generate(), (c) the constrained engine, side by side.

    Example: qustream bench engine --spec ecommerce --batch-size 32 --json bench/results/engine_ecommerce.json
    """
    from rich.console import Console
    from rich.table import Table

    from bench.engine_bench import plot_report, run_engine_bench
    from schemas.settings import Settings

    settings = Settings(parse_spec=spec) if spec else Settings()
    report = run_engine_bench(
        settings,
        queries_path=queries,
        batch_sizes=tuple(batch_size or [32]),
        sequential_limit=sequential_limit,
        include_sequential=not skip_sequential,
        include_batched=not skip_batched,
        include_bf16=bf16,
    )
    table = Table(title=f"{report['model']} · {report['device']} · {report['threads']} threads · "
                  f"{report['queries']} queries ((a): {report['sequential_queries']})")
    field_columns = [key for key in (report["variants"][0]["metrics"] if report["variants"] else {})
                     if key.endswith("_acc")]
    for column in ("variant", "batch", "q/s", "tok/s", "p50 ms", "p95 ms", "RSS MB", "valid",
                   *(key.removesuffix("_acc") for key in field_columns), "invented"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for v in report["variants"]:
        m = v["metrics"]

        def pct(key: str, metrics: dict[str, float] = m) -> str:
            return f"{metrics[key]:.0%}" if key in metrics else "-"

        table.add_row(v["name"], str(v["batch_size"]), f"{v['queries_per_s']:.2f}", f"{v['tokens_out_per_s']:.0f}",
                      f"{v['p50_batch_ms']:.0f}", f"{v['p95_batch_ms']:.0f}", f"{v['peak_rss_mb']:.0f}",
                      f"{v['schema_valid']:.0%}", *(pct(key) for key in field_columns), pct("invented_absent"))
    console = Console(width=160)
    console.print(table)
    console.print("ratios (queries/s):", report["ratios"])
    if report["guessed_parses_differ"]:
        console.print("parses with guessed choices that differ (per batch size; must be 0):",
                      report["guessed_parses_differ"])
    if report["bf16_parses_differ"]:
        console.print("bf16 parses that differ from fp32 (per batch size):", report["bf16_parses_differ"])
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


@app.command("latency")
def latency(
    quick: Annotated[bool, typer.Option("--quick", help="Batch 8 and 5-second levels: a smoke run of about 2 "
                                                        "minutes instead of 21.")] = False,
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Write the results here (default bench/results/latency.json, latency_quick.json with "
                       "--quick).")] = None,
    chart: Annotated[Path | None, typer.Option(help="Write the PNG chart here (default: next to the JSON).")] = None,
    no_chart: Annotated[bool, typer.Option("--no-chart", help="Skip the chart.")] = False,
    level_seconds: Annotated[float | None, typer.Option(min=1.0, help="Seconds of arrivals per load level and "
                                                                      "runner (default: the plan's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of arrivals and queries (default: the plan's).")] = None,
    runner: Annotated[list[str] | None, typer.Option(
        "--runner", help="Another runner beside the three, as NAME:SETTING=VALUE,... (settings as in "
                         "QUSTREAM_<SETTING>, on top of the defaults); repeat for more. Example: "
                         "continuous_bf16:miss_batching=continuous,dtype=bfloat16")] = None,
) -> None:
    """Open-loop latency of the step-based and the continuous runner side by side: Poisson arrivals at
    50/80/95 % of the model capacity, about 60 % cache hits, hit and miss percentiles, saturation
    throughput and worker memory. Exits 1 if a produced query did not come out.

    Example: qustream bench latency (the full run, see bench/latency_bench.py)
    """
    from bench.latency_bench import Plan, incomplete_phases, parse_runner, print_summary, run_latency_bench

    plan = Plan.named("quick" if quick else "full")
    for text in runner or []:
        try:
            name, overrides = parse_runner(text)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--runner") from None
        plan.extra_runners[name] = overrides
    if level_seconds is not None:
        plan.level_seconds = level_seconds
    if seed is not None:
        plan.seed = seed
    output = json_out or Path("bench/results") / ("latency_quick.json" if quick else "latency.json")
    results = run_latency_bench(plan, output, None if no_chart else chart or output.with_suffix(".png"))
    print_summary(results)
    print(f"results: {output}")
    # The burst counts too: a query that did not come out parsed is a finding, whatever the load.
    incomplete = incomplete_phases(results)
    if incomplete:
        print("incomplete:", "; ".join(incomplete), f"(the workers' logs: {results['meta']['logs_kept']})")
        raise typer.Exit(1)


@app.command("attention")
def attention(
    rounds: Annotated[int, typer.Option(min=3, help="Interleaved rounds per shape.")] = 15,
    target_ms: Annotated[float, typer.Option(help="Each sample repeats the call until it lasts this long.")] = 50.0,
    threads: Annotated[int, typer.Option(min=1, help="torch threads (the latency benchmark's workers use 1).")] = 1,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """The engine's shared-prefix attention against a prefix copied into every row and against
    batch-broadcast matmuls, one layer's call at decoding shapes, interleaved; and its packed-step
    attention against the per-group formulation it replaced.

    Example: qustream bench attention --json bench/results/attention.json
    """
    from rich.console import Console
    from rich.table import Table

    from bench.attention_bench import run_attention_bench

    report = run_attention_bench(rounds, target_ms, threads)
    table = Table(title=f"one attention call, ms (median of {rounds} rounds, {threads} thread(s))")
    for column in ("batch", "width", "prefix", "copied prefix", "broadcast prefix", "engine",
                   "× vs copied (min–max)", "× vs broadcast (min–max)"):
        table.add_column(column, justify="right")
    for row in report["shapes"]:
        copied, broadcast = row["speedup_vs_copied_prefix"], row["speedup_vs_broadcast_prefix"]
        table.add_row(str(row["batch"]), str(row["width"]), str(row["prefix"]),
                      f"{row['copied_prefix']['median_ms']:.2f}", f"{row['broadcast_prefix']['median_ms']:.2f}",
                      f"{row['engine']['median_ms']:.2f}",
                      f"{copied['median']:.2f} ({copied['min']:.2f}–{copied['max']:.2f})",
                      f"{broadcast['median']:.2f} ({broadcast['min']:.2f}–{broadcast['max']:.2f})")
    console = Console(width=160)
    console.print(table)
    packed = Table(title=f"one packed-step attention call, ms (median of {rounds} rounds, {threads} thread(s))")
    for column in ("step", "rows", "tokens", "slots", "prefix", "prefix per group", "engine", "× (min–max)"):
        packed.add_column(column, justify="right")
    for row in report["packed_steps"]:
        speedup = row["speedup_vs_prefix_per_group"]
        packed.add_row(row["step"], str(row["rows"]), str(row["tokens"]), str(row["slots"]), str(row["prefix"]),
                       f"{row['prefix_per_group']['median_ms']:.2f}", f"{row['engine']['median_ms']:.2f}",
                       f"{speedup['median']:.2f} ({speedup['min']:.2f}–{speedup['max']:.2f})")
    console.print(packed)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"results: {json_out}")


@app.command("handwritten")
def handwritten(
    size: Annotated[list[int] | None, typer.Option(
        "--size", help="Records per step; repeat. Default: the worker's batch_size and batch_max_records.")] = None,
    repetitions: Annotated[int, typer.Option(help="Interleaved rounds per pair and size.")] = 31,
    target_ms: Annotated[float, typer.Option(help="Each sample repeats the step until it lasts this long.")] = 20.0,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Only these pairs (repeat): partitioner, histogram, encoder_orjson, encoder_pydantic, "
                       "backoff, singulariser.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the inputs.")] = 7,
    json_out: Annotated[Path, typer.Option("--json", help="Write the results here.")]
    = Path("bench/results/handwritten.json"),
) -> None:
    """Each hand-written replacement of a library against that library, alone and interleaved, at the
    record counts of one step: median and spread per record of each side, and their ratio.

    Example: qustream bench handwritten
    """
    from rich.console import Console
    from rich.table import Table

    from bench.handwritten import run_handwritten_bench

    console = Console(stderr=True)
    from schemas.settings import Settings

    defaults = Settings.model_fields
    steps = size or [defaults["batch_size"].default, defaults["batch_max_records"].default]
    report = run_handwritten_bench(tuple(steps), repetitions, target_ms,
                                   tuple(only) if only else None, seed, progress=console.print)
    table = Table(title="hand-written vs library, µs per record: median (p10–p90); ratio hand/library per round")
    console.print(f"load average before {report['load_average_before']}, after {report['load_average_after']}")
    for column in ("pair", "records", "hand-written", "library", "ratio (p10–p90)", "saved µs", "keep"):
        table.add_column(column, justify="left" if column == "pair" else "right")
    for pair in report["pairs"]:
        for result in pair["results"]:
            hand, lib, ratio = result["handwritten"], result["library"], result["ratio"]
            table.add_row(
                pair["name"], str(result["records"]),
                f"{hand['median_us']:.3f} ({hand['p10_us']:.3f}–{hand['p90_us']:.3f})",
                f"{lib['median_us']:.3f} ({lib['p10_us']:.3f}–{lib['p90_us']:.3f})",
                f"{ratio['median']:.2f} ({ratio['p10']:.2f}–{ratio['p90']:.2f})",
                f"{result['saving_us_per_record']:.3f}", "yes" if pair["keep_handwritten"] else "no")
    Console(width=160).print(table)
    if "singular_accuracy" in report:
        accuracy = report["singular_accuracy"]
        Console().print(f"singulariser, hand-checked pairs right: rule-based {accuracy['handwritten_right']}, "
                        f"inflect {accuracy['library_right']} of {accuracy['pairs']}")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"results: {json_out}")


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


@app.command("hits-behind-miss")
def hits_behind_miss(
    messages: Annotated[int, typer.Option(help="Messages in each backlog, all pre-cached but --misses.")] = 30_000,
    misses: Annotated[int, typer.Option(help="New queries spread evenly through each backlog.")] = 30,
    rounds: Annotated[int, typer.Option(help="Backlogs drained by each worker, in alternating order.")] = 2,
    runner: Annotated[list[str] | None, typer.Option(help="Another worker beside the two, as "
                                                          "NAME:SETTING=VALUE,...; repeat for more.")] = None,
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the results as JSON.")]
    = Path("bench/results/hits_behind_miss.json"),
) -> None:
    """A mostly cached backlog with a few misses in it: how soon the hits are out when their offsets must
    wait for the misses ahead of them (MAX_UNCOMMITTED_MESSAGES at 4096 against the default).

    Example: qustream bench hits-behind-miss --messages 30000 --misses 30
    """
    from bench.hits_behind_miss import HitsBehindMissPlan, main

    plan = HitsBehindMissPlan(messages=messages, misses=misses, rounds=rounds)
    main(plan, runner or [], json_out)
    typer.echo(f"results: {json_out}")


@app.command("train")
def train_bench(
    train_data: Annotated[Path, typer.Option(help="Labelled JSONL to train on (e.g. `bench queryner --split train`).",
                                             exists=True, dir_okay=False)],
    eval_data: Annotated[Path, typer.Option(help="Labelled JSONL both models are scored on.", exists=True,
                                            dir_okay=False)] = Path("tests/data/quality_ecommerce.jsonl"),
    spec: Annotated[str, typer.Option(help="Parse spec (built-in name or YAML path).")] = "ecommerce",
    out: Annotated[Path, typer.Option(help="Folder for report.json, the training report and its chart.")]
    = Path("bench/results/train_ecommerce"),
    model_out: Annotated[Path | None, typer.Option(help="Folder for the trained model (default: "
                                                        "<model cache>/models/student-<spec>).")] = None,
    max_minutes: Annotated[float, typer.Option(min=0.1, help="Training time budget.")] = 40.0,
    max_steps: Annotated[int | None, typer.Option(min=1)] = None,
    max_epochs: Annotated[int, typer.Option(min=1, help="Passes over the training rows at most.")] = 3,
    method: Annotated[Literal["auto", "full", "lora"], typer.Option(
        help="See `qustream train --help`; lora also saves the adapter alone (what ships).")] = "auto",
    lora_rank: Annotated[int, typer.Option(min=1)] = 16,
    train_layers: Annotated[int, typer.Option(min=0, help="Top decoder layers trained (0 = all).")] = 0,
    learning_rate: Annotated[float | None, typer.Option(help="Default: `qustream train`'s.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    held_out: Annotated[int, typer.Option(min=1, help="Training rows held out for early stopping.")] = 200,
    eval_every: Annotated[int, typer.Option(min=0, help="Held-out evaluation every N steps (0 = each epoch).")]
    = 200,
    eval_limit: Annotated[int, typer.Option(min=0, help="Score only the first N --eval-data queries (0 = all).")]
    = 0,
    seed: Annotated[int, typer.Option()] = 0,
    precision: Annotated[Literal["auto", "bf16", "fp32"], typer.Option(
        help="Step arithmetic (see `qustream train --help`).")] = "auto",
    catalog_folds: Annotated[int, typer.Option(min=1, help="Folds of cross-fitted catalogs (see `qustream train "
                                                           "--help`; 1 = the catalog as it is).")] = 5,
    score_only: Annotated[bool, typer.Option(help="Do not train: score the model an earlier run left in "
                                                  "--model-out (e.g. under a changed spec) beside the base model.")]
    = False,
    base_spec: Annotated[str | None, typer.Option(help="Spec the few-shot base model is scored under (default: "
                                                       "--spec), e.g. ecommerce_few_shot beside --spec ecommerce.")]
    = None,
    few_shot: Annotated[bool, typer.Option(help="Train and serve the student with the spec's examples in the "
                                                "prompt (see `qustream train --help`).")] = False,
) -> None:
    """Fine-tune the default model on labelled queries and compare it with the few-shot base model.

    Example (the run of the shipped adapter, see bench/train_bench.py): qustream bench train --spec ecommerce
    --base-spec ecommerce_few_shot --method lora --train-data /tmp/queryner_train_ecommerce.jsonl
    --eval-data tests/data/quality_ecommerce.jsonl --max-minutes 40 --eval-every 200
    --out bench/results/train_ecommerce_lora/
    """
    from bench.train_bench import print_report, run_train_bench
    from schemas.settings import Settings
    from schemas.spec import load_spec
    from workers.training import TrainOptions

    folder = model_out or Settings().model_cache_dir / "models" / f"student-{load_spec(spec).name}"
    options = TrainOptions(data=train_data, out=folder, max_minutes=max_minutes, max_steps=max_steps,
                           max_epochs=max_epochs,
                           method=method, lora_rank=lora_rank, train_layers=train_layers,
                           learning_rate=learning_rate, batch_size=batch_size,
                           held_out=held_out, eval_every=eval_every, seed=seed,
                           precision=precision, catalog_folds=catalog_folds, few_shot=few_shot)
    report = run_train_bench(spec, train_data, eval_data, out, folder, options, eval_limit=eval_limit,
                             score_only=score_only, base_spec=base_spec)
    print_report(report)


@app.command("queryner")
def queryner(
    split: Annotated[str, typer.Option(help="train or validation (the test split is held out on purpose).")]
    = "validation",
    source: Annotated[Path, typer.Option(help="Folder with QueryNER's train.jsonl / validation.jsonl.")]
    = Path("../shared/data/queryner"),
    out: Annotated[Path, typer.Option(help="Labelled JSONL to write.")] = Path("tests/data/quality_ecommerce.jsonl"),
    spec: Annotated[str, typer.Option(help="Parse spec whose fields the labels follow.")] = "ecommerce",
    limit: Annotated[int, typer.Option(min=0, help="Only the first N rows (0 = all).")] = 0,
    brands_out: Annotated[Path | None, typer.Option(
        help="Instead: write the split's brand catalog (a mentions_file), e.g. schemas/specs/ecommerce_brands.txt."
    )] = None,
    heads_out: Annotated[Path | None, typer.Option(
        help="Instead: write the split's product-type heads (a heads_file), e.g. "
        "schemas/specs/ecommerce_product_heads.txt."
    )] = None,
    product_types_out: Annotated[Path | None, typer.Option(
        help="Instead: write the split's product-type catalog (a mentions_file), e.g. "
        "schemas/specs/ecommerce_product_types.txt."
    )] = None,
) -> None:
    """QueryNER's labelled shopping queries as labelled JSONL for `qustream eval` (and training).

    Example: qustream bench queryner --split validation --out tests/data/quality_ecommerce.jsonl
    """
    from bench.queryner import FIELD_TO_ENTITY, convert, head_catalog, mention_catalog
    from workers.grammar import load_checked_spec
    from workers.inflection import singular_noun

    if split not in ("train", "validation"):
        raise typer.BadParameter("train or validation; the test split is held out", param_hint="--split")
    rows_file = source / f"{split}.jsonl"
    catalogs = [
        (brands_out, "--brands-out", "brands", lambda: mention_catalog(rows_file, FIELD_TO_ENTITY["brand"])),
        (heads_out, "--heads-out", "product-type heads", lambda: head_catalog(rows_file, load_checked_spec(spec))),
        (product_types_out, "--product-types-out", "product types",
         lambda: mention_catalog(rows_file, FIELD_TO_ENTITY["product_type"], singular=singular_noun)),
    ]
    wanted = [(path, option, what, build) for path, option, what, build in catalogs if path is not None]
    for path, option, what, build in wanted:
        entries = build()
        header = (f"# The {what} of QueryNER's {split} split (Palen-Michel et al., LREC-COLING 2024; CC BY 4.0),\n"
                  f"# written by: qustream bench queryner --split {split} {option} {path}\n")
        path.write_text(header + "".join(e + "\n" for e in entries), encoding="utf-8")
        print(f"{len(entries)} {what} -> {path}")
    if wanted:
        return
    rows = convert(rows_file, load_checked_spec(spec), limit)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{len(rows)} labelled queries -> {out}")


def register(root: typer.Typer) -> None:
    """Entry point ``qustream.commands``: ``qustream bench ...``."""
    root.add_typer(app, name="bench")
