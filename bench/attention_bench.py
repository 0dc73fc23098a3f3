"""``qustream bench attention``: the engine's shared-prefix attention against the formulations it
replaced, at the shapes of a decoding step, one layer's call at a time.

- ``copied_prefix``: transformers' path before the prefix was held once: the prompt prefix's keys and
  values copied in front of every row's cache, then SDPA with a padding mask (GQA heads unexpanded).
- ``broadcast_prefix``: the prefix held once, attended with batch-broadcast matmuls, which copy the
  prefix out to every row inside each call (the engine's first shared-prefix version).
- ``engine``: ``workers.attention.attend_with_shared_prefix`` (every row's queries folded into one
  matrix per key/value head, so the prefix is never copied).

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
            samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
            names = list(VARIANTS)
            for index in range(rounds):
                for name in names[index % len(names):] + names[: index % len(names)]:
                    samples[name].append(_sample_ms(VARIANTS[name], inputs, target_ms))
            engine = samples["engine"]
            row: dict[str, Any] = {"batch": batch, "width": width, "prefix": prefix}
            for name, values in samples.items():
                row[name] = {"median_ms": round(statistics.median(values), 3), "min_ms": round(min(values), 3),
                             "max_ms": round(max(values), 3)}
            for baseline in ("copied_prefix", "broadcast_prefix"):
                ratios = [b / e for b, e in zip(samples[baseline], engine, strict=True)]
                row[f"speedup_vs_{baseline}"] = {"median": round(statistics.median(ratios), 2),
                                                 "min": round(min(ratios), 2), "max": round(max(ratios), 2)}
            results.append(row)
    return {"threads": threads, "rounds": rounds, "target_ms": target_ms, "heads": HEADS, "kv_heads": KV_HEADS,
            "dim": DIM, "row_length": ROW_LENGTH, "torch": torch.__version__,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()], "shapes": results}
