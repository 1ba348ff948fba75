"""How the all-reduce sends one contribution or result: a stream of chunks, a few in flight.

A part of a 100 MB vector among four members is 25 MB; sent as one message, libzmq's
CURVE encrypts it into a new 25 MB buffer on the sender and decrypts it into another on
the receiver, both fresh pages the kernel zeroes, and the receiver can do nothing with
it until the last byte is in. :func:`send_chunks` sends it as messages of about
:data:`CHUNK_BYTES` instead, :data:`CHUNKS_IN_FLIGHT` unacknowledged at most, so the
receiver handles chunk i while chunk i+1 is on the wire and the allocator hands the
same buffers back message after message. :class:`EncodedOnce` quantizes a chunk that
goes to several members once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import torch

from transport import Message

CHUNK_BYTES = 2**20
"""Wire bytes of one all-reduce message. With CURVE on, 1 MiB moved 1.7x the bytes per
second of 25 MiB messages and 1.15x those of 256 KiB ones (README, "allreduce"): libzmq
encrypts every message into a new buffer, which at this size comes back from the heap
instead of fresh (kernel-zeroed) pages, and smaller ones pay more per-message overhead."""

CHUNKS_IN_FLIGHT = 4
"""Chunks of one stream sent before the first is acknowledged: enough to keep the link
busy while the receiver handles one, few enough to stay far below the receiver's
per-peer in-flight byte limit."""

ChunkCall = Callable[[Message, float, int], Awaitable[Message]]
"""Sends one chunk's message with a timeout and the chunk's index; returns the reply."""


async def send_chunks(
    call: ChunkCall,
    values: torch.Tensor,
    chunk_values: int,
    message: Callable[[int, torch.Tensor], Message],
    timeout: float,
    stops_early: bool = False,
) -> Message:
    """Send ``values`` as chunks of ``chunk_values``, each as ``message(offset, chunk)``.

    The whole stream is bounded by ``timeout``, as one message of the whole part was.

    Args:
        stops_early: a reply that is not ``partial`` ends the stream at once (a backup
            that took a part over refuses the rest of its result).
    Returns:
        the reply that ended the stream (the last chunk's unless ``stops_early``).
    Raises:
        whatever a chunk's call raises; the chunks still in flight are abandoned.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    offsets = range(0, values.numel(), chunk_values) if values.numel() else range(1)
    in_flight: deque[asyncio.Task] = deque()
    reply: Message | None = None
    try:
        for index, offset in enumerate(offsets):
            if len(in_flight) >= CHUNKS_IN_FLIGHT:
                reply = await in_flight.popleft()
                if stops_early and not _more_to_come(reply):
                    return reply
            chunk = message(offset, values[offset : offset + chunk_values])
            in_flight.append(loop.create_task(call(chunk, deadline - loop.time(), index)))
        while in_flight:
            reply = await in_flight.popleft()
            if stops_early and not _more_to_come(reply):
                return reply
        return reply  # type: ignore[return-value]  # at least one chunk was sent
    finally:
        for task in in_flight:  # the stream failed or ended early: the rest is moot
            task.cancel()
            task.add_done_callback(_retrieve)


def _more_to_come(reply: Message) -> bool:
    return getattr(reply, "status", None) == "partial"  # an Ack for a chunk of an incomplete result


def _retrieve(task: asyncio.Task) -> None:
    """Mark an abandoned chunk's outcome as seen (its failure was not the stream's)."""
    if not task.cancelled():
        task.exception()


class EncodedOnce:
    """The service's codec, encoding each chunk once per round however many members it goes to.

    A contribution goes to its part's reducer and backup, a result to every member: the
    same chunk, quantized two or three times over. This codec keeps each chunk's wire
    buffers for the round (keyed by its memory: a round sends views of its vector and of
    its results, which nothing writes while the round runs), about a quarter of the bytes
    the round sends with int8. Receivers decode by the codec's name, as ever.
    """

    def __init__(self, codec):
        self.codec = codec
        self.name = codec.name
        # (the tensor, kept so its memory cannot be reused by another one this round; its buffers)
        self._encoded: dict[tuple[int, int, torch.dtype], tuple[torch.Tensor, list]] = {}

    def params(self) -> dict:
        return self.codec.params()

    def encode(self, tensor: torch.Tensor) -> list:
        if not tensor.is_contiguous():
            return self.codec.encode(tensor)
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in self._encoded:
            self._encoded[key] = (tensor, self.codec.encode(tensor))
        return self._encoded[key][1]

    def clear(self) -> None:
        """Forget the round's chunks once it has sent them all. A finished round stays
        reachable for repairs; until then this would keep the caller's whole vector (the
        chunks are views of it) and the round's wire buffers alive: about 1.6x the vector
        per round, piling up when rounds come faster than the repair window."""
        self._encoded.clear()
