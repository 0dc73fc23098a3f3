"""The shared-prefix attention equals plain attention over the prefix copied in front of every row."""

from __future__ import annotations

import pytest
import torch

from workers.attention import attend_with_shared_prefix


@pytest.mark.parametrize(("batch", "width", "length"), [(1, 1, 5), (4, 1, 9), (5, 3, 12)])
def test_shared_prefix_attention_matches_a_copied_prefix(batch: int, width: int, length: int) -> None:
    generator = torch.Generator().manual_seed(batch * 100 + width * 10 + length)
    heads, kv_heads, dim, prefix = 6, 2, 8, 7

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    query, keys, values = randn(batch, heads, width, dim), randn(batch, kv_heads, length, dim), randn(
        batch, kv_heads, length, dim)
    prefix_keys, prefix_values = randn(1, kv_heads, prefix, dim), randn(1, kv_heads, prefix, dim)
    allowed = torch.rand(batch, 1, width, length, generator=generator) > 0.3
    allowed[..., -1] = True  # each query position sees at least its own token

    shared, _ = attend_with_shared_prefix(query, keys, values, allowed, prefix_keys, prefix_values, dim**-0.5)

    full_keys = torch.cat([prefix_keys.expand(batch, -1, -1, -1), keys], dim=2)
    full_values = torch.cat([prefix_values.expand(batch, -1, -1, -1), values], dim=2)
    full_mask = torch.cat([torch.ones(batch, 1, width, prefix, dtype=torch.bool), allowed], dim=-1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, full_keys, full_values, attn_mask=full_mask, enable_gqa=True)
    torch.testing.assert_close(shared, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_attention_benchmark_checks_the_variants_agree_and_times_each() -> None:
    from bench.attention_bench import (
        PACKED_PREFIXES,
        PACKED_STEPS,
        PACKED_VARIANTS,
        SHAPES,
        VARIANTS,
        run_attention_bench,
    )

    report = run_attention_bench(rounds=3, target_ms=1.0)
    assert [(row["batch"], row["width"], row["prefix"]) for row in report["shapes"]] == list(SHAPES)
    for row in report["shapes"]:
        assert all(row[name]["median_ms"] > 0 for name in VARIANTS)
        assert row["speedup_vs_broadcast_prefix"]["median"] > 0
    packed = report["packed_steps"]
    assert [(row["step"], row["prefix"]) for row in packed] == [
        (name, prefix) for name in PACKED_STEPS for prefix in PACKED_PREFIXES]
    for row in packed:
        assert all(row[name]["median_ms"] > 0 for name in PACKED_VARIANTS)
        assert row["tokens"] == sum(length for length, _ in PACKED_STEPS[row["step"]])
        assert row["slots"] >= row["tokens"]
    # The case the engine's packed attention is for: a joining row's long chunk pads its group.
    joining = next(row for row in packed if "joining" in row["step"])
    assert joining["slots"] > joining["tokens"]
