"""Batching concurrent fine-tuning requests of different clients into one forward (or backward).

Requests queue while a computation runs (in a worker thread, so the event loop keeps
taking messages); the next one takes every queued request of the same kind, blocks,
sequence length and deep-prompt length, up to ``max_rows`` rows. The group's rows are
concatenated; each request keeps its own LoRA adapters (``kernels.lora.RowAdapters``:
the low-rank term of a row uses its request's adapters only) and its own deep prompts,
as leaves of its own, so each gets exactly the gradients it would get alone: rows do not
interact in a transformer (attention stays within a row). A backward runs one
``torch.autograd.grad`` for the group and splits the result by rows.

Kinds: ``"forward"`` (no autograd), ``"keep"`` (a forward whose graph is kept for its
backward: each request gets a ``TrainingGraph`` over its rows of the shared graph), and
``"backward"`` (the forward recomputed with autograd, then the gradients).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kernels.lora import RowAdapters
from kernels.model import BlockSpan
from kernels.span_training import run_span_blocks
from swarm.serving.batching import GroupQueue

CHECKPOINT_MIN_TOKEN_BLOCKS = 8192  # tokens x blocks of a graph past which blocks are checkpointed


@dataclass(eq=False)
class TrainingJob:
    """One request's part of a batch.

    Attributes:
        kind: "forward", "keep" or "backward".
        hidden: (rows, seq, hidden) on the server's device and dtype.
        adapter: a ``ServedAdapter`` or None.
        prompts: deep prompts (blocks, virtual, hidden) or None.
        grad_output: (rows, seq, hidden) for a backward.
    """

    kind: str
    start: int
    end: int
    hidden: torch.Tensor
    adapter: object = None
    prompts: torch.Tensor | None = None
    grad_output: torch.Tensor | None = None
    future: asyncio.Future | None = None

    @property
    def group_key(self) -> tuple:
        virtual = 0 if self.prompts is None else self.prompts.shape[1]
        return (self.kind, self.start, self.end, self.hidden.shape[1], virtual)


@dataclass(eq=False)
class TrainingGraph:
    """A request's rows of a forward recorded with autograd: its output and its leaves.

    ``rows`` are its rows in ``leaf`` (the whole group's input); ``shared`` says whether
    other requests' backwards use the same graph (then it is kept after each backward).
    """

    output: torch.Tensor
    leaf: torch.Tensor
    rows: slice
    trained: dict[str, torch.Tensor] = field(default_factory=dict)
    prompts: torch.Tensor | None = None
    shared: bool = False

    def gradients(self, grad_output: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
        """(grad of its input rows, grads of its adapters by name, grad of its prompts or None)."""
        names = list(self.trained)
        inputs = [self.leaf, *(self.trained[n] for n in names)] + (
            [self.prompts] if self.prompts is not None else []
        )
        with torch.enable_grad():
            grads = torch.autograd.grad(self.output, inputs, grad_output, retain_graph=self.shared)
        grad_prompts = grads[-1] if self.prompts is not None else None
        return grads[0][self.rows], dict(zip(names, grads[1 : 1 + len(names)], strict=True)), grad_prompts


def record_graph(blocks: BlockSpan, jobs: list[TrainingJob]) -> list[TrainingGraph]:
    """The group's forward with autograd; one ``TrainingGraph`` per job."""
    with torch.enable_grad():
        leaf = torch.cat([job.hidden for job in jobs]).detach().requires_grad_(True)
        trained = [
            {} if job.adapter is None else {n: t.detach().requires_grad_(True) for n, t in job.adapter.tensors.items()}
            for job in jobs
        ]  # fmt: skip
        prompts = [None if job.prompts is None else job.prompts.detach().requires_grad_(True) for job in jobs]
        lora = None
        if any(job.adapter is not None for job in jobs):
            lora = [RowAdapters(job.hidden.shape[0], own or None, job.adapter.scaling if job.adapter else 1.0)
                    for job, own in zip(jobs, trained, strict=True)]  # fmt: skip
        tokens_blocks = leaf.shape[0] * leaf.shape[1] * len(blocks.blocks)
        output = run_span_blocks(
            blocks, leaf, lora, _row_prompts(jobs, prompts),
            checkpoint=len(blocks.blocks) > 1 and tokens_blocks >= CHECKPOINT_MIN_TOKEN_BLOCKS,
        )  # fmt: skip
    graphs, row = [], 0
    for job, own, prompt in zip(jobs, trained, prompts, strict=True):
        rows = slice(row, row + job.hidden.shape[0])
        graphs.append(TrainingGraph(output[rows], leaf, rows, own, prompt, shared=len(jobs) > 1))
        row = rows.stop
    return graphs


def run_group(blocks: BlockSpan, jobs: list[TrainingJob]) -> list:
    """Computes a group of one kind: outputs (forward), graphs (keep) or gradients (backward)."""
    kind = jobs[0].kind
    if kind == "forward":
        lora = None
        if any(job.adapter is not None for job in jobs):
            lora = [RowAdapters(job.hidden.shape[0], job.adapter.tensors if job.adapter else None,
                                job.adapter.scaling if job.adapter else 1.0) for job in jobs]  # fmt: skip
        with torch.no_grad():
            output = run_span_blocks(blocks, torch.cat([j.hidden for j in jobs]), lora,
                                     _row_prompts(jobs, [j.prompts for j in jobs]))  # fmt: skip
        return list(output.split([job.hidden.shape[0] for job in jobs]))
    graphs = record_graph(blocks, jobs)
    if kind == "keep":
        return graphs
    grad_output = torch.cat([job.grad_output for job in jobs])
    names = [list(graph.trained) for graph in graphs]
    leaves = [graphs[0].leaf]
    for graph, own in zip(graphs, names, strict=True):
        leaves += [graph.trained[n] for n in own] + ([graph.prompts] if graph.prompts is not None else [])
    full = torch.cat([graph.output for graph in graphs])  # the group's output, in row order
    with torch.enable_grad():
        grads = list(torch.autograd.grad(full, leaves, grad_output))
    results, at = [], 1
    for graph, own in zip(graphs, names, strict=True):
        adapters = dict(zip(own, grads[at : at + len(own)], strict=True))
        at += len(own)
        grad_prompts = None
        if graph.prompts is not None:
            grad_prompts, at = grads[at], at + 1
        results.append((grads[0][graph.rows], adapters, grad_prompts))
    return results


def _row_prompts(jobs: list[TrainingJob], prompts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The group's deep prompts: one job's (blocks, virtual, hidden), or per row (blocks, rows, virtual, hidden)."""
    if all(prompt is None for prompt in prompts):
        return None
    if len(jobs) == 1:
        return prompts[0]
    per_row = [
        (torch.zeros_like(next(p for p in prompts if p is not None)) if prompt is None else prompt)[:, None]
        .expand(-1, job.hidden.shape[0], -1, -1)
        for job, prompt in zip(jobs, prompts, strict=True)
    ]  # fmt: skip
    return torch.cat(per_row, dim=1)


class TrainingBatcher(GroupQueue):
    """Queues training jobs and runs them in groups, one group at a time in a worker thread.

    Args:
        blocks_of: (start, end) -> the ``BlockSpan`` to run.
        max_rows: rows in one group at most.
    """

    def __init__(self, blocks_of: Callable[[int, int], BlockSpan], max_rows: int = 64):
        super().__init__(max_rows)
        self.blocks_of = blocks_of
        self.groups = 0
        self.batched_jobs = 0  # jobs that ran in a group with another one

    async def submit(self, job: TrainingJob):
        """The job's result once its group ran (``run_group``'s item for it).

        Raises:
            ValueError: the computation refused the input (reported to every job of the group).
        """
        return await self._enqueue(job)

    def _group_key(self, job: TrainingJob) -> tuple:
        return job.group_key

    def _run_group(self, group: list[TrainingJob]) -> list:
        results = run_group(self.blocks_of(group[0].start, group[0].end), group)
        self.groups += 1
        self.batched_jobs += len(group) if len(group) > 1 else 0
        return results

    def _take_group(self) -> list[TrainingJob]:
        self._queue = [job for job in self._queue if not job.future.done()]  # cancelled requests
        return super()._take_group() if self._queue else []
