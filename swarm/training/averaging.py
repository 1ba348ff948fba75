"""The all-reduce's service: it routes the wire messages (``averaging_wire.py``) to rounds.

One :class:`AveragingService` lives on a trainer's endpoint. Each round registers an
:class:`~swarm.training.allreduce.AllReduceRound`; requests for a round not yet
registered (a faster member got there first) wait for it a bounded time. A request
must come from the CURVE key of the member it claims to be, so no one can inject a
contribution in another member's name.

Outgoing, each round reaches its group through a :class:`_TransportLinks` (the
:class:`~swarm.training.allreduce.GroupLinks` of this service), which turns each send
into wire messages, counts the bytes, and first calls the service's ``before_send``
hook with an :class:`AllReduceSend` for each message.

A contribution or a result travels as a stream of chunks of about ``chunk_bytes`` on the
wire (:mod:`~swarm.training.chunk_streams`), a few at a time, each acknowledged: the
receiver copies chunk i into the round's buffer while chunk i+1 is on the wire, and
libzmq encrypts and decrypts each chunk in a buffer the allocator hands back for the
next one, where a whole 25 MB part took fresh pages (zeroed by the kernel) each time.
Chunk boundaries fall on the codec's blocks, so a chunked part decodes to the same
bits as a whole one. The process layer uses that hook for fault
injection (``SWARM_FAULT`` in ``peers/train.py``); the library never acts on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import torch

from swarm.training.allreduce import AllReduceReport, AllReduceRound, AllReduceTimeouts, CommitReply, Member
from swarm.training.averaging_wire import (
    COMPRESSIONS,
    Ack,
    Contribution,
    PartResult,
    RepairRequest,
    Verdict,
    wire_size,
)
from swarm.training.chunk_streams import CHUNK_BYTES, EncodedOnce, send_chunks
from swarm.training.parts import fallback_reducer
from swarm.training.reduction import BufferPool
from swarm.training.robust import RobustConfig
from transport import (
    BaseEndpoint,
    CodedTensor,
    Connection,
    EncodedTensor,
    Message,
    NotAuthorized,
    RequestContext,
    ServerBusy,
)
from transport.errors import MalformedMessage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AllReduceSend:
    """A message this member is about to send in an all-reduce: what ``before_send`` hooks see.

    Attributes:
        all_reduce: which of this service's all-reduces it belongs to, counting from 1.
        round_id: the round's name on the wire.
        kind: ``"contribution"`` (scatter), ``"result"`` (gather), ``"verdict"`` or ``"repair"``.
        target: the receiving member's position in the group.
        group_size: members in the group.
        chunk: which chunk of a contribution or result this message is, counting from 0.
    """

    all_reduce: int
    round_id: str
    kind: Literal["contribution", "result", "verdict", "repair"]
    target: int
    group_size: int
    chunk: int = 0


BeforeSend = Callable[[AllReduceSend], None]
"""Called before each all-reduce message this member sends (fault injection, tracing)."""

BeforeContribute = Callable[[int, torch.Tensor, float], float]
"""Called with (round, pseudo-gradient, sample weight) before a member's contribution goes
into the all-reduce; returns the weight to send, may change the pseudo-gradient in place.
The process layer's test-only attacker uses it (``SWARM_ATTACK`` in ``peers/train.py``)."""


@dataclass
class AveragingOutcome:
    """The averaged vector, what the round did, and this member's bytes on the wire."""

    averaged: torch.Tensor
    report: AllReduceReport
    bytes_sent: int


class AveragingService:
    """Serves the all-reduce messages on ``endpoint`` and runs rounds for this member.

    Args:
        endpoint: this trainer's transport endpoint (bound by the caller).
        compression: a key of :data:`COMPRESSIONS`.
        registration_wait: how long a request for an unknown round waits for it to start.
        before_send: called with each :class:`AllReduceSend` before the message goes out.
        chunk_bytes: wire bytes of one message of a contribution or result stream.
    """

    def __init__(
        self,
        endpoint: BaseEndpoint,
        compression: str = "int8",
        registration_wait: float = 30.0,
        before_send: BeforeSend | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        if compression not in COMPRESSIONS:
            raise ValueError(f"--compression must be one of {sorted(COMPRESSIONS)}, got {compression!r}")
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.endpoint = endpoint
        self.codec = COMPRESSIONS[compression]
        block = getattr(self.codec, "block_size", 64)
        per_block = wire_size(self.codec, block)
        self.chunk_values = max(1, chunk_bytes // per_block) * block
        """Values per chunk: whole codec blocks, so chunks quantize as the whole part does."""
        self.registration_wait = registration_wait
        self.before_send = before_send
        self.all_reduces = 0
        """All-reduces this service has run (``AllReduceSend.all_reduce`` of the current one)."""
        self._rounds: dict[str, AllReduceRound] = {}
        self._buffers = BufferPool(keep=6)
        """Work buffers each round gives back for the next (see ``BufferPool``: kept pages, not
        fresh zeroed ones, at the cost of holding them between rounds)."""
        self._registered = asyncio.Condition()
        self._connections: dict[tuple[str, bytes], Connection] = {}
        self._dialing: dict[tuple[str, bytes], asyncio.Lock] = {}
        endpoint.add_handler(Contribution, self._on_contribution)
        endpoint.add_handler(PartResult, self._on_result)
        endpoint.add_handler(RepairRequest, self._on_repair)
        endpoint.add_handler(Verdict, self._on_verdict)

    async def _round(self, round_id: str, sender: int | None, context: RequestContext) -> AllReduceRound:
        async def registered() -> AllReduceRound:
            async with self._registered:
                await self._registered.wait_for(lambda: round_id in self._rounds)
                return self._rounds[round_id]

        round_ = self._rounds.get(round_id)  # the usual case: no waiting, so a chunk is handled
        if round_ is None:  # in the socket's callback, in the order it arrived
            try:
                round_ = await asyncio.wait_for(registered(), self.registration_wait)
            except TimeoutError:
                raise ServerBusy(f"no all-reduce round {round_id!r} here") from None
        if sender is not None:
            if not 0 <= sender < len(round_.members):
                raise MalformedMessage(f"sender {sender} is not in round {round_id!r}")
            self._check_sender(round_, sender, context)
        return round_

    @staticmethod
    def _check_sender(round_: AllReduceRound, sender: int, context: RequestContext) -> None:
        """The request must come from the CURVE key of member ``sender`` of the round."""
        expected = round_.members[sender].public_key
        if expected and context.peer_key is not None and context.peer_key != expected:
            raise NotAuthorized(f"this connection is not member {sender} of round {round_.round_id!r}")

    async def _on_contribution(self, request: Contribution, context: RequestContext) -> Ack:
        round_ = await self._round(request.round, request.sender, context)
        try:
            round_.on_contribution(
                request.sender, request.part, request.weight, request.values, request.offset
            )
        except ValueError as error:
            raise MalformedMessage(str(error)) from None
        return Ack()

    async def _on_result(self, request: PartResult, context: RequestContext) -> Ack:
        round_ = await self._round(request.round, request.part, context)  # only the part's reducer
        try:
            status = await round_.on_result(
                request.part, request.values, request.contributors, request.offset
            )
        except ValueError as error:
            raise MalformedMessage(str(error)) from None
        if status is None:
            return Ack(status="partial")
        return Ack(accepted=status == "accepted", status=status)

    async def _on_verdict(self, request: Verdict, context: RequestContext) -> Ack:
        round_ = await self._round(request.round, None, context)
        if not 0 <= request.part < len(round_.members):
            raise MalformedMessage(f"part {request.part} is not in round {request.round!r}")
        self._check_sender(round_, fallback_reducer(request.part, round_.bandwidths), context)
        round_.on_verdict(request.part, request.digest)
        return Ack()

    async def _on_repair(self, request: RepairRequest, context: RequestContext) -> PartResult:
        round_ = await self._round(request.round, request.sender, context)
        try:
            result, contributors = await round_.on_repair(
                request.sender, request.part, request.weight, request.values, request.arbitrate
            )
        except ValueError as error:
            raise MalformedMessage(str(error)) from None
        if result is None:
            return PartResult(request.round, request.part, [], torch.zeros(0), disputed=True)
        # a copy: the round's buffers go back to the pool (rare path); a released round kept it encoded
        values = result.decode() if isinstance(result, EncodedTensor) else result.clone()
        return PartResult(request.round, request.part, contributors, CodedTensor(values, self.codec))

    async def _connection(self, member: Member) -> Connection:
        key = (member.address, member.public_key)

        def usable(known) -> bool:  # a libp2p connection (to a relayed member) does not reconnect
            return known is not None and not getattr(known, "broken", False)

        if not usable(self._connections.get(key)):
            # the chunks of a stream ask at once: one dial, which they all wait for
            async with self._dialing.setdefault(key, asyncio.Lock()):
                known = self._connections.get(key)
                if not usable(known):
                    if known is not None:
                        await known.close()
                    self._connections[key] = await self.endpoint.connect(member.address, member.public_key)
        return self._connections[key]

    async def all_reduce(
        self,
        round_id: str,
        members: list[Member],
        my_index: int,
        vector: torch.Tensor,
        weight: float,
        timeouts: AllReduceTimeouts = AllReduceTimeouts(),
        out: torch.Tensor | None = None,
        robust: RobustConfig = RobustConfig(),
        verify: bool = True,
    ) -> AveragingOutcome:
        """Average ``vector`` with the group; every survivor gets the same bits.

        ``out``, when given, receives the average (see :meth:`AllReduceRound.run`); it may
        be ``vector`` itself.

        Raises:
            DeadlineExceeded: a part has no result even after repair.
        """
        self.all_reduces += 1
        links = _TransportLinks(self, round_id, members, my_index, self.all_reduces)
        round_ = AllReduceRound(
            round_id,
            members,
            my_index,
            vector,
            weight,
            links,
            self.codec,
            timeouts,
            alignment=getattr(self.codec, "block_size", 64),
            robust=robust,
            verify=verify,
            buffers=self._buffers,
        )
        async with self._registered:
            self._rounds[round_id] = round_
            self._registered.notify_all()
        try:
            averaged = await round_.run(out)
            round_.release()
        finally:
            round_.close()
            links.codec.clear()
            # Keep the round reachable a little longer: a slower member may still ask for a repair.
            asyncio.get_running_loop().call_later(timeouts.repair, self._forget, round_)
        return AveragingOutcome(averaged, round_.report, links.bytes_sent)

    def _forget(self, round_: AllReduceRound) -> None:
        if self._rounds.get(round_.round_id) is round_:
            del self._rounds[round_.round_id]
        round_.forget()

    async def close(self) -> None:
        for connection in self._connections.values():
            await connection.close()
        self._connections.clear()


class _TransportLinks:
    """:class:`~swarm.training.allreduce.GroupLinks` of one round over the service's endpoint."""

    def __init__(
        self, service: AveragingService, round_id: str, members: list[Member], my_index: int, count: int
    ):
        self.service = service
        self.round_id = round_id
        self.members = members
        self.my_index = my_index
        self.count = count
        self.bytes_sent = 0
        self.codec = EncodedOnce(service.codec)

    async def send_contribution(
        self, target: int, part: int, weight: float, values: torch.Tensor, timeout: float
    ) -> None:
        def chunk(offset: int, values: torch.Tensor) -> Contribution:
            return Contribution(self.round_id, part, self.my_index, weight, self._coded(values), offset)

        await send_chunks(
            self._caller("contribution", target), values, self.service.chunk_values, chunk, timeout
        )

    async def send_result(
        self, target: int, part: int, contributors: list[int], values: torch.Tensor, timeout: float
    ) -> CommitReply:
        def chunk(offset: int, values: torch.Tensor) -> PartResult:
            return PartResult(self.round_id, part, list(contributors), self._coded(values), offset=offset)

        caller = self._caller("result", target)
        reply = await send_chunks(caller, values, self.service.chunk_values, chunk, timeout, stops_early=True)
        if not isinstance(reply, Ack) or reply.status not in ("accepted", "taken_over", "disputed"):
            raise MalformedMessage(f"member {target} answered a result with {reply!r:.80}")
        return reply.status

    async def send_verdict(self, target: int, part: int, digest: str, timeout: float) -> None:
        await self._call("verdict", target, Verdict(self.round_id, part, digest), timeout)

    async def request_repair(
        self, target: int, part: int, weight: float, values: torch.Tensor, timeout: float, arbitrate: bool
    ) -> tuple[torch.Tensor | None, list[int]]:
        message = RepairRequest(self.round_id, part, self.my_index, weight, self._coded(values), arbitrate)
        reply = await self._call("repair", target, message, timeout)
        if not isinstance(reply, PartResult) or reply.part != part:
            raise MalformedMessage(f"member {target} answered a repair with {reply!r:.80}")
        return (None, []) if reply.disputed else (reply.values.decode().view(-1), reply.contributors)

    def _caller(self, kind, target: int) -> Callable[[Message, float, int], Awaitable[Message]]:
        def call(message: Message, timeout: float, chunk: int) -> Awaitable[Message]:
            return self._call(kind, target, message, timeout, chunk)

        return call

    def _coded(self, values: torch.Tensor) -> CodedTensor:
        return CodedTensor(values, self.codec)  # type: ignore[arg-type]  # a codec by duck typing

    async def _call(self, kind, target: int, message: Message, timeout: float, chunk: int = 0) -> Message:
        if self.service.before_send is not None:
            send = AllReduceSend(self.count, self.round_id, kind, target, len(self.members), chunk)
            self.service.before_send(send)
        connection = await self.service._connection(self.members[target])
        if isinstance(message, Verdict):
            self.bytes_sent += len(message.digest)
        else:
            self.bytes_sent += wire_size(self.service.codec, message.values.tensor.numel())
        return await connection.call(message, timeout=timeout)
