"""The reducers' CenteredClip, cache-blocked: every iteration is one pass over the part.

:func:`swarm.training.robust.aggregate` is the reference: plain torch, a new
(members, values) tensor per step, five iterations of four passes each over the
part. On one 25 MB part of four members that was 8.6 s on the 2-core development VM;
a first buffered version (the same operations in reused buffers, the same bits) still
took 0.39 s, paid twice per round (reducer and backup). :func:`aggregate_buffered`
computes the same algorithm differently:

- it walks the part in column blocks of :data:`BLOCK_COLUMNS` that stay in the CPU's
  cache, gathering each block of the (norm-clipped) contributions into one small buffer
  instead of building a (members, values) copy of the whole part;
- one pass per iteration: a block's center is moved, then the members' squared
  distances to the *new* center are summed (in float64) in the same pass, which is
  what the next iteration's clipping needs; the reference makes four passes;
- it stops at the fixed point: once an iteration clipped nobody, the center is the
  weighted mean, and if the next iteration would clip nobody either its step is
  exactly zero in real arithmetic, so it is skipped. On honest inputs that leaves two
  passes (the median with its distances, then one step to the mean).

It does not give the reference's bits: distances are summed per block in float64
(the reference sums the whole row in float32) and the last, rounding-sized steps are
skipped. Every member runs this same code on the same inputs in the same order, so
members still agree bit for bit, which is all the protocol needs (a backup compares
digests of this function's output, never of the reference's). Against the reference
it stays within :data:`REFERENCE_TOLERANCE` (tests/test_training_robust_buffers.py).

The other rules go to the reference unchanged.
"""

from __future__ import annotations

import torch

from swarm.training.robust import NOTABLE_CLIP, Aggregate, RobustConfig, aggregate, screen

MEDIAN_NETWORK_MAX_MEMBERS = 8
"""Above this many contributions the median is ``torch.median``: the network's
compare-exchanges grow with the square of the count."""

BLOCK_COLUMNS = 1 << 15
"""Columns per block: two (members, columns) float32 work buffers of four members take
1 MiB, which stays in a core's L2 cache between the steps of one block."""

REFERENCE_TOLERANCE = 1e-5
"""Largest difference from :func:`swarm.training.robust.aggregate`, as a fraction of the
result's largest magnitude (measured: ~1e-7 on honest inputs, ~1e-6 while clipping)."""


def aggregate_buffered(
    contributions: dict[int, tuple[float, torch.Tensor]], config: RobustConfig
) -> Aggregate:
    """:func:`~swarm.training.robust.aggregate` (no per-member weight caps), cache-blocked.

    The same validation, weight caps and norm clips (same contributors, rejected and
    clipped members); values within :data:`REFERENCE_TOLERANCE` of the reference, and
    the same bits on every call with the same inputs.
    """
    if config.rule != "centered_clip":
        return aggregate(contributions, config)
    order = sorted(contributions)
    numel = contributions[order[0]][1].numel() if order else 0
    screened = screen(contributions, config)
    kept, rejected, clipped = screened.kept, screened.rejected, []
    weight_bound, norms, norm_bound = screened.weight_bound, screened.norms, screened.norm_bound
    live = [member for member, (weight, _) in kept.items() if weight > 0]
    if not live:
        return Aggregate(torch.zeros(numel, dtype=torch.float32), [], rejected, clipped)
    sources, factors, weights = [], [], []
    for member in live:
        weight, values = kept[member]
        was_clipped = weight > weight_bound
        factor = None
        if norms[member] > norm_bound:
            factor = norm_bound / norms[member]
            was_clipped = was_clipped or norms[member] > NOTABLE_CLIP * norm_bound
        if was_clipped:
            clipped.append(member)
        sources.append(values)
        factors.append(factor)
        weights.append(min(weight, weight_bound))
    return Aggregate(_centered_clip(sources, factors, weights, numel, config), live, rejected, clipped)


class _Blocks:
    """The clipped contributions, one column block at a time, in two reused buffers."""

    def __init__(self, sources: list[torch.Tensor], factors: list[float | None], numel: int):
        self.sources, self.factors, self.numel = sources, factors, numel
        width = min(BLOCK_COLUMNS, max(numel, 1))
        self.rows = torch.empty((len(sources), width), dtype=torch.float32)  # (members, columns)
        self.work = torch.empty_like(self.rows)

    def __iter__(self):
        """Yields (start, stop, rows, work): rows hold the clipped block, work is scratch."""
        for start in range(0, self.numel, BLOCK_COLUMNS):
            stop = min(start + BLOCK_COLUMNS, self.numel)
            rows, work = self.rows[:, : stop - start], self.work[:, : stop - start]
            for row, source, factor in zip(rows, self.sources, self.factors, strict=True):
                if factor is None:
                    row.copy_(source[start:stop])
                else:  # the same float32 product as the reference's ``values * factor``
                    torch.mul(source[start:stop], factor, out=row)
            yield start, stop, rows, work


def _add_squared_distances(rows: torch.Tensor, center: torch.Tensor, work: torch.Tensor, into: torch.Tensor):
    """``into[i] += |rows[i] - center|^2`` (each block's norm in float32, their squares summed in float64)."""
    torch.sub(rows, center, out=work)
    into.add_(torch.linalg.vector_norm(work, dim=1).to(torch.float64).square())


def _centered_clip(
    sources: list[torch.Tensor],
    factors: list[float | None],
    weights: list[float],
    numel: int,
    config: RobustConfig,
) -> torch.Tensor:
    """CenteredClip of the contributions ``sources[i] * factors[i]`` (None: unclipped)."""
    count = len(sources)
    shares = torch.tensor(weights, dtype=torch.float32)
    shares = shares / shares.sum()
    blocks = _Blocks(sources, factors, numel)
    center = torch.empty(numel, dtype=torch.float32)
    squared = torch.zeros(count, dtype=torch.float64)  # each member's squared distance to the center
    for start, stop, rows, work in blocks:  # the start point and its distances
        if count > 2:
            center[start:stop] = _lower_median(rows)
        else:
            torch.mv(rows.T, shares, out=center[start:stop])  # the weighted mean
        _add_squared_distances(rows, center[start:stop], work, squared)
    distances = squared.sqrt().to(torch.float32)
    tau = config.clip_tau_ratio * float(distances.median())
    if tau <= 0:
        return center
    nobody_clipped_before = False
    for iteration in range(config.clip_iterations):
        scale = torch.clamp(tau / torch.clamp(distances, min=1e-30), max=1.0)
        nobody_clipped = bool((scale == 1.0).all())
        if nobody_clipped and nobody_clipped_before:
            break  # the center is the weighted mean and no pull is clipped: a fixed point
        nobody_clipped_before = nobody_clipped
        pulls = shares * scale
        keep = 1.0 - float(pulls.sum())
        last = iteration == config.clip_iterations - 1
        squared.zero_()
        for start, stop, rows, work in blocks:
            # center + sum_i pull_i (row_i - center), as center (1 - sum_i pull_i) + rows^T pulls:
            # one matrix-vector product instead of a subtraction, a scaling and a sum over rows
            block_center = center[start:stop]
            block_center.mul_(keep).add_(torch.mv(rows.T, pulls))
            if not last:
                _add_squared_distances(rows, block_center, work, squared)
        distances = squared.sqrt().to(torch.float32)
    return center


def _lower_median(rows: torch.Tensor) -> torch.Tensor:
    """``rows.median(dim=0).values``: per column, the ((members - 1) // 2)-th smallest value."""
    count = rows.shape[0]
    if count > MEDIAN_NETWORK_MAX_MEMBERS:
        return rows.median(dim=0).values
    sorted_rows = list(rows.unbind(0))
    for sweep in range(count):  # odd-even transposition sort: ``count`` sweeps sort ``count`` rows
        for i in range(sweep % 2, count - 1, 2):
            sorted_rows[i], sorted_rows[i + 1] = (
                torch.minimum(sorted_rows[i], sorted_rows[i + 1]),
                torch.maximum(sorted_rows[i], sorted_rows[i + 1]),
            )
    return sorted_rows[(count - 1) // 2]
