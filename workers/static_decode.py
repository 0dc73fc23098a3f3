"""CUDA path: static KV cache + torch.compile over a fixed set of shape buckets.

A compiled graph is specialised to its input shapes, so every forward here is padded up to one of a
few (batch, width) buckets; ``warm_up`` compiles them all once, after which no request can trigger a
recompile. Finished rows keep their slot (a static cache cannot shrink) and are fed masked pad
tokens. The cache, mask and position buffers are allocated once per batch bucket and reused, so
CUDA graphs ("reduce-overhead") see stable addresses.

Not exercised on a GPU in this repository's CI (no GPU there); the same code runs on CPU with
``compile_model=False`` in the tests, which checks it produces the dynamic path's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    import torch

log = structlog.get_logger(__name__)

BATCH_BUCKETS: tuple[int, ...] = (8, 16, 32, 64)
#: Prefill chunks use the larger widths; jump-forward steps the small ones; width 1 is plain decoding.
WIDTH_BUCKETS: tuple[int, ...] = (1, 4, 16, 32, 64)
#: Room after the prefix for the prefill chunk plus every decoding step of a group.
DECODE_BUDGET = 256


def bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    for size in buckets:
        if value <= size:
            return size
    return None


@dataclass
class _Slots:
    cache: Any
    mask: torch.Tensor
    cursor: int = 0
    slots: list[int] = field(default_factory=list)


class StaticDecoder:
    """Owns one StaticCache per batch bucket and the (optionally compiled) forward."""

    def __init__(
        self,
        model: Any,
        device: str,
        prefix_len: int,
        *,
        compile_model: bool = True,
        batch_buckets: tuple[int, ...] = BATCH_BUCKETS,
        width_buckets: tuple[int, ...] = WIDTH_BUCKETS,
        decode_budget: int = DECODE_BUDGET,
    ) -> None:
        self.model = model
        self.device = device
        self.prefix_len = prefix_len
        self.batch_buckets = batch_buckets
        self.width_buckets = width_buckets
        self.max_len = prefix_len + max(width_buckets) + decode_budget
        self._caches: dict[int, _Slots] = {}
        self._forward = model.forward
        if compile_model:
            import torch

            # Each (batch, width) bucket is one graph; allow them all without hitting the recompile limit.
            limit = len(batch_buckets) * len(width_buckets) + 4
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
            self._forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False, dynamic=False)

    def fits(self, batch: int, longest_feed: int) -> bool:
        return bucket(batch, self.batch_buckets) is not None and bucket(longest_feed, self.width_buckets) is not None

    def start(self, batch: int, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> StaticStepper:
        import torch
        from transformers import StaticCache

        size = bucket(batch, self.batch_buckets)
        if size is None:
            raise ValueError(f"batch {batch} exceeds the largest bucket {self.batch_buckets[-1]}")
        state = self._caches.get(size)
        if state is None:
            cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
            mask = torch.zeros((size, self.max_len), dtype=torch.long, device=self.device)
            state = _Slots(cache=cache, mask=mask)
            self._caches[size] = state
        else:
            state.cache.reset()
        # The shared prefix goes into every slot with the cache's own in-place update.
        for layer_index, (keys, values) in enumerate(prefix):
            state.cache.layers[layer_index].update(keys.expand(size, -1, -1, -1), values.expand(size, -1, -1, -1))
        state.mask.zero_()
        state.mask[:, : self.prefix_len] = 1
        state.cursor = self.prefix_len
        state.slots = list(range(batch))
        return StaticStepper(self, state, size)

    def warm_up(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> None:
        """Run every bucket shape once so compilation happens here, not on a live batch."""
        import torch

        for size in self.batch_buckets:
            for width in self.width_buckets:
                stepper = self.start(size, prefix)
                ids = torch.full((size, width), pad_id, dtype=torch.long)
                ones = torch.ones((size, width), dtype=torch.long)
                positions = torch.arange(self.prefix_len, self.prefix_len + width).expand(size, -1)
                stepper.step(ids, ones, positions)
        log.info("engine.static_warm", buckets=len(self.batch_buckets) * len(self.width_buckets))


class StaticStepper:
    def __init__(self, decoder: StaticDecoder, state: _Slots, size: int) -> None:
        self.decoder = decoder
        self.state = state
        self.size = size

    def step(self, ids: torch.Tensor, step_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        import torch

        decoder, state = self.decoder, self.state
        width = ids.shape[1]
        padded = bucket(width, decoder.width_buckets)
        if padded is None or state.cursor + (padded or 0) > decoder.max_len:
            raise RuntimeError(f"static cache overflow: width {width} at {state.cursor}/{decoder.max_len}")
        slots = torch.tensor(state.slots, dtype=torch.long)
        full_ids = torch.zeros((self.size, padded), dtype=torch.long)
        full_mask = torch.zeros((self.size, padded), dtype=torch.long)
        # Unused slots get a position but no attention weight; they still attend to the prefix,
        # so no softmax row is empty.
        full_pos = torch.full((self.size, padded), decoder.prefix_len, dtype=torch.long)
        full_ids[slots, padded - width :] = ids
        full_mask[slots, padded - width :] = step_mask
        full_pos[slots, padded - width :] = positions
        full_pos[slots, : padded - width] = positions[:, :1]
        state.mask[:, state.cursor : state.cursor + padded] = full_mask.to(decoder.device)
        out = decoder._forward(
            input_ids=full_ids.to(decoder.device),
            attention_mask=state.mask,
            position_ids=full_pos.to(decoder.device),
            past_key_values=state.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        state.cursor += padded
        logits = out.logits[:, -1, :].float().cpu()
        return logits[slots]

    def keep(self, indices: list[int]) -> None:
        self.state.slots = [self.state.slots[i] for i in indices]

    def absorb(self, joining: Any) -> None:
        # Slots start with the prefix at the shared cursor; a late row would need its own. parse_batch
        # never joins; continuous batching runs on the dynamic stepper.
        raise RuntimeError("a static-cache batch cannot take rows once started")
