"""Tensor codecs: how a tensor's values become buffer frames and back.

Each codec is a frozen dataclass whose fields are its parameters. The header of a
tensor on the wire names the codec and carries its parameters; the receiver rebuilds
a tensor of the original dtype and shape. Lossy codecs apply to floating tensors
only; any other dtype travels raw.

Error bounds (per element; ``absmax`` = largest magnitude in the element's block):

| codec           | frames          | bound                                                 |
|-----------------|-----------------|-------------------------------------------------------|
| raw             | data            | exact                                                 |
| fp16            | data            | ``|x| * 2**-11`` for fp16 normals (``6.1e-5 <= |x| <= 65504``) |
| bf16            | data            | ``|x| * 2**-8``                                       |
| int8 blockwise  | codes, scales   | ``absmax / 254``                                      |
| nf4 blockwise   | packed, scales  | ``absmax * 0.1520`` (half the widest NF4 gap, -1..-0.696) |

``WIRE_FORMATS`` names the codecs a user picks by name for floating tensors (a
client's ``activations`` option: ``float32`` sends them as they are).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kernels import (
    dequantize_blockwise_4bit,
    dequantize_blockwise_int8,
    quantize_blockwise_4bit,
    quantize_blockwise_int8,
)
from transport.errors import ConfigurationError, MalformedMessage
from transport.tensors import tensor_buffer, tensor_from_buffer

_MAX_BLOCK_SIZE = 2**20


@dataclass(frozen=True)
class RawCodec:
    """The tensor's own bytes, unchanged."""

    name: ClassVar[str] = "raw"
    frame_count: ClassVar[int] = 1

    def params(self) -> dict[str, Any]:
        return {}

    def encode(self, tensor: torch.Tensor) -> list[Any]:
        return [tensor_buffer(tensor)]

    @classmethod
    def decode(cls, params: dict, dtype: torch.dtype, numel: int, buffers: list[Any]) -> torch.Tensor:
        return tensor_from_buffer(buffers[0], dtype, numel)


@dataclass(frozen=True)
class _CastCodec:
    """Floating values cast to a 16-bit type on the wire, back to the original on receipt."""

    frame_count: ClassVar[int] = 1
    wire_dtype: ClassVar[torch.dtype]

    def params(self) -> dict[str, Any]:
        return {}

    def encode(self, tensor: torch.Tensor) -> list[Any]:
        return [tensor_buffer(tensor.to(self.wire_dtype))]

    @classmethod
    def decode(cls, params: dict, dtype: torch.dtype, numel: int, buffers: list[Any]) -> torch.Tensor:
        return tensor_from_buffer(buffers[0], cls.wire_dtype, numel).to(dtype)


@dataclass(frozen=True)
class Float16Codec(_CastCodec):
    """IEEE half precision: relative error <= 2**-11 within fp16's normal range."""

    name: ClassVar[str] = "fp16"
    wire_dtype: ClassVar[torch.dtype] = torch.float16


@dataclass(frozen=True)
class BFloat16Codec(_CastCodec):
    """bfloat16: fp32's range, relative error <= 2**-8."""

    name: ClassVar[str] = "bf16"
    wire_dtype: ClassVar[torch.dtype] = torch.bfloat16


def _block_size(params: dict) -> int:
    block_size = params.get("block_size")
    if type(block_size) is not int or not 0 < block_size <= _MAX_BLOCK_SIZE or block_size % 2:
        raise MalformedMessage(f"codec block_size must be a positive even int, got {block_size!r}")
    return block_size


def _scales(buffer: Any, numel: int, block_size: int) -> torch.Tensor:
    return tensor_from_buffer(buffer, torch.float32, math.ceil(numel / block_size))


def _check_block_size(block_size: int) -> None:
    if not 0 < block_size <= _MAX_BLOCK_SIZE or block_size % 2:
        raise ConfigurationError(f"block_size must be a positive even int <= {_MAX_BLOCK_SIZE}")


@dataclass(frozen=True)
class Int8BlockwiseCodec:
    """int8 codes with one float32 absmax scale per ``block_size`` elements.

    Attributes:
        block_size: elements per block (positive, even); smaller blocks cost more
            scales but bound the error by a more local absmax.
    """

    block_size: int = 64
    name: ClassVar[str] = "int8"
    frame_count: ClassVar[int] = 2

    def __post_init__(self) -> None:
        _check_block_size(self.block_size)

    def params(self) -> dict[str, Any]:
        return {"block_size": self.block_size}

    def encode(self, tensor: torch.Tensor) -> list[Any]:
        codes, scales = quantize_blockwise_int8(tensor, self.block_size)
        return [tensor_buffer(codes), tensor_buffer(scales)]

    @classmethod
    def decode(cls, params: dict, dtype: torch.dtype, numel: int, buffers: list[Any]) -> torch.Tensor:
        return cls.decode_later(params, dtype, numel, buffers)(None)

    @classmethod
    def decode_later(
        cls, params: dict, dtype: torch.dtype, numel: int, buffers: list[Any]
    ) -> Callable[[torch.Tensor | None], torch.Tensor]:
        """Check the frames now; dequantize when called, into its ``out`` argument if not None."""
        block_size = _block_size(params)
        codes = tensor_from_buffer(buffers[0], torch.int8, numel)
        scales = _scales(buffers[1], numel, block_size)
        return lambda out: dequantize_blockwise_int8(codes, scales, block_size, dtype, out=out)


@dataclass(frozen=True)
class FourBitBlockwiseCodec:
    """4-bit codes (two per byte) with one float32 absmax scale per block.

    Attributes:
        block_size: elements per block (positive, even).
        kind: ``"nf4"`` (normal-float levels, QLoRA) or ``"int4"`` (uniform levels).
    """

    block_size: int = 64
    kind: str = "nf4"
    name: ClassVar[str] = "4bit"
    frame_count: ClassVar[int] = 2

    def __post_init__(self) -> None:
        _check_block_size(self.block_size)
        if self.kind not in ("nf4", "int4"):
            raise ConfigurationError(f"kind must be 'nf4' or 'int4', got {self.kind!r}")

    def params(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "kind": self.kind}

    def encode(self, tensor: torch.Tensor) -> list[Any]:
        packed, scales = quantize_blockwise_4bit(tensor, self.block_size, kind=self.kind)
        return [tensor_buffer(packed), tensor_buffer(scales)]

    @classmethod
    def decode(cls, params: dict, dtype: torch.dtype, numel: int, buffers: list[Any]) -> torch.Tensor:
        block_size = _block_size(params)
        kind = params.get("kind")
        if kind not in ("nf4", "int4"):
            raise MalformedMessage(f"unknown 4-bit kind {kind!r}")
        packed = tensor_from_buffer(buffers[0], torch.uint8, math.ceil(numel / 2))
        scales = _scales(buffers[1], numel, block_size)
        return dequantize_blockwise_4bit(packed, scales, numel, block_size, kind, dtype)


Codec = RawCodec | Float16Codec | BFloat16Codec | Int8BlockwiseCodec | FourBitBlockwiseCodec
CODECS: dict[str, type] = {
    codec.name: codec
    for codec in (RawCodec, Float16Codec, BFloat16Codec, Int8BlockwiseCodec, FourBitBlockwiseCodec)
}


@dataclass(frozen=True)
class CodedTensor:
    """A tensor to send with a chosen codec: put it where a message declares a tensor.

    The receiver gets a plain ``torch.Tensor`` of the original dtype and shape.

    Attributes:
        tensor: the values.
        codec: how they travel.
    """

    tensor: torch.Tensor
    codec: Codec


class EncodedTensor:
    """A received tensor not decoded yet: the receiver says where its values go.

    What a message field annotated ``EncodedTensor`` (not ``torch.Tensor``) holds; the
    wire is the same. Its frames were checked when the message was decoded. Where the
    codec allows it (int8) :meth:`decode` writes straight into the receiver's buffer,
    with no fresh tensor in between to allocate, fault in and copy; others decode
    first and copy.
    """

    __slots__ = ("_decode", "dtype", "shape")

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        decode: Callable[[torch.Tensor | None], torch.Tensor],
    ):
        self.shape, self.dtype, self._decode = shape, dtype, decode

    @classmethod
    def of(cls, tensor: torch.Tensor) -> EncodedTensor:
        """A tensor at hand, as if received (for callers that feed a receiver directly)."""
        return cls(
            tuple(tensor.shape), tensor.dtype, lambda out: tensor if out is None else out.copy_(tensor)
        )

    @classmethod
    def through(cls, codec: Codec, tensor: torch.Tensor) -> EncodedTensor:
        """``tensor`` encoded with ``codec`` as a receiver of its frames holds it: decoding it
        gives what the receiver decodes (a sender's own copy of what it sends). The frames
        are made now, so ``decode(out=tensor)`` may overwrite ``tensor``."""
        tensor = tensor.contiguous()
        frames = codec.encode(tensor)
        decode = decode_later(type(codec), codec.params(), tensor.dtype, tensor.numel(), frames)
        return cls(tuple(tensor.shape), tensor.dtype, decode)

    def numel(self) -> int:
        return math.prod(self.shape)

    def decode(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The values, of ``shape`` and ``dtype``; written into ``out`` (and returned) when
        given: a contiguous tensor of ``numel()`` values, any shape (another dtype: cast).

        Raises:
            ValueError: ``out`` has another number of values or is not contiguous.
        """
        if out is None:
            return self._decode(None).view(self.shape)
        if out.numel() != self.numel() or not out.is_contiguous():
            raise ValueError(f"cannot decode {self.numel()} values into a tensor of shape {tuple(out.shape)}")
        if out.dtype == self.dtype:
            self._decode(out.view(-1))
        else:
            out.view(-1).copy_(self._decode(None).view(-1))
        return out


def decode_later(
    codec: type, params: dict, dtype: torch.dtype, numel: int, buffers: list[Any]
) -> Callable[[torch.Tensor | None], torch.Tensor]:
    """``codec``'s decoding of ``buffers``, checked now and run when called (see :class:`EncodedTensor`):
    into the caller's ``out`` where the codec can (its own ``decode_later``), else decoded now and copied."""
    if hasattr(codec, "decode_later"):
        return codec.decode_later(params, dtype, numel, buffers)
    decoded = codec.decode(params, dtype, numel, buffers)
    return lambda out: decoded if out is None else out.copy_(decoded)


WIRE_FORMATS: dict[str, Codec] = {
    "float32": RawCodec(),  # the tensor's own bytes (activations are float32 on the client)
    "bf16": BFloat16Codec(),
    "int8": Int8BlockwiseCodec(64),  # 1.06 bytes per value: 1 code + a float32 scale per 64
}


def wire_codec(name: str) -> Codec:
    """The codec of the wire format ``name`` (a key of ``WIRE_FORMATS``).

    Raises:
        MalformedMessage: no such format (a ``ValueError``-like refusal for a peer's request).
    """
    codec = WIRE_FORMATS.get(name) if type(name) is str else None
    if codec is None:
        raise MalformedMessage(f"unknown wire format {name!r}; one of {sorted(WIRE_FORMATS)}")
    return codec


def coded(tensor: torch.Tensor, codec: Codec) -> torch.Tensor | CodedTensor:
    """``tensor`` to put in a message field so that it travels with ``codec`` (raw: as it is)."""
    return tensor if isinstance(codec, RawCodec) else CodedTensor(tensor, codec)
