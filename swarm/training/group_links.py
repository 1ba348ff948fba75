"""What one all-reduce round knows of its group, and how it reaches it.

:class:`Member` and :class:`AllReduceTimeouts` describe the group and the deadlines;
:class:`GroupLinks` is the round's network seam (the averaging service implements it
over the transport, the protocol tests with an in-process router);
:class:`AllReduceReport` is what a round tells the trainer afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

CommitReply = Literal["accepted", "taken_over", "disputed"]
"""A backup's answer to a reducer's commit: kept, refused (it took the part over), or
refused (its own recomputation disagrees: the part goes to its arbiter)."""


@dataclass(frozen=True)
class AllReduceTimeouts:
    """Deadlines of one all-reduce round, in seconds."""

    scatter: float = 30.0
    """Reducers wait this long for contributions, counted from the round's start."""
    gather: float = 30.0
    """Members wait this long after the scatter deadline for every part's result."""
    repair: float = 30.0
    """A backup (or arbiter) that takes a part over waits this long for the survivors' contributions."""
    call: float = 10.0
    """Bound on one request to one member."""


@dataclass(frozen=True)
class Member:
    """One member of a group, as every member sees it.

    Attributes:
        peer_id: its identity; groups are sorted by it.
        bandwidth: declared bytes/s; sets the size of the part it reduces.
        address: its transport endpoint.
        public_key: the z85 CURVE key its endpoint must present (and its requests carry).
    """

    peer_id: str
    bandwidth: float = 1.0
    address: str = ""
    public_key: bytes = b""


@dataclass
class AllReduceReport:
    """What one member's round did, by part and by member position.

    ``rejected``/``clipped``: members whose contribution to a part this member reduced
    was dropped (not finite, invalid weight) or clipped (weight or norm over the bound).
    ``disputed``: parts whose backup disagreed with the reducer. ``accused``: members
    this member has evidence lied as a reducer or backup (their result disagreed with
    the recomputation that was used).
    """

    contributors: dict[int, list[int]] = field(default_factory=dict)
    repaired_parts: list[int] = field(default_factory=list)
    rejected: dict[int, list[int]] = field(default_factory=dict)
    clipped: dict[int, list[int]] = field(default_factory=dict)
    disputed: list[int] = field(default_factory=list)
    accused: set[int] = field(default_factory=set)


class GroupLinks(Protocol):
    """How one member's round reaches the others in its group: the round's network seam.

    One instance per member and round (it knows both). ``target`` is a position in the
    group; every call is bounded by ``timeout`` seconds and raises SwarmError or OSError
    when ``target`` cannot be reached or refuses. Implemented over the transport by
    :class:`~swarm.training.averaging.AveragingService`, in process by the protocol tests.
    """

    async def send_contribution(
        self, target: int, part: int, weight: float, values: torch.Tensor, timeout: float
    ) -> None:
        """Scatter: this member's share of ``part`` to ``target``, the part's reducer or backup."""

    async def send_result(
        self, target: int, part: int, contributors: list[int], values: torch.Tensor, timeout: float
    ) -> CommitReply:
        """Gather: the reduced ``part`` to ``target``; the part's backup may refuse it."""

    async def send_verdict(self, target: int, part: int, digest: str, timeout: float) -> None:
        """Verification: the backup endorses the result of ``part`` with this digest ("": disputed)."""

    async def request_repair(
        self, target: int, part: int, weight: float, values: torch.Tensor, timeout: float, arbitrate: bool
    ) -> tuple[torch.Tensor | None, list[int]]:
        """Repair: ``part``'s (result, contributors) from ``target``, its backup (or, with
        ``arbitrate``, its arbiter), given this member's share. A result of None: disputed."""
