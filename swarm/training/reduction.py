"""One all-reduce part's bookkeeping on the member that reduces, verifies or arbitrates it.

A :class:`PartState` collects the contributions to one part, waits for them with a
deadline, and reduces them robustly (:func:`~swarm.training.robust.aggregate`) through
the wire codec. :func:`result_digest` and :func:`results_agree` are how a backup
compares a reducer's result with its own recomputation, and how members check that
the result they received is the one the backup endorsed.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import torch

from swarm.training.robust import Aggregate, RobustConfig, aggregate

RoundTrip = Callable[[torch.Tensor], torch.Tensor]
"""Quantize-dequantize with the wire codec: the values as receivers will decode them."""

AGREEMENT_TOLERANCE = 1e-3
"""Two computations of a part agree when no value differs by more than this fraction of
the part's largest value: the same code on the same kind of CPU gives the same bits,
and a different CPU (FMA or not) at most flips a quantization code here and there."""


def result_digest(values: torch.Tensor) -> str:
    """SHA-256 of a part's result as float32 bytes (what a backup endorses)."""
    return hashlib.sha256(values.detach().to(torch.float32).contiguous().numpy()).hexdigest()


def results_agree(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether two results of the same part are the same up to :data:`AGREEMENT_TOLERANCE`."""
    if first.numel() != second.numel():
        return False
    if first.numel() == 0:
        return True
    if not (bool(torch.isfinite(first).all()) and bool(torch.isfinite(second).all())):
        return False
    scale = float(second.abs().max())
    return float((first - second).abs().max()) <= AGREEMENT_TOLERANCE * scale + 1e-12


class PartState:
    """One part's contributions and, once reduced, its result."""

    def __init__(self) -> None:
        self.contributions: dict[int, tuple[float, torch.Tensor]] = {}
        self.changed = asyncio.Event()
        self.result: torch.Tensor | None = None
        self.contributors: list[int] = []
        self.aggregate: Aggregate | None = None
        """What the robust rule did (set where this member reduced the part)."""
        self.candidate: tuple[torch.Tensor, list[int]] | None = None
        """A reducer's result not yet endorsed by the part's backup."""
        self.taken_over = False
        self.ready = asyncio.Event()
        """Set once ``result`` is final."""
        self.settled = asyncio.Event()
        """Set once ``result`` is final or the part is disputed: nothing more to wait for."""

    def add(self, sender: int, weight: float, values: torch.Tensor) -> None:
        if self.ready.is_set():
            return  # reduced already: a late contribution changes nothing
        self.contributions.setdefault(sender, (weight, values))
        self.changed.set()

    async def wait_for(self, expected: set[int], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while not expected <= self.contributions.keys():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                return

    def compute(self, round_trip: RoundTrip, robust: RobustConfig) -> Aggregate:
        """The robust aggregate of the contributions so far, its values through the codec."""
        result = aggregate(self.contributions, robust)
        result.values = round_trip(result.values)
        return result

    def reduce(self, round_trip: RoundTrip, robust: RobustConfig) -> None:
        """Make the robust aggregate of the contributions this part's final result."""
        self.aggregate = self.compute(round_trip, robust)
        self.finish(self.aggregate.values, self.aggregate.contributors)

    def finish(self, values: torch.Tensor, contributors: list[int]) -> None:
        self.result, self.contributors = values, list(contributors)
        self.ready.set()
        self.settled.set()
