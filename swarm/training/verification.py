"""How the members of an all-reduce round check its reducers and repair missing parts
(the verification and repair half of :mod:`swarm.training.allreduce`; see its
docstring for the protocol).

- the *backup* of a part recomputes it from its own copies of the contributions and
  endorses the reducer's commit (:func:`verify_commit`, :func:`announce`) or disputes it;
- a *member* takes a reducer's result only when its digest is the endorsed one
  (:func:`settle`); a reducer notices a backup that endorses bytes it never sent
  (:func:`check_endorsement`);
- a disputed part goes to its *arbiter*, which reduces it from every member's share
  (:func:`arbitrate`); every member then uses the arbiter's result (:func:`resolve_dispute`)
  and names whoever's result contradicted it;
- a member missing a part at the gather deadline asks its backup (:func:`repair`).

``RoundVerification`` is the base class of ``AllReduceRound``: these methods work on the
round's own state, and live here so the round's main protocol stays one readable
module. The dependency points one way: ``allreduce`` builds on this module, never the
reverse.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from swarm.training.parts import arbiter_of, fallback_reducer
from swarm.training.reduction import result_digest, results_agree
from swarm.training.robust import Aggregate

logger = logging.getLogger("swarm.training.allreduce")


class RoundVerification:
    """The verification and repair half of ``AllReduceRound`` (its base class)."""

    async def check_early(self, part: int, scatter_deadline: float) -> tuple[set[int], Aggregate]:
        """On the backup, started with the round: recompute the part as soon as every member's
        copy is here (or at the scatter deadline), while the reducer computes it too, so that
        the check is ready when the commit arrives. Returns (members whose copies it used, result)."""
        check = self._state(part, self._checks)
        await check.wait_for(set(range(len(self.members))), scatter_deadline)
        used = set(check.contributions)
        return used, await check.compute_in_thread(self.round_trip, self.robust)

    async def verify_commit(self, part: int, committed: torch.Tensor, contributors: list[int]) -> bool:
        """On the backup: does the reducer's committed result match our own recomputation?"""
        check = self._state(part, self._checks)
        scatter_deadline = (self._started or asyncio.get_running_loop().time()) + self.timeouts.scatter
        await check.wait_for(set(contributors), scatter_deadline + self.timeouts.call)
        own = None
        early = self._early_checks.get(part)
        if early is not None:
            try:
                used, own = await early  # bounded: it waits for the scatter deadline, then computes
            except Exception:  # recomputed below, where an error is the handler's to report
                logger.exception("round %s: early check of part %d failed", self.round_id, part)
            else:
                if used != set(check.contributions):  # a copy came after it started
                    own = None
        if own is None:
            own = await check.compute_in_thread(self.round_trip, self.robust)  # chunks keep moving
        if own.contributors == contributors and results_agree(committed, own.values):
            return True
        missing = set(contributors) - check.contributions.keys()
        if missing and part not in missing:
            # A member died between its sends to the reducer and to us: we cannot recompute
            # the same thing. Accepted unverified (the reducer's own share reached us).
            logger.warning(
                "round %s: part %d unverifiable (no copy from members %s); accepting it",
                self.round_id,
                part,
                sorted(missing),
            )
            return True
        logger.error(
            "round %s: reducer %d (%s) committed a result for part %d that disagrees with ours; disputing it",
            self.round_id, part, self.members[part].peer_id[:12], part,
        )  # fmt: skip
        return False

    def announce(self, part: int, digest: str) -> None:
        """As the backup: tell every other member our verdict."""
        self._verdicts[part] = digest
        for target in range(len(self.members)):
            if target != self.my_index:
                send = self.links.send_verdict(target, part, digest, self.timeouts.call)
                self._background(self._quietly("verdict", target, send))

    def settle(self, part: int) -> None:
        """Accept the reducer's result once the backup endorsed exactly its bytes."""
        state = self._state(part)
        digest = self._verdicts.get(part)
        if state.ready.is_set() or not digest or state.candidate is None:
            return
        values, contributors = state.candidate
        if state.digest(values) == digest:
            state.finish(values, contributors)
        else:  # the reducer sent us other bytes than it committed: take the committed ones from the backup
            logger.error(
                "round %s: reducer %d sent us a result its backup did not endorse; asking the backup",
                self.round_id,
                part,
            )
            self.report.accused.add(part)
            state.candidate = None
            state.settled.set()

    def check_endorsement(self, part: int) -> None:
        """As a reducer: a backup that endorses other bytes than we committed is lying."""
        state, digest = self._state(part), self._verdicts.get(part)
        if digest and state.result is not None and digest != state.digest(state.result):
            backup = fallback_reducer(part, self.bandwidths)
            logger.error(
                "round %s: backup %d endorsed a result of our part we never sent", self.round_id, backup
            )
            self.report.accused.add(backup)

    async def arbitrate(self, sender: int, part: int, weight: float, values: torch.Tensor | None):
        state = self._state(part, self._arbitrations)
        if not state.taken_over:
            state.taken_over = True
            logger.warning("round %s: arbitrating disputed part %d", self.round_id, part)
            state.add(self.my_index, self.weight, self._own_share(part))
            self._background(self._reduce_taken_over(part, state, set(range(len(self.members)))))
        if sender != self.my_index:
            state.add(sender, float(weight), self._check_contribution(sender, part, values))
        await asyncio.wait_for(state.ready.wait(), self.timeouts.repair + self.timeouts.call)
        return state.result, state.contributors

    async def resolve_dispute(self, part: int) -> None:
        """A disputed part: every member asks the arbiter, whose result everyone then uses."""
        arbiter = arbiter_of(part, self.bandwidths)
        if arbiter == self.my_index:
            reply = await self._quietly(
                "arbitration",
                arbiter,
                self.arbitrate(self.my_index, part, self.weight, self._slice(part)),
            )
        else:
            request = self.links.request_repair(
                arbiter,
                part,
                self.weight,
                self._slice(part),
                self.timeouts.call + self.timeouts.repair,
                True,
            )
            reply = await self._quietly("arbitration", arbiter, request)
        if reply is None or reply[0] is None:
            return  # no result: the round fails with DeadlineExceeded and is skipped
        values, contributors = reply
        values = values.reshape(-1)
        state = self._state(part)
        if state.candidate is not None:  # the reducer's result, as it reached us
            if results_agree(state.candidate[0], values):
                if part == self.my_index or self._verdicts.get(part):
                    self.report.accused.add(fallback_reducer(part, self.bandwidths))  # the backup lied
            else:
                self.report.accused.add(part)  # the reducer's result contradicts the arbiter's
        state.finish(values, list(contributors))

    async def repair(self, part: int) -> None:
        """A part with no (endorsed) result at the gather deadline: ask its backup, which answers
        the committed result or takes the part over; a dispute sends the member to the arbiter."""
        backup = fallback_reducer(part, self.bandwidths)
        if backup == self.my_index:
            reply = await self.on_repair(self.my_index, part, self.weight, self._slice(part))
        else:
            request = self.links.request_repair(
                backup, part, self.weight, self._slice(part), self.timeouts.call, False
            )
            reply = await self._quietly("repair", backup, request)
        state = self._state(part)
        if reply is None:
            if state.candidate is not None and part not in self.report.disputed:
                # The backup is gone: nobody can verify this part; take the reducer's result.
                logger.warning(
                    "round %s: backup of part %d unreachable; using it unverified", self.round_id, part
                )
                state.finish(*state.candidate)
            return
        values, contributors = reply
        if values is None:
            self._dispute(part)
            return
        endorsed = self._verdicts.get(part)
        if endorsed and result_digest(values) != endorsed:
            logger.error("round %s: backup %d answered other bytes than it endorsed", self.round_id, backup)
            self.report.accused.add(backup)
            return  # no trustworthy result: the round fails and is skipped
        if not state.ready.is_set():
            state.finish(values.reshape(-1), list(contributors))
