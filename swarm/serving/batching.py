"""Batching concurrent inference steps of different sessions into one forward pass.

Steps queue while a forward runs (in a worker thread, so the event loop keeps taking
messages); the next forward takes every queued step with the same number of new
tokens. One step runs straight on its session's cache. Several are gathered into a
temporary cache of the group's rows (each row's prefix copied in, the new positions
copied back): the copies cost far less than a forward per session because the
weights are read once for the whole group.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from kernels import BlockSpan, KVCache


@dataclass
class _Pending:
    cache: KVCache
    hidden: torch.Tensor  # (rows, new_tokens, hidden)
    position: int
    future: asyncio.Future


class StepBatcher:
    """Runs steps of many sessions over one span, batching those that queue together.

    Args:
        span: the blocks.
        max_rows: rows in one forward at most.
    """

    def __init__(self, span: BlockSpan, max_rows: int = 64):
        self.span = span
        self.max_rows = max_rows
        self.forwards = 0
        self.batched_steps = 0
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._param = next(span.parameters())

    async def step(self, cache: KVCache, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Appends hidden (rows, new_tokens, hidden) at ``position`` of every row; returns the output.

        Raises:
            ValueError: the cache cannot hold the new tokens.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(cache, hidden, position, future))
        self._wake.set()
        return await future

    async def run(self) -> None:
        """Serves queued steps until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                group = self._take_group()
                try:
                    outputs = await asyncio.to_thread(self._forward, group)
                except Exception as error:  # reported to every step of the group
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(error)
                    continue
                for item, output in zip(group, outputs, strict=True):
                    if not item.future.done():
                        item.future.set_result(output)

    def _take_group(self) -> list[_Pending]:
        new_tokens = self._queue[0].hidden.shape[1]
        group, rest, rows = [], [], 0
        for item in self._queue:
            fits = rows + item.hidden.shape[0] <= self.max_rows or not group
            if item.hidden.shape[1] == new_tokens and fits:
                group.append(item)
                rows += item.hidden.shape[0]
            else:
                rest.append(item)
        self._queue = rest
        return group

    @torch.inference_mode()
    def _forward(self, group: list[_Pending]) -> list[torch.Tensor]:
        self.forwards += 1
        for item in group:
            if item.position + item.hidden.shape[1] > item.cache.max_length:
                raise ValueError("cache full")
        if len(group) == 1:
            item = group[0]
            item.cache.lengths.fill_(item.position)
            hidden = item.hidden.to(self._param.device, self._param.dtype)
            return [self.span(hidden, item.cache).to(item.hidden.dtype)]
        self.batched_steps += len(group)
        return self._forward_gathered(group)

    def _forward_gathered(self, group: list[_Pending]) -> list[torch.Tensor]:
        new_tokens = group[0].hidden.shape[1]
        rows = [item.hidden.shape[0] for item in group]
        length = max(item.position for item in group) + new_tokens
        merged = self.span.allocate_cache(sum(rows), length, group[0].cache.keys[0].dtype)
        offsets = [sum(rows[:i]) for i in range(len(group))]
        for item, offset, count in zip(group, offsets, rows, strict=True):
            for mine, theirs in ((merged.keys, item.cache.keys), (merged.values, item.cache.values)):
                for merged_block, block in zip(mine, theirs, strict=True):
                    # (rows, kv_heads, position, head_dim) prefix of this session
                    merged_block[offset : offset + count, :, : item.position] = block[:, :, : item.position]
            merged.lengths[offset : offset + count] = item.position
        hidden = torch.cat([item.hidden for item in group]).to(self._param.device, self._param.dtype)
        output = self.span(hidden, merged)  # (sum(rows), new_tokens, hidden)
        results = []
        for item, offset, count in zip(group, offsets, rows, strict=True):
            end = item.position + new_tokens
            for mine, theirs in ((merged.keys, item.cache.keys), (merged.values, item.cache.values)):
                for merged_block, block in zip(mine, theirs, strict=True):
                    block[:, :, item.position : end] = merged_block[
                        offset : offset + count, :, item.position : end
                    ]
            item.cache.lengths.fill_(end)
            results.append(output[offset : offset + count].to(item.hidden.dtype))
        return results
