"""What the all-reduce puts on the wire: its message kinds and the codecs pseudo-gradients travel with.

``AveragingService`` (``averaging.py``) serves and sends these; a contribution or a result
travels as chunks (``offset`` says where a chunk starts in its part). ``codec_round_trip``
is what a receiver decodes from a codec's bytes: members apply that, so reducers and backups
round-trip their aggregates through it.
"""

from __future__ import annotations

import torch

from transport import (
    EncodedTensor,
    Float16Codec,
    FourBitBlockwiseCodec,
    Int8BlockwiseCodec,
    Message,
    RawCodec,
    message,
)

COMPRESSIONS = {
    "none": RawCodec(),
    "fp16": Float16Codec(),
    "int8": Int8BlockwiseCodec(64),
    "4bit": FourBitBlockwiseCodec(64),
}
"""``--compression`` values and the codec pseudo-gradients travel with (blocks of 64 values)."""


@message("train.contribution")
class Contribution(Message):
    round: str
    part: int
    sender: int
    weight: float
    values: EncodedTensor
    """Decoded by the receiver straight into its buffer for the part (sent as a tensor)."""
    offset: int = 0
    """Where ``values`` start in the part (a chunk of it); 0 and the part's size: all of it."""


@message("train.result")
class PartResult(Message):
    round: str
    part: int
    contributors: list[int]
    values: EncodedTensor
    """Decoded by the receiver straight into its buffer for the results (sent as a tensor)."""
    disputed: bool = False
    """In a repair reply: the backup disputes the part (ask its arbiter); ``values`` is empty."""
    offset: int = 0
    """Where ``values`` start in the part (a chunk of it, in the gather phase)."""


@message("train.repair")
class RepairRequest(Message):
    round: str
    part: int
    sender: int
    weight: float
    values: torch.Tensor
    arbitrate: bool = False
    """Ask the part's arbiter (its reducer and backup disagree), not its backup."""


@message("train.verdict")
class Verdict(Message):
    """From a part's backup: the digest of the result it endorses ("": it disputes the part)."""

    round: str
    part: int
    digest: str


@message("train.ack")
class Ack(Message):
    accepted: bool = True
    status: str = "accepted"
    """To a result: ``accepted``, ``taken_over`` or ``disputed`` (see ``CommitReply``), or
    ``partial``: a chunk was kept and the result is not complete yet."""


def codec_round_trip(codec, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` as a receiver of ``codec``'s bytes decodes them, written into ``out`` when given.

    ``out`` (a contiguous float32 tensor of ``values``' size, which may be ``values``
    itself) saves a fresh tensor per call: with int8 the codes decode straight into it,
    where a new 25 MB result cost the kernel faulting in and zeroing its pages, several
    times what the decoding itself costs.
    """
    out = None if out is None else out.view(-1)
    return EncodedTensor.through(codec, values.reshape(-1).to(torch.float32)).decode(out)


def kept_encoded(codec, values: torch.Tensor) -> EncodedTensor:
    """``values`` as ``codec`` puts them on the wire, in memory of their own: what a finished
    round keeps for late repairs. Decoding gives ``values``' bits when they are a round
    trip's result already (quantizing dequantized codes gives the same codes). Raw frames
    are views of the values, whose buffer goes back to the pool: those are copied.
    """
    if isinstance(codec, RawCodec):
        values = values.clone()
    return EncodedTensor.through(codec, values.reshape(-1))


def encoded_size(codec, values: torch.Tensor) -> int:
    """Bytes of the buffers ``codec`` puts on the wire for ``values``."""
    return sum(memoryview(buffer).nbytes for buffer in codec.encode(values.contiguous()))


def wire_size(codec, numel: int) -> int:
    """Bytes of the buffers ``codec`` puts on the wire for ``numel`` float32 values, without encoding.

    Equals :func:`encoded_size` for every codec of :data:`COMPRESSIONS`; counting
    by encoding cost a second quantization of each part per round.
    """
    if isinstance(codec, RawCodec):
        return 4 * numel
    if isinstance(codec, Float16Codec):
        return 2 * numel
    scales = 4 * -(-numel // codec.block_size)  # one float32 absmax per block
    if isinstance(codec, Int8BlockwiseCodec):
        return numel + scales
    if isinstance(codec, FourBitBlockwiseCodec):
        return -(-numel // 2) + scales
    return encoded_size(codec, torch.zeros(numel))
