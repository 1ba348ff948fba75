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

A group whose forward is known to be short (``StepBatcher.inline_seconds``: the last
forward of as many positions or more took less) runs on the event loop itself instead of a
worker thread: handing a forward to a thread and its result back costs two thread
wake-ups, 0.4 ms each on an idle 2-core VM and 2-9 ms each when it is loaded, on every
hop of every token (issue #18's per-step trace). A longer forward still runs in a thread,
so the server keeps answering pings and taking messages during it.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from kernels import BlockSpan, KVCache, gather_prefixes, scatter_new_tokens
from kernels.lora import RowAdapters, lora_on_blocks

INLINE_SECONDS = 0.05
"""A forward known to take less than this runs on the event loop (no thread hand-offs). Far
under the clients' ping deadline (``ClientConfig.step_deadline_floor / 2``, 1 s by
default), so a server busy with one never looks hung."""


@dataclass
class _Pending:
    cache: KVCache
    hidden: torch.Tensor  # (rows, new_tokens, hidden)
    position: int
    adapter: object = None  # a ServedAdapter (tensors stacked over the span's blocks) or None
    future: asyncio.Future | None = None
    on_result: Callable[[torch.Tensor], None] | None = None  # see StepBatcher.step


class GroupQueue(ABC):
    """Queued items run in groups, one group at a time in a worker thread (so the event
    loop keeps taking messages meanwhile).

    A group is the oldest item and every later one with the same ``_group_key``, up to
    ``max_rows`` rows (an item's rows: ``item.hidden.shape[0]``). Subclasses say what a
    group's key is and how a group runs (``_run_group``: one result per item, in order);
    an error of a group is every one of its items' error.
    """

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self._queue: list = []
        self._wake = asyncio.Event()

    async def _enqueue(self, item):
        """``item``'s result once its group ran (``item.future`` is set here)."""
        item.future = asyncio.get_running_loop().create_future()
        self._queue.append(item)
        self._wake.set()
        return await item.future

    async def run(self) -> None:
        """Serves queued items until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                group = self._take_group()
                if not group:
                    continue
                try:
                    if self._runs_inline(group):
                        results = self._run_group(group)
                    else:
                        results = await asyncio.to_thread(self._run_group, group)
                except Exception as error:  # reported to every item of the group
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(error)
                    continue
                for item, result in zip(group, results, strict=True):
                    if not item.future.done():
                        self._settle(item, result)

    def _settle(self, item, result) -> None:
        """Hands ``result`` to ``item``'s awaiter."""
        item.future.set_result(result)

    def _take_group(self) -> list:
        key = self._group_key(self._queue[0])
        group, rest, rows = [], [], 0
        for item in self._queue:
            fits = rows + item.hidden.shape[0] <= self.max_rows or not group
            if self._group_key(item) == key and fits:
                group.append(item)
                rows += item.hidden.shape[0]
            else:
                rest.append(item)
        self._queue = rest
        return group

    def _runs_inline(self, group: list) -> bool:
        """Whether ``group`` runs on the event loop itself (short enough not to hold it up)."""
        return False

    @abstractmethod
    def _group_key(self, item) -> Hashable:
        """Items run together only when their keys are equal."""

    @abstractmethod
    def _run_group(self, group: list) -> list:
        """Runs ``group`` (in a worker thread); one result per item, in order."""


class StepBatcher(GroupQueue):
    """Runs steps of many sessions over one span, batching those that queue together.

    Args:
        span: the blocks.
        max_rows: rows in one forward at most.
        inline_seconds: a group runs on the event loop when the last forward of as many rows
            and new tokens took less than this (0: always in a worker thread).
    """

    def __init__(self, span: BlockSpan, max_rows: int = 64, inline_seconds: float = INLINE_SECONDS):
        super().__init__(max_rows)
        self.span = span
        self.forwards = 0
        self.batched_steps = 0
        self.inline_seconds = inline_seconds
        self._param = next(span.parameters())
        self._last_seconds: dict[int, float] = {}  # positions (rows x new tokens) -> its last forward

    def _runs_inline(self, group: list[_Pending]) -> bool:
        # short if as many positions or more went through quickly last time (a forward's cost
        # grows with its positions)
        positions = _positions(group)
        return any(
            n >= positions and seconds < self.inline_seconds for n, seconds in self._last_seconds.items()
        )

    async def step(
        self, cache: KVCache, hidden: torch.Tensor, position: int, adapter=None,
        on_result: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Appends hidden (rows, new_tokens, hidden) at ``position`` of every row; returns the output.

        ``adapter``: LoRA adapters (a ``ServedAdapter``) this session's steps run with.
        ``on_result``: called with the output on the event loop as soon as the forward ends,
        before the loop reads any other message (uvloop handles I/O before the awaiting
        task resumes): the server's push and reply leave from here. What it raises, this raises.

        Raises:
            ValueError: the cache cannot hold the new tokens.
        """
        return await self._enqueue(_Pending(cache, hidden, position, adapter, on_result=on_result))

    def _settle(self, item: _Pending, result: torch.Tensor) -> None:
        # on_result runs first, on the loop, before the awaiter resumes (see ``step``)
        try:
            if item.on_result is not None:
                item.on_result(result)
        except Exception as error:  # the item's error, not the queue's
            item.future.set_exception(error)
        else:
            item.future.set_result(result)

    def _group_key(self, item: _Pending) -> int:
        return item.hidden.shape[1]  # new tokens

    def _run_group(self, group: list[_Pending]) -> list[torch.Tensor]:
        started = time.perf_counter()
        results = self._forward(group)
        self._last_seconds[_positions(group)] = time.perf_counter() - started
        return results

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


def _positions(group: list[_Pending]) -> int:
    """Rows times new tokens of a group: what its forward's duration grows with."""
    return sum(item.hidden.shape[0] for item in group) * group[0].hidden.shape[1]


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
