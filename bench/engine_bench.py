"""Side-by-side benchmark of the parse engine against plain generate(), one process.

Variants: (a) the original service (one generate() per query, full prompt, free text, last line
json.loads), (b) batched generate() with the full prompt per row, (c) the constrained engine with
jump-forward off, on at full width, on at balanced width, packed without guessed choices, and packed
(the CPU default, which guesses choices: ``workers.drafting``). All run the
same queries; (a) runs on a prefix of them because it is slow. The engine runs the model the worker
serves (with the spec's shipped adapter, if any); (a) and (b) run the model without it, as the original
service did, sharing the engine's copy where there is no adapter. Where the engine runs fp32 on a CPU
that computes bf16 natively, its default variant also runs with the model in bf16 (``…_bf16``), and the
report counts the parses that differ from fp32's.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from schemas.settings import Settings
from schemas.spec import ParseSpec
from workers.evaluation import QualityCase, load_quality, null_baseline, schema_valid, score

log = structlog.get_logger(__name__)

#: The engine's variants: name → (jump_forward, jump_forward_width, packed steps, guessed choices as
#: configured). The packed variants run only where the engine can pack (CPU: the shared-prefix
#: attention); their width is always full. Only packed steps guess.
ENGINE_VARIANTS: dict[str, tuple[bool, str, bool, bool]] = {
    "c_engine": (False, "full", False, False),
    "c_engine_jump_forward_full": (True, "full", False, False),
    "c_engine_jump_forward_balanced": (True, "balanced", False, False),
    "c_engine_packed_unguessed": (True, "full", True, False),
    "c_engine_packed": (True, "full", True, True),
}


def engine_variants(can_pack: bool) -> dict[str, tuple[bool, str, bool, bool]]:
    return {name: v for name, v in ENGINE_VARIANTS.items() if can_pack or not v[2]}


@dataclass
class VariantResult:
    name: str
    batch_size: int
    queries: int
    seconds: float
    queries_per_s: float
    tokens_out_per_s: float
    #: Prompt tokens per query (shared prefix included): what each query costs to read.
    mean_tokens_in: float
    p50_batch_ms: float
    p95_batch_ms: float
    peak_rss_mb: float
    schema_valid: float
    #: Forward passes per query (the engine's variants).
    forwards_per_query: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class _RssSampler:
    """Peak resident memory per measured call (sampled in a thread; the process peak never goes down)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def reset(self) -> None:
        self.peak = self._process.memory_info().rss

    def read(self) -> int:
        self.peak = max(self.peak, self._process.memory_info().rss)
        return self.peak

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def load_bench_queries(spec: ParseSpec, path: Path | None) -> tuple[list[str], list[QualityCase] | None]:
    """Queries from a labelled JSONL of the spec (labels enable accuracy), a plain JSONL of {"query"},
    or text lines; by default the spec's shipped labelled set."""
    if path is None:
        cases = load_quality(spec)
        return [c.query for c in cases], cases
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        records = [json.loads(line) for line in lines]
        if all(set(spec.field_names) & set(r) for r in records):
            cases = load_quality(spec, path)
            return [c.query for c in cases], cases
        return [str(r["query"]) for r in records], None
    return lines, None


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


@dataclass
class _Runner:
    """One variant's progress through its batches."""

    name: str
    engine: Any
    queries: list[str]
    batch_size: int
    jump_forward: bool | None = None
    jump_forward_width: str | None = None
    packed: bool | None = None
    guess_choices: int | None = None
    latencies: list[float] = field(default_factory=list)
    forwards: int = 0
    parses: list[dict[str, str | None] | None] = field(default_factory=list)
    flags: list[list[str]] = field(default_factory=list)
    tokens_out: int = 0
    tokens_in: int = 0
    peak_rss: int = 0

    def configure(self) -> None:
        """Set the shared engine's decoding options to this variant's."""
        if self.jump_forward is not None:
            self.engine.jump_forward = self.jump_forward
        if self.jump_forward_width is not None:
            self.engine.jump_forward_width = self.jump_forward_width
        if self.packed is not None:
            self.engine.packed = self.packed
        if self.guess_choices is not None:
            self.engine.guess_choices = self.guess_choices

    def batches(self) -> list[list[str]]:
        return [self.queries[i : i + self.batch_size] for i in range(0, len(self.queries), self.batch_size)]

    def run_batch(self, spec: ParseSpec, chunk: list[str], rss: _RssSampler) -> None:
        from bench.baselines import baseline_valid

        self.configure()
        rss.reset()
        t0 = time.perf_counter()
        results = self.engine.parse_batch(chunk)
        self.latencies.append(time.perf_counter() - t0)
        self.peak_rss = max(self.peak_rss, rss.read())
        if self.guess_choices is not None:
            self.forwards += self.engine.last_stats.forwards
        valid = baseline_valid(self.engine) or [schema_valid(spec, r.parse) for r in results]
        for result, ok in zip(results, valid, strict=True):
            self.parses.append(result.parse if ok else None)
            self.flags.append(result.ungrounded)
            self.tokens_out += result.tokens_out
            self.tokens_in += result.tokens_in

    def result(self, spec: ParseSpec, cases: list[QualityCase] | None) -> VariantResult:
        seconds = sum(self.latencies)
        n = len(self.parses)
        metrics = score(spec, cases[:n], self.parses, self.flags) if cases else {}
        return VariantResult(
            name=self.name,
            batch_size=self.batch_size,
            queries=n,
            seconds=round(seconds, 3),
            queries_per_s=round(n / seconds, 3),
            tokens_out_per_s=round(self.tokens_out / seconds, 1),
            mean_tokens_in=round(self.tokens_in / max(n, 1), 1),
            p50_batch_ms=round(_percentile(self.latencies, 50) * 1000, 1),
            p95_batch_ms=round(_percentile(self.latencies, 95) * 1000, 1),
            peak_rss_mb=round(self.peak_rss / 2**20, 1),
            schema_valid=round(sum(p is not None for p in self.parses) / max(n, 1), 4),
            forwards_per_query=round(self.forwards / max(n, 1), 3) if self.guess_choices is not None else None,
            metrics={k: round(v, 4) for k, v in metrics.items()},
        )


def run_interleaved(spec: ParseSpec, runners: list[_Runner], cases: list[QualityCase] | None) -> list[VariantResult]:
    """Run the variants' batches round-robin, so load from other processes hits all variants alike."""
    for runner in runners:
        runner.configure()
        runner.engine.warm_up()
    plans = [runner.batches() for runner in runners]
    with _RssSampler() as rss:
        for round_index in range(max(len(p) for p in plans)):
            for runner, plan in zip(runners, plans, strict=True):
                if round_index < len(plan):
                    runner.run_batch(spec, plan[round_index], rss)
    results = [runner.result(spec, cases) for runner in runners]
    for result in results:
        log.info("bench.variant", **{k: v for k, v in asdict(result).items() if k != "metrics"})
    return results


def run_engine_bench(
    settings: Settings,
    queries_path: Path | None = None,
    batch_sizes: tuple[int, ...] = (32,),
    sequential_limit: int = 24,
    include_sequential: bool = True,
    include_batched: bool = True,
    include_bf16: bool | None = None,
) -> dict[str, Any]:
    from bench.baselines import BatchedGenerate, SequentialGenerate
    from workers.engine import ConstrainedEngine
    from workers.grammar import load_checked_spec, spec_vocabulary
    from workers.model import bf16_native, load_model, resolve_adapter

    spec = load_checked_spec(settings.parse_spec)
    vocabulary = spec_vocabulary(spec)
    queries, cases = load_bench_queries(spec, queries_path)
    # The engine runs what the worker serves: the spec's fingerprint picks its shipped adapter
    # (QUSTREAM_ADAPTER=auto). The baselines run the original service: the model without an adapter.
    loaded = load_model(settings, spec_fingerprint=spec.fingerprint)
    # Built first so every variant, baselines included, runs with the same attention implementation.
    engine = ConstrainedEngine(settings, loaded, spec)
    can_pack = engine.packed
    adapter = resolve_adapter(settings, spec.fingerprint)
    baseline_model = loaded
    if (include_sequential or include_batched) and adapter is not None:
        baseline_model = load_model(settings.model_copy(update={"adapter": "none"}))
    # The variant the worker decodes with by default, and (where it can) the same in bf16 beside it.
    default_name = "c_engine_packed" if can_pack else "c_engine_jump_forward_balanced"
    if include_bf16 is None:
        include_bf16 = loaded.device == "cpu" and bf16_native("cpu")
    bf16_engine = None
    if include_bf16 and str(loaded.dtype) == "torch.float32":
        bf16_settings = settings.model_copy(update={"dtype": "bfloat16"})
        bf16_engine = ConstrainedEngine(bf16_settings, load_model(bf16_settings, spec_fingerprint=spec.fingerprint),
                                        spec)
    runners: list[_Runner] = []
    if include_sequential:
        sequential = SequentialGenerate(baseline_model, vocabulary, settings.max_new_tokens)
        runners.append(_Runner("a_sequential_generate", sequential, queries[:sequential_limit], 1))
    for batch_size in batch_sizes:
        if include_batched:
            batched = BatchedGenerate(baseline_model, vocabulary, settings.max_new_tokens)
            runners.append(_Runner("b_batched_generate", batched, queries, batch_size))
        for name, (jump, width, packed, guessed) in engine_variants(can_pack).items():
            runners.append(_Runner(name, engine, queries, batch_size, jump_forward=jump, jump_forward_width=width,
                                   packed=packed, guess_choices=settings.guess_choices if guessed else 0))
        if bf16_engine is not None:
            jump, width, packed, guessed = ENGINE_VARIANTS[default_name]
            runners.append(_Runner(f"{default_name}_bf16", bf16_engine, queries, batch_size, jump_forward=jump,
                                   jump_forward_width=width, packed=packed,
                                   guess_choices=settings.guess_choices if guessed else 0))
    variants = run_interleaved(spec, runners, cases)
    # Guessed choices must not change a parse: any count above 0 here is a defect.
    guessed_differ = {
        runner.batch_size: sum(a != b for a, b in zip(runner.parses, plain.parses, strict=True))
        for runner in runners if runner.name == "c_engine_packed"
        for plain in runners if plain.name == "c_engine_packed_unguessed" and plain.batch_size == runner.batch_size
    }
    bf16_differ = {
        runner.batch_size: sum(a != b for a, b in zip(runner.parses, fp32.parses, strict=True))
        for runner in runners if runner.name.endswith("_bf16")
        for fp32 in runners if fp32.name == default_name and fp32.batch_size == runner.batch_size
    }
    engine.jump_forward = settings.jump_forward
    engine.jump_forward_width = settings.jump_forward_width
    engine.packed = can_pack
    engine.guess_choices = settings.guess_choices
    ratios: dict[str, float] = {}
    by_name = {(v.name, v.batch_size): v for v in variants}
    seq = next((v for v in variants if v.name == "a_sequential_generate"), None)
    for batch_size in batch_sizes:
        for engine_name in engine_variants(can_pack):
            c = by_name[(engine_name, batch_size)]
            if seq:
                ratios[f"{engine_name}@{batch_size}/a"] = round(c.queries_per_s / seq.queries_per_s, 2)
            b = by_name.get(("b_batched_generate", batch_size))
            if b:
                ratios[f"{engine_name}@{batch_size}/b@{batch_size}"] = round(c.queries_per_s / b.queries_per_s, 2)
        full = by_name[("c_engine_jump_forward_full", batch_size)]
        balanced = by_name[("c_engine_jump_forward_balanced", batch_size)]
        ratios[f"balanced/full@{batch_size}"] = round(balanced.queries_per_s / full.queries_per_s, 2)
        unguessed = by_name.get(("c_engine_packed_unguessed", batch_size))
        if unguessed:
            ratios[f"packed/balanced@{batch_size}"] = round(unguessed.queries_per_s / balanced.queries_per_s, 2)
            guessed_variant = by_name[("c_engine_packed", batch_size)]
            ratios[f"guessed/unguessed@{batch_size}"] = round(guessed_variant.queries_per_s / unguessed.queries_per_s,
                                                              2)
        bf16_variant = by_name.get((f"{default_name}_bf16", batch_size))
        if bf16_variant:
            fp32_variant = by_name[(default_name, batch_size)]
            ratios[f"bf16/fp32@{batch_size}"] = round(bf16_variant.queries_per_s / fp32_variant.queries_per_s, 2)
    return {
        "model": loaded.model_id,
        "device": loaded.device,
        "dtype": str(loaded.dtype),
        "threads": _threads(),
        "grounding": settings.grounding,
        "spec": spec.ref,
        "engine_version": engine.version,
        #: The adapter merged into the engine's model; (a) and (b) always run the model without one.
        "engine_adapter": str(adapter) if adapter else None,
        "queries": len(queries),
        "sequential_queries": min(sequential_limit, len(queries)) if include_sequential else 0,
        "variants": [asdict(v) for v in variants],
        "ratios": ratios,
        #: Per batch size: queries whose bf16 parse differs from the fp32 one (same variant otherwise).
        "bf16_parses_differ": bf16_differ,
        #: Per batch size: queries whose parse with guessed choices differs from the one without (must be 0).
        "guessed_parses_differ": guessed_differ,
        "always_null": null_baseline(spec, cases) if cases else {},
    }


def _threads() -> int:
    import torch

    return int(torch.get_num_threads())


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    # Split over lines: "c_engine_jump_forward_balanced" on one line is wider than its bar.
    labels = [v["name"].replace("_", "\n", 1).replace("_forward_", "_forward\n") + f"\n(batch {v['batch_size']})"
              for v in variants]
    qps = [v["queries_per_s"] for v in variants]
    colors = ["#999999" if v["name"].startswith("a") else "#6b8fb3" if v["name"].startswith("b") else "#d9822b"
              for v in variants]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(variants)), 4.5))
    bars = ax.bar(range(len(variants)), qps, color=colors)
    for bar, v in zip(bars, variants, strict=True):
        valid = v["schema_valid"] * 100
        ax.annotate(f"{v['queries_per_s']:.2f} q/s\n{valid:.0f}% valid", (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(variants)), labels, fontsize=7)
    ax.set_ylabel("queries / s")
    ax.set_title(f"{report['model']} on {report['device']} ({report['threads']} threads), {report['queries']} queries")
    ax.set_ylim(0, max(qps) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
