"""PNG charts of the pipeline and latency benchmark results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_charts(results: dict[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    # 1. Ceilings: each scenario next to its reference, and the ratio against the target.
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, title in ((axes[0], "transport", "all cached (transport ceiling)"),
                            (axes[1], "model", "none cached (model ceiling)")):
        section = results[name]
        reference = "aiokafka pass-through" if name == "transport" else "engine alone"
        bars = ax.bar(["qustream", reference], [section["qustream_qps"], section["reference_qps"]],
                      color=["#2b6cb0", "#a0aec0"])
        ax.bar_label(bars, fmt="%.1f")
        ax.axhline(section["reference_qps"] * section["target"], color="#c53030", linestyle="--", linewidth=1,
                   label=f"target {section['target']:.0%} of reference")
        ax.set_title(f"{title}: {section['ratio']:.0%}")
        ax.set_ylabel("queries/s (median of rounds)")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, directory / "pipeline_ceilings.png", plt))

    # 2. Zipf replay over time.
    zipf = results["zipf"]
    timeline = zipf["timeline"]
    t = [row["t_s"] for row in timeline]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    axes[0][0].plot(t, [row["hit_rate"] or 0 for row in timeline], marker="o")
    axes[0][0].set_ylim(0, 1)
    axes[0][0].set_title(f"cache hit rate (overall {zipf['hit_rate']:.0%})")
    axes[0][0].set_xlabel("event time, s")
    axes[0][1].plot(t, [row["parsed_qps"] for row in timeline], marker="o", label="parsed")
    axes[0][1].axhline(zipf["offered_qps"], color="#a0aec0", linestyle="--", label="offered")
    axes[0][1].set_title("queries/s")
    axes[0][1].set_xlabel("parsed time, s")
    axes[0][1].legend(fontsize=8)
    axes[1][0].plot(t, [row["p50_s"] for row in timeline], marker="o", label="p50")
    axes[1][0].plot(t, [row["p95_s"] for row in timeline], marker="o", label="p95")
    latency = zipf["latency"]
    axes[1][0].set_title(f"end-to-end latency (all: p50 {latency['p50_s']:.2f} s, p95 {latency['p95_s']:.2f} s, "
                         f"p99 {latency['p99_s']:.2f} s)", fontsize=9)
    axes[1][0].set_xlabel("event time, s")
    axes[1][0].set_ylabel("s")
    axes[1][0].legend(fontsize=8)
    histogram = zipf["batch_sizes"]["histogram"]
    axes[1][1].bar(list(histogram), list(histogram.values()), color="#2b6cb0")
    axes[1][1].set_title(f"batch sizes (mean {zipf['batch_sizes']['mean']}); worker RSS max "
                         f"{zipf['worker_rss_mib']['max']} MiB", fontsize=9)
    axes[1][1].set_xlabel("messages per batch")
    fig.suptitle(f"Zipf replay: s={zipf['exponent']}, {zipf['queries']} queries at {zipf['offered_qps']}/s, cold cache")
    fig.tight_layout()
    written.append(_save(fig, directory / "pipeline_zipf.png", plt))

    # 3. Batch knobs.
    knobs = results["knobs"]
    lingers = sorted({row["batch_linger_ms"] for row in knobs})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for linger in lingers:
        rows = sorted((r for r in knobs if r["batch_linger_ms"] == linger), key=lambda r: r["batch_size"])
        sizes = [r["batch_size"] for r in rows]
        axes[0].plot(sizes, [r["burst_qps"] for r in rows], marker="o", label=f"linger {linger} ms")
        axes[1].plot(sizes, [r["p95_s"] for r in rows], marker="o", label=f"linger {linger} ms")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.legend(fontsize=8)
    axes[0].set_title("burst throughput (90 % cached), q/s")
    axes[1].set_title("p95 end-to-end latency at a steady rate, s")
    fig.tight_layout()
    written.append(_save(fig, directory / "pipeline_knobs.png", plt))

    # 4. Scaling.
    scaling = results["scaling"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, kind in zip(axes, ("cached", "uncached"), strict=True):
        bars = ax.bar(["1 worker", "2 workers"], [scaling[kind]["1"], scaling[kind]["2"]], color="#2b6cb0")
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(f"{kind}: ×{scaling[kind]['speedup']:.2f}")
        ax.set_ylabel("queries/s")
    fig.suptitle(f"{scaling['partitions']} partitions, {scaling['cores']} cores")
    fig.tight_layout()
    written.append(_save(fig, directory / "pipeline_scaling.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_latency_chart(results: dict[str, Any], path: Path) -> Path:
    """``qustream bench latency``: hit and miss latency percentiles by load level for both runners,
    and each runner's saturation throughput."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    levels = results["levels"]
    loads = [f"{level['load']:.0%}" for level in levels]
    runners = [name for name in results["saturation"] if name not in ("ratio", "ratios")]
    # The three standard runners keep their colours from run to run; runners added with --runner take
    # colours far from theirs.
    colors = {"step": "#a0aec0", "continuous": "#2b6cb0", "batched": "#dd6b20"}
    spare = iter(["#2f855a", "#805ad5", "#c53030", "#b7791f", "#319795", "#d53f8c"])
    colors.update({name: next(spare, "#444444") for name in runners if name not in colors})
    styles = {"p50_ms": ":", "p95_ms": "--", "p99_ms": "-"}
    bars_width = max(1.0, len(runners) / 3)
    fig, axes = plt.subplots(1, 3, figsize=(13 + 2 * bars_width, 4.5),
                             gridspec_kw={"width_ratios": [2, 2, bars_width]})
    for ax, kind in zip(axes[:2], ("hits", "misses"), strict=True):
        for runner in runners:
            for key, style in styles.items():
                values = [level["runners"][runner][kind][key] for level in levels]
                ax.plot(loads, [v if v is not None else float("nan") for v in values], style, marker="o",
                        color=colors.get(runner), label=f"{runner} {key.removesuffix('_ms')}")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (share of the step-based runner's capacity)")
        ax.set_ylabel("end-to-end latency, ms")
        ax.set_title(f"cache {kind}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].axhline(100, color="#c53030", linewidth=1, label="target p99 100 ms")
    axes[0].legend(fontsize=7, ncol=2)
    saturation = results["saturation"]
    bars = axes[2].bar(runners, [saturation[r]["qps"] for r in runners], color=[colors.get(r) for r in runners])
    memory = results["workers"]
    axes[2].bar_label(bars, labels=[f"{saturation[r]['qps']:.2f} q/s\npeak RSS {memory[r]['peak_rss_mib']:.0f} MiB"
                                    for r in runners], fontsize=8 if len(runners) <= 3 else 6)
    axes[2].tick_params(axis="x", labelsize=8 if len(runners) <= 3 else 7)
    axes[2].margins(y=0.2)
    ratios = saturation.get("ratios", {"continuous": saturation["ratio"]})
    axes[2].set_title("saturation, all misses: " + ", ".join(f"{name} {ratio:.0%}" for name, ratio in ratios.items()),
                      fontsize=None if len(runners) <= 3 else 8, wrap=True)
    axes[2].set_ylabel("queries/s (backlog drained)")
    plan = results["meta"]["plan"]
    fig.suptitle(f"qustream bench latency ({plan['name']}): batch {plan['batch_size']}, Poisson arrivals, "
                 f"{plan['hit_ratio']:.0%} hits planned, {plan['level_seconds']:.0f} s per level and runner")
    fig.tight_layout()
    return _save(fig, path, plt)
