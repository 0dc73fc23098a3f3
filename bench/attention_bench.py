"""``qustream bench attention``: the engine's shared-prefix attention against the formulations it
replaced, at the shapes of a decoding step, one layer's call at a time.

- ``copied_prefix``: transformers' path before the prefix was held once: the prompt prefix's keys and
  values copied in front of every row's cache, then SDPA with a padding mask (GQA heads unexpanded).
- ``broadcast_prefix``: the prefix held once, attended with batch-broadcast matmuls, which copy the
  prefix out to every row inside each call (the engine's first shared-prefix version).
- ``engine``: ``workers.attention.attend_with_shared_prefix`` (every row's queries folded into one
  matrix per key/value head, so the prefix is never copied).

Packed steps (``workers.packed``, the CPU's decode layout) are timed apart, at the chunk lengths of a
decoding step, a step with rows joining, and a batch's first step:

- ``prefix_per_group``: the packed attention before 2026-12-04: each group of rows padded to its widest
  chunk and attended with ``attend_with_shared_prefix``, so every padded slot is scored against the prefix.
- ``engine``: ``workers.packed.attend_packed``: the prefix part over the packed tokens (no padding),
  only the own-cache part per group, the two merged by their maxima and sums.

The three run interleaved (the order rotates every round) so a load change hits them alike, each sample
repeating the call until it lasts ``target_ms``; outputs are checked equal first. Shapes: SmolLM2-135M's
heads (9 query, 3 key/value, dim 64), the furniture and ecommerce prompt prefixes (357 and 622 tokens),
batch 16 and 64, step width 1 (a decision) and 4 (a jump-forward chunk), 40 cached row positions.

    qustream bench attention --json bench/results/attention.json
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

#: (batch, width, prefix tokens) of the calls timed.
SHAPES: tuple[tuple[int, int, int], ...] = ((16, 1, 357), (64, 1, 357), (64, 4, 357), (64, 1, 622), (64, 4, 622))
HEADS, KV_HEADS, DIM, ROW_LENGTH = 9, 3, 64, 40

Attention = Callable[..., Any]


def broadcast_prefix(query: Any, key: Any, value: Any, allowed: Any, prefix_keys: Any, prefix_values: Any,
                     scaling: float) -> Any:
    import torch

    batch, heads, width, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * width, dim)
    on_prefix = torch.matmul(grouped, prefix_keys.transpose(-1, -2))
    on_rows = torch.matmul(grouped, key.transpose(-1, -2))
    allowed = allowed[:, :1, -width:, -length:].unsqueeze(2).expand(-1, kv_heads, groups, width, length)
    on_rows = on_rows.masked_fill(~allowed.reshape(batch, kv_heads, groups * width, length), float("-inf"))
    weights = torch.softmax(torch.cat([on_prefix, on_rows], dim=-1) * scaling, dim=-1, dtype=torch.float32)
    split = prefix_keys.shape[2]
    output = torch.matmul(weights[..., :split], prefix_values) + torch.matmul(weights[..., split:], value)
    return output.reshape(batch, heads, width, dim).transpose(1, 2).contiguous()


def copied_prefix(query: Any, key: Any, value: Any, allowed: Any, prefix_keys: Any, prefix_values: Any,
                  scaling: float) -> Any:
    import torch

    batch, width = query.shape[0], query.shape[2]
    # What the copied-prefix cache holds at every step: the prefix in each row, then the row.
    keys = torch.cat([prefix_keys.expand(batch, -1, -1, -1), key], dim=2)
    values = torch.cat([prefix_values.expand(batch, -1, -1, -1), value], dim=2)
    mask = torch.cat([torch.ones(batch, 1, width, prefix_keys.shape[2], dtype=torch.bool), allowed], dim=-1)
    output = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                                              enable_gqa=True)
    return output.transpose(1, 2).contiguous()


def engine_attention(query: Any, key: Any, value: Any, allowed: Any, prefix_keys: Any, prefix_values: Any,
                     scaling: float) -> Any:
    from workers.attention import attend_with_shared_prefix

    return attend_with_shared_prefix(query, key, value, allowed, prefix_keys, prefix_values, scaling)[0]


VARIANTS: dict[str, Attention] = {"copied_prefix": copied_prefix, "broadcast_prefix": broadcast_prefix,
                                  "engine": engine_attention}

#: Packed steps timed: name -> (chunk length, cached own positions) per row. Decoding rows mostly
#: choose one token, some feed a jump-forward run; a joining row feeds its whole query suffix.
_DECODING = [(1, 8 + (row * 7) % 33) for row in range(48)] + [(2 + row % 5, 8 + (row * 5) % 33) for row in range(16)]
PACKED_STEPS: dict[str, list[tuple[int, int]]] = {
    "decoding, 64 rows": _DECODING,
    "decoding, 60 rows + 4 joining": _DECODING[4:] + [(16, 0)] * 4,
    "first step, 64 rows": [(6 + (row * 11) % 15, 0) for row in range(64)],
}
PACKED_PREFIXES = (357, 622)


def packed_prefix_per_group(query: Any, key: Any, value: Any, layer: int, plan: Any, prefix: Any,
                            scaling: float) -> Any:
    import torch

    from workers.attention import attend_with_shared_prefix

    needed = max(group.length for group in plan.groups)
    keys, values = plan.cache.write(layer, key[0], value[0], plan.token_rows, plan.token_columns, needed)
    heads, dim = query.shape[1], query.shape[3]
    output = torch.zeros((query.shape[2], heads, dim), dtype=query.dtype, device=query.device)
    flat = query[0].transpose(0, 1)
    for group in plan.groups:
        grouped_query = flat[group.slots].permute(0, 2, 1, 3)
        attended, _ = attend_with_shared_prefix(grouped_query, keys[group.rows, :, : group.length],
                                                values[group.rows, :, : group.length], group.allowed,
                                                prefix[0], prefix[1], scaling)
        output[group.slots[group.valid]] = attended[group.valid]
    return output.unsqueeze(0)


def packed_engine(*inputs: Any) -> Any:
    from workers.packed import attend_packed

    return attend_packed(*inputs)


PACKED_VARIANTS: dict[str, Attention] = {"prefix_per_group": packed_prefix_per_group, "engine": packed_engine}


def _packed_inputs(rows: list[tuple[int, int]], prefix: int, seed: int) -> tuple[Any, ...]:
    import torch

    from workers.packed import PackedCache, plan_step

    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Any:
        return torch.randn(*shape, generator=generator)

    lengths, history = [n for n, _ in rows], [h for _, h in rows]
    cache = PackedCache(layers=1)
    cache.rows = len(rows)
    earlier = [row for row, h in enumerate(history) if h]
    if earlier:
        count = sum(history[row] for row in earlier)
        cache.write(0, randn(KV_HEADS, count, DIM), randn(KV_HEADS, count, DIM),
                    torch.tensor([row for row in earlier for _ in range(history[row])]),
                    torch.cat([torch.arange(history[row]) for row in earlier]), max(history))
    tokens = sum(lengths)
    prefix_keys, prefix_values = randn(1, KV_HEADS, prefix, DIM), randn(1, KV_HEADS, prefix, DIM)
    return (randn(1, HEADS, tokens, DIM), randn(1, KV_HEADS, tokens, DIM), randn(1, KV_HEADS, tokens, DIM), 0,
            plan_step(cache, lengths, history, "cpu"), (prefix_keys, prefix_values), DIM**-0.5)


def _interleaved(variants: dict[str, Attention], inputs: tuple[Any, ...], rounds: int,
                 target_ms: float) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for index in range(rounds):
        for name in names[index % len(names):] + names[: index % len(names)]:
            samples[name].append(_sample_ms(variants[name], inputs, target_ms))
    return samples


def _summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values), 3), "min_ms": round(min(values), 3),
            "max_ms": round(max(values), 3)}


def _speedup(baseline: list[float], engine: list[float]) -> dict[str, float]:
    ratios = [b / e for b, e in zip(baseline, engine, strict=True)]
    return {"median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2), "max": round(max(ratios), 2)}


def _inputs(batch: int, width: int, prefix: int, seed: int) -> tuple[Any, ...]:
    import torch

    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Any:
        return torch.randn(*shape, generator=generator)

    allowed = torch.rand(batch, 1, width, ROW_LENGTH, generator=generator) > 0.3
    allowed[..., -width:] = torch.ones(width, width, dtype=torch.bool).tril()
    return (randn(batch, HEADS, width, DIM), randn(batch, KV_HEADS, ROW_LENGTH, DIM),
            randn(batch, KV_HEADS, ROW_LENGTH, DIM), allowed, randn(1, KV_HEADS, prefix, DIM),
            randn(1, KV_HEADS, prefix, DIM), DIM**-0.5)


def _sample_ms(attention: Attention, inputs: tuple[Any, ...], target_ms: float) -> float:
    calls, started = 0, time.perf_counter()
    while True:
        attention(*inputs)
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed * 1000 >= target_ms:
            return elapsed * 1000 / calls


def run_attention_bench(rounds: int = 15, target_ms: float = 50.0, threads: int = 1) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    results = []
    with torch.inference_mode():
        for batch, width, prefix in SHAPES:
            inputs = _inputs(batch, width, prefix, seed=batch * 1000 + width * 10 + prefix)
            outputs = {name: attention(*inputs) for name, attention in VARIANTS.items()}
            for name, output in outputs.items():
                if not torch.allclose(output, outputs["copied_prefix"], rtol=1e-4, atol=1e-4):
                    raise AssertionError(f"{name} does not compute the same attention as copied_prefix")
            samples = _interleaved(VARIANTS, inputs, rounds, target_ms)
            row: dict[str, Any] = {"batch": batch, "width": width, "prefix": prefix}
            for name, values in samples.items():
                row[name] = _summary(values)
            for baseline in ("copied_prefix", "broadcast_prefix"):
                row[f"speedup_vs_{baseline}"] = _speedup(samples[baseline], samples["engine"])
            results.append(row)
        packed = [_time_packed(name, steps, prefix, rounds, target_ms)
                  for name, steps in PACKED_STEPS.items() for prefix in PACKED_PREFIXES]
    return {"threads": threads, "rounds": rounds, "target_ms": target_ms, "heads": HEADS, "kv_heads": KV_HEADS,
            "dim": DIM, "row_length": ROW_LENGTH, "torch": torch.__version__,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()], "shapes": results,
            "packed_steps": packed}


def _time_packed(name: str, steps: list[tuple[int, int]], prefix: int, rounds: int, target_ms: float) -> dict[str, Any]:
    import torch

    inputs = _packed_inputs(steps, prefix, seed=len(name) * 1000 + prefix)
    plan = inputs[4]
    expected, output = (attention(*inputs) for attention in PACKED_VARIANTS.values())
    if not torch.allclose(output, expected, rtol=1e-4, atol=1e-4):
        raise AssertionError("the engine's packed attention differs from the per-group formulation")
    samples = _interleaved(PACKED_VARIANTS, inputs, rounds, target_ms)
    row: dict[str, Any] = {"step": name, "rows": len(steps), "tokens": sum(n for n, _ in steps),
                           "slots": sum(group.slots.numel() for group in plan.groups), "prefix": prefix}
    for variant, values in samples.items():
        row[variant] = _summary(values)
    row["speedup_vs_prefix_per_group"] = _speedup(samples["prefix_per_group"], samples["engine"])
    return row
