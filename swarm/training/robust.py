"""Byzantine-robust aggregation of one all-reduce part: validate, clip, then a robust rule.

A reducer receives one slice of every member's pseudo-gradient, each with a sample
weight. Averaging them as sent lets one member decide the result: a NaN makes every
model NaN, a weight of 1e9 or a x1000 pseudo-gradient outweighs everyone else. Before
anything is averaged, :func:`aggregate` therefore

1. **rejects** a contribution that is not finite (NaN or infinity anywhere) or has a
   negative or non-finite weight: it counts as absent;
2. **caps each weight** at ``max_weight_ratio`` times the lower median weight of the
   round's contributions (the smaller middle value: with two members, the smaller
   bounds the larger), and at the member's own cap when the caller knows one;
3. **clips each norm** to ``max_norm_ratio`` times the lower median norm (clip rather
   than drop: an honest member with a large step still counts, just not more than a bound);
4. combines what is left with the configured rule:

   - ``centered_clip`` (Gorbunov et al. 2022, "Secure Distributed Training at Scale",
     BTARD, arXiv:2106.11257): start at the coordinate-wise median and move towards
     every contribution, each pull clipped to ``tau`` (a multiple of the median distance);
     with honest, similar inputs nothing is clipped and it is the weighted mean;
   - ``trimmed_mean``: coordinate-wise, drop the highest and lowest values (a quarter
     of the contributions on each side, at least one when there are three or more) and
     take the weighted mean of the rest;
   - ``mean``: the plain weighted mean, with no validation or clipping either (no
     defence; for comparison).

Every step is a fixed sequence of float32 CPU ops in member order, so a backup that
recomputes the same part from the same inputs gets the same bits. The result says
which members were rejected or clipped, for the trainer's record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

RULES = ("centered_clip", "trimmed_mean", "mean")
"""Aggregation rules (``--aggregation``)."""

NOTABLE_CLIP = 2.0
"""A norm clip is reported (``Aggregate.clipped``) when it scaled a contribution down by
more than this: at ``max_norm_ratio`` 1 the larger honest contributions are always
trimmed a little, and naming them every round would hide the member that matters."""


@dataclass(frozen=True)
class RobustConfig:
    """How a reducer aggregates its part."""

    rule: str = "centered_clip"
    """One of :data:`RULES`."""
    max_weight_ratio: float = 4.0
    """A sample weight counts at most this many times the round's median weight."""
    max_norm_ratio: float = 1.0
    """A contribution's norm is clipped to this many times the round's lower median norm.
    1.0 measured best (benchmarks/robust.py): honest members' norms are close, so it
    rarely clips them, and an attacker's contribution then weighs no more than theirs."""
    clip_iterations: int = 5
    """CenteredClip iterations (BTARD uses a handful; it converges in 2-3 on honest inputs)."""
    clip_tau_ratio: float = 2.0
    """CenteredClip's radius ``tau``, in multiples of the median distance to the start point."""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"--aggregation must be one of {RULES}, got {self.rule!r}")
        if self.max_weight_ratio < 1 or self.max_norm_ratio < 1 or self.clip_tau_ratio <= 0:
            raise ValueError("--max-weight-ratio and --max-norm-ratio must be >= 1")
        if self.clip_iterations < 1:
            raise ValueError("clip_iterations must be >= 1")


@dataclass
class Aggregate:
    """A part's aggregate and what validation did to whom (member positions)."""

    values: torch.Tensor
    contributors: list[int]
    """Members whose contribution counted (finite, non-zero weight), in member order."""
    rejected: list[int] = field(default_factory=list)
    """Members whose contribution was dropped: not finite, or an invalid weight."""
    clipped: list[int] = field(default_factory=list)
    """Members whose weight was capped or whose norm was clipped by more than :data:`NOTABLE_CLIP`."""


def _lower_median(values: list[float]) -> float:
    """The smaller middle value: with two members the smaller one bounds the larger, so
    one of two cannot claim 1000x the other's norm or weight (it can only hold it back)."""
    return sorted(values)[(len(values) - 1) // 2]


@dataclass
class Screened:
    """A part's contributions after the checks every rule shares (see :func:`screen`)."""

    kept: dict[int, tuple[float, torch.Tensor]]  # finite, weight >= 0; values flat float32
    rejected: list[int]  # a non-finite or negative weight, or a non-finite value
    weight_bound: float  # max_weight_ratio x the lower median of the positive weights
    norms: dict[int, float]  # of the members kept with a positive weight
    norm_bound: float  # max_norm_ratio x the lower median of those norms


def screen(contributions: dict[int, tuple[float, torch.Tensor]], config: RobustConfig) -> Screened:
    """Rejects what cannot be averaged and computes the round's weight and norm bounds."""
    rejected: list[int] = []
    kept: dict[int, tuple[float, torch.Tensor]] = {}
    all_norms: dict[int, float] = {}
    for member in sorted(contributions):
        weight, values = contributions[member]
        values = values.reshape(-1).to(torch.float32)
        # one pass for both: a finite norm means finite values (NaN and infinity survive
        # the sum of squares); only a non-finite one needs a look at each value
        norm = float(torch.linalg.vector_norm(values))
        finite = math.isfinite(norm) or bool(torch.isfinite(values).all())
        if not math.isfinite(weight) or weight < 0 or not finite:
            rejected.append(member)
            continue
        kept[member], all_norms[member] = (weight, values), norm
    positive = [weight for weight, _ in kept.values() if weight > 0]
    weight_bound = config.max_weight_ratio * _lower_median(positive) if positive else 0.0
    norms = {m: all_norms[m] for m, (w, _) in kept.items() if w > 0}
    norm_bound = config.max_norm_ratio * _lower_median(list(norms.values())) if norms else 0.0
    return Screened(kept, rejected, weight_bound, norms, norm_bound)


def all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass in the usual case."""
    # NaN and infinity survive a sum, so a finite sum means every value is finite; a
    # non-finite sum may be an overflow of finite values: only then look at each value.
    return math.isfinite(float(values.sum())) or bool(torch.isfinite(values).all())


def aggregate(
    contributions: dict[int, tuple[float, torch.Tensor]],
    config: RobustConfig,
    weight_caps: dict[int, float] | None = None,
) -> Aggregate:
    """Validate, clip and combine one part's contributions.

    Args:
        contributions: ``{member: (sample weight, values)}``, all of one size.
        config: the rule and its bounds.
        weight_caps: optional ``{member: most samples it could have processed}``.

    Returns:
        The aggregate (zeros when nothing valid is left) and who was rejected or clipped.
    """
    order = sorted(contributions)
    numel = contributions[order[0]][1].numel() if order else 0
    if config.rule == "mean":  # no defence at all, for comparison: what DiLoCo does without this module
        plain = {m: (w, v.reshape(-1).to(torch.float32)) for m, (w, v) in contributions.items()}
        return Aggregate(_weighted_mean(plain, numel), [m for m in order if contributions[m][0] != 0])
    screened = screen(contributions, config)
    kept, rejected, clipped = screened.kept, screened.rejected, []
    norms, norm_bound = screened.norms, screened.norm_bound
    for member, (weight, values) in list(kept.items()):
        if weight <= 0:
            continue
        cap = min(screened.weight_bound, (weight_caps or {}).get(member, math.inf))
        was_clipped = False
        if weight > cap:
            weight, was_clipped = cap, True
        if norms[member] > norm_bound:
            values = values * (norm_bound / norms[member])
            was_clipped = was_clipped or norms[member] > NOTABLE_CLIP * norm_bound
        if was_clipped:
            clipped.append(member)
        kept[member] = (weight, values)
    live = {m: wv for m, wv in kept.items() if wv[0] > 0}
    if not live:
        return Aggregate(torch.zeros(numel, dtype=torch.float32), [], rejected, clipped)
    values = _trimmed_mean(live) if config.rule == "trimmed_mean" else _centered_clip(live, config)
    return Aggregate(values, sorted(live), rejected, clipped)


def _weighted_mean(contributions: dict[int, tuple[float, torch.Tensor]], numel: int) -> torch.Tensor:
    total = sum(weight for weight, _ in contributions.values())
    accumulator = torch.zeros(numel, dtype=torch.float32)
    if total > 0:
        for member in sorted(contributions):
            weight, values = contributions[member]
            if weight:
                accumulator.add_(values, alpha=weight / total)
    return accumulator


def _trimmed_mean(contributions: dict[int, tuple[float, torch.Tensor]]) -> torch.Tensor:
    members = sorted(contributions)
    stacked = torch.stack([contributions[m][1] for m in members])  # (members, numel)
    weights = torch.tensor([contributions[m][0] for m in members], dtype=torch.float32)
    count = len(members)
    trim = max(1, count // 4) if count >= 3 else 0
    ordered, index = torch.sort(stacked, dim=0, stable=True)
    kept_values = ordered[trim : count - trim]
    kept_weights = weights[index[trim : count - trim]]  # (kept, numel)
    return (kept_values * kept_weights).sum(dim=0) / kept_weights.sum(dim=0)


def _centered_clip(
    contributions: dict[int, tuple[float, torch.Tensor]], config: RobustConfig
) -> torch.Tensor:
    members = sorted(contributions)
    stacked = torch.stack([contributions[m][1] for m in members])  # (members, numel)
    weights = torch.tensor([contributions[m][0] for m in members], dtype=torch.float32)
    weights = weights / weights.sum()
    center = stacked.median(dim=0).values if len(members) > 2 else (weights[:, None] * stacked).sum(dim=0)
    distances = torch.linalg.vector_norm(stacked - center, dim=1)
    tau = config.clip_tau_ratio * float(distances.median())
    if tau <= 0:
        return center
    for _ in range(config.clip_iterations):
        offsets = stacked - center  # (members, numel)
        distances = torch.linalg.vector_norm(offsets, dim=1)
        scale = torch.clamp(tau / torch.clamp(distances, min=1e-30), max=1.0)
        center = center + ((weights * scale)[:, None] * offsets).sum(dim=0)
    return center
