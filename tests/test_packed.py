"""Packed steps (``workers.packed``): attention over packed rows equals each row attended alone, over
the shared prefix copied in front of the row's own keys/values, whatever the rows' chunk lengths, in
fp32 and in bf16 (a GPU's serving dtype, and a CPU's with ``QUSTREAM_DTYPE=bfloat16``)."""

from __future__ import annotations

import pytest
import torch

from workers.packed import PackedCache, attend_packed, plan_step

#: Per dtype: the tolerance against the reference, computed in fp32 from the same (rounded) inputs.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize(("history", "chunks"), [([0], [4]), ([0, 4, 2], [3, 1, 5]), ([6, 0, 1, 9], [1, 1, 7, 2])])
def test_packed_attention_matches_each_row_alone(history: list[int], chunks: list[int], dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(sum(history) * 10 + sum(chunks))
    heads, kv_heads, dim, prefix = 6, 2, 8, 5

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    prefix_keys, prefix_values = randn(1, kv_heads, prefix, dim), randn(1, kv_heads, prefix, dim)
    rows = len(history)
    own_keys = [randn(kv_heads, h + n, dim) for h, n in zip(history, chunks, strict=True)]
    own_values = [randn(kv_heads, h + n, dim) for h, n in zip(history, chunks, strict=True)]
    cache = PackedCache(layers=1)
    cache.rows = rows
    # Earlier steps left each row's history in the cache (one token per row and step would do too).
    earlier = [row for row in range(rows) if history[row]]
    if earlier:
        token_rows = torch.tensor([r for r in earlier for _ in range(history[r])])
        token_columns = torch.cat([torch.arange(history[r]) for r in earlier])
        cache.write(0, torch.cat([own_keys[r][:, : history[r]] for r in earlier], dim=1),
                    torch.cat([own_values[r][:, : history[r]] for r in earlier], dim=1),
                    token_rows, token_columns, max(history))

    query = randn(1, heads, sum(chunks), dim)
    new_keys = torch.cat([k[:, h:] for k, h in zip(own_keys, history, strict=True)], dim=1).unsqueeze(0)
    new_values = torch.cat([v[:, h:] for v, h in zip(own_values, history, strict=True)], dim=1).unsqueeze(0)
    plan = plan_step(cache, chunks, history, "cpu")
    packed = attend_packed(query, new_keys, new_values, 0, plan, (prefix_keys, prefix_values), dim**-0.5)

    start = 0
    for row, (h, n) in enumerate(zip(history, chunks, strict=True)):
        row_query = query[:, :, start : start + n]
        keys = torch.cat([prefix_keys[0], own_keys[row]], dim=1).unsqueeze(0)
        values = torch.cat([prefix_values[0], own_values[row]], dim=1).unsqueeze(0)
        # Token j of the chunk sees the prefix, the row's history and the chunk up to itself.
        mask = torch.ones(n, prefix + h + n, dtype=torch.bool).tril(prefix + h)
        expected = torch.nn.functional.scaled_dot_product_attention(
            row_query.float(), keys.float(), values.float(), attn_mask=mask, enable_gqa=True)
        assert packed.dtype == dtype
        tolerance = TOLERANCES[dtype]
        torch.testing.assert_close(packed[:, start : start + n].float(), expected.transpose(1, 2), rtol=tolerance,
                                   atol=tolerance)
        start += n


def test_cache_keeps_the_rows_it_is_told_and_grows_in_blocks() -> None:
    cache = PackedCache(layers=1)
    cache.rows = 3
    keys = torch.arange(3 * 2 * 4, dtype=torch.float32).view(2, 12, 1).expand(2, 12, 4).contiguous()
    rows = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    columns = torch.arange(4).repeat(3)
    stored, _ = cache.write(0, keys, keys, rows, columns, 4)
    assert stored.shape[2] % 64 == 0
    cache.keep([2, 0])
    assert cache.rows == 2
    kept = cache.keys[0]
    assert kept is not None
    torch.testing.assert_close(kept[0, :, :4], keys[:, 8:12])
    torch.testing.assert_close(kept[1, :, :4], keys[:, 0:4])
    cache.rows += 1  # a row joins: the next write makes room for it, empty
    grown, _ = cache.write(0, keys[:, :1], keys[:, :1], torch.tensor([2]), torch.tensor([0]), 1)
    assert grown.shape[0] == 3
    torch.testing.assert_close(grown[:2, :, :4], kept[:, :, :4])
