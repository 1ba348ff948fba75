"""Handing the current training state to a peer that joins or fell behind.

A donor answers :class:`StateRequest` with ``theta_global``, the outer momentum and
the round, plus the parameters' hash, which the receiver checks. Newcomers pick
donors by their own id, so several joiners spread over the members at the latest
round instead of all loading one donor (hivemind #169).
"""

from __future__ import annotations

import hashlib

import torch

from swarm.training.diloco import hash_parameters
from transport import BaseEndpoint, Message, message
from transport.errors import MalformedMessage


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
