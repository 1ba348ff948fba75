"""Batching concurrent inference steps of different sessions into one forward pass.

Steps queue while a forward runs (in a worker thread, so the event loop keeps taking
messages); the next forward takes every queued step with the same number of new
tokens, whatever LoRA adapters their sessions were opened with (``adapter_cache.py``:
each row gets its own session's, ``kernels.lora.RowAdapters``). One step runs straight
on its session's cache. Several are gathered into a temporary cache of the group's rows (``kernels.gather_prefixes`` copies each row's
prefix in, ``kernels.scatter_new_tokens`` the new positions back): the copies cost
far less than a forward per session because the weights are read once for the whole
group. ``SpanBatchers`` keeps a server's batchers (one per sub-span asked for) and
stops each once no session uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import BlockSpan, KVCache, gather_prefixes, scatter_new_tokens
from kernels.lora import RowAdapters, lora_on_blocks


@dataclass
class _Pending:
    cache: KVCache
    hidden: torch.Tensor  # (rows, new_tokens, hidden)
    position: int
    future: asyncio.Future
    adapter: object = None  # a ServedAdapter (tensors stacked over the span's blocks) or None


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

    async def step(self, cache: KVCache, hidden: torch.Tensor, position: int, adapter=None) -> torch.Tensor:
        """Appends hidden (rows, new_tokens, hidden) at ``position`` of every row; returns the output.

        ``adapter``: LoRA adapters (a ``ServedAdapter``) this session's steps run with.

        Raises:
            ValueError: the cache cannot hold the new tokens.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(cache, hidden, position, future, adapter))
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

    def _forward(self, group: list[_Pending]) -> list[torch.Tensor]:
        if all(item.adapter is None for item in group):
            return self._forward_group(group)
        rows = [RowAdapters(item.hidden.shape[0], item.adapter.tensors if item.adapter else None,
                            item.adapter.scaling if item.adapter else 1.0) for item in group]  # fmt: skip
        with lora_on_blocks(list(self.span.blocks), rows):  # rows in the order _forward_gathered stacks them
            return self._forward_group(group)

    @torch.inference_mode()
    def _forward_group(self, group: list[_Pending]) -> list[torch.Tensor]:
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
        positions = [item.position for item in group]
        caches = [item.cache for item in group]
        merged = self.span.allocate_cache(sum(rows), max(positions) + new_tokens, caches[0].keys[0].dtype)
        gather_prefixes(merged, caches, positions)
        hidden = torch.cat([item.hidden for item in group]).to(self._param.device, self._param.dtype)
        output = self.span(hidden, merged)  # (sum(rows), new_tokens, hidden)
        scatter_new_tokens(merged, caches, positions, new_tokens)
        offsets = [sum(rows[:i]) for i in range(len(group))]
        return [
            output[offset : offset + count].to(item.hidden.dtype)
            for item, offset, count in zip(group, offsets, rows, strict=True)
        ]


class SpanBatchers:
    """The server's batchers: one per requested sub-span, each running as a task.

    A move (:meth:`retire_all`) stops handing out the old span's batchers; each stops
    once the sessions that use it end (they finish on the old weights).

    Args:
        max_rows: rows in one forward at most (``--max-batch-rows``).
    """

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self._current: dict[tuple[int, int], StepBatcher] = {}
        self._tasks: dict[StepBatcher, asyncio.Task] = {}
        self._users: dict[StepBatcher, int] = {}
        self._retired_forwards = 0
        self._retired_batched_steps = 0

    @property
    def forwards(self) -> int:
        return self._retired_forwards + sum(batcher.forwards for batcher in self._tasks)

    @property
    def batched_steps(self) -> int:
        return self._retired_batched_steps + sum(batcher.batched_steps for batcher in self._tasks)

    def acquire(
        self, start: int, end: int, make_span: Callable[[], BlockSpan], tasks: asyncio.TaskGroup
    ) -> StepBatcher:
        """The batcher of blocks ``[start, end)``, started in ``tasks`` (from ``make_span()``) if new.

        Call :meth:`release` when the session that uses it ends.
        """
        batcher = self._current.get((start, end))
        if batcher is None:
            batcher = StepBatcher(make_span(), self.max_rows)
            self._current[(start, end)] = batcher
            self._tasks[batcher] = tasks.create_task(batcher.run())
        self._users[batcher] = self._users.get(batcher, 0) + 1
        return batcher

    def release(self, batcher: StepBatcher) -> None:
        self._users[batcher] -= 1
        self._stop_if_unused(batcher)

    def retire_all(self) -> None:
        """Hands out no current batcher again; sessions already open keep theirs to the end."""
        for key in list(self._current):
            self._stop_if_unused(self._current.pop(key))

    def _stop_if_unused(self, batcher: StepBatcher) -> None:
        if self._users.get(batcher, 0) or batcher in self._current.values():
            return
        self._retired_forwards += batcher.forwards
        self._retired_batched_steps += batcher.batched_steps
        self._users.pop(batcher, None)
        self._tasks.pop(batcher).cancel()
