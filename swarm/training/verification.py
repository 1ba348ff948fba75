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

These are functions of the round's state rather than methods so the round itself stays
one readable module.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import torch

from swarm.training.parts import arbiter_of, fallback_reducer
from swarm.training.reduction import result_digest, results_agree

if TYPE_CHECKING:
    from swarm.training.allreduce import AllReduceRound

logger = logging.getLogger("swarm.training.allreduce")


async def verify_commit(
    round_: AllReduceRound, part: int, committed: torch.Tensor, contributors: list[int]
) -> bool:
    """On the backup: does the reducer's committed result match our own recomputation?"""
    check = round_._state(part, round_._checks)
    scatter_deadline = (round_._started or asyncio.get_running_loop().time()) + round_.timeouts.scatter
    await check.wait_for(set(contributors), scatter_deadline + round_.timeouts.call)
    own = check.compute(round_.round_trip, round_.robust)
    if own.contributors == contributors and results_agree(committed, own.values):
        return True
    missing = set(contributors) - check.contributions.keys()
    if missing and part not in missing:
        # A member died between its sends to the reducer and to us: we cannot recompute
        # the same thing. Accepted unverified (the reducer's own share reached us).
        logger.warning(
            "round %s: part %d unverifiable (no copy from members %s); accepting it",
            round_.round_id,
            part,
            sorted(missing),
        )
        return True
    logger.error(
        "round %s: reducer %d (%s) committed a result for part %d that disagrees with ours; disputing it",
        round_.round_id, part, round_.members[part].peer_id[:12], part,
    )  # fmt: skip
    return False


def announce(round_: AllReduceRound, part: int, digest: str) -> None:
    """As the backup: tell every other member our verdict."""
    round_._verdicts[part] = digest
    for target in range(len(round_.members)):
        if target != round_.my_index:
            send = round_.links.send_verdict(target, part, digest, round_.timeouts.call)
            round_._background(round_._quietly("verdict", target, send))


def settle(round_: AllReduceRound, part: int) -> None:
    """Accept the reducer's result once the backup endorsed exactly its bytes."""
    state = round_._state(part)
    digest = round_._verdicts.get(part)
    if state.ready.is_set() or not digest or state.candidate is None:
        return
    values, contributors = state.candidate
    if result_digest(values) == digest:
        state.finish(values, contributors)
    else:  # the reducer sent us other bytes than it committed: take the committed ones from the backup
        logger.error(
            "round %s: reducer %d sent us a result its backup did not endorse; asking the backup",
            round_.round_id,
            part,
        )
        round_.report.accused.add(part)
        state.candidate = None
        state.settled.set()


def check_endorsement(round_: AllReduceRound, part: int) -> None:
    """As a reducer: a backup that endorses other bytes than we committed is lying."""
    state, digest = round_._state(part), round_._verdicts.get(part)
    if digest and state.result is not None and digest != result_digest(state.result):
        backup = fallback_reducer(part, len(round_.members))
        logger.error(
            "round %s: backup %d endorsed a result of our part we never sent", round_.round_id, backup
        )
        round_.report.accused.add(backup)


async def arbitrate(
    round_: AllReduceRound, sender: int, part: int, weight: float, values: torch.Tensor | None
):
    state = round_._state(part, round_._arbitrations)
    if not state.taken_over:
        state.taken_over = True
        logger.warning("round %s: arbitrating disputed part %d", round_.round_id, part)
        state.add(round_.my_index, round_.weight, round_._own_share(part))
        round_._background(round_._reduce_taken_over(part, state, set(range(len(round_.members)))))
    if sender != round_.my_index:
        state.add(sender, float(weight), round_._check_contribution(sender, part, values))
    await asyncio.wait_for(state.ready.wait(), round_.timeouts.repair + round_.timeouts.call)
    return state.result, state.contributors


async def resolve_dispute(round_: AllReduceRound, part: int) -> None:
    """A disputed part: every member asks the arbiter, whose result everyone then uses."""
    arbiter = arbiter_of(part, len(round_.members))
    if arbiter == round_.my_index:
        reply = await round_._quietly(
            "arbitration",
            arbiter,
            arbitrate(round_, round_.my_index, part, round_.weight, round_._slice(part)),
        )
    else:
        request = round_.links.request_repair(
            arbiter,
            part,
            round_.weight,
            round_._slice(part),
            round_.timeouts.call + round_.timeouts.repair,
            True,
        )
        reply = await round_._quietly("arbitration", arbiter, request)
    if reply is None or reply[0] is None:
        return  # no result: the round fails with DeadlineExceeded and is skipped
    values, contributors = reply
    values = values.reshape(-1)
    state = round_._state(part)
    if state.candidate is not None:  # the reducer's result, as it reached us
        if results_agree(state.candidate[0], values):
            if part == round_.my_index or round_._verdicts.get(part):
                round_.report.accused.add(fallback_reducer(part, len(round_.members)))  # the backup lied
        else:
            round_.report.accused.add(part)  # the reducer's result contradicts the arbiter's
    state.finish(values, list(contributors))


async def repair(round_: AllReduceRound, part: int) -> None:
    """A part with no (endorsed) result at the gather deadline: ask its backup, which answers
    the committed result or takes the part over; a dispute sends the member to the arbiter."""
    backup = fallback_reducer(part, len(round_.members))
    if backup == round_.my_index:
        reply = await round_.on_repair(round_.my_index, part, round_.weight, round_._slice(part))
    else:
        request = round_.links.request_repair(
            backup, part, round_.weight, round_._slice(part), round_.timeouts.call, False
        )
        reply = await round_._quietly("repair", backup, request)
    state = round_._state(part)
    if reply is None:
        if state.candidate is not None and part not in round_.report.disputed:
            # The backup is gone: nobody can verify this part; take the reducer's result.
            logger.warning(
                "round %s: backup of part %d unreachable; using it unverified", round_.round_id, part
            )
            state.finish(*state.candidate)
        return
    values, contributors = reply
    if values is None:
        round_._dispute(part)
        return
    endorsed = round_._verdicts.get(part)
    if endorsed and result_digest(values) != endorsed:
        logger.error("round %s: backup %d answered other bytes than it endorsed", round_.round_id, backup)
        round_.report.accused.add(backup)
        return  # no trustworthy result: the round fails and is skipped
    if not state.ready.is_set():
        state.finish(values.reshape(-1), list(contributors))
