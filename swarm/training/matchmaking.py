"""Forming the group that averages one round.

Members ready to average round ``r`` say so in their run record (state AVERAGING,
round ``r``). The leader of round ``r`` is the smallest peer id among them; everyone
else sends it a :class:`JoinGroup`. The leader admits joiners until every member it
expects has joined or the matchmaking window closes, then answers them all with the
same sorted member list. A member that picked another leader is redirected to it.

Each joiner also reports the hash of its ``theta_global``: the leader compares them
and names, for any member in the minority, a majority member to re-sync from. So the
bit-identity of all members is checked at every round, not assumed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from swarm.training.allreduce import Member
from transport import BaseEndpoint, Message, RequestContext, ServerBusy, message

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

    Args:
        endpoint: this trainer's endpoint (serves :class:`JoinGroup`).
        ready_members: returns ``{peer_id: (address, public_key)}`` of the members that
            announced they are ready to average the given round (read from the DHT).
        expected_members: returns the peer ids whose records are fresh (alive) in the run.
        window: seconds the leader waits for everyone expected; joiners wait a bit longer.
    """

    def __init__(
        self,
        endpoint: BaseEndpoint,
        ready_members: Callable[[int], Awaitable[dict[str, tuple[str, bytes]]]],
        expected_members: Callable[[], Awaitable[set[str]]],
        window: float = 10.0,
        call_timeout: float = 5.0,
    ):
        self.endpoint = endpoint
        self.ready_members = ready_members
        self.expected_members = expected_members
        self.window = window
        self.call_timeout = call_timeout
        self._current: _Matchmaking | None = None
        self._current_changed = asyncio.Condition()
        endpoint.add_handler(JoinGroup, self._on_join)

    async def _on_join(self, request: JoinGroup, context: RequestContext) -> GroupReply:
        if context.peer_key is not None and context.peer_key != request.public_key:
            raise ServerBusy("join request's key does not match its connection")

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
        state = _Matchmaking(
            round_index, me, joined={me.peer_id: me}, changed=asyncio.Event(), done=asyncio.Event()
        )
        # Wait until every live member is ready for this round (or the window closes).
        ready: dict[str, tuple[str, bytes]] = {}
        while True:
            ready = await self.ready_members(round_index)
            ready.setdefault(me.peer_id, (me.address, me.public_key))
            expected = await self.expected_members()
            if expected <= ready.keys() or loop.time() >= deadline:
                break
            await asyncio.sleep(min(0.2, max(0.0, deadline - loop.time())))  # poll the DHT, bounded
        state.leader = min(ready)
        async with self._current_changed:
            self._current = state
            self._current_changed.notify_all()
        try:
            if state.leader == me.peer_id:
                return await self._lead(state, expected | {me.peer_id}, deadline)
            return await self._follow(state, ready, deadline)
        finally:
            state.done.set()

    async def _lead(self, state: _Matchmaking, expected: set[str], deadline: float) -> Group:
        loop = asyncio.get_running_loop()
        while not expected <= state.joined.keys() and loop.time() < deadline:
            state.changed.clear()
            try:
                await asyncio.wait_for(state.changed.wait(), deadline - loop.time())
            except TimeoutError:
                break
        state.reply = _build_reply(state.me.peer_id, state.joined)
        state.done.set()
        logger.info("round %d: leading a group of %d", state.round, len(state.reply.peer_ids))
        return self._group(state.reply, state.me.peer_id)

    async def _follow(self, state: _Matchmaking, ready: dict[str, tuple[str, bytes]], deadline: float):
        from transport.errors import SwarmError

        leader = state.leader
        for _ in range(3):  # follow at most a couple of redirects
            if leader not in ready:
                ready.update(await self.ready_members(state.round))
            if leader not in ready:
                logger.warning("round %d: leader %s is not reachable", state.round, leader)
                return None
            address, key = ready[leader]
            remaining = deadline - asyncio.get_running_loop().time() + self.window + self.call_timeout
            try:
                connection = await self.endpoint.connect(address, key)
                try:
                    reply = await connection.call(state.me, timeout=max(remaining, self.call_timeout))
                finally:
                    await connection.close()
            except SwarmError as error:
                logger.warning("round %d: joining leader %s failed: %s", state.round, leader, error)
                return None
            if reply.peer_ids:
                return self._group(reply, state.me.peer_id)
            leader = reply.leader
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
