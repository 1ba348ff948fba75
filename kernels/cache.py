"""Key/value cache handed to the blocks: memory owned by the caller (the server).

The cache holds, for every block of a span, preallocated key and value tensors of
shape (batch, kv_heads, max_length, head_dim) and one per-row ``lengths`` vector:
how many tokens each row has stored. Rows are independent sessions, so rows at
different positions can run in one forward: each new token of row ``b`` goes to
position ``lengths[b] + i`` and attends to positions ``<= lengths[b] + i`` of its own
row only (full over the cached prefix, causal within the new tokens).

To run steps of several caches in one forward (server-side batching),
:func:`gather_prefixes` copies each cache's stored prefix into consecutive rows of a
temporary cache and :func:`scatter_new_tokens` copies the new positions back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kernels.model_config import ModelConfig


class LayerCache(NamedTuple):
    """What one block needs for one step; built once per step by :meth:`KVCache.begin_step`."""

    keys: torch.Tensor  # (batch, kv_heads, max_length, head_dim), written in place
    values: torch.Tensor  # (batch, kv_heads, max_length, head_dim), written in place
    positions: torch.Tensor  # (batch, new_tokens) int64: where the new tokens go
    mask: torch.Tensor  # (batch, 1, new_tokens, attend_length) bool: True = may attend
    attend_length: int  # cache prefix read this step: max(lengths) + new_tokens


class KVCache:
    """Per-block keys/values plus per-row lengths for a span of ``len(keys)`` blocks."""

    def __init__(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        lengths: torch.Tensor,
        sliding_window: int | None = None,
    ) -> None:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} key tensors but {len(values)} value tensors")
        batch = keys[0].shape[0] if keys else lengths.shape[0]
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {tuple(lengths.shape)}")
        self.keys = keys
        self.values = values
        self.lengths = lengths.to(torch.int64)  # (batch,)
        self.sliding_window = sliding_window

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_blocks: int,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """Zeroed cache for ``num_blocks`` blocks, ``batch_size`` rows of ``max_length`` tokens."""
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return cls(keys, values, lengths, config.sliding_window)

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def begin_step(self, new_tokens: int) -> list[LayerCache]:
        """Positions and mask for ``new_tokens`` per row; one entry per block.

        Raises:
            ValueError: a row would run past ``max_length``.
        """
        # One host sync per step (not per block): the attended prefix length.
        longest = int(self.lengths.max()) if self.lengths.numel() else 0
        attend_length = longest + new_tokens
        if attend_length > self.max_length:
            raise ValueError(
                f"cache full: a row holds {longest} tokens, {new_tokens} more exceed max_length={self.max_length}"
            )
        device = self.lengths.device
        offsets = torch.arange(new_tokens, device=device)
        positions = self.lengths[:, None] + offsets[None, :]  # (batch, new_tokens)
        key_positions = torch.arange(attend_length, device=device)  # (attend_length,)
        mask = key_positions[None, None, :] <= positions[:, :, None]  # (batch, new_tokens, attend_length)
        if self.sliding_window is not None:
            mask &= key_positions[None, None, :] > positions[:, :, None] - self.sliding_window
        mask = mask[:, None]  # (batch, 1, new_tokens, attend_length)
        return [
            LayerCache(k, v, positions, mask, attend_length)
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    def advance(self, new_tokens: int) -> None:
        """Record that every row now holds ``new_tokens`` more tokens."""
        self.lengths += new_tokens

    def truncate(self, length: int) -> None:
        """Rolls every row back to ``length`` tokens (rejected draft tokens): the positions
        dropped are zeroed, so nothing of them stays behind.

        Raises:
            ValueError: ``length`` is outside ``[0, max_length]``.
        """
        if not 0 <= length <= self.max_length:
            raise ValueError(f"length {length} outside [0, {self.max_length}]")
        held = int(self.lengths.max()) if self.lengths.numel() else 0
        if held > length:
            for block in (*self.keys, *self.values):
                block[:, :, length:held].zero_()  # (batch, kv_heads, dropped, head_dim)
        self.lengths.fill_(length)

    def set_length(self, row: int, length: int) -> None:
        """Truncate (or reset with 0) one row, e.g. to replay a session from a known point."""
        if not 0 <= length <= self.max_length:
            raise ValueError(f"length {length} outside [0, {self.max_length}]")
        self.lengths[row] = length


def write_to_cache(cache: LayerCache, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Store new keys/values (batch, kv_heads, new_tokens, head_dim) at each row's positions."""
    batch = keys.shape[0]
    rows = torch.arange(batch, device=keys.device)[:, None]  # (batch, 1)
    # Advanced indices on dims 0 and 2 put (batch, new_tokens) first: (batch, new, kv_heads, head_dim).
    cache.keys[rows, :, cache.positions] = keys.transpose(1, 2).to(cache.keys.dtype)
    cache.values[rows, :, cache.positions] = values.transpose(1, 2).to(cache.values.dtype)


def _row_offsets(parts: Sequence[KVCache]) -> list[int]:
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += part.lengths.shape[0]
    return offsets


def gather_prefixes(merged: KVCache, parts: Sequence[KVCache], positions: Sequence[int]) -> None:
    """Copies the first ``positions[i]`` tokens of every row of ``parts[i]`` into ``merged``.

    ``parts`` take consecutive rows of ``merged`` in order (their batch sizes add up to
    ``merged``'s); each row's length in ``merged`` becomes its part's position.
    """
    for part, offset, position in zip(parts, _row_offsets(parts), positions, strict=True):
        rows = part.lengths.shape[0]
        for mine, theirs in ((merged.keys, part.keys), (merged.values, part.values)):
            for merged_block, block in zip(mine, theirs, strict=True):
                # (rows, kv_heads, position, head_dim) prefix of this part
                merged_block[offset : offset + rows, :, :position] = block[:, :, :position]
        merged.lengths[offset : offset + rows] = position


def scatter_new_tokens(
    merged: KVCache, parts: Sequence[KVCache], positions: Sequence[int], new_tokens: int
) -> None:
    """Copies positions ``positions[i] .. + new_tokens`` of ``merged``'s rows back into ``parts[i]``.

    The inverse of :func:`gather_prefixes` for the tokens a forward just wrote; each part's
    rows then hold ``positions[i] + new_tokens`` tokens.
    """
    for part, offset, position in zip(parts, _row_offsets(parts), positions, strict=True):
        rows, end = part.lengths.shape[0], position + new_tokens
        for mine, theirs in ((merged.keys, part.keys), (merged.values, part.values)):
            for merged_block, block in zip(mine, theirs, strict=True):
                block[:, :, position:end] = merged_block[offset : offset + rows, :, position:end]
        part.lengths.fill_(end)
