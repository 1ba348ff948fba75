"""Whether a running server should move to other blocks, and how often to ask.

A move costs minutes of downtime (the new weights load), so a server moves only when it
clearly helps: taking its throughput ``t`` away from its span ``S`` and adding it to the
best window ``C`` must raise the minimum coverage over the affected blocks (``S ∪ C``) by
at least ``min_gain * t`` *and* by at least ``min_relative_gain`` of the swarm's minimum
coverage (in a swarm of thousands one small server barely matters, and new joiners fill
small dips anyway: moving then only costs downtime). When the swarm's weakest block lies in ``C`` this is exactly
"the swarm's minimum coverage rises by a clear margin"; it also lets several servers
fill several separated holes one at a time. A server never leaves a block that only it
covers.

Each move raises the sorted coverage vector lexicographically by a finite step (the
affected minimum goes up by ``min_gain * t`` and no block ends below it), so moves cannot
cycle: no oscillation however many rounds run.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from swarm.selection import choose_span
from swarm.spans import Span
from transport.errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class RebalancePolicy:
    """When servers move.

    Attributes:
        min_gain: a move must raise the minimum coverage of the affected blocks by at least
            this fraction of the mover's own throughput (0 < min_gain <= 1).
        min_relative_gain: ... and by at least this fraction of the swarm's current minimum
            coverage (so a swarm with an uncovered block, minimum 0, always qualifies).
        mean_check_period: mean seconds between checks; each delay is drawn uniformly from
            ``[0.5, 1.5] x`` this, so servers do not check (and move) in lockstep.
    """

    min_gain: float = 0.5
    min_relative_gain: float = 0.05
    mean_check_period: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.min_gain <= 1:
            raise ConfigurationError(f"--rebalance-min-gain must be in (0, 1], got {self.min_gain}")
        if self.min_relative_gain < 0:
            raise ConfigurationError(
                f"--rebalance-min-relative-gain must be >= 0, got {self.min_relative_gain}"
            )
        if self.mean_check_period <= 0:
            raise ConfigurationError(f"--rebalance-period must be positive, got {self.mean_check_period}")


def draw_check_delay(policy: RebalancePolicy, rng: random.Random) -> float:
    """Seconds until the next rebalance check, uniform in ``[0.5, 1.5] x mean_check_period``."""
    return policy.mean_check_period * rng.uniform(0.5, 1.5)


def plan_move(
    coverage: np.ndarray, current: Span, throughput: float, max_blocks: int, policy: RebalancePolicy
) -> Span | None:
    """Decides whether this server should move, and where.

    Args:
        coverage: ``(n_blocks,)`` coverage of the swarm *including* this server.
        current: the span this server holds.
        throughput: this server's throughput (its contribution to each block of ``current``).
        max_blocks: how many blocks fit in its memory.
        policy: the move threshold.

    Returns:
        The span to move to, or None to stay.
    """
    if throughput <= 0:
        return None
    without = np.array(coverage, dtype=np.float64)
    without[current.start : current.end] -= throughput
    # Float sums drift; anything below a millionth of our own throughput is "nobody else".
    epsilon = 1e-6 * throughput
    if np.any(without[current.start : current.end] <= epsilon):
        return None  # we alone cover some block: leaving would open a gap
    candidate = choose_span(without, max_blocks)
    if candidate == current:
        return None
    after = without.copy()
    after[candidate.start : candidate.end] += throughput
    affected = np.zeros(len(without), dtype=bool)
    affected[current.start : current.end] = True
    affected[candidate.start : candidate.end] = True
    coverage = np.asarray(coverage, dtype=np.float64)
    gain = float(np.min(after[affected])) - float(np.min(coverage[affected]))
    swarm_min = float(np.min(coverage))
    if gain > 0 and gain >= policy.min_gain * throughput and gain >= policy.min_relative_gain * swarm_min:
        return candidate
    return None
