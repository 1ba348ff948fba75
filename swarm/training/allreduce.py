"""Fault-tolerant butterfly all-reduce of one flat float32 vector.

Member ``j`` of a group (sorted by peer id) reduces part ``j`` of the vector
(:func:`~swarm.training.parts.split_parts`). A round has three phases, each with a
deadline:

1. **scatter**: every member sends its contribution to part ``j`` (quantized by the
   codec, with its sample weight) to reducer ``j``. A reducer waits for all members
   or the scatter deadline, then averages what arrived, weighted by samples, in
   float32, in member order.
2. **gather**: reducer ``j`` quantizes its result, first *commits* it to the part's
   backup (the next member in the ring) and only then sends it to everyone else.
3. **repair**: a member still missing part ``j`` at the gather deadline asks the
   backup, attaching its own contribution. The backup answers with the committed
   result if it holds one; otherwise it takes the part over (refusing any later
   commit from the original reducer), reduces the contributions the survivors send
   it, and answers them all.

Because a result is only ever broadcast after the backup holds it, and the backup
refuses a commit once it has taken over, every part has exactly one final value, and
every survivor receives the same bytes: survivors end bit-identical even when a
member dies mid-round. (A reducer and its backup dying in the same round can still
split the survivors; the trainer's parameter hash check catches and repairs that.)

A round reaches the other members only through :class:`GroupLinks` (send a
contribution, send a result, request a repair): the averaging service implements it
over the transport, the protocol tests with an in-process router that can kill a
member at an exact message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from swarm.training.parts import fallback_reducer, split_parts

logger = logging.getLogger(__name__)

_Reply = TypeVar("_Reply")


@dataclass(frozen=True)
class AllReduceTimeouts:
    """Deadlines of one all-reduce round, in seconds."""

    scatter: float = 30.0
    """Reducers wait this long for contributions, counted from the round's start."""
    gather: float = 30.0
    """Members wait this long after the scatter deadline for every part's result."""
    repair: float = 30.0
    """A backup that takes a part over waits this long for the survivors' contributions."""
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
    """What one member's round did: contributors per part and the parts it repaired as a backup."""

    contributors: dict[int, list[int]] = field(default_factory=dict)
    repaired_parts: list[int] = field(default_factory=list)


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
        """Scatter: this member's share of ``part`` to ``target``, the part's reducer."""

    async def send_result(
        self, target: int, part: int, contributors: list[int], values: torch.Tensor, timeout: float
    ) -> bool:
        """Gather: the reduced ``part`` to ``target``. False: ``target``, its backup, took it over."""

    async def request_repair(
        self, target: int, part: int, weight: float, values: torch.Tensor, timeout: float
    ) -> tuple[torch.Tensor, list[int]]:
        """Repair: ``part``'s (result, contributors) from ``target``, its backup, given this member's share."""


RoundTrip = Callable[[torch.Tensor], torch.Tensor]
"""Quantize-dequantize with the wire codec: the values as receivers will decode them."""


class _PartState:
    """One part's bookkeeping on the member that reduces it (as reducer or as backup)."""

    def __init__(self) -> None:
        self.contributions: dict[int, tuple[float, torch.Tensor]] = {}
        self.changed = asyncio.Event()
        self.result: torch.Tensor | None = None
        self.contributors: list[int] = []
        self.taken_over = False
        self.ready = asyncio.Event()

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

    def reduce(self, round_trip: RoundTrip) -> None:
        """Weighted mean of the contributions in member order, float32, then through the codec."""
        order = sorted(self.contributions)
        total = sum(self.contributions[i][0] for i in order)
        first = self.contributions[order[0]][1]
        accumulator = torch.zeros(first.shape, dtype=torch.float32)
        if total > 0:
            for sender in order:
                weight, values = self.contributions[sender]
                if weight:
                    accumulator.add_(values.to(torch.float32), alpha=weight / total)
        self.result = round_trip(accumulator)
        self.contributors = order
        self.ready.set()


class AllReduceRound:
    """One member's side of one round. Create it, register it with the service, then ``await run()``.

    Args:
        round_id: names the round on the wire (all members use the same id).
        members: the group, in the same order on every member.
        my_index: this member's position in ``members``.
        vector: this member's flat float32 contribution.
        weight: samples this member processed this round (0 for a newcomer's zero update).
        links: how this member reaches the others (see :class:`GroupLinks`).
        round_trip: the wire codec's quantize-dequantize, applied to every result.
        timeouts: phase deadlines.
        alignment: part boundaries are multiples of this (the codec's block size).
    """

    def __init__(
        self,
        round_id: str,
        members: list[Member],
        my_index: int,
        vector: torch.Tensor,
        weight: float,
        links: GroupLinks,
        round_trip: RoundTrip,
        timeouts: AllReduceTimeouts = AllReduceTimeouts(),
        alignment: int = 64,
    ):
        self.round_id = round_id
        self.members = members
        self.my_index = my_index
        self.vector: torch.Tensor | None = vector.detach().to(torch.float32).reshape(-1)
        self.weight = float(weight)
        self.links = links
        self.round_trip = round_trip
        self.timeouts = timeouts
        self.parts = split_parts(self.vector.numel(), [m.bandwidth for m in members], alignment)
        self._states: dict[int, _PartState] = {}
        self.report = AllReduceReport()
        self._started: float | None = None
        self._tasks: set[asyncio.Task] = set()  # take-overs this member runs as a backup; see close()

    def close(self) -> None:
        """Cancel take-over work still running (the service calls this when the round is dropped)."""
        for task in self._tasks:
            task.cancel()

    def release(self) -> None:
        """Drop the buffers a finished round no longer needs, keeping what late requests ask for.

        After :meth:`run` succeeded every part has its result, so a late repair request is
        answered from the result of a part this member backs up and nothing else is read:
        not the contributions, not the other parts' results, not this member's vector.
        The service keeps a finished round reachable for a while (for slower members'
        repairs); without this it would hold about twice the vector's size per round.
        """
        self.vector = None
        for part, state in self._states.items():
            state.contributions.clear()
            if fallback_reducer(part, len(self.members)) != self.my_index:
                state.result = None

    # -- incoming requests (called by the service) --------------------------------------

    def _state(self, part: int) -> _PartState:
        if not 0 <= part < len(self.members):
            raise ValueError(f"part {part} out of range for a group of {len(self.members)}")
        return self._states.setdefault(part, _PartState())

    def _check_contribution(self, sender: int, part: int, values: torch.Tensor | None) -> torch.Tensor:
        if not 0 <= sender < len(self.members):
            raise ValueError(f"sender index {sender} out of range")
        start, end = self.parts[part]
        if values is None or values.numel() != end - start:
            raise ValueError(f"part {part} needs {end - start} values")
        return values.reshape(-1)

    def on_contribution(self, sender: int, part: int, weight: float, values: torch.Tensor | None) -> None:
        """Scatter phase: another member's contribution to a part this member reduces."""
        if part != self.my_index:
            raise ValueError(f"member {self.my_index} does not reduce part {part}")
        self._state(part).add(sender, float(weight), self._check_contribution(sender, part, values))

    def on_result(self, part: int, values: torch.Tensor | None, contributors: list[int]) -> bool:
        """Gather phase: a reducer's result. Returns False when this member (as backup) took the part over."""
        state = self._state(part)
        if state.ready.is_set():
            return True
        if state.taken_over:
            return False
        start, end = self.parts[part]
        if values is None or values.numel() != end - start:
            raise ValueError(f"result for part {part} needs {end - start} values")
        state.result, state.contributors = values.reshape(-1), list(contributors)
        state.ready.set()
        return True

    async def on_repair(self, sender: int, part: int, weight: float, values: torch.Tensor | None):
        """Repair phase, on the backup: returns (result, contributors) once the part has one."""
        if fallback_reducer(part, len(self.members)) != self.my_index:
            raise ValueError(f"member {self.my_index} is not the backup of part {part}")
        state = self._state(part)
        if not state.ready.is_set() and not state.taken_over:
            state.taken_over = True
            logger.warning("round %s: taking over part %d from member %d", self.round_id, part, part)
            state.contributions.clear()  # only survivors' repair contributions count now
            state.add(self.my_index, self.weight, self._slice(part))
            self._tasks.add(asyncio.get_running_loop().create_task(self._reduce_taken_over(part)))
        if not state.ready.is_set():
            state.add(sender, float(weight), self._check_contribution(sender, part, values))
        await asyncio.wait_for(state.ready.wait(), self.timeouts.repair + self.timeouts.call)
        return state.result, state.contributors

    async def _reduce_taken_over(self, part: int) -> None:
        state = self._states[part]
        survivors = set(range(len(self.members))) - {part}
        await state.wait_for(survivors, asyncio.get_running_loop().time() + self.timeouts.repair)
        state.reduce(self.round_trip)
        self.report.repaired_parts.append(part)

    # -- this member's own work ------------------------------------------------------------

    def _slice(self, part: int) -> torch.Tensor:
        if self.vector is None:
            raise RuntimeError(f"round {self.round_id} is finished and released its vector")
        start, end = self.parts[part]
        return self.vector[start:end]

    async def run(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Run the round; returns the averaged vector (same bits on every survivor).

        Args:
            out: a contiguous float32 CPU tensor of the vector's size to write the average
                into, and return; it may be the vector itself (in place, as with
                ``torch.distributed.all_reduce``). Written only once every part has its
                result, when nothing reads the contribution any more. Reusing one buffer
                across rounds saves allocating (and the kernel zeroing) a fresh vector.

        Raises:
            ValueError: ``out`` has the wrong size, type or layout.
            DeadlineExceeded: some part has no result even after repair.
        """
        from transport.errors import DeadlineExceeded

        if out is not None and (
            out.dtype != torch.float32
            or out.device.type != "cpu"
            or not out.is_contiguous()
            or out.numel() != self.vector.numel()
        ):
            raise ValueError(
                f"out must be a contiguous float32 CPU tensor of {self.vector.numel()} values, got "
                f"{out.dtype} {tuple(out.shape)} on {out.device}"
            )
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        scatter_deadline = self._started + self.timeouts.scatter
        gather_deadline = scatter_deadline + self.timeouts.gather
        count = len(self.members)

        own = self._state(self.my_index)
        own.add(self.my_index, self.weight, self._slice(self.my_index))
        sends = [self._send_contribution(j) for j in range(count) if j != self.my_index]
        await asyncio.gather(self._reduce_own(scatter_deadline), *sends)

        missing = [j for j in range(count) if not await self._wait_ready(j, gather_deadline)]
        if missing:
            logger.warning(
                "round %s: no result for parts %s by the deadline; repairing", self.round_id, missing
            )
            await asyncio.gather(*(self._repair(j) for j in missing))
        unresolved = [j for j in range(count) if not self._state(j).ready.is_set()]
        if unresolved:
            raise DeadlineExceeded(f"all-reduce {self.round_id}: parts {unresolved} have no result")

        result = torch.empty_like(self.vector) if out is None else out.view(-1)
        for j, (start, end) in enumerate(self.parts):
            result[start:end] = self._states[j].result
            self.report.contributors[j] = self._states[j].contributors
        return result if out is None else out

    async def _wait_ready(self, part: int, deadline: float) -> bool:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(self._state(part).ready.wait(), max(remaining, 0.0))
        except TimeoutError:
            return False
        return True

    async def _send_contribution(self, part: int) -> None:
        send = self.links.send_contribution(part, part, self.weight, self._slice(part), self.timeouts.call)
        await self._quietly("contribution", part, send)

    async def _quietly(self, kind: str, target: int, sending: Awaitable[_Reply]) -> _Reply | None:
        """``await sending``; a member that cannot be reached is logged and yields None."""
        from transport.errors import SwarmError

        try:
            return await sending
        except (SwarmError, OSError) as error:
            logger.warning("round %s: %s to member %d failed: %s", self.round_id, kind, target, error)
            return None

    async def _reduce_own(self, scatter_deadline: float) -> None:
        state = self._states[self.my_index]
        await state.wait_for(set(range(len(self.members))), scatter_deadline)
        if state.taken_over:
            return
        state.reduce(self.round_trip)
        await self._broadcast(self.my_index, state)

    async def _broadcast(self, part: int, state: _PartState) -> None:
        backup = fallback_reducer(part, len(self.members))
        if backup != self.my_index:
            accepted = await self._quietly("result", backup, self._send_result(backup, part, state))
            if accepted is False:
                logger.warning(
                    "round %s: backup %d took over part %d; not broadcasting", self.round_id, backup, part
                )
                state.ready.clear()
                return
        others = [i for i in range(len(self.members)) if i not in (self.my_index, backup)]
        await asyncio.gather(*(self._quietly("result", i, self._send_result(i, part, state)) for i in others))

    def _send_result(self, target: int, part: int, state: _PartState) -> Awaitable[bool]:
        return self.links.send_result(target, part, state.contributors, state.result, self.timeouts.call)

    async def _repair(self, part: int) -> None:
        backup = fallback_reducer(part, len(self.members))
        if backup == self.my_index:
            await self.on_repair(self.my_index, part, self.weight, self._slice(part))
            return
        request = self.links.request_repair(backup, part, self.weight, self._slice(part), self.timeouts.call)
        reply = await self._quietly("repair", backup, request)
        if reply is None:
            return
        values, contributors = reply
        self.on_result(part, values, list(contributors))
