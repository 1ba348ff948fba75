"""One all-reduce part's bookkeeping on the member that reduces, verifies or arbitrates it.

A :class:`PartState` collects the contributions to one part, waits for them with a
deadline, and reduces them robustly (:func:`~swarm.training.robust.aggregate`, computed
by :func:`~swarm.training.robust_buffers.aggregate_buffered`: cache-blocked, the same bits on
every member, within a stated tolerance of the reference) through
the wire codec. Contributions may arrive in chunks (the wire sends a part as a stream of
messages of about a megabyte, see ``swarm.training.averaging``): each chunk is copied
into its place in one buffer per part and round, taken from a :class:`BufferPool` that
hands a finished round's buffers to the next, and a
:class:`ChunkAssembly` per sender says when its contribution is complete. :func:`result_digest` and :func:`results_agree` are how a backup
compares a reducer's result with its own recomputation, and how members check that
the result they received is the one the backup endorsed.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections.abc import Callable

import torch

from swarm.training.diloco import hash_parameters
from swarm.training.robust import Aggregate, RobustConfig, all_finite
from swarm.training.robust_buffers import aggregate_buffered
from transport import EncodedTensor

RoundTrip = Callable[..., torch.Tensor]
"""``round_trip(values, out=None)``: quantize-dequantize with the wire codec, the values as
receivers will decode them; written into ``out`` (float32, ``values``' size, may be
``values`` itself) when given, so a round's results land in pooled buffers."""

AGREEMENT_TOLERANCE = 1e-3
"""Two computations of a part agree when no value differs by more than this fraction of
the part's largest value: the same code on the same kind of CPU gives the same bits,
and a different CPU (FMA or not) at most flips a quantization code here and there."""


def result_digest(values: torch.Tensor) -> str:
    """The digest of a part's result as float32 bytes (what a backup endorses): BLAKE3, as
    :func:`~swarm.training.diloco.hash_parameters`."""
    return hash_parameters(values)


def results_agree(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether two results of the same part are the same up to :data:`AGREEMENT_TOLERANCE`."""
    if first.numel() != second.numel():
        return False
    if first.numel() == 0:
        return True
    if torch.equal(first, second):  # the usual case (same code, same CPU): one pass, not four
        return all_finite(first)
    if not (all_finite(first) and all_finite(second)):
        return False
    scale = float(second.abs().max())
    return float((first - second).abs().max()) <= AGREEMENT_TOLERANCE * scale + 1e-12


def as_encoded(values: torch.Tensor | EncodedTensor) -> EncodedTensor:
    """Chunks arrive as the wire left them (``EncodedTensor``); a tensor at hand is taken as one."""
    return values if isinstance(values, EncodedTensor) else EncodedTensor.of(values.reshape(-1))


class BufferPool:
    """Float32 work buffers handed from one round to the next.

    A round needs three buffers about the vector's size (its reducers' results, the
    contributions to the part it reduces, the copies of the part it backs up) and
    two of a part's size (its own aggregate and the backup's recomputation). Fresh
    ones cost the kernel zeroing every page at first touch, which on the 2-core
    development VM was ~70 ms per 100 MB, per buffer and round: about as much as
    CenteredClip itself. A finished round gives its buffers back, and the next round
    of the same sizes takes them, so the pages stay mapped. The price is memory: the
    pool holds up to ``keep`` buffers between rounds (the round's peak, kept).
    """

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._free: list[torch.Tensor] = []

    def take(self, *shape: int) -> torch.Tensor:
        """A float32 tensor of ``shape`` (contents undefined), reused when one of its size is free."""
        numel = math.prod(shape)
        for index, tensor in enumerate(self._free):
            if tensor.numel() == numel:
                return self._free.pop(index).view(shape)
        return torch.empty(shape, dtype=torch.float32)

    def give(self, tensor: torch.Tensor | None) -> None:
        """Return a buffer nothing reads any more (the oldest is dropped beyond ``keep``)."""
        if tensor is not None and self.keep > 0:
            self._free.append(tensor)
            del self._free[: -self.keep]


class ChunkAssembly:
    """Which ranges of a flat tensor of ``numel`` values have arrived.

    A chunk that overlaps one already received, or reaches outside the tensor, is
    refused: a sender cannot overwrite values it sent, nor complete a tensor with gaps.
    Chunks may arrive in any order.
    """

    def __init__(self, numel: int, weight: float = 0.0):
        self.numel = numel
        self.weight = weight
        """The sample weight every chunk of a contribution must repeat."""
        self.received = 0
        self._starts: list[int] = []  # sorted; _ends[i] belongs to _starts[i]
        self._ends: list[int] = []

    def claim(self, offset: int, length: int) -> bool:
        """Record the chunk ``[offset, offset + length)``; returns whether the tensor is complete.

        Raises:
            ValueError: the chunk is empty, outside the tensor, or overlaps a received one.
        """
        end = offset + length
        if offset < 0 or length <= 0 or end > self.numel:
            raise ValueError(f"chunk [{offset}, {end}) is outside a tensor of {self.numel} values")
        index = bisect.bisect_right(self._starts, offset)
        if (index > 0 and self._ends[index - 1] > offset) or (
            index < len(self._starts) and self._starts[index] < end
        ):
            raise ValueError(f"chunk [{offset}, {end}) overlaps one already received")
        self._starts.insert(index, offset)
        self._ends.insert(index, end)
        self.received += length
        return self.received == self.numel


class ResultChunks:
    """Reducers' results arriving in chunks, each copied into its place in one buffer of
    the whole vector's size (allocated at the first chunk, once per round)."""

    def __init__(self, parts: list[tuple[int, int]], pool: BufferPool | None = None):
        self.parts = parts
        self.pool = pool or BufferPool(keep=0)
        self.buffer: torch.Tensor | None = None
        self._incoming: dict[int, tuple[ChunkAssembly, list[int]]] = {}

    def add(
        self, part: int, offset: int, values: torch.Tensor | EncodedTensor, contributors: list[int]
    ) -> tuple[torch.Tensor | None, list[int]]:
        """A chunk of ``part``'s result: (the whole result, its contributors) once every
        chunk is here, (None, ...) before. Received chunks decode straight into the buffer.

        Raises:
            ValueError: the chunk overlaps or overruns the chunks received, or names other
                contributors than the part's first chunk.
        """
        values = as_encoded(values)
        start, end = self.parts[part]
        if part not in self._incoming and offset == 0 and values.numel() == end - start:
            return values.decode().view(-1), contributors  # the whole result in one message
        assembly, expected = self._incoming.setdefault(part, (ChunkAssembly(end - start), contributors))
        if contributors != expected:
            raise ValueError(f"chunks of the result for part {part} name different contributors")
        complete = assembly.claim(offset, values.numel())
        if self.buffer is None:
            self.buffer = self.pool.take(self.parts[-1][1])
        values.decode(out=self.buffer[start + offset : start + offset + values.numel()])
        return (self.buffer[start:end], contributors) if complete else (None, contributors)


class PartState:
    """One part's contributions and, once reduced, its result."""

    def __init__(self, pool: BufferPool | None = None) -> None:
        self.pool = pool or BufferPool(keep=0)
        self.contributions: dict[int, tuple[float, torch.Tensor]] = {}
        self.buffer: torch.Tensor | None = None
        """(members, part values) float32: chunked contributions land in their sender's row.
        Allocated at the first chunk, once per round; a whole contribution in one message
        is kept as received instead (no copy)."""
        self._assemblies: dict[int, ChunkAssembly] = {}
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
        self._digest: tuple[torch.Tensor, str] | None = None
        self._outputs: list[torch.Tensor] = []
        """Pooled buffers the aggregates of this part were written into (see :meth:`compute`)."""

    def digest(self, values: torch.Tensor) -> str:
        """:func:`result_digest` of ``values`` (this part's result or candidate), computed once:
        hashing a 25 MB part costs about what CenteredClip's pass over it does."""
        if self._digest is None or self._digest[0] is not values:
            self._digest = (values, result_digest(values))
        return self._digest[1]

    def add(self, sender: int, weight: float, values: torch.Tensor) -> None:
        if self.ready.is_set():
            return  # reduced already: a late contribution changes nothing
        self.contributions.setdefault(sender, (weight, values))
        self.changed.set()

    def add_chunk(
        self,
        sender: int,
        weight: float,
        offset: int,
        values: torch.Tensor | EncodedTensor,
        numel: int,
        members: int,
    ) -> None:
        """Values ``[offset, offset + len(values))`` of ``sender``'s contribution to a part of
        ``numel`` values, decoded straight into its row; it counts (:meth:`add`) once all its
        chunks are here.

        Raises:
            ValueError: the chunk overlaps one already received, lies outside the part, or
                repeats a different weight than the sender's first chunk.
        """
        if self.ready.is_set() or sender in self.contributions:
            return
        values = as_encoded(values)
        if sender not in self._assemblies and offset == 0 and values.numel() == numel:
            self.add(sender, weight, values.decode().view(-1))  # the whole contribution in one message
            return
        assembly = self._assemblies.setdefault(sender, ChunkAssembly(numel, weight))
        same_weight = assembly.weight == weight or (math.isnan(assembly.weight) and math.isnan(weight))
        if assembly.numel != numel or not same_weight:
            raise ValueError(f"member {sender} sent chunks of one part with different weights")
        complete = assembly.claim(offset, values.numel())
        if self.buffer is None:
            self.buffer = self.pool.take(members, numel)
        row = self.buffer[sender]
        values.decode(out=row[offset : offset + values.numel()])
        if complete:
            del self._assemblies[sender]
            self.add(sender, weight, row)

    def row(self, member: int, numel: int, members: int) -> torch.Tensor:
        """``member``'s row of the contributions buffer (allocated here if no chunk came yet):
        where this member writes its own share instead of a fresh tensor."""
        if self.buffer is None:
            self.buffer = self.pool.take(members, numel)
        return self.buffer[member]

    def release(self) -> None:
        """Drop the contributions and aggregates; give the buffers they live in back to the pool.
        (``result`` may be one of them: a caller that keeps it clones it first.)"""
        self.contributions.clear()
        self._assemblies.clear()
        self._digest = None
        self.pool.give(self.buffer)
        self.buffer = None
        for output in self._outputs:
            self.pool.give(output)
        self._outputs.clear()

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
        """The robust aggregate of the contributions so far, its values through the codec,
        in a buffer from the pool (given back by :meth:`release`)."""
        return _aggregate(self.contributions, round_trip, robust, self._output())

    def _output(self) -> torch.Tensor:
        """A pooled buffer of the part's size for an aggregate (taken on the event loop's thread)."""
        numel = next(iter(self.contributions.values()))[1].numel() if self.contributions else 0
        self._outputs.append(self.pool.take(numel))
        return self._outputs[-1]

    async def compute_in_thread(self, round_trip: RoundTrip, robust: RobustConfig) -> Aggregate:
        """:meth:`compute` in a worker thread, so the event loop keeps moving other parts'
        chunks meanwhile (torch releases the GIL). It reduces the contributions complete
        when it starts; chunks arriving meanwhile go to rows it does not read."""
        contributions, out = dict(self.contributions), self._output()
        return await asyncio.to_thread(_aggregate, contributions, round_trip, robust, out)

    def reduce(self, round_trip: RoundTrip, robust: RobustConfig) -> None:
        """Make the robust aggregate of the contributions this part's final result."""
        self.aggregate = self.compute(round_trip, robust)
        self.finish(self.aggregate.values, self.aggregate.contributors)

    def finish(self, values: torch.Tensor, contributors: list[int]) -> None:
        self.result, self.contributors = values, list(contributors)
        self.ready.set()
        self.settled.set()


def _aggregate(
    contributions: dict[int, tuple[float, torch.Tensor]], round_trip: RoundTrip, robust: RobustConfig, out
) -> Aggregate:
    """The robust aggregate of ``contributions`` through the codec, computed and round-tripped in ``out``."""
    result = aggregate_buffered(contributions, robust, out=out)
    result.values = round_trip(result.values, out=out)
    return result
