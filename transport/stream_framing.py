"""Multipart messages over a byte stream (the libp2p data plane), with limits checked first.

ZeroMQ delimits frames for us; a libp2p stream is one ordered byte stream, so each
message travels as a header and then its frames back to back::

    u32 frame count | u64 length of each frame | frame 0 (envelope) | frame 1 | ...

(all integers little-endian). The header is read and checked against ``Limits``
(frame count, total bytes) before any frame is buffered, so a peer that announces a
huge message is refused without allocating it, as ZeroMQ's ``MAXMSGSIZE`` does.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from transport.errors import MessageTooLarge
from transport.limits import Limits

_COUNT = struct.Struct("<I")


def _as_bytes(frame: Any) -> memoryview:
    """A flat byte view of one frame (bytes, a memoryview or a contiguous numpy array)."""
    view = memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def write_frames(writer: asyncio.StreamWriter, frames: list[Any]) -> int:
    """Queue one message on ``writer`` without blocking; returns its size on the wire.

    The stream's transport buffers what the socket cannot take yet; the caller bounds
    that buffer (``writer.transport.get_write_buffer_size()``).
    """
    views = [_as_bytes(frame) for frame in frames]
    header = _COUNT.pack(len(views)) + struct.pack(f"<{len(views)}Q", *(view.nbytes for view in views))
    writer.write(header)
    for view in views:
        if view.nbytes:
            writer.write(view)
    return len(header) + sum(view.nbytes for view in views)


async def read_frames(reader: asyncio.StreamReader, limits: Limits, body_timeout: float) -> list[memoryview]:
    """Read one message; waits as long as needed for its header, then ``body_timeout`` for the rest.

    Returns:
        the frames as writable memory (tensors wrap it without copying).
    Raises:
        asyncio.IncompleteReadError: the stream ended (cleanly between messages, when
            ``.partial`` is empty).
        MessageTooLarge: the header announces more frames or bytes than ``limits`` allow
            (the stream cannot be resynchronised: the caller drops it).
        TimeoutError: the frames did not arrive within ``body_timeout`` of the header.
    """
    (count,) = _COUNT.unpack(await reader.readexactly(_COUNT.size))
    if not 1 <= count <= limits.max_frames:
        raise MessageTooLarge(f"message of {count} frames (max_frames={limits.max_frames})")
    async with asyncio.timeout(body_timeout):
        lengths = struct.unpack(f"<{count}Q", await reader.readexactly(8 * count))
        total = sum(lengths)
        if total > limits.max_message_bytes:
            raise MessageTooLarge(f"message of {total} bytes (max_message_bytes={limits.max_message_bytes})")
        if lengths[0] > limits.max_envelope_bytes:
            raise MessageTooLarge(
                f"envelope of {lengths[0]} bytes (max_envelope_bytes={limits.max_envelope_bytes})"
            )
        body = memoryview(bytearray(await reader.readexactly(total))) if total else memoryview(bytearray())
    frames = []
    offset = 0
    for length in lengths:
        frames.append(body[offset : offset + length])
        offset += length
    return frames
