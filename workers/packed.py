"""Packed decoding steps: every row's new tokens in one sequence, each row's keys/values kept apart.

A padded step costs ``rows x widest chunk`` positions in every linear layer: a row joining with a
twenty-token suffix widens every decoding row's step to twenty, so joins had to be prefilled in a
forward pass of their own, and on a CPU each pass carries a fixed overhead. Here the rows' chunks are
concatenated into one sequence (batch 1), so linear layers cost the real tokens only and a joining
row's suffix rides in the running rows' pass. Only attention needs rows apart: ``attend_packed``
writes each token's key/value into its row's own cache, then attends to the shared prompt prefix
(held once) over the packed tokens and to the rows' own caches per group of rows of similar chunk
length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Own-cache columns allocated at a time; the cache grows by whole blocks.
CACHE_BLOCK = 64


@dataclass
class _Group:
    """Rows of similar chunk length attended together: their padded token slots in the packed sequence."""

    rows: torch.Tensor  # (rows,) row indices into the cache
    slots: torch.Tensor  # (rows, width) packed-sequence index of each token, 0 where padded
    valid: torch.Tensor  # (rows, width) bool
    allowed: torch.Tensor  # (rows, 1, width, length) bool: which own-cache columns each token sees
    length: int  # own-cache columns this group reads


@dataclass
class PackedPlan:
    """Where each packed token goes (row, column) and how rows are grouped; shared by every layer."""

    token_rows: torch.Tensor  # (tokens,)
    token_columns: torch.Tensor  # (tokens,)
    groups: list[_Group]
    cache: PackedCache


class PackedCache:
    """Per layer, every row's own keys/values (rows, kv heads, capacity, dim); the prefix is not here."""

    def __init__(self, layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.rows = 0

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, rows: torch.Tensor,
              columns: torch.Tensor, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one step's keys/values ((kv heads, tokens, dim) each) at (row, column)."""
        import torch

        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None or keys.shape[0] < self.rows or keys.shape[2] < needed:
            capacity = -(-needed // CACHE_BLOCK) * CACHE_BLOCK
            shape = (self.rows, key.shape[0], capacity, key.shape[2])
            grown_keys = torch.zeros(shape, dtype=key.dtype, device=key.device)
            grown_values = torch.zeros(shape, dtype=value.dtype, device=value.device)
            if keys is not None and values is not None:
                kept, width = min(keys.shape[0], self.rows), keys.shape[2]
                grown_keys[:kept, :, :width] = keys[:kept]
                grown_values[:kept, :, :width] = values[:kept]
            keys, values = grown_keys, grown_values
            self.keys[layer], self.values[layer] = keys, values
        keys[rows, :, columns] = key.transpose(0, 1)
        values[rows, :, columns] = value.transpose(0, 1)
        return keys, values

    def keep(self, indices: list[int]) -> None:
        import torch

        if not indices:
            self.keys = [None] * len(self.keys)
            self.values = [None] * len(self.values)
            self.rows = 0
            return
        index = torch.tensor(indices)
        for layer, (keys, values) in enumerate(zip(self.keys, self.values, strict=True)):
            if keys is not None and values is not None:
                self.keys[layer] = keys.index_select(0, index.to(keys.device))
                self.values[layer] = values.index_select(0, index.to(values.device))
        self.rows = len(indices)


def plan_step(cache: PackedCache, lengths: list[int], starts: list[int], device: str) -> PackedPlan:
    """The plan of one step where row ``i`` feeds ``lengths[i]`` tokens from own-cache column
    ``starts[i]`` (0 = right after the prefix)."""
    import torch

    token_rows: list[int] = []
    token_columns: list[int] = []
    offsets: list[int] = []
    for row, (count, start) in enumerate(zip(lengths, starts, strict=True)):
        offsets.append(len(token_rows))
        token_rows.extend([row] * count)
        token_columns.extend(range(start, start + count))
    groups = [_group(members, lengths, starts, offsets, device) for members in _split_by_width(lengths)]
    return PackedPlan(torch.tensor(token_rows, device=device), torch.tensor(token_columns, device=device),
                      groups, cache)


def _split_by_width(lengths: list[int]) -> list[list[int]]:
    """Rows in at most two groups by chunk length, split where padding the attention costs least."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best, best_cost = len(order), len(order) * lengths[order[-1]]
    for cut in range(1, len(order)):
        cost = cut * lengths[order[cut - 1]] + (len(order) - cut) * lengths[order[-1]]
        if cost < best_cost:
            best, best_cost = cut, cost
    return [part for part in (order[:best], order[best:]) if part]


def _group(members: list[int], lengths: list[int], starts: list[int], offsets: list[int], device: str) -> _Group:
    import torch

    width = max(lengths[i] for i in members)
    length = max(starts[i] + lengths[i] for i in members)
    slots = torch.zeros((len(members), width), dtype=torch.long)
    valid = torch.zeros((len(members), width), dtype=torch.bool)
    last_column = torch.full((len(members), width), -1, dtype=torch.long)
    for g, row in enumerate(members):
        n = lengths[row]
        slots[g, :n] = torch.arange(offsets[row], offsets[row] + n)
        valid[g, :n] = True
        last_column[g, :n] = torch.arange(starts[row], starts[row] + n)
    # A token sees its row's columns up to its own (written before attention); a padded slot sees
    # none of them, only the prefix, so its softmax stays finite and its output is dropped.
    allowed = torch.arange(length).view(1, 1, length) <= last_column.unsqueeze(2)
    return _Group(torch.tensor(members, device=device), slots.to(device), valid.to(device),
                  allowed.unsqueeze(1).to(device), length)


def attend_packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, plan: PackedPlan,
                  prefix: tuple[torch.Tensor, torch.Tensor], scaling: float) -> torch.Tensor:
    """``query`` (1, heads, tokens, dim), ``key``/``value`` (1, kv heads, tokens, dim) of the packed step;
    returns the attention output (1, tokens, heads, dim).

    One softmax over the prefix and the row's own cache, taken in two parts and merged by their
    maxima and sums (as flash attention merges blocks). The prefix part is computed over the packed
    tokens themselves: every token sees the same prefix, so it needs no row structure, and a group's
    padded slots, which cost ``slots x prefix`` per layer, are never scored against the prefix. Only
    the own-cache part (a few dozen columns) runs per group of rows."""
    import torch

    needed = max(group.length for group in plan.groups)
    keys, values = plan.cache.write(layer, key[0], value[0], plan.token_rows, plan.token_columns, needed)
    _, heads, tokens, dim = query.shape
    prefix_keys, prefix_values = prefix
    kv_heads = prefix_keys.shape[1]
    groups = heads // kv_heads

    def by_token(part: torch.Tensor) -> torch.Tensor:
        """(kv heads, groups x tokens, n) -> (tokens, kv heads, groups, n)."""
        return part.view(kv_heads, groups, tokens, part.shape[-1]).permute(2, 0, 1, 3)

    # Scaled once here rather than on every score. The scores are turned into weights in place: at a
    # batch's first step they are the largest tensors of the layer.
    scaled = query[0] * scaling
    # Query head h reads key/value head h // groups: each kv head's query heads and tokens in one matrix.
    folded = scaled.reshape(kv_heads, groups * tokens, dim)
    on_prefix = torch.matmul(folded, prefix_keys[0].transpose(-1, -2)).float()
    prefix_max = on_prefix.amax(dim=-1, keepdim=True)
    prefix_weights = on_prefix.sub_(prefix_max).exp_()
    prefix_sum = by_token(prefix_weights.sum(dim=-1, keepdim=True))
    from_prefix = by_token(torch.matmul(prefix_weights.to(query.dtype), prefix_values[0]).float())
    prefix_max = by_token(prefix_max)

    own_max = torch.empty_like(prefix_max)
    own_sum = torch.empty_like(prefix_sum)
    from_own = torch.empty_like(from_prefix)
    flat = scaled.transpose(0, 1)  # (tokens, heads, dim)
    for group in plan.groups:
        rows, width = group.slots.shape
        # (rows, width, heads, dim) -> (rows, kv heads, groups x width, dim)
        grouped = flat[group.slots].view(rows, width, kv_heads, groups, dim).permute(0, 2, 3, 1, 4)
        grouped = grouped.reshape(rows, kv_heads, groups * width, dim)
        own_keys = keys[group.rows, :, : group.length]
        own_values = values[group.rows, :, : group.length]
        on_own = torch.matmul(grouped, own_keys.transpose(-1, -2)).float()
        allowed = group.allowed.unsqueeze(2).expand(-1, kv_heads, groups, width, group.length)
        on_own.masked_fill_(~allowed.reshape(rows, kv_heads, groups * width, group.length), float("-inf"))
        # A padded slot sees no column: its maximum is -inf; clamped, its weights are 0, not NaN (it is
        # dropped below anyway).
        group_max = on_own.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
        weights = on_own.sub_(group_max).exp_()
        group_sum = weights.sum(dim=-1, keepdim=True)
        group_out = torch.matmul(weights.to(query.dtype), own_values).float()

        slots = group.slots[group.valid]
        own_max[slots] = _valid_tokens(group_max, group, kv_heads)
        own_sum[slots] = _valid_tokens(group_sum, group, kv_heads)
        from_own[slots] = _valid_tokens(group_out, group, kv_heads)

    merged_max = torch.maximum(prefix_max, own_max)
    prefix_scale = torch.exp(prefix_max - merged_max)
    own_scale = torch.exp(own_max - merged_max)
    output = (from_prefix * prefix_scale + from_own * own_scale) / (prefix_sum * prefix_scale + own_sum * own_scale)
    return output.reshape(tokens, heads, dim).to(query.dtype).unsqueeze(0)


def _valid_tokens(part: torch.Tensor, group: _Group, kv_heads: int) -> torch.Tensor:
    """A group's (rows, kv heads, query groups x width, n) -> (its real tokens, kv heads, query groups, n)."""
    rows, width = group.slots.shape
    return part.view(rows, kv_heads, -1, width, part.shape[-1]).permute(0, 3, 1, 2, 4)[group.valid]


class PackedStepper:
    """Decoding over packed steps (``Stepper``): rows may join at any step without a pass of their own.

    Takes the same left-padded chunks as ``DynamicStepper`` and packs their real tokens; a row's
    own-cache column is its position after the prefix, so rotary positions match a padded batch."""

    def __init__(self, model: Any, device: str, batch: int, prefix: list[tuple[torch.Tensor, torch.Tensor]],
                 prefix_length: int) -> None:
        self.model = model
        self.device = device
        self.prefix = prefix
        self.prefix_length = prefix_length
        self.cache = PackedCache(len(prefix))
        self.cache.rows = batch

    def add_rows(self, count: int) -> None:
        """``count`` new rows after the active ones, with empty caches."""
        self.cache.rows += count

    def step(self, ids: torch.Tensor, step_mask: torch.Tensor, positions: torch.Tensor,
             picks: list[int] | None = None) -> torch.Tensor:
        """As ``Stepper.step``; with ``picks``, the logits at those indices of the packed tokens instead
        (a row's guessed choices are read inside its chunk, not only at its end)."""
        import torch

        real = step_mask.bool()
        lengths = real.sum(dim=1).tolist()
        # Left-padded: a row's first real token is at column width - length.
        starts = [int(positions[i, ids.shape[1] - n]) - self.prefix_length for i, n in enumerate(lengths)]
        plan = plan_step(self.cache, lengths, starts, self.device)
        packed_ids = ids[real].unsqueeze(0).to(self.device)
        packed_positions = positions[real].unsqueeze(0).to(self.device)
        last = torch.tensor(lengths).cumsum(0) - 1 if picks is None else torch.tensor(picks, dtype=torch.long)
        out = self.model(
            input_ids=packed_ids,
            position_ids=packed_positions,
            use_cache=False,
            logits_to_keep=last.to(self.device),
            packed_plan=plan,
            shared_prefix=self.prefix,
        )
        return out.logits[0].float().cpu()

    def keep(self, indices: list[int]) -> None:
        self.cache.keep(indices)

    def absorb(self, joining: Any) -> None:
        raise TypeError("rows join a packed stepper with add_rows, in the running rows' step")
