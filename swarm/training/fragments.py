"""Streaming DiLoCo's fragments: which parameters sync together, when, and how they merge back.

Streaming DiLoCo (Douillard et al. 2025, arXiv:2501.18512) splits the model into P
*fragments* and gives each its own outer step on its own schedule: one fragment syncs
every H/P inner steps, and each fragment still runs H inner steps between its own syncs.
So every member sends 1/P of the model at a time (P times lower peak bandwidth) and the
same bytes in total as plain DiLoCo.

Layout (the paper's strided pattern): block ``i`` belongs to fragment ``i % P``, so
every fragment spans the whole depth; the parameters outside the blocks (embeddings,
final norm, head) are laid end to end and cut into P equal contiguous slices, one per
fragment. With ``L % P == 0`` every fragment has the same size (to one value).

Schedule: the run's outer step ``r`` (``replica.round``, counting fragment syncs) is
taken at inner step ``(r + 1) H / P`` and syncs fragment :func:`fragment_of_round`
``(r + 1) % P``, i.e. fragment ``f`` syncs at the steps ``t`` with
``(t - f H / P) % H == 0``. Plain DiLoCo is ``P = 1``.

A fragment's outer step is the plain one (the same ``torch.optim.SGD`` arithmetic,
elementwise) applied to the fragment's values of ``theta_global`` and of the outer
momentum, so members stay bit-identical per fragment and ``P = 1`` is plain DiLoCo
bit for bit (tests/test_training_streaming.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.training.diloco import OuterOptimizer


@dataclass(frozen=True)
class Fragment:
    """Positions of one fragment in the flat parameter vector, as ``[start, end)`` ranges in order."""

    index: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def numel(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """The fragment's values of ``flat`` as one new vector."""
        return torch.cat([flat[start:end] for start, end in self.ranges])

    def scatter_(self, flat: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` (as from :meth:`gather`) back into the fragment's positions of ``flat``."""
        offset = 0
        for start, end in self.ranges:
            flat[start:end].copy_(values[offset : offset + end - start])
            offset += end - start

    def views(self, module: torch.nn.Module) -> list[torch.Tensor]:
        """1-D views of ``module``'s parameters covering the fragment, in order (no copy of the model)."""
        pieces, offset = [], 0
        bounds = []
        for parameter in module.parameters():
            bounds.append((offset, offset + parameter.numel(), parameter))
            offset += parameter.numel()
        for start, end in self.ranges:
            for low, high, parameter in bounds:
                if high <= start or low >= end:
                    continue
                flat = parameter.detach().view(-1)
                pieces.append(flat[max(start, low) - low : min(end, high) - low])
        return pieces


def make_fragments(named_sizes: list[tuple[str, int]], count: int) -> list[Fragment]:
    """Cut a model's flat parameter vector into ``count`` fragments (see the module docstring).

    Args:
        named_sizes: ``(name, numel)`` of each parameter in flat order; a block's parameters
            have ``blocks.<i>.`` in their name.
        count: P, the number of fragments.

    Raises:
        ValueError: ``count`` is below 1 or above the number of blocks.
    """
    blocks: dict[int, list[tuple[int, int]]] = {}
    others: list[tuple[int, int]] = []
    offset = 0
    for name, numel in named_sizes:
        where = (offset, offset + numel)
        parts = name.split(".")
        if "blocks" in parts and parts.index("blocks") + 1 < len(parts):
            blocks.setdefault(int(parts[parts.index("blocks") + 1]), []).append(where)
        else:
            others.append(where)
        offset += numel
    if count < 1 or count > max(1, len(blocks)):
        raise ValueError(f"--streaming-fragments must be between 1 and the {len(blocks)} blocks, got {count}")
    ranges: list[list[tuple[int, int]]] = [[] for _ in range(count)]
    for block in sorted(blocks):
        ranges[block % count].extend(blocks[block])
    outside = sum(end - start for start, end in others)
    bounds = [round(i * outside / count) for i in range(count + 1)]
    position = 0  # position along the outside parameters laid end to end
    for start, end in others:
        for fragment in range(count):
            low = max(start, start + bounds[fragment] - position)
            high = min(end, start + bounds[fragment + 1] - position)
            if low < high:
                ranges[fragment].append((low, high))
        position += end - start
    return [Fragment(i, tuple(sorted(merge_ranges(r)))) for i, r in enumerate(ranges)]


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with touching neighbours joined (fewer, larger copies)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def model_fragments(module: torch.nn.Module, count: int) -> list[Fragment]:
    """:func:`make_fragments` for ``module``'s parameters."""
    return make_fragments([(name, p.numel()) for name, p in module.named_parameters()], count)


def fragment_of_round(round_index: int, count: int) -> int:
    """The fragment the run's outer step ``round_index`` syncs: ``(round_index + 1) % P``."""
    return (round_index + 1) % count


def fragment_rounds(rounds: int, count: int) -> list[int]:
    """Outer steps each fragment has had after ``rounds`` outer steps of the run."""
    return [sum(1 for r in range(rounds) if fragment_of_round(r, count) == f) for f in range(count)]


def gather_views(views: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([view.reshape(-1) for view in views]).to(torch.float32)


@torch.no_grad()
def scatter_views_(views: list[torch.Tensor], values: torch.Tensor) -> None:
    offset = 0
    for view in views:
        view.copy_(values[offset : offset + view.numel()])
        offset += view.numel()


@torch.no_grad()
def outer_step_values(
    outer: OuterOptimizer, parameters: torch.Tensor, momentum: torch.Tensor | None, gradient: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One outer step of ``outer``'s kind on given values: returns (new parameters, new momentum).

    The same ``torch.optim.SGD`` (``foreach=False``) arithmetic as
    :meth:`~swarm.training.diloco.OuterOptimizer.step`, elementwise, so a fragment
    stepped alone gets the bits it would get inside the whole vector.
    """
    config = outer.config
    parameter = torch.nn.Parameter(parameters.clone())
    sgd = torch.optim.SGD(
        [parameter],
        lr=config.outer_lr,
        momentum=config.outer_momentum,
        nesterov=config.outer_nesterov and config.outer_momentum > 0,
        foreach=False,
    )
    if momentum is not None:
        sgd.state[parameter] = {"momentum_buffer": momentum.clone()}
    parameter.grad = gradient.to(torch.float32)
    sgd.step()
    buffer = sgd.state.get(parameter, {}).get("momentum_buffer")
    return parameter.detach(), buffer


@torch.no_grad()
def step_fragment(outer: OuterOptimizer, fragment: Fragment, averaged: torch.Tensor) -> None:
    """Apply the group's averaged pseudo-gradient of ``fragment`` to ``theta_global`` and its momentum.

    Advances ``outer.round`` (the run's count of fragment syncs).
    """
    momentum = outer.momentum
    parameters, buffer = outer_step_values(
        outer,
        fragment.gather(outer.parameters.detach()),
        None if momentum is None else fragment.gather(momentum),
        averaged,
    )
    fragment.scatter_(outer.parameters.detach(), parameters)
    if buffer is not None:
        if momentum is None:  # the first outer step of the run: the other fragments start at zero
            momentum = torch.zeros_like(outer.parameters.detach())
            outer.momentum = momentum
        fragment.scatter_(momentum, buffer)
    outer.round += 1
