"""Markdown tables from one or more ``bench/results/pipeline.json`` files, for README "Performance".

    python -m bench.pipeline_report bench/results/pipeline.json [second-run.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _pct(value: float) -> str:
    return f"{value:.0%}"


def _or_dash(cell: Any, run: dict[str, Any]) -> str:
    """A run of only some scenarios (``--only``) shows a dash for the others."""
    try:
        return str(cell(run))
    except KeyError:
        return "–"


def summary_table(runs: list[dict[str, Any]]) -> str:
    """One column per run: the figures the issue asks for, and the targets."""
    header = "| figure | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |"
    lines = [header, "|---|" + "---|" * len(runs)]

    def row(name: str, cell: Any) -> None:
        lines.append(f"| {name} | " + " | ".join(_or_dash(cell, r) for r in runs) + " |")

    row("transport: qustream, all cached (q/s)", lambda r: f"{r['transport']['qustream_qps']:,.0f}")
    row("transport: aiokafka pass-through (q/s)", lambda r: f"{r['transport']['reference_qps']:,.0f}")
    row("**transport ratio** (target ≥ 50 %)",
        lambda r: f"**{_pct(r['transport']['ratio'])}** ({'met' if r['transport']['met'] else 'missed'})")
    row("transport: Faust runner, all cached (q/s, ratio)",
        lambda r: f"{r['transport']['faust_qps']:,.0f} ({_pct(r['transport']['faust_ratio'])})")
    row("process CPU per message: qustream / Faust runner / pass-through (µs)",
        lambda r: " / ".join(f"{r['transport'].get(f'{k}_cpu_us_per_msg', float('nan')):.0f}"
                             for k in ("qustream", "faust", "reference")))
    row("transport ratio by process CPU per message (pass-through µs / qustream µs)",
        lambda r: _pct(r["transport"]["cpu_ratio"]))
    row("transport: spread of the per-round ratios (max − min)", lambda r: _pct(r["transport"]["ratio_spread"]))
    row("model: qustream, none cached (q/s)", lambda r: f"{r['model']['qustream_qps']:.2f}")
    row("model: worker time outside its model calls (share of a round)",
        lambda r: f"{r['model']['worker_overhead']:.1%}")
    row("model: engine alone (q/s)", lambda r: f"{r['model']['reference_qps']:.2f}")
    row("**model ratio** (target ≥ 85 %)",
        lambda r: f"**{_pct(r['model']['ratio'])}** ({'met' if r['model']['met'] else 'missed'})")
    row("model: spread of the per-round ratios (max − min)", lambda r: _pct(r["model"]["ratio_spread"]))
    row("Zipf: offered / delivered (q/s)", lambda r: f"{r['zipf']['offered_qps']} / {r['zipf']['qps']:.2f}")
    row("Zipf: hit rate, all / second half",
        lambda r: f"{_pct(r['zipf']['hit_rate'])} / {_pct(r['zipf']['hit_rate_second_half'])}")
    row("Zipf: latency p50 / p95 / p99 (s)",
        lambda r: "{p50_s:.2f} / {p95_s:.2f} / {p99_s:.2f}".format(**r["zipf"]["latency"]))
    row("Zipf: latency p50 / p95 / p99, second half (s)",
        lambda r: "{p50_s:.2f} / {p95_s:.2f} / {p99_s:.2f}".format(**r["zipf"]["latency_second_half"]))
    row("Zipf: batch size mean / p95", lambda r: f"{r['zipf']['batch_sizes']['mean']} / "
        f"{r['zipf']['batch_sizes']['p95']:.0f}")
    row("Zipf: worker RSS start / max (MiB)",
        lambda r: f"{r['zipf']['worker_rss_mib']['start']} / {r['zipf']['worker_rss_mib']['max']}")
    for kind in ("cached", "uncached"):
        row(f"scaling {kind}: 1 → 2 workers (q/s)",
            lambda r, k=kind: f"{r['scaling'][k]['1']:,.2f} → {r['scaling'][k]['2']:,.2f} "
                              f"(×{r['scaling'][k]['speedup']:.2f})")
    row("worker RSS max, whole run (MiB)", lambda r: f"{r['worker_rss']['worker-1']:,.0f}")
    row("load average before → after", lambda r: f"{r['meta']['load_average_before'][0]} → "
        f"{r['meta']['load_average_after'][0]}")
    row("duration (s)", lambda r: f"{r['meta']['duration_s']:.0f}")
    return "\n".join(lines)


def knobs_table(results: dict[str, Any]) -> str:
    lines = ["| batch size | linger ms | burst q/s (90 % cached) | steady rate q/s | p50 s | p95 s | p99 s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.get("knobs", []):
        lines.append(f"| {r['batch_size']} | {r['batch_linger_ms']} | {r['burst_qps']:.1f} | "
                     f"{r.get('steady_rate_qps', '')} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} |")
    return "\n".join(lines)


def profile_table(results: dict[str, Any]) -> str:
    profile = results["transport"].get("profile") or {}
    if not profile.get("buckets"):
        return "(no profile in this run: pass --profile)"
    lines = [f"py-spy, {profile['samples']} samples of the worker during one all-cached round "
             f"({profile.get('qps_while_profiled', '?')} q/s while profiled):", "",
             "| where | share of worker samples |", "|---|---:|"]
    lines += [f"| {name} | {share:.1%} |" for name, share in profile["buckets"].items()]
    return "\n".join(lines)


def main() -> None:
    runs = [json.loads(Path(path).read_text()) for path in sys.argv[1:]]
    print(summary_table(runs))
    print()
    print(knobs_table(runs[0]))
    print()
    print(profile_table(runs[0]))


if __name__ == "__main__":
    main()
