"""The reducers' cache-blocked CenteredClip: the reference's result within a documented
tolerance (swarm.training.robust), and the same bits on every member that runs it."""

import pytest
import torch

from kernels import quantize_cpu
from swarm.training import robust_buffers
from swarm.training.robust import RobustConfig, aggregate
from swarm.training.robust_buffers import BLOCK_COLUMNS, REFERENCE_TOLERANCE, aggregate_buffered

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True, params=["native", "torch"])
def first_pass(request, monkeypatch):
    """Every test runs with the C library's first pass and with the torch one (what a member
    without a C compiler runs)."""
    if request.param == "torch":
        monkeypatch.setattr(quantize_cpu, "load_library", lambda: None)
    elif quantize_cpu.load_library() is None:
        pytest.skip("no C compiler: the C first pass cannot be built here")
    return request.param


def _assert_within_tolerance(values: torch.Tensor, reference: torch.Tensor) -> None:
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    torch.testing.assert_close(values, reference, rtol=0, atol=REFERENCE_TOLERANCE * scale + 1e-30)


def _contributions(members: int, numel: int) -> dict[int, tuple[float, torch.Tensor]]:
    generator = torch.Generator().manual_seed(members * 1000 + numel)
    contributions = {
        i: (float(i + 1), torch.randn(numel, generator=generator) * (1 + 3 * i)) for i in range(members)
    }
    if members >= 4:
        contributions[1] = (1.0, torch.full((numel,), float("nan")))  # rejected
        contributions[2] = (0.0, contributions[2][1])  # counts for nothing
    if members >= 5:
        contributions[3] = (1e6, contributions[3][1] * 1000)  # weight capped, norm clipped
    return contributions


@pytest.mark.parametrize("members", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("numel", [1, 100, 2 * BLOCK_COLUMNS + 123])
def test_blocked_centered_clip_is_the_reference_within_tolerance(members, numel):
    contributions = _contributions(members, numel)
    reference = aggregate(contributions, RobustConfig())
    buffered = aggregate_buffered(contributions, RobustConfig())
    _assert_within_tolerance(buffered.values, reference.values)
    assert (buffered.contributors, buffered.rejected, buffered.clipped) == (
        reference.contributors,
        reference.rejected,
        reference.clipped,
    )


def test_an_outlier_that_centered_clip_clips_lands_where_the_reference_does():
    # Five honest members close together, one far off with a plausible norm: CenteredClip's
    # iterations clip its pull, so every iteration runs (no early fixed point).
    generator = torch.Generator().manual_seed(5)
    numel = 3 * BLOCK_COLUMNS
    base = torch.randn(numel, generator=generator)
    contributions = {i: (1.0, base + 0.05 * torch.randn(numel, generator=generator)) for i in range(5)}
    contributions[5] = (1.0, torch.randn(numel, generator=generator))
    reference = aggregate(contributions, RobustConfig())
    buffered = aggregate_buffered(contributions, RobustConfig())
    _assert_within_tolerance(buffered.values, reference.values)
    assert float((buffered.values - base).abs().mean()) < 0.1  # the outlier did not drag it away
    mean = torch.stack([v for _, v in contributions.values()]).mean(0)
    assert float((mean - base).abs().mean()) > 0.1  # where a plain mean would have gone


@pytest.mark.parametrize("members", [3, 4, 6])
def test_every_member_computes_the_same_bits_however_its_contributions_are_stored(members):
    # The reducer holds chunked contributions as rows of one buffer and its own share as a
    # separate tensor; its backup may hold them otherwise. The bits must not depend on it.
    contributions = _contributions(members, 2 * BLOCK_COLUMNS + 77)
    stacked = torch.stack([values for _, values in contributions.values()])
    as_rows = {member: (weight, stacked[i]) for i, (member, (weight, _)) in enumerate(contributions.items())}
    copied = {member: (weight, values.clone()) for member, (weight, values) in contributions.items()}
    first = aggregate_buffered(as_rows, RobustConfig()).values
    assert torch.equal(first, aggregate_buffered(copied, RobustConfig()).values)
    assert torch.equal(first, aggregate_buffered(as_rows, RobustConfig()).values)


def test_finite_values_whose_sum_overflows_are_not_rejected():
    huge = torch.full((8,), 3e38)
    contributions = {0: (1.0, huge), 1: (1.0, huge.clone()), 2: (1.0, torch.ones(8))}
    assert (
        aggregate_buffered(contributions, RobustConfig()).rejected
        == aggregate(contributions, RobustConfig()).rejected
        == []
    )


@pytest.mark.parametrize("rule", ["trimmed_mean", "mean"])
def test_other_rules_are_the_reference(rule):
    generator = torch.Generator().manual_seed(7)
    contributions = {i: (1.0, torch.randn(500, generator=generator)) for i in range(4)}
    config = RobustConfig(rule=rule)
    assert torch.equal(
        aggregate_buffered(contributions, config).values, aggregate(contributions, config).values
    )


@pytest.mark.parametrize("count", range(1, 11))
def test_the_median_network_gives_torch_medians_bits_for_every_group_size(count):
    """Ties, signed zeros and repeated rows included: min/max only, so the very same values."""
    from swarm.training.robust_buffers import _lower_median

    generator = torch.Generator().manual_seed(count)
    rows = torch.randn(count, 4096, generator=generator)
    rows[:, :512] = torch.randint(-2, 3, (count, 512), generator=generator).float()  # many ties
    if count > 1:
        rows[1, 600:700] = rows[0, 600:700]  # a repeated row segment
    assert torch.equal(_lower_median(rows), rows.median(dim=0).values)
    for permutation in (torch.randperm(count, generator=generator) for _ in range(3)):
        assert torch.equal(_lower_median(rows[permutation]), rows.median(dim=0).values)


def test_the_c_first_pass_runs_where_it_can_and_agrees_with_the_torch_one(first_pass, monkeypatch):
    """With the library the first pass is C's (it cannot fall back unnoticed); its mean and
    Gram matrix are the torch pass's up to float32 summation order."""
    generator = torch.Generator().manual_seed(11)
    sources = [torch.randn(3 * BLOCK_COLUMNS + 5, generator=generator) * (1 + i) for i in range(4)]
    shares = torch.full((4,), 0.25)
    mean = torch.empty_like(sources[0])
    gram = robust_buffers._first_pass_native(sources, [None, 0.5, None, 2.0], shares, mean)
    if first_pass == "torch":
        assert gram is None
        return
    clipped = [sources[0], sources[1] * 0.5, sources[2], sources[3] * 2.0]
    rows = torch.stack(clipped)
    torch.testing.assert_close(mean, rows.T @ shares, rtol=1e-6, atol=1e-6)
    offsets = rows - rows.median(dim=0).values
    torch.testing.assert_close(gram, (offsets.double() @ offsets.double().T), rtol=1e-5, atol=1e-3)
