"""Grouped-query SDPA for CPU batches with padding masks.

transformers' ``sdpa`` path copies the 3 key/value heads of SmolLM2 out to all 9 query heads at every
layer and step whenever an attention mask is passed (it only uses SDPA's native GQA without a mask,
and on CPU never). Prefix-cached batches always carry a mask, so that copy of the whole cache per
layer dominated attention. This registers an implementation that hands the mask and the unexpanded
heads to ``scaled_dot_product_attention(enable_gqa=True)``; outputs are the same.
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
