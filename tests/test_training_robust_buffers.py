"""The reducers' buffered CenteredClip gives the reference's bits (swarm.training.robust)."""

import pytest
import torch

from swarm.training.robust import RobustConfig, aggregate
from swarm.training.robust_buffers import aggregate_buffered

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("members", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("numel", [1, 100, 70_000])
def test_buffered_centered_clip_equals_the_reference_bit_for_bit(members, numel):
    generator = torch.Generator().manual_seed(members * 1000 + numel)
    contributions = {
        i: (float(i + 1), torch.randn(numel, generator=generator) * (1 + 3 * i)) for i in range(members)
    }
    if members >= 4:
        contributions[1] = (1.0, torch.full((numel,), float("nan")))  # rejected
        contributions[2] = (0.0, contributions[2][1])  # counts for nothing
    if members >= 5:
        contributions[3] = (1e6, contributions[3][1] * 1000)  # weight capped, norm clipped
    reference = aggregate(contributions, RobustConfig())
    buffered = aggregate_buffered(contributions, RobustConfig())
    assert torch.equal(buffered.values, reference.values)
    assert (buffered.contributors, buffered.rejected, buffered.clipped) == (
        reference.contributors,
        reference.rejected,
        reference.clipped,
    )


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
