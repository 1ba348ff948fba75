"""Forming the group that averages one round.

The leader of round ``r`` is the smallest peer id among the run's live members;
everyone else sends it a :class:`JoinGroup` as soon as it is ready. The leader
admits joiners until every live member has joined or the matchmaking window closes,
then answers them all with the same sorted member list, but only if they are a
majority of the live members it sees: two disjoint groups can never both apply a
step to the same round (a member that dies only delays rounds until its record
expires).

Each joiner also reports the hash of its ``theta_global``: the leader compares them
and names, for any member in the minority, a majority member to re-sync from. So the
bit-identity of all members is checked at every round, not assumed.

Every peer a message names is checked against who sent it: a join request must come
from the CURVE key that the named peer's own signed run record announces (with the
address it announces), so no one can take another member's place in a round; and a
follower accepts a group only from the leader it asked, naming only members whose
records carry the keys and addresses the group lists.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from swarm.training.allreduce import Member
from transport import BaseEndpoint, Message, NotAuthorized, RequestContext, ServerBusy, message

logger = logging.getLogger(__name__)


@message("train.join")
class JoinGroup(Message):
    round: int
    peer_id: str
    address: str
    public_key: bytes
    bandwidth: float
    parameters_hash: str


@message("train.group")
class GroupReply(Message):
    """The group (parallel lists, sorted by peer id), or a redirect when ``peer_ids`` is empty."""

    leader: str
    peer_ids: list[str]
    addresses: list[str]
    public_keys: list[bytes]
    bandwidths: list[float]
    resync_from: dict[str, str]
    """Members whose hash is in the minority -> a majority member to download state from."""


@dataclass(frozen=True)
class Group:
    members: list[Member]
    my_index: int
    resync_from: str | None
    """Set when this member's parameters disagree with the majority: the peer to re-sync from."""


@dataclass
class _Matchmaking:
    round: int
    me: JoinGroup
    leader: str | None = None
    joined: dict[str, JoinGroup] | None = None
    changed: asyncio.Event | None = None
    reply: GroupReply | None = None
    done: asyncio.Event | None = None


def _build_reply(leader: str, joined: dict[str, JoinGroup]) -> GroupReply:
    ordered = [joined[peer] for peer in sorted(joined)]
    votes = Counter(j.parameters_hash for j in ordered)
    majority_hash = max(votes, key=lambda h: (votes[h], h))
    donors = [j.peer_id for j in ordered if j.parameters_hash == majority_hash]
    resync = {
        j.peer_id: donors[i % len(donors)]  # spread re-syncing members over the donors
        for i, j in enumerate(j for j in ordered if j.parameters_hash != majority_hash)
    }
    return GroupReply(
        leader,
        [j.peer_id for j in ordered],
        [j.address for j in ordered],
        [j.public_key for j in ordered],
        [j.bandwidth for j in ordered],
        resync,
    )


class Matchmaker:
    """Forms groups for this member and, when it leads, for the others.

    The leader of a round is the smallest peer id among the live members of the run
    (the members whose records are fresh and not leaving). That set changes only when
    members join or leave, so every member picks the same leader even while some are
    still training: a follower's request waits at the leader until the leader itself
    is ready. If the leader cannot be reached, followers fall through to the next
    candidate in the same order, so they still converge on one group.

    Args:
        endpoint: this trainer's endpoint (serves :class:`JoinGroup`).
        live_members: returns ``{peer_id: (address, public_key)}`` of the live members.
        relayed_members: peer ids of live members behind NAT (as of the last
            ``live_members`` call); they lead only when no one else can.
        window: seconds the leader waits for every live member; joiners wait a bit longer.
        call_timeout: bound on connecting to a leader candidate.
    """

    def __init__(
        self,
        endpoint: BaseEndpoint,
        live_members: Callable[[], Awaitable[dict[str, tuple[str, bytes]]]],
        window: float = 10.0,
        call_timeout: float = 5.0,
        relayed_members: Callable[[], set[str]] = set,
    ):
        self.endpoint = endpoint
        self.live_members = live_members
        self.relayed_members = relayed_members
        self.window = window
        self.call_timeout = call_timeout
        self._current: _Matchmaking | None = None
        self._current_changed = asyncio.Condition()
        endpoint.add_handler(JoinGroup, self._on_join)

    async def _on_join(self, request: JoinGroup, context: RequestContext) -> GroupReply:
        if context.peer_key is not None and context.peer_key != request.public_key:
            raise NotAuthorized("join request's key does not match its connection")
        announced = (await self.live_members()).get(request.peer_id)
        if announced is None or tuple(announced) != (request.address, request.public_key):
            logger.error(
                "round %d: refused a join request as %s: %s",
                request.round,
                request.peer_id[:12],
                "no live record of that peer" if announced is None else "not that peer's key or address",
            )
            raise NotAuthorized(
                f"peer {request.peer_id[:12]}'s record does not announce this key and address"
            )

        async def my_matchmaking_for_round() -> _Matchmaking:
            async with self._current_changed:
                await self._current_changed.wait_for(
                    lambda: self._current is not None and self._current.round >= request.round
                )
                return self._current

        try:  # we may still be finishing our inner steps: wait for our own matchmaking a while
            current = await asyncio.wait_for(my_matchmaking_for_round(), self.window)
        except TimeoutError:
            raise ServerBusy(f"not matchmaking for round {request.round} yet") from None
        if current.round != request.round or current.reply is not None:
            raise ServerBusy(f"round {request.round} is already formed here")
        if current.leader != current.me.peer_id:
            return GroupReply(current.leader or "", [], [], [], [], {})
        current.joined[request.peer_id] = request
        current.changed.set()
        await asyncio.wait_for(current.done.wait(), self.window + self.call_timeout)
        if request.peer_id not in current.reply.peer_ids:
            raise ServerBusy(f"round {request.round}: joined too late")
        return current.reply

    async def form_group(self, round_index: int, me: JoinGroup) -> Group | None:
        """Find this round's group. Returns None if no group could be formed in time (skip the round)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window
        live = await self.live_members()
        live[me.peer_id] = (me.address, me.public_key)
        state = _Matchmaking(
            round_index, me, joined={me.peer_id: me}, changed=asyncio.Event(), done=asyncio.Event()
        )
        # Members behind NAT (relayed, joining with no reducer share) do not lead while a
        # direct member can: the others could not reach them. They still join (dialling out).
        relayed = self.relayed_members() | ({me.peer_id} if me.bandwidth == 0 else set())
        candidates = sorted(peer for peer in live if peer not in relayed) or sorted(live)
        try:
            for candidate in candidates:
                state.leader = candidate
                if candidate == me.peer_id:
                    await self._publish_state(state)
                    return await self._lead(state, set(live), deadline)
                await self._publish_state(state)  # joiners that reach us are redirected to the candidate
                outcome = await self._follow(state, candidate, live[candidate], deadline)
                if outcome is not _UNREACHABLE:
                    return outcome
                logger.warning(
                    "round %d: leader candidate %s unreachable; trying the next", round_index, candidate[:12]
                )
            return None
        finally:
            state.done.set()

    async def _publish_state(self, state: _Matchmaking) -> None:
        async with self._current_changed:
            self._current = state
            self._current_changed.notify_all()

    async def _lead(self, state: _Matchmaking, expected: set[str], deadline: float) -> Group | None:
        loop = asyncio.get_running_loop()
        # Followers blocked waiting for us get a moment to register even if the window is spent.
        deadline = max(deadline, loop.time() + min(2.0, self.window))
        while not expected <= state.joined.keys() and loop.time() < deadline:
            state.changed.clear()
            try:
                await asyncio.wait_for(state.changed.wait(), deadline - loop.time())
            except TimeoutError:
                break
        if 2 * len(state.joined) <= len(expected):
            # No majority of the live members: another group might hold one. Skip the round
            # rather than risk two groups applying different steps to the same round.
            state.reply = GroupReply(state.me.peer_id, [], [], [], [], {})
            state.done.set()
            logger.warning(
                "round %d: only %d of %d live members joined; no quorum, skipping the round",
                state.round,
                len(state.joined),
                len(expected),
            )
            return None
        state.reply = _build_reply(state.me.peer_id, state.joined)
        state.done.set()
        logger.info("round %d: leading a group of %d", state.round, len(state.reply.peer_ids))
        return self._group(state.reply, state.me.peer_id)

    async def _follow(self, state: _Matchmaking, leader: str, where: tuple[str, bytes], deadline: float):
        """Join ``leader``'s group. Returns the group, None (no group this round) or _UNREACHABLE."""
        from transport.errors import DeadlineExceeded, PeerUnavailable, SwarmError

        address, key = where
        remaining = deadline - asyncio.get_running_loop().time() + self.window + self.call_timeout
        try:
            connection = await asyncio.wait_for(self.endpoint.connect(address, key), self.call_timeout)
        except (TimeoutError, DeadlineExceeded, PeerUnavailable):
            return _UNREACHABLE
        except SwarmError as error:
            logger.warning("round %d: connecting to leader %s failed: %s", state.round, leader[:12], error)
            return _UNREACHABLE
        try:
            reply = await connection.call(state.me, timeout=max(remaining, self.call_timeout))
        except SwarmError as error:
            logger.warning("round %d: joining leader %s failed: %s", state.round, leader[:12], error)
            return None
        finally:
            await connection.close()
        if not reply.peer_ids:
            logger.warning(
                "round %d: %s leads elsewhere (%s); skipping this round",
                state.round,
                leader[:12],
                reply.leader[:12],
            )
            return None
        problem = await self._check_group(reply, leader, state.me)
        if problem:
            logger.error("round %d: refusing the group from %s: %s", state.round, leader[:12], problem)
            return None
        return self._group(reply, state.me.peer_id)

    async def _check_group(self, reply: GroupReply, leader: str, me: JoinGroup) -> str | None:
        """Why a leader's group cannot be trusted, or None: it must come from the leader we
        asked, and every member it lists must have a live record with that key and address."""
        lengths = {len(reply.peer_ids), len(reply.addresses), len(reply.public_keys), len(reply.bandwidths)}
        if reply.leader != leader or len(lengths) != 1 or me.peer_id not in reply.peer_ids:
            return "not from the leader we asked, malformed, or we are not in it"
        # a bandwidth of 0 is a member reached only through relays: it holds no reducer share
        if reply.peer_ids != sorted(set(reply.peer_ids)) or any(
            not 0 <= b < math.inf for b in reply.bandwidths
        ):
            return "members not sorted and distinct, or a bandwidth that is negative or not finite"
        live = await self.live_members()
        live[me.peer_id] = (me.address, me.public_key)
        for peer, address, key in zip(reply.peer_ids, reply.addresses, reply.public_keys, strict=True):
            if tuple(live.get(peer, ())) != (address, key):
                return f"member {peer[:12]} is listed with a key or address its record does not announce"
        if any(a not in reply.peer_ids or b not in reply.peer_ids for a, b in reply.resync_from.items()):
            return "re-sync advice names peers outside the group"
        return None

    @staticmethod
    def _group(reply: GroupReply, my_peer_id: str) -> Group:
        members = [
            Member(peer, bandwidth, address, key)
            for peer, address, key, bandwidth in zip(
                reply.peer_ids, reply.addresses, reply.public_keys, reply.bandwidths, strict=True
            )
        ]
        return Group(members, reply.peer_ids.index(my_peer_id), reply.resync_from.get(my_peer_id))


_UNREACHABLE = object()
