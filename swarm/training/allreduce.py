"""Fault-tolerant, verified butterfly all-reduce of one flat float32 vector.

Member ``j`` of a group (sorted by peer id) reduces part ``j`` of the vector
(:func:`~swarm.training.parts.split_parts`); the next member in the ring is the part's
*backup*, the one after it its *arbiter*, skipping members that reduce nothing (reached
through relays) while enough others do. A round has these phases, each with a deadline:

1. **scatter**: every member sends its contribution to part ``j`` (quantized by the
   codec, with its sample weight) to reducer ``j`` and, when verifying, to the backup.
   A reducer waits for all members or the scatter deadline, then aggregates what
   arrived robustly (:mod:`swarm.training.robust`: validated, clipped, CenteredClip or
   trimmed mean), in float32, in member order.
2. **gather**: reducer ``j`` quantizes its result, first *commits* it to the backup and
   only then sends it to everyone else. When verifying, the backup recomputes the part
   from its own copies of the contributions (starting as soon as they are in, while the
   reducer computes, so the commit rarely waits for it); if the results agree it endorses the
   result (sends every member its digest), otherwise it refuses the commit and
   declares the part *disputed*. A member takes a reducer's result only once the
   backup endorsed exactly those bytes.
3. **repair**: a member still missing part ``j`` at the gather deadline asks the
   backup, attaching its own contribution. The backup answers with the committed
   result if it holds one; otherwise it takes the part over (refusing any later
   commit from the original reducer), reduces the contributions the survivors send
   it, and answers them all.
4. **arbitration** (only for a disputed part): every member sends its contribution to
   the arbiter, which reduces the part itself and answers everyone with its result.
   One liar among reducer and backup cannot steer the part: the third member decides.

Because a result is only ever accepted once the backup holds it, and the backup
refuses a commit once it has taken over, every part has exactly one final value, and
every survivor receives the same bytes: survivors end bit-identical even when a
member dies mid-round. (A reducer and its backup dying in the same round can still
split the survivors; the trainer's parameter hash check catches and repairs that.)
Verification needs three members (with two, nobody can break a tie) and costs a
second copy of the scatter: 1.5x the bytes of an unverified round.

A round reaches the other members only through :class:`GroupLinks`: the averaging
service implements it over the transport, the protocol tests with an in-process
router that can kill a member, or make one lie, at an exact message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable
from typing import TypeVar

import torch

from swarm.training.averaging_wire import codec_round_trip, kept_encoded
from swarm.training.group_links import (  # re-exported: the round's public types
    AllReduceReport,
    AllReduceTimeouts,
    CommitReply,
    GroupLinks,
    Member,
)
from swarm.training.parts import arbiter_of, fallback_reducer, split_parts
from swarm.training.reduction import BufferPool, PartState, ResultChunks, RoundTrip
from swarm.training.robust import RobustConfig
from swarm.training.verification import RoundVerification
from transport import EncodedTensor
from transport.codecs import Codec

logger = logging.getLogger(__name__)

_Reply = TypeVar("_Reply")

__all__ = ["AllReduceReport", "AllReduceRound", "AllReduceTimeouts", "CommitReply", "GroupLinks", "Member"]


class AllReduceRound(RoundVerification):
    """One member's side of one round. Create it, register it with the service, then ``await run()``.

    Args:
        round_id: names the round on the wire (all members use the same id).
        members: the group, in the same order on every member.
        my_index: this member's position in ``members``.
        vector: this member's flat float32 contribution.
        weight: samples this member processed this round (0 for a newcomer's zero update).
        links: how this member reaches the others (see :class:`GroupLinks`).
        codec: the wire codec (a ``transport`` codec): every result goes through its
            quantize-dequantize (:func:`~swarm.training.averaging_wire.codec_round_trip`),
            the values every receiver decodes.
        timeouts: phase deadlines.
        alignment: part boundaries are multiples of this (the codec's block size).
        robust: how reducers validate and aggregate (every member must use the same).
        verify: backups recompute and endorse each part (groups of three or more).
        buffers: where the round takes its work buffers and, once released, gives them
            back (the service passes one pool to all its rounds); default: fresh ones.
    """

    def __init__(
        self,
        round_id: str,
        members: list[Member],
        my_index: int,
        vector: torch.Tensor,
        weight: float,
        links: GroupLinks,
        codec: Codec,
        timeouts: AllReduceTimeouts = AllReduceTimeouts(),
        alignment: int = 64,
        robust: RobustConfig = RobustConfig(),
        verify: bool = True,
        buffers: BufferPool | None = None,
    ):
        self.round_id = round_id
        self.members = members
        self.my_index = my_index
        self.vector: torch.Tensor | None = vector.detach().to(torch.float32).reshape(-1)
        self.weight = float(weight)
        self.links = links
        self.codec = codec
        self.round_trip: RoundTrip = functools.partial(codec_round_trip, codec)
        self.timeouts = timeouts
        self.robust = robust
        self.verifying = verify and len(members) >= 3
        self.bandwidths = [m.bandwidth for m in members]  # part sizes; who backs up and arbitrates
        self.parts = split_parts(self.vector.numel(), self.bandwidths, alignment)
        self._buffers = buffers or BufferPool(keep=0)
        self._results = ResultChunks(self.parts, self._buffers)  # reducers' results arriving in chunks
        self._states: dict[int, PartState] = {}
        self._checks: dict[int, PartState] = {}  # as a backup: the copies it recomputes from
        self._arbitrations: dict[int, PartState] = {}
        self._verdicts: dict[int, str] = {}
        self.report = AllReduceReport()
        self._started: float | None = None
        self._tasks: set[asyncio.Task] = set()  # take-overs and verdicts; see close()
        self._early_checks: dict[int, asyncio.Task] = {}  # as a backup: see verification.py
        self._kept: EncodedTensor | None = None  # after release: the backed-up part's result, encoded

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
        repairs). What it keeps is that result as the codec encodes it, in memory of its own
        (:func:`~swarm.training.averaging_wire.kept_encoded`): a quarter of the part with
        int8. A float32 copy per round cost back-to-back rounds ~6,000 fresh pages each on the
        development VM (the copies of earlier rounds still held), ~0.15 s of kernel time.
        """
        self.vector = None
        self._early_checks.clear()
        for part, state in self._states.items():
            state.candidate = None
            if fallback_reducer(part, self.bandwidths) == self.my_index and state.result is not None:
                self._kept = kept_encoded(self.codec, state.result)
            state.result = None
        for state in (*self._checks.values(), *self._arbitrations.values(), *self._states.values()):
            state.release()
        self._buffers.give(self._results.buffer)
        self._results.buffer = None

    def forget(self) -> None:
        """The service drops the finished round: no more repairs."""
        self.close()
        self._kept = None
        for state in self._states.values():
            state.result = None

    def _background(self, work: Awaitable) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        return task

    # -- incoming requests (called by the service) --------------------------------------

    def _state(self, part: int, table: dict[int, PartState] | None = None) -> PartState:
        if not 0 <= part < len(self.members):
            raise ValueError(f"part {part} out of range for a group of {len(self.members)}")
        table = self._states if table is None else table
        if part not in table:
            table[part] = PartState(self._buffers)
        return table[part]

    def _check_contribution(self, sender: int, part: int, values: torch.Tensor | None) -> torch.Tensor:
        if not 0 <= sender < len(self.members):
            raise ValueError(f"sender index {sender} out of range")
        start, end = self.parts[part]
        if values is None or values.numel() != end - start:
            raise ValueError(f"part {part} needs {end - start} values")
        return values.reshape(-1)

    def on_contribution(
        self,
        sender: int,
        part: int,
        weight: float,
        values: torch.Tensor | EncodedTensor | None,
        offset: int = 0,
    ) -> None:
        """Scatter phase: another member's contribution to a part this member reduces or backs
        up, whole or the chunk of it that starts at ``offset``."""
        if part == self.my_index:
            state = self._state(part)
        elif self.verifying and fallback_reducer(part, self.bandwidths) == self.my_index:
            state = self._state(part, self._checks)
        else:
            raise ValueError(f"member {self.my_index} neither reduces nor backs up part {part}")
        if not 0 <= sender < len(self.members):
            raise ValueError(f"sender index {sender} out of range")
        if values is None:
            raise ValueError(f"contribution to part {part} has no values")
        start, end = self.parts[part]
        state.add_chunk(sender, float(weight), offset, values, end - start, len(self.members))

    async def on_result(
        self, part: int, values: torch.Tensor | EncodedTensor | None, contributors: list[int], offset: int = 0
    ) -> CommitReply | None:
        """Gather phase: a reducer's result (on the backup: its commit, verified first), whole
        or the chunk of it that starts at ``offset``; None while more chunks are to come."""
        state = self._state(part)
        if state.ready.is_set():
            return "accepted"
        if state.taken_over:
            return "taken_over"
        if values is None:
            raise ValueError(f"result for part {part} has no values")
        if any(not 0 <= c < len(self.members) for c in contributors) or len(set(contributors)) != len(
            contributors
        ):
            raise ValueError(f"result for part {part} names contributors {contributors} not in the group")
        values, contributors = self._results.add(part, offset, values, list(contributors))
        if values is None:
            return None
        backup = fallback_reducer(part, self.bandwidths)
        if not self.verifying:
            state.finish(values, contributors)
            return "accepted"
        if backup != self.my_index:
            state.candidate = (values, contributors)
            self.settle(part)
            return "accepted"
        verdict = await self._verify(part, values, contributors)
        if state.ready.is_set() or state.taken_over:
            return "accepted" if state.ready.is_set() else "taken_over"
        if not verdict:
            self._dispute(part)
            self.report.accused.add(part)
            self.announce(part, "")
            return "disputed"
        state.finish(values, contributors)
        self.announce(part, state.digest(values))
        return "accepted"

    def on_verdict(self, part: int, digest: str) -> None:
        """Verification: the part's backup endorses a result digest ("": the part is disputed)."""
        self._state(part)
        self._verdicts.setdefault(part, digest)
        if part == self.my_index:
            self.check_endorsement(part)  # a dispute of our part reached us as the commit's answer
        elif digest:
            self.settle(part)
        else:
            self._dispute(part)

    async def on_repair(
        self, sender: int, part: int, weight: float, values: torch.Tensor | None, arbitrate: bool = False
    ):
        """Repair (on the backup) or arbitration (on the arbiter): (result, contributors) once
        the part has one (encoded once the round is released); (None, []) from a backup that
        disputes the part."""
        count = len(self.members)
        if arbitrate:
            if not self.verifying or arbiter_of(part, self.bandwidths) != self.my_index:
                raise ValueError(f"member {self.my_index} is not the arbiter of part {part}")
            return await self.arbitrate(sender, part, weight, values)
        if fallback_reducer(part, self.bandwidths) != self.my_index:
            raise ValueError(f"member {self.my_index} is not the backup of part {part}")
        state = self._state(part)
        if self._verdicts.get(part) == "":
            return None, []
        if not state.ready.is_set() and not state.taken_over:
            state.taken_over = True
            state.settled.set()  # nothing more to wait for from the reducer
            logger.warning("round %s: taking over part %d from member %d", self.round_id, part, part)
            state.contributions.clear()  # only survivors' repair contributions count now
            state.add(self.my_index, self.weight, self._own_share(part))
            self._background(self._reduce_taken_over(part, state, set(range(count)) - {part}))
        if not state.ready.is_set():
            state.add(sender, float(weight), self._check_contribution(sender, part, values))
        await asyncio.wait_for(state.ready.wait(), self.timeouts.repair + self.timeouts.call)
        return (state.result if self._kept is None else self._kept), state.contributors

    async def _verify(self, part: int, committed: torch.Tensor, contributors: list[int]) -> bool:
        """On the backup: does the committed result match our own recomputation? (verification.py)"""
        return await self.verify_commit(part, committed, contributors)

    async def _reduce_taken_over(self, part: int, state: PartState, expected: set[int]) -> None:
        await state.wait_for(expected, asyncio.get_running_loop().time() + self.timeouts.repair)
        state.reduce(self.round_trip, self.robust)
        self._note_aggregate(part, state)
        self.report.repaired_parts.append(part)

    # -- verification ------------------------------------------------------------------------

    def _dispute(self, part: int) -> None:
        state = self._state(part)
        if part not in self.report.disputed:
            self.report.disputed.append(part)
        state.settled.set()

    # -- this member's own work ------------------------------------------------------------

    def _slice(self, part: int) -> torch.Tensor:
        if self.vector is None:
            raise RuntimeError(f"round {self.round_id} is finished and released its vector")
        start, end = self.parts[part]
        return self.vector[start:end]

    def _own_share(self, part: int, state: PartState | None = None) -> torch.Tensor:
        """This member's share of ``part`` as the others decode it from the wire, written into
        its row of ``state``'s contributions buffer when given (pooled, not fresh pages).

        Counted this way where it is reduced locally too, so that a reducer, a backup and
        an arbiter that recompute a part all start from the same values.
        """
        if state is None:
            return self.round_trip(self._slice(part))
        start, end = self.parts[part]
        return self.round_trip(
            self._slice(part), out=state.row(self.my_index, end - start, len(self.members))
        )

    def _note_aggregate(self, part: int, state: PartState) -> None:
        if state.aggregate is None:
            return
        if state.aggregate.rejected:
            self.report.rejected[part] = state.aggregate.rejected
        if state.aggregate.clipped:
            self.report.clipped[part] = state.aggregate.clipped

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
        own.add(self.my_index, self.weight, self._own_share(self.my_index, own))
        sends = []
        for part in range(count):
            targets = [part] if part != self.my_index else []
            backup = fallback_reducer(part, self.bandwidths)
            if self.verifying and backup == self.my_index:
                check = self._state(part, self._checks)
                check.add(self.my_index, self.weight, self._own_share(part, check))
                self._early_checks[part] = self._background(self.check_early(part, scatter_deadline))
            elif self.verifying:
                targets.append(backup)
            sends += [self._send_contribution(target, part) for target in targets]
        await asyncio.gather(self._reduce_own(scatter_deadline), *sends)

        for j in range(count):
            await self._wait_settled(j, gather_deadline)
        missing = [
            j for j in range(count) if not self._state(j).ready.is_set() and j not in self.report.disputed
        ]
        if missing:
            logger.warning(
                "round %s: no result for parts %s by the deadline; repairing", self.round_id, missing
            )
            await asyncio.gather(*(self.repair(j) for j in missing))
        disputed = [
            j for j in range(count) if j in self.report.disputed and not self._state(j).ready.is_set()
        ]
        if disputed:
            await asyncio.gather(*(self.resolve_dispute(j) for j in disputed))
        unresolved = [j for j in range(count) if not self._state(j).ready.is_set()]
        if unresolved:
            raise DeadlineExceeded(f"all-reduce {self.round_id}: parts {unresolved} have no result")

        result = torch.empty_like(self.vector) if out is None else out.view(-1)
        for j, (start, end) in enumerate(self.parts):
            result[start:end] = self._states[j].result
            self.report.contributors[j] = self._states[j].contributors
        return result if out is None else out

    async def _wait_settled(self, part: int, deadline: float) -> bool:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(self._state(part).settled.wait(), max(remaining, 0.0))
        except TimeoutError:
            return False
        return True

    async def _send_contribution(self, target: int, part: int) -> None:
        send = self.links.send_contribution(target, part, self.weight, self._slice(part), self.timeouts.call)
        await self._quietly("contribution", target, send)

    async def _quietly(self, kind: str, target: int, sending: Awaitable[_Reply]) -> _Reply | None:
        """``await sending``; a member that cannot be reached is logged and yields None."""
        from transport.errors import SwarmError

        try:
            return await sending
        except (SwarmError, OSError, TimeoutError) as error:
            logger.warning("round %s: %s to member %d failed: %s", self.round_id, kind, target, error)
            return None

    async def _reduce_own(self, scatter_deadline: float) -> None:
        state = self._states[self.my_index]
        await state.wait_for(set(range(len(self.members))), scatter_deadline)
        if state.taken_over:
            return
        computed = await state.compute_in_thread(self.round_trip, self.robust)
        state.aggregate = computed
        self._note_aggregate(self.my_index, state)
        await self._broadcast(self.my_index, state, computed.values, computed.contributors)

    async def _broadcast(
        self, part: int, state: PartState, values: torch.Tensor, contributors: list[int]
    ) -> None:
        backup = fallback_reducer(part, self.bandwidths)
        if backup != self.my_index:
            send = self.links.send_result(backup, part, contributors, values, self.timeouts.call)
            reply = await self._quietly("result", backup, send)
            if reply == "disputed":
                logger.warning("round %s: backup %d disputes our part %d", self.round_id, backup, part)
                state.candidate = (values, contributors)
                self._dispute(part)
                return
            if reply == "taken_over":
                logger.warning(
                    "round %s: backup %d took over part %d; not broadcasting", self.round_id, backup, part
                )
                return
        state.finish(values, contributors)
        self.check_endorsement(part)
        others = [i for i in range(len(self.members)) if i not in (self.my_index, backup)]
        await asyncio.gather(
            *(
                self._quietly(
                    "result", i, self.links.send_result(i, part, contributors, values, self.timeouts.call)
                )
                for i in others
            )
        )
