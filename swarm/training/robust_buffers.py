"""The reducers' CenteredClip in one pass over the part (two while it clips someone).

:func:`swarm.training.robust.aggregate` is the reference: plain torch, a new
(members, values) tensor per step, five iterations of four passes each over the
part. On one 25 MB part of four members that was 8.6 s on the 2-core development VM;
a first buffered version (the same operations in reused buffers, the same bits) still
took 0.39 s, paid twice per round (reducer and backup). :func:`aggregate_buffered`
computes the same algorithm differently:

- it walks the part in column blocks of :data:`BLOCK_COLUMNS` that stay in the CPU's
  cache, gathering each block of the (norm-clipped) contributions into one small buffer
  instead of building a (members, values) copy of the whole part;
- one pass computes, per block, the weighted mean, the coordinate-wise median (the start
  point) and the Gram matrix of the members' offsets from it. Every center the
  iterations visit is the start point plus a combination of those offsets, and every
  distance they need is a quadratic form in the Gram matrix, so all iterations run on
  (members,)-sized numbers, not on the part (the reference makes four passes each);
- that pass runs in C where the CPU library builds (``kernels.quantize_cpu``: one loop
  per piece of columns, ~20 ms for a 25 MB part of four on the development VM where the
  torch pass of ~15 calls per block took ~50 ms), else in torch;
- when the last iteration clipped nobody (honest inputs), the center is the weighted
  mean (exactly, in real arithmetic), which that pass already computed: one pass in all. Otherwise a second
  pass forms the center from the median and the final coefficients.

It does not give the reference's bits: distances come from the Gram matrix (float32
products per block, summed in float64) where the reference sums each row in float32,
and the rounding-sized steps at the fixed point are skipped. Every member runs this
same code on the same inputs in the same order, so members still agree bit for bit,
which is all the protocol needs (a backup compares digests of this function's output,
never of the reference's; a backup without a C compiler runs the torch pass, whose bits
differ within the tolerance that ``reduction.results_agree`` allows). Against the reference it stays within
:data:`REFERENCE_TOLERANCE` (tests/test_training_robust_buffers.py).

The other rules go to the reference unchanged.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels import quantize_cpu
from swarm.training.robust import NOTABLE_CLIP, Aggregate, RobustConfig, aggregate, screen

MEDIAN_NETWORK_MAX_MEMBERS = 8
"""Above this many contributions the median is ``torch.median``: the network's
compare-exchanges grow with the square of the count."""

BLOCK_COLUMNS = 1 << 15
"""Columns per block: two (members, columns) float32 work buffers of four members take
1 MiB, which stays in a core's L2 cache (2 MiB on the development VM) between the steps
of one block."""

REFERENCE_TOLERANCE = 1e-5
"""Largest difference from :func:`swarm.training.robust.aggregate`, as a fraction of the
result's largest magnitude (measured: ~1e-7, with and without clipping)."""


def aggregate_buffered(
    contributions: dict[int, tuple[float, torch.Tensor]],
    config: RobustConfig,
    out: torch.Tensor | None = None,
) -> Aggregate:
    """:func:`~swarm.training.robust.aggregate` (no per-member weight caps), cache-blocked.

    The same validation, weight caps and norm clips (same contributors, rejected and
    clipped members); values within :data:`REFERENCE_TOLERANCE` of the reference, and
    the same bits on every call with the same inputs.

    Args:
        out: a float32 tensor of the part's size that CenteredClip's values are written
            into (the other rules, and a part with no live contribution, may return a
            new tensor instead): a reused buffer spares faulting in fresh pages.
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
    values = _centered_clip(sources, factors, weights, numel, config, out)
    return Aggregate(values, live, rejected, clipped)


class _Blocks:
    """The clipped contributions, one column block at a time, in two reused buffers (made at
    the first walk: with the C first pass and nobody clipped there is none)."""

    def __init__(self, sources: list[torch.Tensor], factors: list[float | None], numel: int):
        self.sources, self.factors, self.numel = sources, factors, numel
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def __iter__(self):
        """Yields (start, stop, rows, work): rows hold the clipped block, work is scratch."""
        if self._buffers is None:
            width = min(BLOCK_COLUMNS, max(self.numel, 1))
            rows = torch.empty((len(self.sources), width), dtype=torch.float32)  # (members, columns)
            self._buffers = (rows, torch.empty_like(rows))
        all_rows, all_work = self._buffers
        for start in range(0, self.numel, BLOCK_COLUMNS):
            stop = min(start + BLOCK_COLUMNS, self.numel)
            rows, work = all_rows[:, : stop - start], all_work[:, : stop - start]
            for row, source, factor in zip(rows, self.sources, self.factors, strict=True):
                if factor is None:
                    row.copy_(source[start:stop])
                else:  # the same float32 product as the reference's ``values * factor``
                    torch.mul(source[start:stop], factor, out=row)
            yield start, stop, rows, work


def _centered_clip(
    sources: list[torch.Tensor],
    factors: list[float | None],
    weights: list[float],
    numel: int,
    config: RobustConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """CenteredClip of the contributions ``sources[i] * factors[i]`` (None: unclipped), in ``out``."""
    count = len(sources)
    shares = torch.tensor(weights, dtype=torch.float32)
    shares = shares / shares.sum()
    blocks = _Blocks(sources, factors, numel)
    # the weighted mean; the result, when it is one
    mean = torch.empty(numel, dtype=torch.float32) if out is None else out.view(-1)
    gram = _first_pass_native(sources, factors, shares, mean)
    if gram is None:
        gram = torch.zeros((count, count), dtype=torch.float64)  # <row_i - start, row_j - start>
        for start, stop, rows, work in blocks:
            block_mean = torch.mv(rows.T, shares, out=mean[start:stop])
            torch.sub(rows, _lower_median(rows) if count > 2 else block_mean, out=work)
            gram.add_(torch.mm(work, work.T).to(torch.float64))
    pulls = _pull_coefficients(gram, shares, config)
    if pulls is None:
        return mean
    keep = 1.0 - float(pulls.sum())
    pulls = pulls.to(torch.float32)
    for start, stop, rows, _ in blocks:  # the center, start + sum_j pulls_j (row_j - start), in place
        block = mean[start:stop]
        if count > 2:
            block.copy_(_lower_median(rows))
        block.mul_(keep).add_(torch.mv(rows.T, pulls))
    return mean


def _first_pass_native(
    sources: list[torch.Tensor], factors: list[float | None], shares: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor | None:
    """The first pass (weighted mean into ``mean``, the Gram matrix of the offsets from the
    start point, returned) in the C library's ``swarm_clip_start``: one loop over each piece
    of columns, where the torch pass makes ~15 calls per block, each reading its operands
    again (~50 -> ~15 ms for a 25 MB part of four on the development VM). The same
    operations in the same order on every call, so members agree bit for bit; float32
    sums in another order than torch's, within :data:`REFERENCE_TOLERANCE` like it. None
    where the library is missing (no compiler) or the inputs do not fit it."""
    count = len(sources)
    fits = 1 <= count <= MEDIAN_NETWORK_MAX_MEMBERS and all(
        source.dtype == torch.float32 and source.is_contiguous() and source.device.type == "cpu"
        for source in sources
    )
    library = quantize_cpu.load_library() if fits and mean.is_contiguous() else None
    if library is None:
        return None
    pointers = (ctypes.c_void_p * count)(*(source.data_ptr() for source in sources))
    scales = torch.tensor([1.0 if factor is None else factor for factor in factors], dtype=torch.float32)
    comparators = _median_network(count) if count > 2 else ()  # the torch pass starts from the mean below 3
    median_wire = (count - 1) // 2 if comparators else -1
    network = torch.tensor([list(c) for c in comparators] or [[0, 0, 0, 0]], dtype=torch.int32)  # never empty
    shares = shares.contiguous()  # (kept alive through the call)
    gram = torch.zeros((count, count), dtype=torch.float64)
    library.swarm_clip_start(
        pointers, scales.data_ptr(), shares.data_ptr(), count, mean.numel(), network.data_ptr(),
        len(comparators), median_wire, mean.data_ptr(), gram.data_ptr(),
    )  # fmt: skip
    return gram


def _pull_coefficients(gram: torch.Tensor, shares: torch.Tensor, config: RobustConfig) -> torch.Tensor | None:
    """CenteredClip's iterations on the Gram matrix of the offsets from the start point.

    Every center the iterations visit is ``start + sum_j a_j (row_j - start)``, and every
    distance they need is a quadratic form of ``a`` in ``gram``, so the iterations run on
    (members,) vectors here, not on the part. Returns the final ``a``; None when the last
    iteration clipped nobody, which puts the center exactly on the weighted mean.
    """
    count = gram.shape[0]
    squared = gram.diagonal().clone()
    distances = squared.clamp(min=0).sqrt().to(torch.float32)
    tau = config.clip_tau_ratio * float(distances.median())
    coefficients = torch.zeros(count, dtype=torch.float64)
    if tau <= 0:
        return coefficients  # the start point itself
    nobody_clipped_before = at_mean = False
    for _ in range(config.clip_iterations):
        scale = torch.clamp(tau / torch.clamp(distances, min=1e-30), max=1.0)
        nobody_clipped = bool((scale == 1.0).all())
        if nobody_clipped and nobody_clipped_before:
            break  # on the weighted mean, and no pull clipped: a fixed point
        nobody_clipped_before = at_mean = nobody_clipped
        pulls = (shares * scale).to(torch.float64)
        # center + sum_i pulls_i (row_i - center) = start + sum_j (a_j (1 - sum pulls) + pulls_j) (row_j - start)
        coefficients = coefficients * (1.0 - float(pulls.sum())) + pulls
        # |row_i - center|^2 = G_ii - 2 (G a)_i + a^T G a
        squared = gram.diagonal() - 2 * (gram @ coefficients) + coefficients @ gram @ coefficients
        distances = squared.clamp(min=0).sqrt().to(torch.float32)
    return None if at_mean else coefficients


def _lower_median(rows: torch.Tensor) -> torch.Tensor:
    """``rows.median(dim=0).values``: per column, the ((members - 1) // 2)-th smallest value."""
    count = rows.shape[0]
    if count > MEDIAN_NETWORK_MAX_MEMBERS:
        return rows.median(dim=0).values
    wires = list(rows.unbind(0))
    for low, high, want_min, want_max in _median_network(count):
        first, second = wires[low], wires[high]
        if want_min:
            wires[low] = torch.minimum(first, second)
        if want_max:
            wires[high] = torch.maximum(first, second)
    return wires[(count - 1) // 2]


@functools.cache
def _median_network(count: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """The compare-exchanges the lower median of ``count`` rows depends on, in order:
    (low wire, high wire, whether its minimum is needed, whether its maximum is).

    Batcher's odd-even merge sort of the next power of two (comparators reaching past
    ``count`` do nothing: those wires hold +infinity), then only what the median's wire
    depends on, walking back from it: 7 minimum/maximum operations for 4 rows where the
    odd-even transposition sort took 12. Only min and max: exactly ``torch.median``'s bits.
    """
    size = 1 << max(count - 1, 0).bit_length()
    comparators = []
    merged = 1
    while merged < size:  # merge sorted runs of ``merged`` into runs of twice that
        step = merged
        while step >= 1:
            for start in range(step % merged, size - step, 2 * step):
                for i in range(min(step, size - start - step)):
                    low, high = start + i, start + i + step
                    if low // (2 * merged) == high // (2 * merged) and high < count:
                        comparators.append((low, high))
            step //= 2
        merged *= 2
    needed, network = {(count - 1) // 2}, []
    for low, high in reversed(comparators):
        want_min, want_max = low in needed, high in needed
        if want_min or want_max:
            network.append((low, high, want_min, want_max))
            needed |= {low, high}
    return tuple(reversed(network))
