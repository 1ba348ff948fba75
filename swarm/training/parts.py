"""How a butterfly all-reduce cuts a vector among its members.

Member ``j`` reduces part ``j``. Part sizes follow the members' declared bandwidth
(0 for a member behind NAT reached through a relay: it reduces nothing, unless every
member declares 0, and then the parts are equal),
so a fast link carries more (hivemind solves a linear program for this; with one
part per member the proportional split is the optimum of the same program when every
member sends and receives the whole vector once). Part boundaries fall on multiples
of ``alignment`` so quantization blocks never straddle two parts.
"""

from __future__ import annotations

from collections.abc import Sequence


def split_parts(numel: int, bandwidths: list[float], alignment: int = 64) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges covering ``range(numel)``, one per member.

    Args:
        numel: length of the vector.
        bandwidths: one number >= 0 per member, in member order (0: no reducer share).
        alignment: boundaries are multiples of this (except the final ``numel``).
    Returns:
        ``len(bandwidths)`` ranges; a member may get an empty range when the vector is small.
    Raises:
        ValueError: no members, or a bandwidth that is negative or not a number.
    """
    if not bandwidths:
        raise ValueError("an all-reduce needs at least one member")
    if not all(b >= 0 for b in bandwidths):  # also rejects NaN
        raise ValueError(f"bandwidths must be >= 0, got {bandwidths}")
    if not any(bandwidths):  # only relayed members: someone must reduce, so everyone does
        bandwidths = [1.0] * len(bandwidths)
    total = sum(bandwidths)
    units = -(-numel // alignment)  # ceil: aligned units to distribute
    boundaries, cumulative = [0], 0.0
    for bandwidth in bandwidths[:-1]:
        cumulative += bandwidth
        boundaries.append(min(numel, round(units * cumulative / total) * alignment))
    boundaries.append(numel)
    return [(boundaries[i], boundaries[i + 1]) for i in range(len(bandwidths))]


def fallback_reducer(part_index: int, bandwidths: Sequence[float]) -> int:
    """The member that backs up part ``part_index`` (verifies it, takes it over when its reducer
    fails): the next one in ring order that reduces (see :func:`_helpers`)."""
    return _helpers(part_index, bandwidths)[0]


def arbiter_of(part_index: int, bandwidths: Sequence[float]) -> int:
    """The member that decides a part its reducer and backup disagree on: the one after the backup."""
    return _helpers(part_index, bandwidths)[1]


def _helpers(part_index: int, bandwidths: Sequence[float]) -> list[int]:
    """The other members in ring order from ``part_index``, those that reduce (bandwidth > 0) first.

    A member reached only through relays declares 0: as a backup it would take a copy of
    every contribution to the part through the relay, and the part's commit would wait on
    it. It backs up or arbitrates a part only when too few other members reduce. With fewer
    than three members the part's own reducer fills the missing places (no verification then).
    """
    count = len(bandwidths)
    ring = [(part_index + step) % count for step in range(1, count)]
    return sorted(ring, key=lambda member: not bandwidths[member] > 0) + [part_index] * 2
