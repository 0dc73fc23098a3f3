"""Grouped-query SDPA for CPU batches with padding masks.

transformers' ``sdpa`` path copies the 3 key/value heads of SmolLM2 out to all 9 query heads at every
layer and step whenever an attention mask is passed (it only uses SDPA's native GQA without a mask,
and on CPU never). Prefix-cached batches always carry a mask, so that copy of the whole cache per
layer dominated attention. This registers an implementation that hands the mask and the unexpanded
heads to ``scaled_dot_product_attention(enable_gqa=True)``; outputs are the same.

Called with ``shared_prefix`` (per layer, the prompt prefix's keys/values, once), it attends to that
prefix and to each row's own cache in one softmax: the engine then keeps the prefix once instead of
copying it into every row of every batch (``attend_with_shared_prefix``).
"""

from __future__ import annotations

from typing import Any

GQA_SDPA = "qustream_gqa_sdpa"


def gqa_sdpa_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    import torch

    shared_prefix = kwargs.get("shared_prefix")
    packed_plan = kwargs.get("packed_plan")
    if packed_plan is not None and shared_prefix is not None:
        from workers.packed import attend_packed

        return attend_packed(query, key, value, module.layer_idx, packed_plan, shared_prefix[module.layer_idx],
                             scaling if scaling is not None else query.shape[-1] ** -0.5), None
    if shared_prefix is not None:
        prefix_keys, prefix_values = shared_prefix[module.layer_idx]
        return attend_with_shared_prefix(query, key, value, attention_mask, prefix_keys, prefix_values,
                                         scaling if scaling is not None else query.shape[-1] ** -0.5)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    groups = getattr(module, "num_key_value_groups", 1)
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal,
        enable_gqa=groups > 1,
    )
    return output.transpose(1, 2).contiguous(), None


def attend_with_shared_prefix(
    query: Any, key: Any, value: Any, attention_mask: Any, prefix_keys: Any, prefix_values: Any, scaling: float
) -> tuple[Any, None]:
    """Attention over a prefix that every row shares, held once, and each row's own keys/values.

    ``query`` (batch, heads, width, dim); ``key``/``value`` the rows' own cache (batch, kv heads, length,
    dim) with its mask (boolean, True = attend, or None = causal); ``prefix_keys``/``values`` (1, kv heads,
    prefix, dim), visible to every row (one prefix: batch dimension 1). One softmax over both parts, so
    the result is attention over the prefix followed by the row, without a copy of the prefix per row."""
    import torch

    batch, heads, width, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    split = prefix_keys.shape[2]
    # Query head h reads key/value head h // groups: group the query heads under their kv head.
    grouped = query.reshape(batch, kv_heads, groups * width, dim)
    # Against the prefix, every row's queries go into one matrix per kv head: a batch-broadcast
    # matmul would expand (copy) the prefix to every row first, at every layer and step.
    folded = grouped.transpose(0, 1).reshape(kv_heads, batch * groups * width, dim)
    on_prefix = torch.matmul(folded, prefix_keys[0].transpose(-1, -2))
    on_prefix = on_prefix.view(kv_heads, batch, groups * width, split).transpose(0, 1)
    on_rows = torch.matmul(grouped, key.transpose(-1, -2))
    if attention_mask is None:
        allowed = torch.ones(width, length, dtype=torch.bool, device=query.device).tril(length - width)
        allowed = allowed.view(1, 1, width, length)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:  # an additive float mask
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    allowed = allowed[:, :1, -width:, -length:].unsqueeze(2).expand(-1, kv_heads, groups, width, length)
    on_rows = on_rows.masked_fill(~allowed.reshape(allowed.shape[0], kv_heads, groups * width, length),
                                  float("-inf"))
    weights = torch.softmax(torch.cat([on_prefix, on_rows], dim=-1) * scaling, dim=-1, dtype=torch.float32)
    weights = weights.to(query.dtype)
    on_prefix_weights = weights[..., :split].transpose(0, 1).reshape(kv_heads, batch * groups * width, split)
    from_prefix = torch.matmul(on_prefix_weights, prefix_values[0]).view(kv_heads, batch, groups * width, dim)
    output = from_prefix.transpose(0, 1) + torch.matmul(weights[..., split:], value)
    return output.reshape(batch, heads, width, dim).transpose(1, 2).contiguous(), None


def use_gqa_sdpa(model: Any) -> bool:
    """Switch a loaded sdpa model to the GQA implementation; False where that is not possible."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", GQA_SDPA):
        return False
    AttentionInterface.register(GQA_SDPA, gqa_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_mask)
    try:
        model.set_attn_implementation(GQA_SDPA)
    except (ValueError, AttributeError, KeyError):
        return False
    return True


def use_default_sdpa(model: Any) -> None:
    model.set_attn_implementation("sdpa")
