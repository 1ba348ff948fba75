"""Handing the current training state to a member that joins or fell behind.

A donor answers :class:`StateRequest` with ``theta_global``, the outer momentum and
the round, plus the parameters' hash, which the receiver checks. Newcomers pick
donors by their own id, so several joiners spread over the members at the latest
round instead of all loading one donor (hivemind #169).

:class:`StateSync` is both sides for one member: it serves the member's state once
it has one, and downloads the run's latest state when the member joins (trying the
donors in turn) or finds itself behind the run at the end of a round (one attempt,
then back to training).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping

import torch

from swarm.training.diloco import hash_parameters
from swarm.training.progress import TrainingPeerRecord
from swarm.training.replica import Replica
from transport import BaseEndpoint, CodedTensor, Message, RawCodec, RequestContext, ServerBusy, message
from transport.errors import MalformedMessage, SwarmError

logger = logging.getLogger(__name__)


@message("train.state_request")
class StateRequest(Message):
    run: str


@message("train.state")
class StateReply(Message):
    round: int
    parameters: torch.Tensor
    momentum: torch.Tensor | None
    parameters_hash: str


def choose_donor(candidates: list[str], my_peer_id: str, exclude: set[str] = frozenset()) -> str | None:
    """A donor among ``candidates`` (peers at the latest round), spread by the requester's id."""
    pool = sorted(set(candidates) - exclude - {my_peer_id})
    if not pool:
        return None
    index = int(hashlib.sha256(my_peer_id.encode()).hexdigest(), 16) % len(pool)
    return pool[index]


async def download_state(
    endpoint: BaseEndpoint, address: str, public_key: bytes, run: str, timeout: float
) -> dict:
    """Fetch a donor's outer state; returns a dict for ``OuterOptimizer.load_state_dict``.

    Raises:
        SwarmError: the donor is unreachable or answered with an error.
        MalformedMessage: the parameters do not match the hash the donor sent.
    """
    connection = await endpoint.connect(address, public_key)
    try:
        reply = await connection.call(StateRequest(run), timeout=timeout)
    finally:
        await connection.close()
    parameters = reply.parameters.to(torch.float32).reshape(-1)
    if hash_parameters(parameters) != reply.parameters_hash:
        raise MalformedMessage("downloaded parameters do not match the donor's hash")
    return {"round": reply.round, "parameters": parameters, "momentum": reply.momentum}


def _at_latest_round(members: Mapping[str, TrainingPeerRecord]) -> tuple[int, list[str]]:
    latest = max((record.round for record in members.values()), default=-1)
    return latest, [peer for peer, record in members.items() if record.round == latest]


class StateSync:
    """Serves this member's outer state and downloads others' into its replica.

    Args:
        endpoint: this member's endpoint (serves :class:`StateRequest`).
        run: the run's name (requests for other runs are refused).
        peer_id: this member's id (spreads its downloads over donors).
        replica: where downloaded state goes and served state comes from.
        timeout: bound on one download, in seconds.
        has_state: whether this member holds the run's state yet (False while joining).
    """

    def __init__(
        self,
        endpoint: BaseEndpoint,
        run: str,
        peer_id: str,
        replica: Replica,
        timeout: float,
        has_state: Callable[[], bool],
    ):
        self.endpoint = endpoint
        self.run = run
        self.peer_id = peer_id
        self.replica = replica
        self.timeout = timeout
        self.has_state = has_state
        endpoint.add_handler(StateRequest, self._on_state_request)

    async def _on_state_request(self, request: StateRequest, context: RequestContext) -> StateReply:
        if request.run != self.run or not self.has_state():
            raise ServerBusy(f"no state of run {request.run!r} to give")
        state = self.replica.outer.state_dict()  # a copy: consistent even while we average
        momentum = state["momentum"]
        return StateReply(
            state["round"],
            CodedTensor(state["parameters"], RawCodec()),
            None if momentum is None else CodedTensor(momentum, RawCodec()),
            hash_parameters(state["parameters"]),
        )

    async def sync_from(self, donor: str, members: Mapping[str, TrainingPeerRecord]) -> None:
        """Replace the replica's ``theta_global`` and outer momentum with ``donor``'s.

        Raises:
            SwarmError: the download failed.
        """
        record = members[donor]
        state = await download_state(
            self.endpoint, record.addresses[0], record.curve_public_key, self.run, self.timeout
        )
        self.replica.load_global_state(state)
        logger.info("synced state of round %d from %s", self.replica.round, donor[:12])

    async def join(self, others: Mapping[str, TrainingPeerRecord], resumed: bool) -> None:
        """On joining: take the latest state from one of ``others`` (the active members), trying each
        donor at the latest round in turn. Keeps a ``resumed`` checkpoint that is not behind."""
        if not others:
            logger.info("no other members of run %r: starting it at round %d", self.run, self.replica.round)
            return
        latest, candidates = _at_latest_round(others)
        if resumed and latest <= self.replica.round:
            return
        tried: set[str] = set()
        while True:
            donor = choose_donor(candidates, self.peer_id, tried)
            if donor is None:
                logger.warning("no donor could give the state of round %d; starting from our own", latest)
                return
            try:
                await self.sync_from(donor, others)
                return
            except SwarmError as error:
                logger.warning("state download from %s failed: %s", donor[:12], error)
                tried.add(donor)

    async def catch_up(self, others: Mapping[str, TrainingPeerRecord]) -> bool:
        """If ``others`` (the active members) are at a later round, re-sync from one of them.

        Returns:
            True if the run was ahead (this round is then skipped, synced or not).
        """
        latest, candidates = _at_latest_round(others)
        if latest <= self.replica.round:
            return False
        logger.warning(
            "round %d: the run is at round %d; catching up from a member", self.replica.round, latest
        )
        donor = choose_donor(candidates, self.peer_id)
        try:
            await self.sync_from(donor, others)
        except SwarmError as error:
            logger.warning("catching up from %s failed: %s", donor[:12], error)
        return True
